package main

import (
	"math"
	"strings"
	"testing"
	"time"
)

const metricsBefore = `
# TYPE request_total counter
request_total{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true"} 100
# TYPE response_total counter
response_total{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true",status_code="200",classification="success"} 100
# TYPE response_latency_ms histogram
response_latency_ms_bucket{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true",le="1"} 100
response_latency_ms_bucket{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true",le="10"} 100
response_latency_ms_bucket{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true",le="+Inf"} 100
response_latency_ms_sum{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true"} 50
response_latency_ms_count{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true"} 100
`

const metricsAfter = `
# TYPE request_total counter
request_total{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true"} 300
# TYPE response_total counter
response_total{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true",status_code="200",classification="success"} 250
response_total{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true",status_code="503",classification="failure"} 50
# TYPE response_latency_ms histogram
response_latency_ms_bucket{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true",le="1"} 200
response_latency_ms_bucket{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true",le="10"} 300
response_latency_ms_bucket{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true",le="+Inf"} 300
response_latency_ms_sum{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true"} 500
response_latency_ms_count{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true"} 300
# TYPE tcp_open_connections gauge
tcp_open_connections{direction="inbound",service="web",client_id="spiffe://td/node/a",server_id="",tls="true"} 4
`

func TestGoldenStats(t *testing.T) {
	b, err := parseMetrics(strings.NewReader(metricsBefore))
	if err != nil {
		t.Fatal(err)
	}
	a, err := parseMetrics(strings.NewReader(metricsAfter))
	if err != nil {
		t.Fatal(err)
	}
	rows := goldenStats(b, a, 2*time.Second)
	if len(rows) != 1 {
		t.Fatalf("rows = %+v", rows)
	}
	r := rows[0]
	// 200 requests in 2s; 150 of 200 responses succeeded; half the window's
	// requests took <= 1ms, the other half 1-10ms.
	if r.rps != 100 || math.Abs(r.success-0.75) > 1e-9 || r.tcpConns != 4 {
		t.Fatalf("row = %+v", r)
	}
	if r.p50 != 1 || r.p99 < 9.5 || r.p99 > 10 {
		t.Fatalf("p50 = %v, p99 = %v", r.p50, r.p99)
	}
	// Per-status breakdown of the window: 150 more 200s, 50 new 503s.
	if r.byStatus["200"] != 150 || r.byStatus["503"] != 50 || statusSummary(r.byStatus) != "200:150 503:50" {
		t.Fatalf("by status = %v", r.byStatus)
	}
	j := r.json(2 * time.Second)
	if j.Success == nil || *j.Success != 0.75 || j.RPS != 100 || j.Window != "2s" {
		t.Fatalf("json row = %+v", j)
	}
}

func TestGoStyleFlags(t *testing.T) {
	got := strings.Join(goStyleFlags([]string{"agent", "-dev", "-config=/x", "-c", "/y", "--socket", "s", "-o", "json"}), " ")
	want := "agent --dev --config=/x -c /y --socket s -o json"
	if got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

// Endpoint rows: a 90/10 split shows each subset's share of the window's
// requests, its success rate and its measured p50.
func TestEndpointStats(t *testing.T) {
	b, _ := parseMetrics(strings.NewReader(`
# TYPE endpoint_requests_total counter
endpoint_requests_total{service="web",endpoint="web1",subset="stable",result="success"} 10
`))
	a, err := parseMetrics(strings.NewReader(`
# TYPE endpoint_requests_total counter
endpoint_requests_total{service="web",endpoint="web1",subset="stable",result="success"} 190
endpoint_requests_total{service="web",endpoint="web2",subset="canary",result="success"} 18
endpoint_requests_total{service="web",endpoint="web2",subset="canary",result="failure"} 2
# TYPE endpoint_response_latency_ms histogram
endpoint_response_latency_ms_bucket{service="web",endpoint="web2",le="1"} 0
endpoint_response_latency_ms_bucket{service="web",endpoint="web2",le="10"} 18
endpoint_response_latency_ms_bucket{service="web",endpoint="web2",le="+Inf"} 18
endpoint_response_latency_ms_sum{service="web",endpoint="web2"} 90
endpoint_response_latency_ms_count{service="web",endpoint="web2"} 18
`))
	if err != nil {
		t.Fatal(err)
	}
	rows := endpointStats(b, a, 2*time.Second)
	if len(rows) != 2 || rows[0].subset != "canary" || rows[1].subset != "stable" {
		t.Fatalf("rows = %+v", rows)
	}
	canary, stable := rows[0], rows[1]
	if stable.rps != 90 || math.Abs(stable.share-0.9) > 1e-9 || stable.success != 1 {
		t.Errorf("stable = %+v", stable)
	}
	if canary.rps != 10 || math.Abs(canary.share-0.1) > 1e-9 || canary.success != 0.9 || canary.p50 < 1 || canary.p50 > 10 {
		t.Errorf("canary = %+v", canary)
	}
	if j := canary.json(2 * time.Second); j.Subset != "canary" || j.Endpoint != "web2" || *j.Success != 0.9 {
		t.Errorf("json = %+v", j)
	}
}
