package ca

import (
	"crypto/ecdsa"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"go.step.sm/crypto/jose"
)

// joinProvisioner is the name of the JWK provisioner that join tokens (and
// the CA's internal issuance) use; it is the tokens' issuer.
const joinProvisioner = "vmesh-join"

const signPath = "/1.0/sign"

// tokenClaims is the payload of a join token: the claims smallstep's JWK
// provisioner checks (iss, sub, aud, exp, nbf, iat, jti, sans), the root
// fingerprint the client pins (sha, as step's Bootstrap expects), and the
// services granted (informational; the CA's own record decides).
type tokenClaims struct {
	jose.Claims
	SANs     []string `json:"sans,omitempty"`
	SHA      string   `json:"sha,omitempty"`
	Services []string `json:"vmesh_services,omitempty"`
}

type joinSigner struct {
	key    *ecdsa.PrivateKey
	pub    *jose.JSONWebKey
	signer jose.Signer
}

func newJoinSigner(key *ecdsa.PrivateKey) (*joinSigner, error) {
	pub := &jose.JSONWebKey{Key: key.Public(), Algorithm: string(jose.ES256), Use: "sig"}
	kid, err := jose.Thumbprint(pub)
	if err != nil {
		return nil, fmt.Errorf("computing join key id: %w", err)
	}
	pub.KeyID = kid
	priv := &jose.JSONWebKey{Key: key, KeyID: kid, Algorithm: string(jose.ES256), Use: "sig"}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: priv},
		new(jose.SignerOptions).WithType("JWT").WithHeader("kid", kid))
	if err != nil {
		return nil, fmt.Errorf("creating join token signer: %w", err)
	}
	return &joinSigner{key: key, pub: pub, signer: signer}, nil
}

func (j *joinSigner) sign(c *tokenClaims) (string, error) {
	tok, err := jose.Signed(j.signer).Claims(c).CompactSerialize()
	if err != nil {
		return "", fmt.Errorf("signing token: %w", err)
	}
	return tok, nil
}

func newTokenID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func newClaims(sub, aud string, sans []string, now time.Time, ttl time.Duration) *tokenClaims {
	return &tokenClaims{
		Claims: jose.Claims{
			ID:        newTokenID(),
			Issuer:    joinProvisioner,
			Subject:   sub,
			Audience:  jose.Audience{aud},
			IssuedAt:  jose.NewNumericDate(now),
			NotBefore: jose.NewNumericDate(now),
			Expiry:    jose.NewNumericDate(now.Add(ttl)),
		},
		SANs: sans,
	}
}

// joinInfo is what a client learns from a token before trusting anything.
type joinInfo struct {
	caURL       string
	fingerprint string
	nodeID      string
}

// parseTokenUnverified reads a join token's claims without checking its
// signature: the client cannot check it, the CA does.
func parseTokenUnverified(tok string) (*tokenClaims, error) {
	jwt, err := jose.ParseSigned(strings.TrimSpace(tok))
	if err != nil {
		return nil, fmt.Errorf("parsing join token: %w", err)
	}
	var c tokenClaims
	if err := jwt.UnsafeClaimsWithoutVerification(&c); err != nil {
		return nil, fmt.Errorf("parsing join token claims: %w", err)
	}
	return &c, nil
}

func readJoinInfo(tok string) (*joinInfo, error) {
	c, err := parseTokenUnverified(tok)
	if err != nil {
		return nil, err
	}
	if len(c.Audience) != 1 {
		return nil, errors.New("reading join token: want exactly one audience (the ca url)")
	}
	aud := c.Audience[0]
	if !strings.HasSuffix(aud, signPath) {
		return nil, fmt.Errorf("reading join token: audience %q is not a ca sign url", aud)
	}
	u, err := url.Parse(strings.TrimSuffix(aud, signPath))
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("reading join token: audience %q is not a ca sign url", aud)
	}
	if len(c.SHA) != 64 {
		return nil, errors.New("reading join token: no root fingerprint (sha)")
	}
	if _, err := hex.DecodeString(c.SHA); err != nil {
		return nil, errors.New("reading join token: root fingerprint (sha) is not hex")
	}
	return &joinInfo{caURL: u.String(), fingerprint: strings.ToLower(c.SHA), nodeID: c.Subject}, nil
}
