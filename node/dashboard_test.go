package node_test

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
)

const dashboardPath = "../examples/grafana/vmesh-dashboard.json"

// dashboardExprs returns every PromQL expression of the Grafana dashboard:
// panel targets and template variable queries.
func dashboardExprs(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
		Templating struct {
			List []struct{ Type, Query string }
		}
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	var out []string
	for _, p := range d.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q queries nothing", p.Title)
		}
		for _, tg := range p.Targets {
			out = append(out, tg.Expr)
		}
	}
	for _, v := range d.Templating.List {
		if v.Type == "query" {
			out = append(out, v.Query)
		}
	}
	return out
}

var (
	promStrings   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
	promMatchers  = regexp.MustCompile(`\{[^}]*\}`)
	promRanges    = regexp.MustCompile(`\[[^\]]*\]`)
	promGrouping  = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promIdent     = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*(\s*\()?`)
	promOperators = []string{"and", "or", "unless", "bool", "offset", "by", "without"}
)

// metricNames returns the metric names a PromQL expression reads (function
// names, label names and keywords left out).
func metricNames(expr string) []string {
	e := promStrings.ReplaceAllString(expr, `""`)
	e = promMatchers.ReplaceAllString(e, " ")
	e = promRanges.ReplaceAllString(e, " ")
	e = promGrouping.ReplaceAllString(e, " ")
	var out []string
	for _, m := range promIdent.FindAllStringSubmatch(e, -1) {
		name := strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(m[0]), "("))
		if m[1] != "" || slices.Contains(promOperators, name) {
			continue // a function call, or a keyword
		}
		out = append(out, name)
	}
	return out
}

func dashboardMetrics(t *testing.T) []string {
	seen := map[string]bool{}
	for _, e := range dashboardExprs(t) {
		// label_values(metric, label) names a metric too.
		if strings.HasPrefix(e, "label_values(") {
			e = strings.SplitN(strings.TrimPrefix(e, "label_values("), ",", 2)[0]
		}
		for _, n := range metricNames(e) {
			seen[n] = true
		}
	}
	var out []string
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func TestDashboardParses(t *testing.T) {
	got := metricNames(`histogram_quantile(0.99, sum by (le, service) (rate(response_latency_ms_bucket{service=~"$service", direction="inbound"}[$__rate_interval]))) / on (x) time()`)
	if !slices.Equal(got, []string{"response_latency_ms_bucket"}) {
		t.Errorf("metricNames = %v", got)
	}
	names := dashboardMetrics(t)
	for _, want := range []string{"request_total", "response_total", "response_latency_ms_bucket", "identity_cert_expiration_timestamp_seconds"} {
		if !slices.Contains(names, want) {
			t.Errorf("the dashboard does not query %s (found %v)", want, names)
		}
	}
}

// exportedNames returns the sample names of a Prometheus text exposition.
func exportedNames(text string) map[string]bool {
	out := map[string]bool{}
	for _, l := range strings.Split(text, "\n") {
		if l == "" || l[0] == '#' {
			continue
		}
		name := l
		if i := strings.IndexAny(l, "{ "); i >= 0 {
			name = l[:i]
		}
		out[name] = true
	}
	return out
}

// checkDashboardMetrics fails t for every metric the dashboard queries that
// no scraped agent exports.
func checkDashboardMetrics(t *testing.T, scrapes ...string) {
	t.Helper()
	have := map[string]bool{}
	for _, s := range scrapes {
		for n := range exportedNames(s) {
			have[n] = true
		}
	}
	for _, n := range dashboardMetrics(t) {
		if !have[n] {
			t.Errorf("examples/grafana/vmesh-dashboard.json queries %s, which the agents do not export", n)
		}
	}
}
