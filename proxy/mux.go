package proxy

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"crypto/tls"

	"github.com/vmesh/vmesh/internal/mux"
)

// alpnMux carries opaque TCP connections as streams of internal/mux on
// pooled mTLS connections between proxies (Config.MultiplexOpaque).
const alpnMux = "vmesh.mux/1"

// Mux tuning between proxies: 1 MiB per stream (no connection window: a
// stalled stream cannot hold back another's credit), at most 100 streams a
// connection (more streams to one peer open another connection), sessions
// with no stream for muxIdle are closed.
var muxConfig = mux.Config{StreamWindow: 1 << 20, MaxStreams: 100}

const muxIdle = 90 * time.Second

// muxAcceptTimeout bounds the wait for the peer to reach the service (it
// dials with ConnectTimeout).
func (p *Proxy) muxAcceptTimeout() time.Duration { return p.cfg.ConnectTimeout + 2*time.Second }

// muxPool holds the client sessions to peer proxies, per (peer proxy,
// service, identity): the TLS handshake names the service and checks the
// identity, so a session carries one service's streams.
//
// A session's frames are encrypted and decrypted by one goroutine at a
// time on each side (one writer at a time, one read loop), so one session
// can use at most one core. Streams to a peer are therefore spread over up
// to spread sessions (the number of cores): a new stream goes to the
// session carrying the fewest, and another session is dialed while every
// one carries some and there are fewer than spread.
type muxPool struct {
	p      *Proxy
	spread int
	mu     sync.Mutex
	ss     map[peerKey][]*mux.Session
	// dialing are the sessions being dialed per key. They count as
	// sessions with streams (streams opened meanwhile do not each dial
	// one), and while none is live, streams wait for them: a burst of
	// first requests (h2load's 80 at once) makes one session, not 80.
	dialing map[peerKey][]*muxDial
	// closed: Close ran; no new sessions.
	closed    bool
	lastSweep time.Time
}

func newMuxPool(p *Proxy) *muxPool {
	return &muxPool{p: p, spread: max(1, runtime.GOMAXPROCS(0)), ss: make(map[peerKey][]*mux.Session), dialing: make(map[peerKey][]*muxDial)}
}

// muxDial is a session being dialed.
type muxDial struct {
	done chan struct{} // closed when the dial ended
	err  error         // the dial's error, set before done is closed
}

// open opens a stream to ep carrying header, on a pooled session with room
// or a new one.
// dialed says whether a new session (a TLS handshake) was made for it.
func (mp *muxPool) open(ctx context.Context, ep Endpoint, header []byte) (st *mux.Stream, dialed bool, err error) {
	st, _, dialed, err = mp.openData(ctx, ep, header, nil, false, 1)
	return st, dialed, err
}

// openRequest opens a stream for one HTTP/2 request and sends data (and
// the half-close when end) with its HEADERS when the window takes it
// (sent). Requests are short: another session is dialed only while every
// one carries spreadRequests streams.
func (mp *muxPool) openRequest(ctx context.Context, ep Endpoint, header, data []byte, end bool) (st *mux.Stream, sent bool, err error) {
	st, sent, _, err = mp.openData(ctx, ep, header, data, end, spreadRequests)
	return st, sent, err
}

// spreadRequests: see openRequest. Sequential requests (a stream that
// just ended may not be gone yet) never dial a second session.
const spreadRequests = 8

// pooled returns a pooled session to ep with room for a request's stream,
// or nil when one must be dialed first (none, or every one busy enough to
// spread).
func (mp *muxPool) pooled(ep Endpoint) *mux.Session {
	mp.mu.Lock()
	defer mp.mu.Unlock()
	s, dial, _ := mp.pickLocked(peerKey{ep.ProxyAddr, ep.Service, ep.Identity}, spreadRequests)
	if dial {
		return nil
	}
	return s
}

