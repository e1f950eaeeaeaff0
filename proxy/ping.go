package proxy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"time"
)

// Ping: `vmesh ping` makes one mTLS round trip to a peer proxy. The client
// dials the inbound listener with ALPN alpnPing, verifying that the server
// is the endpoint's identity, and sends pingSize random bytes; the server
// (only for a verified client: the handshake requires a valid SVID) echoes
// them and closes.

// alpnPing is the inbound listener's ping protocol.
const alpnPing = "vmesh.ping/1"

const pingSize = 16

// PingResult is what one ping saw.
type PingResult struct {
	// Identity is the SPIFFE ID the server presented (verified).
	Identity string
	// Connect is the time to connect and complete the mTLS handshake.
	Connect time.Duration
	// RTT is the time of the echo round trip on the established connection.
	RTT time.Duration
}

// Ping makes one mTLS round trip to ep's proxy (ep.ProxyAddr), which must
// present ep.Identity. ep.Service is sent as SNI ("" for the node's own
// identity).
func (p *Proxy) Ping(ctx context.Context, ep Endpoint) (PingResult, error) {
	if !ep.ProxyAddr.IsValid() || ep.Identity == "" {
		return PingResult{}, errors.New("pinging: the endpoint has no proxy address or identity")
	}
	start := time.Now()
	tc, err := p.dialTransport(ctx, ep, alpnPing)
	if err != nil {
		return PingResult{}, fmt.Errorf("pinging %s: %w", ep.ProxyAddr, err)
	}
	defer tc.Close()
	res := PingResult{Identity: ep.Identity, Connect: time.Since(start)}
	if d, ok := ctx.Deadline(); ok {
		tc.SetDeadline(d)
	} else {
		tc.SetDeadline(time.Now().Add(p.cfg.ConnectTimeout))
	}
	var out, in [pingSize]byte
	rand.Read(out[:])
	t0 := time.Now()
	if _, err := tc.Write(out[:]); err != nil {
		return res, fmt.Errorf("pinging %s: writing: %w", ep.ProxyAddr, err)
	}
	if _, err := io.ReadFull(tc, in[:]); err != nil {
		return res, fmt.Errorf("pinging %s: no answer (is the peer's vmesh older than ping?): %w", ep.ProxyAddr, err)
	}
	res.RTT = time.Since(t0)
	if in != out {
		return res, fmt.Errorf("pinging %s: the answer does not echo the ping", ep.ProxyAddr)
	}
	return res, nil
}

// servePing answers one ping from a verified peer.
func (p *Proxy) servePing(tc *tls.Conn, clientID string) {
	if clientID == "" {
		p.m.refused.WithLabelValues(dirInbound, refuseALPN).Inc()
		return
	}
	tc.SetDeadline(time.Now().Add(p.cfg.DetectTimeout))
	var b [pingSize]byte
	if _, err := io.ReadFull(tc, b[:]); err != nil {
		return
	}
	tc.Write(b[:])
}
