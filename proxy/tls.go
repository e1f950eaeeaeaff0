package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
)

// Identity supplies this host's certificates. node adapts the ca client to
// it. The methods are called for every handshake and must be safe for
// concurrent use; returning the current certificate makes rotation need no
// restart.
type Identity interface {
	// GetCertificate returns the server certificate for hello.ServerName, a
	// local service name (the service's SVID).
	GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// GetClientCertificate returns the certificate the client proxy presents
	// (the node SVID or a service SVID, ca decides).
	GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error)
	// Roots returns the trust bundle.
	Roots() *x509.CertPool
	// TrustDomain returns the trust domain, e.g. "vmesh.local".
	TrustDomain() string
}

// VerifyPeerFunc verifies a peer's certificate chain (leaf first, DER) and
// returns its SPIFFE ID.
type VerifyPeerFunc func(rawCerts [][]byte) (spiffeID string, err error)

// ALPN protocols between proxies: HTTP/2 carries HTTP requests, multiplexed;
// alpnTransport carries one opaque TCP stream after a transport header.
const (
	alpnH2        = "h2"
	alpnTransport = "vmesh.transport/v1"
)

// curvePreferences puts the hybrid post-quantum X25519MLKEM768 first, then
// X25519. Traffic between hosts may be recorded today and decrypted later,
// and both ends are vmesh, so the hybrid is always agreed. Its cost (an
// ML-KEM keygen, encapsulation and ~2.3 KB more handshake) is paid only on
// new mTLS connections, which HTTP pooling and session resumption keep rare;
// BenchmarkHandshake measures it. X25519 stays as the fallback.
var curvePreferences = []tls.CurveID{tls.X25519MLKEM768, tls.X25519}

// VerifyPeerWithRoots returns a VerifyPeerFunc that checks the chain against
// roots and returns the leaf's single spiffe:// URI SAN in trustDomain. It
// is the default when Options.VerifyPeer is nil.
func VerifyPeerWithRoots(roots func() *x509.CertPool, trustDomain string) VerifyPeerFunc {
	return func(raw [][]byte) (string, error) {
		if len(raw) == 0 {
			return "", errors.New("verifying peer: no certificate")
		}
		certs := make([]*x509.Certificate, len(raw))
		for i, r := range raw {
			c, err := x509.ParseCertificate(r)
			if err != nil {
				return "", fmt.Errorf("verifying peer: parsing certificate: %w", err)
			}
			certs[i] = c
		}
		pool := roots()
		if pool == nil {
			// A nil pool would make Verify use the system roots.
			return "", errors.New("verifying peer: no trust bundle")
		}
		inter := x509.NewCertPool()
		for _, c := range certs[1:] {
			inter.AddCert(c)
		}
		if _, err := certs[0].Verify(x509.VerifyOptions{
			Roots:         pool,
			Intermediates: inter,
			KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		}); err != nil {
			return "", fmt.Errorf("verifying peer: %w", err)
		}
		return spiffeIDOf(certs[0], trustDomain)
	}
}

// spiffeIDOf returns the single spiffe:// URI SAN of c, which must be in
// trustDomain (if not empty).
func spiffeIDOf(c *x509.Certificate, trustDomain string) (string, error) {
	if len(c.URIs) != 1 || c.URIs[0].Scheme != "spiffe" {
		return "", errors.New("verifying peer: certificate has no single spiffe:// URI SAN")
	}
	id := c.URIs[0].String()
	if trustDomain != "" && c.URIs[0].Host != trustDomain {
		return "", fmt.Errorf("verifying peer: %s is not in trust domain %s", id, trustDomain)
	}
	return id, nil
}

// peerIDFromState returns the SPIFFE ID of a verified peer's leaf.
func peerIDFromState(cs tls.ConnectionState) string {
	if len(cs.PeerCertificates) == 0 {
		return ""
	}
	c := cs.PeerCertificates[0]
	if len(c.URIs) != 1 {
		return ""
	}
	return c.URIs[0].String()
}

// rawCerts returns the DER of certs.
func rawCerts(certs []*x509.Certificate) [][]byte {
	raw := make([][]byte, len(certs))
	for i, c := range certs {
		raw[i] = c.Raw
	}
	return raw
}

// serverTLSConfig is the inbound listener's configuration: the SVID of the
// service named in SNI, client certificates required and verified by
// VerifyPeer (also on resumption: VerifyConnection runs for every
// handshake).
func (p *Proxy) serverTLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		GetCertificate:   p.opts.Identity.GetCertificate,
		ClientAuth:       tls.RequireAnyClientCert,
		NextProtos:       []string{alpnH2, alpnTransport, alpnH1, alpnMux, alpnPing},
		CurvePreferences: curvePreferences,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("client presented no certificate")
			}
			_, err := p.opts.VerifyPeer(rawCerts(cs.PeerCertificates))
			return err
		},
		DynamicRecordSizingDisabled: true,
	}
}

// clientTLSConfig returns the configuration for dialing ep's proxy with the
// given ALPN: SNI is the service name and the server must present exactly
// ep.Identity (fail closed: an endpoint without identity cannot be dialed).
func (p *Proxy) clientTLSConfig(ep Endpoint, alpn string) *tls.Config {
	want := ep.Identity
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		ServerName:           ep.Service,
		NextProtos:           []string{alpn},
		GetClientCertificate: p.opts.Identity.GetClientCertificate,
		InsecureSkipVerify:   true, // VerifyConnection below does the verification
		CurvePreferences:     curvePreferences,
		ClientSessionCache:   p.sessions,
		VerifyConnection: func(cs tls.ConnectionState) error {
			id, err := p.opts.VerifyPeer(rawCerts(cs.PeerCertificates))
			if err != nil {
				return err
			}
			if want == "" || id != want {
				return fmt.Errorf("verifying peer: server is %s, want %s", id, want)
			}
			if cs.NegotiatedProtocol != alpn {
				return fmt.Errorf("verifying peer: server agreed ALPN %q, want %q", cs.NegotiatedProtocol, alpn)
			}
			return nil
		},
		DynamicRecordSizingDisabled: true,
	}
}
