package bench

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// PeerCerts are the files of a throw-away PKI for a peer proxy's mTLS: one
// CA, a server and a client certificate, all ECDSA P-256 like vmesh's SVIDs.
type PeerCerts struct {
	CA     string // CA certificate (PEM)
	Server string // server certificate chain + key (PEM), for HAProxy's crt
	Client string // client certificate chain + key (PEM)
	// ServerName is the DNS name in the server certificate.
	ServerName string
}

// WritePeerCerts creates the PKI in dir (files mode 0600, except the CA
// certificate).
func WritePeerCerts(dir string) (PeerCerts, error) {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return PeerCerts{}, fmt.Errorf("generating ca key: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "vmesh bench peer CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return PeerCerts{}, fmt.Errorf("creating ca certificate: %w", err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	pc := PeerCerts{
		CA:         filepath.Join(dir, "ca.pem"),
		Server:     filepath.Join(dir, "server.pem"),
		Client:     filepath.Join(dir, "client.pem"),
		ServerName: "server.bench",
	}
	if err := os.WriteFile(pc.CA, pemBlock("CERTIFICATE", caDER), 0o644); err != nil {
		return PeerCerts{}, fmt.Errorf("writing ca certificate: %w", err)
	}
	leaf := func(serial int64, cn string, usage x509.ExtKeyUsage, path string) error {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("generating %s key: %w", cn, err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: cn},
			DNSNames:     []string{cn},
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return fmt.Errorf("creating %s certificate: %w", cn, err)
		}
		kder, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			return fmt.Errorf("encoding %s key: %w", cn, err)
		}
		data := append(pemBlock("CERTIFICATE", der), pemBlock("EC PRIVATE KEY", kder)...)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return fmt.Errorf("writing %s: %w", path, err)
		}
		return nil
	}
	if err := leaf(2, pc.ServerName, x509.ExtKeyUsageServerAuth, pc.Server); err != nil {
		return PeerCerts{}, err
	}
	if err := leaf(3, "client.bench", x509.ExtKeyUsageClientAuth, pc.Client); err != nil {
		return PeerCerts{}, err
	}
	return pc, nil
}

// WriteSVIDs writes a throw-away mesh PKI for the vmesh-proxy column (the
// proxy package run without the agent): root.pem, and for each node
// node-<name>.pem (spiffe://td/node/<name>) and svc-<service>.pem
// (spiffe://td/svc/<service>) for the services it offers, each a leaf with
// its key. It returns the root's path.
func WriteSVIDs(dir, td string, nodes map[string][]string) (string, error) {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("generating root key: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: td + " bench root"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return "", fmt.Errorf("creating root: %w", err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	root := filepath.Join(dir, "root.pem")
	if err := os.WriteFile(root, pemBlock("CERTIFICATE", caDER), 0o644); err != nil {
		return "", fmt.Errorf("writing root: %w", err)
	}
	serial := int64(1)
	issue := func(id *url.URL, path string) error {
		serial++
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("generating key for %s: %w", id, err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(24 * time.Hour),
			URIs:         []*url.URL{id},
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return fmt.Errorf("creating %s: %w", id, err)
		}
		kder, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			return fmt.Errorf("encoding key of %s: %w", id, err)
		}
		return os.WriteFile(path, append(pemBlock("CERTIFICATE", der), pemBlock("EC PRIVATE KEY", kder)...), 0o600)
	}
	for node, svcs := range nodes {
		if err := issue(&url.URL{Scheme: "spiffe", Host: td, Path: "/node/" + node}, filepath.Join(dir, "node-"+node+".pem")); err != nil {
			return "", err
		}
		for _, s := range svcs {
			if err := issue(&url.URL{Scheme: "spiffe", Host: td, Path: "/svc/" + s}, filepath.Join(dir, "svc-"+s+".pem")); err != nil {
				return "", err
			}
		}
	}
	return root, nil
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}
