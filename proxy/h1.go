package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vmesh/vmesh/balance"
	"github.com/vmesh/vmesh/internal/mux"
	"github.com/vmesh/vmesh/internal/rawsock"
)

// The lean HTTP/1 path. One goroutine per accepted connection reads a
// request, picks the upstream (a pooled keep-alive mTLS connection to the
// peer proxy with ALPN "vmesh.h1/1", or a pooled keep-alive connection to
// the local service), writes the request to it, reads the response and
// writes it back: no hand-off to another goroutine unless the request body
// has not arrived whole (it is then copied by a second goroutine while the
// response is read, so 100-continue and early responses work). Head and
// body go out in one write when both are ready. Between proxies the
// request carries the mesh's fields: Vmesh-Dst-Port (the target port) and
// L5d-Orig-Proto (for HTTP/1.0 clients); bodies of unknown length are
// chunked on that hop so its connections stay reusable.

// alpnH1 carries pooled HTTP/1.1 keep-alive connections between proxies.
const alpnH1 = "vmesh.h1/1"

// Buffer sizes of the lean path's connections. Writes of up to
// h1WriteBuf go out as one TLS record.
const (
	h1ReadBuf  = 8 << 10
	h1WriteBuf = 16 << 10
	// maxDiscardBody is the largest request body read and dropped after
	// the proxy answered without it, keeping the connection; larger
	// bodies close it.
	maxDiscardBody = 64 << 10
)

// h1Conn serves one accepted connection on the lean path: an app's
// (outbound, or redirected inbound) or a peer proxy's.
type h1Conn struct {
	p        *Proxy
	c        net.Conn
	br       *bufio.Reader
	bw       *bufio.Writer
	r        route  // routeHTTP, routeInboundHTTP or routePeerHTTP
	clientID string // routePeerHTTP: the peer's identity
	tlsLabel string
	req      h1Head
	resp     h1Head
	idle     atomic.Bool // waiting for a request: Shutdown may close it
	pr       prefixReader
	small    [1024]byte // an idle connection's next bytes land here, not in br
	sent100  bool       // a 100 Continue was relayed for the current request
	arr      [64]byte
	bc       bodyCopier // the body being relayed by this goroutine

	mc *h1Metrics // metrics of the last service served
	// The current request's outcome, for the tap (tap.go).
	status    int
	respBytes int64
	reported  bool // the failure was reported already (errlog.go)

	mcSvc *localService

	// Watching the client while its response is slow (watchClient).
	watchState atomic.Int32 // watchIdle, watchWaiting or watchRunning
	waitSince  atomic.Int64 // watchWaiting since (Unix ns)
	watchUC    *upConn
	watchDone  chan struct{}
	watchGone  bool
}

// Watch states.
const (
	watchIdle    = iota // no response awaited, or the client may not be watched
	watchWaiting        // a response is awaited; the sweeper may start a watch
	watchRunning        // watchOnce reads ahead on the client connection
)

// h1Metrics are one label set's request metrics, looked up once.
type h1Metrics struct {
	labels   []string
	allowed  prometheus.Counter // inbound: inbound_http_authz_allow_total
	requests prometheus.Counter
	latency  prometheus.Observer
	resp     map[int]prometheus.Counter // status*2 + failure
}

func (p *Proxy) newH1Metrics(l connLabels) *h1Metrics {
	v := l.values()
	return &h1Metrics{
		labels:   v,
		requests: p.m.requests.WithLabelValues(v...),
		latency:  p.m.latency.WithLabelValues(v...),
		resp:     make(map[int]prometheus.Counter, 2),
	}
}

func (m *h1Metrics) response(p *Proxy, status int, success bool) {
	k := status * 2
	class := "success"
	if !success {
		k++
		class = "failure"
	}
	c, ok := m.resp[k]
	if !ok {
		c = p.m.responses.WithLabelValues(append(m.labels[:len(m.labels):len(m.labels)], statusLabel(status), class)...)
		m.resp[k] = c
	}
	c.Inc()
}

// prefixReader reads b, then r: the bytes protocol detection read first.
type prefixReader struct {
	b []byte
	r io.Reader
}

func (pr *prefixReader) Read(b []byte) (int, error) {
	if len(pr.b) > 0 {
		n := copy(b, pr.b)
		pr.b = pr.b[n:]
		return n, nil
	}
	return pr.r.Read(b)
}

