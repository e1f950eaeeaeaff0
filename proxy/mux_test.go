package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// TestOpaqueStreamsShareOneHandshake checks that opaque connections to one
// peer ride HTTP/2 streams on one pooled mTLS connection: N sequential
// connections make one handshake, are counted as TCP on both sides and
// never as HTTP requests.
func TestOpaqueStreamsShareOneHandshake(t *testing.T) {
	const n = 20
	backend := echoServer(t)
	svc := LocalService{Name: "redis", Port: 6379, Target: backend, Protocol: "opaque"}
	d := &recordingDialer{}
	a, b, _ := meshPair(t, []LocalService{svc}, proxyOpts{dialer: d, cfg: func(c *Config) { c.MultiplexOpaque = true }}, proxyOpts{})
	for i := range n {
		c := a.dialOut(t, appAddr(6379))
		msg := []byte(fmt.Sprintf("PING %d\r\n", i))
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		c.CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("connection %d: echo %q, %v; want %q", i, got, err, msg)
		}
		c.Close()
	}
	eventually(t, "both sides to count the closed connections", func() bool {
		return metric(t, a.reg, "tcp_close_total", map[string]string{"direction": "outbound", "service": "redis", "server_id": "spiffe://vmesh.test/svc/redis", "tls": "true"}) == n &&
			metric(t, b.reg, "tcp_close_total", map[string]string{"direction": "inbound", "service": "redis", "client_id": "spiffe://vmesh.test/node/a", "tls": "true"}) == n
	})
	if got := d.count(); got != 1 {
		t.Errorf("%d connections to the peer proxy (mTLS handshakes) for %d opaque connections, want 1", got, n)
	}
	if got := metric(t, b.reg, "inbound_tcp_authz_allow_total", map[string]string{"service": "redis", "client_id": "spiffe://vmesh.test/node/a"}); got != n {
		t.Errorf("inbound_tcp_authz_allow_total = %v, want %d", got, n)
	}
	for _, tp := range []*testProxy{a, b} {
		if got := metric(t, tp.reg, "request_total", nil); got != 0 {
			t.Errorf("%s: request_total = %v, want 0 (opaque streams are not HTTP requests)", tp.name, got)
		}
		if got := metric(t, tp.reg, "inbound_http_authz_allow_total", nil); got != 0 {
			t.Errorf("%s: inbound_http_authz_allow_total = %v, want 0", tp.name, got)
		}
		if got := metric(t, tp.reg, "tcp_open_connections", nil); got != 0 {
			t.Errorf("%s: tcp_open_connections = %v, want 0", tp.name, got)
		}
	}
	if got := metric(t, a.reg, "tcp_read_bytes_total", map[string]string{"direction": "outbound"}); got != metric(t, b.reg, "tcp_write_bytes_total", map[string]string{"direction": "inbound"}) || got == 0 {
		t.Errorf("outbound read %v bytes, inbound wrote %v", got, metric(t, b.reg, "tcp_write_bytes_total", map[string]string{"direction": "inbound"}))
	}
}

// TestOpaqueStalledStreamDoesNotBlockOthers checks that a service that stops
// reading holds back only its own stream: another opaque connection to the
// same peer (the same pooled HTTP/2 connection) still flows.
func TestOpaqueStalledStreamDoesNotBlockOthers(t *testing.T) {
	stalled := make(chan struct{})
	sink := serveConns(listenLocal(t), func(c net.Conn) { <-stalled })
	backend := echoServer(t)
	d := &recordingDialer{}
	a, _, _ := meshPair(t, []LocalService{
		{Name: "sink", Port: 7000, Target: sink, Protocol: "opaque"},
		{Name: "echo", Port: 7001, Target: backend, Protocol: "opaque"},
	}, proxyOpts{dialer: d, cfg: func(c *Config) { c.MultiplexOpaque = true }, tune: spread(1)}, proxyOpts{})
	// Release the sink before the proxies close (cleanups run last first):
	// a proxy's Close waits for relays blocked writing to it.
	t.Cleanup(func() { close(stalled) })
	// Pools are per (peer, service identity): address the sink as the echo
	// service so both streams share one pooled connection (one session, by
	// spread(1): no spreading over cores).
	ep := a.cat.Resolve(appAddr(7001)).Endpoint
	ep.Addr = appAddr(7000)
	a.cat.add(ep)

	s := a.dialOut(t, appAddr(7000))
	// Push until the stream is stalled: the app's writes block.
	chunk := make([]byte, 64<<10)
	for written := 0; ; written += len(chunk) {
		s.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
		if _, err := s.Write(chunk); err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatal(err)
			}
			if written < 1<<20 {
				t.Fatalf("stalled after %d bytes", written)
			}
			break
		}
		if written > 64<<20 {
			t.Fatal("the sink never stalled")
		}
	}
	c := a.dialOut(t, appAddr(7001))
	msg := bytes.Repeat([]byte("x"), 2<<20)
	go func() {
		c.Write(msg)
		c.CloseWrite()
	}()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo beside a stalled stream: %d bytes, %v", len(got), err)
	}
	if got := d.count(); got != 1 {
		t.Errorf("%d connections to the peer proxy, want 1 (both streams on one)", got)
	}
}

