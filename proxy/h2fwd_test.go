package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Tests of the frame-level HTTP/2 path (h2fwd.go, h2out.go): requests from
// an app's h2c connection through two proxies to an HTTP/2 backend.

// h2Backend serves h as HTTP/2 with prior knowledge and counts the
// connections it accepted.
func h2Backend(t testing.TB, h http.HandlerFunc) (target netip.AddrPort, conns *atomic.Int32) {
	ln := listenLocal(t)
	conns = new(atomic.Int32)
	srv := &http2.Server{}
	ap := serveConns(ln, func(c net.Conn) {
		conns.Add(1)
		srv.ServeConn(c, &http2.ServeConnOpts{Handler: h})
	})
	return ap, conns
}

// h2MeshClient is an HTTP/2 (h2c) client whose connections go through a's
// outbound proxy.
func h2MeshClient(t testing.TB, a *testProxy) *http.Client {
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, n, addr string, _ *tls.Config) (net.Conn, error) {
		return a.dialContext(ctx, n, addr)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// rawH2 speaks HTTP/2 frame by frame through the mesh, for the requests
// net/http's client will not send.
type rawH2 struct {
	t   testing.TB
	c   net.Conn
	fr  *http2.Framer
	enc *hpack.Encoder
	buf bytes.Buffer
}

func newRawH2(t testing.TB, a *testProxy, port int) *rawH2 {
	t.Helper()
	c, err := a.dialContext(context.Background(), "tcp", "198.18.99.2:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r := &rawH2{t: t, c: c, fr: http2.NewFramer(c, c)}
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	r.enc = hpack.NewEncoder(&r.buf)
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := r.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *rawH2) headers(id uint32, end bool, kv ...string) {
	r.t.Helper()
	r.buf.Reset()
	for i := 0; i < len(kv); i += 2 {
		r.enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: r.buf.Bytes(), EndStream: end, EndHeaders: true}); err != nil {
		r.t.Fatal(err)
	}
}

// headersSplit sends a request head ending its stream as a HEADERS frame
// and CONTINUATIONs: the block cut into parts pieces of equal size.
func (r *rawH2) headersSplit(id uint32, parts int, kv ...string) {
	r.t.Helper()
	r.buf.Reset()
	for i := 0; i < len(kv); i += 2 {
		r.enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	block := r.buf.Bytes()
	n := (len(block) + parts - 1) / parts
	var err error
	for first := true; err == nil && (first || len(block) > 0); first = false {
		frag := block[:min(n, len(block))]
		block = block[len(frag):]
		if first {
			err = r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: frag, EndStream: true, EndHeaders: len(block) == 0})
		} else {
			err = r.fr.WriteContinuation(id, len(block) == 0, frag)
		}
	}
	if err != nil {
		r.t.Fatal(err)
	}
}

func (r *rawH2) get(id uint32, path string, extra ...string) {
	r.headers(id, true, append([]string{":method", "GET", ":scheme", "http", ":authority", "svc", ":path", path}, extra...)...)
}

// next returns the next frame of a stream (not SETTINGS, PING or
// WINDOW_UPDATE), acknowledging the proxy's SETTINGS.
func (r *rawH2) next() http2.Frame {
	r.t.Helper()
	r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			r.t.Fatalf("reading a frame: %v", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				r.fr.WriteSettingsAck()
			}
		case *http2.PingFrame, *http2.WindowUpdateFrame:
		default:
			return f
		}
	}
}

// response reads stream id's response: status and body (END_STREAM), or
// the reset that ended it.
func (r *rawH2) response(id uint32) (status string, body string, reset http2.ErrCode, wasReset bool) {
	r.t.Helper()
	var b bytes.Buffer
	for {
		switch f := r.next().(type) {
		case *http2.MetaHeadersFrame:
			if f.StreamID != id {
				r.t.Fatalf("HEADERS for stream %d, want %d", f.StreamID, id)
			}
			if s := f.PseudoValue("status"); s != "" {
				status = s
			}
			if f.StreamEnded() {
				return status, b.String(), 0, false
			}
		case *http2.DataFrame:
			if f.StreamID != id {
				r.t.Fatalf("DATA for stream %d, want %d", f.StreamID, id)
			}
			b.Write(f.Data())
			if f.StreamEnded() {
				return status, b.String(), 0, false
			}
		case *http2.RSTStreamFrame:
			if f.StreamID < id {
				continue // an earlier stream, answered already
			}
			if f.StreamID != id {
				r.t.Fatalf("RST_STREAM for stream %d, want %d", f.StreamID, id)
			}
			return status, b.String(), f.ErrCode, true
		case *http2.GoAwayFrame:
			r.t.Fatalf("GOAWAY %v: the connection ended", f.ErrCode)
		}
	}
}

