package discovery

import "net/netip"

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
	all, _ := s.svcs[service].endpoints()
	return all, s.gen
}
