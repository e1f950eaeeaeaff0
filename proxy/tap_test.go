package proxy

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

// nextEvent waits for the next event of s.
func nextEvent(t *testing.T, s *TapSubscription) TapEvent {
	t.Helper()
	select {
	case ev := <-s.Events():
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no tap event within 5s")
		return TapEvent{}
	}
}

// TestTap: requests and TCP connections through both proxies show up in
// their taps with the identities, status and bytes a user would check;
// filters select; a full queue drops and counts; nobody tapping costs
// nothing (no subscriber left).
func TestTap(t *testing.T) {
	web := listenLocal(t)
	go http.Serve(web, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(201)
		io.WriteString(w, "hello "+r.URL.Path)
	}))
	echo := echoServer(t)
	a, b, _ := meshPair(t, []LocalService{
		{Name: "web", Port: 8080, Target: addrPort(web.Addr())},
		{Name: "db", Port: 5432, Target: echo},
	}, proxyOpts{}, proxyOpts{})

	out := a.p.Tap(TapFilter{}, 0)
	defer out.Close()
	in := b.p.Tap(TapFilter{Direction: "inbound", Service: "web"}, 0)
	defer in.Close()
	other := b.p.Tap(TapFilter{PathPrefix: "/other"}, 0)
	defer other.Close()
	full := a.p.Tap(TapFilter{}, 1)
	defer full.Close()

	client := &http.Client{Transport: &http.Transport{DialContext: a.dialContext}}
	for range 2 {
		resp, err := client.Get("http://198.18.99.2:8080/hello?x=1")
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	ev := nextEvent(t, out)
	want := TapEvent{Kind: TapHTTP, Direction: "outbound", Service: "web", ServerID: "spiffe://vmesh.test/svc/web", TLS: true,
		Method: "GET", Authority: "198.18.99.2:8080", Path: "/hello?x=1", Status: 201, BytesOut: int64(len("hello /hello"))}
	if got := stripTimes(ev); got != want {
		t.Errorf("outbound event\n got %+v\nwant %+v", got, want)
	}
	if ev.LatencyMS <= 0 {
		t.Errorf("outbound latency %v, want > 0", ev.LatencyMS)
	}
	ev = nextEvent(t, in)
	want.Direction, want.ServerID, want.ClientID = "inbound", "", "spiffe://vmesh.test/node/a"
	if got := stripTimes(ev); got != want {
		t.Errorf("inbound event\n got %+v\nwant %+v", got, want)
	}

	// TCP: open, then close with the bytes.
	c := a.dialOut(t, appAddr(5432))
	c.Write([]byte("12345"))
	c.CloseWrite()
	io.ReadAll(c)
	// The second request's event is published once its response went
	// out, and may come after the connection's open.
	var tcp []TapEvent
	for range 3 {
		if ev := nextEvent(t, out); ev.Kind != TapHTTP {
			tcp = append(tcp, ev)
		}
	}
	if len(tcp) != 2 {
		t.Fatalf("events after the second request: %d TCP events %+v, want open and close", len(tcp), tcp)
	}
	if ev := tcp[0]; ev.Kind != TapTCPOpen || ev.Service != "db" || ev.ServerID != "spiffe://vmesh.test/svc/db" {
		t.Errorf("tcp open event %+v", ev)
	}
	if ev := tcp[1]; ev.Kind != TapTCPClose || ev.BytesIn != 5 || ev.BytesOut != 5 {
		t.Errorf("tcp close event %+v, want 5 bytes each way", ev)
	}
	select {
	case ev := <-in.Events():
		if ev.Kind != TapHTTP || ev.Service != "web" {
			t.Errorf("filtered tap got %+v", ev)
		}
	case <-time.After(time.Second):
		t.Error("second inbound request missing")
	}
	select {
	case ev := <-other.Events():
		t.Errorf("path filter /other let through %+v", ev)
	default:
	}
	if full.Dropped() < 3 {
		t.Errorf("queue of 1: dropped %d events, want >= 3 of 4", full.Dropped())
	}
	out.Close()
	in.Close()
	other.Close()
	full.Close()
	if a.p.m.tap.active() || b.p.m.tap.active() {
		t.Error("tap still active with no subscriber")
	}
	if _, ok := <-out.Events(); ok {
		t.Error("events channel open after Close")
	}
}

func stripTimes(ev TapEvent) TapEvent {
	ev.Time, ev.LatencyMS = time.Time{}, 0
	return ev
}

func TestTapFilter(t *testing.T) {
	ev := &TapEvent{Kind: TapHTTP, Direction: "inbound", Service: "web", ClientID: "spiffe://d/node/a", Method: "GET", Path: "/api/x"}
	for _, tc := range []struct {
		f    TapFilter
		want bool
	}{
		{TapFilter{}, true},
		{TapFilter{Service: "web"}, true},
		{TapFilter{Service: "db"}, false},
		{TapFilter{Direction: "outbound"}, false},
		{TapFilter{Identity: "node/a"}, true},
		{TapFilter{Identity: "spiffe://d/node/a"}, true},
		{TapFilter{Identity: "a"}, true},
		{TapFilter{Identity: "node/b"}, false},
		{TapFilter{PathPrefix: "/api"}, true},
		{TapFilter{PathPrefix: "/web"}, false},
		{TapFilter{Method: "get"}, true},
		{TapFilter{Method: "POST"}, false},
	} {
		if got := tc.f.Match(ev); got != tc.want {
			t.Errorf("%+v: match %v, want %v", tc.f, got, tc.want)
		}
	}
	tcp := &TapEvent{Kind: TapTCPClose, Service: "db"}
	if (TapFilter{PathPrefix: "/"}).Match(tcp) || (TapFilter{Method: "GET"}).Match(tcp) {
		t.Error("an HTTP-only filter matched a TCP event")
	}
}

