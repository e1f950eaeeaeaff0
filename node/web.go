package node

import (
	"embed"
	"io/fs"
	"math"
	"net/http"
	"sort"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// The web page on the admin port (/) shows the mesh as this host sees it:
// members, services with endpoints and health, golden metrics per service,
// edges (who talks to whom, with mTLS or not), certificates. It is plain
// HTML and a little JavaScript embedded in the binary; it reads the admin
// API's JSON views and computes rates itself from successive snapshots of
// /v1/golden, so the agent keeps no history and costs nothing when nobody
// looks.

//go:embed web
var webFS embed.FS

// webHandlers serves the page and its assets.
func webHandlers() map[string]http.HandlerFunc {
	sub, err := fs.Sub(webFS, "web")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	files := http.FileServerFS(sub)
	return map[string]http.HandlerFunc{
		"/{$}": func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Cache-Control", "no-cache")
			http.ServeFileFS(w, r, sub, "index.html")
		},
		"/ui/": files.ServeHTTP,
	}
}

// Golden is a snapshot of the cumulative golden metrics (GET /v1/golden):
// the page turns two snapshots into rates, success rates and latency
// percentiles over the time between them.
type Golden struct {
	Time     time.Time      `json:"time"`
	Services []GoldenSeries `json:"services"`
	Edges    []GoldenEdge   `json:"edges"`
}

// GoldenSeries is one direction and service: counters since the agent
// started.
type GoldenSeries struct {
	Direction string  `json:"direction"`
	Service   string  `json:"service"`
	Requests  float64 `json:"requests"`
	Responses float64 `json:"responses"`
	Successes float64 `json:"successes"`
	// Latency is the response_latency_ms histogram: cumulative counts per
	// upper bound (ms), the last bucket being every observation.
	Latency  []Bucket `json:"latency"`
	TCPOpens float64  `json:"tcp_opens"`
	TCPConns float64  `json:"tcp_conns"`
}

// Bucket is one cumulative histogram bucket; LE 0 with Inf set is +Inf.
type Bucket struct {
	LE    float64 `json:"le"`
	Inf   bool    `json:"inf,omitempty"`
	Count float64 `json:"count"`
}

// GoldenEdge is who talked to whom through this host's proxy.
type GoldenEdge struct {
	Direction string  `json:"direction"`
	Client    string  `json:"client"` // SPIFFE ID, "" when not authenticated (inbound) or this host (outbound)
	Server    string  `json:"server"` // SPIFFE ID, "" when unknown
	Service   string  `json:"service"`
	TLS       string  `json:"tls"` // "true" (mTLS) or "no_identity"
	Requests  float64 `json:"requests"`
	TCPOpens  float64 `json:"tcp_opens"`
}

// golden aggregates the registry's proxy metrics into a Golden snapshot.
func golden(g prometheus.Gatherer, now time.Time) (Golden, error) {
	mfs, err := g.Gather()
	if err != nil {
		return Golden{}, err
	}
	type skey struct{ dir, svc string }
	type ekey struct{ dir, client, server, svc, tls string }
	series := map[skey]*GoldenSeries{}
	edges := map[ekey]*GoldenEdge{}
	get := func(l map[string]string) *GoldenSeries {
		k := skey{l["direction"], l["service"]}
		s := series[k]
		if s == nil {
			s = &GoldenSeries{Direction: k.dir, Service: k.svc}
			series[k] = s
		}
		return s
	}
	edge := func(l map[string]string) *GoldenEdge {
		k := ekey{l["direction"], l["client_id"], l["server_id"], l["service"], l["tls"]}
		e := edges[k]
		if e == nil {
			e = &GoldenEdge{Direction: k.dir, Client: k.client, Server: k.server, Service: k.svc, TLS: k.tls}
			edges[k] = e
		}
		return e
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			switch mf.GetName() {
			case "request_total":
				v := m.GetCounter().GetValue()
				get(l).Requests += v
				edge(l).Requests += v
			case "response_total":
				v := m.GetCounter().GetValue()
				s := get(l)
				s.Responses += v
				if l["classification"] == "success" {
					s.Successes += v
				}
			case "response_latency_ms":
				addHistogram(get(l), m.GetHistogram())
			case "tcp_open_total":
				v := m.GetCounter().GetValue()
				get(l).TCPOpens += v
				edge(l).TCPOpens += v
			case "tcp_open_connections":
				get(l).TCPConns += m.GetGauge().GetValue()
			}
		}
	}
	out := Golden{Time: now}
	for _, s := range series {
		out.Services = append(out.Services, *s)
	}
	for _, e := range edges {
		out.Edges = append(out.Edges, *e)
	}
	sort.Slice(out.Services, func(i, j int) bool {
		a, b := out.Services[i], out.Services[j]
		if a.Service != b.Service {
			return a.Service < b.Service
		}
		return a.Direction < b.Direction
	})
	sort.Slice(out.Edges, func(i, j int) bool {
		a, b := out.Edges[i], out.Edges[j]
		if a.Service != b.Service {
			return a.Service < b.Service
		}
		if a.Direction != b.Direction {
			return a.Direction < b.Direction
		}
		return a.Client+a.Server < b.Client+b.Server
	})
	return out, nil
}

// addHistogram adds h's cumulative buckets into s.Latency (same bounds for
// every series of one histogram).
func addHistogram(s *GoldenSeries, h *dto.Histogram) {
	bs := h.GetBucket()
	if len(s.Latency) == 0 {
		for _, b := range bs {
			if math.IsInf(b.GetUpperBound(), 1) {
				continue
			}
			s.Latency = append(s.Latency, Bucket{LE: b.GetUpperBound()})
		}
		s.Latency = append(s.Latency, Bucket{Inf: true})
	}
	for i, b := range bs {
		if i < len(s.Latency)-1 && !math.IsInf(b.GetUpperBound(), 1) {
			s.Latency[i].Count += float64(b.GetCumulativeCount())
		}
	}
	s.Latency[len(s.Latency)-1].Count += float64(h.GetSampleCount())
}