// TestH2ForwardMalformed checks that requests HTTP/2 forbids are reset
// with PROTOCOL_ERROR by the client's proxy, never reach the service, and
// leave the connection serving.
func TestH2ForwardMalformed(t *testing.T) {
	var served atomic.Int32
	ap, _ := h2Backend(t, func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		io.WriteString(w, "ok")
	})
	a, _, _ := meshPair(t, []LocalService{{Name: "svc", Port: 9090, Target: ap, Protocol: "http2"}}, proxyOpts{}, proxyOpts{})
	r := newRawH2(t, a, 9090)
	id := uint32(1)
	for _, c := range []struct {
		name string
		send func(id uint32)
	}{
		{"connection-specific field", func(id uint32) { r.get(id, "/", "connection", "close") }},
		{"transfer-encoding", func(id uint32) { r.get(id, "/", "transfer-encoding", "chunked") }},
		{"te other than trailers", func(id uint32) { r.get(id, "/", "te", "gzip") }},
		{"no :path", func(id uint32) { r.headers(id, true, ":method", "GET", ":scheme", "http", ":authority", "svc") }},
	} {
		c.send(id)
		if _, _, code, reset := r.response(id); !reset || code != http2.ErrCodeProtocol {
			t.Errorf("%s: stream not reset with PROTOCOL_ERROR (reset %v, code %v)", c.name, reset, code)
		}
		id += 2
	}
	r.get(id, "/fine")
	if status, body, _, reset := r.response(id); reset || status != "200" || body != "ok" {
		t.Errorf("a good request after the bad ones: %q %q (reset %v), want 200 \"ok\"", status, body, reset)
	}
	if n := served.Load(); n != 1 {
		t.Errorf("the service served %d requests, want 1 (only the good one)", n)
	}
}

