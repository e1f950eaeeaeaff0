// Package balance chooses which endpoint of a service takes a request or a
// connection: power of two choices over a cost that grows with an
// endpoint's latency and its requests in flight (Linkerd's peak-EWMA
// balancer). Latency is tracked as a peak-sensitive moving average: a
// slower observation takes effect at once, a faster one decays in over
// Options.Decay. HTTP observes each response's latency; TCP observes the
// connect time and keeps a connection in flight until it closes, which
// makes the same cost a least-loaded choice.
//
// Unhealthy endpoints are never chosen; weights bias both the sampling of
// the two candidates and their cost; excluded keys (an endpoint that just
// failed this request) are skipped so a retry goes elsewhere.
package balance

import (
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Endpoint is what a balancer chooses among.
type Endpoint struct {
	// Key identifies the endpoint (e.g. "node/service"); unique. Required.
	Key string
	// Weight, 1-1000; 0 means 100.
	Weight int
	// Healthy endpoints only are chosen.
	Healthy bool
	// Local marks this host's own endpoint (Options.PreferLocal).
	Local bool
}

// Options tune a Balancer. Zero fields mean their defaults.
type Options struct {
	// Decay is the time constant of the latency average. Default 2s.
	Decay time.Duration
	// FailurePenalty is the latency recorded for a failure. Default 1s.
	FailurePenalty time.Duration
	// PreferLocal chooses this host's own healthy endpoint when there is
	// one. Default false: the local endpoint is one among others.
	PreferLocal bool
	// Now is the clock; nil means time.Now. A test seam.
	Now func() time.Time
}

func (o Options) decay() float64 {
	if o.Decay <= 0 {
		return float64(2 * time.Second)
	}
	return float64(o.Decay)
}

func (o Options) penalty() float64 {
	if o.FailurePenalty <= 0 {
		return float64(time.Second)
	}
	return float64(o.FailurePenalty)
}

func (o Options) now() time.Time {
	if o.Now != nil {
		return o.Now()
	}
	return time.Now()
}

// Balancer picks endpoints. Safe for concurrent use.
type Balancer struct {
	opts Options

	mu    sync.Mutex
	eps   []*endpoint // the healthy ones, in Update's order
	all   map[string]*endpoint
	total float64 // sum of the healthy endpoints' weights
}

type endpoint struct {
	key     string
	weight  float64
	local   bool
	pending atomic.Int64

	mu    sync.Mutex
	ewma  float64 // nanoseconds
	stamp time.Time
	seen  bool // observed at least once: ewma is measured, not assumed
	// The current stall: when it began (its first slow answer came),
	// and the average before it.
	stallAt  time.Time
	peakBase float64
}

// New returns an empty balancer.
func New(opts Options) *Balancer {
	return &Balancer{opts: opts, all: map[string]*endpoint{}}
}

// Update replaces the endpoint set. Endpoints that stay keep their latency
// and requests in flight.
func (b *Balancer) Update(list []Endpoint) {
	b.mu.Lock()
	defer b.mu.Unlock()
	all := make(map[string]*endpoint, len(list))
	eps := make([]*endpoint, 0, len(list))
	total := 0.0
	for _, e := range list {
		w := e.Weight
		if w <= 0 {
			w = 100
		}
		ep := b.all[e.Key]
		if ep == nil {
			// Not measured yet: as cheap as can be, so it is tried at
			// once and its first measurement replaces the guess.
			ep = &endpoint{key: e.Key, stamp: b.opts.now()}
		}
		ep.weight, ep.local = float64(w), e.Local
		all[e.Key] = ep
		if e.Healthy {
			eps = append(eps, ep)
			total += ep.weight
		}
	}
	b.all, b.eps, b.total = all, eps, total
}

// Len returns the number of healthy endpoints.
func (b *Balancer) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.eps)
}

// Choice is one pick: the request or connection in flight on Key.
type Choice struct {
	Key      string
	ep       *endpoint
	b        *Balancer
	released atomic.Bool
}

// Observe records how long the request took to answer (HTTP: to the
// response headers) or the connection to open (TCP), or that it failed.
func (c *Choice) Observe(latency time.Duration, err error) {
	c.ep.observe(latency, err != nil, c.b.opts)
}

// Release ends the request or connection: it no longer counts as in
// flight. Calling it more than once is harmless.
func (c *Choice) Release() {
	if !c.released.Swap(true) {
		c.ep.pending.Add(-1)
	}
}

// Pick chooses an endpoint not excluded (exclude may be nil) and counts a
// request or connection in flight on it until Choice.Release. ok is false
// when no healthy endpoint is left.
func (b *Balancer) Pick(exclude func(key string) bool) (c *Choice, ok bool) {
	b.mu.Lock()
	eps, total := b.eps, b.total
	b.mu.Unlock()
	var ep *endpoint
	if b.opts.PreferLocal {
		for _, e := range eps {
			if e.local && (exclude == nil || !exclude(e.key)) {
				ep = e
				break
			}
		}
	}
	if ep == nil {
		ep = b.p2c(eps, total, exclude)
	}
	if ep == nil {
		return nil, false
	}
	ep.pending.Add(1)
	return &Choice{Key: ep.key, ep: ep, b: b}, true
}

