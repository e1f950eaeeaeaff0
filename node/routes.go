package node

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/vmesh/vmesh/internal/field"
	"github.com/vmesh/vmesh/proxy"
)

// RouteConfig is one [[route]]: how this host's apps' calls to a service
// are treated by its outbound proxy (the service may be on any host).
//
//	[[route]]
//	service = "web"
//	timeout = "2s"             # each request, to its response head: 504 past it
//	retry_statuses = [503]     # retried on another endpoint
//	[[route.match]]            # per route; the longest path prefix wins
//	method = "GET"             # optional
//	path_prefix = "/api/"
//	timeout = "500ms"
type RouteConfig struct {
	// Service is the called service's name. Required; at most one
	// [[route]] a service.
	Service string `toml:"service"`
	// Timeout of each request to the service, to its response head; past
	// it the app gets 504 with l5d-proxy-error. Default proxy.request_timeout.
	Timeout time.Duration `toml:"timeout"`
	// RetryStatuses are response statuses retried on another endpoint of
	// the service (requests without a body or with a small one; within the
	// retry budget). Default none.
	RetryStatuses []int `toml:"retry_statuses"`
	// Match are per-route overrides, by method and path prefix.
	Match []RouteMatch `toml:"match"`
}

// RouteMatch is one [[route.match]].
type RouteMatch struct {
	// Method matches one request method; "" matches any.
	Method string `toml:"method"`
	// PathPrefix the request's path starts with. Required ("/" for all).
	PathPrefix string `toml:"path_prefix"`
	// Timeout overrides the route's; 0: the route's.
	Timeout time.Duration `toml:"timeout"`
	// RetryStatuses overrides the route's when set ([] for none).
	RetryStatuses []int `toml:"retry_statuses"`
}

// SplitConfig is one [[split]]: a service's traffic from this host divided
// over subsets of its endpoints by weight.
//
//	[[split]]
//	service = "web"
//	[[split.subset]]
//	name = "stable"
//	labels = { version = "v1" }
//	weight = 90
//	[[split.subset]]
//	name = "canary"
//	labels = { version = "v2" }
//	weight = 10
type SplitConfig struct {
	// Service is the split service's name. Required; one [[split]] a
	// service.
	Service string `toml:"service"`
	// Subset lists the subsets; an endpoint belongs to the first whose
	// labels it has. A subset with no healthy endpoint takes nothing: its
	// share goes to the others.
	Subset []SubsetConfig `toml:"subset"`
}

// SubsetConfig is one [[split.subset]].
type SubsetConfig struct {
	// Name in metrics and `vmesh stat`. Default: its labels.
	Name string `toml:"name"`
	// Labels an endpoint must have (all of them; from its [[service]]'s
	// labels). Required.
	Labels map[string]string `toml:"labels"`
	// Weight relative to the other subsets, 0-1000.
	Weight int `toml:"weight"`
}

var methods = []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
	http.MethodDelete, http.MethodConnect, http.MethodOptions, http.MethodTrace}

func validStatuses(errs *field.List, key string, st []int) {
	for i, s := range st {
		if s < 100 || s > 599 {
			errs.Add(key, "entry %d: %d is not an HTTP status (100-599)", i+1, s)
		}
	}
}

// serviceRef checks the service of an array element (key, index i): named, a valid
// name, and not named by an earlier element (seen, by name: element+1).
func serviceRef(errs *field.List, seen map[string]int, key, name string, i int, required, dupFormat string) {
	switch {
	case name == "":
		errs.Add(key+".service", "is required: %s", required)
	case !ValidName(name):
		errs.Add(key+".service", "%q is not a valid service name", name)
	default:
		if j, dup := seen[name]; dup {
			errs.Add(key+".service", "service %q "+dupFormat, name, j)
		}
		seen[name] = i + 1
	}
}

// validateRoutes checks [[route]] and [[split]].
func (c *Config) validateRoutes(errs *field.List) {
	seen := map[string]int{}
	for i, r := range c.Routes {
		key := fmt.Sprintf("route[%d]", i+1)
		serviceRef(errs, seen, key, r.Service, i, "the name of the service called", "already has route[%d]: put its matches there")
		if r.Timeout < 0 {
			errs.Add(key+".timeout", "must not be negative, got %s", r.Timeout)
		}
		validStatuses(errs, key+".retry_statuses", r.RetryStatuses)
		for j, m := range r.Match {
			mk := fmt.Sprintf("%s.match[%d]", key, j+1)
			if m.Method != "" && !slices.Contains(methods, m.Method) {
				errs.Add(mk+".method", "%q is not an HTTP method (upper-case, e.g. \"GET\")", m.Method)
			}
			if !strings.HasPrefix(m.PathPrefix, "/") {
				errs.Add(mk+".path_prefix", "must start with \"/\", got %q", m.PathPrefix)
			}
			if m.Timeout < 0 {
				errs.Add(mk+".timeout", "must not be negative, got %s", m.Timeout)
			}
			validStatuses(errs, mk+".retry_statuses", m.RetryStatuses)
		}
	}
	seen = map[string]int{}
	for i, s := range c.Splits {
		key := fmt.Sprintf("split[%d]", i+1)
		serviceRef(errs, seen, key, s.Service, i, "the name of the service split", "is already split by split[%d]")
		if len(s.Subset) == 0 {
			errs.Add(key, "needs at least one [[split.subset]]")
		}
		total := 0
		for j, sub := range s.Subset {
			sk := fmt.Sprintf("%s.subset[%d]", key, j+1)
			if len(sub.Labels) == 0 {
				errs.Add(sk+".labels", "is required: the labels that pick the subset's endpoints, e.g. { version = \"v1\" }")
			}
			if sub.Weight < 0 || sub.Weight > 1000 {
				errs.Add(sk+".weight", "must be 0-1000, got %d", sub.Weight)
			}
			total += sub.Weight
		}
		if len(s.Subset) > 0 && total == 0 {
			errs.Add(key, "the subsets' weights are all 0: nothing would take the traffic")
		}
	}
}

// servicePolicies turns [[route]] and [[split]] into the proxy's policies.
func servicePolicies(cfg Config) []proxy.ServicePolicy {
	by := map[string]*proxy.ServicePolicy{}
	get := func(svc string) *proxy.ServicePolicy {
		if p, ok := by[svc]; ok {
			return p
		}
		p := &proxy.ServicePolicy{Service: svc}
		by[svc] = p
		return p
	}
	for _, r := range cfg.Routes {
		p := get(r.Service)
		p.Timeout, p.RetryStatuses = r.Timeout, r.RetryStatuses
		for _, m := range r.Match {
			p.Routes = append(p.Routes, proxy.RoutePolicy{Method: m.Method, PathPrefix: m.PathPrefix, Timeout: m.Timeout, RetryStatuses: m.RetryStatuses})
		}
	}
	for _, s := range cfg.Splits {
		p := get(s.Service)
		for _, sub := range s.Subset {
			p.Split = append(p.Split, proxy.Subset{Name: sub.Name, Labels: sub.Labels, Weight: sub.Weight})
		}
	}
	out := make([]proxy.ServicePolicy, 0, len(by))
	for _, p := range by {
		out = append(out, *p)
	}
	return out
}