// serveH1 serves the HTTP/1 requests of an accepted connection on route r
// (peeked: bytes detection already read).
func (p *Proxy) serveH1(c net.Conn, peeked []byte, r route, clientID string) {
	h := &h1Conn{p: p, c: c, r: r, clientID: clientID, watchDone: make(chan struct{}, 1)}
	h.pr = prefixReader{b: peeked, r: c}
	h.takeBuffers()
	defer h.releaseBuffers()
	h.tlsLabel = tlsTrue
	if r.kind == routeInboundHTTP {
		h.tlsLabel = tlsNoIdentity
	}
	p.h1conns.Store(h, struct{}{})
	defer p.h1conns.Delete(h)
	for !p.drain.Load() {
		h.idle.Store(true)
		err := h.awaitRequest()
		if err == nil {
			err = h.readRequest()
		}
		h.idle.Store(false)
		if err != nil {
			var he *httpError
			if errors.As(err, &he) {
				h.reject(he)
			}
			return
		}
		if !p.m.tap.active() {
			if !h.exchange() {
				return
			}
			continue
		}
		start := time.Now()
		h.status, h.respBytes = 0, 0
		ok := h.exchange()
		h.tapH1(start) // tap.go
		if !ok {
			return
		}
	}
}

// Buffers of the lean path's connections, shared: a connection holds them
// only while it has a request in hand.
var (
	h1Readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, h1ReadBuf) }}
	h1Writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, h1WriteBuf) }}
)

func (h *h1Conn) takeBuffers() {
	h.br = h1Readers.Get().(*bufio.Reader)
	h.br.Reset(&h.pr)
	h.bw = h1Writers.Get().(*bufio.Writer)
	h.bw.Reset(h.c)
}

func (h *h1Conn) releaseBuffers() {
	if h.br == nil {
		return
	}
	h.br.Reset(nil)
	h1Readers.Put(h.br)
	h.bw.Reset(nil)
	h1Writers.Put(h.bw)
	h.br, h.bw = nil, nil
}

// awaitRequest waits for the next request's first bytes. With nothing
// buffered, an idle keep-alive connection gives its buffers back and waits
// with a read into h.small (the same single read that would have filled
// br), so it costs little memory for as long as it stays idle.
func (h *h1Conn) awaitRequest() error {
	if h.br.Buffered() > 0 || len(h.pr.b) > 0 {
		return nil
	}
	h.releaseBuffers()
	n, err := h.c.Read(h.small[:])
	if n == 0 {
		if err == nil {
			err = io.ErrNoProgress
		}
		return err
	}
	h.pr.b = h.small[:n]
	h.takeBuffers()
	return nil
}

// readRequest reads and parses the next request head. The head must arrive
// within Config.DetectTimeout of its first byte; an idle keep-alive
// connection may wait for that first byte as long as it likes.
func (h *h1Conn) readRequest() error {
	if _, err := h.br.Peek(1); err != nil {
		return err
	}
	if buf, _ := h.br.Peek(h.br.Buffered()); !bytes.Contains(buf, []byte("\n\r\n")) && !bytes.Contains(buf, []byte("\n\n")) {
		// The head is not all here: bound the wait for the rest.
		h.c.SetReadDeadline(time.Now().Add(h.p.cfg.DetectTimeout))
		defer h.c.SetReadDeadline(time.Time{})
	}
	if err := readHead(h.br, &h.req); err != nil {
		return err
	}
	if err := h.req.parseRequest(); err != nil {
		return err
	}
	if asciiEqualFold(h.req.method, "connect") {
		return errConnect
	}
	// HTTP/1.1 requires one Host; HTTP/1.0 may have none (a peer proxy
	// says a request is HTTP/1.0 in L5d-Orig-Proto).
	if h.req.hosts > 1 || (h.req.hosts == 0 && h.req.minor == 1 &&
		(h.r.kind != routePeerHTTP || !bytes.Equal(h.req.origProto, []byte("HTTP/1.0")))) {
		return errBadHost
	}
	return nil
}

var errConnect = &httpError{405, "connect"}

// reject answers a request the proxy refuses to parse and counts it; the
// connection is closed afterwards.
func (h *h1Conn) reject(he *httpError) {
	h.p.m.rejected.WithLabelValues(h.r.dir, he.reason).Inc()
	h.p.log.Debug("HTTP/1 request rejected", "direction", h.r.dir, "reason", he.reason)
	h.writeError(he.status, "bad request: "+he.reason, true)
}

// writeError answers with code, l5d-proxy-error saying why, and a short
// body.
func (h *h1Conn) writeError(code int, why string, closeConn bool) error {
	bw := h.bw
	bw.WriteString("HTTP/1.1 ")
	bw.Write(strconv.AppendInt(h.arr[:0], int64(code), 10))
	bw.WriteByte(' ')
	bw.WriteString(statusText(code))
	bw.WriteString("\r\nContent-Type: text/plain; charset=utf-8\r\nL5d-Proxy-Error: ")
	bw.WriteString(why)
	bw.WriteString("\r\nContent-Length: ")
	bw.Write(strconv.AppendInt(h.arr[:0], int64(len(why)+8), 10))
	if closeConn {
		bw.WriteString("\r\nConnection: close")
	}
	bw.WriteString("\r\n\r\nvmesh: ")
	bw.WriteString(why)
	bw.WriteByte('\n')
	return bw.Flush()
}

