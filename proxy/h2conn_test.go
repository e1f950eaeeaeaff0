package proxy

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"testing"
	"time"
)

// TestBatchConnDeliversOnClose checks that bytes queued by many small
// writes all reach the peer, in order, when the connection is closed right
// after them (a GOAWAY or last response must not be lost).
func TestBatchConnDeliversOnClose(t *testing.T) {
	ln := listenLocal(t)
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		got <- b
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c := newBatchConn(raw)
	want := make([]byte, 3<<20)
	rand.Read(want)
	for p := want; len(p) > 0; {
		n := min(len(p), 1+len(p)%9000)
		if _, err := c.Write(p[:n]); err != nil {
			t.Fatal(err)
		}
		p = p[n:]
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if b := <-got; !bytes.Equal(b, want) {
		t.Fatalf("peer read %d bytes, want the %d written", len(b), len(want))
	}
	if _, err := c.Write([]byte("x")); err == nil {
		t.Error("write after Close succeeded")
	}
}

// TestBatchConnBackPressure checks that a peer that does not read stops
// the writer after a bounded queue instead of letting it buffer without
// limit, and that Close then still returns and fails the blocked write.
func TestBatchConnBackPressure(t *testing.T) {
	a, b := net.Pipe() // synchronous: nothing is buffered in the pipe
	defer b.Close()
	c := newBatchConn(a)
	const chunk = 4 << 10
	accepted := make(chan int, 1024)
	werr := make(chan error, 1)
	go func() {
		p := make([]byte, chunk)
		for {
			if _, err := c.Write(p); err != nil {
				werr <- err
				return
			}
			accepted <- chunk
		}
	}()
	total, limit := 0, 2*(batchMax+chunk)
	for stalled := false; !stalled && total <= limit; {
		select {
		case n := <-accepted:
			total += n
		case <-time.After(300 * time.Millisecond):
			stalled = true // no write returned for a while: blocked
		}
	}
	if total > limit {
		t.Fatalf("%d bytes accepted with a peer that does not read, want at most %d", total, limit)
	}
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	select {
	case <-closed:
	case <-time.After(batchCloseWait + 5*time.Second):
		t.Fatal("Close did not return with a peer that does not read")
	}
	select {
	case err := <-werr:
		if err == nil {
			t.Error("blocked write returned no error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the blocked write did not return after Close")
	}
}
