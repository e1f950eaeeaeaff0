package discovery

import "net/netip"

// memberAddrs returns the addresses of this host and of every member known,
// whatever its state: the entries' addresses and memberlist's.
func memberAddrs(self *NodeEntry, entries map[string]*peerEntry, members map[string]*member) map[netip.Addr]struct{} {
	hosts := make(map[netip.Addr]struct{}, len(entries)+len(members)+len(self.Addrs))
	for _, a := range self.Addrs {
		hosts[a.Unmap()] = struct{}{}
	}
	for _, pe := range entries {
		for _, a := range pe.entry.Addrs {
			hosts[a.Unmap()] = struct{}{}
		}
	}
	for _, m := range members {
		if a := m.addr.Addr(); a.IsValid() {
			hosts[a.Unmap()] = struct{}{}
		}
	}
	return hosts
}

// MemberAddr reports whether a is an address of this host or of any member
// this host has ever seen (alive, suspect, dead or left, and after a
// restart: the addresses are kept in bbolt, bucket "discovery/addrs"). The
// proxy never sends such an address's traffic in clear. It is a lock-free
// read of the snapshot, safe for concurrent use.
func (d *Discovery) MemberAddr(a netip.Addr) bool {
	s := d.snap.Load()
	if s == nil {
		return false
	}
	_, ok := s.hosts[a.Unmap()]
	return ok
}

// ServiceEndpoints returns every visible instance of service, healthy or
// not (Healthy says), sorted by node, and the catalog's generation, which
// changes whenever anything in the catalog may have changed. The slice is
// shared: do not modify it.
func (d *Discovery) ServiceEndpoints(service string) ([]Endpoint, uint64) {
	s := d.snap.Load()
	if s == nil {
		return nil, 0
	}
	return s.allBySvc[service], s.gen
}
