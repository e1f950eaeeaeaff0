package balance

import (
	"sync"
	"time"
)

// Budget bounds retries as Linkerd's retry budget does: over a sliding
// window, retries may add at most Ratio of the requests plus MinPerSecond
// each second, so a failing service sees at most (1 + Ratio) times its
// load plus a trickle, never a multiple of it.
type Budget struct {
	ratio  float64
	min    float64 // retries a second allowed whatever the load
	bucket time.Duration
	now    func() time.Time

	mu       sync.Mutex
	start    int64 // the bucket index of slots[0]
	requests [budgetSlots]float64
	retries  [budgetSlots]float64
}

// budgetSlots is the number of buckets in the window.
const budgetSlots = 10

// BudgetOptions configure a Budget; zero values take Linkerd's defaults.
type BudgetOptions struct {
	// Ratio of retries to requests. Default 0.2.
	Ratio float64
	// MinPerSecond retries allowed even with no requests. Default 10.
	MinPerSecond float64
	// Window the counts are kept for. Default 10s.
	Window time.Duration
	// Now is the clock (a test seam); nil is time.Now.
	Now func() time.Time
}

// NewBudget returns a budget.
func NewBudget(o BudgetOptions) *Budget {
	if o.Ratio <= 0 {
		o.Ratio = 0.2
	}
	if o.MinPerSecond <= 0 {
		o.MinPerSecond = 10
	}
	if o.Window <= 0 {
		o.Window = 10 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Budget{ratio: o.Ratio, min: o.MinPerSecond * o.Window.Seconds(), bucket: o.Window / budgetSlots, now: o.Now}
}

// advance moves the window to now, clearing buckets that fell out. The
// caller holds mu.
func (b *Budget) advance() int {
	idx := b.now().UnixNano() / int64(b.bucket)
	if idx-b.start >= 2*budgetSlots || idx < b.start {
		b.requests, b.retries = [budgetSlots]float64{}, [budgetSlots]float64{}
		b.start = idx - budgetSlots + 1
	}
	for idx-b.start >= budgetSlots {
		i := b.start % budgetSlots
		b.requests[i], b.retries[i] = 0, 0
		b.start++
	}
	return int(idx % budgetSlots)
}

// Request counts one original request (not a retry).
func (b *Budget) Request() {
	b.mu.Lock()
	b.requests[b.advance()]++
	b.mu.Unlock()
}

// Retry reports whether one more retry fits the budget, and if so spends
// it.
func (b *Budget) Retry() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	i := b.advance()
	var req, ret float64
	for k := range budgetSlots {
		req += b.requests[k]
		ret += b.retries[k]
	}
	if ret+1 > b.ratio*req+b.min {
		return false
	}
	b.retries[i]++
	return true
}
