package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/vmesh/vmesh/balance"
	"github.com/vmesh/vmesh/internal/mux"
	"github.com/vmesh/vmesh/internal/rawsock"
)

// The two ends of the frame-level HTTP/2 path (h2fwd.go): the app's
// connection on the client host (serveH2Front, outbound) and the mux
// stream on the server host (muxH2Stream), plus the per-request metrics
// both keep (h2Exchange) and the pool of HTTP/2 connections to local
// services (h2Pool).

// serveH2Front serves an app's HTTP/2 connection (prior knowledge) on
// route r (routeHTTP): each request goes to the peer proxy on a mux stream
// of its own. peeked are the bytes detection read.
func (p *Proxy) serveH2Front(c net.Conn, peeked []byte, r route) {
	hc := newH2Conn(p, c, true, &prefixReader{b: peeked, r: c})
	hc.route = r
	p.h2front.Store(hc, struct{}{})
	defer p.h2front.Delete(hc)
	if hc.start() != nil {
		return
	}
	if err := hc.serve(); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		p.log.Debug("HTTP/2 connection from app ended", "err", err)
	}
}

// drainH2 tells every app HTTP/2 connection to go away once its streams
// are done (Shutdown).
func (p *Proxy) drainH2() {
	p.h2front.Range(func(k, _ any) bool {
		k.(*h2Conn).drain()
		return true
	})
}

// open (server role, in the read loop) routes a request: picks the
// endpoint, counts it, and opens its mux stream on a pooled session with
// the request's head and what followed it (cork holds that session's
// flush until the read loop's batch is written); a goroutine then relays
// the response. With no pooled session ready, the goroutine dials one
// first.
func (s *h2Stream) open(cork func(*mux.Session)) {
	c, ex := s.c, s.ex
	p, r := c.p, c.route
	ep, port := r.ep, r.dst.Port()
	if r.balanced {
		var ok bool
		if ep, ex.choice, ok = p.pickEndpoint(ep.Service, nil); !ok {
			ex.setLabels(p, connLabels{direction: dirOutbound, service: r.ep.Service, serverID: r.ep.Identity, tls: tlsTrue})
			go s.answer(503, "no endpoint")
			return
		}
		ex.balanced = ep.Service
		port = ep.Addr.Port()
	}
	ex.setLabels(p, connLabels{direction: dirOutbound, service: ep.Service, serverID: ep.Identity, tls: tlsTrue})
	ex.m.requests.Inc()
	if d, _ := p.policy(ep.Service).requestPolicy([]byte(ex.method), []byte(ex.path), p.cfg.RequestTimeout); d > 0 {
		ex.setTimer(time.AfterFunc(d, s.timeout))
	}
	h, err := appendHeader(nil, transportHeader{Port: port, Protocol: sessionH2Stream, Service: ep.Service})
	if err != nil {
		go s.answer(502, "proxying failed")
		return
	}
	if sess := p.muxes.pooled(ep); sess != nil {
		s.mu.Lock()
		first, end, credit := s.upBuf, s.upEnd, s.upCredit
		s.mu.Unlock()
		cork(sess)
		if ms, sent, err := sess.OpenWith(h, first, end); err == nil {
			s.mu.Lock()
			s.upBuf, s.upEnd, s.upCredit = nil, false, 0
			s.mu.Unlock()
			if sent {
				s.openedInline(ms, end, credit)
			} else {
				go s.opened(ms, sent, first, end, credit)
			}
			return
		}
	}
	go s.outbound(ep, h)
}

