package mux

import (
	"net"
	"sync"
	"syscall"

	"github.com/vmesh/vmesh/internal/rawsock"
)

// Wire is the TCP connection under a session's TLS connection
// (tls.Client(NewWire(c), ...)). A session that finds one beneath its
// connection (through tls.Conn.NetConn) batches through it:
//
//   - Writes: TLS records are kept until the session flushes, and leave
//     in one write system call (at most wireWriteBuf bytes), not one call
//     (and, on loopback, one packet) per 16 KiB record.
//   - Reads: up to wireReadBuf bytes a call; the DATA frames they carry are
//     queued for their sinks and written before the next read that could
//     wait, one write per stream per read, not one per frame.
//
// Until a session starts on it a Wire passes reads and writes through, so
// it can wrap every accepted connection before its handshake says what it
// carries.
type Wire struct {
	net.Conn

	// Read side: used only by the session's read loop (inside
	// tls.Conn.Read), or before the session by the handshake.
	started    bool
	rbuf       *[]byte // while reads fill what they are given (bulk); nil when idle
	r, w       int
	full       bool   // the last read into rbuf filled it: more is likely waiting
	beforeRead func() // the session's: write what the last reads queued

	// Write side: TLS writes records under its own lock, but an alert
	// may come from another goroutine than the session's writer. What is
	// kept when the connection closes is dropped (TLS's close alert too:
	// a Go peer reads a clean EOF either way), as the session drops its
	// unflushed frames.
	wmu      sync.Mutex
	batching bool    // a session started: keep records until flush
	wbuf     *[]byte // records kept; nil when none (an idle session holds no buffer)
}

// wireReadBuf is the most one read takes: four full TLS records and then
// some, what a peer's batch flush sends.
const wireReadBuf = 80 << 10

// wireWriteBuf holds one session flush (the session's 64 KiB write buffer)
// as TLS records: four of 16 KiB and their overhead, with room for a
// short one.
const wireWriteBuf = 68 << 10

var (
	wireReadPool  = sync.Pool{New: func() any { b := make([]byte, wireReadBuf); return &b }}
	wireWritePool = sync.Pool{New: func() any { b := make([]byte, 0, wireWriteBuf); return &b }}
)

// NewWire wraps c. It changes nothing until a session starts on it, but
// that a TCP connection's reads and writes are raw system calls
// (rawsock).
func NewWire(c net.Conn) *Wire { return &Wire{Conn: rawsock.Wrap(c)} }

// start switches the wire to batching for a session; beforeRead is
// called before each read that could wait.
func (w *Wire) start(beforeRead func()) {
	w.started = true
	w.beforeRead = beforeRead
	w.wmu.Lock()
	w.batching = true
	w.wmu.Unlock()
}

// Read returns buffered bytes, or reads what has arrived. A read that
// fills the caller's buffer says more is waiting: the following reads take
// up to wireReadBuf, until one does not fill it; a read that may wait uses
// the caller's buffer, so an idle session holds none of its own. Before a
// read that could wait the session writes what it queued.
func (w *Wire) Read(p []byte) (int, error) {
	if !w.started {
		return w.Conn.Read(p)
	}
	if w.r == w.w {
		w.beforeRead()
		if w.rbuf != nil && !w.full {
			wireReadPool.Put(w.rbuf)
			w.rbuf = nil
		}
		if w.rbuf == nil {
			n, err := w.Conn.Read(p)
			if n == len(p) && n < wireReadBuf {
				w.rbuf = wireReadPool.Get().(*[]byte)
				w.full = true
			}
			return n, err
		}
		n, err := w.Conn.Read(*w.rbuf)
		if n <= 0 {
			return 0, err
		}
		// An error with bytes comes back on the next read.
		w.r, w.w, w.full = 0, n, n == len(*w.rbuf)
	}
	n := copy(p, (*w.rbuf)[w.r:w.w])
	w.r += n
	return n, nil
}

// Write keeps p for flush once a session started (writing what it kept
// first when p would not fit), else writes it.
func (w *Wire) Write(p []byte) (int, error) {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	if !w.batching {
		return w.Conn.Write(p)
	}
	if w.wbuf != nil && len(*w.wbuf)+len(p) > cap(*w.wbuf) {
		if err := w.flushLocked(); err != nil {
			return 0, err
		}
	}
	if len(p) > wireWriteBuf {
		return w.Conn.Write(p)
	}
	if w.wbuf == nil {
		w.wbuf = wireWritePool.Get().(*[]byte)
	}
	*w.wbuf = append(*w.wbuf, p...)
	return len(p), nil
}

// flush writes what Write kept, in one call.
func (w *Wire) flush() error {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	return w.flushLocked()
}

func (w *Wire) flushLocked() error {
	if w.wbuf == nil {
		return nil
	}
	_, err := w.Conn.Write(*w.wbuf)
	*w.wbuf = (*w.wbuf)[:0]
	wireWritePool.Put(w.wbuf)
	w.wbuf = nil
	return err
}

// SyscallConn, CloseWrite, CloseRead and SetLinger reach the TCP
// connection, as they would without the wire.

func (w *Wire) SyscallConn() (syscall.RawConn, error) {
	sc, ok := w.Conn.(syscall.Conn)
	if !ok {
		return nil, syscall.EINVAL
	}
	return sc.SyscallConn()
}

func (w *Wire) CloseWrite() error {
	if c, ok := w.Conn.(interface{ CloseWrite() error }); ok {
		return c.CloseWrite()
	}
	return syscall.EINVAL
}

func (w *Wire) CloseRead() error {
	if c, ok := w.Conn.(interface{ CloseRead() error }); ok {
		return c.CloseRead()
	}
	return syscall.EINVAL
}

func (w *Wire) SetLinger(sec int) error {
	if c, ok := w.Conn.(interface{ SetLinger(int) error }); ok {
		return c.SetLinger(sec)
	}
	return syscall.EINVAL
}

// wireOf returns the Wire beneath conn (a *tls.Conn over one), or nil.
func wireOf(conn net.Conn) *Wire {
	if w, ok := conn.(*Wire); ok {
		return w
	}
	if u, ok := conn.(interface{ NetConn() net.Conn }); ok {
		if w, ok := u.NetConn().(*Wire); ok {
			return w
		}
	}
	return nil
}