func statusText(code int) string {
	switch code {
	case 400:
		return "Bad Request"
	case 403:
		return "Forbidden"
	case 405:
		return "Method Not Allowed"
	case 431:
		return "Request Header Fields Too Large"
	case 501:
		return "Not Implemented"
	case 502:
		return "Bad Gateway"
	case 503:
		return "Service Unavailable"
	case 504:
		return "Gateway Timeout"
	case 505:
		return "HTTP Version Not Supported"
	}
	return "Error"
}

// h1Leg is where one request goes.
type h1Leg struct {
	m       *h1Metrics
	pool    *upPool
	key     poolKey
	ep      Endpoint        // to a peer proxy
	peer    bool            // upstream is a peer proxy: mesh fields, HTTP/1.1
	minor   int             // HTTP version to a local service
	port    uint16          // to a peer: the target port
	timeout time.Duration   // Config.RequestTimeout, or the service's or route's (outbound)
	target  netip.AddrPort  // to a local service
	choice  *balance.Choice // to a service VIP: the balancer's pick, released after the response
	retryOn []int           // to a service VIP: response statuses its route retries
}

// leg decides where the current request goes; ok=false means it was
// answered (denied) and keep says whether the connection goes on.
func (h *h1Conn) leg() (l h1Leg, ok, keep bool) {
	p, req := h.p, &h.req
	switch h.r.kind {
	case routeHTTP:
		ep, choice, ok := h.endpoint(nil)
		if !ok {
			return l, false, h.answerEarly(nil, 503, "no endpoint")
		}
		if h.mc == nil {
			h.mc = p.newH1Metrics(connLabels{direction: dirOutbound, service: ep.Service, serverID: ep.Identity, tls: tlsTrue})
		}
		l = h1Leg{m: h.mc, pool: p.h1peers, peer: true}
		l.timeout, l.retryOn = p.policy(ep.Service).requestPolicy(req.method, req.target, p.cfg.RequestTimeout)
		l.to(ep, choice, h.r)
		return l, true, true
	case routePeerHTTP:
		port, err := strconv.ParseUint(string(req.dstPort), 10, 16)
		var svc *localService
		if err == nil {
			svc, _ = p.localService(uint16(port))
		}
		r := p.routes.peer(uint16(port), svc, protoHTTP1)
		if r.kind == routeDeny {
			p.m.refused.WithLabelValues(dirInbound, r.reason).Inc()
			return l, false, h.answerEarly(nil, 403, "unknown target port")
		}
		l = h1Leg{pool: p.h1local, key: poolKey{addr: r.target}, target: r.target, minor: 1}
		if bytes.Equal(req.origProto, []byte("HTTP/1.0")) {
			l.minor = 0
		}
		return h.authorized(l, svc)
	case routeInboundHTTP:
		l = h1Leg{pool: p.h1local, key: poolKey{addr: h.r.target}, target: h.r.target, minor: req.minor}
		return h.authorized(l, h.r.svc)
	}
	return l, false, h.answerEarly(nil, 500, "no HTTP route")
}

// endpoint picks the endpoint of the current outbound request: the
// route's endpoint, or for a service VIP the balancer's pick among those
// not tried yet (balance.go).
func (h *h1Conn) endpoint(tried []string) (Endpoint, *balance.Choice, bool) {
	if h.r.balanced {
		return h.p.pickEndpoint(h.r.ep.Service, tried)
	}
	return h.r.ep, nil, h.r.ep.ProxyAddr.IsValid()
}

// to points the leg at ep (a balanced pick when choice is set).
func (l *h1Leg) to(ep Endpoint, choice *balance.Choice, r route) {
	l.ep, l.choice = ep, choice
	l.key = poolKey{addr: ep.ProxyAddr, service: ep.Service, identity: ep.Identity}
	l.port = r.dst.Port()
	if r.balanced {
		l.port = ep.Addr.Port()
	}
}

// nextEndpoint moves a balanced leg whose attempt failed before the app saw
// anything to another endpoint, spending the service's retry budget. It
// reports false when the leg is not balanced, every attempt is spent, no
// endpoint is left or the budget is.
func (h *h1Conn) nextEndpoint(l *h1Leg, tried *[]string, err error, reason string) bool {
	if l.choice == nil {
		return false
	}
	service := l.ep.Service
	h.p.endpointDone(service, l.choice, 0, err)
	l.choice.Release()
	*tried = append(*tried, l.choice.Key)
	l.choice = nil
	if len(*tried) >= balancedAttempts {
		return false
	}
	ep, choice, ok := h.endpoint(*tried)
	if !ok {
		return false
	}
	if !h.p.mayRetry(service, "http") {
		choice.Release()
		return false
	}
	h.p.m.retries.WithLabelValues(dirOutbound, service, "http", reason).Inc()
	l.to(ep, choice, h.r)
	return true
}

