package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// echoServer accepts connections and echoes, half-closing when the client does.
func echoServer(t testing.TB) netip.AddrPort { return serveEcho(listenLocal(t)) }

func serveEcho(ln net.Listener) netip.AddrPort {
	return serveConns(ln, func(c net.Conn) {
		io.Copy(c, c)
		c.(*net.TCPConn).CloseWrite()
	})
}

// serveConns accepts connections on ln until it is closed and serves each
// with handle in its own goroutine, closing it afterwards.
func serveConns(ln net.Listener, handle func(net.Conn)) netip.AddrPort {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return addrPort(ln.Addr())
}

func TestOpaqueEchoHalfClose(t *testing.T) {
	backend := echoServer(t)
	svc := LocalService{Name: "redis", Port: 6379, Target: backend}
	a, b, _ := meshPair(t, []LocalService{svc}, proxyOpts{}, proxyOpts{})

	c := a.dialOut(t, appAddr(6379))
	msg := []byte("PING and some more bytes\r\n")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	// Half-close: the echo server sees EOF, echoes everything and closes.
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo = %q, want %q", got, msg)
	}
	c.Close()
	eventually(t, "both sides to count the closed connection", func() bool {
		return metric(t, a.reg, "tcp_close_total", map[string]string{"direction": "outbound", "service": "redis", "server_id": "spiffe://vmesh.test/svc/redis", "tls": "true"}) == 1 &&
			metric(t, b.reg, "tcp_close_total", map[string]string{"direction": "inbound", "service": "redis", "client_id": "spiffe://vmesh.test/node/a", "tls": "true"}) == 1
	})
	if got := metric(t, a.reg, "tcp_read_bytes_total", map[string]string{"direction": "outbound"}); got != float64(len(msg)) {
		t.Errorf("outbound tcp_read_bytes_total = %v, want %d", got, len(msg))
	}
	if got := metric(t, b.reg, "tcp_write_bytes_total", map[string]string{"direction": "inbound"}); got != float64(len(msg)) {
		t.Errorf("inbound tcp_write_bytes_total = %v, want %d", got, len(msg))
	}
	if got := metric(t, b.reg, "inbound_tcp_authz_allow_total", map[string]string{"service": "redis"}); got != 1 {
		t.Errorf("inbound_tcp_authz_allow_total = %v, want 1", got)
	}
	if got := metric(t, a.reg, "tcp_open_connections", nil); got != 0 {
		t.Errorf("tcp_open_connections = %v, want 0", got)
	}
}

func TestHTTP1ThroughMesh(t *testing.T) {
	ln := listenLocal(t)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(hdrDstPort) != "" || r.Header.Get(hdrOrigProto) != "" {
			t.Errorf("mesh headers reached the app: %v", r.Header)
		}
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("X-Proto", r.Proto)
		w.Header().Set("X-Host", r.Host)
		w.Header().Set("X-Fwd", r.Header.Get("X-Forwarded-For"))
		fmt.Fprintf(w, "hello %s %s", r.URL.Path, body)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	a, b, _ := meshPair(t, []LocalService{{Name: "web", Port: 80, Target: addrPort(ln.Addr())}}, proxyOpts{}, proxyOpts{})
	client := &http.Client{Transport: &http.Transport{DialContext: a.dialContext}}
	for i := range 3 {
		req, _ := http.NewRequest("POST", "http://198.18.99.2:80/path", strings.NewReader(fmt.Sprint("body", i)))
		req.Header.Set("X-Forwarded-For", "10.9.9.9")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := fmt.Sprint("hello /path body", i); string(body) != want || resp.StatusCode != 200 {
			t.Fatalf("response %d %q, want 200 %q", resp.StatusCode, body, want)
		}
		if p := resp.Header.Get("X-Proto"); p != "HTTP/1.1" {
			t.Errorf("app saw %s, want HTTP/1.1 restored", p)
		}
		if h := resp.Header.Get("X-Host"); h != "198.18.99.2:80" {
			t.Errorf("app saw Host %q", h)
		}
		if f := resp.Header.Get("X-Fwd"); f != "10.9.9.9" {
			t.Errorf("app saw X-Forwarded-For %q, want it untouched", f)
		}
	}
	out := map[string]string{"direction": "outbound", "service": "web", "server_id": "spiffe://vmesh.test/svc/web", "tls": "true"}
	in := map[string]string{"direction": "inbound", "service": "web", "client_id": "spiffe://vmesh.test/node/a", "tls": "true"}
	eventually(t, "response metrics", func() bool {
		return metric(t, a.reg, "response_total", out) == 3 && metric(t, b.reg, "response_total", in) == 3
	})
	for _, m := range []struct {
		tp   *testProxy
		name string
		l    map[string]string
	}{{a, "request_total", out}, {b, "request_total", in}, {a, "response_latency_ms", out}, {b, "inbound_http_authz_allow_total", map[string]string{"service": "web", "client_id": "spiffe://vmesh.test/node/a"}}} {
		if got := metric(t, m.tp.reg, m.name, m.l); got != 3 {
			t.Errorf("%s %s%v = %v, want 3", m.tp.name, m.name, m.l, got)
		}
	}
	if got := metric(t, a.reg, "response_total", map[string]string{"status_code": "200", "classification": "success"}); got != 3 {
		t.Errorf("response_total{200,success} = %v, want 3", got)
	}
	if got := metric(t, b.reg, "tcp_refused_total", nil); got != 0 {
		t.Errorf("tcp_refused_total = %v", got)
	}
}

