package proxy

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// vipCatalog makes a VIP of the test catalog's service: a connection to
// vip is a connection to the service (balanced), as the agent's catalog
// resolves its VIPs.
type vipCatalog struct {
	*testCatalog
	vip     netip.Addr
	service string
}

func (c vipCatalog) Resolve(a netip.AddrPort) Destination {
	if a.Addr() != c.vip {
		return c.testCatalog.Resolve(a)
	}
	eps, _ := c.Endpoints(c.service)
	for _, ep := range eps {
		if ep.Addr.Port() == a.Port() {
			return Destination{Kind: DestService, Service: c.service, Endpoint: ep}
		}
	}
	return Destination{Kind: DestMeshHost}
}

// backend is one endpoint's app: it answers its name, and on /fail 503,
// on /slow after a second, on /reset it closes the connection unanswered
// (when reset is set).
type backend struct {
	name  string
	reset atomic.Bool
	hits  atomic.Int64
	srv   *http.Server
}

func (b *backend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.hits.Add(1)
	io.Copy(io.Discard, r.Body)
	switch {
	case r.URL.Path == "/fail":
		w.WriteHeader(503)
	case r.URL.Path == "/slow":
		time.Sleep(time.Second)
	case b.reset.Load():
		c, _, _ := w.(http.Hijacker).Hijack()
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		return
	}
	fmt.Fprintln(w, b.name)
}

// vipMesh is a client proxy whose catalog has service web at vip, with
// endpoints on two server proxies: b1 (labels version=v1) and b2 (v2).
type vipMesh struct {
	a        *testProxy
	backends map[string]*backend
	client   *http.Client
	url      string
}

func newVIPMesh(t *testing.T) *vipMesh {
	t.Helper()
	ca := newTestCA(t, "vmesh.test")
	m := &vipMesh{backends: map[string]*backend{}}
	vip := netip.MustParseAddr("240.0.0.10")
	// The catalog maps vip to web before the proxy serves.
	a := startProxy(t, "a", ca, proxyOpts{tune: func(a *testProxy) { a.p.opts.Catalog = vipCatalog{a.cat, vip, "web"} }})
	m.a = a
	for _, name := range []string{"b1", "b2"} {
		be := &backend{name: name}
		m.backends[name] = be
		ln := listenLocal(t)
		srv := &http.Server{Handler: be}
		be.srv = srv
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
		b := startProxy(t, name, ca, proxyOpts{
			services: []LocalService{{Name: "web", Port: 8080, Target: addrPort(ln.Addr())}},
			certs:    []string{"web"},
		})
		a.cat.add(Endpoint{
			Node: name, Service: "web", Addr: netip.AddrPortFrom(b.ip, 8080), ProxyAddr: b.p.InboundAddr(),
			Identity: "spiffe://vmesh.test/svc/web", Protocol: "auto", Healthy: true, Weight: 100,
			Labels: map[string]string{"version": "v" + name[1:]},
		})
	}
	m.client = &http.Client{Transport: &http.Transport{DialContext: a.dialContext, MaxIdleConnsPerHost: 8}, Timeout: 10 * time.Second}
	t.Cleanup(m.client.CloseIdleConnections)
	m.url = "http://" + vip.String() + ":8080"
	return m
}

func (m *vipMesh) get(t *testing.T, method, path string) (int, string, http.Header) {
	t.Helper()
	req, _ := http.NewRequest(method, m.url+path, strings.NewReader(""))
	if method == "POST" {
		req.Body = io.NopCloser(strings.NewReader("a small body"))
		req.ContentLength = int64(len("a small body"))
	}
	resp, err := m.client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), resp.Header
}

// A 90/10 split by label gives 90/10 of 1000 requests (±5 %), and a
// reload to 50/50 applies to the next requests on the same connections.
func TestTrafficSplit(t *testing.T) {
	m := newVIPMesh(t)
	m.a.p.SetPolicies([]ServicePolicy{{Service: "web", Split: []Subset{
		{Name: "stable", Labels: map[string]string{"version": "v1"}, Weight: 90},
		{Name: "canary", Labels: map[string]string{"version": "v2"}, Weight: 10},
	}}})
	count := func(n int) map[string]int {
		got := map[string]int{}
		for range n {
			code, body, _ := m.get(t, "GET", "/")
			if code != 200 {
				t.Fatalf("GET: %d %s", code, body)
			}
			got[body]++
		}
		return got
	}
	got := count(1000)
	if got["b1"] < 850 || got["b1"] > 950 || got["b1"]+got["b2"] != 1000 {
		t.Errorf("90/10 split: %v", got)
	}
	if n := metric(t, m.a.reg, "endpoint_requests_total", map[string]string{"subset": "canary", "endpoint": "b2"}); n != float64(got["b2"]) {
		t.Errorf("endpoint_requests_total{subset=canary} = %v, want %d", n, got["b2"])
	}
	// A canary with no healthy endpoint takes nothing: its share goes to
	// the stable subset (no request fails).
	m.a.p.SetPolicies([]ServicePolicy{{Service: "web", Split: []Subset{
		{Labels: map[string]string{"version": "v1"}, Weight: 1},
		{Labels: map[string]string{"version": "v3"}, Weight: 1},
	}}})
	if got := count(50); got["b1"] != 50 {
		t.Errorf("split with an empty subset: %v, want all 50 on b1", got)
	}
}

