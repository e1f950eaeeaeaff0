package ca

import (
	"crypto/x509"
	"errors"
	"sync"
	"time"
)

// verifierCacheMax bounds the verdicts a Verifier remembers; when full it
// starts afresh.
const verifierCacheMax = 4096

// Verifier verifies peers' SVIDs as VerifySVID does and remembers each leaf
// it accepted until the leaf expires or the roots change. A repeated or
// resumed handshake with the same peer certificate — the common case between
// two proxies — then costs a map lookup instead of parsing the chain and two
// signature checks. Refusals are not remembered.
type Verifier struct {
	roots func() *x509.CertPool
	td    string
	now   func() time.Time

	mu    sync.RWMutex
	cache map[string]verdict // key: the leaf's DER
}

type verdict struct {
	id       string
	notAfter time.Time
	roots    *x509.CertPool // the roots it was verified against
}

// NewVerifier returns a Verifier against the pool roots returns (nil: refuse
// everything) for trustDomain.
func NewVerifier(roots func() *x509.CertPool, trustDomain string) *Verifier {
	return &Verifier{roots: roots, td: trustDomain, now: time.Now, cache: map[string]verdict{}}
}

// Verify returns the SPIFFE ID of the verified chain rawCerts (leaf first).
func (v *Verifier) Verify(rawCerts [][]byte) (string, error) {
	if len(rawCerts) == 0 {
		return "", errors.New("verifying peer svid: no certificate presented")
	}
	roots := v.roots()
	if roots == nil {
		return "", errors.New("verifying peer svid: no mesh roots yet")
	}
	now := v.now()
	v.mu.RLock()
	e, ok := v.cache[string(rawCerts[0])]
	v.mu.RUnlock()
	if ok && e.roots == roots && now.Before(e.notAfter) {
		return e.id, nil
	}
	id, err := VerifySVID(rawCerts, roots, v.td)
	if err != nil {
		return "", err
	}
	leaf, err := x509.ParseCertificate(rawCerts[0])
	if err != nil {
		return "", err
	}
	v.mu.Lock()
	if len(v.cache) >= verifierCacheMax {
		v.cache = map[string]verdict{}
	}
	v.cache[string(rawCerts[0])] = verdict{id: id, notAfter: leaf.NotAfter, roots: roots}
	v.mu.Unlock()
	return id, nil
}
