package proxy

import (
	"io"
	"net/netip"
	"testing"
	"time"
)

func TestRoutes(t *testing.T) {
	cfg := DefaultConfig()
	cfg.OpaquePorts = []uint16{5432}
	tab := newRouteTable(cfg)
	denyCfg := cfg
	denyCfg.OutboundUnknown = "deny"
	denyTab := newRouteTable(denyCfg)

	dst := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("198.18.0.2"), port) }
	ep := func(port uint16, proto string, opaque bool) Destination {
		e := Endpoint{Service: "s", Addr: dst(port), ProxyAddr: dst(4143), Identity: "spiffe://td/svc/s", Protocol: proto, Opaque: opaque}
		return Destination{Kind: DestEndpoint, Endpoint: e, Service: "s"}
	}
	noProxy := ep(80, "auto", false)
	noProxy.Endpoint.ProxyAddr = netip.AddrPort{}

	type want struct {
		kind   routeKind
		reason string
		proto  appProtocol
	}
	out := []struct {
		name     string
		tab      *routeTable
		port     uint16
		d        Destination
		proto    appProtocol
		detected bool
		want     want
	}{
		{"unknown passes through", &tab, 80, Destination{}, 0, false, want{kind: routePassthrough}},
		{"unknown denied by config", &denyTab, 80, Destination{}, 0, false, want{kind: routeDeny, reason: refuseUnknownDst}},
		{"mesh host never in clear", &tab, 81, Destination{Kind: DestMeshHost}, 0, false, want{kind: routeDeny, reason: refuseMeshHost}},
		{"mesh host never in clear even with deny", &denyTab, 81, Destination{Kind: DestMeshHost}, 0, false, want{kind: routeDeny, reason: refuseMeshHost}},
		{"endpoint without proxy address never in clear", &tab, 80, noProxy, 0, false, want{kind: routeDeny, reason: refuseMeshHost}},
		{"service VIP not balanced yet", &tab, 80, Destination{Kind: DestService, Service: "s"}, 0, false, want{kind: routeDeny, reason: refuseNoBalance}},
		{"auto port detects first", &tab, 80, ep(80, "auto", false), 0, false, want{kind: routeDetect}},
		{"detected HTTP/1", &tab, 80, ep(80, "auto", false), protoHTTP1, true, want{kind: routeHTTP, proto: protoHTTP1}},
		{"detected HTTP/2", &tab, 80, ep(80, "auto", false), protoHTTP2, true, want{kind: routeHTTP, proto: protoHTTP2}},
		{"detected opaque", &tab, 80, ep(80, "auto", false), protoOpaque, true, want{kind: routeOpaque}},
		{"opaque protocol skips detection", &tab, 80, ep(80, "opaque", false), 0, false, want{kind: routeOpaque}},
		{"port the server declared opaque", &tab, 80, ep(80, "auto", true), 0, false, want{kind: routeOpaque}},
		{"port in our opaque_ports", &tab, 5432, ep(5432, "auto", false), 0, false, want{kind: routeOpaque}},
		{"http1 service still detected outbound", &tab, 80, ep(80, "http1", false), 0, false, want{kind: routeDetect}},
	}
	for _, tc := range out {
		t.Run("outbound/"+tc.name, func(t *testing.T) {
			r := tc.tab.outbound(dst(tc.port), tc.d, tc.proto, tc.detected)
			got := want{kind: r.kind, reason: r.reason, proto: r.proto}
			if got != tc.want {
				t.Fatalf("route = %+v (%s), want %+v (%s)", got, got.kind, tc.want, tc.want.kind)
			}
			if r.dir != dirOutbound {
				t.Errorf("direction %q", r.dir)
			}
			switch r.kind {
			case routePassthrough:
				if r.target != dst(tc.port) {
					t.Errorf("passthrough target %v, want the original destination", r.target)
				}
			case routeOpaque, routeHTTP:
				if r.ep.Addr != tc.d.Endpoint.Addr || r.ep.Identity != tc.d.Endpoint.Identity {
					t.Errorf("endpoint %+v, want %+v", r.ep, tc.d.Endpoint)
				}
			}
		})
	}

	svcs, err := buildServices([]LocalService{
		{Name: "web", Port: 80},
		{Name: "api", Port: 81, Protocol: "http1", Target: netip.MustParseAddrPort("10.0.0.5:8081")},
		{Name: "grpc", Port: 82, Protocol: "http2"},
		{Name: "raw", Port: 83, Protocol: "opaque"},
		{Name: "db", Port: 5432},
	}, PolicyAllUnauthenticated)
	if err != nil {
		t.Fatal(err)
	}
	local := netip.MustParseAddr("198.18.0.2")
	in := []struct {
		name     string
		dst      netip.AddrPort
		proto    appProtocol
		detected bool
		want     want
		target   netip.AddrPort
	}{
		{"auto service detects first", netip.AddrPortFrom(local, 80), 0, false, want{kind: routeDetect}, netip.MustParseAddrPort("127.0.0.1:80")},
		{"detected HTTP/1", netip.AddrPortFrom(local, 80), protoHTTP1, true, want{kind: routeInboundHTTP, proto: protoHTTP1}, netip.MustParseAddrPort("127.0.0.1:80")},
		{"detected opaque", netip.AddrPortFrom(local, 80), protoOpaque, true, want{kind: routeInboundTCP}, netip.MustParseAddrPort("127.0.0.1:80")},
		{"declared http1: no detection, own target", netip.AddrPortFrom(local, 81), 0, false, want{kind: routeInboundHTTP, proto: protoHTTP1}, netip.MustParseAddrPort("10.0.0.5:8081")},
		{"declared http2", netip.AddrPortFrom(local, 82), 0, false, want{kind: routeInboundHTTP, proto: protoHTTP2}, netip.MustParseAddrPort("127.0.0.1:82")},
		{"declared opaque", netip.AddrPortFrom(local, 83), 0, false, want{kind: routeInboundTCP}, netip.MustParseAddrPort("127.0.0.1:83")},
		{"opaque port", netip.AddrPortFrom(local, 5432), 0, false, want{kind: routeInboundTCP}, netip.MustParseAddrPort("127.0.0.1:5432")},
		{"sent to loopback: the service's target still", netip.MustParseAddrPort("127.0.0.1:81"), 0, false, want{kind: routeInboundHTTP, proto: protoHTTP1}, netip.MustParseAddrPort("10.0.0.5:8081")},
		{"undeclared port: its own address", netip.AddrPortFrom(local, 9000), 0, false, want{kind: routeInboundTCP}, netip.AddrPortFrom(local, 9000)},
		{"undeclared loopback port refused", netip.MustParseAddrPort("127.0.0.1:9000"), 0, false, want{kind: routeDeny, reason: refuseLoopback}, netip.AddrPort{}},
		{"undeclared IPv6 loopback port refused", netip.MustParseAddrPort("[::1]:9000"), 0, false, want{kind: routeDeny, reason: refuseLoopback}, netip.AddrPort{}},
	}
	for _, tc := range in {
		t.Run("redirected/"+tc.name, func(t *testing.T) {
			svc := svcs.byPort[tc.dst.Port()]
			r := tab.inboundRedirected(tc.dst, svc, tc.proto, tc.detected)
			got := want{kind: r.kind, reason: r.reason, proto: r.proto}
			if got != tc.want {
				t.Fatalf("route = %+v (%s), want %+v (%s)", got, got.kind, tc.want, tc.want.kind)
			}
			if r.target != tc.target {
				t.Errorf("target %v, want %v", r.target, tc.target)
			}
			if r.dir != dirInbound {
				t.Errorf("direction %q", r.dir)
			}
			if r.kind == routeInboundTCP && r.svc == nil {
				t.Error("TCP route without a service to authorize against")
			}
		})
	}

	peer := []struct {
		name  string
		port  uint16
		proto appProtocol
		want  want
	}{
		{"declared port, opaque", 80, protoOpaque, want{kind: routePeerTCP}},
		{"declared port, HTTP/1", 81, protoHTTP1, want{kind: routePeerHTTP, proto: protoHTTP1}},
		{"declared port, HTTP/2", 82, protoHTTP2, want{kind: routePeerHTTP, proto: protoHTTP2}},
		{"undeclared port never relayed", 22, protoOpaque, want{kind: routeDeny, reason: refuseUnknownPort}},
		{"undeclared port never relayed (HTTP)", 22, protoHTTP1, want{kind: routeDeny, reason: refuseUnknownPort}},
	}
	for _, tc := range peer {
		t.Run("peer/"+tc.name, func(t *testing.T) {
			svc := svcs.byPort[tc.port]
			r := tab.peer(tc.port, svc, tc.proto)
			got := want{kind: r.kind, reason: r.reason, proto: r.proto}
			if got != tc.want {
				t.Fatalf("route = %+v (%s), want %+v (%s)", got, got.kind, tc.want, tc.want.kind)
			}
			if r.kind != routeDeny && r.target != svc.target {
				t.Errorf("target %v, want the service's %v", r.target, svc.target)
			}
		})
	}
}

