package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmesh/vmesh/internal/mux"
)

// h1App is the app behind B in the HTTP/1 correctness tests.
type h1App struct {
	addr  netip.AddrPort
	conns atomic.Int32 // connections accepted
	hits  atomic.Int32 // requests served
	next  chan struct{}
}

func startH1App(t *testing.T) *h1App {
	app := &h1App{next: make(chan struct{})}
	mux := http.NewServeMux()
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("X-Proto", r.Proto)
		w.Header().Set("X-Path", r.URL.Path)
		for _, k := range []string{"X-Foo", "Keep-Alive", "Proxy-Connection", "Vmesh-Dst-Port", "L5d-Orig-Proto", "Te", "X-Keep", "Content-Length"} {
			w.Header().Set("X-Got-"+k, strings.Join(r.Header.Values(k), ","))
		}
		w.Header().Set("X-Len", strconv.FormatInt(r.ContentLength, 10))
		w.Write(body)
	})
	mux.HandleFunc("/trailers", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		sum := sha256.Sum256(body)
		w.Header().Set("Trailer", "X-Sum, X-Req-Trailer")
		w.WriteHeader(200)
		w.Write([]byte("part1-"))
		w.(http.Flusher).Flush()
		w.Write([]byte("part2"))
		w.Header().Set("X-Sum", hex.EncodeToString(sum[:]))
		w.Header().Set("X-Req-Trailer", r.Trailer.Get("X-Req-Trailer"))
	})
	mux.HandleFunc("/sha", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		if r.URL.Query().Get("len") != "" {
			w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		}
		io.Copy(w, io.LimitReader(&patternReader{}, n))
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("event1\n"))
		w.(http.Flusher).Flush()
		select {
		case <-app.next:
		case <-r.Context().Done():
			return
		}
		w.Write([]byte("event2\n"))
	})
	mux.HandleFunc("/hop", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "X-Bar")
		w.Header().Set("X-Bar", "hop")
		w.Header().Set("X-Keep", "end-to-end")
		io.WriteString(w, "ok")
	})
	ln := listenLocal(t)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			app.hits.Add(1)
			mux.ServeHTTP(w, r)
		}),
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				app.conns.Add(1)
			}
		},
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	app.addr = addrPort(ln.Addr())
	return app
}

// h1Mesh starts an app behind B and returns A, B and the app; the app's
// service is web at appAddr(80).
func h1Mesh(t *testing.T, aOpts proxyOpts) (a, b *testProxy, app *h1App) {
	app = startH1App(t)
	a, b, _ = meshPair(t, []LocalService{{Name: "web", Port: 80, Target: app.addr}}, aOpts, proxyOpts{})
	return a, b, app
}

func readResp(t *testing.T, br *bufio.Reader, method string) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading response: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading response body: %v", err)
	}
	return resp, string(body)
}

func TestH1Pipelining(t *testing.T) {
	a, _, app := h1Mesh(t, proxyOpts{})
	c := a.dialOut(t, appAddr(80))
	var reqs bytes.Buffer
	for i := range 3 {
		fmt.Fprintf(&reqs, "POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\n\r\nb%d", i)
	}
	reqs.WriteString("HEAD /echo HTTP/1.1\r\nHost: web\r\n\r\nGET /echo HTTP/1.1\r\nHost: web\r\n\r\n")
	reqs.WriteString("POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n")
	if _, err := c.Write(reqs.Bytes()); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	for i := range 3 {
		resp, body := readResp(t, br, "POST")
		if resp.StatusCode != 200 || body != fmt.Sprintf("b%d", i) {
			t.Fatalf("pipelined response %d: %d %q", i, resp.StatusCode, body)
		}
	}
	if resp, body := readResp(t, br, "HEAD"); resp.StatusCode != 200 || body != "" {
		t.Fatalf("pipelined HEAD: %d %q", resp.StatusCode, body)
	}
	if resp, body := readResp(t, br, "GET"); resp.StatusCode != 200 || body != "" || resp.Header.Get("X-Path") != "/echo" {
		t.Fatalf("GET after HEAD: %d %q", resp.StatusCode, body)
	}
	if resp, _ := readResp(t, br, "POST"); resp.Header.Get("X-Got-Content-Length") != "0" {
		t.Fatalf("POST with Content-Length: 0 reached the app with Content-Length %q, want 0", resp.Header.Get("X-Got-Content-Length"))
	}
	if n := app.conns.Load(); n != 1 {
		t.Errorf("app accepted %d connections, want 1", n)
	}
}

