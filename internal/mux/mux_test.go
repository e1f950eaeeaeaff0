package mux

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// pair starts a server session on one end of a real TCP loopback
// connection and returns the client session on the other. handle serves
// each stream the client opens.
func pair(t testing.TB, cfg Config, handle func(*Stream)) *Session {
	t.Helper()
	return pairInline(t, cfg, handle, nil)
}

// pairInline is pair with the server session's inline handler (SetInline).
func pairInline(t testing.TB, cfg Config, handle func(*Stream), inline func(*Stream) bool) *Session {
	t.Helper()
	cc, sc := tcpPair(t)
	// Wires on both sides, as the proxy has them: sinks are written in
	// batches from the read loop, flushes leave in one write.
	srv := Server(NewWire(sc), cfg, handle)
	if inline != nil {
		srv.SetInline(inline, nil)
	}
	go srv.Serve()
	cli := Client(NewWire(cc), cfg)
	t.Cleanup(func() { cli.Close(); srv.Close() })
	return cli
}

// tcpPair returns both ends of a real TCP loopback connection: the
// dialed one and the accepted one.
func tcpPair(t testing.TB) (dialed, accepted net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- nil
			return
		}
		done <- c
	}()
	cc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sc := <-done
	if sc == nil {
		t.Fatal("accept failed")
	}
	return cc, sc
}

// echo accepts a stream and echoes it, half-closing after its peer did.
func echo(st *Stream) {
	st.Accept()
	io.Copy(st, st)
	st.CloseWrite()
}

// Streams opened at once from many goroutines reach the peer in ID order:
// the peer would end the whole session on an ID lower than one it saw.
func TestConcurrentOpens(t *testing.T) {
	cli := pair(t, Config{}, echo)
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				st, err := cli.Open([]byte{byte(i)})
				if err != nil && err.Error() == "mux: session full" {
					time.Sleep(time.Millisecond)
					continue
				}
				if err != nil {
					errs <- err
					return
				}
				if err := st.Accepted(5 * time.Second); err != nil {
					errs <- err
					return
				}
				msg := bytes.Repeat([]byte{byte(i)}, 1000)
				st.Write(msg)
				st.CloseWrite()
				got, err := io.ReadAll(st)
				if err != nil || !bytes.Equal(got, msg) {
					errs <- errors.New("echo mismatch")
				}
				st.Close()
				return
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := cli.Err(); err != nil {
		t.Errorf("session ended: %v", err)
	}
}

// A stream counts against MaxStreams until both sides sent their END, not
// until its data is read: with a limit of one, a client that read the
// server's END opens the next stream at once, though the server's app has
// not read the first stream's request (as an HTTP/2 peer would).
func TestEndedStreamFreesItsSlot(t *testing.T) {
	held := make(chan *Stream, 4)
	cli := pair(t, Config{MaxStreams: 1}, func(st *Stream) {
		st.Accept()
		st.Write([]byte("answer"))
		st.CloseWrite()
		held <- st // its request stays unread
	})
	for i := range 3 {
		st, err := cli.Open(nil)
		if err != nil {
			t.Fatalf("stream %d: open: %v", i, err)
		}
		if err := st.Accepted(5 * time.Second); err != nil {
			t.Fatalf("stream %d: %v (refused: the ended stream before it still held the slot)", i, err)
		}
		st.Write(bytes.Repeat([]byte{'r'}, 1000))
		st.CloseWrite()
		got, err := io.ReadAll(st)
		if err != nil || string(got) != "answer" {
			t.Fatalf("stream %d: read %q, %v", i, got, err)
		}
		st.Close()
		select {
		case <-held:
		case <-time.After(5 * time.Second):
			t.Fatalf("stream %d: the server's handler never ran", i)
		}
	}
}

