package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// logBuf collects a proxy's log lines (text handler, info and up).
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// lines returns the lines containing every one of subs.
func (l *logBuf) lines(subs ...string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for line := range strings.Lines(l.b.String()) {
		ok := true
		for _, s := range subs {
			ok = ok && strings.Contains(line, s)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

func (l *logBuf) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// TestErrorsWhereTheUserLooks: each failure a user notices is counted with
// its reason and logged once per (reason, peer) per minute on the host that
// saw it, and a refusal by the peer is heard on the client host too.
func TestErrorsWhereTheUserLooks(t *testing.T) {
	echo := echoServer(t)
	first := speaksFirst(t)
	closed := listenLocal(t)
	closedAddr := addrPort(closed.Addr())
	closed.Close() // nothing listens there any more
	var alog, blog logBuf
	a, b, _ := meshPair(t, []LocalService{
		{Name: "smtp", Port: 2525, Target: first},
		{Name: "only-c", Port: 7003, Target: echo, Allow: []string{"spiffe://vmesh.test/node/c"}},
		{Name: "down", Port: 8080, Target: closedAddr},
		{Name: "web-only-c", Port: 7004, Target: echo, Protocol: "http1", Allow: []string{"spiffe://vmesh.test/node/c"}},
	}, proxyOpts{logger: alog.logger(), cfg: func(c *Config) {
		c.DetectTimeout = 200 * time.Millisecond
		c.OpaquePorts = []uint16{7003}
	}}, proxyOpts{logger: blog.logger()})

	// A server-first protocol on a port that is not opaque: the client
	// waits the detection timeout, and the host says why, once.
	for range 2 {
		c := a.dialOut(t, appAddr(2525))
		if line, err := bufio.NewReader(c).ReadString('\n'); line != "220 hello\r\n" {
			t.Fatalf("greeting %q, %v", line, err)
		}
		c.Close()
	}
	if got := metric(t, a.reg, "proxy_errors_total", map[string]string{"direction": "outbound", "reason": errDetectTimeout}); got != 2 {
		t.Errorf("proxy_errors_total{detect_timeout} = %v, want 2", got)
	}
	if got := alog.lines("level=WARN", "protocol detection timed out", "reason=detect_timeout", "dst=198.18.99.2:2525"); len(got) != 1 {
		t.Errorf("detection timeout logged %d times, want once: %q", len(got), got)
	}

	// A TCP connection denied by the peer's policy: the client host hears
	// of it, the server host says who was denied.
	if got := dialRefused(t, a, appAddr(7003), "x"); len(got) != 0 {
		t.Fatalf("denied connection echoed %q", got)
	}
	eventually(t, "peer refusal counted on the client host", func() bool {
		return metric(t, a.reg, "proxy_errors_total", map[string]string{"direction": "outbound", "reason": refusePeer}) == 1
	})
	if got := alog.lines("level=WARN", "peer proxy refused the connection", "reason=peer_refused", "service=only-c"); len(got) != 1 {
		t.Errorf("client host: peer refusal logged %d times, want once: %q", len(got), got)
	}
	if got := metric(t, b.reg, "proxy_errors_total", map[string]string{"direction": "inbound", "reason": errDenied}); got != 1 {
		t.Errorf("server host: proxy_errors_total{denied} = %v, want 1", got)
	}
	if got := blog.lines("level=INFO", "inbound tcp denied", "service=only-c", "client_id=spiffe://vmesh.test/node/a"); len(got) != 1 {
		t.Errorf("server host: denial logged %d times, want once: %q", len(got), got)
	}

	// An HTTP request denied by the peer's policy: 403 for the app, and
	// the client host says the peer refused.
	resp, err := (&http.Client{Transport: &http.Transport{DialContext: a.dialContext}}).Get("http://198.18.99.2:7004/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 403 {
		t.Fatalf("denied HTTP request: status %d", resp.StatusCode)
	}
	// (counted once the response was relayed: the app may see it first)
	eventually(t, "the refused request counted on the client host", func() bool {
		return metric(t, a.reg, "proxy_errors_total", map[string]string{"direction": "outbound", "reason": refusePeer}) == 2
	})
	if got := alog.lines("level=WARN", "peer proxy refused the request", "status=403", "service=web-only-c"); len(got) != 1 {
		t.Errorf("client host: refused request logged %d times, want once: %q", len(got), got)
	}

	// An HTTP service whose app is down: 502, and the server host says so.
	client := &http.Client{Transport: &http.Transport{DialContext: a.dialContext}}
	for range 3 {
		resp, err := client.Get("http://198.18.99.2:8080/x")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 502 {
			t.Fatalf("status %d, want 502", resp.StatusCode)
		}
	}
	if got := metric(t, b.reg, "proxy_errors_total", map[string]string{"direction": "inbound", "reason": refuseDial}); got != 3 {
		t.Errorf("server host: proxy_errors_total{connect} = %v, want 3", got)
	}
	if got := blog.lines("level=WARN", "connecting", "reason=connect", closedAddr.String()); len(got) != 1 {
		t.Errorf("server host: connect failure logged %d times, want once: %q", len(got), got)
	}

	// Passthrough to an address where nothing listens.
	dialRefused(t, a, closedAddr, "")
	eventually(t, "passthrough connect failure counted", func() bool {
		return metric(t, a.reg, "proxy_errors_total", map[string]string{"direction": "outbound", "reason": refuseDial}) == 1
	})
	if got := alog.lines("level=WARN", "outbound passthrough connect failed", "dst="+closedAddr.String()); len(got) != 1 {
		t.Errorf("passthrough connect failure logged %d times, want once: %q", len(got), got)
	}
}

// dialRefused dials dst through tp's outbound proxy, sends send and
// half-closes, and returns what came back before EOF or a reset. The proxy
// resets the app's connection as soon as the peer or the destination
// refuses it, which on a loaded machine can come before the dial has
// returned: a dial reset is that refusal too (nothing came back).
func dialRefused(t *testing.T, tp *testProxy, dst netip.AddrPort, send string) []byte {
	t.Helper()
	c, err := tp.orig.dialFrom(context.Background(), tp.p.OutboundAddr(), dst)
	if errors.Is(err, syscall.ECONNRESET) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if send != "" {
		c.Write([]byte(send))
	}
	c.CloseWrite()
	got, _ := io.ReadAll(c)
	return got
}

func TestWarnLimiterPerKey(t *testing.T) {
	l := newWarnLimiter(time.Minute)
	now := time.Unix(1000, 0)
	l.now = func() time.Time { return now }
	peer := netip.MustParseAddr("198.18.0.2")
	if !l.allow("x", peer) || l.allow("x", peer) {
		t.Fatal("second warning within the interval let through")
	}
	if !l.allowKey("x", "spiffe://d/node/a") || !l.allow("y", peer) {
		t.Fatal("another key held back")
	}
	now = now.Add(time.Minute)
	if !l.allow("x", peer) {
		t.Fatal("warning after the interval held back")
	}
}