// TestH2HeaderBlocks checks the client proxy's reading of header blocks
// (h2Headers): a block split over CONTINUATION frames, mid-field, is one
// request; each field HTTP/2 forbids resets its stream with PROTOCOL_ERROR;
// a list that goes over the limit in its last fragment is refused
// (REFUSED_STREAM) with the HPACK state still in step (the next request,
// which indexes a field of the refused one, is served); none of them
// reaches the service; a block that is not HPACK ends the connection with
// COMPRESSION_ERROR, a fragment after the limit was hit with
// PROTOCOL_ERROR (x/net's Framer's rules).
func TestH2HeaderBlocks(t *testing.T) {
	var served atomic.Int32
	ap, _ := h2Backend(t, func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		io.WriteString(w, r.URL.Path+" "+r.Header.Get("x-big-0"))
	})
	a, _, _ := meshPair(t, []LocalService{{Name: "svc", Port: 9090, Target: ap, Protocol: "http2"}}, proxyOpts{}, proxyOpts{})
	r := newRawH2(t, a, 9090)
	req := func(path string, extra ...string) []string {
		return append([]string{":method", "GET", ":scheme", "http", ":authority", "svc", ":path", path}, extra...)
	}
	id := uint32(1)
	r.headersSplit(id, 7, req("/split", "x-a", "1", "x-b", "2")...)
	if status, body, _, reset := r.response(id); reset || status != "200" || body != "/split " {
		t.Errorf("a block in 7 fragments: %q %q (reset %v), want 200 \"/split \"", status, body, reset)
	}
	for _, c := range []struct {
		name string
		kv   []string
	}{
		{"uppercase name", req("/", "X-Up", "1")},
		{"name not a token", req("/", "a b", "1")},
		{"value with NUL", req("/", "x-a", "a\x00b")},
		{"value with LF", req("/", "x-a", "a\nb")},
		{"pseudo-header after a field", []string{":method", "GET", "x-a", "1", ":scheme", "http", ":authority", "svc", ":path", "/"}},
		{"unknown pseudo-header", append([]string{":foo", "x"}, req("/")...)},
		{"duplicate pseudo-header", append([]string{":path", "/a"}, req("/")...)},
		{"response pseudo-header in a request", append([]string{":status", "200"}, req("/")...)},
	} {
		id += 2
		r.headersSplit(id, 1, c.kv...)
		if _, _, code, reset := r.response(id); !reset || code != http2.ErrCodeProtocol {
			t.Errorf("%s: stream not reset with PROTOCOL_ERROR (reset %v, code %v)", c.name, reset, code)
		}
	}
	// A good request and a bad one in one write: the bad one's stream
	// error must not leave the good one waiting for more bytes.
	var both bytes.Buffer
	w := http2.NewFramer(&both, nil)
	for i, kv := range [][]string{req("/together"), req("/", "X-Up", "1")} {
		r.buf.Reset()
		for j := 0; j < len(kv); j += 2 {
			r.enc.WriteField(hpack.HeaderField{Name: kv[j], Value: kv[j+1]})
		}
		w.WriteHeaders(http2.HeadersFrameParam{StreamID: id + 2 + 2*uint32(i), BlockFragment: r.buf.Bytes(), EndStream: true, EndHeaders: true})
	}
	if _, err := r.c.Write(both.Bytes()); err != nil {
		t.Fatal(err)
	}
	good, bad := id+2, id+4
	id = bad
	var body string
	goodDone, badReset := false, false
	for !goodDone || !badReset {
		switch f := r.next().(type) {
		case *http2.DataFrame:
			if f.StreamID == good {
				body += string(f.Data())
				goodDone = f.StreamEnded()
			}
		case *http2.RSTStreamFrame:
			if f.StreamID == bad && f.ErrCode == http2.ErrCodeProtocol {
				badReset = true
			} else {
				t.Fatalf("RST_STREAM %v for stream %d", f.ErrCode, f.StreamID)
			}
		case *http2.GoAwayFrame:
			t.Fatalf("GOAWAY %v", f.ErrCode)
		}
	}
	if body != "/together " {
		t.Errorf("a good request written with a bad one: body %q, want \"/together \"", body)
	}
	big := strings.Repeat("v", 2000)
	bigFields := func(n int) []string {
		var kv []string
		for i := range n {
			kv = append(kv, "x-big-"+strconv.Itoa(i), big)
		}
		return kv
	}
	id += 2
	// 33 fields of 2 KB: the 64 KiB list limit is hit by the last one, in
	// the last of 5 fragments.
	r.headersSplit(id, 5, req("/big", bigFields(33)...)...)
	if _, _, code, reset := r.response(id); !reset || code != http2.ErrCodeRefusedStream {
		t.Errorf("a list over the limit: reset %v code %v, want REFUSED_STREAM", reset, code)
	}
	id += 2
	r.headersSplit(id, 2, req("/after", "x-big-0", big)...) // indexed from the refused block's entries
	if status, body, _, reset := r.response(id); reset || status != "200" || body != "/after "+big {
		t.Errorf("a request after the refused one: %q (%d bytes of body, reset %v), want 200", status, len(body), reset)
	}
	if n := served.Load(); n != 3 {
		t.Errorf("the service served %d requests, want 3 (only the good ones)", n)
	}
	id += 2
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, EndStream: true, EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	if code := r.goAway(); code != http2.ErrCodeCompression {
		t.Errorf("GOAWAY %v after a block that is not HPACK, want COMPRESSION_ERROR", code)
	}
	r = newRawH2(t, a, 9090)
	r.headersSplit(1, 6, req("/big", bigFields(40)...)...) // the limit hit in the 5th of 6 fragments
	if code := r.goAway(); code != http2.ErrCodeProtocol {
		t.Errorf("GOAWAY %v after a fragment past the list limit, want PROTOCOL_ERROR", code)
	}
}

// goAway reads frames until a GOAWAY and returns its code.
func (r *rawH2) goAway() http2.ErrCode {
	r.t.Helper()
	return r.await("GOAWAY", func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok }).(*http2.GoAwayFrame).ErrCode
}

// await reads frames until one matches and returns it; what names it for
// the failure.
func (r *rawH2) await(what string, match func(http2.Frame) bool) http2.Frame {
	r.t.Helper()
	r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			r.t.Fatalf("no %s: %v", what, err)
		}
		if match(f) {
			return f
		}
	}
}

