package discovery

import (
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// gauge reads metric name{label=value} (label "" for none) from r.
func gatherValue(t *testing.T, r *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	mfs, err := r.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := label == ""
			for _, l := range m.GetLabel() {
				match = match || (l.GetName() == label && l.GetValue() == value)
			}
			if !match {
				continue
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			}
		}
	}
	t.Fatalf("no metric %s{%s=%q}", name, label, value)
	return 0
}

func TestRejectedPayloadsAndGauges(t *testing.T) {
	reg := prometheus.NewRegistry()
	cfg := DefaultConfig()
	d, err := New(Options{Config: cfg, NodeName: "a", AdvertiseAddr: netip.MustParseAddr("127.0.0.1"),
		ProxyPort: 4143, TrustDomain: "test.example", Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.SetLocal([]Service{{Name: "web", Port: 8080}, {Name: "db", Port: 5432, Protocol: ProtocolOpaque}}); err != nil {
		t.Fatal(err)
	}
	g := &delegate{d}
	g.NotifyMsg([]byte{wireFormat, msgEntry, 0xff})                                            // truncated
	g.NotifyMsg(append([]byte{wireFormat, msgNotice, 1, 0xff, 0x7f}, make([]byte, 0x3fff)...)) // long string
	g.MergeRemoteState([]byte("not a state"), false)
	g.MergeRemoteState(encodeState([][]byte{{wireFormat, msgEntry}}, time.Time{}), false)

	if got := gatherValue(t, reg, "gossip_rejected_total", "reason", rejectMalformed); got != 3 {
		t.Errorf("gossip_rejected_total{reason=malformed} = %v, want 3", got)
	}
	if got := gatherValue(t, reg, "gossip_rejected_total", "reason", rejectOversized); got != 1 {
		t.Errorf("gossip_rejected_total{reason=oversized} = %v, want 1", got)
	}
	if got := gatherValue(t, reg, "gossip_members", "state", StateAlive); got != 1 {
		t.Errorf("gossip_members{state=alive} = %v, want 1 (itself)", got)
	}
	if got := gatherValue(t, reg, "catalog_entries", "", ""); got != 1 {
		t.Errorf("catalog_entries = %v, want 1", got)
	}
	if got := gatherValue(t, reg, "catalog_services", "", ""); got != 2 {
		t.Errorf("catalog_services = %v, want 2", got)
	}
	// Its own services are in its catalog, unhealthy until checked.
	ep, ok := d.Lookup(netip.MustParseAddrPort("127.0.0.1:5432"))
	if !ok || ep.Protocol != ProtocolOpaque || ep.Healthy || ep.Identity != "spiffe://test.example/svc/db" {
		t.Errorf("Lookup(own db) = %+v, %v", ep, ok)
	}
}

// An entry whose version is far ahead of this host's clock would hide that
// host's real updates for good: it is refused and counted; one within the
// allowed skew is taken.
func TestFutureVersionRefused(t *testing.T) {
	reg := prometheus.NewRegistry()
	d, err := New(Options{Config: DefaultConfig(), NodeName: "a", AdvertiseAddr: netip.MustParseAddr("127.0.0.1"),
		ProxyPort: 4143, TrustDomain: "test.example", Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	forged := NodeEntry{Node: "b", Version: ^uint64(0), Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.2")}, ProxyPort: 4143}
	d.mergeEntry(message{typ: msgEntry, entry: forged}, encodeEntry(&forged), false)
	if got := gatherValue(t, reg, "gossip_rejected_total", "reason", rejectFuture); got != 1 {
		t.Errorf("gossip_rejected_total{reason=%s} = %v, want 1", rejectFuture, got)
	}
	d.mu.Lock()
	_, kept := d.entries["b"]
	d.mu.Unlock()
	if kept {
		t.Fatal("entry with a version from the future was kept")
	}
	ok := NodeEntry{Node: "b", Version: uint64(time.Now().UnixNano()), Addrs: forged.Addrs, ProxyPort: 4143}
	d.mergeEntry(message{typ: msgEntry, entry: ok}, encodeEntry(&ok), false)
	d.mu.Lock()
	_, kept = d.entries["b"]
	d.mu.Unlock()
	if !kept {
		t.Fatal("entry with a current version was refused")
	}
}
