package rawsock

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// pair returns a wrapped client connection and the server's plain end.
func pair(t *testing.T) (*Conn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-acc
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	w, ok := Wrap(c).(*Conn)
	if !ok {
		t.Fatal("a TCP connection was not wrapped")
	}
	return w, s.(*net.TCPConn)
}

// Bytes go both ways whole, beyond the socket buffers (Write waits for
// room), and each direction ends on its own: EOF after the peer's FIN,
// while this side still writes.
func TestReadWriteHalfClose(t *testing.T) {
	c, s := pair(t)
	data := make([]byte, 8<<20)
	rand.Read(data)
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(s)
		got <- b
	}()
	if n, err := c.Write(data); err != nil || n != len(data) {
		t.Fatalf("Write = %d, %v; want %d", n, err, len(data))
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if b := <-got; !bytes.Equal(b, data) {
		t.Fatalf("the peer read %d bytes, other than the %d written", len(b), len(data))
	}
	go func() {
		s.Write([]byte("after the client's FIN"))
		s.CloseWrite()
	}()
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "after the client's FIN" {
		t.Fatalf("ReadAll = %q, %v", b, err)
	}
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("Read after EOF = %d, %v; want io.EOF", n, err)
	}
}

// Errors read as net's: a deadline is a timeout (os.ErrDeadlineExceeded),
// a closed connection net.ErrClosed, a reset ECONNRESET.
func TestErrors(t *testing.T) {
	c, s := pair(t)
	c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("Read past its deadline: %v, want a timeout", err)
	}
	c.SetReadDeadline(time.Time{})

	s.SetLinger(0)
	s.Close() // a reset
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("Read after the peer's reset: %v, want ECONNRESET", err)
	}
	c.Close()
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Write on a closed connection: %v, want net.ErrClosed", err)
	}
}

func TestWritev(t *testing.T) {
	c, s := pair(t)
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var errno syscall.Errno
	rc.Write(func(fd uintptr) bool {
		n, errno = Writev(fd, [][]byte{[]byte("one "), nil, []byte("two")})
		return true
	})
	if n != 7 || errno != 0 {
		t.Fatalf("Writev = %d, %v", n, errno)
	}
	c.CloseWrite()
	if b, _ := io.ReadAll(s); string(b) != "one two" {
		t.Fatalf("the peer read %q", b)
	}
}
