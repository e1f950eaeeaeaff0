package discovery

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// TestSnapshotIncremental changes a catalog a few hosts at a time (new
// version, health flip, address moved or shared, service added or dropped,
// host gone or new) and checks that each snapshot built from the previous
// one answers exactly like one built from scratch.
func TestSnapshotIncremental(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	svcNames := []string{"web", "db", "cache", "api", "queue", "auth"}
	entry := func(node string, version uint64) *NodeEntry {
		e := &NodeEntry{
			Node:      node,
			Addrs:     []netip.Addr{netip.AddrFrom4([4]byte{198, 18, 0, byte(1 + rng.IntN(40))})},
			ProxyPort: 4143,
			Identity:  "spiffe://t/node/" + node,
			Version:   version,
		}
		if rng.IntN(5) == 0 {
			e.Addrs = append(e.Addrs, netip.AddrFrom4([4]byte{198, 19, 0, byte(1 + rng.IntN(40))}))
		}
		for i, name := range svcNames {
			if rng.IntN(2) == 0 {
				continue
			}
			h := HealthPassing
			if rng.IntN(4) == 0 {
				h = HealthFailing
			}
			e.Services = append(e.Services, ServiceEntry{Name: name, Port: uint16(8000 + i), Health: h, Weight: 100, Identity: "spiffe://t/svc/" + name})
		}
		return e
	}
	live := map[string]*NodeEntry{}
	for i := range 30 {
		name := fmt.Sprintf("h%02d", i)
		live[name] = entry(name, 1)
	}
	list := func() []*NodeEntry {
		out := make([]*NodeEntry, 0, len(live))
		for _, e := range live {
			out = append(out, e)
		}
		return out
	}
	prev := buildSnapshot(nil, list())
	whole := 0
	for step := range 400 {
		// One to three hosts change: few enough that the snapshot is
		// patched, not rebuilt.
		updates := map[string]*NodeEntry{}
		for range 1 + rng.IntN(3) {
			name := fmt.Sprintf("h%02d", rng.IntN(40))
			switch e := live[name]; {
			case e != nil && rng.IntN(6) == 0:
				delete(live, name)
			case e != nil:
				live[name] = entry(name, e.Version+1)
			default:
				live[name] = entry(name, 1)
			}
			updates[name] = live[name]
		}
		if rng.IntN(4) == 0 {
			// A host recorded as changed that did not change.
			for name, e := range live {
				updates[name] = e
				break
			}
		}
		// Every other step patches from the changed hosts, as rebuild
		// does between full rebuilds; the others diff the whole list.
		var got *snapshot
		if step%2 == 0 {
			got = patchSnapshot(prev, updates)
		} else {
			got = buildSnapshot(prev, list())
		}
		want := buildSnapshot(nil, list())
		compareSnapshots(t, step, got, want)
		if got != prev && !patched(prev, got) {
			whole++
		}
		prev = got
	}
	if whole > 40 {
		t.Errorf("%d of 400 snapshots were rebuilt whole, not patched", whole)
	}
}

// patched reports whether next was patched from prev rather than built
// whole: a patch shares prev's host list of every address it did not touch
// (buildAll makes every list anew).
func patched(prev, next *snapshot) bool {
	for a, list := range next.byIP {
		if old := prev.byIP[a]; len(old) > 0 && len(list) > 0 && &old[0] == &list[0] {
			return true
		}
	}
	return false
}

var addrs = cmpopts.EquateComparable(netip.Addr{}, netip.AddrPort{})

func compareSnapshots(t *testing.T, step int, got, want *snapshot) {
	t.Helper()
	if diff := cmp.Diff(want.entries(), got.entries(), addrs); diff != "" {
		t.Fatalf("step %d: nodes differ (-scratch +patched):\n%s", step, diff)
	}
	if len(got.svcs) != len(want.svcs) {
		t.Fatalf("step %d: %d services, want %d", step, len(got.svcs), len(want.svcs))
	}
	for name, wl := range want.svcs {
		wall, whealthy := wl.endpoints()
		gall, ghealthy := got.svcs[name].endpoints()
		if diff := cmp.Diff(wall, gall, addrs); diff != "" {
			t.Fatalf("step %d: %s's endpoints differ (-scratch +patched):\n%s", step, name, diff)
		}
		if diff := cmp.Diff(whealthy, ghealthy, addrs); diff != "" {
			t.Fatalf("step %d: %s's healthy endpoints differ (-scratch +patched):\n%s", step, name, diff)
		}
	}
	if got.services != want.services {
		t.Fatalf("step %d: %d service instances, want %d", step, got.services, want.services)
	}
	names := func(s *snapshot) map[netip.Addr][]string {
		out := map[netip.Addr][]string{}
		for a, vs := range s.byIP {
			for _, v := range vs {
				out[a] = append(out[a], v.entry.Node)
			}
			if !slices.IsSorted(out[a]) {
				t.Fatalf("step %d: hosts of %s not in name order: %v", step, a, out[a])
			}
		}
		return out
	}
	if diff := cmp.Diff(names(want), names(got), addrs); diff != "" {
		t.Fatalf("step %d: addresses differ (-scratch +patched):\n%s", step, diff)
	}
	// Every address × port answers the same.
	for a := range want.byIP {
		for port := uint16(8000); port < 8006; port++ {
			ap := netip.AddrPortFrom(a, port)
			g, gok := got.lookup(ap)
			w, wok := want.lookup(ap)
			if gok != wok || !cmp.Equal(g, w, addrs) {
				t.Fatalf("step %d: Lookup(%s) = %v %v, want %v %v", step, ap, g, gok, w, wok)
			}
		}
	}
}
