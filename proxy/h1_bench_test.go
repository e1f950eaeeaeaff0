package proxy

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// rawHTTPApp is the cheapest HTTP/1.1 keep-alive server there is: it reads
// request heads (no bodies) and answers each with a fixed response, so a
// benchmark measures the proxies, not the app.
func rawHTTPApp(t testing.TB) netip.AddrPort {
	ln := listenLocal(t)
	resp := []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
	return serveConns(ln, func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			for {
				line, err := br.ReadSlice('\n')
				if err != nil {
					return
				}
				if len(line) <= 2 {
					break
				}
			}
			if _, err := c.Write(resp); err != nil {
				return
			}
		}
	})
}

// readFixedResponse reads one response with a Content-Length body.
func readFixedResponse(br *bufio.Reader) error {
	n := -1
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return err
		}
		if len(line) <= 2 {
			break
		}
		if v, ok := bytes.CutPrefix(line, []byte("Content-Length: ")); ok {
			n, _ = strconv.Atoi(string(bytes.TrimSpace(v)))
		}
	}
	if n < 0 {
		return io.ErrUnexpectedEOF
	}
	_, err := br.Discard(n)
	return err
}

type cpuUsage struct {
	cpu      time.Duration
	switches int64 // voluntary + involuntary context switches
}

func processUsage() cpuUsage {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return cpuUsage{
		cpu:      time.Duration(ru.Utime.Nano() + ru.Stime.Nano()),
		switches: ru.Nvcsw + ru.Nivcsw,
	}
}

// BenchmarkHTTP1Mesh measures one keep-alive HTTP/1.1 request through two
// proxies on loopback (app -> A -> mTLS -> B -> app), with conns client
// connections in parallel. cpu-us/op is the whole process's CPU per
// request: both proxies, plus a raw client and app that cost little.
func BenchmarkHTTP1Mesh(b *testing.B) {
	for _, mode := range []string{"direct", "mesh", "mux"} {
		for _, conns := range []int{1, 16, 64} {
			b.Run(mode+"/conns="+strconv.Itoa(conns), func(b *testing.B) { benchHTTP1(b, mode, conns, 0) })
		}
		// A low rate (one request per millisecond per connection), where
		// a request's cost is mostly waking parked threads.
		b.Run(mode+"/paced", func(b *testing.B) { benchHTTP1(b, mode, 4, time.Millisecond) })
	}
}

// benchHTTP1 runs keep-alive requests over conns connections, through the
// mesh ("mesh": pooled mTLS connections between the proxies; "mux": streams
// of internal/mux sessions) or, the baseline (the cost of the client and
// the app alone), directly to the app ("direct").
func benchHTTP1(b *testing.B, mode string, conns int, pace time.Duration) {
	backend := rawHTTPApp(b)
	mesh := mode != "direct"
	var a *testProxy
	if mesh {
		a, _, _ = meshPair(b, []LocalService{{Name: "web", Port: 80, Target: backend}},
			proxyOpts{tune: func(a *testProxy) { a.p.h1Mux = mode == "mux" }}, proxyOpts{})
	}
	req := []byte("GET /bench HTTP/1.1\r\nHost: web\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n")
	type client struct {
		c  net.Conn
		br *bufio.Reader
	}
	cs := make([]client, conns)
	for i := range cs {
		var c net.Conn
		if mesh {
			c = a.dialOut(b, appAddr(80))
		} else {
			var err error
			if c, err = net.Dial("tcp", backend.String()); err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { c.Close() })
		}
		cs[i] = client{c, bufio.NewReader(c)}
		c.Write(req)
		if err := readFixedResponse(cs[i].br); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	u0 := processUsage()
	b.ResetTimer()
	var wg sync.WaitGroup
	per := b.N / conns
	for i := range cs {
		n := per
		if i == 0 {
			n += b.N % conns
		}
		wg.Add(1)
		go func(cl client) {
			defer wg.Done()
			var tick *time.Ticker
			if pace > 0 {
				tick = time.NewTicker(pace)
				defer tick.Stop()
			}
			for range n {
				if tick != nil {
					<-tick.C
				}
				if _, err := cl.c.Write(req); err != nil {
					b.Error(err)
					return
				}
				if err := readFixedResponse(cl.br); err != nil {
					b.Error(err)
					return
				}
			}
		}(cs[i])
	}
	wg.Wait()
	b.StopTimer()
	u1 := processUsage()
	b.ReportMetric(float64(u1.cpu-u0.cpu)/float64(time.Microsecond)/float64(b.N), "cpu-us/op")
	b.ReportMetric(float64(u1.switches-u0.switches)/float64(b.N), "ctxsw/op")
}

// BenchmarkHTTP1IdleMemory reports the heap and stack held per idle
// keep-alive HTTP/1 connection through two proxies (both in this process),
// after one request each.
func BenchmarkHTTP1IdleMemory(b *testing.B) {
	backend := rawHTTPApp(b)
	a, _, _ := meshPair(b, []LocalService{{Name: "web", Port: 80, Target: backend}}, proxyOpts{}, proxyOpts{})
	req := []byte("GET /bench HTTP/1.1\r\nHost: web\r\n\r\n")
	const n = 500
	before := memInUse()
	for range n {
		c := a.dialOut(b, appAddr(80))
		c.Write(req)
		if err := readFixedResponse(bufio.NewReader(c)); err != nil {
			b.Fatal(err)
		}
	}
	after := memInUse()
	b.ReportMetric(float64(after-before)/n, "bytes/conn")
	for range b.N {
	}
}

func memInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse + ms.StackInuse
}

// BenchmarkUpgrade measures a new app connection that upgrades (as a
// WebSocket does) and echoes one message through two proxies.
func BenchmarkUpgrade(b *testing.B) {
	backend := serveUpgrade(b, listenLocal(b))
	a, _, _ := meshPair(b, []LocalService{{Name: "ws", Port: 8081, Target: backend}}, proxyOpts{}, proxyOpts{})
	req := []byte("GET /ws HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	buf := make([]byte, 4)
	b.ReportAllocs()
	u0 := processUsage()
	b.ResetTimer()
	for range b.N {
		c, err := a.orig.dialFrom(context.Background(), a.p.OutboundAddr(), appAddr(8081))
		if err != nil {
			b.Fatal(err)
		}
		c.Write(req)
		br := bufio.NewReader(c)
		for {
			line, err := br.ReadSlice('\n')
			if err != nil {
				b.Fatal(err)
			}
			if len(line) <= 2 {
				break
			}
		}
		c.Write([]byte("ping"))
		if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "ping" {
			b.Fatalf("echo %q %v", buf, err)
		}
		c.Close()
	}
	b.StopTimer()
	u1 := processUsage()
	b.ReportMetric(float64(u1.cpu-u0.cpu)/float64(time.Microsecond)/float64(b.N), "cpu-us/op")
}
