// Package names gives every service in the mesh a stable virtual IP (VIP)
// and answers DNS for <service>.<domain>, so apps call services by name.
//
// A service's VIP is derived from its name alone: the FNV-1a hash of the
// name picks an address in the VIP range, the same on every host, with no
// coordination. Two names hashing to the same address are resolved by
// name order: the names are placed in sorted order, and a name whose
// address is taken probes the hash of name#1, name#2, ... in turn. Every
// host that sees the same set of services therefore agrees; a collision
// (about 1 in 50,000 for 1,000 services in 240.0.0.0/4) can move the later
// name's VIP when a new, earlier-sorted name takes its address — DNS TTLs
// are short for that reason.
package names

import (
	"hash/fnv"
	"math/big"
	"net/netip"
	"slices"
	"strconv"
)

// DefaultRange is the IPv4 VIP range: class E, never routed on real
// networks (Consul and Kuma use it too).
var DefaultRange = netip.MustParsePrefix("240.0.0.0/4")

// Table maps service names to VIPs and back. It is immutable.
type Table struct {
	prefix netip.Prefix
	byName map[string]netip.Addr
	byAddr map[netip.Addr]string
}

// NewTable places every name in prefix (see the package doc). Duplicate
// names are placed once.
func NewTable(prefix netip.Prefix, names []string) *Table {
	t := &Table{prefix: prefix.Masked(), byName: make(map[string]netip.Addr, len(names)), byAddr: make(map[netip.Addr]string, len(names))}
	sorted := slices.Clone(names)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	for _, n := range sorted {
		for i := 0; ; i++ {
			key := n
			if i > 0 {
				key = n + "#" + strconv.Itoa(i)
			}
			a := t.addr(key)
			if _, taken := t.byAddr[a]; taken || !a.IsValid() {
				if i > 64 {
					break // a full range: leave the name without a VIP
				}
				continue
			}
			t.byName[n], t.byAddr[a] = a, n
			break
		}
	}
	return t
}

// addr hashes key to an address of the prefix, avoiding its first and last.
func (t *Table) addr(key string) netip.Addr {
	h := fnv.New64a()
	h.Write([]byte(key))
	sum := h.Sum64()
	bits := t.prefix.Addr().BitLen() - t.prefix.Bits()
	if bits < 2 {
		return netip.Addr{}
	}
	size := new(big.Int).Lsh(big.NewInt(1), uint(bits))
	size.Sub(size, big.NewInt(2)) // not the first nor the last address
	off := new(big.Int).Mod(new(big.Int).SetUint64(sum), size)
	off.Add(off, big.NewInt(1))
	base := new(big.Int).SetBytes(t.prefix.Addr().AsSlice())
	base.Add(base, off)
	b := base.FillBytes(make([]byte, t.prefix.Addr().BitLen()/8))
	a, _ := netip.AddrFromSlice(b)
	if t.prefix.Addr().Is4() {
		a = a.Unmap()
	}
	return a
}

// VIP returns the service's VIP.
func (t *Table) VIP(service string) (netip.Addr, bool) {
	a, ok := t.byName[service]
	return a, ok
}

// Service returns the service whose VIP is a.
func (t *Table) Service(a netip.Addr) (string, bool) {
	if t == nil || !t.prefix.Contains(a) {
		return "", false
	}
	s, ok := t.byAddr[a]
	return s, ok
}

// Prefix returns the VIP range.
func (t *Table) Prefix() netip.Prefix { return t.prefix }
