package ca

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"path/filepath"
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

// Issue 16: certificates restored after an outage longer than their
// lifetime never make the host ready, and say why (clock seam).
func TestExpiredCertificatesNeverReady(t *testing.T) {
	ca := startCA(t, initDir(t), "")
	dbPath := filepath.Join(t.TempDir(), "node.db")
	db := openDB(t, dbPath)
	tok, _ := ca.CreateToken("x", []string{"web"}, 0)
	c := startClient(t, ClientOptions{NodeName: "x", Services: []string{"web"}, DB: db, Token: tok})
	waitReady(t, c.Client)
	if why := c.Expired(); why != "" {
		t.Fatalf("fresh certificates: Expired() = %q", why)
	}
	c.stop()

	clk := newClock()
	clk.Set(2 * time.Hour) // the 1h certificates have expired
	later, err := newTestClient(t, ClientOptions{NodeName: "x", Services: []string{"web"}, DB: db, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-later.Ready():
		t.Fatal("a host with expired certificates reports ready")
	default:
	}
	if why := later.Expired(); !strings.Contains(why, "spiffe://test.example/node/x expired at") {
		t.Errorf("Expired() = %q, want the node certificate named with its expiry", why)
	}
}

// Issue 16: a node whose certificate expired (CA outage, host powered off)
// renews it with proof of its key within renew_after_expiry, and gets a
// refusal naming the fix beyond it. The CA's clock is moved (seam).
func TestRenewAfterExpiry(t *testing.T) {
	dir := initDir(t)
	ca := startCA(t, dir, "")
	tok, _ := ca.CreateToken("e", []string{"web"}, 0)
	c := startClient(t, ClientOptions{NodeName: "e", Services: []string{"web"}, DB: openDB(t, ""), Token: tok})
	waitReady(t, c.Client)
	c.stop()
	old := nodeCert(c.Client)

	ca.clock.Set(90 * time.Minute) // to the CA, the node's 1h certificate expired 30m ago
	if err := c.obtainNode(t.Context(), c.node); err != nil {
		t.Fatalf("renewing a node certificate expired 30m ago (grace 7 days): %v", err)
	}
	if n := nodeCert(c.Client); n.SerialNumber.Cmp(old.SerialNumber) == 0 {
		t.Fatal("the node certificate was not replaced")
	}
	if g, ok, _ := certGrant(nodeCert(c.Client)); !ok || !slices.Equal(g, []string{"web"}) {
		t.Errorf("renewed node certificate grants %v, want [web]", g)
	}

	short := startCA(t, initDir(t), "", func(o *ServerOptions) { o.Config.RenewAfterExpiry = 10 * time.Minute })
	tok, _ = short.CreateToken("f", []string{"web"}, 0)
	f := startClient(t, ClientOptions{NodeName: "f", Services: []string{"web"}, DB: openDB(t, ""), Token: tok})
	waitReady(t, f.Client)
	f.stop()
	short.clock.Set(90 * time.Minute) // expired 30m ago to this CA, grace 10m
	f.token = ""
	f.mu.Lock()
	f.node.cert.Leaf.NotAfter = time.Now().Add(-time.Minute) // and to the client
	f.mu.Unlock()
	err := f.obtainNode(t.Context(), f.node)
	if err == nil || !strings.Contains(err.Error(), "vmesh token create --node f") {
		t.Errorf("renewal beyond the grace period: %v, want a refusal naming the fix", err)
	}
}