// TestH2ForwardResetAfterResponse checks a service that sends its whole
// response and then resets the stream — with NO_ERROR (RFC 9113 8.1: stop
// sending the request), or with another code (Go's HTTP/2 server answers
// request DATA that arrives after it closed the stream with
// STREAM_CLOSED) — all in one write, so the service side's proxy reads the
// reset with the response it has not yet forwarded: the app still gets the
// whole response, never a 502 or a reset in its place.
func TestH2ForwardResetAfterResponse(t *testing.T) {
	ln := listenLocal(t)
	ap := serveConns(ln, func(c net.Conn) {
		defer c.Close()
		pre := make([]byte, len(http2.ClientPreface))
		if _, err := io.ReadFull(c, pre); err != nil {
			return
		}
		fr := http2.NewFramer(c, c)
		var hb bytes.Buffer
		enc := hpack.NewEncoder(&hb)
		fr.WriteSettings()
		code := http2.ErrCodeNo
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					fr.WriteSettingsAck()
				}
			case *http2.HeadersFrame:
				// Response head, body and the reset in one write.
				var out bytes.Buffer
				w := http2.NewFramer(&out, nil)
				hb.Reset()
				enc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
				w.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: hb.Bytes(), EndHeaders: true})
				w.WriteData(f.StreamID, true, []byte("early"))
				w.WriteRSTStream(f.StreamID, code)
				c.Write(out.Bytes())
				code = map[http2.ErrCode]http2.ErrCode{http2.ErrCodeNo: http2.ErrCodeStreamClosed, http2.ErrCodeStreamClosed: http2.ErrCodeCancel}[code]
			}
		}
	})
	a, _, _ := meshPair(t, []LocalService{{Name: "svc", Port: 9090, Target: ap, Protocol: "http2"}}, proxyOpts{}, proxyOpts{})
	r := newRawH2(t, a, 9090)
	for i, code := range []string{"NO_ERROR", "STREAM_CLOSED", "CANCEL"} {
		id := uint32(1 + 2*i)
		r.headers(id, false, ":method", "POST", ":scheme", "http", ":authority", "svc", ":path", "/upload")
		if status, body, rc, reset := r.response(id); reset || status != "200" || body != "early" {
			t.Errorf("reset %s after the response: the app got %q %q (reset %v %v), want 200 \"early\"", code, status, body, reset, rc)
		}
	}
}

// TestH2ForwardEarlyResponse checks a service that answers before it read
// the request body, then resets the rest of the request with NO_ERROR
// (RFC 9113 8.1; Go's HTTP/2 server does): the app gets the whole
// response, not a 502, and may still send the body.
func TestH2ForwardEarlyResponse(t *testing.T) {
	ap, _ := h2Backend(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "early")
	})
	a, _, _ := meshPair(t, []LocalService{{Name: "svc", Port: 9090, Target: ap, Protocol: "http2"}}, proxyOpts{}, proxyOpts{})
	r := newRawH2(t, a, 9090)
	for id := uint32(1); id <= 9; id += 2 {
		r.headers(id, false, ":method", "POST", ":scheme", "http", ":authority", "svc", ":path", "/upload")
		status, body, code, reset := r.response(id)
		if reset || status != "200" || body != "early" {
			t.Fatalf("stream %d: %q %q (reset %v %v), want 200 \"early\"", id, status, body, reset, code)
		}
		// The body the service no longer wants: the proxy may reset the
		// stream, the connection goes on.
		if err := r.fr.WriteData(id, true, []byte("late body")); err != nil {
			t.Fatal(err)
		}
	}
}

// TestH2ForwardDuplexAndStall checks, on one app connection, a stream
// echoing 8 MiB both ways at once (more than every window on the path:
// the app's, the mux stream's, the service's) while another stream's
// response goes unread: the stalled stream holds back only itself.
func TestH2ForwardDuplexAndStall(t *testing.T) {
	const size = 8 << 20
	ap, _ := h2Backend(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/echo":
			w.WriteHeader(200)
			buf := make([]byte, 32<<10)
			for {
				n, err := r.Body.Read(buf)
				if n > 0 {
					w.Write(buf[:n])
					w.(http.Flusher).Flush()
				}
				if err != nil {
					return
				}
			}
		case "/flood":
			w.WriteHeader(200)
			w.Write(make([]byte, size))
		}
	})
	a, _, _ := meshPair(t, []LocalService{{Name: "svc", Port: 9090, Target: ap, Protocol: "http2"}}, proxyOpts{}, proxyOpts{})
	cl := h2MeshClient(t, a)

	// The stalled stream: its response is never read.
	flood, err := cl.Get("http://198.18.99.2:9090/flood")
	if err != nil {
		t.Fatal(err)
	}
	defer flood.Body.Close()

	msg := make([]byte, size)
	rand.Read(msg)
	pr, pw := io.Pipe()
	req, _ := http.NewRequest("POST", "http://198.18.99.2:9090/echo", pr)
	go func() {
		pw.Write(msg)
		pw.Close()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := cl.Do(req.WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("echo: %v after %d bytes (the stalled stream held it back?)", err, len(got))
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo returned %d bytes, not the %d sent", len(got), len(msg))
	}
	// The stalled stream is whole once read.
	n, err := io.Copy(io.Discard, flood.Body)
	if err != nil || n != size {
		t.Fatalf("stalled stream: %d bytes, %v; want %d", n, err, size)
	}
}

