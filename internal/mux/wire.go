package mux

import (
	"net"
	"sync"
	"syscall"
)

// Wire is the TCP connection under a session's TLS connection
// (tls.Client(NewWire(c), ...)). A session that finds one beneath its
// connection (through tls.Conn.NetConn) batches through it:
//
//   - Writes: the TLS records of one flush leave in one write system call,
//     not one call (and, on loopback, one packet) per 16 KiB record.
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
	rbuf       []byte
	r, w       int
	beforeRead func() // the session's: write what the last reads queued

	wmu    sync.Mutex // TLS writes records under its own lock; a close alert may race a flush
	wbuf   []byte
	corked bool
}

// wireReadBuf is the most one read takes: four full TLS records and then
// some, what a peer's batch flush sends.
const wireReadBuf = 80 << 10

// wireWriteBuf holds one session flush (the session's 64 KiB write buffer)
// as TLS records: four of 16 KiB and their overhead, with room for a
// short one.
const wireWriteBuf = 68 << 10

// NewWire wraps c. It changes nothing until a session starts on it.
func NewWire(c net.Conn) *Wire { return &Wire{Conn: c} }

// start switches the wire to batching for session s.
func (w *Wire) start(beforeRead func()) {
	w.rbuf = make([]byte, wireReadBuf)
	w.beforeRead = beforeRead
	w.wmu.Lock()
	w.wbuf = make([]byte, 0, wireWriteBuf)
	w.wmu.Unlock()
}

// Read returns buffered bytes, or reads what has arrived (up to
// wireReadBuf). Before a read that could wait it lets the session write
// what it queued.
func (w *Wire) Read(p []byte) (int, error) {
	if w.rbuf == nil {
		return w.Conn.Read(p)
	}
	if w.r == w.w {
		if w.beforeRead != nil {
			w.beforeRead()
		}
		n, err := w.Conn.Read(w.rbuf)
		if n <= 0 {
			return 0, err
		}
		// An error with bytes comes back on the next read.
		w.r, w.w = 0, n
	}
	n := copy(p, w.rbuf[w.r:w.w])
	w.r += n
	return n, nil
}

// Write writes p, or while corked keeps it for uncork.
func (w *Wire) Write(p []byte) (int, error) {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	if !w.corked {
		return w.Conn.Write(p)
	}
	if len(w.wbuf)+len(p) > cap(w.wbuf) {
		if err := w.flushLocked(); err != nil {
			return 0, err
		}
		if len(p) > cap(w.wbuf) {
			return w.Conn.Write(p)
		}
	}
	w.wbuf = append(w.wbuf, p...)
	return len(p), nil
}

// cork holds writes back until uncork.
func (w *Wire) cork() {
	w.wmu.Lock()
	w.corked = true
	w.wmu.Unlock()
}

// uncork writes what cork held back, in one call.
func (w *Wire) uncork() error {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	w.corked = false
	return w.flushLocked()
}

func (w *Wire) flushLocked() error {
	if len(w.wbuf) == 0 {
		return nil
	}
	_, err := w.Conn.Write(w.wbuf)
	w.wbuf = w.wbuf[:0]
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