// outbound (server role, a goroutine) opens the request's mux stream when
// that may wait for a dial, then relays the response.
func (s *h2Stream) outbound(ep Endpoint, h []byte) {
	c, ex := s.c, s.ex
	p := c.p
	s.mu.Lock()
	first, end, credit := s.upBuf, s.upEnd, s.upCredit
	s.upBuf, s.upEnd, s.upCredit = nil, false, 0
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
	ms, sent, err := p.muxes.openRequest(ctx, ep, h, first, end)
	cancel()
	if err != nil {
		p.m.refused.WithLabelValues(dirOutbound, refuseDial).Inc()
		p.reportError(slog.LevelWarn, dirOutbound, refuseDial, ep.ProxyAddr.String(), "connecting to peer proxy failed", "service", ep.Service, "peer", ep.ProxyAddr, "err", err)
		ex.endpointDone(p, err)
		s.answer(502, "connecting to peer proxy failed")
		return
	}
	s.opened(ms, sent, first, end, credit)
}

// openedInline (in the read loop) takes an opened request whose head went
// with the open: the response is relayed when it begins to arrive (no
// goroutine waits meanwhile), by the mux read loop itself when it can.
func (s *h2Stream) openedInline(ms *mux.Stream, end bool, credit int) {
	s.credit(credit)
	if !s.attach(ms, end) {
		return
	}
	ms.OnReadable(func(inLoop bool) {
		if inLoop {
			// The rest of the response may be in the frames read with
			// its start: look once they are handled.
			ms.Session().AfterReads(func() { s.respondInline(ms, true) })
			return
		}
		s.respondInline(ms, false)
	})
}

// opened relays an opened request: the rest of its head when the open did
// not carry it (sent false), then the response.
func (s *h2Stream) opened(ms *mux.Stream, sent bool, first []byte, end bool, credit int) {
	if !sent {
		var err error
		if end {
			err = ms.WriteClose(first)
		} else {
			_, err = ms.Write(first)
		}
		if err != nil {
			ms.Reset(mux.CodeCancel)
			s.answer(502, "proxying failed")
			return
		}
	}
	s.credit(credit)
	if !s.attach(ms, end) {
		return
	}
	s.respond(ms)
}

// respond relays the response from the mux stream to the app.
func (s *h2Stream) respond(ms *mux.Stream) {
	s.relay(ms, newMsgReader(ms))
}

// relay relays the response from mr, a reader of ms, to the app.
func (s *h2Stream) relay(ms *mux.Stream, mr *msgReader) {
	defer mr.release()
	if s.toH2(mr) {
		s.responded(ms)
	}
}

// responded follows a response's end: the request may go on (a client
// stream), and a reset now must still reach the app.
func (s *h2Stream) responded(ms *mux.Stream) {
	ms.OnReset(func(e *mux.ResetError) { s.peerReset(e.Code) })
}

// h2RespInlineMax bounds the responses the mux read loop writes itself.
const h2RespInlineMax = 16 << 10

// respondInline relays a response that arrived whole (a unary call's)
// where it arrived, when that needs no wait: the app's connection is free
// to write, its windows take the body, and the frames are flushed without
// waiting for the socket (what it does not take at once goes on in a
// goroutine). In the mux session's read loop (inLoop) the flush waits for
// the frames read with this response: the responses one read brings leave
// for each app in one write. No goroutine starts, none is woken.
// Otherwise, or for the rest of a response the windows stop, a goroutine
// relays it (respond).
func (s *h2Stream) respondInline(ms *mux.Stream, inLoop bool) {
	c := s.c
	if c.cw.rc == nil || !ms.Complete(h2RespInlineMax) || !c.wmu.TryLock() {
		go s.respond(ms)
		return
	}
	mr := newMsgReader(ms)
	mr.fill() // all there: no wait
	ended, more, abort, err := false, true, uint32(0), c.werr
	if err == nil {
		c.cw.nowait = true
		ended, more, abort, err = s.toH2Now(mr)
		switch {
		case err != nil:
		case inLoop:
			if !c.afterReads {
				c.afterReads = true
				ms.Session().AfterReads(c.afterReadsFn)
			}
		case c.waiting.Load() == 0: // else the writer waiting flushes
			err = c.flushLocked()
		}
		c.cw.nowait = false
		if err != nil {
			c.werr = err
			c.nc.Close() // the app's read loop ends the streams
		}
	}
	c.wmu.Unlock()
	switch {
	case err != nil:
		mr.release()
	case more:
		go s.relay(ms, mr)
	case abort != 0:
		mr.release()
		go s.abort(abort, false) // its write may wait
	case ended:
		mr.release()
		s.ex.finish(c.p, true)
		s.maybeDone()
		s.responded(ms)
	default: // the stream is over
		mr.release()
	}
}