// retryStatus moves a balanced leg whose response has a status its route
// retries to another endpoint, when one is left and the budget allows;
// the caller then drops the response with its connection. sent is when
// the request went out (the endpoint answered: a success for the
// balancer).
func (h *h1Conn) retryStatus(l *h1Leg, tried *[]string, sent time.Time) bool {
	if l.choice == nil || len(*tried)+1 >= balancedAttempts || !slices.Contains(l.retryOn, h.resp.status) {
		return false
	}
	service := l.ep.Service
	ep, choice, ok := h.endpoint(append(*tried, l.choice.Key))
	if !ok {
		return false
	}
	if !h.p.mayRetry(service, "http") {
		choice.Release()
		return false
	}
	h.p.endpointDone(service, l.choice, time.Since(sent), nil)
	l.choice.Release()
	*tried = append(*tried, l.choice.Key)
	h.p.m.retries.WithLabelValues(dirOutbound, service, "http", "status").Inc()
	l.to(ep, choice, h.r)
	return true
}

// authorized authorizes the current request for svc; a denial is answered
// with 403.
func (h *h1Conn) authorized(l h1Leg, svc *localService) (h1Leg, bool, bool) {
	if h.mcSvc != svc || h.mc == nil {
		h.mc = h.p.newH1Metrics(connLabels{direction: dirInbound, service: svc.Name, clientID: h.clientID, tls: h.tlsLabel})
		h.mc.allowed = h.p.m.httpAllow.WithLabelValues(svc.Name, h.clientID, h.tlsLabel)
		h.mcSvc = svc
	}
	l.m = h.mc
	if d := svc.authorize(h.clientID); d.allow && d.reason == "" {
		l.m.allowed.Inc() // the common case, without the label lookups
		return l, true, true
	}
	if d := h.p.authorize("http", svc, h.clientID, h.tlsLabel); !d.allow {
		l.m.requests.Inc()
		return l, false, h.answerEarly(l.m, 403, "unauthorized: "+d.reason)
	}
	return l, true, true
}

// answerEarly answers the current request without forwarding it, counting
// the response when m is set, and drops its body when that is cheap. It
// reports whether the connection can go on.
func (h *h1Conn) answerEarly(m *h1Metrics, code int, why string) bool {
	req := &h.req
	keep := !req.connClose
	switch {
	case req.body == bodyNone:
	case req.body == bodyLength && req.length <= maxDiscardBody && !req.expect100:
	default:
		keep = false
	}
	if m != nil {
		m.response(h.p, code, false)
	}
	h.answered(code, why)
	if h.writeError(code, why, !keep) != nil || !keep {
		return false
	}
	if req.body == bodyLength {
		if _, err := h.br.Discard(int(req.length)); err != nil {
			return false
		}
	}
	return true
}