// A peer that sends PINGs while the session cannot write their acks (it
// does not read them) ends the session once 1,000 wait, instead of
// holding a goroutine per PING.
func TestPingFloodEndsSession(t *testing.T) {
	cc, sc := tcpPair(t)
	srv := Server(NewWire(sc), Config{}, func(st *Stream) { st.Reset(CodeCancel) })
	go srv.Serve()
	cli := Client(NewWire(cc), Config{})
	t.Cleanup(func() { cli.Close(); srv.Close() })

	srv.wmu.Lock() // the server's writer is stuck: no ack leaves
	base := runtime.NumGoroutine()
	for i := range 1500 {
		if err := cli.write(func(fr *http2.Framer) error { return fr.WritePing(false, [8]byte{byte(i)}) }); err != nil {
			break // the server closed the connection
		}
	}
	select {
	case <-srv.Done():
	case <-time.After(5 * time.Second):
		t.Errorf("the session is still up after 1,500 PINGs with no ack written; %d goroutines more than before", runtime.NumGoroutine()-base)
	}
	srv.wmu.Unlock()
	if err := srv.Err(); !errors.Is(err, errControlFlood) {
		t.Errorf("session ended with %v, want the flood error", err)
	}
}

// The server half-closes first and still receives everything the client
// sends afterwards, more than one window of it.
func TestServerClosesFirst(t *testing.T) {
	got := make(chan [32]byte, 1)
	cli := pair(t, Config{StreamWindow: 64 << 10}, func(st *Stream) {
		st.Accept()
		st.Write([]byte("bye"))
		st.CloseWrite()
		h := sha256.New()
		io.Copy(h, st)
		var sum [32]byte
		copy(sum[:], h.Sum(nil))
		got <- sum
		st.Close()
	})
	st, err := cli.Open(nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Accepted(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(st) // the server's EOF comes first
	if err != nil || string(b) != "bye" {
		t.Fatalf("read %q, %v", b, err)
	}
	data := bytes.Repeat([]byte("after the server's FIN "), 200_000) // ~4.6 MB
	if _, err := st.Write(data); err != nil {
		t.Fatal(err)
	}
	st.CloseWrite()
	if sum := <-got; sum != sha256.Sum256(data) {
		t.Error("the server did not receive everything sent after its half-close")
	}
}

// A reset on one stream ends it on both sides; the session and the other
// streams live on.
func TestResetIsolated(t *testing.T) {
	cli := pair(t, Config{StreamWindow: 64 << 10}, func(st *Stream) {
		st.Accept()
		if len(st.Header()) > 0 && st.Header()[0] == 'r' {
			io.CopyN(io.Discard, st, 100<<10)
			st.Reset(CodeCancel)
			return
		}
		echo(st)
	})
	r, _ := cli.Open([]byte("r"))
	if err := r.Accepted(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	_, werr := r.Write(make([]byte, 4<<20))
	var re *ResetError
	if !errors.As(werr, &re) || !re.Remote {
		t.Fatalf("write to a stream the peer reset: %v", werr)
	}
	e, _ := cli.Open([]byte("e"))
	e.Accepted(5 * time.Second)
	e.Write([]byte("still here"))
	e.CloseWrite()
	if b, err := io.ReadAll(e); err != nil || string(b) != "still here" {
		t.Errorf("another stream after a reset: %q, %v", b, err)
	}
}

// sinkResult is what a Sink's done reported.
type sinkResult struct {
	n   int64
	err error
}

// A sink receives everything, more than one window of it, then the
// half-close; the server writes its answer after that (half-close exact).
func TestSinkHalfClose(t *testing.T) {
	res := make(chan sinkResult, 1)
	h := sha256.New()
	cli := pair(t, Config{StreamWindow: 64 << 10}, func(st *Stream) {
		st.Accept()
		st.Sink(h, func(n int64, err error) {
			st.Write([]byte("after your FIN"))
			st.CloseWrite()
			res <- sinkResult{n, err}
		})
	})
	st, err := cli.Open(nil)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("sunk "), 1_000_000) // 5 MB: 80 windows
	if _, err := st.Write(data); err != nil {
		t.Fatal(err)
	}
	st.CloseWrite()
	r := <-res
	if r.err != nil || r.n != int64(len(data)) {
		t.Fatalf("sink done with %d bytes, %v; want %d, nil", r.n, r.err, len(data))
	}
	if sha256.Sum256(data) != [32]byte(h.Sum(nil)) {
		t.Error("the sink's bytes differ from those sent")
	}
	if b, err := io.ReadAll(st); err != nil || string(b) != "after your FIN" {
		t.Errorf("read after the half-close: %q, %v", b, err)
	}
}

// A reset reaches the sink's done; a failing writer ends the sink with
// its error, once.
func TestSinkResetAndWriteError(t *testing.T) {
	res := make(chan sinkResult, 2)
	cli := pair(t, Config{}, func(st *Stream) {
		st.Accept()
		var w io.Writer = io.Discard
		if st.Header()[0] == 'f' {
			w = failWriter{}
		}
		st.Sink(w, func(n int64, err error) { res <- sinkResult{n, err} })
	})
	r, _ := cli.Open([]byte("r"))
	r.Write([]byte("some"))
	r.Reset(CodeCancel)
	got := <-res
	var re *ResetError
	if !errors.As(got.err, &re) || !re.Remote || re.Code != CodeCancel {
		t.Errorf("sink of a stream the peer reset ended with %v", got.err)
	}
	f, _ := cli.Open([]byte("f"))
	f.Write([]byte("a"))
	f.Write([]byte("b"))
	if got := <-res; !errors.Is(got.err, errFail) {
		t.Errorf("sink into a failing writer ended with %v", got.err)
	}
	f.Write([]byte("c"))
	f.CloseWrite()
	select {
	case got := <-res:
		t.Errorf("done called again: %v", got)
	case <-time.After(100 * time.Millisecond):
	}
}

var errFail = errors.New("fail")

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errFail }

// Idle sinking streams hold no goroutine: the sink's goroutine runs only
// while there is something to write.
func TestSinkIdleHoldsNoGoroutine(t *testing.T) {
	const n = 200
	var wg sync.WaitGroup
	wg.Add(n)
	cli := pair(t, Config{MaxStreams: 2 * n}, func(st *Stream) {
		st.Accept()
		st.Sink(io.Discard, func(int64, error) {})
		wg.Done()
	})
	streams := make([]*Stream, n)
	for i := range streams {
		st, err := cli.Open(nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Accepted(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		st.Write([]byte("x")) // the sink ran once for each
		streams[i] = st
	}
	wg.Wait()
	deadline := time.Now().Add(5 * time.Second)
	base := runtime.NumGoroutine()
	for base > n/2 && time.Now().Before(deadline) {
		runtime.Gosched()
		base = runtime.NumGoroutine()
	}
	if base > n/2 {
		t.Errorf("%d goroutines with %d idle sinking streams: they hold one each", base, n)
	}
}

// Bytes being written by a sink are its own: a reset meanwhile does not
// hand their chunk to another stream, which would overwrite them.
func TestSinkChunksOwned(t *testing.T) {
	entered, gate := make(chan struct{}), make(chan struct{})
	got := make(chan []byte, 1)
	var others sync.WaitGroup
	cli := pair(t, Config{}, func(st *Stream) {
		st.Accept()
		if st.Header()[0] == 'b' {
			st.Sink(writerFunc(func(b []byte) (int, error) {
				close(entered)
				<-gate // blocked mid-write while the stream is reset
				got <- append([]byte(nil), b...)
				return len(b), nil
			}), func(int64, error) {})
			return
		}
		io.Copy(io.Discard, st)
		others.Done()
	})
	b, _ := cli.Open([]byte("b"))
	want := bytes.Repeat([]byte{'b'}, 8<<10)
	b.Write(want)
	<-entered
	b.Reset(CodeCancel)
	// Other streams' data arrive after the reset (one connection: in
	// order) and take chunks from the pool.
	others.Add(20)
	for range 20 {
		o, _ := cli.Open([]byte("o"))
		o.Write(bytes.Repeat([]byte{'o'}, 16<<10))
		o.CloseWrite()
	}
	others.Wait()
	close(gate)
	if g := <-got; !bytes.Equal(g, want) {
		t.Errorf("the sink wrote %d bytes not its stream's (first %q)", len(g), g[:min(8, len(g))])
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

// A sink that is a socket is written directly from the read loop while it
// takes the bytes; when its reader stalls, the rest queues for the sink's
// goroutine, in order, and nothing else on the session stalls.
func TestSinkSocketStalls(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		sum [32]byte
		err error
	}
	read := make(chan struct{})
	got := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer c.Close()
		<-read // stall until the sender is far ahead of the socket buffers
		h := sha256.New()
		_, err = io.Copy(h, c)
		got <- result{[32]byte(h.Sum(nil)), err}
	}()
	sock, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan sinkResult, 1)
	sinking := make(chan *Stream, 1)
	cli := pair(t, Config{StreamWindow: 256 << 10}, func(st *Stream) {
		st.Accept()
		if st.Header()[0] == 'e' {
			echo(st)
			return
		}
		sinking <- st
		st.Sink(sock, func(n int64, err error) {
			sock.(*net.TCPConn).CloseWrite()
			done <- sinkResult{n, err}
		})
	})
	st, _ := cli.Open([]byte("s"))
	data := make([]byte, 16<<20)
	for i := range data {
		data[i] = byte(i * 7 / 3)
	}
	wrote := make(chan error, 1)
	go func() {
		_, err := st.Write(data)
		st.CloseWrite()
		wrote <- err
	}()
	// Once the socket is full (the whole window the peer may send is held
	// for the sink's goroutine, which waits on the socket), another stream
	// still works. The held bytes may all be in the goroutine's write
	// (detached from the stream): the window, not buffered, says they are
	// held.
	srv := <-sinking
	deadline := time.Now().Add(30 * time.Second)
	for {
		srv.mu.Lock()
		queued := srv.recvLeft == 0 && srv.draining
		srv.mu.Unlock()
		if queued {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stalled socket never made bytes queue")
		}
		runtime.Gosched()
	}
	e, _ := cli.Open([]byte("e"))
	e.Write([]byte("not stalled"))
	e.CloseWrite()
	if b, err := io.ReadAll(e); err != nil || string(b) != "not stalled" {
		t.Errorf("another stream while a sink stalls: %q, %v", b, err)
	}
	close(read)
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.err != nil || r.n != int64(len(data)) {
		t.Fatalf("sink done: %d bytes, %v", r.n, r.err)
	}
	if r := <-got; r.err != nil || r.sum != sha256.Sum256(data) {
		t.Errorf("the socket received other bytes than sent (%v)", r.err)
	}
}

// A reset that follows the peer's half-close leaves what the peer sent
// readable, then EOF (an HTTP/2 server resetting the rest of a request
// after its whole response); a reset before it drops the data.
func TestResetAfterHalfCloseKeepsData(t *testing.T) {
	msg := bytes.Repeat([]byte("response "), 1000)
	for _, halfClosed := range []bool{true, false} {
		cli := pair(t, Config{}, func(st *Stream) {
			st.Accept()
			if halfClosed {
				st.WriteClose(msg)
			} else {
				st.Write(msg)
			}
			st.Reset(CodeCancel)
		})
		st, err := cli.Open([]byte("h"))
		if err != nil {
			t.Fatal(err)
		}
		st.SetReadDeadline(time.Now().Add(5 * time.Second))
		reset := make(chan struct{})
		st.OnReset(func(*ResetError) { close(reset) })
		select {
		case <-reset:
		case <-time.After(5 * time.Second):
			t.Fatal("the reset never arrived")
		}
		got, err := io.ReadAll(st)
		if halfClosed && (err != nil || !bytes.Equal(got, msg)) {
			t.Errorf("reset after the half-close: read %d bytes, %v; want all %d, then EOF", len(got), err, len(msg))
		}
		if !halfClosed && !errors.As(err, new(*ResetError)) {
			t.Errorf("reset before the half-close: read %d bytes, %v; want the reset", len(got), err)
		}
	}
}

// The inline handler sees a stream once the frames read with it are
// handled (here its whole body and half-close: Complete); what it declines
// goes to accept.
func TestInlineAccept(t *testing.T) {
	accepted := make(chan string, 2)
	cli := pairInline(t, Config{}, func(st *Stream) {
		accepted <- string(st.Header())
		echo(st)
	}, func(st *Stream) bool {
		if string(st.Header()) != "inline" {
			return false
		}
		if !st.Complete(1 << 10) {
			t.Error("inline stream not complete: its data came in the same write as its HEADERS")
		}
		b, _ := io.ReadAll(st)
		st.WriteClose(append([]byte("inline:"), b...))
		return true
	})
	st, sent, err := cli.OpenWith([]byte("inline"), []byte("ping"), true)
	if err != nil || !sent {
		t.Fatalf("OpenWith: sent %v, %v", sent, err)
	}
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(st); err != nil || string(got) != "inline:ping" {
		t.Errorf("inline stream answered %q, %v", got, err)
	}
	other, err := cli.Open([]byte("other"))
	if err != nil {
		t.Fatal(err)
	}
	other.SetReadDeadline(time.Now().Add(5 * time.Second))
	other.WriteClose([]byte("echo"))
	if got, err := io.ReadAll(other); err != nil || string(got) != "echo" {
		t.Errorf("declined stream echoed %q, %v", got, err)
	}
	if h := <-accepted; h != "other" {
		t.Errorf("accept got %q, want only the declined stream", h)
	}
	select {
	case h := <-accepted:
		t.Errorf("accept also got %q", h)
	default:
	}
}

// A write that runs out of window while the session is corked (a batch of
// flushes held by another writer) flushes what it wrote before waiting:
// the peer grants credit only for bytes it received, so leaving them in
// the buffer until the cork ends would wait forever.
func TestCorkedWriteWaitingForCredit(t *testing.T) {
	const size = 4 << 20 // 64 windows
	got := make(chan int, 1)
	cli := pair(t, Config{StreamWindow: 64 << 10}, func(st *Stream) {
		st.Accept()
		n, _ := io.Copy(io.Discard, st)
		got <- int(n)
	})
	st, err := cli.Open(nil)
	if err != nil {
		t.Fatal(err)
	}
	cli.Cork() // held for the whole write
	done := make(chan error, 1)
	go func() {
		_, err := st.Write(make([]byte, size))
		if err == nil {
			err = st.CloseWrite()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a corked write waiting for window credit never finished")
	}
	cli.Uncork()
	select {
	case n := <-got:
		if n != size {
			t.Fatalf("the peer read %d bytes, want %d", n, size)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the peer never read the stream's end")
	}
}

// TestKeepAlive: an idle session whose peer answers stays up, pinging;
// one whose peer has gone silent (it reads, never writes: a host that
// died behind a stateful firewall) is closed after 3 × KeepAlive.
func TestKeepAlive(t *testing.T) {
	// Ticks far apart enough that a loaded machine (CI, -race) answers a
	// PING within two of them.
	const every = 50 * time.Millisecond
	cli := pair(t, Config{KeepAlive: every}, echo)
	select {
	case <-cli.Done():
		t.Fatalf("an idle session with a live peer closed: %v", cli.Err())
	case <-time.After(10 * every):
	}

	cc, sc := tcpPair(t)
	defer sc.Close()
	go io.Copy(io.Discard, sc) // reads the pings, never answers
	start := time.Now()
	silent := Client(cc, Config{KeepAlive: every})
	defer silent.Close()
	select {
	case <-silent.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("a session whose peer is silent still open after 5s")
	}
	if took := time.Since(start); took < 3*every {
		t.Errorf("closed after %v, before 3 × KeepAlive", took)
	}
	if err := silent.Err(); err == nil || !strings.Contains(err.Error(), "silent") {
		t.Errorf("closed with %v, want the peer silent", err)
	}
}