// timeout ends a request that outlived its route's timeout: 504 if the
// response has not begun, else a reset.
func (s *h2Stream) timeout() {
	c := s.c
	c.mu.Lock()
	started := s.respStarted || s.reset || s.sentEnd
	c.mu.Unlock()
	if !started {
		s.answer(504, "request timeout")
		return
	}
	s.abort(mux.CodeCancel, false)
}

// muxH2Stream serves one HTTP/2 request from a peer proxy (a mux stream of
// protocol sessionH2Stream): route by the header's port, authorize the
// client, and forward it on a pooled HTTP/2 connection to the service.
func (p *Proxy) muxH2Stream(ms *mux.Stream, th transportHeader, clientID string) {
	p.muxH2Request(ms, th, clientID, nil)
}

// muxH2Inline handles, in the mux session's read loop, a request that is
// all there and small (a unary call) when a connection to the service is
// pooled: no goroutine per request. It reports false for any other
// stream, which is then accepted in a goroutine of its own.
func (p *Proxy) muxH2Inline(ms *mux.Stream, clientID string, corked *[]*h2Conn) bool {
	if !ms.Complete(h2InlineMax) {
		return false
	}
	h, err := readHeader(bytes.NewReader(ms.Header()))
	if err != nil || h.Protocol != sessionH2Stream {
		return false
	}
	p.muxH2Request(ms, h, clientID, corked)
	return true
}

// h2InlineMax bounds the requests handled inline: the rest of the body
// goes to the service within its first window.
const h2InlineMax = 16 << 10

// muxH2Request forwards the request. corked != nil: it runs in the
// session's read loop and must not wait (a dial to the service goes on in
// a goroutine); the service connection's flushes are held (cork) until the
// read loop's batch is done, and the connection added to corked.
func (p *Proxy) muxH2Request(ms *mux.Stream, th transportHeader, clientID string, corked *[]*h2Conn) {
	inline := corked != nil
	mr := newMsgReader(ms)
	handedOff := false
	defer func() {
		if !handedOff {
			mr.release()
		}
	}()
	kind, payload, err := mr.next()
	if err != nil || kind&^msgEnd != msgHeaders {
		p.m.refused.WithLabelValues(dirInbound, refuseHeader).Inc()
		ms.Reset(mux.CodeBadHeader)
		return
	}
	end := kind&msgEnd != 0
	fields, err := parseFields(payload, nil)
	if err != nil {
		p.m.refused.WithLabelValues(dirInbound, refuseHeader).Inc()
		ms.Reset(mux.CodeBadHeader)
		return
	}
	ex, fields, ok := newExchange(fields)
	if !ok {
		ms.Reset(uint32(http2ErrProtocol))
		return
	}
	svc, _ := p.localService(th.Port)
	r := p.routes.peer(th.Port, svc, protoHTTP2)
	if r.kind == routeDeny {
		p.m.refused.WithLabelValues(dirInbound, r.reason).Inc()
		answerMux(ms, mr, end, 403, "unknown target port")
		return
	}
	ex.setLabels(p, connLabels{direction: dirInbound, service: r.svc.Name, clientID: clientID, tls: tlsTrue})
	if d := p.authorizeHTTP(r.svc, clientID, tlsTrue); !d.allow {
		ex.m.requests.Inc()
		ex.status = 403
		ex.finish(p, false)
		answerMux(ms, mr, end, 403, "unauthorized: "+d.reason)
		return
	}
	ex.m.requests.Inc()
	var cork func(*h2Conn)
	if inline {
		cork = func(c *h2Conn) {
			for _, x := range *corked {
				if x == c {
					return
				}
			}
			c.cork()
			*corked = append(*corked, c)
		}
	}
	s, err := p.h2local.open(r.target, ex, fields, end, !mr.ready(), !inline, cork)
	if errors.Is(err, errH2NoConn) {
		handedOff = true
		go func() {
			defer mr.release()
			p.forwardH2(ms, mr, ex, fields, end, r)
		}()
		return
	}
	p.forwardOpened(ms, mr, ex, s, err, end, r)
}

