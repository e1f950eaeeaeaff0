package discovery

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// BenchmarkCatalogConvergence runs 50, 100 and 500 agents (5 services
// each, entries signed) in one process over an
// in-memory transport (memNetwork), with memberlist's LAN timings. Each
// iteration changes one host's services and waits until every host holds
// the new entry. It reports:
//   - join-s: time for the whole cluster to form and every catalog to hold
//     every host's entry;
//   - ms/converge: time from SetLocal on one host to its entry on all;
//   - B/host/s: gossip bytes sent per host per second during the loop
//     (memberlist's probes and gossip plus the catalog traffic).
func BenchmarkCatalogConvergence(b *testing.B) {
	for _, n := range []int{50, 100, 200, 500} {
		b.Run(fmt.Sprintf("hosts=%d", n), func(b *testing.B) { benchConvergence(b, n) })
	}
}

func benchConvergence(b *testing.B, n int) {
	var network memNetwork
	ca := &testCA{}
	agents := make([]*Discovery, n)
	regs := make([]*prometheus.Registry, n)
	ctx, cancel := context.WithCancel(context.Background())
	defer func() {
		cancel()
		for _, d := range agents {
			if d != nil {
				d.Close()
			}
		}
	}()
	start := time.Now()
	for i := range agents {
		regs[i] = prometheus.NewRegistry()
		name := fmt.Sprintf("host-%03d", i)
		signer := ca.issue(name, "web", "db", "cache", "api", "queue")
		cfg := DefaultConfig()
		cfg.BindAddr = netip.MustParseAddrPort("127.0.0.1:0")
		d, err := New(Options{
			Config:        cfg,
			NodeName:      name,
			AdvertiseAddr: netip.AddrFrom4([4]byte{127, 1, byte(i >> 8), byte(i)}),
			ProxyPort:     4143,
			TrustDomain:   "bench.example",
			Transport:     network.newTransport(),
			Registerer:    regs[i],
			Signer:        signer,
			Verifier:      ca,
		})
		if err != nil {
			b.Fatal(err)
		}
		if i > 0 {
			// Every host joins through the first (joining through a
			// random earlier host, or 20 ms apart, formed the cluster
			// no faster: 100 hosts in 100-117 s against 7-31 s).
			d.cfg.Join = []string{agents[0].LocalAddr().String()}
		}
		err = d.SetLocal(benchServices("v1"))
		if err != nil {
			b.Fatal(err)
		}
		agents[i] = d
		go d.Run(ctx)
		<-d.Ready()
		if testing.Verbose() && i%50 == 49 {
			fmt.Fprintf(os.Stderr, "%s: %d agents started\n", time.Since(start).Round(time.Second), i+1)
		}
	}
	// The harness must cost little next to the agents it watches: one
	// pass over each agent's snapshot per poll, not one per host (that
	// was O(n³) per poll and took a core of its own at 500 hosts).
	converged := func(node string, version uint64) bool {
		for _, d := range agents {
			if entryOfVersion(d, node) < version {
				return false
			}
		}
		return true
	}
	allConverged := func() bool {
		want := make(map[string]uint64, n)
		for _, d := range agents {
			want[d.name] = d.snap.Load().selfVersion(d.name)
		}
		for _, d := range agents {
			s := d.snap.Load()
			if len(s.nodes) != n {
				return false
			}
			for _, e := range s.nodes {
				if e.Version < want[e.Node] {
					return false
				}
			}
		}
		return true
	}
	progress := time.Now()
	waitBench(b, 180*time.Second, func() bool {
		if testing.Verbose() && time.Since(progress) > 5*time.Second {
			progress = time.Now()
			lo, sum, alive := n, 0, int64(0)
			for _, d := range agents {
				c := len(d.Catalog())
				lo, sum = min(lo, c), sum+c
				alive += d.numAlive.Load()
			}
			rej := map[string]float64{}
			for _, r := range regs {
				mfs, _ := r.Gather()
				for _, mf := range mfs {
					if mf.GetName() == "gossip_rejected_total" {
						for _, m := range mf.GetMetric() {
							rej[m.GetLabel()[0].GetValue()] += m.GetCounter().GetValue()
						}
					}
				}
			}
			fmt.Fprintf(os.Stderr, "%s: catalog sizes min %d avg %d of %d; alive avg %d; %d goroutines; rejected %v\n",
				time.Since(start).Round(time.Second), lo, sum/n, n, alive/int64(n), runtime.NumGoroutine(), rej)
		}
		return allConverged()
	})
	joined := time.Since(start)

	sent := func() float64 {
		var s float64
		for _, r := range regs {
			s += counterValue(b, r, "gossip_bytes_total", "out")
		}
		return s
	}
	bytes0, t0 := sent(), time.Now()
	var total time.Duration
	i := 0
	for b.Loop() {
		d := agents[i%n]
		i++
		began := time.Now()
		err := d.SetLocal(benchServices(fmt.Sprintf("v%d", i)))
		if err != nil {
			b.Fatal(err)
		}
		v := d.snap.Load().selfVersion(d.name)
		waitBench(b, 30*time.Second, func() bool { return converged(d.name, v) })
		total += time.Since(began)
	}
	elapsed := time.Since(t0).Seconds()
	b.ReportMetric(joined.Seconds(), "join-s")
	b.ReportMetric(float64(total.Milliseconds())/float64(i), "ms/converge")
	b.ReportMetric((sent()-bytes0)/float64(n)/elapsed, "B/host/s")
}

// benchServices are a host's five services, their entry signed: about the
// size of a real host's.
func benchServices(version string) []Service {
	hc := HealthCheck{Interval: time.Hour}
	return []Service{
		{Name: "web", Port: 8080, Labels: map[string]string{"version": version}, Health: hc},
		{Name: "db", Port: 5432, Protocol: ProtocolOpaque, Health: hc},
		{Name: "cache", Port: 6379, Protocol: ProtocolOpaque, Health: hc},
		{Name: "api", Port: 9000, Protocol: ProtocolHTTP2, Labels: map[string]string{"zone": "a"}, Health: hc},
		{Name: "queue", Port: 5672, Health: hc},
	}
}

func (s *snapshot) selfVersion(node string) uint64 {
	for _, e := range s.nodes {
		if e.Node == node {
			return e.Version
		}
	}
	return 0
}

func entryOfVersion(d *Discovery, node string) uint64 { return d.snap.Load().selfVersion(node) }

func waitBench(b *testing.B, timeout time.Duration, cond func() bool) {
	b.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			b.Fatalf("no convergence within %s", timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// counterValue reads the counter name{dir} from r.
func counterValue(tb testing.TB, r *prometheus.Registry, name, dir string) float64 {
	mfs, err := r.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "dir" && l.GetValue() == dir {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	tb.Fatalf("no metric %s{dir=%q}", name, dir)
	return 0
}
