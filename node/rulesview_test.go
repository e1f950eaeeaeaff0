package node

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Issue 16: GET /v1/status ran ~13 iptables commands per request; the
// admin port may face the network. The view is computed once per TTL,
// whatever the number of requests, and again after rules are applied.
func TestRulesViewCaches(t *testing.T) {
	var calls atomic.Int32
	now := time.Date(2026, 12, 3, 9, 0, 0, 0, time.UTC)
	var clock atomic.Pointer[time.Time]
	clock.Store(&now)
	v := &rulesView{
		check: func(context.Context) (string, string, error) {
			calls.Add(1)
			return "", "nft", nil
		},
		now: func() time.Time { return *clock.Load() },
	}
	var wg sync.WaitGroup
	for range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, backend, err := v.get(t.Context()); backend != "nft" || err != nil {
				t.Errorf("view: backend %q, err %v", backend, err)
			}
		}()
	}
	wg.Wait()
	if n := calls.Load(); n != 1 {
		t.Errorf("100 status requests ran the iptables comparison %d times, want 1", n)
	}
	later := now.Add(rulesViewTTL)
	clock.Store(&later)
	v.get(t.Context())
	if n := calls.Load(); n != 2 {
		t.Errorf("after the TTL: %d comparisons, want 2", n)
	}
	v.invalidate()
	v.get(t.Context())
	if n := calls.Load(); n != 3 {
		t.Errorf("after rules were applied: %d comparisons, want 3", n)
	}
}
