package balance

import (
	"testing"
	"time"
)

// A steady load may retry 20 % of its requests plus 10 a second; the
// budget refills as the window slides.
func TestBudget(t *testing.T) {
	now := time.Unix(1000, 0)
	b := NewBudget(BudgetOptions{Now: func() time.Time { return now }})
	// No traffic: the floor, 10/s over the 10 s window.
	n := 0
	for b.Retry() {
		n++
	}
	if n != 100 {
		t.Fatalf("retries allowed with no requests: %d, want 100 (10/s × 10 s)", n)
	}
	// 11 s later the window forgot them; 1000 requests a second for 10 s
	// allow 20 % of 10,000 plus the floor.
	now = now.Add(11 * time.Second)
	for range 10 {
		for range 1000 {
			b.Request()
		}
		now = now.Add(time.Second)
	}
	now = now.Add(-time.Millisecond) // still inside the last second's bucket
	n = 0
	for b.Retry() {
		n++
	}
	// The window holds the 9 most recent full seconds plus this one.
	if n < 1800+90 || n > 2000+100 {
		t.Fatalf("retries allowed at 1000 req/s: %d, want about 20%% of the window's requests plus 100", n)
	}
	// A retry storm: every request fails and is retried while the budget
	// lets it; the retries stay within the bound.
	now = now.Add(time.Minute)
	b = NewBudget(BudgetOptions{Now: func() time.Time { return now }})
	requests, retries := 0, 0
	for range 30 {
		for range 200 {
			b.Request()
			requests++
			for range 3 { // up to 3 retries a request
				if !b.Retry() {
					break
				}
				retries++
			}
		}
		now = now.Add(time.Second)
	}
	if limit := 0.2*float64(requests) + 10*30 + 100; float64(retries) > limit {
		t.Errorf("storm: %d retries for %d requests, more than 20%% + 10/s (%v)", retries, requests, limit)
	}
	t.Logf("storm: %d requests, %d retries (%.0f%%)", requests, retries, 100*float64(retries)/float64(requests))
}

func BenchmarkBudget(b *testing.B) {
	bu := NewBudget(BudgetOptions{})
	for b.Loop() {
		bu.Request()
		bu.Retry()
	}
}
