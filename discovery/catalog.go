package discovery

import (
	"net/netip"
	"slices"
	"strings"
)

// Service protocols.
const (
	ProtocolAuto   = "auto"   // detect HTTP/1, HTTP/2 or opaque per connection
	ProtocolHTTP1  = "http1"  // HTTP/1.x, no detection
	ProtocolHTTP2  = "http2"  // HTTP/2 (prior knowledge), no detection
	ProtocolOpaque = "opaque" // no detection: mTLS and TCP metrics only
)

// Health is the state of a service's health check, as its host last
// reported it.
type Health string

// Health states.
const (
	HealthUnknown Health = "unknown" // not checked yet
	HealthPassing Health = "passing"
	HealthFailing Health = "failing"
)

// Service is one service this host offers, as node declares it with
// SetLocal. Zero fields mean their defaults.
type Service struct {
	// Name of the service. Required.
	Name string
	// Port the service listens on, on this host. Required.
	Port uint16
	// Protocol is one of the Protocol constants. Default ProtocolAuto.
	Protocol string
	// Opaque marks the port as opaque for the proxy even when Protocol is
	// not ProtocolOpaque (e.g. it is in the host's opaque port list). The
	// proxy decides what is opaque (proxy.Config.IsOpaque); discovery only
	// carries the flag.
	Opaque bool
	// Weight for load balancing, 1-1000. Default 100.
	Weight int
	// Labels are free-form facts gossiped with the service.
	Labels map[string]string
	// Identity is the service's SPIFFE ID. Default
	// spiffe://<trust domain>/svc/<name>.
	Identity string
	// Health is how this host checks the service. It is not gossiped.
	Health HealthCheck
	// CheckAddr is where health checks dial the service (with Port).
	// Optional: the zero value means Options.CheckAddr. node sets the
	// address the inbound proxy dials, so healthy means reachable through
	// the mesh. It is not gossiped.
	CheckAddr netip.Addr
}

// ServiceEntry is one service in a host's catalog entry.
type ServiceEntry struct {
	Name     string            `json:"name"`
	Port     uint16            `json:"port"`
	Protocol string            `json:"protocol"`
	Opaque   bool              `json:"opaque"`
	Health   Health            `json:"health"`
	Weight   int               `json:"weight"`
	Identity string            `json:"identity"`
	Labels   map[string]string `json:"labels,omitempty"`
	// VIP is the service's virtual IP, filled in by the agent's API for
	// its callers; it is derived on every host, never gossiped.
	VIP string `json:"vip,omitempty"`
	// DNSName is the service's name in the mesh's DNS ("web.vmesh"),
	// filled in like VIP when the agent serves DNS; never gossiped.
	DNSName string `json:"dns_name,omitempty"`
}

// NodeEntry is one host's catalog entry. Only that host writes it; peers
// keep the one with the highest Version.
type NodeEntry struct {
	Node      string         `json:"node"`
	Addrs     []netip.Addr   `json:"addrs"`
	ProxyPort uint16         `json:"proxy_port"`
	Identity  string         `json:"identity"`
	Version   uint64         `json:"version"`
	Services  []ServiceEntry `json:"services"`
	// Leaving is set in the last entry of a host that is leaving gracefully
	// (it has no services then).
	Leaving bool `json:"leaving,omitempty"`
}

// Endpoint is one service instance as the proxy needs it.
type Endpoint struct {
	Node         string            `json:"node"`
	Service      string            `json:"service"`
	Addr         netip.AddrPort    `json:"addr"`  // where the service listens
	Proxy        netip.AddrPort    `json:"proxy"` // the host's inbound proxy, same IP as Addr
	Protocol     string            `json:"protocol"`
	Opaque       bool              `json:"opaque"`
	Identity     string            `json:"identity"`      // service SPIFFE ID
	NodeIdentity string            `json:"node_identity"` // the SVID the proxy at Proxy presents
	Healthy      bool              `json:"healthy"`
	Weight       int               `json:"weight"`
	Labels       map[string]string `json:"labels,omitempty"` // shared: do not modify
}

