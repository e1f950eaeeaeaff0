package ca

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"time"
)

// Kinds of SPIFFE IDs vmesh issues: spiffe://<td>/node/<name> for a host,
// spiffe://<td>/svc/<name> for a service, and spiffe://<td>/ca for the CA
// API's own server certificate.
const (
	kindNode = "node"
	kindSvc  = "svc"
	caPath   = "/ca"
)

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9.\-_]{0,61}[a-z0-9])?$`)

// ValidName reports whether s may name a node or a service in a SPIFFE ID:
// 1-63 lower-case letters, digits, '.', '-' or '_', starting and ending with
// a letter or digit.
func ValidName(s string) bool { return nameRE.MatchString(s) }

// NodeID returns the SPIFFE ID of node name in trust domain td.
func NodeID(td, name string) string { return "spiffe://" + td + "/node/" + name }

// ServiceID returns the SPIFFE ID of service name in trust domain td.
func ServiceID(td, name string) string { return "spiffe://" + td + "/svc/" + name }

func caID(td string) string { return "spiffe://" + td + caPath }

// ParseID splits a vmesh SPIFFE ID of trust domain td into its kind ("node"
// or "svc") and name.
func ParseID(id, td string) (kind, name string, err error) {
	u, err := url.Parse(id)
	if err != nil {
		return "", "", fmt.Errorf("parsing spiffe id %q: %w", id, err)
	}
	kind, name, err = parseIDURL(u, td)
	// The text itself must be canonical: url.URL forgets an empty query
	// or fragment ("…/svc/web#", "…/svc/web?").
	if err == nil && id != "spiffe://"+td+"/"+kind+"/"+name {
		return "", "", fmt.Errorf("%q is not in canonical form (spiffe://%s/%s/%s)", id, td, kind, name)
	}
	return kind, name, err
}

func parseIDURL(u *url.URL, td string) (kind, name string, err error) {
	switch {
	case u.Scheme != "spiffe":
		return "", "", fmt.Errorf("%q is not a spiffe id", u)
	case u.Host != td:
		return "", "", fmt.Errorf("%q is not in trust domain %q", u, td)
	case u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "":
		return "", "", fmt.Errorf("%q is not a valid spiffe id", u)
	}
	k, n, ok := strings.Cut(strings.TrimPrefix(u.Path, "/"), "/")
	if !ok || (k != kindNode && k != kindSvc) || !ValidName(n) {
		return "", "", fmt.Errorf("%q is neither spiffe://%s/node/<name> nor spiffe://%s/svc/<name>", u, td, td)
	}
	// Only the canonical spelling: "svc/%77eb" would otherwise be service
	// web, yet compare unequal to spiffe://TD/svc/web everywhere else.
	if canon := "spiffe://" + td + "/" + k + "/" + n; u.String() != canon {
		return "", "", fmt.Errorf("%q is not in canonical form (%s)", u, canon)
	}
	return k, n, nil
}

// VerifySVID verifies a peer's X.509-SVID chain as presented in a TLS
// handshake (leaf first, then intermediates) against the mesh roots and
// returns the leaf's SPIFFE ID. It checks the chain, that the leaf has exactly
// one URI SAN (and no other SAN), the spiffe scheme, the trust domain, that
// the ID is a node or service ID, and an extended key usage for TLS; it does
// no hostname check. Use it from
// tls.Config.VerifyPeerCertificate with InsecureSkipVerify set, or on
// tls.ConnectionState.PeerCertificates.
func VerifySVID(rawCerts [][]byte, roots *x509.CertPool, trustDomain string) (spiffeID string, err error) {
	id, err := verifySVID(rawCerts, roots, trustDomain, time.Now())
	if err != nil {
		return "", err
	}
	// Only workload identities: not the CA API's own certificate.
	if _, _, err := ParseID(id, trustDomain); err != nil {
		return "", fmt.Errorf("verifying peer svid: %w", err)
	}
	return id, nil
}

func verifySVID(rawCerts [][]byte, roots *x509.CertPool, td string, now time.Time) (string, error) {
	if len(rawCerts) == 0 {
		return "", errors.New("verifying peer svid: no certificate presented")
	}
	if roots == nil {
		return "", errors.New("verifying peer svid: no mesh roots")
	}
	certs := make([]*x509.Certificate, 0, len(rawCerts))
	for i, raw := range rawCerts {
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			return "", fmt.Errorf("verifying peer svid: parsing certificate %d: %w", i, err)
		}
		certs = append(certs, c)
	}
	return verifySVIDCerts(certs, roots, td, now)
}

func verifySVIDCerts(certs []*x509.Certificate, roots *x509.CertPool, td string, now time.Time) (string, error) {
	if len(certs) == 0 {
		return "", errors.New("verifying peer svid: no certificate presented")
	}
	leaf := certs[0]
	id, err := svidURI(leaf, td)
	if err != nil {
		return "", fmt.Errorf("verifying peer svid: %w", err)
	}
	if leaf.IsCA {
		return "", fmt.Errorf("verifying peer svid %s: leaf is a CA certificate", id)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err = leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return "", fmt.Errorf("verifying peer svid %s: %w", id, err)
	}
	return id, nil
}

// svidURI checks the SAN shape of an SVID and returns its SPIFFE ID.
func svidURI(c *x509.Certificate, td string) (string, error) {
	if len(c.URIs) != 1 {
		return "", fmt.Errorf("certificate has %d uri sans, want exactly 1", len(c.URIs))
	}
	if len(c.DNSNames)+len(c.IPAddresses)+len(c.EmailAddresses) > 0 {
		return "", errors.New("certificate has dns, ip or email sans besides its spiffe id")
	}
	u := c.URIs[0]
	if u.Scheme != "spiffe" {
		return "", fmt.Errorf("uri san %q is not a spiffe id", u)
	}
	if u.Host != td {
		return "", fmt.Errorf("spiffe id %q is not in trust domain %q", u, td)
	}
	return u.String(), nil
}
