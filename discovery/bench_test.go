package discovery

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
)

// BenchmarkCatalogConvergence runs 50, 100 and 500 agents (5 services
// each, entries signed) in one process over an
// in-memory transport (memNetwork), with memberlist's LAN timings. Each
// iteration changes one host's services and waits until every host holds
// the new entry. It reports:
//   - join-s: time for the whole cluster to form and every catalog to hold
//     an entry of every host;
//   - ms/converge: time from SetLocal on one host to its entry on all;
//   - B/host/s: gossip bytes sent per host per second during the loop
//     (memberlist's probes and gossip plus the catalog traffic).
func BenchmarkCatalogConvergence(b *testing.B) {
	// 500 hosts take about 12 minutes (joining at a quarter of real
	// time): only on request, VMESH_BENCH_HOSTS=500 (a comma-separated
	// list), not in make bench's quick pass.
	hosts := []int{50, 100, 200}
	if v := os.Getenv("VMESH_BENCH_HOSTS"); v != "" {
		hosts = nil
		for f := range strings.SplitSeq(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 2 {
				b.Fatalf("VMESH_BENCH_HOSTS=%q: want host counts like 100,500", v)
			}
			hosts = append(hosts, n)
		}
	}
	for _, n := range hosts {
		b.Run(fmt.Sprintf("hosts=%d", n), func(b *testing.B) { benchConvergence(b, n) })
	}
}

// joinWave is how many hosts the benchmark starts at once.
const joinWave = 50

// timeScale is how much slower than real time the simulation of n hosts
// runs its protocol: every timer of memberlist and of this package is
// that many times longer. All n agents share this machine's two cores,
// and from about 400 hosts their work in real time (each host's probes,
// gossip rounds and snapshot rebuilds: O(n) per host, so O(n²) in all)
// is more than two cores can do: probes then time out for want of CPU,
// hosts are wrongly declared dead, and the simulation measures its own
// starvation. Run k times slower, the same protocol does the same work
// per gossip round with k times the CPU; times are reported divided by k
// and rates multiplied by k (protocol time). At 200 hosts, scale 1 and 4
// agree (BENCHMARKS.md), which checks the method.
func timeScale(n int) time.Duration {
	if s, err := strconv.Atoi(os.Getenv("VMESH_BENCH_TIMESCALE")); err == nil && s > 0 {
		return time.Duration(s)
	}
	return time.Duration(max(1, n/125))
}

// dilate makes memberlist's timers scale times longer.
func dilate(c *memberlist.Config, scale time.Duration) {
	c.ProbeInterval *= scale
	c.ProbeTimeout *= scale
	c.GossipInterval *= scale
	c.GossipToTheDeadTime *= scale
	c.PushPullInterval *= scale
	c.TCPTimeout *= scale
}

func benchConvergence(b *testing.B, n int) {
	scale := timeScale(n)
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
	// Every agent here shares one heap and two cores: with the default
	// GOGC the collector took 40-55 % of the CPU at 500 hosts, time that
	// real hosts (each with its own heap and cores) do not lose to each
	// other. A larger GOGC, bounded by a memory limit, keeps the
	// simulation's CPU for the agents' own work.
	defer debug.SetGCPercent(debug.SetGCPercent(400))
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(14 << 30))
	if path := os.Getenv("VMESH_BENCH_CPUPROFILE"); path != "" {
		// The first minute's profile: the cluster forming, which is where
		// a large simulation spends (or runs out of) its CPU.
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
		stop := time.AfterFunc(time.Minute, func() { pprof.StopCPUProfile(); f.Close() })
		defer func() {
			if stop.Stop() {
				pprof.StopCPUProfile()
				f.Close()
			}
		}()
	}
	start := time.Now()
	for i := range agents {
		regs[i] = prometheus.NewRegistry()
		name := fmt.Sprintf("host-%03d", i)
		signer := ca.issue(name, "web", "db", "cache", "api", "queue")
		cfg := DefaultConfig()
		cfg.BindAddr = netip.MustParseAddrPort("127.0.0.1:0")
		cfg.RetryInterval *= scale
		d, err := New(Options{
			Tune:          func(c *memberlist.Config) { dilate(c, scale) },
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
		d.timeScale = scale
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
		if i%joinWave == joinWave-1 {
			// Hosts join in waves, the next once the first host holds
			// this one's entries: 500 hosts joining within a second made
			// the first host answer 500 full-catalog push/pulls at once
			// (about 650 KB each with the certificates), which on two
			// shared cores starved every failure detector. Real fleets
			// do not start 500 agents in the same second either.
			waitBench(b, 120*time.Second*scale, func() bool { return len(agents[0].snap.Load().views) == i+1 })
			if testing.Verbose() {
				fmt.Fprintf(os.Stderr, "%s: %d agents started\n", time.Since(start).Round(time.Second), i+1)
			}
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
	// The cluster has formed when every host holds an entry of every host.
	// (Not necessarily the newest: an update that a host missed both as a
	// broadcast and in metadata, under the packet loss of 500 hosts
	// joining at once, waits for a push/pull, which memberlist spaces
	// 120-150 s apart at this size.) Hosts seen complete are skipped until
	// all are (the harness must not take the CPU the agents need); then
	// one full pass confirms.
	complete := make([]bool, n)
	allConverged := func() bool {
		holds := func(d *Discovery) bool { return len(d.snap.Load().views) == n }
		for i, d := range agents {
			if !complete[i] {
				if !holds(d) {
					return false
				}
				complete[i] = true
			}
		}
		for i, d := range agents {
			if !holds(d) {
				complete[i] = false
				return false
			}
		}
		return true
	}
	progress := time.Now()
	waitBench(b, 300*time.Second*scale, func() bool {
		if testing.Verbose() && time.Since(progress) > 5*time.Second {
			progress = time.Now()
			lo, sum, alive := n, 0, int64(0)
			for _, d := range agents {
				c := len(d.snap.Load().views)
				lo, sum = min(lo, c), sum+c
				alive += d.numAlive.Load()
			}
			fmt.Fprintf(os.Stderr, "%s: catalog sizes min %d avg %d of %d; alive avg %d; %d goroutines\n",
				time.Since(start).Round(time.Second), lo, sum/n, n, alive/int64(n), runtime.NumGoroutine())
			stale, example := 0, ""
			for _, d := range agents {
				for _, o := range agents {
					want := o.snap.Load().selfVersion(o.name)
					if got := d.snap.Load().selfVersion(o.name); got < want {
						stale++
						if example == "" {
							example = fmt.Sprintf("%s holds %s at version %d, want %d", d.name, o.name, got, want)
						}
					}
				}
			}
			if stale > 0 {
				fmt.Fprintf(os.Stderr, "  %d entries older than their owner's, e.g. %s\n", stale, example)
			}
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
	// The join's tail (entries a host missed, pulled on anti-entropy; the
	// last joins' push/pulls) settles for a while (protocol time) before
	// the bytes are counted: they are the cluster's steady traffic plus
	// the changes'.
	time.Sleep(10 * time.Second * scale)
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
		waitBench(b, 30*time.Second*scale, func() bool { return converged(d.name, v) })
		total += time.Since(began)
	}
	elapsed := time.Since(t0).Seconds()
	k := float64(scale)
	b.ReportMetric(k, "timescale")
	b.ReportMetric(joined.Seconds()/k, "join-s")
	b.ReportMetric(float64(total.Milliseconds())/float64(i)/k, "ms/converge")
	b.ReportMetric((sent()-bytes0)/float64(n)/elapsed*k, "B/host/s")
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
	if v := s.views[node]; v != nil {
		return v.entry.Version
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