// grpcLike serves an h2c handler that streams and sets gRPC trailers.
func grpcLike(t testing.TB) netip.AddrPort { return serveGRPCLike(t, listenLocal(t)) }

func serveGRPCLike(t testing.TB, ln net.Listener) netip.AddrPort {
	h2s := &http2.Server{}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go h2s.ServeConn(c, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.ProtoMajor != 2 {
					t.Errorf("app got %s, want HTTP/2", r.Proto)
				}
				w.Header().Set("Content-Type", "application/grpc")
				w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
				w.WriteHeader(200)
				// Echo each request chunk as it comes (bidirectional streaming).
				buf := make([]byte, 64)
				for {
					n, err := r.Body.Read(buf)
					if n > 0 {
						w.Write(buf[:n])
						w.(http.Flusher).Flush()
					}
					if err != nil {
						break
					}
				}
				status := "0"
				if r.URL.Path == "/fail" {
					status = "7"
				}
				w.Header().Set("Grpc-Status", status)
				w.Header().Set("Grpc-Message", "done")
			})})
		}
	}()
	return addrPort(ln.Addr())
}

func TestH2CStreamingTrailers(t *testing.T) {
	backend := grpcLike(t)
	a, b, _ := meshPair(t, []LocalService{{Name: "grpc", Port: 9090, Target: backend}}, proxyOpts{}, proxyOpts{})
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, n, addr string, _ *tls.Config) (net.Conn, error) {
		return a.dialContext(ctx, n, addr)
	}}
	defer tr.CloseIdleConnections()

	for _, path := range []string{"/ok", "/fail"} {
		pr, pw := io.Pipe()
		req, _ := http.NewRequest("POST", "http://198.18.99.2:9090"+path, pr)
		req.Header.Set("Content-Type", "application/grpc")
		req.Header.Set("Te", "trailers")
		respc := make(chan *http.Response, 1)
		errc := make(chan error, 1)
		go func() {
			resp, err := tr.RoundTrip(req)
			if err != nil {
				errc <- err
				return
			}
			respc <- resp
		}()
		// Streaming: the first message comes back before the request ends.
		pw.Write([]byte("msg1"))
		var resp *http.Response
		select {
		case resp = <-respc:
		case err := <-errc:
			t.Fatal(err)
		case <-time.After(5 * time.Second):
			t.Fatal("no response headers while streaming")
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(resp.Body, buf); err != nil || string(buf) != "msg1" {
			t.Fatalf("streamed echo %q, %v", buf, err)
		}
		pw.Write([]byte("msg2"))
		pw.Close()
		rest, err := io.ReadAll(resp.Body)
		if err != nil || string(rest) != "msg2" {
			t.Fatalf("rest %q, %v", rest, err)
		}
		want := map[string]string{"/ok": "0", "/fail": "7"}[path]
		if got := resp.Trailer.Get("Grpc-Status"); got != want {
			t.Fatalf("grpc-status trailer = %q, want %q (trailers %v)", got, want, resp.Trailer)
		}
	}
	eventually(t, "classified responses", func() bool {
		return metric(t, a.reg, "response_total", map[string]string{"classification": "success"}) == 1 &&
			metric(t, a.reg, "response_total", map[string]string{"classification": "failure"}) == 1 &&
			metric(t, b.reg, "response_total", map[string]string{"classification": "failure", "client_id": "spiffe://vmesh.test/node/a"}) == 1
	})
}