// Per-route timeouts: /slow times out at the route's 200ms with 504 and
// l5d-proxy-error; other paths use the service's (none here).
func TestRouteTimeout(t *testing.T) {
	m := newVIPMesh(t)
	m.a.p.SetPolicies([]ServicePolicy{{Service: "web", Routes: []RoutePolicy{
		{PathPrefix: "/sl", Timeout: 200 * time.Millisecond},
		{Method: "POST", PathPrefix: "/slow", Timeout: 5 * time.Second},
	}}})
	start := time.Now()
	code, _, h := m.get(t, "GET", "/slow")
	if code != 504 || h.Get("l5d-proxy-error") == "" || time.Since(start) > 900*time.Millisecond {
		t.Errorf("GET /slow with a 200ms route timeout: %d %q after %v", code, h.Get("l5d-proxy-error"), time.Since(start))
	}
	if code, _, _ := m.get(t, "POST", "/slow"); code != 200 {
		t.Errorf("POST /slow (route timeout 5s): %d", code)
	}
}

// Retries: a request an endpoint's app reset is retried on the other when
// idempotent (GET), never when not (POST); a POST with a small buffered
// body that never reached an app (its proxy could not connect) is.
func TestRetries(t *testing.T) {
	m := newVIPMesh(t)
	// Every first attempt goes to b2 (a split of one subset); a retry
	// may go anywhere.
	m.a.p.SetPolicies([]ServicePolicy{{Service: "web", Split: []Subset{{Labels: map[string]string{"version": "v2"}, Weight: 1}}}})
	m.backends["b2"].reset.Store(true)
	for range 20 {
		if code, body, _ := m.get(t, "GET", "/"); code != 200 || body != "b1" {
			t.Fatalf("GET with b2 resetting: %d %q", code, body)
		}
	}
	if n := metric(t, m.a.reg, "balancer_retries_total", map[string]string{"reason": "peer_unavailable"}); n != 20 {
		t.Errorf("%v retries counted for 20 GETs b2 reset, want 20", n)
	}
	// b2's app saw each POST before it reset: never sent twice.
	for range 5 {
		if code, _, _ := m.get(t, "POST", "/"); code != 502 {
			t.Errorf("POST that b2's app reset: %d, want 502 (not replayed)", code)
		}
	}
	// b2's app is gone: its proxy cannot connect, the POST (small body,
	// buffered) never reached an app and goes to b1.
	m.backends["b2"].srv.Close()
	for range 5 {
		if code, body, _ := m.get(t, "POST", "/"); code != 200 || body != "b1" {
			t.Errorf("POST with b2's app down: %d %q, want b1's answer", code, body)
		}
	}
}

// A retry storm: every endpoint answers 503 on a route that retries 503;
// the retries stay within the budget and the rest are counted.
func TestRetryStorm(t *testing.T) {
	m := newVIPMesh(t)
	m.a.p.SetPolicies([]ServicePolicy{{Service: "web", Routes: []RoutePolicy{{PathPrefix: "/fail", RetryStatuses: []int{503}}}}})
	before := m.backends["b1"].hits.Load() + m.backends["b2"].hits.Load()
	const n = 400
	for range n {
		if code, _, _ := m.get(t, "GET", "/fail"); code != 503 {
			t.Fatalf("GET /fail: %d", code)
		}
	}
	hits := m.backends["b1"].hits.Load() + m.backends["b2"].hits.Load() - before
	retries := metric(t, m.a.reg, "balancer_retries_total", map[string]string{"reason": "status"})
	exhausted := metric(t, m.a.reg, "retry_budget_exhausted_total", map[string]string{"service": "web"})
	t.Logf("%d requests to /fail: %d reached an app, %v retries, %v refused by the budget", n, hits, retries, exhausted)
	// The budget: 20 % of the requests in the window plus 10/s over 10 s.
	if retries == 0 || retries > 0.2*n+100 || float64(hits) != n+retries || exhausted == 0 {
		t.Errorf("storm: %v retries, %v exhausted, %d app requests for %d", retries, exhausted, hits, n)
	}
}

func TestRequestPolicy(t *testing.T) {
	sp := &ServicePolicy{Service: "x", Timeout: time.Second, RetryStatuses: []int{503}, Routes: []RoutePolicy{
		{PathPrefix: "/api/", Timeout: 100 * time.Millisecond},
		{PathPrefix: "/api/slow", Method: "GET", Timeout: 10 * time.Second, RetryStatuses: []int{}},
	}}
	p := &Proxy{}
	p.SetPolicies([]ServicePolicy{*sp})
	sp = p.policy("")
	if sp != nil {
		t.Fatal("a policy for no service")
	}
	sp = p.policy("x")
	cases := []struct {
		method, path string
		timeout      time.Duration
		statuses     int
	}{
		{"GET", "/", time.Second, 1},
		{"GET", "/api/x", 100 * time.Millisecond, 1},
		{"GET", "/api/slow/1", 10 * time.Second, 0},
		{"POST", "/api/slow/1", 100 * time.Millisecond, 1},
	}
	for _, c := range cases {
		d, st := sp.requestPolicy([]byte(c.method), []byte(c.path), 0)
		if d != c.timeout || len(st) != c.statuses {
			t.Errorf("%s %s: %v %v, want %v and %d statuses", c.method, c.path, d, st, c.timeout, c.statuses)
		}
	}
}
