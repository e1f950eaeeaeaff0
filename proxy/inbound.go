package proxy

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"time"

	"golang.org/x/net/http2"
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

// inboundRedirected serves an unmeshed client: no identity, so the
// service's policy decides whether plaintext is allowed. On a declared
// service port that is not opaque (by its protocol or Config.OpaquePorts)
// the protocol is detected, or taken from the service's declared protocol,
// and HTTP is served per request like meshed HTTP (authorization, 403 on
// denial, request metrics). Everything else is authorized once and relayed
// as TCP to the original destination. Undeclared ports are never detected:
// as outbound passthrough, the mesh knows nothing about them.
func (p *Proxy) inboundRedirected(c *net.TCPConn, dst netip.AddrPort) {
	svc, declared := p.localService(dst.Port())
	proto := protoOpaque
	var peeked []byte
	bp := getBuf()
	if declared && svc.Protocol != "opaque" && !p.isOpaquePort(dst.Port()) {
		switch svc.Protocol {
		case "http1":
			proto = protoHTTP1
		case "http2":
			proto = protoHTTP2
		default:
			var err error
			proto, peeked, err = detect(c, *bp, p.cfg.DetectTimeout)
			if err != nil {
				putBuf(bp)
				p.log.Debug("inbound connection closed before its first byte", "dst", dst, "err", err)
				return
			}
		}
	}
	if proto != protoOpaque {
		info := &connInfo{direction: dirInbound, dst: dst, redirected: true, proto: proto}
		p.serveHTTPConn(c, peeked, bp, info) // returns bp to the pool
		return
	}
	defer putBuf(bp)
	if !declared {
		// Not a declared service: the client asked for this host's port,
		// so relaying there is no open relay; the default policy decides.
		svc = &localService{policy: p.cfg.DefaultPolicy}
	}
	if !p.authorizeTCP(svc, "", tlsNoIdentity) {
		return
	}
	up, err := p.dial(context.Background(), dst)
	if err != nil {
		p.m.refused.WithLabelValues(dirInbound, refuseDial).Inc()
		p.log.Debug("connecting to local service failed", "dst", dst, "err", err)
		return
	}
	if len(peeked) > 0 {
		if err := writeAll(up, peeked); err != nil {
			up.Close()
			p.log.Debug("replaying detected bytes to local service failed", "dst", dst, "err", err)
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
		p.log.Info("inbound "+proto+" denied", "service", svc.Name, "client_id", clientID, "reason", d.reason)
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
	tc := tls.Server(c, p.serverTLS)
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.DetectTimeout)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		p.m.refused.WithLabelValues(dirInbound, refuseHandshake).Inc()
		p.log.Debug("inbound handshake failed", "remote", c.RemoteAddr(), "err", err)
		return
	}
	cs := tc.ConnectionState()
	info := &connInfo{direction: dirInbound, clientID: peerIDFromState(cs)}
	switch cs.NegotiatedProtocol {
	case alpnH2:
		info.proto = protoHTTP2
		p.h2.ServeConn(tc, &http2.ServeConnOpts{
			Context:    context.WithValue(context.Background(), connInfoKey{}, info),
			BaseConfig: p.h1,
			Handler:    p.h1.Handler,
		})
	case alpnTransport:
		p.inboundTransport(tc, info)
	default:
		p.m.refused.WithLabelValues(dirInbound, refuseALPN).Inc()
	}
}

// inboundTransport reads the transport header under the detect timeout,
// checks that it names a declared local service port, authorizes the client
// and relays to the service.
func (p *Proxy) inboundTransport(tc *tls.Conn, info *connInfo) {
	tc.SetReadDeadline(time.Now().Add(p.cfg.DetectTimeout))
	h, err := readHeader(tc)
	tc.SetReadDeadline(time.Time{})
	if err != nil {
		p.m.refused.WithLabelValues(dirInbound, refuseHeader).Inc()
		p.log.Info("inbound transport header refused", "client_id", info.clientID, "err", err)
		return
	}
	svc, ok := p.localService(h.Port)
	if !ok {
		p.m.refused.WithLabelValues(dirInbound, refuseUnknownPort).Inc()
		p.log.Info("inbound transport header names no local service", "client_id", info.clientID, "port", h.Port)
		return
	}
	if !p.authorizeTCP(svc, info.clientID, tlsTrue) {
		return
	}
	up, err := p.dial(context.Background(), svc.target)
	if err != nil {
		p.m.refused.WithLabelValues(dirInbound, refuseDial).Inc()
		p.log.Debug("connecting to local service failed", "service", svc.Name, "addr", svc.target, "err", err)
		return
	}
	t := p.m.openTCP(connLabels{direction: dirInbound, service: svc.Name, clientID: info.clientID, tls: tlsTrue})
	in, out, _ := relay(tc, up)
	t.close(in, out)
}
