package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"math/big"
	"net/url"
	"time"
)

// newCSR makes a fresh P-256 key and a CSR for exactly the SPIFFE ID id,
// with an empty subject.
func newCSR(id string) (*ecdsa.PrivateKey, *x509.CertificateRequest, error) {
	u, err := url.Parse(id)
	if err != nil {
		return nil, nil, fmt.Errorf("making csr for %s: %w", id, err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("making csr for %s: generating key: %w", id, err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("making csr for %s: %w", id, err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, nil, fmt.Errorf("making csr for %s: %w", id, err)
	}
	return key, csr, nil
}

func tlsCertificate(key *ecdsa.PrivateKey, chain []*x509.Certificate) *tls.Certificate {
	c := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, x := range chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// renewTime is when a certificate should be renewed: at about 2/3 of its
// lifetime, moved by up to ±jitter of the lifetime (jitter in [0, 1)).
func renewTime(c *x509.Certificate, jitter float64) time.Time {
	life := c.NotAfter.Sub(c.NotBefore)
	at := life * 2 / 3
	if jitter > 0 {
		span := int64(float64(life) * jitter)
		if span > 0 {
			n, err := rand.Int(rand.Reader, big.NewInt(2*span))
			if err == nil {
				at += time.Duration(n.Int64() - span)
			}
		}
	}
	return c.NotBefore.Add(at)
}
