package proxy

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
)

// Errors where the user looks. Every failure a user of the mesh would
// notice (a connection or request denied or refused, a protocol detection
// that timed out, a connect failure, a 502) is counted in
// proxy_errors_total{direction, reason} and logged on the host that saw it,
// once per (reason, peer) per minute: at info for decisions the proxy made
// on purpose (policy denials), at warn for everything else. The client host
// hears of a refusal by the peer too (reason peer_refused).

// Error reasons (label "reason" of proxy_errors_total) besides the refusal
// reasons of tcp_refused_total, which are reported with the same names.
const (
	errDetectTimeout = "detect_timeout" // no byte from the client before Config.DetectTimeout
	errDenied        = "denied"         // inbound policy denied the client
	errBadGateway    = "bad_gateway"    // 502: the upstream failed
	errUnavailable   = "unavailable"    // 503: no endpoint
	errTimeout       = "request_timeout"
)

// reportError counts an error and logs it, rate limited per (reason, peer).
// peer names the other side (an address or an identity; "" for none).
func (p *Proxy) reportError(level slog.Level, dir, reason, peer, msg string, args ...any) {
	p.m.errors.WithLabelValues(dir, reason).Inc()
	if !p.warns.allowKey(reason, peer) {
		return
	}
	args = append(args, "direction", dir, "reason", reason)
	p.log.Log(context.Background(), level, msg, args...)
}

// addrKey is a peer key for reportError.
func addrKey(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// httpErrorReason is the reason of an HTTP error answer the proxy made
// itself ("" when it is not an error of the mesh: 4xx answers are reported
// where they are decided).
func httpErrorReason(code int) string {
	switch code {
	case 502:
		return errBadGateway
	case 503:
		return errUnavailable
	case 504:
		return errTimeout
	}
	return ""
}

// detected reports a protocol detection that timed out with no byte from
// the client: a protocol where the server speaks first (SMTP, MySQL, SSH)
// on a port that is not declared opaque waits Config.DetectTimeout at every
// connection.
func (p *Proxy) detected(dir string, dst netip.AddrPort, proto appProtocol, peeked []byte) {
	if proto != protoOpaque || len(peeked) != 0 {
		return
	}
	p.reportError(slog.LevelWarn, dir, errDetectTimeout, dst.String(),
		"protocol detection timed out: the client sent nothing; if the server speaks first, declare the port opaque (proxy.opaque_ports, or the service's protocol = \"opaque\")",
		"dst", dst, "waited", p.cfg.DetectTimeout)
}

// answered records an answer the lean HTTP/1 path made itself and reports
// it when it is an error of the mesh (5xx).
func (h *h1Conn) answered(code int, why string) {
	h.status = code
	reason := httpErrorReason(code)
	if reason == "" || h.reported {
		h.reported = false
		return
	}
	peer := h.r.ep.ProxyAddr.String()
	if h.r.dir == dirInbound {
		peer = h.clientID
	}
	h.p.reportError(slog.LevelWarn, h.r.dir, reason, peer, "HTTP request failed", "status", code, "why", why, "service", h.r.ep.Service, "peer", peer)
}

// connectFailed reports that the lean HTTP/1 path could not reach the
// current request's upstream (the peer proxy or the local service); the
// 502 that follows is not reported again.
func (h *h1Conn) connectFailed(l *h1Leg, err error) {
	h.reported = true
	if l.peer {
		h.p.reportError(slog.LevelWarn, h.r.dir, refuseDial, l.ep.ProxyAddr.String(), "connecting to peer proxy failed", "service", l.ep.Service, "peer", l.ep.ProxyAddr, "err", err)
		return
	}
	h.p.reportError(slog.LevelWarn, h.r.dir, refuseDial, l.target.String(), "connecting to local service failed", "addr", l.target, "err", err)
}

// peerUnreached reports whether the current response is the peer proxy's
// own error saying it could not reach its service (l5d-proxy-error
// "connecting upstream failed", or 503: it had no way there): the app
// never saw the request.
func (h *h1Conn) peerUnreached() bool {
	if h.resp.status == 503 {
		return h.resp.fieldFold("l5d-proxy-error") != nil
	}
	v := h.resp.fieldFold("l5d-proxy-error")
	return v != nil && bytes.HasPrefix(v, []byte("connecting"))
}

// peerAnswered reports, on the client host, an error answer the peer proxy
// made itself (it carries l5d-proxy-error): a request denied by the peer's
// policy, or a service it could not reach.
func (h *h1Conn) peerAnswered(l *h1Leg) {
	for _, f := range h.resp.fields {
		if len(f.name) == len("l5d-proxy-error") && bytes.EqualFold(f.name, []byte("l5d-proxy-error")) {
			h.p.reportError(slog.LevelWarn, dirOutbound, refusePeer, addrKey(l.ep.ProxyAddr.Addr())+" "+l.ep.Service,
				"peer proxy refused the request (see the peer's log)", "service", l.ep.Service, "peer", l.ep.ProxyAddr,
				"status", h.resp.status, "why", string(f.value))
			return
		}
	}
}
