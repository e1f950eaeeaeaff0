// Package rawsock reads and writes non-blocking TCP sockets with raw
// system calls.
//
// Go's net package makes each read(2) and write(2) through syscall.Syscall,
// which tells the scheduler that the goroutine may block: entersyscall and
// exitsyscall, and, when the process was idle, a futex wake-up of sysmon
// (the runtime's monitor thread sleeps while every P is idle and is woken
// by the first system call after). A proxy that idles between requests
// pays that wake-up, and sysmon's round, on every request: 8–15 % of an
// agent's CPU under sequential gRPC calls by the profiles. A socket the
// netpoller owns is non-blocking, so its reads and writes never block:
// they can be raw system calls (syscall.RawSyscall), with the netpoller
// waiting for readiness exactly as net does (syscall.RawConn).
package rawsock

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// Conn is a TCP connection whose Read and Write are raw system calls;
// everything else is the *net.TCPConn's (CloseWrite, deadlines, which
// Read and Write honour, SyscallConn).
type Conn struct {
	*net.TCPConn
	rc syscall.RawConn

	rmu     sync.Mutex
	rbuf    []byte
	rn      int
	rerrno  syscall.Errno
	readFn  func(uintptr) bool // bound once: no allocation per read
	wmu     sync.Mutex
	wbuf    []byte
	wn      int
	werrno  syscall.Errno
	writeFn func(uintptr) bool
}

// Wrap returns c with raw reads and writes when it is a TCP connection,
// else c itself.
func Wrap(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	r := &Conn{TCPConn: tc, rc: rc}
	r.readFn, r.writeFn = r.read, r.write
	return r
}

// TCP returns the TCP connection c is, or wraps: for what a *net.TCPConn
// does better itself (splice between two of them).
func TCP(c net.Conn) (*net.TCPConn, bool) {
	switch c := c.(type) {
	case *net.TCPConn:
		return c, true
	case *Conn:
		return c.TCPConn, true
	}
	return nil, false
}

func (c *Conn) read(fd uintptr) bool {
	c.rn, c.rerrno = Read(fd, c.rbuf)
	return c.rerrno != syscall.EAGAIN
}

func (c *Conn) write(fd uintptr) bool {
	c.wn, c.werrno = Write(fd, c.wbuf)
	return c.werrno != syscall.EAGAIN
}

// Read reads what has arrived, waiting in the netpoller when nothing has.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.rbuf = p
	err := c.rc.Read(c.readFn)
	c.rbuf = nil
	switch {
	case err != nil:
		return 0, c.opError("read", err)
	case c.rerrno != 0:
		return 0, c.opError("read", os.NewSyscallError("read", c.rerrno))
	case c.rn == 0:
		return 0, io.EOF
	}
	return c.rn, nil
}

// Write writes all of p, waiting in the netpoller for room.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	n := 0
	for len(p) > 0 {
		c.wbuf = p
		err := c.rc.Write(c.writeFn)
		c.wbuf = nil
		switch {
		case err != nil:
			return n, c.opError("write", err)
		case c.werrno != 0:
			return n, c.opError("write", os.NewSyscallError("write", c.werrno))
		}
		n += c.wn
		p = p[c.wn:]
	}
	return n, nil
}

// opError wraps err as net does: errors.Is(err, net.ErrClosed), timeouts
// and errno comparisons hold as for a *net.TCPConn's.
func (c *Conn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// NowWriter writes to a socket (one write, or one writev for several
// buffers) without waiting for room and returns what the socket took now,
// possibly nothing (an error is left to a blocking write to find and
// report). A loop that must not wait for one socket (a mux session's read
// loop) writes with it and leaves the rest to a goroutine. The loop keeps
// one NowWriter: its callback is bound once, so a write allocates nothing
// (a closure handed to RawConn.Write escapes). Not for concurrent use.
type NowWriter struct {
	bufs [][]byte
	one  [1][]byte
	n    int
	fn   func(uintptr) bool
}

func (w *NowWriter) write(fd uintptr) bool {
	if len(w.bufs) == 1 {
		w.n, _ = Write(fd, w.bufs[0])
	} else {
		w.n, _ = Writev(fd, w.bufs)
	}
	return true // never wait
}

// Write writes bufs to rc's socket.
func (w *NowWriter) Write(rc syscall.RawConn, bufs [][]byte) int {
	if w.fn == nil {
		w.fn = w.write
	}
	w.bufs, w.n = bufs, 0
	rc.Write(w.fn)
	w.bufs = nil
	return w.n
}

// WriteOne writes p to rc's socket.
func (w *NowWriter) WriteOne(rc syscall.RawConn, p []byte) int {
	w.one[0] = p
	n := w.Write(rc, w.one[:])
	w.one[0] = nil
	return n
}

// Read is read(2) on fd as a raw system call: for a non-blocking socket,
// in a syscall.RawConn's Read. EINTR is retried.
func Read(fd uintptr, p []byte) (int, syscall.Errno) { return rw(syscall.SYS_READ, fd, p) }

// Write is write(2) on fd as a raw system call: for a non-blocking socket,
// in a syscall.RawConn's Write. EINTR is retried.
func Write(fd uintptr, p []byte) (int, syscall.Errno) { return rw(syscall.SYS_WRITE, fd, p) }

func rw(trap, fd uintptr, p []byte) (int, syscall.Errno) {
	if len(p) == 0 {
		return 0, 0
	}
	for {
		n, _, e := syscall.RawSyscall(trap, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		if e == 0 {
			return int(n), 0
		}
		if e != syscall.EINTR {
			return 0, e
		}
	}
}

// Writev is writev(2) of bufs on fd as a raw system call. EINTR is
// retried.
func Writev(fd uintptr, bufs [][]byte) (int, syscall.Errno) {
	iov := make([]syscall.Iovec, 0, len(bufs))
	for _, b := range bufs {
		if len(b) > 0 {
			v := syscall.Iovec{Base: &b[0]}
			v.SetLen(len(b))
			iov = append(iov, v)
		}
	}
	if len(iov) == 0 {
		return 0, 0
	}
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
		if e == 0 {
			return int(n), 0
		}
		if e != syscall.EINTR {
			return 0, e
		}
	}
}