func TestH1KeepAlive(t *testing.T) {
	d := &recordingDialer{}
	a, b, app := h1Mesh(t, proxyOpts{dialer: d})
	var appConns atomic.Int32
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, n, addr string) (net.Conn, error) {
		appConns.Add(1)
		return a.dialContext(ctx, n, addr)
	}}}
	t.Cleanup(client.CloseIdleConnections)
	for i := range 20 {
		resp, err := client.Post("http://198.18.99.2:80/echo", "text/plain", strings.NewReader(fmt.Sprint("body", i)))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != fmt.Sprint("body", i) {
			t.Fatalf("request %d: %q", i, body)
		}
	}
	if appConns.Load() != 1 || d.count() != 1 || app.conns.Load() != 1 {
		t.Errorf("20 keep-alive requests used %d app, %d peer, %d service connections; want 1 each", appConns.Load(), d.count(), app.conns.Load())
	}
	// Each proxy pools its upstream connection after the response went out.
	eventually(t, "one idle peer and one idle service connection", func() bool {
		return a.p.h1peers.size() == 1 && b.p.h1local.size() == 1
	})
	// A pooled peer connection closed under the pool is replaced: the
	// request still succeeds.
	a.p.h1peers.mu.Lock()
	for _, s := range a.p.h1peers.free {
		for _, uc := range s {
			uc.Conn.(interface{ NetConn() net.Conn }).NetConn().Close()
		}
	}
	a.p.h1peers.mu.Unlock()
	b.p.h1local.closeIdle()
	resp, err := client.Get("http://198.18.99.2:80/echo")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("after the pooled connection closed: %v %v", resp, err)
	}
	resp.Body.Close()
}

func TestH1ChunkedAndTrailers(t *testing.T) {
	a, _, _ := h1Mesh(t, proxyOpts{})
	client := &http.Client{Transport: &http.Transport{DialContext: a.dialContext}}
	t.Cleanup(client.CloseIdleConnections)
	pr, pw := io.Pipe()
	req, _ := http.NewRequest("POST", "http://198.18.99.2:80/trailers", pr)
	req.ContentLength = -1 // chunked
	req.Trailer = http.Header{"X-Req-Trailer": nil}
	payload := strings.Repeat("chunky ", 5000)
	go func() {
		for i := 0; i < len(payload); i += 1000 {
			pw.Write([]byte(payload[i:min(i+1000, len(payload))]))
		}
		req.Trailer.Set("X-Req-Trailer", "sent-after-body")
		pw.Close()
	}()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	sum := sha256.Sum256([]byte(payload))
	if string(body) != "part1-part2" || len(resp.TransferEncoding) == 0 || resp.TransferEncoding[0] != "chunked" {
		t.Fatalf("body %q, transfer encoding %v", body, resp.TransferEncoding)
	}
	if got := resp.Trailer.Get("X-Sum"); got != hex.EncodeToString(sum[:]) {
		t.Errorf("response trailer X-Sum = %q, want the sha256 of the chunked request body", got)
	}
	if got := resp.Trailer.Get("X-Req-Trailer"); got != "sent-after-body" {
		t.Errorf("request trailer reached the app as %q", got)
	}

	// Raw chunks with extensions and a trailer, then a request on the same
	// connection.
	c := a.dialOut(t, appAddr(80))
	io.WriteString(c, "POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"+
		"5;ext=1\r\nhello\r\nA\r\n, world!!!\r\n0\r\nX-T: 1\r\n\r\n"+
		"GET /echo HTTP/1.1\r\nHost: web\r\n\r\n")
	br := bufio.NewReader(c)
	if resp, body := readResp(t, br, "POST"); resp.StatusCode != 200 || body != "hello, world!!!" {
		t.Fatalf("raw chunked: %d %q", resp.StatusCode, body)
	}
	if resp, _ := readResp(t, br, "GET"); resp.StatusCode != 200 {
		t.Fatalf("request after a chunked one: %d", resp.StatusCode)
	}
}