// exchange forwards the current request and relays its response. It
// reports whether the connection can serve another request.
func (h *h1Conn) exchange() bool {
	l, ok, keep := h.leg()
	if !ok {
		return keep
	}
	req, resp := &h.req, &h.resp
	l.m.requests.Inc()
	start := time.Now()
	if l.peer {
		h.p.h1PeerBusy.Add(1)
		defer h.p.h1PeerBusy.Add(-1)
	}

	var uc *upConn
	var bodyDone chan error // set when the body is copied by another goroutine
	retried := false
	var tried []string // balanced: endpoints that failed this request
	var sent time.Time
	defer func() {
		if l.choice != nil {
			l.choice.Release()
		}
	}()
	var err error
	for {
		uc, err = h.upstream(&l)
		if err != nil {
			h.connectFailed(&l, err) // errlog.go: counted and logged
			if h.nextEndpoint(&l, &tried, err, "connect") {
				h.reported = false
				continue // nothing was sent: any request may go elsewhere
			}
			return h.failEarly(l, bodyDone, 502, "connecting upstream failed")
		}
		if l.timeout > 0 {
			uc.SetDeadline(start.Add(l.timeout))
		}
		sent = time.Now() // the balancer measures the exchange, not connecting
		bodyDone, err = h.sendRequest(uc, &l)
		if err == nil {
			watching := bodyDone == nil && h.watchClient(uc, start)
			err = h.readResponseHead(uc, bodyDone)
			if watching && h.endWatch() {
				// The client went away while the response was slow.
				l.pool.drop(uc)
				return false
			}
		}
		if err == nil && l.choice != nil && (resp.status == 502 || resp.status == 503) && bodyDone == nil &&
			h.resp.fieldFold("l5d-proxy-error") != nil && req.replayable(h.peerUnreached()) {
			// The peer proxy failed the request: it could not reach its
			// service (the app never saw the request: any request may go
			// again), or the app reset it (an idempotent one may). Another
			// endpoint may do better. The response is dropped with its
			// connection.
			l.pool.drop(uc)
			if h.nextEndpoint(&l, &tried, errPeerUnavailable, "peer_unavailable") {
				continue
			}
			return h.failEarly(l, nil, 502, "every endpoint failed")
		}
		if err == nil && bodyDone == nil && req.replayable(true) && h.retryStatus(&l, &tried, sent) {
			l.pool.drop(uc)
			continue
		}
		if err == nil {
			break
		}
		l.pool.drop(uc)
		if bodyDone == nil && req.replayable(false) && !isTimeout(err) && h.nextEndpoint(&l, &tried, err, "reset") {
			continue
		}
		if uc.reused && !retried && req.replayable(false) && isStale(err) {
			// The pooled connection was closed under us before it
			// answered: try a fresh one (as net/http does, only for a
			// request without a body that is safe to send twice).
			retried = true
			continue
		}
		if bodyDone != nil {
			h.c.SetReadDeadline(time.Now())
			<-bodyDone
		}
		var he *httpError
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded) && l.timeout > 0:
			return h.failEarly(l, nil, 504, "request timeout")
		case errors.As(err, &he) && he.status < 500:
			// The request body was malformed: the app's fault.
			h.p.m.rejected.WithLabelValues(h.r.dir, he.reason).Inc()
			return h.failEarly(l, nil, he.status, "bad request: "+he.reason)
		}
		h.p.log.Debug("proxying request failed", "direction", h.r.dir, "err", err)
		return h.failEarly(l, nil, 502, "proxying failed")
	}
	if req.held {
		// The body was sent from the read buffer, kept for a retry.
		req.held = false
		if _, err := h.br.Discard(int(req.length)); err != nil {
			l.pool.drop(uc)
			return false
		}
	}
	l.m.latency.Observe(float64(time.Since(start)) / float64(time.Millisecond))
	if l.choice != nil {
		h.p.endpointDone(l.ep.Service, l.choice, time.Since(sent), nil)
	}

	if resp.status == 101 {
		h.status = 101
		return h.upgrade(uc, l, bodyDone)
	}

	// The final response: head and body to the client.
	chunked := req.minor == 1 && (resp.body == bodyChunked || resp.body == bodyEOF)
	keep = !req.connClose && !h.p.drain.Load() &&
		(resp.body == bodyNone || resp.body == bodyLength || chunked)
	h.writeResponseHead(keep, chunked)
	bc := &h.bc
	*bc = bodyCopier{dst: h.bw, src: uc.br}
	berr := bc.copy(resp.body, resp.length, chunked)
	if berr == nil {
		berr = flushH1(h.bw, h.c)
	}
	l.m.response(h.p, resp.status, berr == nil && resp.status < 500)
	if l.peer && resp.status >= 400 {
		h.peerAnswered(&l) // errlog.go
	}
	h.status, h.respBytes = resp.status, bc.n

	var reqErr error
	if bodyDone != nil {
		reqErr = h.awaitBody(bodyDone)
	}
	if l.timeout > 0 {
		uc.SetDeadline(time.Time{})
	}
	if berr == nil && reqErr == nil && !resp.connClose && resp.body != bodyEOF && (l.peer || l.minor == 1 || resp.keepAlive) {
		l.pool.put(uc)
	} else {
		l.pool.drop(uc)
	}
	if berr != nil {
		h.p.log.Debug("relaying response body failed", "direction", h.r.dir, "err", berr)
	}
	return keep && berr == nil && reqErr == nil
}

// watchAfter is how long a response may take before the proxy checks
// whether its client is still there.
const watchAfter = time.Second

// watchClient arranges that a client that goes away while its response is
// slow does not hold the upstream connection (a long poll, a request the
// client gave up on): once the response has taken watchAfter, the proxy's
// sweeper (sweepSlowH1) starts watchOnce, which reads ahead on the client
// connection and closes uc if the client closed it, as net/http cancels a
// request whose client went away. endWatch ends the watch; h.br is the
// caller's again after it. Per request this costs two atomic stores, no
// timer. A client that already sent more bytes (pipelining) is there: no
// watch.
func (h *h1Conn) watchClient(uc *upConn, since time.Time) bool {
	if h.br.Buffered() > 0 {
		return false
	}
	h.watchUC, h.watchGone = uc, false
	h.waitSince.Store(since.UnixNano())
	h.watchState.Store(watchWaiting)
	return true
}

// watchOnce waits for the client to send something or go away.
func (h *h1Conn) watchOnce() {
	if _, err := h.br.Peek(1); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		h.watchGone = true
		h.watchUC.Close()
	}
	h.watchDone <- struct{}{}
}

