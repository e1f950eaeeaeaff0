package proxy

import (
	"bufio"
	"errors"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"
)

// Idle keep-alive connections are closed after these. A peer proxy keeps
// its side open longer (it waits for requests with no deadline), so a
// pooled connection is rarely closed under a request.
const (
	h1PeerIdle  = 90 * time.Second
	h1LocalIdle = 30 * time.Second
)

// poolKey identifies interchangeable upstream connections: a peer proxy
// for one service identity, or a local service's target (addr only).
type poolKey struct {
	addr     netip.AddrPort
	service  string
	identity string
	mux      bool // to a peer proxy: streams of a mux session (h1MuxAt)
}

// upConn is a keep-alive connection to a peer proxy or a local service.
type upConn struct {
	net.Conn
	br     *bufio.Reader
	bw     *bufio.Writer
	key    poolKey
	reused bool // taken from the pool (it may have been closed meanwhile)
	idleAt time.Time
}

// upPool keeps idle keep-alive connections per key, most recently used
// first; it knows every connection it handed out, so Close can end them.
// Idle connections older than idle are closed; at most maxIdle per key
// are kept.
type upPool struct {
	idle    time.Duration
	maxIdle int
	now     func() time.Time
	// checkAfter: a connection idle this long is checked before use (a
	// server closes idle connections on its own schedule).
	checkAfter time.Duration

	mu        sync.Mutex
	free      map[poolKey][]*upConn
	all       map[*upConn]struct{}
	closed    bool
	lastSweep time.Time
}

func newUpPool(idle time.Duration, maxIdle int) *upPool {
	return &upPool{
		idle: idle, maxIdle: maxIdle, now: time.Now, checkAfter: time.Second,
		free: make(map[poolKey][]*upConn), all: make(map[*upConn]struct{}),
	}
}

// get returns an idle connection for k that is still open, or nil. The
// connection has its buffers again.
func (pl *upPool) get(k poolKey) *upConn {
	for {
		uc, check := pl.pop(k)
		if uc == nil {
			return nil
		}
		if !check || !peerClosed(uc.Conn) {
			uc.takeBuffers()
			return uc
		}
		pl.drop(uc)
	}
}

// takeBuffers gives a connection taken from the pool its buffers; idle
// connections hold none.
func (uc *upConn) takeBuffers() {
	uc.br = h1Readers.Get().(*bufio.Reader)
	uc.br.Reset(uc.Conn)
	uc.bw = h1Writers.Get().(*bufio.Writer)
	uc.bw.Reset(uc.Conn)
}

func (uc *upConn) releaseBuffers() {
	uc.br.Reset(nil)
	h1Readers.Put(uc.br)
	uc.bw.Reset(nil)
	h1Writers.Put(uc.bw)
	uc.br, uc.bw = nil, nil
}

// pop takes the most recently used idle connection for k; check says it
// has been idle long enough to be checked.
func (pl *upPool) pop(k poolKey) (uc *upConn, check bool) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	now := pl.now()
	if now.Sub(pl.lastSweep) >= pl.idle/4 {
		pl.sweepLocked(now)
	}
	s := pl.free[k]
	for len(s) > 0 {
		uc := s[len(s)-1]
		s[len(s)-1] = nil
		s = s[:len(s)-1]
		if now.Sub(uc.idleAt) >= pl.idle {
			delete(pl.all, uc)
			uc.Close()
			continue
		}
		pl.free[k] = s
		uc.reused = true
		return uc, now.Sub(uc.idleAt) >= pl.checkAfter
	}
	delete(pl.free, k)
	return nil, false
}

// add registers a new connection; false if the pool is closed (c is then
// closed).
func (pl *upPool) add(c net.Conn, k poolKey) (*upConn, bool) {
	uc := &upConn{Conn: c, key: k}
	uc.takeBuffers()
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if pl.closed {
		c.Close()
		return nil, false
	}
	pl.all[uc] = struct{}{}
	return uc, true
}

// put returns a connection whose exchange ended cleanly, without its
// buffers.
func (pl *upPool) put(uc *upConn) {
	if uc.br.Buffered() > 0 {
		pl.drop(uc) // the server sent something unasked
		return
	}
	uc.releaseBuffers()
	pl.mu.Lock()
	defer pl.mu.Unlock()
	s := pl.free[uc.key]
	if pl.closed || len(s) >= pl.maxIdle {
		delete(pl.all, uc)
		uc.Close()
		return
	}
	uc.idleAt = pl.now()
	pl.free[uc.key] = append(s, uc)
}

// drop closes a connection that cannot be reused.
func (pl *upPool) drop(uc *upConn) {
	pl.forget(uc)
	uc.Close()
}

// forget stops tracking a connection that now belongs to someone else
// (an upgraded connection's relay).
func (pl *upPool) forget(uc *upConn) {
	pl.mu.Lock()
	delete(pl.all, uc)
	pl.mu.Unlock()
}

// sweepLocked closes idle connections older than pl.idle.
func (pl *upPool) sweepLocked(now time.Time) {
	pl.lastSweep = now
	for k, s := range pl.free {
		keep := s[:0]
		for _, uc := range s {
			if now.Sub(uc.idleAt) >= pl.idle {
				delete(pl.all, uc)
				uc.Close()
				continue
			}
			keep = append(keep, uc)
		}
		clear(s[len(keep):])
		if len(keep) == 0 {
			delete(pl.free, k)
		} else {
			pl.free[k] = keep
		}
	}
}

// closeIdle closes every idle connection (Shutdown).
func (pl *upPool) closeIdle() {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	for k, s := range pl.free {
		for _, uc := range s {
			delete(pl.all, uc)
			uc.Close()
		}
		delete(pl.free, k)
	}
}

// close closes every connection, idle or in use, and refuses new ones.
func (pl *upPool) close() {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	pl.closed = true
	for uc := range pl.all {
		uc.Close()
	}
	clear(pl.all)
	clear(pl.free)
}

// size returns the number of idle connections (tests).
func (pl *upPool) size() int {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	n := 0
	for _, s := range pl.free {
		n += len(s)
	}
	return n
}

// isConnReset reports whether err is a reset or broken pipe.
func isConnReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
