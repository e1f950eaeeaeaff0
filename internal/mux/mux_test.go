package mux

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// pair starts a server session on one end of a real TCP loopback
// connection and returns the client session on the other. handle serves
// each stream the client opens.
func pair(t testing.TB, cfg Config, handle func(*Stream)) *Session {
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
	srv := Server(sc, cfg, handle)
	go srv.Serve()
	cli := Client(cc, cfg)
	t.Cleanup(func() { cli.Close(); srv.Close() })
	return cli
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