// forwardH2 opens the request's stream to the service (dialing when no
// connection is pooled) and forwards it.
func (p *Proxy) forwardH2(ms *mux.Stream, mr *msgReader, ex *h2Exchange, fields []hpack.HeaderField, end bool, r route) {
	s, err := p.h2local.open(r.target, ex, fields, end, !mr.ready(), true, nil)
	p.forwardOpened(ms, mr, ex, s, err, end, r)
}

func (p *Proxy) forwardOpened(ms *mux.Stream, mr *msgReader, ex *h2Exchange, s *h2Stream, err error, end bool, r route) {
	if err != nil {
		p.reportError(slog.LevelWarn, dirInbound, refuseDial, r.target.String(), "connecting to local service failed", "service", r.svc.Name, "addr", r.target, "err", err)
		ex.status = 502
		ex.finish(p, false)
		answerMux(ms, mr, end, 502, "connecting to local service failed")
		return
	}
	if !s.attach(ms, false) {
		return
	}
	// The request may end long before its response (a server stream):
	// a reset from the client meanwhile must still reach the service.
	if end || s.toH2(mr) {
		ms.OnReset(func(e *mux.ResetError) { s.peerReset(e.Code) })
	}
}

// http2ErrProtocol is HTTP/2's PROTOCOL_ERROR as a mux reset code.
const http2ErrProtocol = 0x1

// answerMux answers a request on its mux stream with the proxy's own
// response. A request still sending its body is read to its end (a reset
// would drop the answer at the client) for at most bodyGrace.
func answerMux(ms *mux.Stream, mr *msgReader, ended bool, code int, why string) {
	fields, body := proxyAnswer(code, why)
	b := appendMsgHead(nil, msgHeaders, 0)
	b = appendFields(b, fields)
	setMsgLen(b)
	b = appendMsgHead(b, msgData|msgEnd, len(body))
	b = append(b, body...)
	if ok, err := ms.TryWrite(b, true); !ok && err == nil {
		ms.WriteClose(b)
	}
	if !ended {
		ms.SetReadDeadline(time.Now().Add(bodyGrace))
		for {
			if _, _, err := mr.next(); err != nil {
				break
			}
		}
	}
	ms.Close()
}

// h2Exchange is one forwarded HTTP/2 request's metrics, balancing and tap
// record.
type h2Exchange struct {
	method, path, authority string
	grpc                    bool
	start                   time.Time
	m                       *h2Metrics // set with labels, before the stream is shared

	mu         sync.Mutex
	labels     []string
	service    string
	serverID   string
	balanced   string // the service VIP's name when balanced
	choice     *balance.Choice
	timer      *time.Timer
	status     int
	grpcStatus string
	headAt     bool
	done       bool
	bytesIn    int64
	bytesOut   int64
}