// upgradeServer answers an Upgrade: echo request with 101 and then echoes.
func upgradeServer(t testing.TB) netip.AddrPort { return serveUpgrade(t, listenLocal(t)) }

func serveUpgrade(t testing.TB, ln net.Listener) netip.AddrPort {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "echo" {
			http.Error(w, "want upgrade", 400)
			return
		}
		c, brw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
		brw.Flush()
		io.Copy(c, brw)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return addrPort(ln.Addr())
}

func TestUpgrade(t *testing.T) {
	backend := upgradeServer(t)
	a, _, _ := meshPair(t, []LocalService{{Name: "ws", Port: 8081, Target: backend}}, proxyOpts{}, proxyOpts{})
	c := a.dialOut(t, appAddr(8081))
	fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 101 {
		t.Fatalf("status %d, want 101", resp.StatusCode)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "early" {
		t.Fatalf("echo of bytes sent with the request: %q %v", buf, err)
	}
	c.Write([]byte("later"))
	if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "later" {
		t.Fatalf("echo after upgrade: %q %v", buf, err)
	}
	out := map[string]string{"direction": "outbound", "service": "ws", "server_id": "spiffe://vmesh.test/svc/ws", "tls": "true"}
	for name, want := range map[string]float64{"request_total": 1, "response_total": 1, "response_latency_ms": 1} {
		if got := metric(t, a.reg, name, out); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if got := metric(t, a.reg, "response_total", map[string]string{"status_code": "101", "classification": "success"}); got != 1 {
		t.Errorf("response_total{101,success} = %v, want 1", got)
	}

	// An upgrade the server refuses is an ordinary response: counted, and
	// the client's connection goes on as HTTP/1.
	c = a.dialOut(t, appAddr(8081))
	br = bufio.NewReader(c)
	for range 2 {
		fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: other\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Fatalf("refused upgrade: status %d, want 400", resp.StatusCode)
		}
	}
	eventually(t, "refused upgrades counted", func() bool {
		return metric(t, a.reg, "response_total", map[string]string{"status_code": "400", "classification": "success"}) == 2
	})
	if got := metric(t, a.reg, "request_total", out); got != 3 {
		t.Errorf("request_total = %v, want 3", got)
	}
}

// speaksFirst is a server that greets before reading.
func speaksFirst(t testing.TB) netip.AddrPort { return serveSpeaksFirst(listenLocal(t)) }

func serveSpeaksFirst(ln net.Listener) netip.AddrPort {
	return serveConns(ln, func(c net.Conn) {
		io.WriteString(c, "220 hello\r\n")
		io.Copy(io.Discard, c)
	})
}

func TestServerSpeaksFirst(t *testing.T) {
	backend := speaksFirst(t)
	const detect = 300 * time.Millisecond
	a, _, _ := meshPair(t, []LocalService{
		{Name: "smtp", Port: 2525, Target: backend},
		{Name: "smtp-opaque", Port: 25, Target: backend},
	}, proxyOpts{cfg: func(c *Config) { c.DetectTimeout = detect }}, proxyOpts{})
	greet := func(port uint16) time.Duration {
		start := time.Now()
		c := a.dialOut(t, appAddr(port))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || line != "220 hello\r\n" {
			t.Fatalf("port %d: greeting %q, %v", port, line, err)
		}
		return time.Since(start)
	}
	if d := greet(2525); d < detect {
		t.Errorf("non-opaque port answered after %v, before the detect timeout %v", d, detect)
	}
	if d := greet(25); d >= detect {
		t.Errorf("opaque port answered after %v, want at once", d)
	}
}

func TestPassthroughAndDeny(t *testing.T) {
	backend := echoServer(t)
	ca := newTestCA(t, "vmesh.test")
	a := startProxy(t, "a", ca, proxyOpts{})
	c := a.dialOut(t, backend)
	c.Write([]byte("plain"))
	c.CloseWrite()
	if got, _ := io.ReadAll(c); string(got) != "plain" {
		t.Fatalf("passthrough echo %q", got)
	}
	eventually(t, "passthrough counted", func() bool {
		return metric(t, a.reg, "tcp_close_total", map[string]string{"direction": "outbound", "service": "", "tls": "no_identity"}) == 1
	})

	d := startProxy(t, "d", ca, proxyOpts{cfg: func(c *Config) { c.OutboundUnknown = "deny" }})
	c = d.dialOut(t, backend)
	c.Write([]byte("plain"))
	if got, err := io.ReadAll(c); len(got) != 0 {
		t.Fatalf("denied unknown destination echoed %q (%v)", got, err)
	}
	if got := metric(t, d.reg, "tcp_refused_total", map[string]string{"reason": "unknown_destination"}); got != 1 {
		t.Errorf("tcp_refused_total{unknown_destination} = %v, want 1", got)
	}
	// A connection that was not redirected is never relayed to the proxy itself.
	raw, err := net.Dial("tcp", d.p.OutboundAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := raw.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("not-redirected connection: read %d, %v; want EOF", n, err)
	}
}

func TestPolicy(t *testing.T) {
	backend := echoServer(t)
	web := upgradeServer(t) // any HTTP server: 400 for plain GETs
	services := []LocalService{
		{Name: "open", Port: 7001, Target: backend, Policy: PolicyAllUnauthenticated},
		{Name: "authn", Port: 7002, Target: backend, Policy: PolicyAllAuthenticated},
		{Name: "only-c", Port: 7003, Target: backend, Allow: []string{"spiffe://vmesh.test/node/c"}},
		{Name: "nodes", Port: 7004, Target: backend, Allow: []string{"spiffe://vmesh.test/node/*"}},
		{Name: "web-only-c", Port: 7005, Target: web, Allow: []string{"spiffe://vmesh.test/node/c"}},
		{Name: "closed", Port: 7006, Target: backend, Policy: PolicyDeny},
		{Name: "audit", Port: 7007, Target: backend, Policy: PolicyAudit, Allow: []string{"spiffe://vmesh.test/node/c"}},
	}
	a, b, _ := meshPair(t, services, proxyOpts{cfg: func(c *Config) { c.OpaquePorts = []uint16{7001, 7002, 7003, 7004, 7006, 7007} }}, proxyOpts{})

	tcpWorks := func(port uint16) bool {
		// A denied connection is reset as soon as the peer refuses its
		// stream, which an opaque port opens at accept: the reset may
		// beat the dial's return.
		c, err := a.orig.dialFrom(context.Background(), a.p.OutboundAddr(), appAddr(port))
		if err != nil {
			return false
		}
		defer c.Close()
		c.Write([]byte("x"))
		c.CloseWrite()
		got, _ := io.ReadAll(c)
		return string(got) == "x"
	}
	for port, want := range map[uint16]bool{7001: true, 7002: true, 7003: false, 7004: true, 7006: false, 7007: true} {
		if got := tcpWorks(port); got != want {
			t.Errorf("meshed TCP to port %d works=%v, want %v", port, got, want)
		}
	}
	if got := metric(t, b.reg, "inbound_tcp_authz_deny_total", map[string]string{"service": "only-c", "reason": reasonNotAllowed, "client_id": "spiffe://vmesh.test/node/a"}); got != 1 {
		t.Errorf("deny counted %v, want 1", got)
	}
	// Audit lets A in and counts what it would have denied.
	if got := metric(t, b.reg, "inbound_authz_audit_total", map[string]string{"protocol": "tcp", "service": "audit", "reason": reasonNotAllowed, "client_id": "spiffe://vmesh.test/node/a", "tls": "true"}); got != 1 {
		t.Errorf("inbound_authz_audit_total{audit} = %v, want 1", got)
	}
	if got := metric(t, b.reg, "inbound_authz_audit_total", nil); got != 1 {
		t.Errorf("inbound_authz_audit_total = %v, want 1 (only the audited service)", got)
	}

	// HTTP denial: 403 with the reason in l5d-proxy-error.
	client := &http.Client{Transport: &http.Transport{DialContext: a.dialContext}}
	resp, err := client.Get("http://198.18.99.2:7005/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 403 || !strings.Contains(resp.Header.Get("L5d-Proxy-Error"), reasonNotAllowed) {
		t.Errorf("denied HTTP: %d %q, want 403 with l5d-proxy-error", resp.StatusCode, resp.Header.Get("L5d-Proxy-Error"))
	}
	if got := metric(t, b.reg, "inbound_http_authz_deny_total", map[string]string{"service": "web-only-c"}); got != 1 {
		t.Errorf("inbound_http_authz_deny_total = %v, want 1", got)
	}

	// Unmeshed plaintext client redirected to B's inbound listener.
	plain := func(port uint16) bool {
		c, err := b.orig.dialFrom(context.Background(), b.p.InboundAddr(), netip.AddrPortFrom(b.ip, port))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("y"))
		c.CloseWrite()
		got, _ := io.ReadAll(c)
		return string(got) == "y"
	}
	// The redirected connection goes to its original destination: serve
	// the echo there too.
	for _, port := range []uint16{7001, 7002} {
		ln, err := net.Listen("tcp", netip.AddrPortFrom(b.ip, port).String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { io.Copy(c, c); c.Close() }()
			}
		}()
	}
	if !plain(7001) {
		t.Error("plaintext to all-unauthenticated service refused")
	}
	if plain(7002) {
		t.Error("plaintext to all-authenticated service allowed")
	}
	if got := metric(t, b.reg, "inbound_tcp_authz_deny_total", map[string]string{"service": "authn", "reason": reasonUnauthenticated, "tls": "no_identity"}); got != 1 {
		t.Errorf("plaintext deny counted %v, want 1", got)
	}
}

