package ca

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"slices"
	"strings"
	"testing"
	"time"
)

// Issue 16: a host signs its catalog entry with its node SVID; peers
// verify the chain to the mesh roots and learn the node's name and grant
// from it. A service SVID, a chain of another trust domain, an expired
// node SVID are refused.
func TestSignEntryAndVerifyNodeChain(t *testing.T) {
	ca := startCA(t, initDir(t), "")
	tok, err := ca.CreateToken("web1", []string{"web", "api"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	web := startClient(t, ClientOptions{NodeName: "web1", Services: []string{"web", "api"}, DB: openDB(t, ""), Token: tok})
	waitReady(t, web.Client)

	digest := sha256.Sum256([]byte("entry"))
	sig, chain, err := web.SignEntry(digest[:])
	if err != nil {
		t.Fatal(err)
	}
	if string(chain[0]) != string(web.NodeCert()) {
		t.Error("SignEntry's chain does not start with NodeCert")
	}
	v := NewNodeVerifier(web.Roots, testTD)
	nc, err := v.VerifyNodeChain(chain)
	if err != nil {
		t.Fatalf("verifying the node chain: %v", err)
	}
	if nc.Node != "web1" || !slices.Equal(nc.Services, []string{"api", "web"}) && !slices.Equal(nc.Services, []string{"web", "api"}) {
		t.Errorf("verified node %q grant %v, want web1 [web api]", nc.Node, nc.Services)
	}
	if !ecdsa.VerifyASN1(nc.Key.(*ecdsa.PublicKey), digest[:], sig) {
		t.Error("the signature does not verify with the node certificate's key")
	}

	svc := web.svcs["web"].cert.Certificate
	if _, err := v.VerifyNodeChain(svc); err == nil || !strings.Contains(err.Error(), "not a node identity") {
		t.Errorf("a service svid as a node certificate: %v", err)
	}
	if _, err := NewNodeVerifier(web.Roots, "other.example").VerifyNodeChain(chain); err == nil {
		t.Error("a node certificate of another trust domain was accepted")
	}
	if _, err := NewNodeVerifier(func() *x509.CertPool { return nil }, testTD).VerifyNodeChain(chain); err == nil {
		t.Error("accepted without mesh roots")
	}
	late := NewNodeVerifier(web.Roots, testTD)
	late.now = func() time.Time { return time.Now().Add(48 * time.Hour) }
	if _, err := late.VerifyNodeChain(chain); err == nil {
		t.Error("an expired node certificate was accepted")
	}
}