// snapshot is an immutable view of the catalog: built on every change,
// published through an atomic pointer, never modified afterwards.
type snapshot struct {
	nodes    []NodeEntry                 // sorted by name, self included
	byAddr   map[netip.AddrPort]Endpoint // every address × port
	bySvc    map[string][]Endpoint       // healthy only, sorted by node
	allBySvc map[string][]Endpoint       // healthy or not, sorted by node
	hosts    map[netip.Addr]struct{}     // addresses of every known member (set by rebuild)
	gen      uint64                      // changes with every snapshot (set by rebuild)
	services int                         // service instances
}

// buildSnapshot builds a view from the visible entries. Entries are shared
// with the caller's map and must not be modified afterwards (they never are:
// a newer entry replaces an older one whole).
func buildSnapshot(entries []*NodeEntry) *snapshot {
	slices.SortFunc(entries, func(a, b *NodeEntry) int { return strings.Compare(a.Node, b.Node) })
	s := &snapshot{
		nodes:    make([]NodeEntry, 0, len(entries)),
		byAddr:   make(map[netip.AddrPort]Endpoint),
		bySvc:    make(map[string][]Endpoint),
		allBySvc: make(map[string][]Endpoint),
	}
	for _, n := range entries {
		s.nodes = append(s.nodes, *n)
		s.services += len(n.Services)
		for i := range n.Services {
			svc := &n.Services[i]
			for j, a := range n.Addrs {
				ep := Endpoint{
					Node:         n.Node,
					Service:      svc.Name,
					Addr:         netip.AddrPortFrom(a, svc.Port),
					Proxy:        netip.AddrPortFrom(a, n.ProxyPort),
					Protocol:     svc.Protocol,
					Opaque:       svc.Opaque,
					Identity:     svc.Identity,
					NodeIdentity: n.Identity,
					Healthy:      svc.Health == HealthPassing,
					Weight:       svc.Weight,
					Labels:       svc.Labels,
				}
				if _, taken := s.byAddr[ep.Addr]; !taken {
					s.byAddr[ep.Addr] = ep
				}
				if j == 0 {
					s.allBySvc[svc.Name] = append(s.allBySvc[svc.Name], ep)
					if ep.Healthy {
						s.bySvc[svc.Name] = append(s.bySvc[svc.Name], ep)
					}
				}
			}
		}
	}
	return s
}

// Lookup returns the endpoint listening at addr, healthy or not. It is cheap
// and safe for concurrent use (a map lookup in an immutable snapshot).
func (d *Discovery) Lookup(addr netip.AddrPort) (Endpoint, bool) {
	addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
	ep, ok := d.snap.Load().byAddr[addr]
	return ep, ok
}

// Endpoints returns the healthy instances of service, sorted by node. The
// slice is shared: do not modify it.
func (d *Discovery) Endpoints(service string) []Endpoint {
	return d.snap.Load().bySvc[service]
}

// Catalog returns every visible host's entry (alive or suspect hosts, and
// this one), sorted by node name. The entries are shared: do not modify them.
func (d *Discovery) Catalog() []NodeEntry {
	return d.snap.Load().nodes
}

// Subscribe returns a channel that receives a value after the catalog
// changes (coalesced: one value may stand for several changes), and a
// function that ends the subscription. Read the new state with Lookup,
// Endpoints or Catalog.
func (d *Discovery) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	d.subMu.Lock()
	d.subs[ch] = struct{}{}
	d.subMu.Unlock()
	return ch, func() {
		d.subMu.Lock()
		delete(d.subs, ch)
		d.subMu.Unlock()
	}
}

func (d *Discovery) notifySubscribers() {
	d.subMu.Lock()
	defer d.subMu.Unlock()
	for ch := range d.subs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}