// endWatch ends a watch and reports whether the client went away.
func (h *h1Conn) endWatch() bool {
	if h.watchState.CompareAndSwap(watchWaiting, watchIdle) {
		return false
	}
	h.c.SetReadDeadline(time.Now())
	<-h.watchDone
	h.c.SetReadDeadline(time.Time{})
	h.watchState.Store(watchIdle)
	return h.watchGone
}

// sweepSlowH1 starts a watch on every lean-path connection whose response
// has taken watchAfter, until stop is closed.
func (p *Proxy) sweepSlowH1(stop <-chan struct{}) {
	t := time.NewTicker(watchAfter / 2)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			p.h1conns.Range(func(k, _ any) bool {
				h := k.(*h1Conn)
				if h.watchState.Load() == watchWaiting && now.UnixNano()-h.waitSince.Load() >= int64(watchAfter) &&
					h.watchState.CompareAndSwap(watchWaiting, watchRunning) {
					go h.watchOnce()
				}
				return true
			})
		}
	}
}

// bodyGrace bounds the wait for the rest of a request body after its
// response ended.
const bodyGrace = 5 * time.Second

// awaitBody waits for the request body copier after the response ended:
// the client may still be sending what the upstream has all read. A client
// told nothing (100-continue without a 100) sends nothing: that body, or
// one still coming after bodyGrace, is cut, leaving neither connection
// reusable.
func (h *h1Conn) awaitBody(bodyDone chan error) error {
	select {
	case err := <-bodyDone:
		return err
	default:
	}
	if !h.req.expect100 || h.sent100 {
		t := time.NewTimer(bodyGrace)
		defer t.Stop()
		select {
		case err := <-bodyDone:
			return err
		case <-t.C:
		}
	}
	h.c.SetReadDeadline(time.Now())
	<-bodyDone
	return errIncomplete
}

// replayable reports whether the request may be sent again after an
// attempt failed: its body is none or still held in the read buffer (a
// streamed body is gone), and either no app saw it (appUnseen: a peer
// proxy that could not connect; a route that retries statuses, opted in
// by the operator) or it is idempotent by method (GET, HEAD, OPTIONS,
// TRACE, PUT, DELETE) or idempotency key.
func (h *h1Head) replayable(appUnseen bool) bool {
	if h.body != bodyNone && !h.held {
		return false // streamed: gone
	}
	if appUnseen {
		return true // the app never saw it: any request may go again
	}
	switch string(h.method) {
	case "GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE":
		return true
	}
	for _, f := range h.fields {
		if asciiEqualFold(f.name, "idempotency-key") || asciiEqualFold(f.name, "x-idempotency-key") {
			return true
		}
	}
	return false
}

// isStale reports whether err says a pooled connection was closed before
// it answered.
func isStale(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, errStaleConn) || isConnReset(err)
}

var errStaleConn = errors.New("pooled connection closed")

// failEarly answers 5xx (or 4xx) before any response byte was sent and
// counts it; the connection is closed if the request body was not all
// read.
func (h *h1Conn) failEarly(l h1Leg, bodyDone chan error, code int, why string) bool {
	if bodyDone != nil {
		h.c.SetReadDeadline(time.Now())
		<-bodyDone
		l.m.response(h.p, code, false)
		h.answered(code, why)
		h.writeError(code, why, true)
		return false
	}
	return h.answerEarly(l.m, code, why)
}

// upstream returns a pooled connection for l or dials one.
func (h *h1Conn) upstream(l *h1Leg) (*upConn, error) {
	p := h.p
	if l.peer {
		l.key.mux = p.h1Mux || p.h1PeerBusy.Load() >= h1MuxAt
	}
	if uc := l.pool.get(l.key); uc != nil {
		return uc, nil
	}
	var c net.Conn
	var err error
	switch {
	case l.peer && l.key.mux:
		c, err = p.openH1Stream(l.ep, l.port)
	case l.peer:
		c, err = p.dialTransport(context.Background(), l.ep, alpnH1)
	default:
		if c, err = p.dial(context.Background(), l.target); err == nil {
			c = rawsock.Wrap(c)
		}
	}
	if err != nil {
		return nil, err
	}
	uc, ok := l.pool.add(c, l.key)
	if !ok {
		return nil, net.ErrClosed
	}
	return uc, nil
}

