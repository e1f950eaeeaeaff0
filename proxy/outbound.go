package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/vmesh/vmesh/internal/mux"
	"github.com/vmesh/vmesh/internal/rawsock"
)

// handleOutbound serves one connection redirected to the outbound listener:
// the catalog says what its original destination is, the route table
// decides (detecting the protocol first when it must), serveRoute carries
// it out.
func (p *Proxy) handleOutbound(c *net.TCPConn) {
	dst, err := p.origDst(c)
	if err != nil || sameAddr(dst, c.LocalAddr()) {
		// Not redirected: relaying would connect the proxy to itself.
		p.m.refused.WithLabelValues(dirOutbound, refuseNotRedirected).Inc()
		p.log.Debug("outbound connection was not redirected", "remote", c.RemoteAddr(), "err", err)
		return
	}
	d := p.opts.Catalog.Resolve(dst)
	r := p.routes.outbound(dst, d, protoOpaque, false)
	bp := getBuf()
	var peeked []byte
	if r.kind == routeDetect {
		var proto appProtocol
		proto, peeked, err = detect(c, *bp, p.cfg.DetectTimeout)
		if err != nil {
			putBuf(bp)
			p.log.Debug("outbound connection closed before its first byte", "dst", dst, "err", err)
			return
		}
		p.detected(dirOutbound, dst, proto, peeked)
		r = p.routes.outbound(dst, d, proto, true)
	}
	p.serveRoute(c, r, peeked, bp)
}

// sameAddr reports whether ap is the address a.
func sameAddr(ap netip.AddrPort, a net.Addr) bool {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return false
	}
	return ap.Port() == uint16(ta.Port) && ap.Addr().Unmap() == ta.AddrPort().Addr().Unmap()
}

// passthrough relays a connection to a destination the mesh does not know,
// as plain TCP (the kernel splices).
func (p *Proxy) passthrough(c net.Conn, dst netip.AddrPort) {
	up, err := p.dial(context.Background(), dst)
	if err != nil {
		p.m.refused.WithLabelValues(dirOutbound, refuseDial).Inc()
		p.reportError(slog.LevelWarn, dirOutbound, refuseDial, dst.String(), "outbound passthrough connect failed", "dst", dst, "err", err)
		return
	}
	t := p.m.openTCP(connLabels{direction: dirOutbound, tls: tlsNoIdentity})
	in, out, _ := relay(c, up)
	t.close(in, out)
}

// outboundOpaque carries a connection to a meshed endpoint: by default over
// a dedicated mTLS connection to the peer proxy (transport header, then the
// bytes); with Config.MultiplexOpaque as one HTTP/2 stream on the pooled
// mTLS connections to the peer (stream.go).
func (p *Proxy) outboundOpaque(c net.Conn, ep Endpoint, dst netip.AddrPort, peeked []byte) {
	if p.cfg.MultiplexOpaque {
		p.outboundMux(c, ep, dst, peeked)
		return
	}
	p.outboundDedicated(c, ep, dst, peeked)
}

// outboundDedicated carries a connection over its own mTLS connection to the
// peer proxy: the transport header, the peeked bytes, then both directions.
func (p *Proxy) outboundDedicated(c net.Conn, ep Endpoint, dst netip.AddrPort, peeked []byte) {
	up, err := p.dialTransport(context.Background(), ep, alpnTransport)
	if err != nil {
		p.m.refused.WithLabelValues(dirOutbound, refuseDial).Inc()
		p.reportError(slog.LevelWarn, dirOutbound, refuseDial, ep.ProxyAddr.String(), "connecting to peer proxy failed", "service", ep.Service, "peer", ep.ProxyAddr, "err", err)
		return
	}
	p.relayDedicated(c, up, ep, dst, peeked)
}

// relayDedicated relays the app connection c over its own mTLS connection
// up to the peer proxy: the transport header and the peeked bytes, then
// both directions.
func (p *Proxy) relayDedicated(c net.Conn, up net.Conn, ep Endpoint, dst netip.AddrPort, peeked []byte) {
	if err := writeTransportHeader(up, transportHeader{Port: dst.Port(), Protocol: sessionOpaque, Service: ep.Service}, peeked); err != nil {
		up.Close()
		p.log.Debug("writing transport header failed", "peer", ep.ProxyAddr, "err", err)
		return
	}
	t := p.m.openTCP(connLabels{direction: dirOutbound, service: ep.Service, serverID: ep.Identity, tls: tlsTrue})
	in, out, _ := relay(c, up)
	t.close(in+int64(len(peeked)), out)
}

// writeTransportHeader writes the header and the first application bytes in
// one TLS record.
func writeTransportHeader(c net.Conn, h transportHeader, first []byte) error {
	var arr [256]byte
	b, err := appendHeader(arr[:0], h)
	if err != nil {
		return err
	}
	b = append(b, first...)
	_, err = c.Write(b)
	return err
}

// dialTransport opens an mTLS connection to ep's proxy with the given ALPN,
// verifying that the server is ep.Identity. Dial and handshake share the
// connect timeout; the deadline is cleared afterwards.
func (p *Proxy) dialTransport(ctx context.Context, ep Endpoint, alpn string) (*tls.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	defer cancel()
	raw, err := p.dialer.DialContext(ctx, "tcp", ep.ProxyAddr.String())
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", ep.ProxyAddr, err)
	}
	if alpn == alpnMux {
		raw = mux.NewWire(raw) // a session batches its TLS records through it
	} else {
		raw = rawsock.Wrap(raw)
	}
	tc := tls.Client(raw, p.clientConfig(ep, alpn))
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("handshake with %s (%s): %w", ep.ProxyAddr, ep.Identity, err)
	}
	return tc, nil
}

// clientConfigKey identifies a client TLS configuration.
type clientConfigKey struct {
	service, identity, alpn string
}

// clientConfig returns a cached client TLS configuration for ep.
func (p *Proxy) clientConfig(ep Endpoint, alpn string) *tls.Config {
	k := clientConfigKey{ep.Service, ep.Identity, alpn}
	if c, ok := p.tlsConfigs.configs.Load(k); ok {
		return c.(*tls.Config)
	}
	// Bounded: one entry per (service, identity, ALPN) ever dialed would
	// grow without end in a mesh whose services come and go. Dropping
	// them all now and then costs a rebuild each (no handshake: the
	// session cache is separate).
	if p.tlsConfigs.nconfigs.Add(1) > maxClientConfigs {
		p.tlsConfigs.configs.Clear()
		p.tlsConfigs.nconfigs.Store(1)
	}
	c, _ := p.tlsConfigs.configs.LoadOrStore(k, p.clientTLSConfig(ep, alpn))
	return c.(*tls.Config)
}

// maxClientConfigs bounds the cached client TLS configurations.
const maxClientConfigs = 1024

// clientConfigs caches client TLS configurations per (service, identity,
// ALPN).
type clientConfigs struct {
	configs  sync.Map     // clientConfigKey -> *tls.Config, at most maxClientConfigs
	nconfigs atomic.Int64 // entries added to configs since it was last cleared
}

// peerKey names a peer proxy serving one service identity.
type peerKey struct {
	addr     netip.AddrPort
	service  string
	identity string
}