// TestH2StalledAppConnection checks that an app that stops reading its
// connection holds back only itself: small responses, which the client's
// proxy writes from its mux session's read loop, pile up for that app
// beyond what its socket takes, while another app's request on the same
// peer session is answered; once the app reads again every response is
// there, whole.
func TestH2StalledAppConnection(t *testing.T) {
	const (
		// Requests at a time: once the app's socket is full, a wave's
		// streams stay open on the peer session, and the pool opens
		// another session for requests at spreadRequests open streams.
		wave = spreadRequests - 2
		size = 15000
	)
	served := make(chan struct{}, 1000)
	body := bytes.Repeat([]byte("0123456789abcde\n"), size/16+1)[:size]
	ap, _ := h2Backend(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/big" {
			w.Write(body)
			served <- struct{}{}
			return
		}
		io.WriteString(w, "ok")
	})
	a, _, _ := meshPair(t, []LocalService{{Name: "svc", Port: 9090, Target: ap, Protocol: "http2"}}, proxyOpts{}, proxyOpts{})
	written := func() int {
		return int(metric(t, a.reg, "response_total", map[string]string{"direction": "outbound", "status_code": "200"}))
	}

	// The stalled app: windows open for every response, no reads until the
	// end. Waves of requests until the proxy cannot write their responses
	// (the socket's buffers are full): the service answered a wave, the
	// proxy did not finish it.
	r := newRawH2(t, a, 9090)
	if err := r.fr.WriteWindowUpdate(0, 1<<30); err != nil {
		t.Fatal(err)
	}
	// One request first: the one peer session every other request shares
	// (a burst of first requests would dial several).
	r.get(1, "/small")
	if st, b, _, _ := r.response(1); st != "200" || b != "ok" {
		t.Fatalf("first request: %s %q", st, b)
	}
	sent, stalled := 0, false
	for !stalled && sent < 1000 {
		for range wave {
			r.get(uint32(2*sent+3), "/big")
			sent++
		}
		timeout := time.After(20 * time.Second)
		for i := range wave {
			select {
			case <-served:
			case <-timeout:
				t.Fatalf("the service answered %d of a wave of %d requests", i, wave)
			}
		}
		// The proxy finishes the wave (counts its responses) unless the
		// app's socket is full: then it cannot, however long it is given.
		deadline := time.Now().Add(2 * time.Second)
		for written() < sent && !stalled {
			stalled = time.Now().After(deadline)
			time.Sleep(5 * time.Millisecond)
		}
	}
	if !stalled {
		t.Fatalf("the app's socket took all %d responses: nothing stalled", sent)
	}

	// Another app, on the same peer session (fewer than spreadRequests
	// streams are open on it): its response comes after the stalled
	// app's, so it is answered only if those did not stop the session's
	// read loop.
	cl := h2MeshClient(t, a)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://198.18.99.2:9090/small", nil)
	resp, err := cl.Do(req)
	if err != nil {
		t.Fatalf("another app's request while one app stalls: %v", err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(got) != "ok" {
		t.Fatalf("another app's response: %q", got)
	}

	// The stalled app reads: every response, whole.
	bodies := map[uint32]int{}
	for ended := 0; ended < sent; {
		switch f := r.next().(type) {
		case *http2.MetaHeadersFrame:
			if st := f.PseudoValue("status"); st != "" && st != "200" {
				t.Fatalf("stream %d: status %s", f.StreamID, st)
			}
			if f.StreamEnded() {
				ended++
			}
		case *http2.DataFrame:
			at := bodies[f.StreamID]
			if !bytes.Equal(f.Data(), body[at:at+len(f.Data())]) {
				t.Fatalf("stream %d: other bytes than sent at %d", f.StreamID, at)
			}
			bodies[f.StreamID] += len(f.Data())
			if f.StreamEnded() {
				ended++
			}
		case *http2.RSTStreamFrame:
			t.Fatalf("stream %d reset: %v", f.StreamID, f.ErrCode)
		}
	}
	for id, n := range bodies {
		if n != size {
			t.Errorf("stream %d: %d bytes, want %d", id, n, size)
		}
	}
	if len(bodies) != sent {
		t.Errorf("%d responses with a body, want %d", len(bodies), sent)
	}
}

// TestH2ForwardPools checks that requests share connections: one mux
// session to the peer for two app connections' sequential requests, one
// HTTP/2 connection from the peer to the service.
func TestH2ForwardPools(t *testing.T) {
	ap, backendConns := h2Backend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	d := &recordingDialer{}
	a, b, _ := meshPair(t, []LocalService{{Name: "svc", Port: 9090, Target: ap, Protocol: "http2"}}, proxyOpts{dialer: d}, proxyOpts{})
	for range 2 {
		cl := h2MeshClient(t, a) // a connection of its own
		for range 10 {
			resp, err := cl.Get("http://198.18.99.2:9090/")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(body) != "ok" {
				t.Fatalf("%d %q", resp.StatusCode, body)
			}
		}
	}
	peer := 0
	for i := range d.count() {
		if d.conn(i).RemoteAddr().String() == b.p.InboundAddr().String() {
			peer++
		}
	}
	if peer != 1 {
		t.Errorf("%d connections to the peer proxy for 20 sequential requests, want 1", peer)
	}
	if n := backendConns.Load(); n != 1 {
		t.Errorf("the service accepted %d connections, want 1", n)
	}
}

// TestH2ForwardShutdown checks that Shutdown tells an app's HTTP/2
// connection to go away (GOAWAY) and lets its request in flight finish.
func TestH2ForwardShutdown(t *testing.T) {
	arrived, release := make(chan struct{}), make(chan struct{})
	ap, _ := h2Backend(t, func(w http.ResponseWriter, r *http.Request) {
		close(arrived)
		<-release
		io.WriteString(w, "finished")
	})
	a, _, _ := meshPair(t, []LocalService{{Name: "svc", Port: 9090, Target: ap, Protocol: "http2"}}, proxyOpts{}, proxyOpts{})
	r := newRawH2(t, a, 9090)
	r.get(1, "/slow")
	// The request is in flight once the service holds it.
	select {
	case <-arrived:
	case <-time.After(5 * time.Second):
		t.Fatal("the request never reached the service")
	}
	done := make(chan error, 1)
	go func() { done <- a.p.Shutdown(context.Background()) }()
	var away *http2.GoAwayFrame
	for away == nil {
		r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatalf("waiting for GOAWAY: %v", err)
		}
		away, _ = f.(*http2.GoAwayFrame)
	}
	if away.ErrCode != http2.ErrCodeNo || away.LastStreamID != 1 {
		t.Errorf("GOAWAY %v last stream %d, want NO_ERROR 1", away.ErrCode, away.LastStreamID)
	}
	close(release)
	if status, body, _, reset := r.response(1); reset || status != "200" || body != "finished" {
		t.Errorf("in-flight request: %q %q (reset %v), want 200 \"finished\"", status, body, reset)
	}
	if err := <-done; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if _, err := r.fr.ReadFrame(); !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		var ne net.Error
		if !errors.As(err, &ne) || ne.Timeout() {
			t.Errorf("after its last stream the connection should close, read: %v", err)
		}
	}
}