// Concurrent opaque connections to one peer are spread over as many
// sessions as there are cores (one session encrypts on one core at a
// time), the fewest-loaded first; never more.
func TestOpaqueStreamsSpreadOverSessions(t *testing.T) {
	backend := echoServer(t)
	svc := LocalService{Name: "redis", Port: 6379, Target: backend, Protocol: "opaque"}
	d := &recordingDialer{}
	a, _, _ := meshPair(t, []LocalService{svc}, proxyOpts{dialer: d, tune: spread(2)}, proxyOpts{})
	for i := range 6 {
		c := a.dialOut(t, appAddr(6379)) // left open: its stream stays
		msg := []byte(fmt.Sprintf("PING %d\r\n", i))
		c.Write(msg)
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("connection %d: echo %q, %v", i, got, err)
		}
	}
	if got := d.count(); got != 2 {
		t.Errorf("%d sessions (mTLS handshakes) for 6 concurrent opaque connections with spread 2, want 2", got)
	}
	a.p.muxes.mu.Lock()
	var loads []int
	for _, list := range a.p.muxes.ss {
		for _, s := range list {
			n, _ := s.Load()
			loads = append(loads, n)
		}
	}
	a.p.muxes.mu.Unlock()
	if len(loads) != 2 || loads[0] != 3 || loads[1] != 3 {
		t.Errorf("streams per session %v, want [3 3]", loads)
	}
}

// A burst of first connections or requests to a peer (h2load opens 80
// streams at once) makes at most as many sessions as the pool spreads
// over: while a session is being dialed and none is live, streams wait
// for it instead of each dialing its own (it made 80 mTLS connections,
// one request on each: no batching between the proxies).
func TestMuxBurstDialsSpreadOnly(t *testing.T) {
	const burst = 40
	t.Run("opaque", func(t *testing.T) {
		backend := echoServer(t)
		d := &recordingDialer{}
		a, _, _ := meshPair(t, []LocalService{{Name: "redis", Port: 6379, Target: backend, Protocol: "opaque"}}, proxyOpts{dialer: d, tune: spread(2)}, proxyOpts{})
		conns := make([]net.Conn, burst)
		for i := range conns {
			conns[i] = a.dialOut(t, appAddr(6379)) // accepted, not yet routed to a stream
		}
		errs := make(chan error, burst)
		for i, c := range conns {
			go func() {
				msg := []byte(fmt.Sprintf("PING %d\r\n", i))
				c.Write(msg)
				got := make([]byte, len(msg))
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
					errs <- fmt.Errorf("connection %d: echo %q, %v", i, got, err)
					return
				}
				errs <- nil
			}()
		}
		for range burst {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		if got := d.count(); got > 2 {
			t.Errorf("%d sessions (mTLS handshakes) for a burst of %d opaque connections with spread 2, want at most 2", got, burst)
		}
	})
	t.Run("http2", func(t *testing.T) {
		ap, _ := h2Backend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
		d := &recordingDialer{}
		a, _, _ := meshPair(t, []LocalService{{Name: "svc", Port: 9090, Target: ap, Protocol: "http2"}}, proxyOpts{dialer: d, tune: spread(2)}, proxyOpts{})
		tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			return a.dialOut(t, appAddr(9090)), nil
		}}
		t.Cleanup(tr.CloseIdleConnections)
		cl := &http.Client{Transport: tr, Timeout: 10 * time.Second}
		errs := make(chan error, burst)
		for i := range burst {
			go func() {
				resp, err := cl.Get("http://svc:9090/" + strconv.Itoa(i))
				if err != nil {
					errs <- err
					return
				}
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil || string(b) != "ok" {
					err = fmt.Errorf("request %d: %d %q, %v", i, resp.StatusCode, b, err)
				}
				errs <- err
			}()
		}
		for range burst {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		if got := d.count(); got > 2 {
			t.Errorf("%d sessions (mTLS handshakes) for a burst of %d first requests with spread 2, want at most 2", got, burst)
		}
	})
}

// spread is a proxyOpts tune: opaque streams to one peer spread over at
// most n sessions.
func spread(n int) func(*testProxy) {
	return func(tp *testProxy) { tp.p.muxes.spread = n }
}
