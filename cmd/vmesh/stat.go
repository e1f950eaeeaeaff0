package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/spf13/cobra"
)

func newStatCmd(cl *cli) *cobra.Command {
	var window time.Duration
	cmd := &cobra.Command{
		Use:   "stat",
		Short: "Show golden metrics per service: success rate, requests/s, latency percentiles",
		Long: `Stat scrapes the local agent's /metrics twice, WINDOW apart, and shows for each
direction and service the success rate, requests per second and p50/p95/p99
latency of HTTP traffic in that window, the responses by status code, and
open TCP connections; then, for services called by their VIP, each endpoint
with its traffic-split subset, its share of the requests, its success rate and
the latency the balancer measured.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if window <= 0 {
				return usageError{fmt.Errorf("--window must be positive, got %s", window)}
			}
			ctx := c.Context()
			admin := cl.admin()
			before, err := scrape(ctx, admin)
			if err != nil {
				return err
			}
			select {
			case <-time.After(window):
			case <-ctx.Done():
				return ctx.Err()
			}
			after, err := scrape(ctx, admin)
			if err != nil {
				return err
			}
			rows := goldenStats(before, after, window)
			eps := endpointStats(before, after, window)
			if cl.json() {
				out := statReport{Services: make([]statJSON, len(rows)), Endpoints: make([]endpointJSON, len(eps))}
				for i, r := range rows {
					out.Services[i] = r.json(window)
				}
				for i, e := range eps {
					out.Endpoints[i] = e.json(window)
				}
				return printJSON(c.OutOrStdout(), out)
			}
			tw := tabwriter.NewWriter(c.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "DIRECTION\tSERVICE\tSUCCESS\tRPS\tP50_MS\tP95_MS\tP99_MS\tTCP_CONNS\tSTATUS")
			for _, r := range rows {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%.1f\t%s\t%s\t%s\t%.0f\t%s\n", r.direction, r.service,
					pct(r.success), r.rps, ms(r.p50), ms(r.p95), ms(r.p99), r.tcpConns, statusSummary(r.byStatus))
			}
			if len(eps) > 0 {
				fmt.Fprintln(tw, "\nSERVICE (VIP)\tSUBSET\tENDPOINT\tSHARE\tRPS\tSUCCESS\tP50_MS")
				for _, e := range eps {
					sub := e.subset
					if sub == "" {
						sub = "-"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.1f\t%s\t%s\n", e.service, sub, e.endpoint, pct(e.share), e.rps, pct(e.success), ms(e.p50))
				}
			}
			return tw.Flush()
		},
	}
	cmd.Flags().DurationVar(&window, "window", 2*time.Second, "how long to measure (e.g. 10s, 1m)")
	return cmd
}

func scrape(ctx context.Context, admin string) (map[string]*dto.MetricFamily, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+admin+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("cannot reach the agent's admin API at %s (is it running?): %w", admin, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scraping %s: %s", admin, resp.Status)
	}
	return parseMetrics(resp.Body)
}

func parseMetrics(r io.Reader) (map[string]*dto.MetricFamily, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	mf, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parsing metrics: %w", err)
	}
	return mf, nil
}

type statRow struct {
	direction, service string
	success, rps       float64 // success is NaN without responses
	p50, p95, p99      float64 // NaN without requests
	tcpConns           float64
	byStatus           map[string]float64 // responses in the window by status code
}

// statJSON is one row of `vmesh stat -o json`; absent numbers are null.
type statJSON struct {
	Direction string             `json:"direction"`
	Service   string             `json:"service"`
	Window    string             `json:"window"`
	Success   *float64           `json:"success_rate"`
	RPS       float64            `json:"rps"`
	P50       *float64           `json:"p50_ms"`
	P95       *float64           `json:"p95_ms"`
	P99       *float64           `json:"p99_ms"`
	TCPConns  float64            `json:"tcp_open_connections"`
	ByStatus  map[string]float64 `json:"responses_by_status"`
}

// statReport is `vmesh stat -o json`: the golden metrics per direction and
// service, and per endpoint of the services called by VIP (with their
// traffic-split subset).
type statReport struct {
	Services  []statJSON     `json:"services"`
	Endpoints []endpointJSON `json:"endpoints"`
}

func (e endpointRow) json(window time.Duration) endpointJSON {
	num := func(f float64) *float64 {
		if math.IsNaN(f) {
			return nil
		}
		return &f
	}
	return endpointJSON{Service: e.service, Subset: e.subset, Endpoint: e.endpoint, Window: window.String(),
		RPS: e.rps, Share: e.share, Success: num(e.success), P50: num(e.p50)}
}

func (r statRow) json(window time.Duration) statJSON {
	num := func(f float64) *float64 {
		if math.IsNaN(f) {
			return nil
		}
		return &f
	}
	return statJSON{Direction: r.direction, Service: r.service, Window: window.String(), Success: num(r.success),
		RPS: r.rps, P50: num(r.p50), P95: num(r.p95), P99: num(r.p99), TCPConns: r.tcpConns, ByStatus: r.byStatus}
}

// statusSummary renders "200:95 503:5", by status code.
func statusSummary(m map[string]float64) string {
	if len(m) == 0 {
		return "-"
	}
	codes := make([]string, 0, len(m))
	for c := range m {
		codes = append(codes, c)
	}
	sort.Strings(codes)
	parts := make([]string, len(codes))
	for i, c := range codes {
		parts[i] = fmt.Sprintf("%s:%.0f", c, m[c])
	}
	return strings.Join(parts, " ")
}

// byStatus counts the responses per (direction, service) and status code.
func byStatus(mf map[string]*dto.MetricFamily) map[statKey]map[string]float64 {
	out := map[statKey]map[string]float64{}
	f, ok := mf["response_total"]
	if !ok {
		return out
	}
	for _, m := range f.GetMetric() {
		l := labelsOf(m)
		key := statKey{l["direction"], l["service"]}
		if out[key] == nil {
			out[key] = map[string]float64{}
		}
		out[key][l["status_code"]] += m.GetCounter().GetValue()
	}
	return out
}

type statKey struct{ direction, service string }

func labelsOf(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// sumBy adds a counter's (or gauge's) values per (direction, service),
// optionally only where label k has value v.
func sumBy(mf map[string]*dto.MetricFamily, name, k, v string) map[statKey]float64 {
	out := map[statKey]float64{}
	f, ok := mf[name]
	if !ok {
		return out
	}
	for _, m := range f.GetMetric() {
		l := labelsOf(m)
		if k != "" && l[k] != v {
			continue
		}
		key := statKey{l["direction"], l["service"]}
		switch {
		case m.Counter != nil:
			out[key] += m.Counter.GetValue()
		case m.Gauge != nil:
			out[key] += m.Gauge.GetValue()
		}
	}
	return out
}

// buckets adds the latency histogram's cumulative buckets per key.
func buckets(mf map[string]*dto.MetricFamily) map[statKey]map[float64]float64 {
	out := map[statKey]map[float64]float64{}
	f, ok := mf["response_latency_ms"]
	if !ok {
		return out
	}
	for _, m := range f.GetMetric() {
		l := labelsOf(m)
		key := statKey{l["direction"], l["service"]}
		if out[key] == nil {
			out[key] = map[float64]float64{}
		}
		hasInf := false
		for _, b := range m.GetHistogram().GetBucket() {
			out[key][b.GetUpperBound()] += float64(b.GetCumulativeCount())
			hasInf = hasInf || math.IsInf(b.GetUpperBound(), 1)
		}
		if !hasInf {
			out[key][math.Inf(1)] += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return out
}

func goldenStats(before, after map[string]*dto.MetricFamily, window time.Duration) []statRow {
	reqA, reqB := sumBy(after, "request_total", "", ""), sumBy(before, "request_total", "", "")
	respA, respB := sumBy(after, "response_total", "", ""), sumBy(before, "response_total", "", "")
	okA, okB := sumBy(after, "response_total", "classification", "success"), sumBy(before, "response_total", "classification", "success")
	conns := sumBy(after, "tcp_open_connections", "", "")
	latA, latB := buckets(after), buckets(before)
	stA, stB := byStatus(after), byStatus(before)
	keys := map[statKey]bool{}
	for k := range reqA {
		keys[k] = true
	}
	for k := range conns {
		keys[k] = true
	}
	var rows []statRow
	for k := range keys {
		r := statRow{direction: k.direction, service: k.service, tcpConns: conns[k]}
		if r.service == "" {
			r.service = "(unknown)"
		}
		r.rps = (reqA[k] - reqB[k]) / window.Seconds()
		r.success = math.NaN()
		if d := respA[k] - respB[k]; d > 0 {
			r.success = (okA[k] - okB[k]) / d
		}
		delta := map[float64]float64{}
		for ub, n := range latA[k] {
			delta[ub] = n - latB[k][ub]
		}
		r.p50, r.p95, r.p99 = quantile(delta, 0.50), quantile(delta, 0.95), quantile(delta, 0.99)
		r.byStatus = map[string]float64{}
		for code, n := range stA[k] {
			if d := n - stB[k][code]; d > 0 {
				r.byStatus[code] = d
			}
		}
		rows = append(rows, r)
	}
	sort.Slice(rows, func(i, j int) bool {
		if rows[i].direction != rows[j].direction {
			return rows[i].direction < rows[j].direction
		}
		return rows[i].service < rows[j].service
	})
	return rows
}

// quantile interpolates q from cumulative bucket counts, as Prometheus'
// histogram_quantile does. NaN without observations.
func quantile(cum map[float64]float64, q float64) float64 {
	bounds := make([]float64, 0, len(cum))
	for ub := range cum {
		bounds = append(bounds, ub)
	}
	sort.Float64s(bounds)
	if len(bounds) == 0 {
		return math.NaN()
	}
	total := cum[bounds[len(bounds)-1]]
	if total <= 0 {
		return math.NaN()
	}
	rank := q * total
	prevUB, prevCount := 0.0, 0.0
	for _, ub := range bounds {
		c := cum[ub]
		if c >= rank {
			if math.IsInf(ub, 1) {
				return prevUB
			}
			if c == prevCount {
				return ub
			}
			return prevUB + (ub-prevUB)*(rank-prevCount)/(c-prevCount)
		}
		prevUB, prevCount = ub, c
	}
	return prevUB
}

func pct(f float64) string {
	if math.IsNaN(f) {
		return "-"
	}
	return fmt.Sprintf("%.2f%%", f*100)
}

func ms(f float64) string {
	if math.IsNaN(f) {
		return "-"
	}
	return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.2f", f), "0"), ".")
}

// endpointRow is one endpoint of a service called through its VIP, in
// the window: its traffic-split subset, requests (connections for TCP)
// per second, its share of the service's, the success rate and the
// balancer's measured p50.
type endpointRow struct {
	service, subset, endpoint string
	rps, share, success, p50  float64
}

// endpointJSON is one endpoint row of `vmesh stat -o json`.
type endpointJSON struct {
	Service  string   `json:"service"`
	Subset   string   `json:"subset,omitempty"`
	Endpoint string   `json:"endpoint"`
	Window   string   `json:"window"`
	RPS      float64  `json:"rps"`
	Share    float64  `json:"share"`
	Success  *float64 `json:"success_rate"`
	P50      *float64 `json:"p50_ms"`
}

// endpointStats turns endpoint_requests_total and
// endpoint_response_latency_ms into rows, by service, subset, endpoint.
func endpointStats(before, after map[string]*dto.MetricFamily, window time.Duration) []endpointRow {
	type key struct{ service, subset, endpoint string }
	count := func(mf map[string]*dto.MetricFamily) (all, ok map[key]float64) {
		all, ok = map[key]float64{}, map[key]float64{}
		for _, m := range mf["endpoint_requests_total"].GetMetric() {
			l := labelsOf(m)
			k := key{l["service"], l["subset"], l["endpoint"]}
			all[k] += m.GetCounter().GetValue()
			if l["result"] == "success" {
				ok[k] += m.GetCounter().GetValue()
			}
		}
		return all, ok
	}
	lat := func(mf map[string]*dto.MetricFamily) map[[2]string]map[float64]float64 {
		out := map[[2]string]map[float64]float64{}
		for _, m := range mf["endpoint_response_latency_ms"].GetMetric() {
			l := labelsOf(m)
			k := [2]string{l["service"], l["endpoint"]}
			if out[k] == nil {
				out[k] = map[float64]float64{}
			}
			for _, b := range m.GetHistogram().GetBucket() {
				out[k][b.GetUpperBound()] += float64(b.GetCumulativeCount())
			}
			out[k][math.Inf(1)] = float64(m.GetHistogram().GetSampleCount())
		}
		return out
	}
	allA, okA := count(after)
	allB, okB := count(before)
	latA, latB := lat(after), lat(before)
	perService := map[string]float64{}
	for k, n := range allA {
		perService[k.service] += n - allB[k]
	}
	var rows []endpointRow
	for k, n := range allA {
		d := n - allB[k]
		r := endpointRow{service: k.service, subset: k.subset, endpoint: k.endpoint, rps: d / window.Seconds(), success: math.NaN()}
		if d > 0 {
			r.success = (okA[k] - okB[k]) / d
		}
		if t := perService[k.service]; t > 0 {
			r.share = d / t
		}
		delta := map[float64]float64{}
		lk := [2]string{k.service, k.endpoint}
		for ub, c := range latA[lk] {
			delta[ub] = c - latB[lk][ub]
		}
		r.p50 = quantile(delta, 0.5)
		rows = append(rows, r)
	}
	sort.Slice(rows, func(i, j int) bool {
		a, b := rows[i], rows[j]
		if a.service != b.service {
			return a.service < b.service
		}
		if a.subset != b.subset {
			return a.subset < b.subset
		}
		return a.endpoint < b.endpoint
	})
	return rows
}