// TestPing: one mTLS round trip to a peer proxy shows the identity it
// presented; a wrong expected identity fails; a client without a
// certificate gets no answer.
func TestPing(t *testing.T) {
	a, b, _ := meshPair(t, []LocalService{{Name: "db", Port: 5432, Target: echoServer(t)}}, proxyOpts{}, proxyOpts{})
	ctx := context.Background()
	res, err := a.p.Ping(ctx, Endpoint{ProxyAddr: b.p.InboundAddr(), Identity: "spiffe://vmesh.test/node/b"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Identity != "spiffe://vmesh.test/node/b" || res.RTT <= 0 || res.Connect <= 0 {
		t.Errorf("ping result %+v", res)
	}
	if res, err := a.p.Ping(ctx, Endpoint{ProxyAddr: b.p.InboundAddr(), Service: "db", Identity: "spiffe://vmesh.test/svc/db"}); err != nil || res.Identity != "spiffe://vmesh.test/svc/db" {
		t.Errorf("service ping: %+v, %v", res, err)
	}
	if _, err := a.p.Ping(ctx, Endpoint{ProxyAddr: b.p.InboundAddr(), Identity: "spiffe://vmesh.test/node/c"}); err == nil || !strings.Contains(err.Error(), "want spiffe://vmesh.test/node/c") {
		t.Errorf("ping of the wrong identity: %v", err)
	}
	if c, err := rawMeshDial(t, b, nil, "", alpnPing); err == nil {
		c.Write(make([]byte, pingSize))
		if !refused(c) {
			t.Error("a client without a certificate got a ping answer")
		}
	}
}

// TestTapHTTP2: requests on the HTTP/2 path are tapped too, when their
// response ends.
func TestTapHTTP2(t *testing.T) {
	web := listenLocal(t)
	srv := &http.Server{Handler: h2c.NewHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The body read before the response: its bytes are counted
		// before the exchange ends, in both proxies.
		io.Copy(io.Discard, r.Body)
		w.WriteHeader(202)
		io.WriteString(w, "h2 "+r.URL.Path)
	}), &http2.Server{})}
	go srv.Serve(web)
	t.Cleanup(func() { srv.Close() })
	a, b, _ := meshPair(t, []LocalService{{Name: "api", Port: 9090, Target: addrPort(web.Addr())}}, proxyOpts{}, proxyOpts{})
	out := a.p.Tap(TapFilter{Method: "POST"}, 0)
	defer out.Close()
	in := b.p.Tap(TapFilter{Identity: "node/a"}, 0)
	defer in.Close()
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, n, addr string, _ *tls.Config) (net.Conn, error) {
		return a.dialContext(ctx, n, addr)
	}}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest("POST", "http://198.18.99.2:9090/v1/x", strings.NewReader("body"))
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	want := TapEvent{Kind: TapHTTP, Direction: "outbound", Service: "api", ServerID: "spiffe://vmesh.test/svc/api", TLS: true,
		Method: "POST", Authority: "198.18.99.2:9090", Path: "/v1/x", Status: 202, BytesIn: 4, BytesOut: int64(len("h2 /v1/x"))}
	if got := stripTimes(nextEvent(t, out)); got != want {
		t.Errorf("outbound h2 event\n got %+v\nwant %+v", got, want)
	}
	want.Direction, want.ServerID, want.ClientID = "inbound", "", "spiffe://vmesh.test/node/a"
	if got := stripTimes(nextEvent(t, in)); got != want {
		t.Errorf("inbound h2 event\n got %+v\nwant %+v", got, want)
	}
}

// BenchmarkTapTCP is the tap's cost per TCP connection (open and close
// events) when nobody taps, and with one subscriber reading everything.
func BenchmarkTapTCP(b *testing.B) {
	m, err := newMetrics(nil)
	if err != nil {
		b.Fatal(err)
	}
	p := &Proxy{m: m}
	l := connLabels{direction: dirOutbound, service: "web", serverID: "spiffe://d/svc/web", tls: tlsTrue}
	b.Run("idle", func(b *testing.B) {
		for b.Loop() {
			m.openTCP(l).close(10, 20)
		}
	})
	b.Run("tapped", func(b *testing.B) {
		s := p.Tap(TapFilter{}, 0)
		done := make(chan struct{})
		go func() {
			for range s.Events() {
			}
			close(done)
		}()
		for b.Loop() {
			m.openTCP(l).close(10, 20)
		}
		s.Close()
		<-done
	})
}