// FuzzH2Messages feeds a peer proxy's request stream bytes to the message
// reader and the header block parser: errors, never a panic, and a block
// that parses re-encodes to the same fields.
func FuzzH2Messages(f *testing.F) {
	var ok []byte
	ok = appendMsgHead(ok, msgHeaders, 0)
	ok = appendFields(ok, []hpack.HeaderField{{Name: ":method", Value: "POST"}, {Name: ":path", Value: "/x"}})
	setMsgLen(ok)
	ok = appendMsgHead(ok, msgData|msgEnd, 3)
	ok = append(ok, "abc"...)
	f.Add(ok)
	f.Add([]byte{msgHeaders, 0xff, 0xff, 0xff})
	f.Add([]byte{9, 0, 0, 1, 0})
	f.Add([]byte{msgTrailers, 0, 0, 2, 0x80, 0x80})
	f.Fuzz(func(t *testing.T, b []byte) {
		mr := newMsgReader(bytes.NewReader(b))
		defer mr.release()
		for range 64 {
			kind, payload, err := mr.next()
			if err != nil {
				return
			}
			if kind&^msgEnd == msgData {
				continue
			}
			fs, err := parseFields(payload, nil)
			if err != nil {
				continue
			}
			if again := appendFields(nil, fs); !bytes.Equal(again, payload) {
				t.Fatalf("fields %q re-encode to %x, not %x", fs, again, payload)
			}
		}
	})
}

