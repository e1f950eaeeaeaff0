package discovery

import (
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/vmesh/vmesh/internal/testbed"
)

// nsTransport is the gossip transport (UDP/TCP) living in a test bed host's
// network namespace: its listeners are bound there, and its dials are made
// from there (memberlist dials from goroutines that run in the machine's
// namespace otherwise).
type nsTransport struct {
	*netTransport
	h *testbed.Host
}

func newNSTransport(t *testing.T, h *testbed.Host) memberlist.Transport {
	var nt *netTransport
	err := h.Do(func() (err error) {
		nt, err = newNetTransport(netip.AddrPortFrom(h.Addr, 7946), log.New(io.Discard, "", 0))
		return err
	})
	if err != nil {
		t.Fatalf("%s: gossip transport: %v", h.Name, err)
	}
	return &nsTransport{netTransport: nt, h: h}
}

func (t *nsTransport) DialTimeout(addr string, timeout time.Duration) (c net.Conn, err error) {
	err = t.h.Do(func() error {
		c, err = t.netTransport.DialTimeout(addr, timeout)
		return err
	})
	return c, err
}

func (t *nsTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	return t.DialTimeout(a.Addr, timeout)
}

// TestPartitionHealsOnTestbed runs four agents on four network namespaces,
// cuts the network between two halves with iptables (testbed Cut), changes a
// host's services during the partition, heals, and waits for every catalog to
// hold every host's latest entry.
func TestPartitionHealsOnTestbed(t *testing.T) {
	bed := testbed.New(t, 4)
	agents := make([]*agent, len(bed.Hosts))
	for i, h := range bed.Hosts {
		a := &agent{t: t, i: i, name: h.Name, addr: h.Addr, port: 7946,
			dbPath: filepath.Join(t.TempDir(), "state.db")}
		a.newTransport = func() memberlist.Transport { return newNSTransport(t, h) }
		agents[i] = a
		if i == 0 {
			a.start()
		} else {
			a.start(agents[0].gossipAddr())
		}
		// Health checks dial from the machine's namespace and fail here; the
		// test follows entry versions, not health.
		if err := a.d.SetLocal([]Service{{Name: "svc", Port: 8080}}); err != nil {
			t.Fatal(err)
		}
	}
	converged := func() bool {
		for _, a := range agents {
			for _, o := range agents {
				want := entryOf(o.d, o.name)
				if memberState(a.d, o.name) != StateAlive || entryOf(a.d, o.name).Version != want.Version {
					return false
				}
			}
		}
		return true
	}
	took := waitFor(t, 15*time.Second, "cluster formed, catalogs converged", converged)
	t.Logf("test bed: 4 hosts joined and converged in %s", took)

	left, right := bed.Hosts[:2], bed.Hosts[2:]
	for _, x := range left {
		for _, y := range right {
			bed.Cut(t, x, y)
		}
	}
	start := time.Now()
	waitFor(t, 20*time.Second, "each half holds the other dead", func() bool {
		for _, a := range agents[:2] {
			for _, b := range agents[2:] {
				if memberState(a.d, b.name) != StateDead || memberState(b.d, a.name) != StateDead {
					return false
				}
			}
		}
		return true
	})
	t.Logf("test bed partition: each half holds the other dead after %s", time.Since(start))
	// The snapshot follows the member states within a rebuild gap.
	waitFor(t, 2*time.Second, fmt.Sprintf("%s's catalog to hold only its half's 2 hosts", agents[0].name), func() bool {
		return len(agents[0].d.Catalog()) == 2
	})
	if err := agents[3].d.SetLocal([]Service{{Name: "svc", Port: 8080}, {Name: "extra", Port: 8081}}); err != nil {
		t.Fatal(err)
	}

	for _, x := range left {
		for _, y := range right {
			bed.Heal(t, x, y)
		}
	}
	start = time.Now()
	waitFor(t, 30*time.Second, "catalogs reconverged after healing", func() bool {
		return converged() && len(entryOf(agents[0].d, agents[3].name).Services) == 2
	})
	t.Logf("test bed partition healed: all alive, catalogs converged after %s", time.Since(start))
}
