package node

import (
	"context"
	"sync"
	"time"
)

// rulesViewTTL is how long /v1/status reuses its view of the installed
// rules.
const rulesViewTTL = 10 * time.Second

// rulesView caches the comparison of the installed rules with the wanted
// ones that GET /v1/status reports: it runs about a dozen iptables
// commands, and the admin port may face the network. Concurrent callers
// share one refresh; Invalidate (after the agent applies rules) makes the
// next call look again.
type rulesView struct {
	// check compares the installed rules with the wanted ones. Required.
	check func(ctx context.Context) (drift, backend string, err error)
	// now is the clock. Optional: nil means time.Now.
	now func() time.Time

	mu      sync.Mutex // held during a refresh: callers wait for it
	at      time.Time  // zero: nothing cached
	drift   string
	backend string
	err     error
}

// get returns the cached view, refreshed when older than rulesViewTTL.
func (v *rulesView) get(ctx context.Context) (drift, backend string, err error) {
	now := time.Now
	if v.now != nil {
		now = v.now
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.at.IsZero() || now().Sub(v.at) >= rulesViewTTL {
		v.drift, v.backend, v.err = v.check(ctx)
		v.at = now()
	}
	return v.drift, v.backend, v.err
}

// invalidate drops the cached view.
func (v *rulesView) invalidate() {
	v.mu.Lock()
	v.at = time.Time{}
	v.mu.Unlock()
}
