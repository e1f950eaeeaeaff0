package main

import (
	"strings"
	"testing"
	"time"

	"github.com/vmesh/vmesh/proxy"
)

func TestTopAggregates(t *testing.T) {
	var a topAgg
	ev := func(path string, status int, ms float64) *proxy.TapEvent {
		return &proxy.TapEvent{Kind: proxy.TapHTTP, Direction: "outbound", Service: "web", Authority: "web:80", Path: path, Status: status, LatencyMS: ms, BytesOut: 10}
	}
	for i := range 100 {
		a.add(ev("/a?x="+string(rune('0'+i%10)), 200, float64(i+1)))
	}
	a.add(ev("/a", 502, 1))
	a.add(ev("/b", 0, 1)) // no response: a failure
	a.add(&proxy.TapEvent{Kind: proxy.TapTCPOpen, Service: "db"})
	a.add(&proxy.TapEvent{Kind: proxy.TapTCPClose, Service: "db", Direction: "outbound", BytesIn: 5, BytesOut: 7})
	rows := a.snapshot()
	if len(rows) != 3 {
		t.Fatalf("%d rows, want 3 (/a with its queries, /b, tcp db): %+v", len(rows), rows)
	}
	r := rows[0]
	if r.Path != "/a" || r.Count != 101 || r.Successes != 100 || r.P50 != 50 || r.P99 != 99 || r.BytesOut != 1010 {
		t.Errorf("busiest row %+v", r)
	}
	for _, r := range rows[1:] {
		switch {
		case r.TCP && (r.Count != 1 || r.Success != 1 || r.BytesIn != 5 || r.BytesOut != 7):
			t.Errorf("tcp row %+v (the open is not counted, the close is)", r)
		case !r.TCP && (r.Path != "/b" || r.Success != 0):
			t.Errorf("/b row %+v: a request without a response is a failure", r)
		}
	}
}

func TestFormatTap(t *testing.T) {
	ev := &proxy.TapEvent{Time: time.Now(), Kind: proxy.TapHTTP, Direction: "inbound", Service: "web", ClientID: "spiffe://td/node/a",
		TLS: true, Method: "GET", Authority: "web:8080", Path: "/x", Status: 200, LatencyMS: 1.5}
	line := formatTap(ev)
	for _, want := range []string{" in ", "GET web:8080/x 200 1.50ms", "node/a -> svc/web (here) mtls"} {
		if !strings.Contains(line, want) {
			t.Errorf("tap line %q lacks %q", line, want)
		}
	}
}
