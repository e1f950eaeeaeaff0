// Command benchtool is the bench harness's helper, started inside test-bed
// hosts: the backends of the benchmarks (an HTTP server with a small body
// that also speaks h2c with prior knowledge and echoes WebSocket messages on
// /ws, a gRPC server with one unary echo method, a TCP echo server, a server
// that holds connections open) and the clients that no packaged load tool
// covers (a new-connection rate loop, gRPC unary and WebSocket echo loops,
// an opener of many idle connections).
//
//	benchtool http -addr :8080
//	benchtool grpc-server -addr :9003
//	benchtool echo -addr :9001
//	benchtool hold-server -addr :9002
//	benchtool dial -addr 198.18.0.2:9001 -c 16 -t 4s
//	benchtool grpc -addr 198.18.0.2:9003 -c 1 -t 4s
//	benchtool ws -url ws://198.18.0.2:8080/ws -c 16 -t 4s
//	benchtool hold -addr 198.18.0.2:9002 -n 10000 -max 60s
//	benchtool get -url http://198.18.0.2:8080/whoami
//
// The loop clients (dial, grpc, ws) print one LoopResult as JSON on standard
// output, hold a HoldResult. Every loop is bounded in time (and hold in
// count too).
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/websocket"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: benchtool http|echo|hold-server|dial|hold [flags]")
		os.Exit(2)
	}
	cmd, args := os.Args[1], os.Args[2:]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	addr := fs.String("addr", "", "address to listen on or dial")
	var err error
	switch cmd {
	case "http":
		fs.Parse(args)
		err = serveHTTP(*addr)
	case "echo":
		fs.Parse(args)
		err = serveTCP(*addr, echo)
	case "hold-server":
		fs.Parse(args)
		err = serveTCP(*addr, holdConn)
	case "grpc-server":
		fs.Parse(args)
		err = serveGRPC(*addr)
	case "dial":
		c := fs.Int("c", 16, "concurrent dialers")
		d := fs.Duration("t", 4*time.Second, "duration")
		fs.Parse(args)
		err = printLoop(loop(*c, *d, func() (func() error, func(), error) {
			return func() error { return roundTrip(*addr) }, func() {}, nil
		}))
	case "grpc":
		c := fs.Int("c", 1, "concurrent callers, sharing one client connection as grpc-go apps do")
		d := fs.Duration("t", 4*time.Second, "duration")
		size := fs.Int("size", 64, "payload bytes")
		fs.Parse(args)
		err = printLoop(grpcLoop(*addr, *c, *d, *size))
	case "ws":
		url := fs.String("url", "", "WebSocket URL of the echo server")
		c := fs.Int("c", 16, "connections, each sending one message and awaiting its echo in turn")
		d := fs.Duration("t", 4*time.Second, "duration")
		size := fs.Int("size", 64, "message bytes")
		fs.Parse(args)
		err = printLoop(wsLoop(*url, *c, *d, *size))
	case "get":
		url := fs.String("url", "", "URL to GET")
		fs.Parse(args)
		err = get(*url)
	case "hold":
		n := fs.Int("n", 10000, "connections to open")
		c := fs.Int("c", 64, "concurrent openers")
		maxWait := fs.Duration("max", 2*time.Minute, "exit after this long even if not told to")
		fs.Parse(args)
		err = hold(*addr, *n, *c, *maxWait)
	default:
		err = fmt.Errorf("unknown command %q", cmd)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchtool:", err)
		os.Exit(1)
	}
}

// body is what the HTTP backend returns: small, like a health or API reply.
var body = []byte(`{"ok":true,"service":"bench-backend","pad":"0123456789abcdef"}` + "\n")

func serveHTTP(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	return httpServer().Serve(ln)
}

// httpServer is the HTTP backend.
func httpServer() *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	})
	// /whoami tells the harness which peer the backend saw, proving the
	// path a column's traffic takes (direct, through a proxy).
	mux.HandleFunc("/whoami", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.RemoteAddr+" "+r.Proto+"\n")
	})
	// /ws echoes every WebSocket message back as it came (text or binary).
	mux.Handle("/ws", websocket.Handler(wsEcho))
	// HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same port, as
	// h2load and the mesh's HTTP/2 detection expect.
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	return &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, Protocols: &protos}
}

// get prints the body of a GET; a status other than 200 is an error.
func get(url string) error {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("reading body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, b)
	}
	_, err = os.Stdout.Write(b)
	return err
}

func serveTCP(addr string, handle func(net.Conn)) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return fmt.Errorf("accepting: %w", err)
		}
		go handle(c)
	}
}

