package ca

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
)

// FuzzParseID: ParseID accepts exactly the canonical node and service IDs
// of the trust domain: what it accepts is rebuilt to the same string.
func FuzzParseID(f *testing.F) {
	for _, s := range []string{
		"spiffe://td.example/node/web-1", "spiffe://td.example/svc/web", "spiffe://td.example/ca",
		"spiffe://td.example/svc/%77eb", "spiffe://td.example/svc/web?x", "spiffe://TD.example/svc/web",
		"spiffe://user@td.example/svc/web", "spiffe://td.example/svc/web/", "spiffe://td.example//svc/web",
		"spiffe://td.example/svc/web#f", "https://td.example/svc/web", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		kind, name, err := ParseID(id, "td.example")
		if err != nil {
			return
		}
		if kind != kindNode && kind != kindSvc {
			t.Fatalf("ParseID(%q) kind %q", id, kind)
		}
		if !ValidName(name) {
			t.Fatalf("ParseID(%q) name %q is not a valid name", id, name)
		}
		if canon := "spiffe://td.example/" + kind + "/" + name; canon != id {
			t.Fatalf("ParseID accepted %q, which is not the canonical %q", id, canon)
		}
	})
}

// FuzzCertGrant: a node certificate's grant extension, whatever its bytes,
// decodes without panicking, and what decodes re-encodes to the same list.
func FuzzCertGrant(f *testing.F) {
	ext, _ := grantExtension([]string{"web", "api"})
	f.Add(ext.Value)
	empty, _ := grantExtension(nil)
	f.Add(empty.Value)
	f.Add([]byte{0x30, 0x80})
	f.Add([]byte{0x30, 0x03, 0x0c, 0x01})
	f.Fuzz(func(t *testing.T, v []byte) {
		c := &x509.Certificate{Extensions: []pkix.Extension{{Id: oidGrant, Value: v}}}
		got, ok, err := certGrant(c)
		if !ok {
			t.Fatal("extension present but not found")
		}
		if err != nil {
			return
		}
		again, err := grantExtension(got)
		if err != nil {
			return // e.g. strings that are not UTF-8
		}
		back, _, err := certGrant(&x509.Certificate{Extensions: []pkix.Extension{again}})
		if err != nil || !slices.Equal(back, got) {
			t.Fatalf("grant %q re-encoded decodes to %q, %v", got, back, err)
		}
	})
}

// FuzzReadJoinInfo: a join token from anywhere never panics the client,
// and what it accepts names an https CA and a hex root fingerprint.
func FuzzReadJoinInfo(f *testing.F) {
	f.Add("eyJhbGciOiJFUzI1NiJ9.eyJhdWQiOlsiaHR0cHM6Ly9jYTo0MTkyLzEuMC9zaWduIl0sInNoYSI6IjAwIn0.AAAA")
	f.Add("not a token")
	f.Add("a.b.c")
	f.Add("")
	f.Fuzz(func(t *testing.T, tok string) {
		ji, err := readJoinInfo(tok)
		if err != nil {
			return
		}
		if !strings.HasPrefix(ji.caURL, "https://") || len(ji.fingerprint) != 64 {
			t.Fatalf("accepted %+v", ji)
		}
	})
}

// FuzzSVIDRequest: whatever body a node sends to POST /vmesh/1.0/svid, the
// CA answers without panicking, and whatever it issues is the node's own
// SVID or a service SVID granted to it.
func FuzzSVIDRequest(f *testing.F) {
	ca := startCA(f, initDir(f), "")
	tok, _ := ca.CreateToken("fz", []string{"web"}, 0)
	c := startClient(f, ClientOptions{NodeName: "fz", Services: []string{"web"}, DB: openDB(f, ""), Token: tok})
	waitReady(f, c.Client)
	c.stop()
	peer := c.node.cert.Leaf
	for _, id := range []string{ServiceID(testTD, "web"), ServiceID(testTD, "db"), NodeID(testTD, "fz"), NodeID(testTD, "other"), caID(testTD)} {
		_, csr, err := newCSR(id)
		if err != nil {
			f.Fatal(err)
		}
		body, _ := json.Marshal(svidRequest{CSR: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr.Raw}))})
		f.Add(body)
	}
	f.Add([]byte(`{"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}`))
	f.Add([]byte(`{`))
	f.Fuzz(func(t *testing.T, body []byte) {
		r := httptest.NewRequest(http.MethodPost, svidPath, bytes.NewReader(body))
		r.TLS = &tls.ConnectionState{PeerCertificates: []*x509.Certificate{peer}}
		w := httptest.NewRecorder()
		ca.handleSVID(w, r)
		if w.Code != http.StatusOK {
			return
		}
		var resp svidResponse
		if err := json.Unmarshal(w.Body.Bytes(), &resp); err != nil {
			t.Fatalf("200 with a body that is not a response: %v", err)
		}
		chain, err := parseCertsPEM([]byte(resp.Chain))
		if err != nil || len(chain) == 0 || len(chain[0].URIs) != 1 {
			t.Fatalf("200 with chain %q: %v", resp.Chain, err)
		}
		if id := chain[0].URIs[0].String(); id != NodeID(testTD, "fz") && id != ServiceID(testTD, "web") {
			t.Fatalf("the CA issued %s to node fz (granted: web)", id)
		}
	})
}
