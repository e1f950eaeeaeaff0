package proxy

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"golang.org/x/net/http2"

	"github.com/vmesh/vmesh/internal/mux"
)

// handleInbound serves one connection accepted on the inbound listener:
// either a peer proxy dialing 4143 directly (mTLS), or an unmeshed client
// whose connection to a local port was redirected here.
func (p *Proxy) handleInbound(c *net.TCPConn) {
	dst, err := p.origDst(c)
	if err == nil && !sameAddr(dst, c.LocalAddr()) {
		p.inboundRedirected(c, dst)
		return
	}
	p.inboundMesh(c)
}

// inboundRedirected serves an unmeshed client: the route table decides
// from the local service at the destination port (detecting the protocol
// first when it must), serveRoute carries it out.
func (p *Proxy) inboundRedirected(c *net.TCPConn, dst netip.AddrPort) {
	svc, _ := p.localService(dst.Port())
	r := p.routes.inboundRedirected(dst, svc, protoOpaque, false)
	bp := getBuf()
	var peeked []byte
	if r.kind == routeDetect {
		var proto appProtocol
		var err error
		proto, peeked, err = detect(c, *bp, p.cfg.DetectTimeout)
		if err != nil {
			putBuf(bp)
			p.log.Debug("inbound connection closed before its first byte", "dst", dst, "err", err)
			return
		}
		p.detected(dirInbound, dst, proto, peeked)
		r = p.routes.inboundRedirected(dst, svc, proto, true)
	}
	p.serveRoute(c, r, peeked, bp)
}

// inboundTCP carries out routeInboundTCP: an unmeshed client has no
// identity, so the service's policy decides whether plaintext is allowed;
// then the connection is relayed to the route's target.
func (p *Proxy) inboundTCP(c net.Conn, r route, peeked []byte) {
	svc := r.svc
	if !p.authorizeTCP(svc, "", tlsNoIdentity) {
		return
	}
	up, err := p.dial(context.Background(), r.target)
	if err != nil {
		p.m.refused.WithLabelValues(dirInbound, refuseDial).Inc()
		p.reportError(slog.LevelWarn, dirInbound, refuseDial, r.target.String(), "connecting to local service failed", "service", svc.Name, "addr", r.target, "err", err)
		return
	}
	if len(peeked) > 0 {
		if err := writeAll(up, peeked); err != nil {
			up.Close()
			p.log.Debug("replaying detected bytes to local service failed", "addr", r.target, "err", err)
			return
		}
	}
	t := p.m.openTCP(connLabels{direction: dirInbound, service: svc.Name, tls: tlsNoIdentity})
	in, out, _ := relay(c, up)
	t.close(in+int64(len(peeked)), out)
}

// authorizeTCP authorizes a connection to svc, counts the decision and
// reports whether it may proceed.
func (p *Proxy) authorizeTCP(svc *localService, clientID, tlsLabel string) bool {
	return p.authorize("tcp", svc, clientID, tlsLabel).allow
}

// authorize decides on a "tcp" connection or an "http" request to svc,
// counts the decision in that protocol's authz metrics and logs denials
// (and, under audit, what would have been denied).
func (p *Proxy) authorize(proto string, svc *localService, clientID, tlsLabel string) authzDecision {
	allow, deny := p.m.tcpAllow, p.m.tcpDeny
	if proto == "http" {
		allow, deny = p.m.httpAllow, p.m.httpDeny
	}
	d := svc.authorize(clientID)
	if !d.allow {
		deny.WithLabelValues(svc.Name, clientID, tlsLabel, d.reason).Inc()
		p.reportError(slog.LevelInfo, dirInbound, errDenied, svc.Name+" "+clientID, "inbound "+proto+" denied", "service", svc.Name, "client_id", clientID, "why", d.reason)
		return d
	}
	if d.reason != "" {
		p.m.audit.WithLabelValues(proto, svc.Name, clientID, tlsLabel, d.reason).Inc()
		p.log.Warn("audit: inbound "+proto+" would be denied", "service", svc.Name, "client_id", clientID, "reason", d.reason)
	}
	allow.WithLabelValues(svc.Name, clientID, tlsLabel).Inc()
	return d
}

