package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"time"
)

// SignEntry signs digest (a SHA-256) with the node SVID's key, for the
// gossiped catalog entry of this host, and returns the signature (ASN.1
// ECDSA) and the node SVID chain (leaf first, DER) it verifies with. It
// fails before the host holds a node SVID.
func (c *Client) SignEntry(digest []byte) ([]byte, [][]byte, error) {
	c.mu.RLock()
	node := c.node
	c.mu.RUnlock()
	if node == nil {
		return nil, nil, errors.New("signing the catalog entry: no node certificate yet")
	}
	key, ok := node.cert.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, nil, errors.New("signing the catalog entry: the node key cannot sign")
	}
	sig, err := key.Sign(rand.Reader, digest, crypto.SHA256)
	if err != nil {
		return nil, nil, fmt.Errorf("signing the catalog entry: %w", err)
	}
	return sig, node.cert.Certificate, nil
}

// NodeCert returns the node SVID's leaf (DER), or nil before there is one.
// The slice is shared: do not modify it.
func (c *Client) NodeCert() []byte {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.node == nil {
		return nil
	}
	return c.node.cert.Certificate[0]
}

// NodeVerifier verifies the node SVIDs that sign peers' catalog entries:
// the chain to the mesh roots, the node SPIFFE ID, and the services its
// grant extension lists.
type NodeVerifier struct {
	roots func() *x509.CertPool
	td    string
	// now is the clock (a seam for tests).
	now func() time.Time
}

// NewNodeVerifier returns a NodeVerifier against the pool roots returns
// (nil: refuse everything) for trustDomain.
func NewNodeVerifier(roots func() *x509.CertPool, trustDomain string) *NodeVerifier {
	return &NodeVerifier{roots: roots, td: trustDomain, now: time.Now}
}

// NodeCert is a verified node SVID: whose it is, what it grants, its key.
type NodeCert struct {
	Node     string
	Services []string
	Key      crypto.PublicKey
	NotAfter time.Time
}

// VerifyNodeChain verifies chain (leaf first, DER) as a node SVID of the
// mesh, now: the chain to the roots, exactly a spiffe://TD/node/NAME URI,
// the TLS key usages; and returns the node's name, its grant (no extension:
// no services) and the leaf's public key.
func (v *NodeVerifier) VerifyNodeChain(chain [][]byte) (NodeCert, error) {
	roots := v.roots()
	if roots == nil {
		return NodeCert{}, errors.New("verifying a node certificate: no mesh roots yet")
	}
	id, err := verifySVID(chain, roots, v.td, v.now())
	if err != nil {
		return NodeCert{}, err
	}
	kind, name, err := ParseID(id, v.td)
	if err != nil {
		return NodeCert{}, fmt.Errorf("verifying a node certificate: %w", err)
	}
	if kind != kindNode {
		return NodeCert{}, fmt.Errorf("verifying a node certificate: %s is not a node identity", id)
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return NodeCert{}, fmt.Errorf("verifying a node certificate: %w", err)
	}
	grant, _, err := certGrant(leaf)
	if err != nil {
		return NodeCert{}, fmt.Errorf("verifying a node certificate: %w", err)
	}
	if _, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok {
		return NodeCert{}, fmt.Errorf("verifying a node certificate: %s has a %T key, want ECDSA", id, leaf.PublicKey)
	}
	return NodeCert{Node: name, Services: grant, Key: leaf.PublicKey, NotAfter: leaf.NotAfter}, nil
}