// openData opens a stream; another session is dialed when none is live
// or being dialed, or when every one carries at least spreadAt streams and
// fewer than spread are live or being dialed. While none is live but one
// is being dialed, it waits for that dial (and fails with its error).
func (mp *muxPool) openData(ctx context.Context, ep Endpoint, header, data []byte, end bool, spreadAt int) (st *mux.Stream, sent, dialed bool, err error) {
	k := peerKey{ep.ProxyAddr, ep.Service, ep.Identity}
	for attempt := 0; attempt < 3; attempt++ {
		mp.mu.Lock()
		s, dial, wait := mp.pickLocked(k, spreadAt)
		var d *muxDial
		if dial {
			d = &muxDial{done: make(chan struct{})}
			mp.dialing[k] = append(mp.dialing[k], d)
		}
		mp.mu.Unlock()
		if wait != nil {
			select {
			case <-wait.done:
				if wait.err != nil {
					return nil, false, false, wait.err
				}
				continue
			case <-ctx.Done():
				return nil, false, false, ctx.Err()
			}
		}
		if d != nil {
			ns, derr := mp.dial(ctx, k, ep, d)
			switch {
			case derr == nil:
				s, dialed = ns, true
			case s == nil:
				return nil, false, true, derr
			default:
				// Spreading failed; the session there is still good.
				mp.p.log.Debug("dialing another mux session failed", "peer", ep.ProxyAddr, "err", derr)
			}
		}
		if st, sent, err = s.OpenWith(header, data, end); err == nil {
			return st, sent, dialed, nil
		}
		// Full or closed between the check and Open: try another.
	}
	return nil, false, dialed, errors.New("no mux session to the peer took the stream")
}

// pickLocked returns the live session to k with room for a stream that
// carries the fewest (nil: none), and whether to dial another: none is
// live or being dialed, or every live one carries spreadAt streams and
// fewer than spread are live or being dialed. When none is live but some
// are being dialed, wait is the first of those. It drops dead sessions and
// closes those idle for longer than muxIdle.
func (mp *muxPool) pickLocked(k peerKey, spreadAt int) (best *mux.Session, dial bool, wait *muxDial) {
	now := time.Now()
	if now.Sub(mp.lastSweep) > muxIdle/4 {
		mp.sweepLocked(now)
	}
	fewest := 0
	for _, s := range mp.ss[k] {
		if n, ok := s.Load(); ok && (best == nil || n < fewest) {
			best, fewest = s, n
		}
	}
	dialing := mp.dialing[k]
	switch {
	case best != nil:
		return best, fewest >= spreadAt && len(mp.ss[k])+len(dialing) < mp.spread, nil
	case len(dialing) > 0:
		return nil, false, dialing[0]
	}
	return nil, true, nil
}

func (mp *muxPool) sweepLocked(now time.Time) {
	mp.lastSweep = now
	for k, list := range mp.ss {
		kept := list[:0]
		for _, s := range list {
			idle := s.IdleSince()
			switch {
			case s.Err() != nil:
			case !idle.IsZero() && now.Sub(idle) > muxIdle:
				s.Close()
			default:
				kept = append(kept, s)
				continue
			}
		}
		if len(kept) == 0 {
			delete(mp.ss, k)
		} else {
			mp.ss[k] = kept
		}
	}
}

// dial makes the session d stands for (openData counted it as being
// dialed), adds it to the pool and ends d.
func (mp *muxPool) dial(ctx context.Context, k peerKey, ep Endpoint, d *muxDial) (*mux.Session, error) {
	tc, err := mp.p.dialTransport(ctx, ep, alpnMux)
	var s *mux.Session
	if err == nil {
		s = mux.Client(tc, muxConfig)
	}
	mp.mu.Lock()
	list := slices.DeleteFunc(mp.dialing[k], func(x *muxDial) bool { return x == d })
	if len(list) == 0 {
		delete(mp.dialing, k)
	} else {
		mp.dialing[k] = list
	}
	switch {
	case err != nil:
	case mp.closed:
		err = errors.New("proxy closed")
	default:
		mp.ss[k] = append(mp.ss[k], s)
	}
	d.err = err
	close(d.done)
	mp.mu.Unlock()
	if err != nil {
		if s != nil {
			s.Close()
		}
		return nil, err
	}
	return s, nil
}

// closeIdle closes the sessions that carry no stream.
func (mp *muxPool) closeIdle() {
	mp.mu.Lock()
	defer mp.mu.Unlock()
	mp.sweepLocked(time.Now().Add(2 * muxIdle))
}

func (mp *muxPool) close() {
	mp.mu.Lock()
	mp.closed = true
	all := mp.ss
	mp.ss = map[peerKey][]*mux.Session{}
	mp.mu.Unlock()
	for _, list := range all {
		for _, s := range list {
			s.Close()
		}
	}
}

