package names

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
)

func TestVIPsAreStableAndUnique(t *testing.T) {
	var svcs []string
	for i := range 2000 {
		svcs = append(svcs, fmt.Sprintf("svc-%d", i))
	}
	a := NewTable(DefaultRange, svcs)
	// Another host sees the same names in another order.
	shuffled := append([]string(nil), svcs...)
	rand.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
	b := NewTable(DefaultRange, shuffled)
	seen := map[netip.Addr]string{}
	for _, s := range svcs {
		va, ok := a.VIP(s)
		vb, _ := b.VIP(s)
		if !ok || va != vb {
			t.Fatalf("%s: %v vs %v (%v)", s, va, vb, ok)
		}
		if !DefaultRange.Contains(va) {
			t.Fatalf("%s: %v outside %v", s, va, DefaultRange)
		}
		if other, dup := seen[va]; dup {
			t.Fatalf("%s and %s share %v", s, other, va)
		}
		seen[va] = s
		if got, _ := a.Service(va); got != s {
			t.Fatalf("Service(%v) = %q, want %q", va, got, s)
		}
	}
	// Adding a service leaves the others' VIPs alone (no collision here).
	c := NewTable(DefaultRange, append(svcs, "new"))
	for _, s := range svcs {
		x, _ := a.VIP(s)
		y, _ := c.VIP(s)
		if x != y {
			t.Errorf("%s moved from %v to %v when another service appeared", s, x, y)
		}
	}
}

func TestCollisionsResolveByName(t *testing.T) {
	// A /30 holds two usable addresses: three names cannot all fit; two do.
	p := netip.MustParsePrefix("240.0.0.0/30")
	tab := NewTable(p, []string{"b", "a"})
	va, oka := tab.VIP("a")
	vb, okb := tab.VIP("b")
	if !oka || !okb || va == vb {
		t.Fatalf("a=%v b=%v", va, vb)
	}
	if _, ok := tab.Service(netip.MustParseAddr("10.0.0.1")); ok {
		t.Error("an address outside the range names a service")
	}
}

func BenchmarkTable(b *testing.B) {
	var svcs []string
	for i := range 1000 {
		svcs = append(svcs, fmt.Sprintf("svc-%d", i))
	}
	b.ReportAllocs()
	for b.Loop() {
		NewTable(DefaultRange, svcs)
	}
}