// TestH2FrameChecks: the frames an app's connection reads without the
// Framer's parsers (HEADERS, CONTINUATION, PING, WINDOW_UPDATE,
// RST_STREAM) are checked as RFC 9113 asks; padding and priority fields
// are taken off a header block; a frame over the 16 KiB the proxy
// advertises is refused.
func TestH2FrameChecks(t *testing.T) {
	ap, _ := h2Backend(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, r.URL.Path)
	})
	a, _, _ := meshPair(t, []LocalService{{Name: "svc", Port: 9090, Target: ap, Protocol: "http2"}}, proxyOpts{}, proxyOpts{})
	block := func(r *rawH2, path string) []byte {
		r.buf.Reset()
		for _, f := range []hpack.HeaderField{{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "http"}, {Name: ":authority", Value: "svc"}, {Name: ":path", Value: path}} {
			r.enc.WriteField(f)
		}
		return bytes.Clone(r.buf.Bytes())
	}
	raw := func(r *rawH2, typ http2.FrameType, flags http2.Flags, id uint32, p []byte) {
		t.Helper()
		if err := r.fr.WriteRawFrame(typ, flags, id, p); err != nil {
			t.Fatal(err)
		}
	}
	const endAll = http2.FlagHeadersEndStream | http2.FlagHeadersEndHeaders

	r := newRawH2(t, a, 9090)
	// Padded, with a priority: pad length 3, dependency and weight, the
	// block, 3 bytes of padding.
	p := append([]byte{3, 0, 0, 0, 0, 16}, block(r, "/padded")...)
	raw(r, http2.FrameHeaders, endAll|http2.FlagHeadersPadded|http2.FlagHeadersPriority, 1, append(p, 0, 0, 0))
	if status, body, _, reset := r.response(1); reset || status != "200" || body != "/padded" {
		t.Errorf("a padded HEADERS with a priority: %q %q (reset %v), want 200 \"/padded\"", status, body, reset)
	}
	// A PING is acknowledged with its data.
	raw(r, http2.FramePing, 0, 0, []byte("vmesh-01"))
	pf := r.await("PING ack", func(f http2.Frame) bool { _, ok := f.(*http2.PingFrame); return ok }).(*http2.PingFrame)
	if !pf.IsAck() || string(pf.Data[:]) != "vmesh-01" {
		t.Errorf("PING answered with ack %v, data %q; want an ack of \"vmesh-01\"", pf.IsAck(), pf.Data[:])
	}
	// A zero increment on a stream resets that stream only.
	raw(r, http2.FrameHeaders, http2.FlagHeadersEndHeaders, 3, block(r, "/open"))
	raw(r, http2.FrameWindowUpdate, 0, 3, []byte{0, 0, 0, 0})
	if _, _, code, reset := r.response(3); !reset || code != http2.ErrCodeProtocol {
		t.Errorf("WINDOW_UPDATE of 0 on a stream: reset %v code %v, want PROTOCOL_ERROR", reset, code)
	}
	raw(r, http2.FrameHeaders, endAll, 5, block(r, "/after"))
	if status, body, _, reset := r.response(5); reset || status != "200" || body != "/after" {
		t.Errorf("a request after a stream's error: %q %q (reset %v), want 200", status, body, reset)
	}

	for _, c := range []struct {
		name string
		send func(r *rawH2)
		want http2.ErrCode
	}{
		{"PING of 7 bytes", func(r *rawH2) { raw(r, http2.FramePing, 0, 0, make([]byte, 7)) }, http2.ErrCodeFrameSize},
		{"PING on a stream", func(r *rawH2) { raw(r, http2.FramePing, 0, 1, make([]byte, 8)) }, http2.ErrCodeProtocol},
		{"WINDOW_UPDATE of 3 bytes", func(r *rawH2) { raw(r, http2.FrameWindowUpdate, 0, 0, []byte{0, 0, 1}) }, http2.ErrCodeFrameSize},
		{"WINDOW_UPDATE of 0 on the connection", func(r *rawH2) { raw(r, http2.FrameWindowUpdate, 0, 0, []byte{0, 0, 0, 0}) }, http2.ErrCodeProtocol},
		{"connection window past 2^31-1", func(r *rawH2) { raw(r, http2.FrameWindowUpdate, 0, 0, []byte{0x7f, 0xff, 0xff, 0xff}) }, http2.ErrCodeFlowControl},
		{"RST_STREAM on stream 0", func(r *rawH2) { raw(r, http2.FrameRSTStream, 0, 0, []byte{0, 0, 0, 8}) }, http2.ErrCodeProtocol},
		{"RST_STREAM of 3 bytes", func(r *rawH2) { raw(r, http2.FrameRSTStream, 0, 1, []byte{0, 0, 8}) }, http2.ErrCodeFrameSize},
		{"HEADERS on stream 0", func(r *rawH2) { raw(r, http2.FrameHeaders, endAll, 0, block(r, "/")) }, http2.ErrCodeProtocol},
		{"padding longer than the frame", func(r *rawH2) {
			raw(r, http2.FrameHeaders, endAll|http2.FlagHeadersPadded, 1, append([]byte{200}, block(r, "/")...))
		}, http2.ErrCodeProtocol},
		{"priority cut short", func(r *rawH2) { raw(r, http2.FrameHeaders, endAll|http2.FlagHeadersPriority, 1, []byte{0, 0, 0}) }, http2.ErrCodeFrameSize},
		{"a frame over 16 KiB", func(r *rawH2) {
			raw(r, http2.FrameHeaders, http2.FlagHeadersEndHeaders, 1, block(r, "/"))
			raw(r, http2.FrameData, 0, 1, make([]byte, 16<<10+1))
		}, http2.ErrCodeFrameSize},
		{"CONTINUATION without HEADERS", func(r *rawH2) { raw(r, http2.FrameContinuation, http2.FlagContinuationEndHeaders, 1, block(r, "/")) }, http2.ErrCodeProtocol},
		{"a PING inside a header block", func(r *rawH2) {
			raw(r, http2.FrameHeaders, http2.FlagHeadersEndStream, 1, block(r, "/"))
			raw(r, http2.FramePing, 0, 0, make([]byte, 8))
		}, http2.ErrCodeProtocol},
	} {
		r := newRawH2(t, a, 9090)
		c.send(r)
		if code := r.goAway(); code != c.want {
			t.Errorf("%s: GOAWAY %v, want %v", c.name, code, c.want)
		}
	}
}

