package balance

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

// fakeClock advances only when told.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time      { return c.t }
func (c *fakeClock) add(d time.Duration) { c.t = c.t.Add(d) }
func newClock() *fakeClock               { return &fakeClock{t: time.Unix(1e9, 0)} }
func two(w1, w2 int) []Endpoint {
	return []Endpoint{{Key: "a", Weight: w1, Healthy: true}, {Key: "b", Weight: w2, Healthy: true}}
}

// run makes n sequential requests; latency gives each endpoint's latency.
func run(b *Balancer, clk *fakeClock, n int, latency map[string]time.Duration) map[string]int {
	got := map[string]int{}
	for range n {
		c, ok := b.Pick(nil)
		if !ok {
			panic("no endpoint")
		}
		got[c.Key]++
		l := latency[c.Key]
		clk.add(l)
		c.Observe(l, nil)
		c.Release()
	}
	return got
}

func TestEqualEndpointsShareTheLoad(t *testing.T) {
	clk := newClock()
	b := New(Options{Now: clk.now})
	b.Update(two(100, 100))
	got := run(b, clk, 1000, map[string]time.Duration{"a": time.Millisecond, "b": time.Millisecond})
	if got["a"] < 400 || got["a"] > 600 {
		t.Errorf("equal endpoints: %v, want each 40-60 %%", got)
	}
}

func TestSlowEndpointGetsLess(t *testing.T) {
	clk := newClock()
	b := New(Options{Now: clk.now})
	b.Update(two(100, 100))
	got := run(b, clk, 1000, map[string]time.Duration{"a": time.Millisecond, "b": 21 * time.Millisecond})
	if got["b"] >= 250 {
		t.Errorf("a backend 20 ms slower took %d of 1000 requests, want < 250", got["b"])
	}
}

func TestWeightsAreHonoured(t *testing.T) {
	clk := newClock()
	b := New(Options{Now: clk.now})
	b.Update(two(900, 100))
	// Requests in flight (no observation yet) spread by weight and load.
	got := map[string]int{}
	var open []*Choice
	for range 1000 {
		c, _ := b.Pick(nil)
		got[c.Key]++
		open = append(open, c)
		if len(open) > 20 {
			open[0].Observe(time.Millisecond, nil)
			open[0].Release()
			open = open[1:]
		}
		clk.add(100 * time.Microsecond)
	}
	if got["a"] < 750 {
		t.Errorf("weights 900/100: %v, want most on a", got)
	}
}

func TestUnhealthyAndExcludedAreSkipped(t *testing.T) {
	b := New(Options{})
	b.Update([]Endpoint{{Key: "a", Healthy: false}, {Key: "b", Healthy: true}, {Key: "c", Healthy: true}})
	for range 100 {
		c, ok := b.Pick(func(k string) bool { return k == "c" })
		if !ok || c.Key != "b" {
			t.Fatalf("picked %v, %v; want b (a unhealthy, c excluded)", c, ok)
		}
		c.Release()
	}
	if _, ok := b.Pick(func(k string) bool { return k != "a" }); ok {
		t.Error("picked an endpoint with every healthy one excluded")
	}
	b.Update(nil)
	if _, ok := b.Pick(nil); ok {
		t.Error("picked from an empty balancer")
	}
}

func TestFailuresMoveTrafficAway(t *testing.T) {
	clk := newClock()
	b := New(Options{Now: clk.now})
	b.Update(two(100, 100))
	got := map[string]int{}
	for range 200 {
		c, _ := b.Pick(nil)
		got[c.Key]++
		var err error
		if c.Key == "b" {
			err = errors.New("reset")
		}
		c.Observe(time.Millisecond, err)
		c.Release()
		clk.add(time.Millisecond)
	}
	if got["b"] > 20 { // exploration (5 %) still tries it now and then
		t.Errorf("a failing endpoint took %d of 200 requests", got["b"])
	}
}

