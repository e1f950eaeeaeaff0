package ca

import (
	"crypto/x509"
	"errors"
	"fmt"
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

	mu      sync.RWMutex
	cache   map[string]verdict   // key: the leaf's DER
	revIDs  map[string]time.Time // revoked node SPIFFE IDs: when
	revSNs  map[string]bool      // revoked certificate serials (hex)
	revoked int                  // revocations applied
}

type verdict struct {
	id        string
	serial    string // hex
	notBefore time.Time
	notAfter  time.Time
	roots     *x509.CertPool // the roots it was verified against
}

// Revoke makes the verifier refuse, from now on, the certificates of a
// revoked node: its node SVID (by SPIFFE ID) and the listed serials (its
// service SVIDs). Handshakes already made are not undone.
func (v *Verifier) Revoke(r Revocation) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if at, ok := v.revIDs[NodeID(v.td, r.Node)]; !ok || r.At.After(at) {
		v.revIDs[NodeID(v.td, r.Node)] = r.At
	}
	for _, sn := range r.Serials {
		v.revSNs[sn] = true
	}
	v.revoked++
}

// isRevoked: a revoked node's certificates issued before its revocation
// (NotBefore is backdated by defaultBackdate), and the listed serials. A
// node admitted again with a new token gets certificates issued after it.
func (v *Verifier) isRevoked(id, serial string, notBefore time.Time) bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	at, ok := v.revIDs[id]
	return (ok && notBefore.Before(at.Add(-defaultBackdate+time.Second))) || v.revSNs[serial]
}

// NewVerifier returns a Verifier against the pool roots returns (nil: refuse
// everything) for trustDomain.
func NewVerifier(roots func() *x509.CertPool, trustDomain string) *Verifier {
	return &Verifier{roots: roots, td: trustDomain, now: time.Now, cache: map[string]verdict{},
		revIDs: map[string]time.Time{}, revSNs: map[string]bool{}}
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
		if v.isRevoked(e.id, e.serial, e.notBefore) {
			return "", fmt.Errorf("verifying peer svid %s: revoked", e.id)
		}
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
	serial := leaf.SerialNumber.Text(16)
	if v.isRevoked(id, serial, leaf.NotBefore) {
		return "", fmt.Errorf("verifying peer svid %s: revoked", id)
	}
	v.mu.Lock()
	if len(v.cache) >= verifierCacheMax {
		v.cache = map[string]verdict{}
	}
	v.cache[string(rawCerts[0])] = verdict{id: id, serial: serial, notBefore: leaf.NotBefore, notAfter: leaf.NotAfter, roots: roots}
	v.mu.Unlock()
	return id, nil
}