// rawMeshDial dials b's inbound listener as a peer proxy would, with cert
// (may be nil) and ALPN.
func rawMeshDial(t *testing.T, b *testProxy, cert *tls.Certificate, sni, alpn string) (*tls.Conn, error) {
	cfg := &tls.Config{ServerName: sni, NextProtos: []string{alpn}, InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	c, err := tls.Dial("tcp", b.p.InboundAddr().String(), cfg)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	return c, nil
}

// refused reports whether the server closes c without sending anything.
func refused(c net.Conn) bool {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	return n == 0 && err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
}

func TestInboundRefusals(t *testing.T) {
	backend := echoServer(t)
	a, b, ca := meshPair(t, []LocalService{{Name: "db", Port: 5432, Target: backend}}, proxyOpts{}, proxyOpts{})
	_ = a
	good := ca.issue(t, "node/x")
	hdr := func(port uint16) []byte { return must(appendHeader(nil, transportHeader{Port: port})) }

	// Control: a correct header works.
	c, err := rawMeshDial(t, b, good, "db", alpnTransport)
	if err != nil {
		t.Fatal(err)
	}
	c.Write(append(hdr(5432), "ok"...))
	c.CloseWrite()
	if got, _ := io.ReadAll(c); string(got) != "ok" {
		t.Fatalf("valid header: echo %q", got)
	}

	cases := []struct {
		name   string
		send   []byte
		reason string
	}{
		{"undeclared port", hdr(22), refuseUnknownPort},
		{"bad preface", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), refuseHeader},
		{"oversized", append([]byte(headerPreface), 0, 1, 0, 0), refuseHeader},
		{"malformed body", append([]byte(headerPreface), 0, 0, 0, 3, 9, 9, 9), refuseHeader},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := metric(t, b.reg, "tcp_refused_total", map[string]string{"reason": tc.reason})
			c, err := rawMeshDial(t, b, good, "db", alpnTransport)
			if err != nil {
				t.Fatal(err)
			}
			c.Write(tc.send)
			if !refused(c) {
				t.Fatal("not refused")
			}
			eventually(t, "refusal counted", func() bool {
				return metric(t, b.reg, "tcp_refused_total", map[string]string{"reason": tc.reason}) == before+1
			})
		})
	}

	t.Run("HTTP/1 from a peer to an undeclared port", func(t *testing.T) {
		before := metric(t, b.reg, "tcp_refused_total", map[string]string{"reason": refuseUnknownPort})
		c, err := rawMeshDial(t, b, good, "db", alpnH1)
		if err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		for _, port := range []string{"Vmesh-Dst-Port: 22\r\n", "Vmesh-Dst-Port: x\r\n", ""} {
			io.WriteString(c, "GET / HTTP/1.1\r\nHost: db\r\n"+port+"\r\n")
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			if resp.StatusCode != 403 || resp.Header.Get("L5d-Proxy-Error") != "unknown target port" {
				t.Fatalf("%q: %d %q, want 403", port, resp.StatusCode, resp.Header.Get("L5d-Proxy-Error"))
			}
		}
		if got := metric(t, b.reg, "tcp_refused_total", map[string]string{"reason": refuseUnknownPort}); got != before+3 {
			t.Errorf("tcp_refused_total{unknown_port} = %v, want %v", got, before+3)
		}
	})

	t.Run("no client certificate", func(t *testing.T) {
		c, err := rawMeshDial(t, b, nil, "db", alpnTransport)
		if err == nil {
			// TLS 1.3: the client learns of the rejection on its first read.
			c.Write(hdr(5432))
			if !refused(c) {
				t.Fatal("not refused")
			}
		}
		eventually(t, "handshake refusal counted", func() bool {
			return metric(t, b.reg, "tcp_refused_total", map[string]string{"reason": refuseHandshake}) >= 1
		})
	})
	t.Run("certificate from another CA", func(t *testing.T) {
		before := metric(t, b.reg, "tcp_refused_total", map[string]string{"reason": refuseHandshake})
		other := newTestCA(t, "vmesh.test").issue(t, "node/a")
		c, err := rawMeshDial(t, b, other, "db", alpnTransport)
		if err == nil {
			c.Write(hdr(5432))
			if !refused(c) {
				t.Fatal("not refused")
			}
		}
		eventually(t, "handshake refusal counted", func() bool {
			return metric(t, b.reg, "tcp_refused_total", map[string]string{"reason": refuseHandshake}) == before+1
		})
	})
	t.Run("server with the wrong identity", func(t *testing.T) {
		// The catalog says the endpoint is svc/other; B presents svc/db: A refuses.
		a.cat.add(Endpoint{Service: "db", Addr: appAddr(15432), ProxyAddr: b.p.InboundAddr(), Identity: "spiffe://vmesh.test/svc/other"})
		c := a.dialOut(t, appAddr(15432))
		c.Write([]byte("x"))
		if !refused(c) {
			t.Fatal("client proxy talked to a server with the wrong identity")
		}
	})
}

