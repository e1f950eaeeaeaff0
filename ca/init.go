package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// Files in a CA directory. The root key is only needed by Init and may be
// moved offline afterwards; a CA-holding host needs the others.
const (
	RootCertFile         = "root_ca.crt"
	RootKeyFile          = "root_ca.key"
	IntermediateCertFile = "intermediate_ca.crt"
	IntermediateKeyFile  = "intermediate_ca.key"
	// JoinKeyFile signs join tokens. Hosts that share the CA directory share
	// it too (not required: a token is only accepted by the CA that minted it).
	JoinKeyFile = "join.key"
)

const (
	rootLifetime         = 10 * 365 * 24 * time.Hour
	intermediateLifetime = 365 * 24 * time.Hour
)

// Init creates a root (10 years) and an intermediate (1 year) CA for
// trustDomain in dir, ECDSA P-256, keys written 0600, plus the join-token key.
// It refuses to overwrite any existing key. It returns the root's SHA-256
// fingerprint (hex), which join tokens carry.
func Init(dir, trustDomain string) (fingerprint string, err error) {
	if !ValidTrustDomain(trustDomain) {
		return "", fmt.Errorf("initializing ca: %q is not a valid trust domain", trustDomain)
	}
	if dir == "" {
		return "", errors.New("initializing ca: no directory given")
	}
	for _, f := range []string{RootKeyFile, IntermediateKeyFile, JoinKeyFile, RootCertFile, IntermediateCertFile} {
		p := filepath.Join(dir, f)
		if _, err := os.Lstat(p); err == nil {
			return "", fmt.Errorf("initializing ca: %s already exists; refusing to overwrite it", p)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("initializing ca: %w", err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("initializing ca: %w", err)
	}
	now := time.Now()
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("initializing ca: generating root key: %w", err)
	}
	rootTmpl := &x509.Certificate{
		SerialNumber:          randSerial(),
		Subject:               pkix.Name{Organization: []string{"vmesh"}, CommonName: "vmesh root CA " + trustDomain},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(rootLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1,
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		return "", fmt.Errorf("initializing ca: creating root: %w", err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	interKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("initializing ca: generating intermediate key: %w", err)
	}
	interTmpl := &x509.Certificate{
		SerialNumber:          randSerial(),
		Subject:               pkix.Name{Organization: []string{"vmesh"}, CommonName: "vmesh intermediate CA " + trustDomain},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(intermediateLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	interDER, err := x509.CreateCertificate(rand.Reader, interTmpl, root, &interKey.PublicKey, rootKey)
	if err != nil {
		return "", fmt.Errorf("initializing ca: creating intermediate: %w", err)
	}
	joinKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("initializing ca: generating join key: %w", err)
	}
	// Keys first, exclusively, so a concurrent Init cannot interleave.
	for _, k := range []struct {
		name string
		key  *ecdsa.PrivateKey
	}{{RootKeyFile, rootKey}, {IntermediateKeyFile, interKey}, {JoinKeyFile, joinKey}} {
		if err := writeKeyFile(filepath.Join(dir, k.name), k.key); err != nil {
			return "", fmt.Errorf("initializing ca: %w", err)
		}
	}
	for _, c := range []struct {
		name string
		der  []byte
	}{{RootCertFile, rootDER}, {IntermediateCertFile, interDER}} {
		b := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.der})
		if err := writeFileExcl(filepath.Join(dir, c.name), b, 0o644); err != nil {
			return "", fmt.Errorf("initializing ca: %w", err)
		}
	}
	return Fingerprint(root), nil
}

// Fingerprint returns the hex SHA-256 of a certificate's DER, the form join
// tokens carry.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

func randSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return n
}

func writeKeyFile(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return fmt.Errorf("encoding key %s: %w", path, err)
	}
	return writeFileExcl(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}

func writeFileExcl(path string, b []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return f.Close()
}

func readCertFile(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	certs, err := parseCertsPEM(b)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	return certs[0], nil
}

func readKeyFile(path string) (*ecdsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	k, err := parseKeyPEM(b)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	return k, nil
}

func parseKeyPEM(b []byte) (*ecdsa.PrivateKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("no pem block")
	}
	switch blk.Type {
	case "EC PRIVATE KEY":
		return x509.ParseECPrivateKey(blk.Bytes)
	case "PRIVATE KEY":
		k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
		if err != nil {
			return nil, err
		}
		ek, ok := k.(*ecdsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("key is %T, want ECDSA", k)
		}
		return ek, nil
	}
	return nil, fmt.Errorf("unexpected pem block %q", blk.Type)
}

func encodeKeyPEM(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

func parseCertsPEM(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no certificate found")
	}
	return out, nil
}

func encodeCertsPEM(certs []*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}