func TestH1ExpectContinue(t *testing.T) {
	a, _, _ := h1Mesh(t, proxyOpts{})
	c := a.dialOut(t, appAddr(80))
	io.WriteString(c, "POST /sha HTTP/1.1\r\nHost: web\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n")
	br := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "HTTP/1.1 100 ") {
		t.Fatalf("want 100 Continue before sending the body, got %q %v", line, err)
	}
	if l, _ := br.ReadString('\n'); l != "\r\n" {
		t.Fatalf("100 Continue head: %q", l)
	}
	io.WriteString(c, "hello world")
	sum := sha256.Sum256([]byte("hello world"))
	if resp, body := readResp(t, br, "POST"); resp.StatusCode != 200 || body != fmt.Sprintf("11 %x", sum) {
		t.Fatalf("after 100-continue: %d %q", resp.StatusCode, body)
	}
	// And with curl, which waits for the 100 before sending.
	out := curlVia(t, a, appAddr(80), "-sS", "-H", "Expect: 100-continue", "--data-binary", "hello world", "http://198.18.99.2/sha")
	if out != fmt.Sprintf("11 %x", sum) {
		t.Fatalf("curl with Expect: %q", out)
	}
}

// curlVia runs curl through a's outbound proxy as if it connected to dst:
// curl binds a fresh source address that the test's origDst maps to dst.
func curlVia(t *testing.T, a *testProxy, dst netip.AddrPort, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl missing")
	}
	src := nextLoopbackIP(1)
	a.orig.mu.Lock()
	a.orig.m[src] = dst
	a.orig.mu.Unlock()
	out := a.p.OutboundAddr()
	args = append([]string{"--interface", src.String(), "--connect-to", fmt.Sprintf("::%s:%d", out.Addr(), out.Port()), "--max-time", "20"}, args...)
	b, err := exec.Command("curl", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("curl %v: %v: %s", args, err, b)
	}
	return string(b)
}

