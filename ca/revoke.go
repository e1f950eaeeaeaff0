package ca

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// maxSerials bounds the certificate serials remembered per node.
const maxSerials = 64

// Revocation says that the CA revoked a node: its node SVID and the listed
// certificates (its service SVIDs) are no longer to be accepted.
type Revocation struct {
	Node    string    `json:"node"`
	At      time.Time `json:"at"`
	Serials []string  `json:"serials,omitempty"` // hex
}

// signedRevocation is a Revocation as it travels: signed with the
// intermediate, whose certificate comes along.
type signedRevocation struct {
	Revocation
	TrustDomain string `json:"td"`
	Cert        []byte `json:"cert"` // the intermediate, DER
	Sig         []byte `json:"sig"`  // ECDSA over revocationDigest
}

func revocationDigest(td string, r Revocation) []byte {
	s := fmt.Sprintf("vmesh-revocation/v1|%s|%s|%d|%s", td, r.Node, r.At.UnixNano(), strings.Join(r.Serials, ","))
	d := sha256.Sum256([]byte(s))
	return d[:]
}

func (s *Server) signRevocation(r Revocation) ([]byte, error) {
	sig, err := ecdsa.SignASN1(rand.Reader, s.interKey, revocationDigest(s.td, r))
	if err != nil {
		return nil, fmt.Errorf("signing the revocation: %w", err)
	}
	return json.Marshal(signedRevocation{Revocation: r, TrustDomain: s.td, Cert: s.inter.Raw, Sig: sig})
}

// VerifyRevocation checks a revocation (as Server.Revoke returns it): signed
// by a CA certificate of trustDomain that chains to roots.
func VerifyRevocation(blob []byte, roots *x509.CertPool, trustDomain string) (Revocation, error) {
	var sr signedRevocation
	if len(blob) > 16<<10 {
		return Revocation{}, errors.New("verifying a revocation: too large")
	}
	if err := json.Unmarshal(blob, &sr); err != nil {
		return Revocation{}, fmt.Errorf("verifying a revocation: %w", err)
	}
	if roots == nil {
		return Revocation{}, errors.New("verifying a revocation: no mesh roots yet")
	}
	if sr.TrustDomain != trustDomain || !ValidName(sr.Node) {
		return Revocation{}, fmt.Errorf("verifying a revocation: node %q of trust domain %q", sr.Node, sr.TrustDomain)
	}
	c, err := x509.ParseCertificate(sr.Cert)
	if err != nil {
		return Revocation{}, fmt.Errorf("verifying a revocation: %w", err)
	}
	if !c.IsCA {
		return Revocation{}, errors.New("verifying a revocation: not signed by a CA certificate")
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return Revocation{}, fmt.Errorf("verifying a revocation: %w", err)
	}
	k, ok := c.PublicKey.(*ecdsa.PublicKey)
	if !ok || !ecdsa.VerifyASN1(k, revocationDigest(sr.TrustDomain, sr.Revocation), sr.Sig) {
		return Revocation{}, errors.New("verifying a revocation: bad signature")
	}
	return sr.Revocation, nil
}

// ApplyRevocation applies a revocation made by another CA host sharing the
// intermediate: this CA refuses the node's renewals and service SVIDs too.
func (s *Server) ApplyRevocation(blob []byte) (Revocation, error) {
	r, err := VerifyRevocation(blob, s.roots, s.td)
	if err != nil {
		return r, err
	}
	err = s.updateNode(r.Node, func(rec *nodeRecord) *nodeRecord {
		if rec == nil {
			rec = &nodeRecord{}
		}
		// A token made here after the revocation re-admits the node.
		if rec.Revoked || rec.TokenAt.After(r.At) {
			return nil
		}
		rec.Revoked, rec.TokenID = true, ""
		return rec
	})
	if err != nil {
		return r, fmt.Errorf("applying the revocation of %s: %w", r.Node, err)
	}
	return r, nil
}

// noteSerial remembers a certificate issued to node, for its revocation.
func (s *Server) noteSerial(node string, c *x509.Certificate) {
	serial := c.SerialNumber.Text(16)
	err := s.updateNode(node, func(rec *nodeRecord) *nodeRecord {
		if rec == nil || slices.Contains(rec.Serials, serial) {
			return nil
		}
		rec.Serials = append(rec.Serials, serial)
		if len(rec.Serials) > maxSerials {
			rec.Serials = rec.Serials[len(rec.Serials)-maxSerials:]
		}
		return rec
	})
	if err != nil {
		s.log.Warn("remembering an issued certificate", "node", node, "err", err)
	}
}
