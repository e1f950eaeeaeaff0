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
