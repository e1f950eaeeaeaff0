package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/vmesh/vmesh/internal/rawsock"
)

// Headers the proxies add between themselves; stripped from what apps send
// and from what reaches apps.
const (
	hdrOrigProto  = "L5d-Orig-Proto" // "HTTP/1.1" (or 1.0) when the app spoke HTTP/1
	hdrDstPort    = "Vmesh-Dst-Port" // the target service port on the peer
	hdrProxyError = "L5d-Proxy-Error"
)

// serveHTTPConn serves a detected HTTP connection from an app: HTTP/1 on
// the lean path (h1.go), HTTP/2 (prior knowledge) with ServeConn. The
// peeked bytes are replayed first; bp is returned to the pool once the
// connection is done.
func (p *Proxy) serveHTTPConn(c net.Conn, peeked []byte, bp *[]byte, info *connInfo) {
	defer putBuf(bp)
	if info.route.proto == protoHTTP1 {
		p.serveH1(rawsock.Wrap(c), peeked, info.route, "")
		return
	}
	if info.route.kind == routeHTTP {
		p.serveH2Front(rawsock.Wrap(c), peeked, info.route)
		return
	}
	pc := &peekedConn{Conn: c, peeked: peeked, buf: bp, info: info, done: make(chan struct{})}
	p.h2.ServeConn(newBatchConn(pc), &http2.ServeConnOpts{
		Context:    context.WithValue(context.Background(), connInfoKey{}, info),
		BaseConfig: p.h1,
		Handler:    p.h1.Handler,
	})
	pc.Close()
}

// serveRequest is the handler of every HTTP request the proxy serves.
func (p *Proxy) serveRequest(w http.ResponseWriter, r *http.Request) {
	info := infoFrom(r.Context())
	if info == nil {
		http.Error(w, "no connection info", http.StatusInternalServerError)
		return
	}
	switch info.route.kind {
	case routePeerHTTP:
		p.inboundHTTP(w, r, info)
	case routeInboundHTTP:
		p.inboundHTTP(w, r, info)
	default:
		http.Error(w, "no HTTP route", http.StatusInternalServerError)
	}
}

// stripMeshHeaders removes headers only proxies may set.
func stripMeshHeaders(h http.Header) {
	h.Del(hdrOrigProto)
	h.Del(hdrDstPort)
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
		BufferPool:    rpBuffers{},
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
		p.reportError(slog.LevelWarn, labels[0], errBadGateway, labels[1]+" "+labels[3], "proxying request failed", "service", labels[1], "host", r.Host, "err", err)
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
	resp.Body = &meteredBody{ReadCloser: resp.Body, p: t.p, labels: t.labels, resp: resp, grpc: isGRPC(r.Header), start: start}
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
	start  time.Time
	n      int64 // body bytes read, for the tap
}

// isGRPC reports whether h (a request's headers) is a gRPC request's.
func isGRPC(h http.Header) bool {
	ct := h.Get("Content-Type")
	return ct == "application/grpc" || strings.HasPrefix(ct, "application/grpc+") || strings.HasPrefix(ct, "application/grpc;")
}

func (b *meteredBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n += int64(n)
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
	if b.p.m.tap.active() {
		b.tap() // tap.go
	}
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
				c, err := dial(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				return newBatchConn(c), nil
			},
		},
	}
}

func (l *localTransports) close() {
	l.h1.CloseIdleConnections()
	l.h2c.CloseIdleConnections()
}

// rpBuffers lends ReverseProxy its response copy buffers (it allocates 32
// KiB per request otherwise: most of the bytes a proxied HTTP/2 request
// allocated). 16 KiB is HTTP/2's default frame size.
type rpBuffers struct{}

var rpBufferPool = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}

func (rpBuffers) Get() []byte { return *rpBufferPool.Get().(*[]byte) }

func (rpBuffers) Put(b []byte) {
	if cap(b) == 16<<10 {
		rpBufferPool.Put(&b)
	}
}

// slogErrorLog adapts the proxy's logger for ReverseProxy.ErrorLog.
func slogErrorLog(p *Proxy) *log.Logger { return p.errLog }
