package proxy

import (
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// Every connection's route is decided here, once, as a value: a pure
// function of the original destination, what the catalog says it is (or the
// local service at that port), the configuration and the detected protocol.
// One handler per route kind carries it out (handleRoute). Whether a port is
// opaque is decided here and nowhere else (IsOpaque).

// routeKind is what the proxy does with a connection.
type routeKind uint8

const (
	// routeDeny closes the connection; reason is the tcp_refused_total
	// reason.
	routeDeny routeKind = iota
	// routeDetect reads the first bytes (detect), then decides again with
	// the protocol.
	routeDetect
	// routePassthrough relays outbound plain TCP to dst (a destination
	// that was never part of the mesh).
	routePassthrough
	// routeOpaque carries an outbound connection to a meshed endpoint as
	// opaque bytes over mTLS.
	routeOpaque
	// routeHTTP proxies an outbound connection's requests one by one
	// (proto says HTTP/1 or HTTP/2) to a meshed endpoint.
	routeHTTP
	// routePeerTCP relays a peer proxy's opaque stream (transport header)
	// to a local service.
	routePeerTCP
	// routePeerHTTP serves a peer proxy's requests to a local service.
	routePeerHTTP
	// routeInboundTCP relays an unmeshed client's redirected connection to
	// a local service (or, undeclared, its port), authorized once.
	routeInboundTCP
	// routeInboundHTTP serves an unmeshed client's redirected connection's
	// requests to a local service one by one, each authorized.
	routeInboundHTTP
)

func (k routeKind) String() string {
	return [...]string{"deny", "detect", "passthrough", "opaque", "http", "peer_tcp", "peer_http", "inbound_tcp", "inbound_http"}[k]
}

// route is the decision for one connection.
type route struct {
	kind   routeKind
	dir    string         // dirInbound or dirOutbound, for metrics and logs
	reason string         // routeDeny: the tcp_refused_total reason
	proto  appProtocol    // HTTP routes: the app's protocol
	dst    netip.AddrPort // the original destination
	ep     Endpoint       // outbound meshed routes: the endpoint (balanced: a representative)
	// balanced: the destination is a service VIP; each request (HTTP) or
	// connection (TCP) picks its endpoint of service ep.Service.
	balanced bool
	svc      *localService  // inbound routes: the service (authorization, labels)
	target   netip.AddrPort // inbound routes and passthrough: what the proxy dials
}

// routeTable holds the configuration routes depend on. It never changes
// after New.
type routeTable struct {
	opaque      map[uint16]bool // Config.OpaquePorts
	denyUnknown bool            // Config.OutboundUnknown == "deny"
	defPolicy   Policy          // Config.DefaultPolicy, for undeclared ports
}

func newRouteTable(cfg Config) routeTable {
	t := routeTable{
		opaque:      make(map[uint16]bool, len(cfg.OpaquePorts)),
		denyUnknown: cfg.OutboundUnknown == "deny",
		defPolicy:   cfg.DefaultPolicy,
	}
	for _, p := range cfg.OpaquePorts {
		t.opaque[p] = true
	}
	return t
}

// IsOpaque reports whether connections to a service port skip protocol
// detection: the service's protocol is "opaque", its host declared the port
// opaque (declared), or the port is in c.OpaquePorts. node uses it for the
// opaque flag it gossips for its own services; the proxy uses it for every
// route.
func (c *Config) IsOpaque(protocol string, declared bool, port uint16) bool {
	return opaqueRule(protocol, declared, slices.Contains(c.OpaquePorts, port))
}

func (t *routeTable) isOpaque(protocol string, declared bool, port uint16) bool {
	return opaqueRule(protocol, declared, t.opaque[port])
}

// opaqueRule is the one rule: opaque by protocol, by the endpoint host's
// declaration, or by this host's opaque_ports.
func opaqueRule(protocol string, declared, listed bool) bool {
	return protocol == "opaque" || declared || listed
}

// Refusal reasons of routes (label "reason" of tcp_refused_total), besides
// those in metrics.go.
const (
	refuseMeshHost   = "mesh_host"            // a mesh host's address with no meshed service there
	refuseNoBalance  = "service_unknown"      // a service VIP whose service has no endpoint
	refuseNoEndpoint = "no_endpoint"          // a service VIP whose endpoints all failed
	refuseLoopback   = "loopback_destination" // an inbound redirect to a loopback address
)

// outbound decides an outbound connection's route. detected says whether
// proto is the result of protocol detection (else the route may be
// routeDetect).
func (t *routeTable) outbound(dst netip.AddrPort, d Destination, proto appProtocol, detected bool) route {
	r := route{dir: dirOutbound, dst: dst}
	switch d.Kind {
	case DestUnknown:
		if t.denyUnknown {
			return deny(r, refuseUnknownDst)
		}
		r.kind, r.target = routePassthrough, dst
		return r
	case DestMeshHost:
		return deny(r, refuseMeshHost)
	case DestService:
		// A service VIP: balanced over Catalog.Endpoints (balance.go).
		// d.Endpoint is a representative endpoint (its protocol); without
		// one the service has no endpoint at all.
		if d.Endpoint.Service == "" {
			return deny(r, refuseNoBalance)
		}
		r.balanced = true
	case DestEndpoint:
	default:
		return deny(r, refuseUnknownDst)
	}
	ep := d.Endpoint
	if !ep.ProxyAddr.IsValid() && !r.balanced {
		// A mesh host's endpoint that cannot be reached through the mesh:
		// never in clear.
		return deny(r, refuseMeshHost)
	}
	r.ep = ep
	switch {
	case t.isOpaque(ep.Protocol, ep.Opaque, dst.Port()):
		r.kind = routeOpaque
	case !detected:
		r.kind = routeDetect
	case proto == protoOpaque:
		r.kind = routeOpaque
	default:
		r.kind, r.proto = routeHTTP, proto
	}
	return r
}

// inboundRedirected decides the route of an unmeshed client's connection
// that the PREROUTING redirect sent to the inbound listener. svc is the
// local service declared at dst's port (nil if none). A declared service is
// always reached at its own target, never at an address taken from the
// packet; an undeclared port (capture_all_inbound) is reached at dst unless
// dst is a loopback address, which no client from outside may reach.
func (t *routeTable) inboundRedirected(dst netip.AddrPort, svc *localService, proto appProtocol, detected bool) route {
	r := route{dir: dirInbound, dst: dst, svc: svc}
	if svc == nil {
		if dst.Addr().Unmap().IsLoopback() {
			return deny(r, refuseLoopback)
		}
		r.kind, r.target = routeInboundTCP, dst
		r.svc = &localService{policy: t.defPolicy}
		return r
	}
	r.target = svc.target
	switch {
	case t.isOpaque(svc.Protocol, false, dst.Port()):
		r.kind = routeInboundTCP
	case svc.Protocol == "http1":
		r.kind, r.proto = routeInboundHTTP, protoHTTP1
	case svc.Protocol == "http2":
		r.kind, r.proto = routeInboundHTTP, protoHTTP2
	case !detected:
		r.kind = routeDetect
	case proto == protoOpaque:
		r.kind = routeInboundTCP
	default:
		r.kind, r.proto = routeInboundHTTP, proto
	}
	return r
}

// peer decides the route of what a peer proxy sends for a local port: an
// opaque stream (proto protoOpaque) or HTTP requests. A port that is not a
// declared local service is refused: the inbound proxy never relays to
// undeclared ports.
func (t *routeTable) peer(port uint16, svc *localService, proto appProtocol) route {
	r := route{dir: dirInbound, dst: netip.AddrPortFrom(netip.Addr{}, port), svc: svc}
	if svc == nil {
		return deny(r, refuseUnknownPort)
	}
	r.target = svc.target
	if proto == protoOpaque {
		r.kind = routePeerTCP
	} else {
		r.kind, r.proto = routePeerHTTP, proto
	}
	return r
}

func deny(r route, reason string) route {
	r.kind, r.reason = routeDeny, reason
	return r
}

// warnLimiter lets a warning through once per key per interval, remembering
// at most max keys (the oldest half forgotten when full).
type warnLimiter struct {
	interval time.Duration
	max      int
	now      func() time.Time

	mu   sync.Mutex
	last map[warnKey]time.Time
}

type warnKey struct {
	reason string
	peer   string
}

func newWarnLimiter(interval time.Duration) *warnLimiter {
	return &warnLimiter{interval: interval, max: 4096, now: time.Now, last: make(map[warnKey]time.Time)}
}

// allow reports whether a warning for (reason, peer) may be logged now.
func (l *warnLimiter) allow(reason string, peer netip.Addr) bool {
	return l.allowKey(reason, addrKey(peer))
}

// allowKey reports whether a warning for (reason, peer) may be logged now;
// peer is an address or an identity.
func (l *warnLimiter) allowKey(reason, peer string) bool {
	k := warnKey{reason, peer}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if t, ok := l.last[k]; ok && now.Sub(t) < l.interval {
		return false
	}
	if len(l.last) >= l.max {
		for k, t := range l.last {
			if now.Sub(t) >= l.interval || len(l.last) > l.max/2 {
				delete(l.last, k)
			}
		}
	}
	l.last[k] = now
	return true
}

// serveRoute carries out r for the accepted connection c, one handler per
// route kind. peeked are the bytes detection read, in bp's pooled buffer,
// which serveRoute returns to the pool.
func (p *Proxy) serveRoute(c *net.TCPConn, r route, peeked []byte, bp *[]byte) {
	switch r.kind {
	case routeHTTP, routeInboundHTTP:
		p.serveHTTPConn(c, peeked, bp, &connInfo{route: r}) // returns bp
		return
	}
	defer putBuf(bp)
	switch r.kind {
	case routeDeny:
		p.refuse(r)
	case routePassthrough:
		p.passthrough(c, r.target)
	case routeOpaque:
		if r.balanced {
			p.outboundBalancedOpaque(c, r, peeked)
		} else {
			p.outboundOpaque(c, r.ep, r.dst, peeked)
		}
	case routeInboundTCP:
		p.inboundTCP(c, r, peeked)
	default:
		p.log.Error("no handler for route", "route", r.kind, "dst", r.dst)
	}
}

// refuse counts a denied route and logs it: at warn, once per (reason,
// address) per minute, when it may be an attack or a mesh host gone
// missing; otherwise at debug.
func (p *Proxy) refuse(r route) {
	p.m.refused.WithLabelValues(r.dir, r.reason).Inc()
	level := slog.LevelWarn
	if r.reason == refuseUnknownDst {
		level = slog.LevelInfo // Config.OutboundUnknown = "deny" doing its job
	}
	p.reportError(level, r.dir, r.reason, addrKey(r.dst.Addr()), r.dir+" connection refused", "dst", r.dst)
}
