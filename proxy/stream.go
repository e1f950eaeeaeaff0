package proxy

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
)

// hdrOpaque marks a request between proxies whose body and response body
// carry one opaque TCP connection, full duplex, instead of an HTTP request.
const hdrOpaque = "Vmesh-Opaque"

// outboundStream carries an opaque connection as one HTTP/2 stream on the
// pooled mTLS connections to the peer proxy: a POST whose body is what the
// app sends (the peeked bytes first, read by the transport straight from the
// app connection) and whose response body is what the service sends. The
// app's half-close ends the request body (END_STREAM); the end of the
// response body half-closes the app connection. Any answer but 200 (port
// not declared, denied, service unreachable) closes the app connection.
func (p *Proxy) outboundStream(c net.Conn, ep Endpoint, dst netip.AddrPort, peeked []byte) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// peeked is cloned: its pooled buffer goes back once this returns, while
	// the transport may still be reading the body.
	body := &appBody{c: c, peeked: bytes.Clone(peeked), done: make(chan struct{})}
	req := (&http.Request{
		Method:        http.MethodPost,
		URL:           &url.URL{Scheme: "https", Host: ep.ProxyAddr.String(), Path: "/"},
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
		Header:        http.Header{hdrDstPort: {strconv.Itoa(int(dst.Port()))}, hdrOpaque: {"1"}},
		Body:          body,
		ContentLength: -1,
		Host:          ep.Service,
	}).WithContext(ctx)
	resp, err := p.pool.transport(ep).RoundTrip(req)
	if err != nil {
		c.Close()
		p.m.refused.WithLabelValues(dirOutbound, refuseDial).Inc()
		p.log.Warn("opening stream to peer proxy failed", "service", ep.Service, "peer", ep.ProxyAddr, "err", err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		c.Close()
		p.log.Debug("peer proxy refused stream", "service", ep.Service, "peer", ep.ProxyAddr,
			"status", resp.StatusCode, "why", resp.Header.Get(hdrProxyError))
		return
	}
	t := p.m.openTCP(connLabels{direction: dirOutbound, service: ep.Service, serverID: ep.Identity, tls: tlsTrue})
	out, err := copyGrowing(c, resp.Body)
	if err != nil {
		// The stream or the app connection broke: end both directions.
		c.Close()
		cancel()
	} else if cw, ok := c.(closeWriter); ok {
		cw.CloseWrite()
	}
	// The transport has read the app's EOF, or closes the body when the
	// stream ends without it (the service went away).
	<-body.done
	c.Close()
	t.close(body.n.Load(), out)
}

// appBody is the request body of an opaque stream: the peeked bytes, then
// the app connection until EOF. Close (the transport is done with the body)
// does not close the connection, whose response direction may still run.
type appBody struct {
	c      net.Conn
	peeked []byte
	n      atomic.Int64 // bytes read from the app, peeked ones included
	once   sync.Once
	done   chan struct{} // closed at EOF, on an error, or on Close
}

func (b *appBody) Read(p []byte) (int, error) {
	if len(b.peeked) > 0 {
		n := copy(p, b.peeked)
		b.peeked = b.peeked[n:]
		b.n.Add(int64(n))
		return n, nil
	}
	n, err := b.c.Read(p)
	b.n.Add(int64(n))
	if err == io.EOF {
		if cr, ok := b.c.(closeReader); ok {
			cr.CloseRead()
		}
	}
	if err != nil {
		b.finish()
	}
	return n, err
}

func (b *appBody) Close() error {
	b.finish()
	return nil
}

func (b *appBody) finish() { b.once.Do(func() { close(b.done) }) }

// inboundStream serves an opaque stream from a peer proxy (a request with
// hdrOpaque on an mTLS HTTP/2 connection): as for the transport header, the
// target must be a declared local service port and the client authorized
// for TCP, else the answer is 403 (502 when the service is unreachable).
// Then 200 is sent at once (servers may speak first) and the bytes flow
// both ways, every write of the service flushed to the client. The request
// body's end half-closes the service connection; the service's EOF ends the
// response, which also ends the stream: a service that half-closes and then
// keeps reading loses what the client sends after that.
func (p *Proxy) inboundStream(w http.ResponseWriter, r *http.Request, info *connInfo) {
	port, err := strconv.ParseUint(r.Header.Get(hdrDstPort), 10, 16)
	svc, ok := p.localService(uint16(port))
	if err != nil || !ok {
		p.m.refused.WithLabelValues(dirInbound, refuseUnknownPort).Inc()
		p.log.Info("inbound stream names no local service", "client_id", info.clientID, "port", r.Header.Get(hdrDstPort))
		w.Header().Set(hdrProxyError, "unknown target port")
		w.WriteHeader(http.StatusForbidden)
		return
	}
	if !p.authorizeTCP(svc, info.clientID, tlsTrue) {
		w.Header().Set(hdrProxyError, "unauthorized")
		w.WriteHeader(http.StatusForbidden)
		return
	}
	up, err := p.dial(r.Context(), svc.target)
	if err != nil {
		p.m.refused.WithLabelValues(dirInbound, refuseDial).Inc()
		p.log.Debug("connecting to local service failed", "service", svc.Name, "addr", svc.target, "err", err)
		w.Header().Set(hdrProxyError, "connecting to local service failed")
		w.WriteHeader(http.StatusBadGateway)
		return
	}
	t := p.m.openTCP(connLabels{direction: dirInbound, service: svc.Name, clientID: info.clientID, tls: tlsTrue})
	rc := http.NewResponseController(w)
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		up.Close()
		t.close(0, 0)
		return
	}
	in := make(chan int64, 1)
	go func() {
		n, err := copyGrowing(up, r.Body)
		if err != nil {
			up.Close()
		} else if cw, ok := up.(closeWriter); ok {
			cw.CloseWrite()
		}
		in <- n
	}()
	out, _ := copyGrowing(flushWriter{w, rc}, up)
	// The response ends when the handler returns; stop the other direction
	// (a blocked body read ends on Close) and close the service connection.
	r.Body.Close()
	up.Close()
	t.close(<-in, out)
}

// flushWriter flushes every write to the client: an interactive protocol
// must not wait for a buffer to fill.
type flushWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func (f flushWriter) Write(b []byte) (int, error) {
	n, err := f.w.Write(b)
	if err != nil {
		return n, err
	}
	return n, f.rc.Flush()
}
