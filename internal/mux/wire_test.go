package mux

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// tlsPair returns a TLS client over a started Wire and the server's TLS
// connection, both handshaken.
func tlsPair(t *testing.T) (cli *tls.Conn, w *Wire, srv *tls.Conn) {
	t.Helper()
	cert := selfSigned(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *tls.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			accepted <- nil
			return
		}
		tc := c.(*tls.Conn)
		tc.Handshake()
		accepted <- tc
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	w = NewWire(raw)
	cli = tls.Client(w, &tls.Config{InsecureSkipVerify: true})
	if err := cli.Handshake(); err != nil {
		t.Fatal(err)
	}
	srv = <-accepted
	if srv == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { cli.Close(); srv.Close() })
	w.start(func() {})
	return cli, w, srv
}

// A started wire keeps records until flushed; the peer then reads them,
// and after a close a clean EOF.
func TestWireKeepsUntilFlush(t *testing.T) {
	cli, w, srv := tlsPair(t)
	if _, err := cli.Write([]byte("kept")); err != nil {
		t.Fatal(err)
	}
	srv.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, err := srv.Read(make([]byte, 8)); n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("before the flush the peer read %d bytes, %v; want nothing", n, err)
	}
	if err := w.flush(); err != nil {
		t.Fatal(err)
	}
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 8)
	n, err := io.ReadAtLeast(srv, b, 4)
	if err != nil || string(b[:n]) != "kept" {
		t.Fatalf("after the flush the peer read %q, %v", b[:n], err)
	}
	cli.Close()
	if n, err := srv.Read(b); n != 0 || err != io.EOF {
		t.Errorf("after the close the peer read %d bytes, %v; want a clean EOF", n, err)
	}
}

// Closing a TLS connection whose write is blocked (the peer reads nothing)
// ends that write at once: the wire's close does not wait for it.
func TestWireCloseDuringBlockedWrite(t *testing.T) {
	cli, w, _ := tlsPair(t)
	wrote := make(chan error, 1)
	go func() {
		big := make([]byte, 64<<20) // far beyond the socket buffers
		_, err := cli.Write(big)
		if err == nil {
			err = w.flush()
		}
		wrote <- err
	}()
	// Close once the write holds the wire (it blocks there: the peer
	// reads nothing).
	deadline := time.Now().Add(5 * time.Second)
	for w.wmu.TryLock() {
		w.wmu.Unlock()
		if time.Now().After(deadline) {
			t.Fatal("the write never reached the wire")
		}
		runtime.Gosched()
	}
	closed := make(chan struct{})
	go func() { cli.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close waited for a blocked write")
	}
	select {
	case err := <-wrote:
		if err == nil {
			t.Error("the blocked write succeeded after Close")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the blocked write did not end after Close")
	}
}

// Streams whose frames arrive in the same reads of the wire are each
// written to their sockets in order and whole, while the sockets' readers
// keep pace or fall behind (a queue left to the sink's goroutine), and
// each stream's half-close arrives after all of its bytes.
func TestSinksShareReads(t *testing.T) {
	const streams, size = 8, 3 << 20
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sums := make(chan [32]byte, streams)
	go func() {
		for i := range streams {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 64<<10)
				if i%2 == 1 {
					// A slower reader: its socket fills, bytes queue.
					buf = buf[:512]
				}
				h := sha256.New()
				io.CopyBuffer(h, struct{ io.Reader }{c}, buf)
				sums <- [32]byte(h.Sum(nil))
			}()
		}
	}()
	done := make(chan sinkResult, streams)
	cli := pair(t, Config{MaxStreams: streams}, func(st *Stream) {
		sock, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			st.Reset(CodeRefused)
			return
		}
		st.Accept()
		st.Sink(sock, func(n int64, err error) {
			sock.(*net.TCPConn).CloseWrite()
			done <- sinkResult{n, err}
		})
	})
	want := make(map[[32]byte]int)
	var wg sync.WaitGroup
	for i := range streams {
		data := bytes.Repeat([]byte{byte('a' + i), byte(i)}, size/2)
		want[sha256.Sum256(data)]++
		st, err := cli.Open([]byte{byte(i)})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := data; len(b) > 0; {
				m := min(len(b), 10_000+i*977) // writes of odd sizes interleave
				if _, err := st.Write(b[:m]); err != nil {
					t.Error(err)
					return
				}
				b = b[m:]
			}
			st.CloseWrite()
		}()
	}
	wg.Wait()
	for range streams {
		select {
		case r := <-done:
			if r.err != nil || r.n != size {
				t.Errorf("sink done: %d bytes, %v; want %d", r.n, r.err, size)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("a sink never finished")
		}
		select {
		case sum := <-sums:
			if want[sum] == 0 {
				t.Error("a socket received other bytes than its stream's")
			}
			want[sum]--
		case <-time.After(20 * time.Second):
			t.Fatal("a socket never saw EOF")
		}
	}
}

// The callbacks for data one read brings run in the read loop (inLoop),
// and what they defer with AfterReads runs once after all of them, before
// the loop reads again: without more bytes from the peer; so does what
// that defers in turn.
func TestAfterReads(t *testing.T) {
	const streams = 8
	ready := make(chan *Stream, streams)
	cli := pair(t, Config{}, func(st *Stream) {
		st.Accept()
		ready <- st
	})
	var seen, inLoop atomic.Int32
	hooks := make(chan int32, streams)
	nested := make(chan struct{}, 1)
	registered := false // the read loop's
	for range streams {
		st, err := cli.Open([]byte("r"))
		if err != nil {
			t.Fatal(err)
		}
		st.OnReadable(func(loop bool) {
			seen.Add(1)
			if !loop {
				return
			}
			inLoop.Add(1)
			if !registered {
				registered = true
				cli.AfterReads(func() {
					hooks <- seen.Load()
					cli.AfterReads(func() { nested <- struct{}{} })
				})
			}
		})
	}
	// The responses leave in one write: the client reads them at once.
	var srv []*Stream
	for range streams {
		srv = append(srv, <-ready)
	}
	s := srv[0].Session()
	s.Cork()
	for _, st := range srv {
		st.WriteClose([]byte("response"))
	}
	s.Uncork()
	select {
	case n := <-hooks:
		if n != streams || inLoop.Load() != streams {
			t.Errorf("AfterReads ran after %d callbacks (%d in the read loop), want after all %d", n, inLoop.Load(), streams)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("AfterReads did not run before the read loop waited for more")
	}
	select {
	case <-nested:
	case <-time.After(5 * time.Second):
		t.Fatal("what an AfterReads function deferred did not run")
	}
	select {
	case <-hooks:
		t.Error("AfterReads ran twice")
	default:
	}
}
