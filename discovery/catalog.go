package discovery

import (
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
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
// published through an atomic pointer, never modified afterwards. A
// snapshot shares what did not change with the one before it (the views of
// unchanged hosts, the endpoint lists of unchanged services), so that one
// host's change costs in proportion to that host's services, not to the
// whole catalog: at 500 hosts a full rebuild on every change was 14 % of
// the agents' CPU and a quarter of the bytes they allocated.
type snapshot struct {
	nodesOnce sync.Once
	nodes     []NodeEntry                // sorted by name, self included; built by entries
	views     map[string]*nodeView       // by node name
	byIP      map[netip.Addr][]*nodeView // hosts holding an address, by name; slices are never appended to in place
	svcs      map[string]*svcList        // by service name
	hosts     map[netip.Addr]struct{}    // addresses of every known member (set by rebuild)
	gen       uint64                     // changes with every snapshot (set by rebuild)
	services  int                        // service instances
}

// nodeView is one entry's endpoints, built once per entry and shared by
// every snapshot that holds the entry.
type nodeView struct {
	entry *NodeEntry
	eps   []Endpoint // service-major: eps[i*len(Addrs)+j] is service i at address j
}

func newNodeView(n *NodeEntry) *nodeView {
	v := &nodeView{entry: n, eps: make([]Endpoint, 0, len(n.Services)*len(n.Addrs))}
	for i := range n.Services {
		svc := &n.Services[i]
		for _, a := range n.Addrs {
			v.eps = append(v.eps, Endpoint{
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
			})
		}
	}
	return v
}

// primary returns the endpoint of service i at the entry's first address:
// the one the service lists hold.
func (v *nodeView) primary(i int) *Endpoint { return &v.eps[i*len(v.entry.Addrs)] }

// lookup returns the view's endpoint listening at addr.
func (v *nodeView) lookup(addr netip.AddrPort) (Endpoint, bool) {
	for i := range v.eps {
		if v.eps[i].Addr == addr {
			return v.eps[i], true
		}
	}
	return Endpoint{}, false
}

// buildSnapshot builds a view from the visible entries, reusing what prev
// (nil for none) holds of the entries that did not change; it returns prev
// itself when nothing changed. Entries are
// shared with the caller's map and must not be modified afterwards (they
// never are: a newer entry replaces an older one whole, and a changed
// entry is a new pointer).
func buildSnapshot(prev *snapshot, entries []*NodeEntry) *snapshot {
	s := &snapshot{views: make(map[string]*nodeView, len(entries))}
	// gone and added are the views of hosts that changed (a changed host
	// is in both).
	var gone, added []*nodeView
	for _, n := range entries {
		var v *nodeView
		if prev != nil {
			if pv := prev.views[n.Node]; pv != nil && pv.entry == n {
				v = pv
			}
		}
		if v == nil {
			v = newNodeView(n)
			added = append(added, v)
		}
		s.views[n.Node] = v
	}
	if prev != nil {
		for name, v := range prev.views {
			if s.views[name] != v {
				gone = append(gone, v)
			}
		}
		if len(gone)+len(added) == 0 {
			return prev // nothing changed
		}
	}
	return s.finish(prev, gone, added)
}

// patchSnapshot returns prev with the hosts in updates changed: each to
// its entry, or out of the view for a nil entry. It costs in proportion to
// the changed hosts' services, not to the catalog. It returns prev itself
// when nothing changed.
func patchSnapshot(prev *snapshot, updates map[string]*NodeEntry) *snapshot {
	var gone, added []*nodeView
	for name, e := range updates {
		old := prev.views[name]
		if old != nil && old.entry == e {
			continue
		}
		if old != nil {
			gone = append(gone, old)
		}
		if e != nil {
			added = append(added, newNodeView(e))
		}
	}
	if len(gone)+len(added) == 0 {
		return prev
	}
	s := &snapshot{views: maps.Clone(prev.views)}
	for _, v := range gone {
		delete(s.views, v.entry.Node)
	}
	for _, v := range added {
		s.views[v.entry.Node] = v
	}
	return s.finish(prev, gone, added)
}

// finish fills in what s derives from its views: from scratch when there
// is no prev or much changed, otherwise by patching prev's.
func (s *snapshot) finish(prev *snapshot, gone, added []*nodeView) *snapshot {
	// Sorted by name, so that patches of byIP and svcs keep node order.
	byName := func(a, b *nodeView) int { return strings.Compare(a.entry.Node, b.entry.Node) }
	slices.SortFunc(gone, byName)
	slices.SortFunc(added, byName)
	if prev == nil || 4*(len(added)+len(gone)) > len(s.views) {
		s.buildAll()
		return s
	}
	s.services = prev.services
	for _, v := range gone {
		s.services -= len(v.entry.Services)
	}
	for _, v := range added {
		s.services += len(v.entry.Services)
	}
	s.byIP = maps.Clone(prev.byIP)
	for _, v := range gone {
		for _, a := range v.entry.Addrs {
			list := slices.DeleteFunc(slices.Clone(s.byIP[a]), func(o *nodeView) bool { return o == v })
			if len(list) == 0 {
				delete(s.byIP, a)
			} else {
				s.byIP[a] = list
			}
		}
	}
	for _, v := range added {
		for _, a := range v.entry.Addrs {
			list := s.byIP[a]
			at, _ := slices.BinarySearchFunc(list, v.entry.Node, func(o *nodeView, name string) int { return strings.Compare(o.entry.Node, name) })
			s.byIP[a] = slices.Insert(slices.Clone(list), at, v)
		}
	}
	// Only the lists of services that a changed host offers (or offered)
	// are replaced; the others are shared with prev, with the endpoints
	// they have built.
	touched := map[string]struct{}{}
	for _, vs := range [][]*nodeView{gone, added} {
		for _, v := range vs {
			for _, svc := range v.entry.Services {
				touched[svc.Name] = struct{}{}
			}
		}
	}
	s.svcs = maps.Clone(prev.svcs)
	for name := range touched {
		var old []*nodeView
		if l := prev.svcs[name]; l != nil {
			old = l.views
		}
		views := make([]*nodeView, 0, len(old)+len(added))
		for _, v := range old {
			if s.views[v.entry.Node] == v {
				views = append(views, v)
			}
		}
		for _, v := range added {
			if v.offers(name) {
				views = append(views, v)
			}
		}
		if len(views) == 0 {
			delete(s.svcs, name)
			continue
		}
		slices.SortFunc(views, func(a, b *nodeView) int { return strings.Compare(a.entry.Node, b.entry.Node) })
		s.svcs[name] = &svcList{name: name, views: views}
	}
	return s
}

// buildAll builds byIP and the service lists from the views.
func (s *snapshot) buildAll() {
	views := slices.SortedFunc(maps.Values(s.views), func(a, b *nodeView) int { return strings.Compare(a.entry.Node, b.entry.Node) })
	s.byIP = make(map[netip.Addr][]*nodeView, len(views))
	s.svcs = make(map[string]*svcList)
	s.services = 0
	for _, v := range views {
		s.services += len(v.entry.Services)
		for _, a := range v.entry.Addrs {
			s.byIP[a] = append(s.byIP[a], v)
		}
		for _, svc := range v.entry.Services {
			if !v.offers(svc.Name) {
				continue
			}
			l := s.svcs[svc.Name]
			if l == nil {
				l = &svcList{name: svc.Name}
				s.svcs[svc.Name] = l
			}
			if n := len(l.views); n == 0 || l.views[n-1] != v {
				l.views = append(l.views, v)
			}
		}
	}
}

// entries returns the snapshot's entries sorted by node, built on first
// use (a change costs no O(hosts) copy unless someone reads the catalog).
func (s *snapshot) entries() []NodeEntry {
	s.nodesOnce.Do(func() {
		s.nodes = make([]NodeEntry, 0, len(s.views))
		for _, v := range s.views {
			s.nodes = append(s.nodes, *v.entry)
		}
		slices.SortFunc(s.nodes, func(a, b NodeEntry) int { return strings.Compare(a.Node, b.Node) })
	})
	return s.nodes
}

// svcList is one service's hosts. Its endpoint lists are built on first
// use (most agents never ask for most services) and shared by every
// snapshot in which the service's hosts did not change.
type svcList struct {
	name         string
	views        []*nodeView // hosts offering the service, in node order
	once         sync.Once
	all, healthy []Endpoint // sorted by node
}

// offers reports whether the view has an endpoint of service name in the
// service lists (at the entry's first address).
func (v *nodeView) offers(name string) bool {
	if len(v.entry.Addrs) == 0 {
		return false
	}
	for _, svc := range v.entry.Services {
		if svc.Name == name {
			return true
		}
	}
	return false
}

// endpoints returns every endpoint of the service and the healthy ones.
func (l *svcList) endpoints() (all, healthy []Endpoint) {
	if l == nil {
		return nil, nil
	}
	l.once.Do(func() {
		for _, v := range l.views {
			for i := range v.entry.Services {
				if v.entry.Services[i].Name != l.name {
					continue
				}
				ep := *v.primary(i)
				l.all = append(l.all, ep)
				if ep.Healthy {
					l.healthy = append(l.healthy, ep)
				}
			}
		}
	})
	return l.all, l.healthy
}

// Lookup returns the endpoint listening at addr, healthy or not. It is cheap
// and safe for concurrent use (a map lookup in an immutable snapshot).
func (d *Discovery) Lookup(addr netip.AddrPort) (Endpoint, bool) {
	return d.snap.Load().lookup(netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port()))
}

func (s *snapshot) lookup(addr netip.AddrPort) (Endpoint, bool) {
	for _, v := range s.byIP[addr.Addr()] {
		if ep, ok := v.lookup(addr); ok {
			return ep, true
		}
	}
	return Endpoint{}, false
}

// Endpoints returns the healthy instances of service, sorted by node. The
// slice is shared: do not modify it.
func (d *Discovery) Endpoints(service string) []Endpoint {
	_, healthy := d.snap.Load().svcs[service].endpoints()
	return healthy
}

// Catalog returns every visible host's entry (alive or suspect hosts, and
// this one), sorted by node name. The entries are shared: do not modify them.
func (d *Discovery) Catalog() []NodeEntry {
	return d.snap.Load().entries()
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