func TestH1LargeAndStreaming(t *testing.T) {
	a, _, app := h1Mesh(t, proxyOpts{})
	client := &http.Client{Transport: &http.Transport{DialContext: a.dialContext}}
	t.Cleanup(client.CloseIdleConnections)
	size := int64(32 << 20)
	if testing.Short() {
		size = 4 << 20
	}
	// Upload of known and unknown length.
	for _, chunked := range []bool{false, true} {
		h := sha256.New()
		var body io.Reader = io.TeeReader(io.LimitReader(zeroRand{}, size), h)
		req, _ := http.NewRequest("POST", "http://198.18.99.2:80/sha", body)
		req.ContentLength = size
		if chunked {
			req.ContentLength = -1
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := fmt.Sprintf("%d %x", size, h.Sum(nil)); string(got) != want {
			t.Fatalf("upload (chunked %v): %q, want %q", chunked, got, want)
		}
	}
	// Downloads of known and unknown length, read slowly at first: the
	// proxies hold back rather than buffer it all.
	for _, q := range []string{"&len=1", ""} {
		resp, err := client.Get(fmt.Sprintf("http://198.18.99.2:80/big?n=%d%s", size, q))
		if err != nil {
			t.Fatal(err)
		}
		h, want := sha256.New(), sha256.New()
		io.Copy(want, io.LimitReader(&patternReader{}, size))
		n, err := io.Copy(h, resp.Body)
		resp.Body.Close()
		if err != nil || n != size || !bytes.Equal(h.Sum(nil), want.Sum(nil)) {
			t.Fatalf("download %q: %d bytes, %v, checksum match %v", q, n, err, bytes.Equal(h.Sum(nil), want.Sum(nil)))
		}
	}
	// Streaming: the first event arrives while the response is still open.
	resp, err := client.Get("http://198.18.99.2:80/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	done := make(chan string, 1)
	go func() {
		l, _ := br.ReadString('\n')
		done <- l
	}()
	select {
	case l := <-done:
		if l != "event1\n" {
			t.Fatalf("first event %q", l)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("first event held back until the response ends")
	}
	app.next <- struct{}{}
	if l, _ := br.ReadString('\n'); l != "event2\n" {
		t.Fatalf("second event %q", l)
	}
}

func TestH1HopByHopAndHTTP10(t *testing.T) {
	a, _, app := h1Mesh(t, proxyOpts{})
	c := a.dialOut(t, appAddr(80))
	io.WriteString(c, "GET /echo HTTP/1.1\r\nHost: web\r\nConnection: X-Foo, keep-alive\r\nX-Foo: hop\r\nKeep-Alive: timeout=5\r\n"+
		"Proxy-Connection: keep-alive\r\nX-Keep: yes\r\nVmesh-Dst-Port: 22\r\nL5d-Orig-Proto: HTTP/1.0\r\nTE: trailers, deflate\r\n\r\n"+
		"GET /hop HTTP/1.1\r\nHost: web\r\n\r\n")
	br := bufio.NewReader(c)
	resp, _ := readResp(t, br, "GET")
	for k, want := range map[string]string{"X-Foo": "", "Keep-Alive": "", "Proxy-Connection": "", "Vmesh-Dst-Port": "", "L5d-Orig-Proto": "", "Te": "trailers", "X-Keep": "yes"} {
		if got := resp.Header.Get("X-Got-" + k); got != want {
			t.Errorf("app saw %s %q, want %q", k, got, want)
		}
	}
	if resp.Header.Get("X-Proto") != "HTTP/1.1" {
		t.Errorf("app saw %s", resp.Header.Get("X-Proto"))
	}
	resp, body := readResp(t, br, "GET")
	if body != "ok" || resp.Header.Get("X-Bar") != "" || resp.Header.Get("X-Keep") != "end-to-end" {
		t.Errorf("response fields: X-Bar %q (hop-by-hop, want none), X-Keep %q", resp.Header.Get("X-Bar"), resp.Header.Get("X-Keep"))
	}

	// A field longer than the read buffer (a big cookie) is fine.
	cookie := strings.Repeat("c", 20<<10)
	io.WriteString(c, "GET /echo HTTP/1.1\r\nHost: web\r\nX-Foo-Not: 1\r\nCookie: "+cookie+"\r\nX-Keep: big\r\n\r\n")
	if resp, _ := readResp(t, br, "GET"); resp.StatusCode != 200 || resp.Header.Get("X-Got-X-Keep") != "big" {
		t.Fatalf("request with a 20 KiB field: %d %q", resp.StatusCode, resp.Header.Get("X-Got-X-Keep"))
	}

	// HTTP/1.0: the app sees HTTP/1.0; the response ends with the
	// connection.
	c = a.dialOut(t, appAddr(80))
	io.WriteString(c, "POST /echo HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
	all, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	resp, body = readResp(t, bufio.NewReader(bytes.NewReader(all)), "POST")
	if body != "abc" || resp.Header.Get("X-Proto") != "HTTP/1.0" {
		t.Fatalf("HTTP/1.0: %q %q (%q)", body, resp.Header.Get("X-Proto"), all)
	}
	// HTTP/1.0 keep-alive with a response of known length stays open; a
	// chunked response is decoded for the HTTP/1.0 client and ends the
	// connection.
	c = a.dialOut(t, appAddr(80))
	io.WriteString(c, "GET /hop HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
	br = bufio.NewReader(c)
	resp, body = readResp(t, br, "GET")
	if body != "ok" || resp.Close {
		t.Fatalf("HTTP/1.0 keep-alive: %q, close %v", body, resp.Close)
	}
	io.WriteString(c, "GET /trailers HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
	rest, _ := io.ReadAll(br)
	if !bytes.HasSuffix(rest, []byte("\r\n\r\npart1-part2")) || bytes.Contains(bytes.ToLower(rest), []byte("transfer-encoding")) {
		t.Fatalf("chunked response to HTTP/1.0: %q", rest)
	}
	_ = app
}

func TestH1Smuggling(t *testing.T) {
	a, _, app := h1Mesh(t, proxyOpts{})
	cases := []struct {
		name, req string
		status    int
		reason    string
	}{
		{"length and chunked", "POST /echo HTTP/1.1\r\nHost: w\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "length_and_chunked"},
		{"differing lengths", "POST /echo HTTP/1.1\r\nHost: w\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", 400, "duplicate_content_length"},
		{"length list", "POST /echo HTTP/1.1\r\nHost: w\r\nContent-Length: 4, 5\r\n\r\nabcde", 400, "bad_content_length"},
		{"signed length", "POST /echo HTTP/1.1\r\nHost: w\r\nContent-Length: +4\r\n\r\nabcd", 400, "bad_content_length"},
		{"obs-fold", "GET /echo HTTP/1.1\r\nHost: w\r\nX-A: 1\r\n 2\r\n\r\n", 400, "obs_fold"},
		{"space before colon", "GET /echo HTTP/1.1\r\nHost: w\r\nTransfer-Encoding : chunked\r\n\r\n", 400, "bad_header"},
		{"chunked not last", "POST /echo HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400, "bad_transfer_encoding"},
		{"unknown coding", "POST /echo HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400, "bad_transfer_encoding"},
		{"chunked twice", "POST /echo HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_transfer_encoding"},
		{"gzip then chunked", "POST /echo HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, "unsupported_transfer_encoding"},
		{"chunked in HTTP/1.0", "POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_transfer_encoding"},
		{"no host", "GET /echo HTTP/1.1\r\n\r\n", 400, "bad_host"},
		{"two hosts", "GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_host"},
		{"bare CR", "GET /echo HTTP/1.1\r\nHost: w\rX: y\r\n\r\n", 400, "bad_header"},
		{"header too large", "GET /echo HTTP/1.1\r\nHost: w\r\nX-Big: " + strings.Repeat("a", 40<<10) + "\r\n\r\n", 431, "header_too_large"},
		{"too many fields", "GET /echo HTTP/1.1\r\nHost: w\r\n" + strings.Repeat("X-F: 1\r\n", 300) + "\r\n", 431, "header_too_large"},
		// Last: the head of these reaches the app before the bad chunk
		// is found (the app's count of requests would race).
		{"bad chunk size", "POST /echo HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\nabc\r\n0\r\n\r\n", 400, "bad_chunk"},
		{"chunk size overflow", "POST /echo HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff1\r\nabc\r\n0\r\n\r\n", 400, "bad_chunk"},
		{"chunk size bare LF", "POST /echo HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", 400, "bad_chunk"},
		{"chunk data too long", "POST /echo HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n", 400, "bad_chunk"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			hits := app.hits.Load()
			before := metric(t, a.reg, "http_rejected_total", map[string]string{"direction": "outbound", "reason": tc.reason})
			c := a.dialOut(t, appAddr(80))
			io.WriteString(c, tc.req)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatalf("no response: %v", err)
			}
			if resp.StatusCode != tc.status || !strings.Contains(resp.Header.Get("L5d-Proxy-Error"), tc.reason) {
				t.Fatalf("status %d %q, want %d naming %s", resp.StatusCode, resp.Header.Get("L5d-Proxy-Error"), tc.status, tc.reason)
			}
			if tc.reason != "bad_chunk" && app.hits.Load() != hits {
				t.Error("the app saw the request")
			}
			if got := metric(t, a.reg, "http_rejected_total", map[string]string{"direction": "outbound", "reason": tc.reason}); got != before+1 {
				t.Errorf("http_rejected_total{%s} = %v, want %v", tc.reason, got, before+1)
			}
			if !refused(c) {
				t.Error("connection left open after a rejected request")
			}
		})
	}
}

func TestH1Curl(t *testing.T) {
	a, _, _ := h1Mesh(t, proxyOpts{})
	if out := curlVia(t, a, appAddr(80), "-sS", "-i", "http://198.18.99.2/hop"); !strings.HasPrefix(out, "HTTP/1.1 200") || !strings.HasSuffix(out, "\r\n\r\nok") || strings.Contains(out, "X-Bar") {
		t.Errorf("curl GET: %q", out)
	}
	if out := curlVia(t, a, appAddr(80), "-sS", "--http1.0", "-D", "-", "-o", "/dev/null", "http://198.18.99.2/echo"); !strings.Contains(out, "X-Proto: HTTP/1.0") {
		t.Errorf("curl --http1.0: %q", out)
	}
	sum := sha256.Sum256([]byte("streamed"))
	if out := curlVia(t, a, appAddr(80), "-sS", "-H", "Transfer-Encoding: chunked", "--data-binary", "streamed", "http://198.18.99.2/sha"); out != fmt.Sprintf("8 %x", sum) {
		t.Errorf("curl chunked upload: %q", out)
	}
	// Several URLs on one connection.
	if out := curlVia(t, a, appAddr(80), "-sS", "http://198.18.99.2/hop", "http://198.18.99.2/hop", "http://198.18.99.2/hop"); out != "okokok" {
		t.Errorf("curl keep-alive: %q", out)
	}
}

// patternReader is a non-constant byte stream that does not depend on how
// it is read.
type patternReader struct{ off int64 }

func (r *patternReader) Read(b []byte) (int, error) {
	for i := range b {
		o := r.off + int64(i)
		b[i] = byte(o*7 + o>>8)
	}
	r.off += int64(len(b))
	return len(b), nil
}

// TestH1Shutdown: Shutdown closes idle keep-alive connections at once and
// lets a request in flight finish, then closes its connection.
func TestH1Shutdown(t *testing.T) {
	a, _, app := h1Mesh(t, proxyOpts{})
	idle := a.dialOut(t, appAddr(80))
	io.WriteString(idle, "GET /hop HTTP/1.1\r\nHost: web\r\n\r\n")
	if resp, body := readResp(t, bufio.NewReader(idle), "GET"); body != "ok" || resp.Close {
		t.Fatalf("first request: %q close=%v", body, resp.Close)
	}
	busy := a.dialOut(t, appAddr(80))
	io.WriteString(busy, "GET /stream HTTP/1.1\r\nHost: web\r\n\r\n")
	br := bufio.NewReader(busy)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- a.p.Shutdown(ctx) }()
	if !refused(idle) {
		t.Fatal("idle keep-alive connection not closed by Shutdown")
	}
	app.next <- struct{}{}
	body, err := io.ReadAll(resp.Body)
	if err != nil || string(body) != "event1\nevent2\n" {
		t.Fatalf("request in flight: %q %v", body, err)
	}
	if !refused(busy) {
		t.Error("connection kept open after its response during Shutdown")
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown still waiting after its connections ended")
	}
}

// TestH1IdleServerClose: a service that closes idle keep-alive connections
// on its own schedule never costs a request (not even one with a body):
// the pooled connection is checked before use.
func TestH1IdleServerClose(t *testing.T) {
	ln := listenLocal(t)
	var closed atomic.Int32
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			body, _ := io.ReadAll(r.Body)
			w.Write(body)
		}),
		IdleTimeout: 50 * time.Millisecond,
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateClosed {
				closed.Add(1)
			}
		},
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	a, _, _ := meshPair(t, []LocalService{{Name: "web", Port: 80, Target: addrPort(ln.Addr())}}, proxyOpts{},
		proxyOpts{tune: func(b *testProxy) { b.p.h1local.checkAfter = 0 }})
	client := &http.Client{Transport: &http.Transport{DialContext: a.dialContext}}
	t.Cleanup(client.CloseIdleConnections)
	for i := range 3 {
		resp, err := client.Post("http://198.18.99.2:80/", "text/plain", strings.NewReader(fmt.Sprint("body", i)))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != fmt.Sprint("body", i) {
			t.Fatalf("request %d after the service closed its idle connection: %d %q", i, resp.StatusCode, body)
		}
		want := int32(i + 1)
		eventually(t, "the service to close its idle connection", func() bool { return closed.Load() == want })
	}
}

// TestH1ClientGoneWhileWaiting: a client that goes away while its response
// is slow does not hold the service's connection: the proxies close it,
// as net/http cancels such a request.
func TestH1ClientGoneWhileWaiting(t *testing.T) {
	ln := listenLocal(t)
	canceled, started := make(chan struct{}, 1), make(chan struct{}, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		select {
		case <-r.Context().Done():
			canceled <- struct{}{}
		case <-time.After(20 * time.Second):
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	a, _, _ := meshPair(t, []LocalService{{Name: "web", Port: 80, Target: addrPort(ln.Addr())}}, proxyOpts{}, proxyOpts{})
	c := a.dialOut(t, appAddr(80))
	io.WriteString(c, "GET /poll HTTP/1.1\r\nHost: web\r\n\r\n")
	<-started
	c.Close()
	select {
	case <-canceled:
	case <-time.After(10 * time.Second):
		t.Fatal("the service's request was not canceled after its client went away")
	}
}

// TestH1OverMux: the lean path's connections to peers also work as mux
// streams (the measured alternative, off by default): keep-alive,
// pipelining, chunked bodies, an upgrade.
func TestH1OverMux(t *testing.T) {
	app := startH1App(t)
	ws := upgradeServer(t)
	a, _, _ := meshPair(t, []LocalService{{Name: "web", Port: 80, Target: app.addr}, {Name: "ws", Port: 8081, Target: ws}},
		proxyOpts{tune: func(a *testProxy) { a.p.h1Mux = true }}, proxyOpts{})
	c := a.dialOut(t, appAddr(80))
	io.WriteString(c, "POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\n\r\nb1"+
		"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nb2\r\n0\r\n\r\n")
	br := bufio.NewReader(c)
	for _, want := range []string{"b1", "b2"} {
		if resp, body := readResp(t, br, "POST"); resp.StatusCode != 200 || body != want {
			t.Fatalf("over mux: %d %q, want %q", resp.StatusCode, body, want)
		}
	}
	u := a.dialOut(t, appAddr(8081))
	io.WriteString(u, "GET /ws HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nhello")
	ubr := bufio.NewReader(u)
	if resp, err := http.ReadResponse(ubr, nil); err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade over mux: %v %v", resp, err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(ubr, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("echo after upgrade over mux: %q %v", buf, err)
	}
	a.p.muxes.mu.Lock()
	sessions := 0
	for _, list := range a.p.muxes.ss {
		sessions += len(list)
	}
	a.p.muxes.mu.Unlock()
	if sessions != 2 {
		t.Errorf("%d mux sessions, want 2 (one per peer and service)", sessions)
	}
}

// TestH1MuxWhenBusy: HTTP/1 requests to a peer take keep-alive mTLS
// connections of their own while few are under way (no hand-off per
// response), and mux streams once h1MuxAt are (their writes batched):
// a request alone makes no mux session; of h1MuxAt+2 requests held at the
// service at once, the last ones ride streams, and every response comes
// back whole to its own client.
func TestH1MuxWhenBusy(t *testing.T) {
	const n = h1MuxAt + 2
	arrived := make(chan struct{}, n)
	release := make(chan struct{})
	ln := listenLocal(t)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			arrived <- struct{}{}
			<-release
		}
		io.WriteString(w, "answer to "+r.URL.Query().Get("i"))
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	a, _, _ := meshPair(t, []LocalService{{Name: "web", Port: 80, Target: addrPort(ln.Addr())}}, proxyOpts{}, proxyOpts{})
	sessions := func() int {
		a.p.muxes.mu.Lock()
		defer a.p.muxes.mu.Unlock()
		k := 0
		for _, list := range a.p.muxes.ss {
			k += len(list)
		}
		return k
	}

	c := a.dialOut(t, appAddr(80))
	io.WriteString(c, "GET /one?i=0 HTTP/1.1\r\nHost: web\r\n\r\n")
	if resp, body := readResp(t, bufio.NewReader(c), "GET"); resp.StatusCode != 200 || body != "answer to 0" {
		t.Fatalf("a request alone: %d %q", resp.StatusCode, body)
	}
	if got := sessions(); got != 0 {
		t.Fatalf("a request alone made %d mux sessions, want 0 (a connection of its own)", got)
	}

	errs := make(chan error, n)
	for i := 1; i <= n; i++ {
		c := a.dialOut(t, appAddr(80))
		go func() {
			fmt.Fprintf(c, "GET /hold?i=%d HTTP/1.1\r\nHost: web\r\n\r\n", i)
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				errs <- err
				return
			}
			b, err := io.ReadAll(io.LimitReader(resp.Body, 100))
			if want := fmt.Sprintf("answer to %d", i); err != nil || resp.StatusCode != 200 || string(b) != want {
				err = fmt.Errorf("request %d: %d %q (%v), want %q", i, resp.StatusCode, b, err, want)
			}
			errs <- err
		}()
	}
	for range n {
		select {
		case <-arrived:
		case <-time.After(10 * time.Second):
			t.Fatal("the held requests did not all reach the service")
		}
	}
	close(release)
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := sessions(); got == 0 {
		t.Errorf("%d requests under way at once made no mux session, want their last ones on streams", n)
	}
}

// TestFlushH1WaitingStream: a batched flush (flushH1) that must wait for
// window credit does not hold the session's other flushes while it waits:
// one app's stalled stream would otherwise stall every request on the
// peer session.
func TestFlushH1WaitingStream(t *testing.T) {
	ln := listenLocal(t)
	got := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		srv := mux.Server(c, mux.Config{StreamWindow: 64 << 10}, func(st *mux.Stream) {
			st.Accept()
			if st.Header()[0] == 's' {
				return // never read: its window runs out
			}
			b := make([]byte, 5)
			if _, err := io.ReadFull(st, b); err == nil {
				got <- string(b)
			}
		})
		srv.Serve()
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	cli := mux.Client(c, mux.Config{StreamWindow: 64 << 10})
	t.Cleanup(func() { cli.Close() })
	stalled, err := cli.Open([]byte("s"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stalled.Write(make([]byte, 64<<10)); err != nil { // the whole window
		t.Fatal(err)
	}
	bw := bufio.NewWriter(stalled)
	bw.WriteString("more than the window takes")
	go flushH1(bw, stalled) // waits for credit that never comes
	// Until that flush waits (a state, not an event: seen in the stacks).
	for deadline := time.Now().Add(5 * time.Second); ; {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		if strings.Contains(stacks, "sync.(*Cond).Wait") && strings.Contains(stacks, "proxy.flushH1") &&
			strings.Contains(stacks, "mux.(*Stream).write") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stalled stream's flush never waited for credit")
		}
		runtime.Gosched()
	}

	other, err := cli.Open([]byte("o"))
	if err != nil {
		t.Fatal(err)
	}
	obw := bufio.NewWriter(other)
	obw.WriteString("hello")
	if err := flushH1(obw, other); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-got:
		if s != "hello" {
			t.Fatalf("the other stream got %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a flush waiting for credit on one stream held back another stream's flush")
	}
}
