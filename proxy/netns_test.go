package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"

	"github.com/vmesh/vmesh/internal/testbed"
)

// The namespace tests run two meshed hosts (h1 = A, client side; h2 = B,
// server side) and one unmeshed host (h3 = C) on the test bed, with real
// iptables REDIRECT rules, real SO_ORIGINAL_DST and Debian's curl,
// redis-server, redis-cli, redis-benchmark and tcpdump.

// meshMark marks the proxies' own sockets; the test rules let them pass
// (node's rules exempt the proxy's uid instead; in one test process every
// socket has the same uid).
const meshMark = 0x4143

// nsDialer dials from inside a host's namespace, optionally marked.
type nsDialer struct {
	h    *testbed.Host
	mark bool
}

func (d nsDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := d.h.Do(func() error {
		nd := net.Dialer{}
		if d.mark {
			nd.Control = func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) {
					serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, meshMark)
				}); err != nil {
					return err
				}
				return serr
			}
		}
		var err error
		c, err = nd.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// installRedirects writes the minimal nat rules a vmesh host has: OUTPUT to
// the outbound proxy, PREROUTING to the inbound proxy, skip ports exempt.
func installRedirects(t *testing.T, h *testbed.Host, skip string) {
	for _, r := range [][]string{
		{"-N", "VT_OUT"},
		{"-A", "VT_OUT", "-m", "mark", "--mark", fmt.Sprint(meshMark), "-j", "RETURN"},
		{"-A", "VT_OUT", "-o", "lo", "-j", "RETURN"},
		{"-A", "VT_OUT", "-p", "tcp", "-m", "multiport", "--dports", skip, "-j", "RETURN"},
		{"-A", "VT_OUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "4140"},
		{"-A", "OUTPUT", "-p", "tcp", "-j", "VT_OUT"},
		{"-N", "VT_IN"},
		{"-A", "VT_IN", "-p", "tcp", "-m", "multiport", "--dports", "4143," + skip, "-j", "RETURN"},
		{"-A", "VT_IN", "-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "REDIRECT", "--to-ports", "4143"},
		{"-A", "PREROUTING", "-p", "tcp", "-j", "VT_IN"},
	} {
		h.Run(t, "iptables", append([]string{"-t", "nat"}, r...)...)
	}
}

type nsProxy struct {
	p   *Proxy
	reg *prometheus.Registry
}

func startNSProxy(t *testing.T, h *testbed.Host, ca *testCA, node string, cat Catalog, svcs []LocalService, cfgMod func(*Config)) *nsProxy {
	t.Helper()
	cfg := DefaultConfig()
	if cfgMod != nil {
		cfgMod(&cfg)
	}
	var names []string
	for _, s := range svcs {
		names = append(names, s.Name)
	}
	reg := prometheus.NewRegistry()
	p, err := New(cfg, Options{
		Catalog: cat, Identity: newTestIdentity(t, ca, node, names...), Services: svcs,
		Dialer: nsDialer{h: h, mark: true}, Registerer: reg, Logger: testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Do(p.Listen); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve(context.Background()) }()
	t.Cleanup(func() { p.Close(); <-done })
	return &nsProxy{p: p, reg: reg}
}

// listenIn opens a listener inside h.
func listenIn(t *testing.T, h *testbed.Host, port uint16) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := h.Do(func() (err error) {
		ln, err = net.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// tcpdump captures the bridge until stop is called and returns the capture.
// stop first waits until the capture holds last, a marker the caller sent
// in clear as its last packet, so nothing sent before is missing.
func tcpdump(t *testing.T, bed *testbed.Bed) (stop func(last string) []byte) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "bridge.pcap")
	cmd := exec.Command("ip", "netns", "exec", bed.Switch, "tcpdump", "-i", "br0", "-U", "-s", "0", "-w", file, "tcp")
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stderr)
	ready := make(chan struct{})
	go func() {
		for sc.Scan() {
			if strings.Contains(sc.Text(), "listening on") {
				close(ready)
				io.Copy(io.Discard, stderr)
				return
			}
		}
	}()
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		t.Fatal("tcpdump did not start")
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return func(last string) []byte {
		eventually(t, "the capture to hold the last marker", func() bool {
			b, _ := os.ReadFile(file)
			return bytes.Contains(b, []byte(last))
		})
		stopped = true
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
}

func randomMarker(prefix string) string {
	b := make([]byte, 12)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

func TestMeshNetns(t *testing.T) {
	for _, bin := range []string{"curl", "redis-server", "redis-cli", "redis-benchmark", "tcpdump"} {
		if _, err := exec.LookPath(bin); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s missing (apt-get install curl redis-server redis-tools tcpdump)", bin)
			}
			t.Skipf("%s missing", bin)
		}
	}
	bed := testbed.New(t, 3)
	A, B, C := bed.Hosts[0], bed.Hosts[1], bed.Hosts[2]
	const skip = "9999"
	installRedirects(t, A, skip)
	installRedirects(t, B, skip)

	// Backends on B.
	reqMarker, respMarker := randomMarker("REQMARK"), randomMarker("RESPMARK")
	web := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		// The response marker goes only to clients that sent a marker:
		// the unmeshed client's plaintext exchange must not carry it.
		m := r.Header.Get("X-Marker")
		if m != "" {
			m += " " + string(body) + " " + respMarker
		}
		fmt.Fprintf(w, "%s %s", r.Proto, m)
	})}
	web.Protocols = new(http.Protocols)
	web.Protocols.SetHTTP1(true)
	web.Protocols.SetUnencryptedHTTP2(true)
	for _, port := range []uint16{8080, 8081, 8082, 8083} {
		go web.Serve(listenIn(t, B, port))
	}
	t.Cleanup(func() { web.Close() })
	serveGRPCLike(t, listenIn(t, B, 9090))
	serveUpgrade(t, listenIn(t, B, 8084))
	serveSpeaksFirst(listenIn(t, B, 2525))
	serveSpeaksFirst(listenIn(t, B, 25))
	serveEcho(listenIn(t, B, 7003))
	serveEcho(listenIn(t, B, 9999))
	serveTwoWaySink(listenIn(t, B, 9000))
	B.Start(t, "redis-server", "--port", "6379", "--bind", "0.0.0.0", "--save", "", "--appendonly", "no", "--protected-mode", "no")

	ca := newTestCA(t, "vmesh.test")
	svcs := []LocalService{
		{Name: "web", Port: 8080},
		{Name: "authn", Port: 8081, Policy: PolicyAllAuthenticated},
		{Name: "secret", Port: 8082, Allow: []string{"spiffe://vmesh.test/node/c"}},
		{Name: "friends", Port: 8083, Allow: []string{"spiffe://vmesh.test/node/a"}},
		{Name: "ws", Port: 8084},
		{Name: "grpc", Port: 9090},
		{Name: "smtp", Port: 2525},
		{Name: "mail", Port: 25},
		{Name: "secret-tcp", Port: 7003, Allow: []string{"spiffe://vmesh.test/node/c"}},
		{Name: "sink", Port: 9000, Protocol: "opaque"},
		{Name: "redis", Port: 6379},
	}
	cat := newTestCatalog()
	for _, s := range svcs {
		cat.add(Endpoint{
			Node: "b", Service: s.Name, Addr: netip.AddrPortFrom(B.Addr, s.Port), ProxyAddr: netip.AddrPortFrom(B.Addr, 4143),
			Identity: "spiffe://vmesh.test/svc/" + s.Name, Protocol: "auto", Opaque: s.Protocol == "opaque", Healthy: true,
		})
	}
	const detectTimeout = 500 * time.Millisecond
	cfg := func(c *Config) { c.DetectTimeout = detectTimeout }
	pa := startNSProxy(t, A, ca, "a", cat, nil, cfg)
	pb := startNSProxy(t, B, ca, "b", newTestCatalog(), svcs, cfg)
	// Wait until B's redis answers locally.
	eventually(t, "redis-server on B", func() bool {
		out, err := B.Try("redis-cli", "-h", "127.0.0.1", "PING")
		return err == nil && strings.TrimSpace(out) == "PONG"
	})
	appDial := nsDialer{h: A}
	url := func(port int, path string) string { return fmt.Sprintf("http://%s:%d%s", B.Addr, port, path) }
	idA := "spiffe://vmesh.test/node/a"

	stopCapture := tcpdump(t, bed)
	controlMarker := randomMarker("CONTROL")

	t.Run("curl http1", func(t *testing.T) {
		out := A.Run(t, "curl", "-sS", "--max-time", "10", "-H", "X-Marker: "+reqMarker, "--data-binary", reqMarker, url(8080, "/x"))
		if want := "HTTP/1.1 " + reqMarker + " " + reqMarker + " " + respMarker; out != want {
			t.Fatalf("curl got %q, want %q", out, want)
		}
		if got := metric(t, pa.reg, "request_total", map[string]string{"direction": "outbound", "service": "web", "server_id": "spiffe://vmesh.test/svc/web", "tls": "true"}); got != 1 {
			t.Errorf("A request_total = %v, want 1", got)
		}
		eventually(t, "B response metric", func() bool {
			return metric(t, pb.reg, "response_total", map[string]string{"direction": "inbound", "service": "web", "client_id": idA, "status_code": "200", "classification": "success"}) == 1
		})
	})
	t.Run("curl h2c", func(t *testing.T) {
		out := A.Run(t, "curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", "-H", "X-Marker: "+reqMarker, url(8080, "/h2"))
		if !strings.HasPrefix(out, "HTTP/2.0 "+reqMarker) {
			t.Fatalf("h2c: app saw %q, want HTTP/2.0", out)
		}
	})
	t.Run("grpc-like streaming with trailers", func(t *testing.T) {
		tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, n, addr string, _ *tls.Config) (net.Conn, error) {
			return appDial.DialContext(ctx, n, addr)
		}}
		defer tr.CloseIdleConnections()
		req, _ := http.NewRequest("POST", url(9090, "/pkg.Svc/Method"), strings.NewReader(reqMarker))
		req.Header.Set("Content-Type", "application/grpc")
		req.Header.Set("Te", "trailers")
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		if string(body) != reqMarker || resp.Trailer.Get("Grpc-Status") != "0" {
			t.Fatalf("grpc-like: body %q trailers %v", body, resp.Trailer)
		}
	})
	t.Run("websocket-style upgrade", func(t *testing.T) {
		c, err := appDial.DialContext(context.Background(), "tcp", fmt.Sprintf("%s:8084", B.Addr))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != 101 {
			t.Fatalf("upgrade: %v %v", resp, err)
		}
		io.WriteString(c, reqMarker)
		buf := make([]byte, len(reqMarker))
		if _, err := io.ReadFull(br, buf); err != nil || string(buf) != reqMarker {
			t.Fatalf("echo over upgraded connection: %q %v", buf, err)
		}
	})
	t.Run("redis", func(t *testing.T) {
		if out := A.Run(t, "redis-cli", "-h", B.Addr.String(), "SET", "k", reqMarker); strings.TrimSpace(out) != "OK" {
			t.Fatalf("SET: %q", out)
		}
		if out := A.Run(t, "redis-cli", "-h", B.Addr.String(), "GET", "k"); strings.TrimSpace(out) != reqMarker {
			t.Fatalf("GET: %q", out)
		}
		start := time.Now()
		out := A.Run(t, "redis-benchmark", "-h", B.Addr.String(), "-q", "-n", "5000", "-c", "10", "-t", "set,get")
		t.Logf("redis-benchmark through the mesh (%v):\n%s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(out))
		if !strings.Contains(out, "SET:") || !strings.Contains(out, "GET:") {
			t.Fatalf("redis-benchmark: %q", out)
		}
		eventually(t, "TCP metrics with identities", func() bool {
			return metric(t, pa.reg, "tcp_close_total", map[string]string{"direction": "outbound", "service": "redis", "server_id": "spiffe://vmesh.test/svc/redis", "tls": "true"}) >= 12 &&
				metric(t, pb.reg, "tcp_close_total", map[string]string{"direction": "inbound", "service": "redis", "client_id": idA, "tls": "true"}) >= 12
		})
		if got := metric(t, pb.reg, "tcp_read_bytes_total", map[string]string{"service": "redis"}); got < 5000*2*20 {
			t.Errorf("B read only %v bytes of redis traffic", got)
		}
	})
	t.Run("server speaks first", func(t *testing.T) {
		greet := func(port int) time.Duration {
			start := time.Now()
			c, err := appDial.DialContext(context.Background(), "tcp", fmt.Sprintf("%s:%d", B.Addr, port))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil || line != "220 hello\r\n" {
				t.Fatalf("port %d: %q %v", port, line, err)
			}
			return time.Since(start)
		}
		if d := greet(2525); d < detectTimeout {
			t.Errorf("non-opaque port greeted after %v, before the detect timeout", d)
		}
		if d := greet(25); d >= detectTimeout {
			t.Errorf("opaque port greeted after %v, want at once", d)
		}
	})
	t.Run("skip port bypasses the proxy", func(t *testing.T) {
		before := metric(t, pa.reg, "tcp_open_total", nil)
		if out := echoVia(t, appDial, B, 9999, "skip"); out != "skip" {
			t.Fatalf("skip port echo: %q", out)
		}
		if after := metric(t, pa.reg, "tcp_open_total", nil); after != before {
			t.Errorf("skip-port connection reached the proxy: tcp_open_total %v -> %v", before, after)
		}
	})
	t.Run("policy", func(t *testing.T) {
		code := func(h *testbed.Host, port int) string {
			out, _ := h.Try("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url(port, "/"))
			return out
		}
		if got := code(C, 8080); got != "200" {
			t.Errorf("unmeshed client to all-unauthenticated service: %s, want 200", got)
		}
		// Plaintext HTTP is detected on the redirected connection: denied
		// per request with 403, as for meshed clients.
		out := C.Run(t, "curl", "-s", "-i", "--max-time", "5", url(8081, "/"))
		if !strings.HasPrefix(out, "HTTP/1.1 403") || !strings.Contains(strings.ToLower(out), "l5d-proxy-error: unauthorized: unauthenticated") {
			t.Errorf("unmeshed client to all-authenticated service: %q, want 403 with l5d-proxy-error", out)
		}
		if got := metric(t, pb.reg, "request_total", map[string]string{"direction": "inbound", "service": "web", "tls": "no_identity"}); got != 1 {
			t.Errorf("unmeshed request to web: request_total{no_identity} = %v, want 1", got)
		}
		// Plaintext TCP that is not HTTP is closed.
		pc, err := nsDialer{h: C}.DialContext(context.Background(), "tcp", fmt.Sprintf("%s:7003", B.Addr))
		if err != nil {
			t.Fatal(err)
		}
		pc.Write([]byte("hello\n"))
		if !refused(pc) {
			t.Error("unmeshed TCP client to an allow-listed service: not closed")
		}
		pc.Close()
		if got := code(A, 8081); got != "200" {
			t.Errorf("meshed client to all-authenticated service: %s, want 200", got)
		}
		out = A.Run(t, "curl", "-s", "-i", "--max-time", "5", url(8082, "/"))
		if !strings.HasPrefix(out, "HTTP/1.1 403") || !strings.Contains(strings.ToLower(out), "l5d-proxy-error: unauthorized: identity_not_allowed") {
			t.Errorf("identity not on allow list: %q, want 403 with l5d-proxy-error", out)
		}
		if got := code(A, 8083); got != "200" {
			t.Errorf("identity on allow list: %s, want 200", got)
		}
		c, err := appDial.DialContext(context.Background(), "tcp", fmt.Sprintf("%s:7003", B.Addr))
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("x"))
		if !refused(c) {
			t.Error("TCP identity not on allow list: not closed")
		}
		c.Close()
		for name, want := range map[string]float64{
			"inbound_tcp_authz_deny_total":  2, // C plaintext to secret-tcp, A to secret-tcp
			"inbound_http_authz_deny_total": 2, // C plaintext to authn, A to secret
		} {
			if got := metric(t, pb.reg, name, nil); got != want {
				t.Errorf("%s = %v, want %v", name, got, want)
			}
		}
	})

	// The control marker goes in clear over the skip port, last: the
	// capture demonstrably sees plaintext and holds everything before it.
	if out := echoVia(t, appDial, B, 9999, controlMarker); out != controlMarker {
		t.Fatalf("control echo over the skip port: %q", out)
	}
	pcap := stopCapture(controlMarker)
	for _, m := range []string{reqMarker, respMarker} {
		if bytes.Contains(pcap, []byte(m)) {
			t.Errorf("capture contains marker %s in clear", m)
		}
	}
	t.Logf("bridge capture: %d bytes, markers absent, control present", len(pcap))

	t.Run("1GiB both directions with half-close", func(t *testing.T) {
		size := int64(1 << 30)
		if testing.Short() {
			size = 64 << 20
		}
		c, err := appDial.DialContext(context.Background(), "tcp", fmt.Sprintf("%s:9000", B.Addr))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		sum, err := writePattern(c, size)
		if err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).CloseWrite() // half-close: the sink answers only after EOF
		var echoSum [32]byte
		if _, err := io.ReadFull(c, echoSum[:]); err != nil {
			t.Fatal(err)
		}
		if echoSum != sum {
			t.Fatal("upload checksum mismatch")
		}
		h := sha256.New()
		n, err := io.Copy(h, c)
		if err != nil || n != size || [32]byte(h.Sum(nil)) != sum {
			t.Fatalf("download: %d bytes (want %d), match=%v, %v", n, size, [32]byte(h.Sum(nil)) == sum, err)
		}
		el := time.Since(start)
		t.Logf("2x%d MiB through the mesh in %v: %.2f Gbit/s", size>>20, el.Round(time.Millisecond), float64(2*size*8)/el.Seconds()/1e9)
	})

	t.Run("skip port works with the proxy stopped", func(t *testing.T) {
		pa.p.Close()
		if out := echoVia(t, appDial, B, 9999, "hello"); out != "hello" {
			t.Fatalf("skip port with proxy stopped: %q", out)
		}
		if _, err := A.Try("curl", "-sS", "--max-time", "3", url(8080, "/")); err == nil {
			t.Fatal("redirected port worked with the proxy stopped: test is not exercising the proxy")
		}
	})
}