// p2c samples two distinct candidates by weight and returns the cheaper.
func (b *Balancer) p2c(eps []*endpoint, total float64, exclude func(string) bool) *endpoint {
	if exclude != nil {
		var kept []*endpoint
		for i, e := range eps {
			if exclude(e.key) {
				if kept == nil {
					kept = append(make([]*endpoint, 0, len(eps)), eps[:i]...)
				}
				total -= e.weight
				continue
			}
			if kept != nil {
				kept = append(kept, e)
			}
		}
		if kept != nil {
			eps = kept
		}
	}
	switch len(eps) {
	case 0:
		return nil
	case 1:
		return eps[0]
	}
	i := sample(eps, total, -1)
	j := sample(eps, total-eps[i].weight, i)
	now := b.opts.now()
	a, c := eps[i], eps[j]
	if rand.Float64() < exploreRatio {
		// Now and then a candidate is taken whatever its cost, so an
		// endpoint avoided after a slow response gets measured again.
		return a
	}
	ca, cc := a.cost(now, b.opts), c.cost(now, b.opts)
	// Costs within tieRatio of each other are a tie, and the tie goes to
	// the first candidate, drawn by weight: two equal endpoints share the
	// load instead of the slightly cheaper one taking it all (with two
	// endpoints, P2C always compares both).
	if ca <= cc*tieRatio {
		return a
	}
	return c
}

// exploreRatio is the share of picks that skip the cost comparison.
const exploreRatio = 0.05

// tieRatio: costs closer than this factor are treated as equal.
const tieRatio = 4

// peakWeight and minWeight are how far one slower, and at least how far
// one faster, observation moves an endpoint's average.
const (
	peakWeight = 0.5
	minWeight  = 0.5
)

// sample draws an index by weight, skipping index skip.
func sample(eps []*endpoint, total float64, skip int) int {
	r := rand.Float64() * total
	last := -1
	for i, e := range eps {
		if i == skip {
			continue
		}
		last = i
		if r < e.weight {
			return i
		}
		r -= e.weight
	}
	return last
}

// cost is the latency average (decayed to now) plus costFloor, times the
// requests in flight plus one, divided by the weight.
func (e *endpoint) cost(now time.Time, o Options) float64 {
	e.mu.Lock()
	v := e.decayed(now, o)
	e.mu.Unlock()
	return (v + costFloor) * float64(e.pending.Load()+1) / e.weight
}

// costFloor is added to every latency average before costs are compared:
// below half a millisecond two endpoints differ by scheduling, not by
// health, and ratios of such latencies are large and meaningless. Without
// it an endpoint whose first answer took 2.5 ms (a fresh connection) and
// later ones 0.15 ms, like the other's, was avoided for most of 200
// requests (TestSubMillisecondColdStartRecovers; 195 of 200 to one host on
// the compose example). An endpoint steadily ten times slower than 0.5 ms
// is still avoided.
const costFloor = float64(500 * time.Microsecond)

// decayed is the average as of now: it decays toward 0 while nothing is
// observed, so an endpoint penalised long ago gets tried again.
func (e *endpoint) decayed(now time.Time, o Options) float64 {
	dt := float64(now.Sub(e.stamp))
	if dt <= 0 {
		return e.ewma
	}
	return e.ewma * math.Exp(-dt/o.decay())
}

// observe records a request that took took, or failed after it (counted
// as at least the failure penalty).
func (e *endpoint) observe(took time.Duration, failed bool, o Options) {
	v := float64(took)
	if failed {
		v = max(v, o.penalty())
	}
	now := o.now()
	e.mu.Lock()
	defer e.mu.Unlock()
	switch {
	case !e.seen:
		e.ewma, e.seen = v, true // the first measurement replaces the guess
	case v > e.ewma:
		// Peak-sensitive: a slower observation moves the average
		// halfway at once, but at most doubles it: an endpoint that
		// stays slow is avoided after a few requests, one outlier (a GC
		// pause) is not remembered for the whole decay time. Slow
		// answers to requests that were in flight when a stall began
		// (they started before its first slow answer came) are that
		// stall, observed once: a VM descheduled for 10 ms with eight
		// requests in flight doubles its average, not multiplies it by
		// 2^8. A request started after it observes anew, so an endpoint
		// that stays slow under load doubles its average once per round
		// of requests until it reaches its latency. Failures are not
		// jitter: each one counts.
		if failed || !now.Add(-took).Before(e.stallAt) {
			e.stallAt, e.peakBase = now, e.ewma
		}
		e.ewma = max(e.ewma, min(e.peakBase+(v-e.peakBase)*peakWeight, 2*e.peakBase))
	default:
		// Faster: decay toward it over Decay, and by at least
		// minWeight per observation, so a busy endpoint's average
		// follows its latency however high the request rate.
		alpha := max(1-math.Exp(-float64(now.Sub(e.stamp))/o.decay()), minWeight)
		e.ewma += (v - e.ewma) * alpha
	}
	e.stamp = now
}