func echo(c net.Conn) {
	defer c.Close()
	io.Copy(c, c)
}

// holdConn answers the first byte (so the client knows the whole path is
// up) and then holds the connection until the client closes it.
func holdConn(c net.Conn) {
	defer c.Close()
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return
	}
	if _, err := c.Write(b[:]); err != nil {
		return
	}
	io.Copy(io.Discard, c)
}

// roundTrip dials, sends a byte, waits for its echo and closes.
func roundTrip(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte{'x'}); err != nil {
		return err
	}
	var b [1]byte
	_, err = io.ReadFull(c, b[:])
	return err
}

// LoopResult is what the loop clients (dial, grpc, ws) print.
type LoopResult struct {
	// Ops counts the operations that succeeded: connections (dial), calls
	// (grpc), echoed messages (ws).
	Ops     int64   `json:"ops"`
	Errors  int64   `json:"errors"`
	Seconds float64 `json:"seconds"`
	Rate    float64 `json:"rate"` // Ops per second
	P50Ms   float64 `json:"p50_ms"`
	P99Ms   float64 `json:"p99_ms"`
	// FirstError is the first error seen, if any.
	FirstError string `json:"first_error,omitempty"`
}

// printLoop prints a loop client's result as JSON.
func printLoop(res LoopResult, err error) error {
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// loop runs workers until d has passed, each with the operation setup
// returns (and its cleanup), and returns what they did. A worker whose
// setup fails counts one error and stops; after 1,000 errors every worker
// stops.
func loop(workers int, d time.Duration, setup func() (op func() error, done func(), err error)) (LoopResult, error) {
	var (
		ok, bad  atomic.Int64
		mu       sync.Mutex
		lat      []time.Duration
		firstErr string
		wg       sync.WaitGroup
	)
	fail := func(err error) {
		if bad.Add(1) == 1 {
			mu.Lock()
			firstErr = err.Error()
			mu.Unlock()
		}
	}
	// Every worker sets up first (connections opened), then the clock
	// starts for all at once.
	var (
		ready    sync.WaitGroup
		start    time.Time
		deadline time.Time
	)
	begin := make(chan struct{})
	for range workers {
		wg.Add(1)
		ready.Add(1)
		go func() {
			defer wg.Done()
			op, done, err := setup()
			ready.Done()
			<-begin
			if err != nil {
				fail(err)
				return
			}
			defer done()
			mine := make([]time.Duration, 0, 4096)
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if err := op(); err != nil {
					fail(err)
					if bad.Load() > 1000 {
						break
					}
					continue
				}
				mine = append(mine, time.Since(t0))
				ok.Add(1)
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	ready.Wait()
	start = time.Now()
	deadline = start.Add(d)
	close(begin)
	wg.Wait()
	el := time.Since(start).Seconds()
	slices.Sort(lat)
	pct := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000
	}
	return LoopResult{
		Ops: ok.Load(), Errors: bad.Load(), Seconds: el, Rate: float64(ok.Load()) / el,
		P50Ms: pct(0.50), P99Ms: pct(0.99), FirstError: firstErr,
	}, nil
}

// HoldResult is what `benchtool hold` prints once its connections are open.
type HoldResult struct {
	Open       int     `json:"open"`
	Errors     int     `json:"errors"`
	Seconds    float64 `json:"seconds"`
	FirstError string  `json:"first_error,omitempty"`
}

// hold opens n connections (each answered end to end), prints a HoldResult,
// then keeps them open until standard input closes, SIGTERM, or maxWait.
func hold(addr string, n, workers int, maxWait time.Duration) error {
	var (
		mu       sync.Mutex
		conns    []net.Conn
		errs     int
		firstErr string
		next     atomic.Int64
		wg       sync.WaitGroup
	)
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				c, err := openHeld(addr)
				mu.Lock()
				if err != nil {
					errs++
					if firstErr == "" {
						firstErr = err.Error()
					}
				} else {
					conns = append(conns, c)
				}
				mu.Unlock()
				if err != nil && errs > 100 {
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := json.NewEncoder(os.Stdout).Encode(HoldResult{
		Open: len(conns), Errors: errs, Seconds: time.Since(start).Seconds(), FirstError: firstErr,
	}); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(done) }()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-done:
	case <-sig:
	case <-time.After(maxWait):
	}
	for _, c := range conns {
		c.Close()
	}
	return nil
}

func openHeld(addr string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	if _, err := c.Write([]byte{'h'}); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := io.ReadFull(c, b[:]); err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}