// sendRequest writes the request head and, when it is all here, its body;
// otherwise a goroutine copies the body and reports on the returned
// channel.
func (h *h1Conn) sendRequest(uc *upConn, l *h1Leg) (chan error, error) {
	req := &h.req
	bw := uc.bw
	bw.Write(req.method)
	bw.WriteByte(' ')
	bw.Write(req.target)
	if l.peer || l.minor == 1 {
		bw.WriteString(" HTTP/1.1\r\n")
	} else {
		bw.WriteString(" HTTP/1.0\r\n")
	}
	for _, f := range req.fields {
		if req.hopByHop(f) {
			continue
		}
		writeField(bw, f.name, f.value)
	}
	if l.peer {
		bw.WriteString("Vmesh-Dst-Port: ")
		bw.Write(strconv.AppendUint(h.arr[:0], uint64(l.port), 10))
		bw.WriteString("\r\n")
		if req.minor == 0 {
			bw.WriteString("L5d-Orig-Proto: HTTP/1.0\r\n")
		}
	}
	switch {
	case req.body == bodyChunked:
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	case req.hasLength: // also Content-Length: 0, which some servers want on a POST
		bw.WriteString("Content-Length: ")
		bw.Write(strconv.AppendInt(h.arr[:0], req.length, 10))
		bw.WriteString("\r\n")
	}
	if req.upgrade {
		bw.WriteString("Connection: Upgrade\r\nUpgrade: ")
		bw.Write(req.field(fUpgrade))
		bw.WriteString("\r\n")
	}
	if req.teTrailers {
		bw.WriteString("Te: trailers\r\n")
	}
	bw.WriteString("\r\n")
	switch {
	case req.body == bodyNone:
		return nil, flushH1(bw, uc.Conn)
	case req.body == bodyLength && !req.expect100 && int64(h.br.Buffered()) >= req.length:
		// The whole body is in the read buffer: send it from there and
		// keep it until the response came, so that the request can be
		// sent again (exchange discards it).
		b, err := h.br.Peek(int(req.length))
		if err != nil {
			return nil, err
		}
		bw.Write(b)
		req.held = true
		return nil, flushH1(bw, uc.Conn)
	}
	// The body is still coming (or waits for 100 Continue): send the head
	// now and copy the body alongside reading the response.
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go copyRequestBody(done, uc, h.br, req.body, req.length)
	return done, nil
}

// copyRequestBody copies a request body that had not arrived whole when
// its head was sent. It has its own name so stack dumps show it.
func copyRequestBody(done chan<- error, uc *upConn, src *bufio.Reader, kind bodyKind, length int64) {
	bc := bodyCopier{dst: uc.bw, src: src}
	err := bc.copy(kind, length, kind == bodyChunked)
	if err == nil {
		err = uc.bw.Flush()
	}
	done <- err
	if err != nil {
		// The upstream waits for the rest of a body that will not come:
		// stop waiting for its response (after done holds the cause).
		uc.SetReadDeadline(time.Now())
	}
}

// flushH1 flushes bw, which writes to c. When c is a mux stream (h1Mux),
// the flushes of the goroutines that run meanwhile are batched with it: the
// session's flush is held (Cork) while this goroutine lets the others run
// (runtime.Gosched), and the last of them to finish flushes for all: one
// system call for the requests (or responses) of many app connections
// that became ready together, where each used to take one. Alone, the
// goroutine runs on at once. Only a flush the stream's window takes now
// is held so: one that must wait for credit would hold back every other
// stream's flushes on the session while it waits (the only writer of a
// stream is its goroutine: its window only grows meanwhile).
func flushH1(bw *bufio.Writer, c net.Conn) error {
	st, ok := c.(*mux.Stream)
	if !ok || bw.Buffered() > st.SendWindow() {
		return bw.Flush()
	}
	s := st.Session()
	s.Cork()
	err := bw.Flush()
	runtime.Gosched()
	s.Uncork()
	return err
}

func writeField(bw *bufio.Writer, name, value []byte) {
	bw.Write(name)
	bw.WriteString(": ")
	bw.Write(value)
	bw.WriteString("\r\n")
}

// readResponseHead reads the response head, relaying 1xx interim responses
// (100 Continue) to HTTP/1.1 clients, until a final response or a 101.
func (h *h1Conn) readResponseHead(uc *upConn, bodyDone chan error) error {
	resp := &h.resp
	head := asciiEqualFold(h.req.method, "head")
	h.sent100 = false
	for {
		if err := readHead(uc.br, resp); err != nil {
			if err == io.EOF {
				return errStaleConn
			}
			if bodyDone != nil {
				// A broken body explains a broken response best.
				select {
				case berr := <-bodyDone:
					bodyDone <- berr
					var he *httpError
					if errors.As(berr, &he) {
						return berr
					}
				default:
				}
			}
			return err
		}
		if err := resp.parseResponse(head); err != nil {
			return err
		}
		if resp.status/100 != 1 || resp.status == 101 {
			if resp.status == 101 && !h.req.upgrade {
				return errors.New("101 to a request that asked for no upgrade")
			}
			return nil
		}
		if h.req.minor == 1 {
			h.sent100 = true
			h.bw.Write(resp.buf)
			if err := h.bw.Flush(); err != nil {
				return err
			}
		}
	}
}

