package main

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// listen serves on a loopback port chosen by the kernel.
func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// TestLoopClients runs the harness's loop clients against the backends on
// loopback: every operation is checked end to end, so a broken client or
// backend shows as errors or no operations.
func TestLoopClients(t *testing.T) {
	httpLn, grpcLn, echoLn := listen(t), listen(t), listen(t)
	hs := httpServer()
	go hs.Serve(httpLn)
	t.Cleanup(func() { hs.Close() })
	gs := grpcServer()
	go gs.Serve(grpcLn)
	t.Cleanup(gs.Stop)
	go func() {
		for {
			c, err := echoLn.Accept()
			if err != nil {
				return
			}
			go echo(c)
		}
	}()

	// The HTTP backend speaks h2c with prior knowledge (h2load's mode) on
	// the same port as HTTP/1.1.
	var h2c http.Protocols
	h2c.SetUnencryptedHTTP2(true)
	cl := &http.Client{Transport: &http.Transport{Protocols: &h2c}, Timeout: 5 * time.Second}
	resp, err := cl.Get("http://" + httpLn.Addr().String() + "/whoami")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.Proto != "HTTP/2.0" || !strings.HasSuffix(strings.TrimSpace(string(b)), "HTTP/2.0") {
		t.Errorf("h2c request: response %s, backend saw %q; want HTTP/2.0 both", resp.Proto, b)
	}

	const d = 200 * time.Millisecond
	for _, c := range []struct {
		name string
		run  func() (LoopResult, error)
	}{
		{"grpc sequential", func() (LoopResult, error) { return grpcLoop(grpcLn.Addr().String(), 1, d, 64) }},
		{"grpc concurrent", func() (LoopResult, error) { return grpcLoop(grpcLn.Addr().String(), 8, d, 64) }},
		{"ws", func() (LoopResult, error) { return wsLoop("ws://"+httpLn.Addr().String()+"/ws", 4, d, 64) }},
		{"dial", func() (LoopResult, error) {
			return loop(4, d, func() (func() error, func(), error) {
				return func() error { return roundTrip(echoLn.Addr().String()) }, func() {}, nil
			})
		}},
	} {
		res, err := c.run()
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if res.Errors > 0 || res.Ops == 0 || res.Rate <= 0 || res.P50Ms > res.P99Ms {
			t.Errorf("%s: %+v, want operations, no errors, p50 <= p99", c.name, res)
		}
	}

	// A refused address: every worker's setup fails and is counted.
	res, err := wsLoop("ws://"+echoLn.Addr().String()+"/ws", 2, d, 8)
	if err != nil || res.Errors != 2 || res.Ops != 0 || !strings.Contains(res.FirstError, "websocket") {
		t.Errorf("ws to a non-WebSocket server: %+v, %v; want 2 errors naming the websocket", res, err)
	}
}