// Header fields an HTTP/2 request must not carry (RFC 9113 8.2.2), and
// those only proxies may set.
var (
	h2ConnHeaders = []string{"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
	h2MeshHeaders = []string{"l5d-orig-proto", "vmesh-dst-port"}
)

// newExchange checks a request head and returns it without the mesh's own
// fields, filtered in place (fields is the caller's scratch); ok=false for
// a malformed request (a stream error).
func newExchange(fields []hpack.HeaderField) (ex *h2Exchange, out []hpack.HeaderField, ok bool) {
	ex = &h2Exchange{start: time.Now()}
	out = fields[:0]
	scheme := false
	for _, f := range fields {
		if !validH2Field(f) {
			return ex, nil, false
		}
		switch f.Name {
		case ":method":
			ex.method = f.Value
		case ":path":
			ex.path = f.Value
		case ":authority":
			ex.authority = f.Value
		case ":scheme":
			scheme = true
		case "content-type":
			ex.grpc = f.Value == "application/grpc" || strings.HasPrefix(f.Value, "application/grpc+") || strings.HasPrefix(f.Value, "application/grpc;")
		case "te":
			if f.Value != "trailers" {
				return ex, nil, false
			}
		case "host":
			if ex.authority == "" {
				ex.authority = f.Value
			}
		}
		for _, h := range h2ConnHeaders {
			if f.Name == h {
				return ex, nil, false
			}
		}
		mesh := false
		for _, h := range h2MeshHeaders {
			mesh = mesh || f.Name == h
		}
		if !mesh {
			out = append(out, f)
		}
	}
	if ex.method == "" || (ex.method != "CONNECT" && (ex.path == "" || !scheme)) {
		return ex, nil, false
	}
	return ex, out, true
}

// h2Metrics are one label set's request metrics, looked up once per
// label set (not per request) and shared by every stream with it.
type h2Metrics struct {
	labels   []string
	requests prometheus.Counter
	latency  prometheus.Observer
	mu       sync.Mutex
	resp     map[int]prometheus.Counter // status*2 + failure
}

func (p *Proxy) h2Metrics(l connLabels) *h2Metrics {
	if m, ok := p.h2m.Load(l); ok {
		return m.(*h2Metrics)
	}
	v := l.values()
	m, _ := p.h2m.LoadOrStore(l, &h2Metrics{
		labels:   v,
		requests: p.m.requests.WithLabelValues(v...),
		latency:  p.m.latency.WithLabelValues(v...),
		resp:     make(map[int]prometheus.Counter, 2),
	})
	return m.(*h2Metrics)
}

func (m *h2Metrics) response(p *Proxy, status int, class string) {
	k := status * 2
	if class == "failure" {
		k++
	}
	m.mu.Lock()
	c, ok := m.resp[k]
	if !ok {
		c = p.m.responses.WithLabelValues(append(m.labels[:len(m.labels):len(m.labels)], statusLabel(status), class)...)
		m.resp[k] = c
	}
	m.mu.Unlock()
	c.Inc()
}

func (ex *h2Exchange) setLabels(p *Proxy, l connLabels) {
	ex.m = p.h2Metrics(l)
	ex.mu.Lock()
	ex.labels = ex.m.labels
	ex.service, ex.serverID = l.service, l.serverID
	ex.mu.Unlock()
}

// validH2Field reports whether f may appear in an HTTP/2 request (RFC 9113
// 8.2.1): a known pseudo-header or a lowercase token, and a value without
// CR, LF or NUL. The app's proxy has the HTTP/2 framer check this; the
// service's proxy checks the peer's fields here.
func validH2Field(f hpack.HeaderField) bool {
	switch f.Name {
	case ":method", ":scheme", ":authority", ":path", ":protocol":
	default:
		if !validFieldName(f.Name) {
			return false
		}
	}
	return httpguts.ValidHeaderFieldValue(f.Value)
}

func (ex *h2Exchange) setTimer(t *time.Timer) {
	ex.mu.Lock()
	if ex.done {
		t.Stop()
	} else {
		ex.timer = t
	}
	ex.mu.Unlock()
}

// head records the final response head: latency, status, a trailers-only
// response's grpc-status, the balancer's observation.
func (ex *h2Exchange) head(p *Proxy, status int, fields []hpack.HeaderField) {
	ex.mu.Lock()
	if ex.headAt || ex.labels == nil {
		ex.mu.Unlock()
		return
	}
	ex.headAt = true
	ex.status = status
	for _, f := range fields {
		if f.Name == "grpc-status" {
			ex.grpcStatus = f.Value
		}
	}
	ex.mu.Unlock()
	ex.m.latency.Observe(float64(time.Since(ex.start)) / float64(time.Millisecond))
	ex.endpointDone(p, nil)
}

func (ex *h2Exchange) trailers(fields []hpack.HeaderField) {
	ex.mu.Lock()
	for _, f := range fields {
		if f.Name == "grpc-status" {
			ex.grpcStatus = f.Value
		}
	}
	ex.mu.Unlock()
}

func (ex *h2Exchange) bytes(response bool, n int) {
	ex.mu.Lock()
	if response {
		ex.bytesOut += int64(n)
	} else {
		ex.bytesIn += int64(n)
	}
	ex.mu.Unlock()
}

// endpointDone tells the balancer how the balanced endpoint did, once.
func (ex *h2Exchange) endpointDone(p *Proxy, err error) {
	ex.mu.Lock()
	c, svc := ex.choice, ex.balanced
	ex.choice = nil
	ex.mu.Unlock()
	if c != nil {
		p.endpointDone(svc, c, time.Since(ex.start), err)
		c.Release()
	}
}

// finish records the response once: ok says the stream ended cleanly. A
// gRPC call fails unless it ends with grpc-status 0 (see meteredBody).
func (ex *h2Exchange) finish(p *Proxy, ok bool) {
	ex.mu.Lock()
	if ex.done {
		ex.mu.Unlock()
		return
	}
	ex.done = true
	if ex.timer != nil {
		ex.timer.Stop()
	}
	labels, status, gs := ex.labels, ex.status, ex.grpcStatus
	ex.mu.Unlock()
	ex.endpointDone(p, errIncomplete)
	if labels == nil {
		return
	}
	class := "success"
	if !ok || status >= 500 || (gs != "" && gs != "0") || (ex.grpc && gs == "") {
		class = "failure"
	}
	ex.m.response(p, status, class)
	if p.m.tap.active() {
		ev := TapEvent{Time: time.Now(), Kind: TapHTTP, Status: status, Method: ex.method, Authority: ex.authority, Path: ex.path}
		tapLabels(&ev, labels)
		ex.mu.Lock()
		ev.BytesIn, ev.BytesOut = ex.bytesIn, ex.bytesOut
		ex.mu.Unlock()
		ev.LatencyMS = float64(ev.Time.Sub(ex.start)) / float64(time.Millisecond)
		p.m.tap.publish(&ev)
	}
}

// h2Pool keeps HTTP/2 connections to local services (the client role of
// h2Conn), streams spread over as few as their limits allow; a connection
// idle for h2fLocalIdle is closed.
type h2Pool struct {
	p      *Proxy
	mu     sync.Mutex
	conns  map[netip.AddrPort][]*h2Conn
	closed bool
}

func newH2Pool(p *Proxy) *h2Pool {
	return &h2Pool{p: p, conns: make(map[netip.AddrPort][]*h2Conn)}
}

var (
	errH2Full   = errors.New("http2 connection full")
	errH2NoConn = errors.New("no pooled http2 connection")
)

// open opens a stream for a request to addr with its head.
func (pl *h2Pool) open(addr netip.AddrPort, ex *h2Exchange, fields []hpack.HeaderField, end, flush, dial bool, cork func(*h2Conn)) (*h2Stream, error) {
	for attempt := 0; attempt < 3; attempt++ {
		c := pl.pick(addr)
		if c == nil && !dial {
			return nil, errH2NoConn
		}
		if c != nil && cork != nil {
			cork(c)
		}
		if c == nil {
			var err error
			if c, err = pl.dial(addr); err != nil {
				return nil, err
			}
		}
		s, err := c.openStream(ex, fields, end, flush)
		if err == nil {
			return s, nil
		}
		if !errors.Is(err, errH2Full) {
			return nil, err
		}
	}
	return nil, errH2Full
}

// pick returns a live connection to addr with room for a stream, closing
// those idle too long.
func (pl *h2Pool) pick(addr netip.AddrPort) *h2Conn {
	now := time.Now()
	pl.mu.Lock()
	defer pl.mu.Unlock()
	var best *h2Conn
	list := pl.conns[addr]
	kept := list[:0]
	for _, c := range list {
		c.mu.Lock()
		dead := c.closed || c.goaway
		idle := !c.idleAt.IsZero() && now.Sub(c.idleAt) > h2fLocalIdle
		room := uint32(len(c.streams)) < c.peerStreams
		c.mu.Unlock()
		if dead || idle {
			c.nc.Close()
			continue
		}
		kept = append(kept, c)
		if room && best == nil {
			best = c
		}
	}
	clear(list[len(kept):])
	pl.conns[addr] = kept
	return best
}

func (pl *h2Pool) dial(addr netip.AddrPort) (*h2Conn, error) {
	nc, err := pl.p.dial(context.Background(), addr)
	if err != nil {
		return nil, err
	}
	nc = rawsock.Wrap(nc)
	c := newH2Conn(pl.p, nc, false, nc)
	c.pool = pl
	if err := c.start(); err != nil {
		nc.Close()
		return nil, err
	}
	pl.mu.Lock()
	if pl.closed {
		pl.mu.Unlock()
		nc.Close()
		return nil, errors.New("proxy closed")
	}
	pl.conns[addr] = append(pl.conns[addr], c)
	pl.mu.Unlock()
	go c.serve()
	return c, nil
}

func (pl *h2Pool) remove(c *h2Conn) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	for addr, list := range pl.conns {
		for i, x := range list {
			if x == c {
				pl.conns[addr] = append(list[:i:i], list[i+1:]...)
				return
			}
		}
	}
}