func TestLeastLoadedForConnections(t *testing.T) {
	b := New(Options{})
	b.Update(two(100, 100))
	// Long-lived connections on a: new ones go to b.
	var held []*Choice
	for range 10 {
		c, _ := b.Pick(func(k string) bool { return k == "b" })
		c.Observe(time.Millisecond, nil)
		held = append(held, c)
	}
	onB := 0
	for range 100 {
		c, _ := b.Pick(nil)
		if c.Key == "b" {
			onB++
		}
		c.Release()
	}
	if onB < 85 { // exploration (5 %) may pick a now and then
		t.Errorf("%d of 100 new connections went to b with 10 open on a and none on b", onB)
	}
	for _, c := range held {
		c.Release()
		c.Release() // harmless
	}
	if p := b.all["a"].pending.Load(); p != 0 {
		t.Errorf("pending on a = %d after every release", p)
	}
}

func TestPreferLocal(t *testing.T) {
	b := New(Options{PreferLocal: true})
	b.Update([]Endpoint{{Key: "remote", Healthy: true}, {Key: "local", Healthy: true, Local: true}})
	for range 50 {
		c, _ := b.Pick(nil)
		if c.Key != "local" {
			t.Fatalf("picked %s with PreferLocal", c.Key)
		}
		c.Release()
	}
}

func BenchmarkPick(b *testing.B) {
	for _, n := range []int{2, 10, 100} {
		b.Run(fmt.Sprintf("endpoints=%d", n), func(b *testing.B) {
			bl := New(Options{})
			var eps []Endpoint
			for i := range n {
				eps = append(eps, Endpoint{Key: fmt.Sprint(i), Healthy: true})
			}
			bl.Update(eps)
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					c, _ := bl.Pick(nil)
					c.Observe(time.Millisecond, nil)
					c.Release()
				}
			})
		})
	}
}

// Equal endpoints with jittery latencies still share the load.
func TestJitteryEqualEndpointsShareTheLoad(t *testing.T) {
	clk := newClock()
	b := New(Options{Now: clk.now})
	b.Update(two(100, 100))
	got := map[string]int{}
	for i := range 1000 {
		c, _ := b.Pick(nil)
		got[c.Key]++
		l := time.Duration(300+(i*7919)%400) * time.Microsecond // 0.3-0.7 ms
		clk.add(l)
		c.Observe(l, nil)
		c.Release()
	}
	if got["a"] < 400 || got["a"] > 600 {
		t.Errorf("equal endpoints, jittery latency: %v, want each 40-60 %%", got)
	}
}

// Equal endpoints whose latency has rare (1 %) outliers (GC pauses, a busy
// machine) still share the load: one slow response is not remembered for
// long.
func TestOutliersDoNotSkewEqualEndpoints(t *testing.T) {
	for seed := range 20 {
		clk := newClock()
		b := New(Options{Now: clk.now})
		b.Update(two(100, 100))
		got := map[string]int{}
		for i := range 1000 {
			c, _ := b.Pick(nil)
			got[c.Key]++
			l := time.Duration(300+((i+seed*131)*7919)%400) * time.Microsecond
			// Never the first request (seed 0 had it): an endpoint
			// whose very first answer is slow is a cold start, not an
			// outlier, and is rightly avoided for a while (a split of
			// 1/3 to 2/3 in about 0.5 % of runs).
			if (i+seed*17)%100 == 50 {
				l = 8 * time.Millisecond
			}
			clk.add(l)
			c.Observe(l, nil)
			c.Release()
		}
		if got["a"] < 350 || got["a"] > 650 {
			t.Errorf("seed %d: equal endpoints with 1 %% outliers: %v, want each 35-65 %%", seed, got)
		}
	}
}

// A stall of one endpoint (its VM descheduled for 30 ms while it had
// requests in flight) does not leave it starved once it is fast again:
// with eight requests in flight at all times (curl --parallel-max 8), the
// requests the stall held answer together and raise its average once.
// (Each raising it, 49 of the 200 seeds starved a.)
func TestStallDoesNotStarve(t *testing.T) {
	for seed := range 200 {
		r := rand.New(rand.NewPCG(uint64(seed), 7))
		got := simulate(t, 200, 8, func(key string, start time.Duration) time.Duration {
			l := time.Duration(300+r.IntN(400)) * time.Microsecond
			const stallAt, stallFor = 2 * time.Millisecond, 30 * time.Millisecond
			if key == "a" && start < stallAt+stallFor && start+l > stallAt {
				return stallAt + stallFor + l/2 - start // held up by the stall
			}
			return l
		})
		if got["a"] < 40 {
			t.Errorf("seed %d: after a 30 ms stall, a took %d of 200 requests, want 40 at least", seed, got["a"])
		}
	}
}