func TestSetServicesKeepsConnections(t *testing.T) {
	backend := echoServer(t)
	a, b, _ := meshPair(t, []LocalService{{Name: "db", Port: 5432, Target: backend}}, proxyOpts{}, proxyOpts{})
	c := a.dialOut(t, appAddr(5432))
	br := bufio.NewReader(c)
	c.Write([]byte("1\n"))
	if l, err := br.ReadString('\n'); err != nil || l != "1\n" {
		t.Fatal(l, err)
	}
	if err := b.p.SetServices(nil); err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("2\n"))
	if l, err := br.ReadString('\n'); err != nil || l != "2\n" {
		t.Fatalf("established connection after SetServices: %q %v", l, err)
	}
	// 5432 is opaque: the refusal can reset the connection before the
	// dial has returned, which is a refusal too.
	c2, err := a.orig.dialFrom(context.Background(), a.p.OutboundAddr(), appAddr(5432))
	if err == nil {
		defer c2.Close()
		c2.Write([]byte("3\n"))
	}
	if err == nil && !refused(c2) || err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("new connection to a removed service was relayed (dial: %v)", err)
	}
	if err := b.p.SetServices([]LocalService{{Name: "x", Port: 1}, {Name: "y", Port: 1}}); err == nil {
		t.Fatal("duplicate port accepted")
	}
}

