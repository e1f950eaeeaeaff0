package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"sync"
	"testing"
	"time"
)

// testCA is a throw-away root that issues X.509-SVIDs.
type testCA struct {
	td   string
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t testing.TB, td string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: td + " root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{td: td, cert: cert, key: key, pool: pool}
}

var serial struct {
	sync.Mutex
	n int64
}

// issue returns a leaf SVID for spiffe://td/path.
func (ca *testCA) issue(t testing.TB, path string) *tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial.Lock()
	serial.n++
	sn := serial.n + 1
	serial.Unlock()
	u, _ := url.Parse("spiffe://" + ca.td + "/" + path)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(sn),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		URIs:         []*url.URL{u},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// testIdentity serves a node SVID as client certificate and service SVIDs
// by SNI.
type testIdentity struct {
	ca   *testCA
	node *tls.Certificate
	svcs map[string]*tls.Certificate
}

func newTestIdentity(t testing.TB, ca *testCA, node string, services ...string) *testIdentity {
	id := &testIdentity{ca: ca, node: ca.issue(t, "node/"+node), svcs: map[string]*tls.Certificate{}}
	for _, s := range services {
		id.svcs[s] = ca.issue(t, "svc/"+s)
	}
	return id
}

func (i *testIdentity) GetCertificate(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if c, ok := i.svcs[h.ServerName]; ok {
		return c, nil
	}
	return i.node, nil
}

func (i *testIdentity) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return i.node, nil
}

func (i *testIdentity) Roots() *x509.CertPool { return i.ca.pool }
func (i *testIdentity) TrustDomain() string   { return i.ca.td }
