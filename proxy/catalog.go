package proxy

import "net/netip"

// Catalog tells the outbound proxy what an address is. node adapts the
// discovery catalog to it. Safe for concurrent use, never blocks (an
// in-memory lookup).
type Catalog interface {
	// Resolve says what an outbound original destination is.
	Resolve(dst netip.AddrPort) Destination
	// Endpoints returns the endpoints of a service (all of them, healthy or
	// not, each with Healthy set) and a generation that changes whenever
	// the set or any field changes, so a balancer can refresh lazily. The
	// slice is shared and must not be modified.
	Endpoints(service string) (eps []Endpoint, gen uint64)
}

// DestKind is what the mesh knows about an outbound destination.
type DestKind uint8

// Destination kinds.
const (
	// DestUnknown was never part of the mesh: Config.OutboundUnknown
	// applies (passthrough in clear, or refused).
	DestUnknown DestKind = iota
	// DestMeshHost is an address of a mesh host (any member ever seen)
	// with no meshed service at that port, or whose entry is gone: always
	// refused, never passed through in clear.
	DestMeshHost
	// DestEndpoint is one host's declared service port: that endpoint only.
	DestEndpoint
	// DestService is a service virtual IP: balanced over
	// Catalog.Endpoints(Service).
	DestService
)

func (k DestKind) String() string {
	switch k {
	case DestMeshHost:
		return "mesh_host"
	case DestEndpoint:
		return "endpoint"
	case DestService:
		return "service"
	}
	return "unknown"
}

// Destination is what Catalog.Resolve says an address is.
type Destination struct {
	Kind     DestKind
	Endpoint Endpoint // DestEndpoint
	Service  string   // DestService (and DestEndpoint: Endpoint.Service)
}

// Endpoint is one service port on one mesh host.
type Endpoint struct {
	Node      string         // host name, for logs
	Service   string         // service name; the client proxy sends it as SNI
	Addr      netip.AddrPort // application address
	ProxyAddr netip.AddrPort // the peer's inbound proxy, e.g. 198.18.0.2:4143; invalid = not reachable through the mesh
	Identity  string         // expected server SPIFFE ID, spiffe://td/svc/NAME
	Protocol  string         // "auto", "http1", "http2" or "opaque"
	// Opaque says the endpoint's host declared the port opaque (its
	// opaque_ports list); see IsOpaque.
	Opaque  bool
	Healthy bool
	Weight  int               // for load balancing, 1-1000
	Labels  map[string]string // shared, read-only
	Local   bool              // this host's own endpoint
}
