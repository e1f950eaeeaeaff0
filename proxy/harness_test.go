package proxy

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Loopback test mesh. Each proxy listens on its own 127.0.0.x; each test
// client dials from its own 127.1.x.y, and origRegistry maps that source
// address to the "original destination" the proxy's origDst seam returns,
// standing in for iptables REDIRECT (the netns tests use the real thing).

var loopN atomic.Uint32

var debugLog = flag.Bool("proxy.log", false, "log proxy debug output to stderr")

// loopStart spreads concurrent test processes (two worktrees, a helper and
// CI) over different 127.x addresses so their listeners do not collide.
var loopStart = uint32(os.Getpid()%200) << 8

func nextLoopbackIP(base byte) netip.Addr {
	n := loopStart + loopN.Add(1)
	return netip.AddrFrom4([4]byte{127, base, byte(n >> 8), byte(n)})
}

type origRegistry struct {
	mu sync.Mutex
	m  map[netip.Addr]netip.AddrPort
}

func (r *origRegistry) lookup(c *net.TCPConn) (netip.AddrPort, error) {
	ra := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()
	r.mu.Lock()
	dst, ok := r.m[ra]
	r.mu.Unlock()
	if !ok {
		return c.LocalAddr().(*net.TCPAddr).AddrPort(), nil // not redirected
	}
	return dst, nil
}

// dialFrom dials to (a proxy listener) from a fresh source address that the
// proxy will see as redirected from dst.
func (r *origRegistry) dialFrom(ctx context.Context, to, dst netip.AddrPort) (*net.TCPConn, error) {
	src := nextLoopbackIP(1)
	r.mu.Lock()
	r.m[src] = dst
	r.mu.Unlock()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
	c, err := d.DialContext(ctx, "tcp", to.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// testCatalog is a Catalog of endpoints added by tests; every address of
// an added endpoint is a mesh host's (DestMeshHost at other ports).
type testCatalog struct {
	mu    sync.Mutex
	m     map[netip.AddrPort]Endpoint
	hosts map[netip.Addr]bool
	gen   uint64
}

func newTestCatalog() *testCatalog {
	return &testCatalog{m: map[netip.AddrPort]Endpoint{}, hosts: map[netip.Addr]bool{}}
}

func (c *testCatalog) Resolve(a netip.AddrPort) Destination {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[a]; ok {
		return Destination{Kind: DestEndpoint, Endpoint: e, Service: e.Service}
	}
	if c.hosts[a.Addr()] {
		return Destination{Kind: DestMeshHost}
	}
	return Destination{}
}

func (c *testCatalog) Endpoints(service string) ([]Endpoint, uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var eps []Endpoint
	for _, e := range c.m {
		if e.Service == service {
			eps = append(eps, e)
		}
	}
	return eps, c.gen
}

func (c *testCatalog) add(e Endpoint) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m[e.Addr] = e
	c.hosts[e.Addr.Addr()] = true
	c.gen++
}

type testProxy struct {
	name string
	p    *Proxy
	reg  *prometheus.Registry
	id   *testIdentity
	cat  *testCatalog
	orig *origRegistry
	ip   netip.Addr
}

type proxyOpts struct {
	cfg      func(*Config)
	services []LocalService
	certs    []string // service SVIDs to hold
	verify   VerifyPeerFunc
	dialer   Dialer
	logger   *slog.Logger // nil: testLogger
	// tune changes the proxy's internals before it serves: a change after
	// Serve starts races its accept loop (the race detector sees no order
	// through the sockets a test's traffic takes).
	tune func(*testProxy)
}

func testLogger(t testing.TB) *slog.Logger {
	if *debugLog {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return nil
}

func startProxy(t testing.TB, name string, ca *testCA, o proxyOpts) *testProxy {
	t.Helper()
	ip := nextLoopbackIP(0)
	cfg := DefaultConfig()
	cfg.OutboundAddr = netip.AddrPortFrom(ip, 4140)
	cfg.InboundAddr = netip.AddrPortFrom(ip, 4143)
	cfg.DetectTimeout = 2 * time.Second
	if o.cfg != nil {
		o.cfg(&cfg)
	}
	tp := &testProxy{
		name: name, reg: prometheus.NewRegistry(), id: newTestIdentity(t, ca, name, o.certs...),
		cat: newTestCatalog(), orig: &origRegistry{m: map[netip.Addr]netip.AddrPort{}}, ip: ip,
	}
	logger := o.logger
	if logger == nil {
		logger = testLogger(t)
	}
	p, err := New(cfg, Options{
		Catalog: tp.cat, Identity: tp.id, VerifyPeer: o.verify, Services: o.services, Dialer: o.dialer,
		Registerer: tp.reg, Logger: logger,
	})
	if err != nil {
		t.Fatal(err)
	}
	p.origDst = tp.orig.lookup
	if err := p.Listen(); err != nil {
		t.Fatal(err)
	}
	tp.p = p
	if o.tune != nil {
		o.tune(tp)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve(context.Background()) }()
	t.Cleanup(func() {
		p.Close()
		if err := <-done; err != nil {
			t.Errorf("%s: Serve: %v", name, err)
		}
	})
	return tp
}

// meshPair starts proxies A (client side) and B (server side, holding the
// given services) sharing one CA, and registers in A's catalog one endpoint
// per service at appAddr 198.18.99.2:port.
func meshPair(t testing.TB, services []LocalService, aOpts, bOpts proxyOpts) (a, b *testProxy, ca *testCA) {
	ca = newTestCA(t, "vmesh.test")
	bOpts.services = services
	for _, s := range services {
		bOpts.certs = append(bOpts.certs, s.Name)
	}
	b = startProxy(t, "b", ca, bOpts)
	a = startProxy(t, "a", ca, aOpts)
	for _, s := range services {
		a.cat.add(Endpoint{
			Node: "b", Service: s.Name, Addr: appAddr(s.Port), ProxyAddr: b.p.InboundAddr(),
			Identity: "spiffe://vmesh.test/svc/" + s.Name, Protocol: "auto", Healthy: true,
		})
	}
	return a, b, ca
}

func appAddr(port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("198.18.99.2"), port)
}

// dialOut opens an app connection through a's outbound proxy to dst.
func (tp *testProxy) dialOut(t testing.TB, dst netip.AddrPort) *net.TCPConn {
	t.Helper()
	c, err := tp.orig.dialFrom(context.Background(), tp.p.OutboundAddr(), dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// dialContext is an http.Transport DialContext that sends every connection
// through the outbound proxy with the URL's host:port as destination.
func (tp *testProxy) dialContext(ctx context.Context, _, addr string) (net.Conn, error) {
	dst, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	return tp.orig.dialFrom(ctx, tp.p.OutboundAddr(), dst)
}

// metric sums the series of name whose labels include want.
func metric(t testing.TB, reg *prometheus.Registry, name string, want map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, lp := range m.GetLabel() {
				got[lp.GetName()] = lp.GetValue()
			}
			for k, v := range want {
				if got[k] != v {
					continue series
				}
			}
			sum += value(m)
		}
	}
	return sum
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Histogram != nil:
		return float64(m.Histogram.GetSampleCount())
	}
	return 0
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// listenLocal starts a TCP listener for a test backend on a fresh loopback IP.
func listenLocal(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(nextLoopbackIP(2), 0).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func addrPort(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }

func must[T any](v T, err error) T {
	if err != nil {
		panic(fmt.Sprint(err))
	}
	return v
}