// closeIdle closes the connections that carry no stream (Shutdown).
func (pl *h2Pool) closeIdle() {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	for _, list := range pl.conns {
		for _, c := range list {
			c.mu.Lock()
			idle := len(c.streams) == 0
			c.mu.Unlock()
			if idle {
				c.nc.Close()
			}
		}
	}
}

func (pl *h2Pool) close() {
	pl.mu.Lock()
	pl.closed = true
	all := pl.conns
	pl.conns = map[netip.AddrPort][]*h2Conn{}
	pl.mu.Unlock()
	for _, list := range all {
		for _, c := range list {
			c.nc.Close()
		}
	}
}

// openStream (client role) opens a stream with the request head; flush
// false leaves it for the body's first write.
func (c *h2Conn) openStream(ex *h2Exchange, fields []hpack.HeaderField, end, flush bool) (*h2Stream, error) {
	var s *h2Stream
	var openErr error
	err := c.write(func(*http2.Framer) error {
		c.mu.Lock()
		if c.closed || c.goaway || uint32(len(c.streams)) >= c.peerStreams || c.nextID >= 1<<31-1 {
			c.mu.Unlock()
			openErr = errH2Full
			return nil
		}
		id := c.nextID
		c.nextID += 2
		s = &h2Stream{c: c, id: id, ex: ex, recvWin: h2fStreamWindow, sendWin: c.initSend, sentEnd: end}
		c.streams[id] = s
		c.idleAt = time.Time{}
		maxFrame := int(c.maxFrame)
		c.mu.Unlock()
		return c.writeBlockLocked(id, fields, end, maxFrame)
	}, flush || end)
	if openErr != nil {
		return nil, openErr
	}
	if err != nil {
		return nil, err
	}
	return s, nil
}