// echoVia sends msg to an echo server on h:port, half-closes and returns
// what came back.
func echoVia(t *testing.T, d nsDialer, h *testbed.Host, port int, msg string) string {
	t.Helper()
	c, err := d.DialContext(context.Background(), "tcp", fmt.Sprintf("%s:%d", h.Addr, port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, msg)
	c.(*net.TCPConn).CloseWrite()
	b, _ := io.ReadAll(c)
	return string(b)
}

// writePattern writes size bytes of a fixed pseudo-random pattern and
// returns their sha256.
func writePattern(w io.Writer, size int64) ([32]byte, error) {
	block := patternBlock()
	h := sha256.New()
	for size > 0 {
		b := block
		if int64(len(b)) > size {
			b = b[:size]
		}
		if _, err := w.Write(b); err != nil {
			return [32]byte{}, err
		}
		h.Write(b)
		size -= int64(len(b))
	}
	return [32]byte(h.Sum(nil)), nil
}

func patternBlock() []byte {
	b := make([]byte, 256<<10)
	x := uint32(2463534242)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

// serveTwoWaySink reads until EOF, answers the sha256 of what it read, then
// sends the same number of pattern bytes back.
func serveTwoWaySink(ln net.Listener) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				h := sha256.New()
				n, err := io.Copy(h, c)
				if err != nil {
					return
				}
				c.Write(h.Sum(nil))
				writePattern(c, n)
			}()
		}
	}()
}
