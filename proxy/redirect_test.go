package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/net/http2"
)

// serveAt runs an HTTP/1 + h2c server on addr that answers with the protocol
// it saw and the path, and echoes Upgrade: echo requests.
func serveAt(t *testing.T, addr netip.AddrPort) {
	t.Helper()
	ln, err := net.Listen("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(hdrDstPort) != "" || r.Header.Get(hdrOrigProto) != "" {
			t.Errorf("mesh headers reached the app: %v", r.Header)
		}
		if r.Header.Get("Upgrade") == "echo" {
			c, brw, err := w.(http.Hijacker).Hijack()
			if err != nil {
				return
			}
			defer c.Close()
			brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
			brw.Flush()
			io.Copy(c, brw)
			return
		}
		fmt.Fprintf(w, "%s %s", r.Proto, r.URL.Path)
	})
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: h, Protocols: &p}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// TestRedirectedHTTP covers unmeshed clients whose connections the
// PREROUTING redirect sends to the inbound listener: detected HTTP is served
// per request (metrics with tls="no_identity", 403 on denial, the connection
// stays usable), opaque ports and opaque services stay TCP (closed on
// denial).
func TestRedirectedHTTP(t *testing.T) {
	ca := newTestCA(t, "vmesh.test")
	services := []LocalService{
		{Name: "open", Port: 7101},
		{Name: "authn", Port: 7102, Policy: PolicyAllAuthenticated},
		{Name: "listed", Port: 7103, Allow: []string{"spiffe://vmesh.test/node/a"}},
		{Name: "raw", Port: 7104, Protocol: "opaque", Policy: PolicyAllAuthenticated},
		{Name: "raw-by-port", Port: 7105, Policy: PolicyAllAuthenticated},
		{Name: "h2only", Port: 7106, Protocol: "http2"},
		{Name: "audited", Port: 7107, Policy: PolicyAudit},
	}
	// The services listen at their own targets, not at the address the
	// clients dial: the inbound proxy dials a declared service's target,
	// never an address taken from the packet.
	svcIP := nextLoopbackIP(2)
	for i := range services {
		services[i].Target = netip.AddrPortFrom(svcIP, services[i].Port)
		serveAt(t, services[i].Target)
	}
	b := startProxy(t, "b", ca, proxyOpts{services: services, cfg: func(c *Config) { c.OpaquePorts = []uint16{7105} }})
	dial := func(ctx context.Context, _, addr string) (net.Conn, error) {
		dst, err := netip.ParseAddrPort(addr)
		if err != nil {
			return nil, err
		}
		return b.orig.dialFrom(ctx, b.p.InboundAddr(), dst)
	}
	url := func(port uint16, path string) string {
		return fmt.Sprintf("http://%s%s", netip.AddrPortFrom(b.ip, port), path)
	}
	h1 := &http.Client{Transport: &http.Transport{DialContext: dial}}
	get := func(c *http.Client, port uint16, path string) (int, string, http.Header) {
		t.Helper()
		resp, err := c.Get(url(port, path))
		if err != nil {
			t.Fatalf("GET port %d: %v", port, err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body), resp.Header
	}
	plain := map[string]string{"direction": "inbound", "client_id": "", "tls": "no_identity"}
	with := func(kv ...string) map[string]string {
		m := map[string]string{}
		for k, v := range plain {
			m[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}

	t.Run("allowed HTTP/1 is proxied per request", func(t *testing.T) {
		for i := range 3 {
			code, body, _ := get(h1, 7101, fmt.Sprint("/r", i))
			if code != 200 || body != fmt.Sprintf("HTTP/1.1 /r%d", i) {
				t.Fatalf("GET: %d %q", code, body)
			}
		}
		eventually(t, "responses counted", func() bool {
			return metric(t, b.reg, "response_total", with("service", "open", "status_code", "200", "classification", "success")) == 3
		})
		for _, name := range []string{"request_total", "response_latency_ms"} {
			if got := metric(t, b.reg, name, with("service", "open")); got != 3 {
				t.Errorf("%s{open,no_identity} = %v, want 3", name, got)
			}
		}
		if got := metric(t, b.reg, "inbound_http_authz_allow_total", map[string]string{"service": "open", "client_id": "", "tls": "no_identity"}); got != 3 {
			t.Errorf("inbound_http_authz_allow_total{open,no_identity} = %v, want 3", got)
		}
		if got := metric(t, b.reg, "inbound_tcp_authz_allow_total", map[string]string{"service": "open"}); got != 0 {
			t.Errorf("HTTP was authorized as TCP: inbound_tcp_authz_allow_total = %v", got)
		}
	})

	t.Run("allowed h2c is proxied as HTTP/2", func(t *testing.T) {
		tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, n, addr string, _ *tls.Config) (net.Conn, error) {
			return dial(ctx, n, addr)
		}}
		defer tr.CloseIdleConnections()
		for _, port := range []uint16{7101, 7106} {
			code, body, _ := get(&http.Client{Transport: tr}, port, "/h2")
			if code != 200 || body != "HTTP/2.0 /h2" {
				t.Fatalf("h2c GET port %d: %d %q", port, code, body)
			}
		}
		if got := metric(t, b.reg, "request_total", with("service", "h2only")); got != 1 {
			t.Errorf("request_total{h2only} = %v, want 1", got)
		}
	})

	t.Run("denied HTTP gets 403 and the connection stays", func(t *testing.T) {
		var conns int
		counting := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, n, addr string) (net.Conn, error) {
			conns++
			return dial(ctx, n, addr)
		}}}
		for port, reason := range map[uint16]string{7102: reasonUnauthenticated, 7103: reasonUnauthenticated} {
			for range 2 {
				code, body, hdr := get(counting, port, "/secret")
				if code != 403 || hdr.Get("L5d-Proxy-Error") != "unauthorized: "+reason || strings.Contains(body, "HTTP/1.1") {
					t.Fatalf("port %d: %d %q %q, want 403 with l5d-proxy-error", port, code, body, hdr.Get("L5d-Proxy-Error"))
				}
			}
		}
		if conns != 2 {
			t.Errorf("4 denied requests to 2 services used %d connections, want 2 (kept alive)", conns)
		}
		for _, svc := range []string{"authn", "listed"} {
			if got := metric(t, b.reg, "inbound_http_authz_deny_total", map[string]string{"service": svc, "tls": "no_identity", "reason": reasonUnauthenticated}); got != 2 {
				t.Errorf("inbound_http_authz_deny_total{%s} = %v, want 2", svc, got)
			}
			if got := metric(t, b.reg, "response_total", with("service", svc, "status_code", "403")); got != 2 {
				t.Errorf("response_total{%s,403} = %v, want 2", svc, got)
			}
		}
	})

	t.Run("audit allows and counts", func(t *testing.T) {
		if code, body, _ := get(h1, 7107, "/a"); code != 200 || body != "HTTP/1.1 /a" {
			t.Fatalf("audited GET: %d %q", code, body)
		}
		if got := metric(t, b.reg, "inbound_authz_audit_total", map[string]string{"protocol": "http", "service": "audited", "client_id": "", "tls": "no_identity", "reason": reasonUnauthenticated}); got != 1 {
			t.Errorf("inbound_authz_audit_total{audited} = %v, want 1", got)
		}
		if got := metric(t, b.reg, "inbound_authz_audit_total", nil); got != 1 {
			t.Errorf("inbound_authz_audit_total = %v, want 1 (only the audited service)", got)
		}
	})

	t.Run("opaque service and opaque port stay TCP", func(t *testing.T) {
		for _, port := range []uint16{7104, 7105} {
			c, err := b.orig.dialFrom(context.Background(), b.p.InboundAddr(), netip.AddrPortFrom(b.ip, port))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			if !refused(c) {
				t.Errorf("port %d: denied opaque connection not closed", port)
			}
		}
		if got := metric(t, b.reg, "inbound_tcp_authz_deny_total", map[string]string{"reason": reasonUnauthenticated, "tls": "no_identity"}); got != 2 {
			t.Errorf("inbound_tcp_authz_deny_total = %v, want 2", got)
		}
		if got := metric(t, b.reg, "inbound_http_authz_deny_total", map[string]string{"service": "raw"}) + metric(t, b.reg, "inbound_http_authz_deny_total", map[string]string{"service": "raw-by-port"}); got != 0 {
			t.Errorf("opaque traffic was detected as HTTP: %v denials", got)
		}
	})

	t.Run("ambiguous framing refused before the service sees it", func(t *testing.T) {
		c, err := b.orig.dialFrom(context.Background(), b.p.InboundAddr(), netip.AddrPortFrom(b.ip, 7101))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "POST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != 400 {
			t.Fatalf("response %v %v, want 400", resp, err)
		}
		if !refused(c) {
			t.Error("connection kept after a refused request")
		}
		if got := metric(t, b.reg, "http_rejected_total", map[string]string{"direction": "inbound", "reason": "length_and_chunked"}); got != 1 {
			t.Errorf("http_rejected_total{inbound,length_and_chunked} = %v, want 1", got)
		}
	})

	t.Run("upgrade", func(t *testing.T) {
		c, err := b.orig.dialFrom(context.Background(), b.p.InboundAddr(), netip.AddrPortFrom(b.ip, 7101))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly")
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != 101 {
			t.Fatalf("upgrade response: %v %v", resp, err)
		}
		buf := make([]byte, 5)
		if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "early" {
			t.Fatalf("echo of bytes sent with the request: %q %v", buf, err)
		}
		c.Write([]byte("later"))
		if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "later" {
			t.Fatalf("echo after upgrade: %q %v", buf, err)
		}
		if got := metric(t, b.reg, "response_total", with("service", "open", "status_code", "101")); got != 1 {
			t.Errorf("response_total{101} = %v, want 1", got)
		}
		c.Close()
		eventually(t, "upgraded connection counted", func() bool {
			return metric(t, b.reg, "tcp_close_total", with("service", "open")) == 1
		})
	})
}