func TestLargeTransfer(t *testing.T) {
	size := int64(64 << 20)
	if testing.Short() {
		size = 8 << 20
	}
	// A sink that returns the sha256 of what it read, after the client half-closes.
	ln := listenLocal(t)
	serveConns(ln, func(c net.Conn) {
		h := sha256.New()
		io.Copy(h, c)
		c.Write(h.Sum(nil))
	})
	a, _, _ := meshPair(t, []LocalService{{Name: "sink", Port: 9000, Target: addrPort(ln.Addr())}}, proxyOpts{cfg: func(c *Config) { c.OpaquePorts = []uint16{9000} }}, proxyOpts{})
	c := a.dialOut(t, appAddr(9000))
	h := sha256.New()
	if _, err := io.Copy(c, io.TeeReader(io.LimitReader(zeroRand{}, size), h)); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, h.Sum(nil)) {
		t.Fatalf("checksum mismatch after %d bytes", size)
	}
}

// zeroRand is a cheap non-constant byte stream.
type zeroRand struct{}

func (zeroRand) Read(b []byte) (int, error) {
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	return len(b), nil
}

func TestShutdownDrains(t *testing.T) {
	backend := echoServer(t)
	a, _, _ := meshPair(t, []LocalService{{Name: "db", Port: 5432, Target: backend}}, proxyOpts{}, proxyOpts{})
	c := a.dialOut(t, appAddr(5432))
	br := bufio.NewReader(c)
	c.Write([]byte("1\n"))
	br.ReadString('\n')
	done := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	go func() { done <- a.p.Shutdown(ctx) }()
	// New connections are refused at once.
	eventually(t, "listener closed", func() bool {
		c, err := net.Dial("tcp", a.p.OutboundAddr().String())
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	// The established one still works while draining...
	c.Write([]byte("2\n"))
	if l, err := br.ReadString('\n'); err != nil || l != "2\n" {
		t.Fatalf("draining connection: %q %v", l, err)
	}
	// ...and is closed when the drain deadline passes.
	if err := <-done; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want deadline exceeded", err)
	}
	if !refused(c) {
		t.Fatal("connection survived Shutdown's deadline")
	}
}

// A relay outlives the goroutine that accepted its connection (it runs on
// its own): when it ends it must still be untracked, or Shutdown would wait
// for it until its deadline.
func TestShutdownAfterRelaysEnd(t *testing.T) {
	backend := echoServer(t)
	a, _, _ := meshPair(t, []LocalService{{Name: "db", Port: 5432, Target: backend}}, proxyOpts{}, proxyOpts{})
	for i := range 5 {
		c := a.dialOut(t, appAddr(5432))
		msg := fmt.Sprintf("%d\n", i)
		c.Write([]byte(msg))
		if l, err := bufio.NewReader(c).ReadString('\n'); err != nil || l != msg {
			t.Fatalf("echo %q, %v", l, err)
		}
		c.CloseWrite()
		io.Copy(io.Discard, c) // the relay ends both ways
		c.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.p.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown with every relay ended: %v", err)
	}
}

func TestRequestTimeout(t *testing.T) {
	ln := listenLocal(t)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
			return
		}
		io.WriteString(w, "fast")
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	const timeout = 300 * time.Millisecond
	a, _, _ := meshPair(t, []LocalService{{Name: "web", Port: 80, Target: addrPort(ln.Addr())}},
		proxyOpts{cfg: func(c *Config) { c.RequestTimeout = timeout }}, proxyOpts{})
	client := &http.Client{Transport: &http.Transport{DialContext: a.dialContext}}
	t.Cleanup(client.CloseIdleConnections)

	resp, err := client.Get("http://198.18.99.2:80/fast")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "fast" {
		t.Fatalf("fast request: %d %q", resp.StatusCode, body)
	}
	start := time.Now()
	resp, err = client.Get("http://198.18.99.2:80/slow")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if took := time.Since(start); resp.StatusCode != 504 || resp.Header.Get("L5d-Proxy-Error") != "request timeout" || took < timeout || took > 5*time.Second {
		t.Fatalf("slow request: %d %q after %v, want 504 with l5d-proxy-error after about %v", resp.StatusCode, resp.Header.Get("L5d-Proxy-Error"), took, timeout)
	}
	if got := metric(t, a.reg, "response_total", map[string]string{"direction": "outbound", "status_code": "504", "classification": "failure"}); got != 1 {
		t.Errorf("response_total{504,failure} = %v, want 1", got)
	}
}

func TestValidateRequestTimeout(t *testing.T) {
	c := DefaultConfig()
	if err := c.Validate(); err != nil {
		t.Fatalf("default config: %v", err)
	}
	c.RequestTimeout = -time.Second
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "request_timeout") {
		t.Fatalf("negative request_timeout: %v, want an error naming it", err)
	}
}