// An endpoint that becomes ten times slower while requests to it overlap
// is measured as slow, not as twice its old latency: its share falls to
// what its in-flight count alone would not give it.
func TestSlowUnderLoadIsMeasured(t *testing.T) {
	clk := newClock()
	b := New(Options{Now: clk.now})
	b.Update(two(100, 100))
	onlyA := func(k string) bool { return k != "a" }
	for range 10 {
		c, _ := b.Pick(onlyA)
		clk.add(500 * time.Microsecond)
		c.Observe(500*time.Microsecond, nil)
		c.Release()
	}
	// Now 50 ms an answer, four requests always in flight: an answer
	// every 12.5 ms, each to a request sent 50 ms before.
	for range 80 {
		c, _ := b.Pick(onlyA)
		clk.add(12500 * time.Microsecond)
		c.Observe(50*time.Millisecond, nil)
		c.Release()
	}
	a := b.all["a"]
	if got := time.Duration(a.decayed(clk.now(), b.opts)); got < 25*time.Millisecond {
		t.Errorf("a answers in 50 ms under load; its average is %v, want 25 ms at least", got)
	}
}

// An endpoint that becomes ten times slower than another is avoided.
func TestTenTimesSlowerIsAvoided(t *testing.T) {
	clk := newClock()
	b := New(Options{Now: clk.now})
	b.Update(two(100, 100))
	run(b, clk, 100, map[string]time.Duration{"a": 500 * time.Microsecond, "b": 500 * time.Microsecond})
	got := run(b, clk, 2000, map[string]time.Duration{"a": 5 * time.Millisecond, "b": 500 * time.Microsecond})
	if got["a"] > 200 {
		t.Errorf("a now at 5 ms, b at 0.5 ms: %v, want a under 10 %%", got)
	}
}

// simulate makes n requests, inflight at a time, to two equal endpoints
// on a fake clock; latency gives a request's latency from its endpoint and
// start (time since the simulation began). It returns the requests each
// endpoint took.
func simulate(t *testing.T, n, inflight int, latency func(key string, start time.Duration) time.Duration) map[string]int {
	t.Helper()
	clk := newClock()
	t0 := clk.now()
	b := New(Options{Now: clk.now})
	b.Update(two(100, 100))
	type req struct {
		c           *Choice
		start, done time.Time
	}
	var open []req
	got := map[string]int{}
	for picked := 0; picked < n || len(open) > 0; {
		for picked < n && len(open) < inflight {
			c, _ := b.Pick(nil)
			got[c.Key]++
			picked++
			now := clk.now()
			open = append(open, req{c, now, now.Add(latency(c.Key, now.Sub(t0)))})
		}
		k := 0 // the next to answer
		for i := range open {
			if open[i].done.Before(open[k].done) {
				k = i
			}
		}
		d := open[k]
		open = append(open[:k], open[k+1:]...)
		clk.t = d.done
		d.c.Observe(d.done.Sub(d.start), nil)
		d.c.Release()
	}
	return got
}

// An endpoint whose first answer was slow (a fresh connection: the peer
// finishes its TLS handshake and dials its service inside it) is shared
// again soon once it answers as fast as the other, though both answer in
// a fraction of a millisecond, where ratios are large and mean nothing.
// (Seen on the compose example after a restart: 195 requests of 200 to
// one host, the other's worst answer 2-3 ms.) The cold endpoint waits
// for an exploration to be measured again, so a few runs in a hundred
// still give it less than a fifth: 3-22 of 200 runs here, 75-89 without
// the cost floor.
func TestSubMillisecondColdStartRecovers(t *testing.T) {
	short := 0
	for range 200 {
		clk := newClock()
		b := New(Options{Now: clk.now})
		b.Update(two(100, 100))
		first := map[string]bool{}
		got := map[string]int{}
		for range 200 {
			c, _ := b.Pick(nil)
			got[c.Key]++
			l := 150 * time.Microsecond
			if c.Key == "a" && !first["a"] {
				l = 2500 * time.Microsecond
			}
			first[c.Key] = true
			clk.add(l)
			c.Observe(l, nil)
			c.Release()
		}
		if got["a"] < 40 {
			short++
		}
	}
	if short > 30 {
		t.Errorf("a, slow only on its first answer: under 40 of 200 requests in %d of 200 runs", short)
	}
}