// inboundMesh serves a peer proxy: mTLS (a valid SVID is required), then by
// ALPN either HTTP/2 requests or one transport header and an opaque stream.
func (p *Proxy) inboundMesh(c *net.TCPConn) {
	// Under TLS a mux.Wire, which batches the records of a mux session
	// (ALPN vmesh.mux/1) and passes any other connection's through.
	tc := tls.Server(mux.NewWire(c), p.serverTLS)
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.DetectTimeout)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		p.m.refused.WithLabelValues(dirInbound, refuseHandshake).Inc()
		p.log.Debug("inbound handshake failed", "remote", c.RemoteAddr(), "err", err)
		return
	}
	cs := tc.ConnectionState()
	clientID := peerIDFromState(cs)
	switch cs.NegotiatedProtocol {
	case alpnH2:
		info := &connInfo{route: route{kind: routePeerHTTP, dir: dirInbound, proto: protoHTTP2}, clientID: clientID}
		p.h2.ServeConn(newBatchConn(tc), &http2.ServeConnOpts{
			Context:    context.WithValue(context.Background(), connInfoKey{}, info),
			BaseConfig: p.h1,
			Handler:    p.h1.Handler,
		})
	case alpnTransport:
		p.inboundTransport(tc, clientID)
	case alpnMux:
		p.serveMux(tc, clientID)
	case alpnH1:
		p.serveH1(tc, nil, route{kind: routePeerHTTP, dir: dirInbound, proto: protoHTTP1}, clientID)
	case alpnPing:
		p.servePing(tc, clientID) // ping.go
	default:
		p.m.refused.WithLabelValues(dirInbound, refuseALPN).Inc()
	}
}

// inboundTransport reads the transport header under the detect timeout;
// the route table decides from the local service at its port, and
// peerTCP carries it out.
func (p *Proxy) inboundTransport(tc *tls.Conn, clientID string) {
	tc.SetReadDeadline(time.Now().Add(p.cfg.DetectTimeout))
	h, err := readHeader(tc)
	tc.SetReadDeadline(time.Time{})
	if err != nil {
		p.m.refused.WithLabelValues(dirInbound, refuseHeader).Inc()
		p.log.Info("inbound transport header refused", "client_id", clientID, "err", err)
		return
	}
	svc, _ := p.localService(h.Port)
	r := p.routes.peer(h.Port, svc, protoOpaque)
	if r.kind == routeDeny {
		p.m.refused.WithLabelValues(dirInbound, r.reason).Inc()
		p.reportError(slog.LevelWarn, dirInbound, r.reason, clientID, "inbound transport header names no local service", "client_id", clientID, "port", h.Port)
		return
	}
	p.peerTCP(tc, r, clientID)
}

// peerTCP carries out routePeerTCP: the client is authorized for TCP, then
// the stream is relayed to the service's target.
func (p *Proxy) peerTCP(tc net.Conn, r route, clientID string) {
	svc := r.svc
	if !p.authorizeTCP(svc, clientID, tlsTrue) {
		return
	}
	up, err := p.dial(context.Background(), r.target)
	if err != nil {
		p.m.refused.WithLabelValues(dirInbound, refuseDial).Inc()
		p.reportError(slog.LevelWarn, dirInbound, refuseDial, r.target.String(), "connecting to local service failed", "service", svc.Name, "addr", r.target, "err", err)
		return
	}
	t := p.m.openTCP(connLabels{direction: dirInbound, service: svc.Name, clientID: clientID, tls: tlsTrue})
	in, out, _ := relay(tc, up)
	t.close(in, out)
}
