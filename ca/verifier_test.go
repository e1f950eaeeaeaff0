package ca

import (
	"crypto/x509"
	"testing"
	"time"
)

// The cached verifier accepts and refuses what VerifySVID does, answers a
// known leaf from its cache, and forgets it when it expires or the roots
// change.
func TestVerifier(t *testing.T) {
	ca := startCA(t, initDir(t), "")
	other := startCA(t, initDir(t), "")
	roots := ca.Roots()
	v := NewVerifier(func() *x509.CertPool { return roots }, testTD)
	good := signDirect(t, ca.dir, func(c *x509.Certificate) { c.NotAfter = time.Now().Add(time.Hour) })

	if id, err := v.Verify(good); err != nil || id != ServiceID(testTD, "x") {
		t.Fatalf("good svid: %q %v", id, err)
	}
	if len(v.cache) != 1 {
		t.Fatalf("accepted leaf not cached: %d entries", len(v.cache))
	}
	// Answered from the cache: even a chain without its intermediate, as
	// the leaf was verified already.
	if id, err := v.Verify(good[:1]); err != nil || id != ServiceID(testTD, "x") {
		t.Fatalf("cached leaf: %q %v", id, err)
	}
	// Refusals are not cached and still refused.
	bad := signDirect(t, ca.dir, func(c *x509.Certificate) { c.DNSNames = []string{"x.example"} })
	for i := 0; i < 2; i++ {
		if _, err := v.Verify(bad); err == nil {
			t.Fatal("accepted an svid with a dns san")
		}
	}
	// Past the leaf's NotAfter the cache does not answer.
	v.now = func() time.Time { return time.Now().Add(2 * time.Hour) }
	if _, err := v.Verify(good[:1]); err == nil {
		t.Fatal("expired cached leaf accepted")
	}
	v.now = time.Now
	// New roots: verified afresh, against them.
	roots = other.Roots()
	if _, err := v.Verify(good); err == nil {
		t.Fatal("leaf accepted after the roots changed to another CA")
	}
	roots = nil
	if _, err := v.Verify(good); err == nil {
		t.Fatal("accepted with no roots")
	}
}
