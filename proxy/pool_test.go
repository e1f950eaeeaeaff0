package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// recordingDialer dials with a net.Dialer and remembers every connection,
// in order, and whether it was closed.
type recordingDialer struct {
	mu    sync.Mutex
	conns []*recordedConn
}

type recordedConn struct {
	net.Conn
	closed atomic.Bool
}

func (c *recordedConn) Close() error {
	c.closed.Store(true)
	return c.Conn.Close()
}

func (d *recordingDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var nd net.Dialer
	c, err := nd.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	rc := &recordedConn{Conn: c}
	d.mu.Lock()
	d.conns = append(d.conns, rc)
	d.mu.Unlock()
	return rc, nil
}

func (d *recordingDialer) conn(i int) *recordedConn {
	d.mu.Lock()
	defer d.mu.Unlock()
	if i >= len(d.conns) {
		return nil
	}
	return d.conns[i]
}

func (d *recordingDialer) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.conns)
}

// closedAfterSweep reports whether c is closed, first closing the idle
// connections of retired transports (a connection may still be finishing
// its last request when its transport is evicted).
func closedAfterSweep(pool *peerPool, c *recordedConn) func() bool {
	return func() bool {
		pool.mu.Lock()
		pool.closeRetiredLocked(pool.now())
		pool.mu.Unlock()
		return c.closed.Load()
	}
}

// TestPeerPoolEviction checks that HTTP/2 transports to peer proxies are
// dropped, with their idle connections, when unused for the idle timeout and
// when the pool is full (least recently used first).
func TestPeerPoolEviction(t *testing.T) {
	ln := listenLocal(t)
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }), Protocols: &protos}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	backend := addrPort(ln.Addr())

	dialer := &recordingDialer{}
	services := []LocalService{{Name: "s1", Port: 81, Target: backend}, {Name: "s2", Port: 82, Target: backend}, {Name: "s3", Port: 83, Target: backend}}
	a, b, _ := meshPair(t, services, proxyOpts{dialer: dialer}, proxyOpts{})
	var clock atomic.Int64 // nanoseconds since start
	start := time.Now()
	pool := a.p.pool
	pool.now = func() time.Time { return start.Add(time.Duration(clock.Load())) }
	pool.max = 2
	// HTTP/2 from the app: HTTP/1 takes the lean path's pool (h1pool.go).
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, n, addr string, _ *tls.Config) (net.Conn, error) {
		return a.dialContext(ctx, n, addr)
	}}
	client := &http.Client{Transport: tr}
	t.Cleanup(tr.CloseIdleConnections)
	get := func(port int) {
		t.Helper()
		resp, err := client.Get(fmt.Sprintf("http://198.18.99.2:%d/", port))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "ok" {
			t.Fatalf("port %d: %d %q", port, resp.StatusCode, body)
		}
	}
	peerConn := func(i int) *recordedConn {
		t.Helper()
		c := dialer.conn(i)
		if c == nil || c.RemoteAddr().String() != b.p.InboundAddr().String() {
			t.Fatalf("connection %d is not to the peer proxy: %v", i, c)
		}
		return c
	}

	get(81) // conn 0: s1
	get(81) // reused
	if n := dialer.count(); n != 1 || pool.size() != 1 {
		t.Fatalf("after two requests to s1: %d connections, %d transports; want 1, 1", n, pool.size())
	}
	s1 := peerConn(0)

	// Idle: s1 is unused for the idle timeout; the next request sweeps it.
	clock.Add(int64(pool.idle + time.Second))
	get(82) // conn 1: s2
	if got := pool.size(); got != 1 {
		t.Errorf("after s1 idled out: %d transports, want 1", got)
	}
	eventually(t, "s1's connection to close", closedAfterSweep(pool, s1))
	s2 := peerConn(1)

	// Bounded: with room for 2, s1 comes back and s3 pushes out s2, the
	// least recently used.
	clock.Add(int64(time.Second))
	get(81) // conn 2: s1 again, a fresh connection
	clock.Add(int64(time.Second))
	get(83) // conn 3: s3
	if got := pool.size(); got != 2 {
		t.Errorf("pool of at most 2 holds %d transports", got)
	}
	eventually(t, "s2's connection to close", closedAfterSweep(pool, s2))
	if c := peerConn(2); c.closed.Load() {
		t.Error("s1's new connection was closed, want kept (recently used)")
	}
	if n := dialer.count(); n != 4 {
		t.Errorf("%d connections dialed, want 4", n)
	}
}
