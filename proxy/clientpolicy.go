package proxy

import (
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"time"
)

// Client-side policy for calls to a service, set by the client host's
// configuration ([[route]] and [[split]]) and applied by its outbound
// proxy: request timeouts and response statuses worth a retry, per service
// and per route (method and path prefix, the longest prefix winning), and
// a traffic split over subsets of the service's endpoints chosen by label.
// Retries of every kind are spent from the service's retry budget
// (balance.Budget: 20 % of requests plus 10/s).

// ServicePolicy is the policy for calls to one service.
type ServicePolicy struct {
	Service string
	// Timeout of each request, to the end of its response head; 0 means
	// Config.RequestTimeout.
	Timeout time.Duration
	// RetryStatuses are response statuses retried on another endpoint
	// (requests without a body, or with a small one, buffered).
	RetryStatuses []int
	// Routes override Timeout and RetryStatuses for some requests.
	Routes []RoutePolicy
	// Split divides the service's traffic over subsets by weight; empty:
	// every endpoint is one set.
	Split []Subset
}

// RoutePolicy matches requests by method ("" any) and path prefix.
type RoutePolicy struct {
	Method        string
	PathPrefix    string
	Timeout       time.Duration // 0: the service's
	RetryStatuses []int         // nil: the service's
}

// Subset is the endpoints whose labels include all of Labels.
type Subset struct {
	Name   string
	Labels map[string]string
	Weight int
}

// policies are the compiled policies, by service.
type policies map[string]*ServicePolicy

// SetPolicies replaces the client policies; connections in flight take
// them from their next request.
func (p *Proxy) SetPolicies(list []ServicePolicy) {
	m := make(policies, len(list))
	for i := range list {
		sp := list[i]
		sp.Routes = slices.Clone(sp.Routes)
		// The longest prefix is tried first.
		slices.SortStableFunc(sp.Routes, func(a, b RoutePolicy) int { return len(b.PathPrefix) - len(a.PathPrefix) })
		m[sp.Service] = &sp
	}
	p.policies.Store(&m)
}

// policy returns the policy for calls to service, or nil.
func (p *Proxy) policy(service string) *ServicePolicy {
	m := p.policies.Load()
	if m == nil {
		return nil
	}
	return (*m)[service]
}

// requestPolicy returns the timeout and retry statuses for one request.
func (sp *ServicePolicy) requestPolicy(method, path []byte, def time.Duration) (time.Duration, []int) {
	if sp == nil {
		return def, nil
	}
	timeout, statuses := sp.Timeout, sp.RetryStatuses
	for i := range sp.Routes {
		r := &sp.Routes[i]
		if (r.Method == "" || r.Method == string(method)) && strings.HasPrefix(string(path), r.PathPrefix) {
			if r.Timeout > 0 {
				timeout = r.Timeout
			}
			if r.RetryStatuses != nil {
				statuses = r.RetryStatuses
			}
			break
		}
	}
	if timeout == 0 {
		timeout = def
	}
	return timeout, statuses
}

// inSubset reports whether labels include all of want.
func inSubset(labels, want map[string]string) bool {
	for k, v := range want {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// pickSubset draws a subset of sp's split by weight among those with a
// healthy endpoint in set, and returns its index, or -1 for no split.
func (sp *ServicePolicy) pickSubset(set *balancedSet) int {
	if sp == nil || len(sp.Split) == 0 {
		return -1
	}
	total := 0
	for i, s := range sp.Split {
		if set.live[i] {
			total += s.Weight
		}
	}
	if total == 0 {
		return -1 // no subset can take it: any endpoint
	}
	n := rand.IntN(total)
	for i, s := range sp.Split {
		if !set.live[i] {
			continue
		}
		if n < s.Weight {
			return i
		}
		n -= s.Weight
	}
	return -1
}

// subsetName names subset i of sp for metrics: its name, else its labels.
func (sp *ServicePolicy) subsetName(i int) string {
	if i < 0 || sp == nil || i >= len(sp.Split) {
		return ""
	}
	s := sp.Split[i]
	if s.Name != "" {
		return s.Name
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(s.Labels)) {
		parts = append(parts, k+"="+s.Labels[k])
	}
	return strings.Join(parts, ",")
}