// outboundMux carries an opaque connection as one stream to the peer proxy.
// The peer accepts the stream once it has reached the service, or resets
// it; only then does the relay start, so a refused stream leaves nothing
// half-sent.
func (p *Proxy) outboundMux(c net.Conn, ep Endpoint, dst netip.AddrPort, peeked []byte) {
	st, _, err := p.openMuxStream(ep, dst)
	if err != nil {
		resetConn(c)
		return
	}
	p.relayMux(c, st, ep, peeked, nil)
}

// openMuxStream opens a stream to ep for dst's port and waits until the
// peer has reached the service; dialed says a new session was made for it
// (its time is not the service's). Failures are counted and logged here.
func (p *Proxy) openMuxStream(ep Endpoint, dst netip.AddrPort) (st *mux.Stream, dialed bool, err error) {
	var arr [256]byte
	h, err := appendHeader(arr[:0], transportHeader{Port: dst.Port(), Protocol: sessionOpaque, Service: ep.Service})
	if err != nil {
		return nil, false, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
	st, dialed, err = p.muxes.open(ctx, ep, h)
	cancel()
	if err != nil {
		p.m.refused.WithLabelValues(dirOutbound, refuseDial).Inc()
		p.reportError(slog.LevelWarn, dirOutbound, refuseDial, ep.ProxyAddr.String(), "connecting to peer proxy failed", "service", ep.Service, "peer", ep.ProxyAddr, "err", err)
		return nil, dialed, err
	}
	if err := st.Accepted(p.muxAcceptTimeout()); err != nil {
		st.Reset(mux.CodeCancel)
		p.m.refused.WithLabelValues(dirOutbound, refusePeer).Inc()
		p.reportError(slog.LevelWarn, dirOutbound, refusePeer, ep.ProxyAddr.Addr().String()+" "+ep.Service, "peer proxy refused the connection (denied by its policy, no such port, or the service is down: see the peer's log)", "service", ep.Service, "peer", ep.ProxyAddr, "err", err)
		return nil, dialed, err
	}
	return st, dialed, nil
}

// relayMux relays the app connection c over an accepted stream, the
// detection's peeked bytes first. The relay goes on in a goroutine of its
// own (relayStream) after relayMux returns; then runs when it has ended.
func (p *Proxy) relayMux(c net.Conn, st *mux.Stream, ep Endpoint, peeked []byte, then func()) {
	if len(peeked) > 0 {
		if _, err := st.Write(peeked); err != nil {
			st.Reset(mux.CodeCancel)
			c.Close()
			if then != nil {
				then()
			}
			return
		}
	}
	t := p.m.openTCP(connLabels{direction: dirOutbound, service: ep.Service, serverID: ep.Identity, tls: tlsTrue})
	sent := int64(len(peeked))
	p.handOff(c)
	relayStream(c, st, func(in, out int64) {
		t.close(in+sent, out)
		if then != nil {
			then()
		}
		p.untrack(c)
	})
}

// serveMux serves a peer proxy's mux session: each stream names a local
// port in its header; the route table decides, the client is authorized,
// the service dialed, and only then is the stream accepted.
func (p *Proxy) serveMux(tc *tls.Conn, clientID string) {
	s := mux.Server(tc, muxConfig, func(st *mux.Stream) { p.muxStream(st, clientID) })
	// Requests handled inline write to the services' connections without
	// flushing; each batch's writes leave together.
	var corked []*h2Conn
	s.SetInline(func(st *mux.Stream) bool { return p.muxH2Inline(st, clientID, &corked) }, func() {
		for i, c := range corked {
			c.uncork()
			corked[i] = nil
		}
		corked = corked[:0]
	})
	s.Serve()
}

func (p *Proxy) muxStream(st *mux.Stream, clientID string) {
	h, err := readHeader(bytes.NewReader(st.Header()))
	if err != nil {
		p.m.refused.WithLabelValues(dirInbound, refuseHeader).Inc()
		p.log.Info("inbound stream header refused", "client_id", clientID, "err", err)
		st.Reset(mux.CodeBadHeader)
		return
	}
	switch h.Protocol {
	case sessionHTTP1:
		p.muxH1Stream(st, clientID)
		return
	case sessionH2Stream:
		p.muxH2Stream(st, h, clientID)
		return
	}
	svc, _ := p.localService(h.Port)
	r := p.routes.peer(h.Port, svc, protoOpaque)
	if r.kind == routeDeny {
		p.m.refused.WithLabelValues(dirInbound, r.reason).Inc()
		p.log.Info("inbound stream names no local service", "client_id", clientID, "port", h.Port)
		st.Reset(mux.CodeUnknownPort)
		return
	}
	if !p.authorizeTCP(r.svc, clientID, tlsTrue) {
		st.Reset(mux.CodeDenied)
		return
	}
	up, err := p.dial(context.Background(), r.target)
	if err != nil {
		p.m.refused.WithLabelValues(dirInbound, refuseDial).Inc()
		p.reportError(slog.LevelWarn, dirInbound, refuseDial, r.target.String(), "connecting to local service failed", "service", r.svc.Name, "addr", r.target, "err", err)
		st.Reset(mux.CodeConnect)
		return
	}
	if !p.track(up) {
		st.Reset(mux.CodeRefused)
		return
	}
	if err := st.Accept(); err != nil {
		p.untrack(up)
		return
	}
	t := p.m.openTCP(connLabels{direction: dirInbound, service: r.svc.Name, clientID: clientID, tls: tlsTrue})
	relayStream(up, st, func(fromSvc, fromStream int64) {
		t.close(fromStream, fromSvc)
		p.untrack(up)
	})
}

// relayStream copies between a TCP connection c and a mux stream in both
// directions, each ending on its own: c's EOF half-closes the stream (the
// peer's service reads EOF, and may go on writing), the stream's END_STREAM
// half-closes c. A reset on either side resets the other. When both
// directions have ended it closes both and calls done with the bytes read
// from c and from the stream.
//
// It returns at once: the relay runs in a goroutine of its own, so the
// handler's goroutine, whose stack grew deep accepting, detecting, dialing
// and authorizing, ends, and the relay, idle most of its life, waits on a
// fresh shallow stack (2–4 KiB, not 8). The stream's bytes are written to c
// by the stream's sink, which runs only while there are some: an idle relay
// is one goroutine waiting on c with no buffer (copyGrowing).
func relayStream(c net.Conn, st *mux.Stream, done func(fromConn, fromStream int64)) {
	r := &streamRelay{c: c, st: st, done: done}
	r.left.Store(2)
	st.Sink(c, r.sunk)
	go r.fromConn()
}

// streamRelay is one relayStream: whichever direction ends last closes
// both sides and reports.
type streamRelay struct {
	c                    net.Conn
	st                   *mux.Stream
	done                 func(fromConn, fromStream int64)
	left                 atomic.Int32
	nFromConn, nFromSink int64
}

// fromConn copies c into the stream.
func (r *streamRelay) fromConn() {
	r.nFromConn = copyConnToStream(r.st, r.c)
	r.end()
}

// sunk is the stream's sink's end: it half-closes c after the peer's
// END_STREAM, resets c after a reset, and resets the stream when c failed.
func (r *streamRelay) sunk(n int64, err error) {
	switch {
	case err == nil:
		if cw, ok := r.c.(closeWriter); ok {
			cw.CloseWrite()
		}
	case errors.As(err, new(*mux.ResetError)):
		resetConn(r.c)
	default:
		r.st.Reset(mux.CodeCancel)
		r.c.Close()
	}
	r.nFromSink = n
	r.end()
}

func (r *streamRelay) end() {
	if r.left.Add(-1) != 0 {
		return
	}
	r.st.Close()
	r.c.Close()
	r.done(r.nFromConn, r.nFromSink)
}

// copyConnToStream copies the connection's bytes into the stream, then
// half-closes the stream; a read error (a reset) resets the stream.
func copyConnToStream(st *mux.Stream, c net.Conn) int64 {
	n, err := copyGrowing(st, c)
	if err != nil {
		st.Reset(mux.CodeCancel)
		var re *mux.ResetError
		if !errors.As(err, &re) {
			resetConn(c)
		}
		return n
	}
	st.CloseWrite()
	return n
}

// resetConn closes c with a TCP RST (linger 0), so the app sees a reset as
// it would from the service itself.
func resetConn(c net.Conn) {
	type lingerer interface{ SetLinger(int) error }
	if l, ok := c.(lingerer); ok {
		l.SetLinger(0)
	} else if u, ok := c.(interface{ NetConn() net.Conn }); ok {
		if l, ok := u.NetConn().(lingerer); ok {
			l.SetLinger(0)
		}
	}
	c.Close()
}