// TestH2ControlFlood: an app that sends control frames (here PINGs) and
// reads none of the answers while the connection's writer waits for the
// socket does not get a goroutine per frame from its agent: past
// h2fMaxQueuedCtl queued answers the connection is closed.
func TestH2ControlFlood(t *testing.T) {
	ap, _ := h2Backend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	a, _, _ := meshPair(t, []LocalService{{Name: "svc", Port: 9090, Target: ap, Protocol: "http2"}}, proxyOpts{}, proxyOpts{})
	r := newRawH2(t, a, 9090)
	r.await("SETTINGS from the proxy", func(f http2.Frame) bool { _, ok := f.(*http2.SettingsFrame); return ok })
	// The app's connection, as the proxy holds it; its write lock held
	// here stands for a writer blocked on a socket the app does not read.
	var hc *h2Conn
	eventually(t, "the proxy to serve the app's HTTP/2 connection", func() bool {
		a.p.h2front.Range(func(k, _ any) bool { hc = k.(*h2Conn); return false })
		return hc != nil
	})
	hc.wmu.Lock()
	unlocked := false
	unlock := func() {
		if !unlocked {
			unlocked = true
			hc.wmu.Unlock()
		}
	}
	defer unlock()
	base := runtime.NumGoroutine()
	var pings bytes.Buffer
	w := http2.NewFramer(&pings, nil)
	for range h2fMaxQueuedCtl + 500 {
		w.WritePing(false, [8]byte{'f', 'l', 'o', 'o', 'd'})
	}
	r.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	r.c.Write(pings.Bytes()) // may fail: the proxy closes mid-flood
	r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, r.c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the connection still open after %d unanswerable PINGs (%d goroutines more than before them)", h2fMaxQueuedCtl+500, runtime.NumGoroutine()-base)
	}
	if n := runtime.NumGoroutine() - base; n > h2fMaxQueuedCtl+50 {
		t.Errorf("%d goroutines more than before the flood, want at most about %d", n, h2fMaxQueuedCtl)
	}
	unlock()
	eventually(t, "the queued answers' goroutines to end", func() bool { return hc.ctlQueued.Load() == 0 })
}