func TestIsOpaque(t *testing.T) {
	cfg := DefaultConfig()
	for _, tc := range []struct {
		proto    string
		declared bool
		port     uint16
		want     bool
	}{
		{"auto", false, 8080, false},
		{"opaque", false, 8080, true},
		{"auto", true, 8080, true},
		{"auto", false, 6379, true}, // default list
		{"http1", false, 3306, true},
	} {
		if got := cfg.IsOpaque(tc.proto, tc.declared, tc.port); got != tc.want {
			t.Errorf("IsOpaque(%q, %v, %d) = %v, want %v", tc.proto, tc.declared, tc.port, got, tc.want)
		}
	}
}

func TestWarnLimiter(t *testing.T) {
	now := time.Unix(0, 0)
	l := newWarnLimiter(time.Minute)
	l.now = func() time.Time { return now }
	a, b := netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.0.3")
	if !l.allow(refuseMeshHost, a) || l.allow(refuseMeshHost, a) {
		t.Fatal("want the first warning only")
	}
	if !l.allow(refuseMeshHost, b) || !l.allow(refuseLoopback, a) {
		t.Fatal("another peer or reason was held back")
	}
	now = now.Add(time.Minute)
	if !l.allow(refuseMeshHost, a) {
		t.Fatal("held back after the interval")
	}
	l.max = 4
	for i := range 100 {
		l.allow("r", netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}))
	}
	if len(l.last) > 4 {
		t.Fatalf("limiter holds %d keys, want at most 4", len(l.last))
	}
}

// TestMeshHostRefused: a connection to a mesh host's address at a port
// that is not a meshed service is refused, never passed through in clear.
func TestMeshHostRefused(t *testing.T) {
	backend := echoServer(t)
	a, _, _ := meshPair(t, []LocalService{{Name: "db", Port: 5432, Target: backend}}, proxyOpts{}, proxyOpts{})
	c := a.dialOut(t, appAddr(9999))
	c.Write([]byte("secret"))
	if !refused(c) {
		t.Fatal("connection to a mesh host's undeclared port was not refused")
	}
	if got := metric(t, a.reg, "tcp_refused_total", map[string]string{"direction": "outbound", "reason": refuseMeshHost}); got != 1 {
		t.Errorf("tcp_refused_total{mesh_host} = %v, want 1", got)
	}
	if got := metric(t, a.reg, "tcp_open_total", nil); got != 0 {
		t.Errorf("tcp_open_total = %v, want 0 (nothing relayed)", got)
	}
	// Its declared service still works.
	c = a.dialOut(t, appAddr(5432))
	c.Write([]byte("ok"))
	c.CloseWrite()
	if got, _ := io.ReadAll(c); string(got) != "ok" {
		t.Fatalf("declared service: %q", got)
	}
}