// writeResponseHead writes the final response head to the client, framed
// for it.
func (h *h1Conn) writeResponseHead(keep, chunked bool) {
	resp, bw := &h.resp, h.bw
	bw.WriteString("HTTP/1.1 ")
	bw.Write(strconv.AppendInt(h.arr[:0], int64(resp.status), 10))
	bw.WriteByte(' ')
	bw.Write(resp.reason)
	bw.WriteString("\r\n")
	for _, f := range resp.fields {
		if resp.hopByHop(f) {
			continue
		}
		writeField(bw, f.name, f.value)
	}
	switch {
	case resp.body == bodyLength || (resp.body == bodyNone && resp.hasLength):
		bw.WriteString("Content-Length: ")
		bw.Write(strconv.AppendInt(h.arr[:0], resp.length, 10))
		bw.WriteString("\r\n")
	case chunked:
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	}
	switch {
	case !keep:
		bw.WriteString("Connection: close\r\n")
	case h.req.minor == 0:
		bw.WriteString("Connection: keep-alive\r\n")
	}
	bw.WriteString("\r\n")
}

// upgrade relays a 101 response and then the bytes of both connections as
// they are, counted as a TCP connection.
func (h *h1Conn) upgrade(uc *upConn, l h1Leg, bodyDone chan error) bool {
	if bodyDone != nil {
		if err := <-bodyDone; err != nil {
			l.pool.drop(uc)
			l.m.response(h.p, 101, false)
			return false
		}
	}
	if l.timeout > 0 {
		uc.SetDeadline(time.Time{})
	}
	l.pool.forget(uc)
	l.m.response(h.p, 101, true)
	h.bw.Write(h.resp.buf)
	if err := h.bw.Flush(); err != nil {
		uc.Close()
		return false
	}
	t := h.p.m.openTCP(connLabels{direction: h.r.dir, service: l.m.labels[1], clientID: l.m.labels[2], serverID: l.m.labels[3], tls: l.m.labels[4]})
	in, out, _ := relay(bufConn(h.c, h.br), bufConn(uc.Conn, uc.br))
	t.close(in, out+int64(len(h.resp.buf)))
	return false
}

// bufConn returns c reading first what br buffered.
func bufConn(c net.Conn, br *bufio.Reader) net.Conn {
	if br.Buffered() == 0 {
		return c
	}
	return &bufferedConn{Conn: c, br: br}
}

type bufferedConn struct {
	net.Conn
	br *bufio.Reader
}

func (c *bufferedConn) Read(b []byte) (int, error) {
	if c.br.Buffered() > 0 {
		return c.br.Read(b)
	}
	return c.Conn.Read(b)
}

func (c *bufferedConn) CloseWrite() error {
	if cw, ok := c.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return nil
}

func (c *bufferedConn) CloseRead() error {
	if cr, ok := c.Conn.(closeReader); ok {
		return cr.CloseRead()
	}
	return nil
}

// closeIdleH1 wakes the lean path's connections that wait for a request,
// so they close (Shutdown).
func (p *Proxy) closeIdleH1() {
	p.h1conns.Range(func(k, _ any) bool {
		if h := k.(*h1Conn); h.idle.Load() {
			h.c.SetReadDeadline(time.Now())
		}
		return true
	})
}

// openH1Stream opens a stream to ep's proxy that carries HTTP/1 requests
// like an ALPN vmesh.h1/1 connection.
func (p *Proxy) openH1Stream(ep Endpoint, port uint16) (net.Conn, error) {
	var arr [256]byte
	hdr, err := appendHeader(arr[:0], transportHeader{Port: port, Protocol: sessionHTTP1, Service: ep.Service})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
	defer cancel()
	st, _, err := p.muxes.open(ctx, ep, hdr)
	if err != nil {
		return nil, err
	}
	if err := st.Accepted(p.muxAcceptTimeout()); err != nil {
		st.Close()
		return nil, err
	}
	return st, nil
}

// muxH1Stream serves a peer's stream that carries HTTP/1 requests.
func (p *Proxy) muxH1Stream(st net.Conn, clientID string) {
	type accepter interface{ Accept() error }
	if err := st.(accepter).Accept(); err != nil {
		return
	}
	p.serveH1(st, nil, route{kind: routePeerHTTP, dir: dirInbound, proto: protoHTTP1}, clientID)
	st.Close()
}

// errPeerUnavailable is a balanced attempt the peer proxy answered with 502
// or 503.
var errPeerUnavailable = errors.New("peer proxy answered 502/503")

// isTimeout reports whether err is a deadline (the request timeout): such a
// request is not tried again elsewhere.
func isTimeout(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }
