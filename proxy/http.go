package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// Headers the proxies add between themselves; stripped from what apps send
// and from what reaches apps.
const (
	hdrOrigProto  = "L5d-Orig-Proto" // "HTTP/1.1" (or 1.0) when the app spoke HTTP/1
	hdrDstPort    = "Vmesh-Dst-Port" // the target service port on the peer
	hdrProxyError = "L5d-Proxy-Error"
)

// serveHTTPConn serves a detected HTTP connection from an app: HTTP/1 on the
// shared HTTP/1 server, HTTP/2 (prior knowledge) with ServeConn. The peeked
// bytes are replayed first; bp is returned to the pool once the connection
// is done.
func (p *Proxy) serveHTTPConn(c net.Conn, peeked []byte, bp *[]byte, info *connInfo) {
	defer putBuf(bp)
	pc := &peekedConn{Conn: c, peeked: peeked, buf: bp, info: info, done: make(chan struct{})}
	if info.route.proto == protoHTTP2 {
		p.h2.ServeConn(pc, &http2.ServeConnOpts{
			Context:    context.WithValue(context.Background(), connInfoKey{}, info),
			BaseConfig: p.h1,
			Handler:    p.h1.Handler,
		})
		pc.Close()
		return
	}
	if !p.h1ln.Push(pc) {
		pc.Close()
		return
	}
	<-pc.done
}

// serveRequest is the handler of every HTTP request the proxy serves.
func (p *Proxy) serveRequest(w http.ResponseWriter, r *http.Request) {
	info := infoFrom(r.Context())
	if info == nil {
		http.Error(w, "no connection info", http.StatusInternalServerError)
		return
	}
	switch info.route.kind {
	case routeHTTP:
		p.outboundHTTP(w, r, info)
	case routePeerHTTP:
		if r.ProtoMajor == 2 && r.Header.Get(hdrOpaque) != "" {
			p.inboundStream(w, r, info)
			return
		}
		p.inboundHTTP(w, r, info)
	case routeInboundHTTP:
		p.inboundHTTP(w, r, info)
	default:
		http.Error(w, "no HTTP route", http.StatusInternalServerError)
	}
}

// isUpgrade reports whether r asks for a protocol upgrade (e.g. WebSocket).
func isUpgrade(r *http.Request) bool {
	if r.ProtoMajor != 1 || r.Header.Get("Upgrade") == "" {
		return false
	}
	for _, v := range r.Header.Values("Connection") {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), "upgrade") {
				return true
			}
		}
	}
	return false
}

// stripMeshHeaders removes headers only proxies may set.
func stripMeshHeaders(h http.Header) {
	h.Del(hdrOrigProto)
	h.Del(hdrDstPort)
	h.Del(hdrOpaque)
}

// restoreForwarded puts back the X-Forwarded-*/Forwarded headers that
// ReverseProxy's Rewrite mode removes: the mesh is transparent.
func restoreForwarded(pr *httputil.ProxyRequest) {
	for _, k := range []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		if v, ok := pr.In.Header[k]; ok {
			pr.Out.Header[k] = v
		}
	}
}

// outboundHTTP proxies one request from a local app to the peer proxy over
// the pooled, multiplexed HTTP/2 mTLS connections.
func (p *Proxy) outboundHTTP(w http.ResponseWriter, r *http.Request, info *connInfo) {
	ep := info.route.ep
	labels := connLabels{direction: dirOutbound, service: ep.Service, serverID: ep.Identity, tls: tlsTrue}
	if isUpgrade(r) {
		p.outboundUpgrade(w, r, info, labels)
		return
	}
	if d := p.cfg.RequestTimeout; d > 0 {
		ctx, cancel := context.WithTimeout(r.Context(), d)
		defer cancel()
		r = r.WithContext(ctx)
	}
	port := strconv.Itoa(int(info.route.dst.Port()))
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = "https"
			pr.Out.URL.Host = ep.ProxyAddr.String()
			pr.Out.Host = pr.In.Host
			restoreForwarded(pr)
			stripMeshHeaders(pr.Out.Header)
			pr.Out.Header.Set(hdrDstPort, port)
			if pr.In.ProtoMajor == 1 {
				pr.Out.Header.Set(hdrOrigProto, pr.In.Proto)
			}
		},
		Transport: &meteredTransport{p: p, rt: p.pool.transport(ep), labels: labels.values()},
		// 0: a response of known length goes out in one write at the end
		// (headers and body in one TLS record) instead of a flush per
		// write; ReverseProxy still flushes every write of streams of
		// unknown length (gRPC, SSE).
		FlushInterval: 0,
		ErrorHandler:  p.proxyErrorHandler(labels.values()),
		ErrorLog:      slogErrorLog(p),
	}
	rp.ServeHTTP(w, r)
}

// outboundUpgrade carries an HTTP/1 Upgrade request (WebSocket) over the
// opaque transport: the request is written as HTTP/1 to a fresh transport
// connection whose header says http1, and after that the bytes flow as they
// are in both directions.
func (p *Proxy) outboundUpgrade(w http.ResponseWriter, r *http.Request, info *connInfo, labels connLabels) {
	ep := info.route.ep
	up, err := p.dialTransport(r.Context(), ep, alpnTransport)
	if err != nil {
		p.m.requests.WithLabelValues(labels.values()...).Inc()
		p.log.Warn("connecting to peer proxy failed", "service", ep.Service, "peer", ep.ProxyAddr, "err", err)
		p.denyHTTP(w, labels.values(), http.StatusBadGateway, "connecting to peer proxy failed")
		return
	}
	if err := writeTransportHeader(up, transportHeader{Port: info.route.dst.Port(), Protocol: sessionHTTP1, Service: ep.Service}, nil); err != nil {
		up.Close()
		p.m.requests.WithLabelValues(labels.values()...).Inc()
		p.denyHTTP(w, labels.values(), http.StatusBadGateway, "writing transport header failed")
		return
	}
	p.proxyUpgrade(w, r, up, labels)
}

// proxyUpgrade forwards an HTTP/1 Upgrade request to up (a connection that
// carries HTTP/1 to the server) and reads the response, counting both. A
// 101 response is written to the client's hijacked connection and then the
// bytes flow as they are, in both directions, counted as a TCP connection;
// any other response is answered normally and up is closed. proxyUpgrade
// owns up.
func (p *Proxy) proxyUpgrade(w http.ResponseWriter, r *http.Request, up net.Conn, labels connLabels) {
	lv := labels.values()
	p.m.requests.WithLabelValues(lv...).Inc()
	hj, ok := w.(http.Hijacker)
	if !ok {
		up.Close()
		p.denyHTTP(w, lv, http.StatusBadGateway, "upgrade not supported")
		return
	}
	start := time.Now()
	stripMeshHeaders(r.Header)
	if err := r.Write(up); err != nil {
		up.Close()
		p.denyHTTP(w, lv, http.StatusBadGateway, "writing upgrade request failed")
		return
	}
	// The response head arrives under the request's context: a client
	// that goes away stops the wait.
	stop := context.AfterFunc(r.Context(), func() { up.SetReadDeadline(time.Now()) })
	br := bufio.NewReader(up)
	resp, err := http.ReadResponse(br, r)
	if !stop() {
		up.Close()
		return
	}
	if err != nil {
		up.Close()
		p.log.Debug("reading upgrade response failed", "host", r.Host, "err", err)
		p.denyHTTP(w, lv, http.StatusBadGateway, "reading upgrade response failed")
		return
	}
	p.m.latency.WithLabelValues(lv...).Observe(float64(time.Since(start)) / float64(time.Millisecond))
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer up.Close()
		mb := &meteredBody{ReadCloser: resp.Body, p: p, labels: lv, resp: resp}
		defer mb.Close()
		maps.Copy(w.Header(), resp.Header)
		w.WriteHeader(resp.StatusCode)
		io.Copy(w, mb)
		return
	}
	p.m.responses.WithLabelValues(append(lv[:len(lv):len(lv)], statusLabel(resp.StatusCode), "success")...).Inc()
	conn, brw, err := hj.Hijack()
	if err != nil {
		up.Close()
		return
	}
	// The 101 head, then what the server sent after it, then what the
	// client sent after its request, before either side's bytes flow.
	head := bytes.NewBufferString(fmt.Sprintf("HTTP/%d.%d %s\r\n", resp.ProtoMajor, resp.ProtoMinor, resp.Status))
	resp.Header.Write(head)
	head.WriteString("\r\n")
	if n := br.Buffered(); n > 0 {
		b, _ := br.Peek(n)
		head.Write(b)
	}
	var early []byte
	if n := brw.Reader.Buffered(); n > 0 {
		early, _ = brw.Reader.Peek(n)
	}
	if err := writeAll(conn, head.Bytes()); err != nil || writeAll(up, early) != nil {
		up.Close()
		conn.Close()
		return
	}
	t := p.m.openTCP(labels)
	in, out, _ := relay(conn, up)
	t.close(in+int64(len(early)), out+int64(head.Len()))
}

// inboundHTTP serves one request from a peer proxy or from an unmeshed
// client whose connection was redirected (info.redirected): the target must
// be a local service, the client must be authorized, then the request goes
// to the service as the protocol the app spoke.
func (p *Proxy) inboundHTTP(w http.ResponseWriter, r *http.Request, info *connInfo) {
	tlsLabel := tlsTrue
	if info.clientID == "" {
		tlsLabel = tlsNoIdentity
	}
	rt := info.route
	orig := "" // the app's HTTP/1 version; "" for HTTP/2
	if rt.kind == routeInboundHTTP {
		// The connection's route says which service; an unmeshed
		// client's mesh headers are ignored (and stripped below).
		if rt.proto == protoHTTP1 {
			orig = r.Proto
		}
	} else {
		port, err := strconv.ParseUint(r.Header.Get(hdrDstPort), 10, 16)
		var svc *localService
		if err == nil {
			svc, _ = p.localService(uint16(port))
		}
		if rt = p.routes.peer(uint16(port), svc, rt.proto); rt.kind == routeDeny {
			p.m.refused.WithLabelValues(dirInbound, rt.reason).Inc()
			w.Header().Set(hdrProxyError, "unknown target port")
			http.Error(w, "vmesh: unknown target port", http.StatusForbidden)
			return
		}
		orig = r.Header.Get(hdrOrigProto)
	}
	svc, target := rt.svc, rt.target
	labels := connLabels{direction: dirInbound, service: svc.Name, clientID: info.clientID, tls: tlsLabel}
	if d := p.authorizeHTTP(svc, info.clientID, tlsLabel); !d.allow {
		p.m.requests.WithLabelValues(labels.values()...).Inc()
		p.denyHTTP(w, labels.values(), http.StatusForbidden, "unauthorized: "+d.reason)
		return
	}
	if rt.kind == routeInboundHTTP && isUpgrade(r) {
		up, err := p.dial(r.Context(), target)
		if err != nil {
			p.m.requests.WithLabelValues(labels.values()...).Inc()
			p.log.Debug("connecting to local service failed", "service", svc.Name, "addr", target, "err", err)
			p.denyHTTP(w, labels.values(), http.StatusBadGateway, "connecting to local service failed")
			return
		}
		p.proxyUpgrade(w, r, up, labels)
		return
	}
	var tr http.RoundTripper = p.local.h2c
	if orig != "" {
		tr = p.local.h1
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = target.String()
			pr.Out.Host = pr.In.Host
			restoreForwarded(pr)
			stripMeshHeaders(pr.Out.Header)
			if orig == "HTTP/1.0" {
				pr.Out.Proto, pr.Out.ProtoMajor, pr.Out.ProtoMinor = "HTTP/1.0", 1, 0
			}
		},
		Transport: &meteredTransport{p: p, rt: tr, labels: labels.values()},
		// 0: a response of known length goes out in one write at the end
		// (headers and body in one TLS record) instead of a flush per
		// write; ReverseProxy still flushes every write of streams of
		// unknown length (gRPC, SSE).
		FlushInterval: 0,
		ErrorHandler:  p.proxyErrorHandler(labels.values()),
		ErrorLog:      slogErrorLog(p),
	}
	rp.ServeHTTP(w, r)
}

// authorizeHTTP authorizes one request to svc and counts the decision.
func (p *Proxy) authorizeHTTP(svc *localService, clientID, tlsLabel string) authzDecision {
	return p.authorize("http", svc, clientID, tlsLabel)
}

// denyHTTP answers with code and an l5d-proxy-error header saying why, and
// counts the response.
func (p *Proxy) denyHTTP(w http.ResponseWriter, labels []string, code int, why string) {
	w.Header().Set(hdrProxyError, why)
	http.Error(w, "vmesh: "+why, code)
	p.m.responses.WithLabelValues(append(labels[:len(labels):len(labels)], statusLabel(code), "failure")...).Inc()
}

func (p *Proxy) proxyErrorHandler(labels []string) func(http.ResponseWriter, *http.Request, error) {
	return func(w http.ResponseWriter, r *http.Request, err error) {
		if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
			return // the client went away
		}
		if errors.Is(err, context.DeadlineExceeded) && errors.Is(r.Context().Err(), context.DeadlineExceeded) {
			p.denyHTTP(w, labels, http.StatusGatewayTimeout, "request timeout")
			return
		}
		p.log.Debug("proxying request failed", "host", r.Host, "err", err)
		p.denyHTTP(w, labels, http.StatusBadGateway, "proxying failed")
	}
}

// meteredTransport counts requests, response latency (to headers) and
// responses (when the body ends, so gRPC trailers classify them).
type meteredTransport struct {
	p      *Proxy
	rt     http.RoundTripper
	labels []string
}

func (t *meteredTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	t.p.m.requests.WithLabelValues(t.labels...).Inc()
	start := time.Now()
	resp, err := t.rt.RoundTrip(r)
	if err != nil {
		return nil, err
	}
	t.p.m.latency.WithLabelValues(t.labels...).Observe(float64(time.Since(start)) / float64(time.Millisecond))
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// The body is the upgraded connection: ReverseProxy needs it as it
		// is (an io.ReadWriteCloser). The response is complete now.
		t.p.m.responses.WithLabelValues(append(t.labels[:len(t.labels):len(t.labels)], statusLabel(resp.StatusCode), "success")...).Inc()
		return resp, nil
	}
	resp.Body = &meteredBody{ReadCloser: resp.Body, p: t.p, labels: t.labels, resp: resp, grpc: isGRPC(r.Header)}
	return resp, nil
}

// meteredBody records response_total once, at EOF or Close.
type meteredBody struct {
	io.ReadCloser
	p      *Proxy
	labels []string
	resp   *http.Response
	grpc   bool // the request was gRPC
	done   atomic.Bool
}

// isGRPC reports whether h (a request's headers) is a gRPC request's.
func isGRPC(h http.Header) bool {
	ct := h.Get("Content-Type")
	return ct == "application/grpc" || strings.HasPrefix(ct, "application/grpc+") || strings.HasPrefix(ct, "application/grpc;")
}

func (b *meteredBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil {
		b.record(err == io.EOF)
	}
	return n, err
}

func (b *meteredBody) Close() error {
	err := b.ReadCloser.Close()
	b.record(false)
	return err
}

func (b *meteredBody) record(eof bool) {
	if b.done.Swap(true) {
		return
	}
	class := "success"
	if b.resp.StatusCode >= 500 || !eof {
		class = "failure"
	}
	gs := b.resp.Header.Get("Grpc-Status")
	if eof && gs == "" {
		gs = b.resp.Trailer.Get("Grpc-Status")
	}
	// A gRPC call fails unless it ends with grpc-status 0: a response to
	// a gRPC request without any grpc-status (the peer proxy's 403 when
	// policy denies the call, a 404 from a plain HTTP server) is an error
	// for the gRPC client whatever its HTTP status, so it is not counted
	// as a success here while the peer counts it as a failure.
	if (gs != "" && gs != "0") || (b.grpc && gs == "") {
		class = "failure"
	}
	lv := append(b.labels[:len(b.labels):len(b.labels)], statusLabel(b.resp.StatusCode), class)
	b.p.m.responses.WithLabelValues(lv...).Inc()
}

// localTransports reach local services: HTTP/1 with keep-alive, and h2c
// (prior knowledge) for apps that spoke HTTP/2 (gRPC).
type localTransports struct {
	h1  *http.Transport
	h2c *http2.Transport
}

func newLocalTransports(p *Proxy) *localTransports {
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
		defer cancel()
		return p.dialer.DialContext(ctx, network, addr)
	}
	return &localTransports{
		h1: &http.Transport{
			DialContext:         dial,
			DisableCompression:  true,
			MaxIdleConnsPerHost: 256,
			IdleConnTimeout:     90 * time.Second,
		},
		h2c: &http2.Transport{
			AllowHTTP:          true,
			DisableCompression: true,
			DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
				return dial(ctx, network, addr)
			},
		},
	}
}

func (l *localTransports) close() {
	l.h1.CloseIdleConnections()
	l.h2c.CloseIdleConnections()
}

// slogErrorLog adapts the proxy's logger for ReverseProxy.ErrorLog.
func slogErrorLog(p *Proxy) *log.Logger { return p.errLog }
