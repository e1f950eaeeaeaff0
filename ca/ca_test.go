package ca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/smallstep/certificates/api"
)

func TestInit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	fp, err := Init(dir, testTD)
	if err != nil {
		t.Fatal(err)
	}
	root, err := readCertFile(filepath.Join(dir, RootCertFile))
	if err != nil {
		t.Fatal(err)
	}
	if got := Fingerprint(root); got != fp {
		t.Errorf("fingerprint %s, root file has %s", fp, got)
	}
	inter, err := readCertFile(filepath.Join(dir, IntermediateCertFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := inter.CheckSignatureFrom(root); err != nil {
		t.Errorf("intermediate not signed by root: %v", err)
	}
	if d := root.NotAfter.Sub(root.NotBefore); d < 9*365*24*time.Hour {
		t.Errorf("root lifetime %s, want ~10y", d)
	}
	if d := inter.NotAfter.Sub(inter.NotBefore); d < 364*24*time.Hour || d > 366*24*time.Hour {
		t.Errorf("intermediate lifetime %s, want ~1y", d)
	}
	for _, c := range []*x509.Certificate{root, inter} {
		if k, ok := c.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
			t.Errorf("%s: key %T, want ECDSA P-256", c.Subject, c.PublicKey)
		}
	}
	for _, f := range []string{RootKeyFile, IntermediateKeyFile, JoinKeyFile} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", f, st.Mode().Perm())
		}
	}
	before, _ := os.ReadFile(filepath.Join(dir, IntermediateKeyFile))
	if _, err := Init(dir, testTD); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Errorf("second Init: %v, want refusal", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, IntermediateKeyFile))
	if !bytes.Equal(before, after) {
		t.Error("second Init changed the intermediate key")
	}
	if _, err := Init(t.TempDir(), "Bad Domain"); err == nil {
		t.Error("Init accepted an invalid trust domain")
	}
}

// TestJoin: a host joins with a token, gets its node and service SVIDs with
// the right shape, and two hosts talk mTLS with them.
func TestJoin(t *testing.T) {
	ca := startCA(t, initDir(t), "")
	reg := prometheus.NewRegistry()
	tok, err := ca.CreateToken("web1", []string{"web"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	web := startClient(t, ClientOptions{NodeName: "web1", Services: []string{"web"}, DB: openDB(t, ""), Token: tok, Registerer: reg})
	waitReady(t, web.Client)
	tok2, err := ca.CreateToken("app1", nil, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	app := startClient(t, ClientOptions{NodeName: "app1", DB: openDB(t, ""), Token: tok2})
	waitReady(t, app.Client)

	for _, tc := range []struct {
		cert *x509.Certificate
		id   string
	}{
		{nodeCert(web.Client), "spiffe://test.example/node/web1"},
		{svcCert(web.Client, "web"), "spiffe://test.example/svc/web"},
		{nodeCert(app.Client), "spiffe://test.example/node/app1"},
	} {
		c := tc.cert
		if c == nil {
			t.Fatalf("%s: no certificate", tc.id)
		}
		if len(c.URIs) != 1 || c.URIs[0].String() != tc.id {
			t.Errorf("%s: URIs %v", tc.id, c.URIs)
		}
		if len(c.DNSNames)+len(c.IPAddresses)+len(c.EmailAddresses) != 0 {
			t.Errorf("%s: extra SANs %v %v %v", tc.id, c.DNSNames, c.IPAddresses, c.EmailAddresses)
		}
		if c.Subject.String() != "" {
			t.Errorf("%s: subject %q, want empty", tc.id, c.Subject)
		}
		if k, ok := c.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
			t.Errorf("%s: key %T, want P-256", tc.id, c.PublicKey)
		}
		if d := c.NotAfter.Sub(c.NotBefore); d < time.Hour || d > time.Hour+2*time.Minute {
			t.Errorf("%s: lifetime %s, want 1h plus backdate", tc.id, d)
		}
		if !c.NotBefore.Before(time.Now().Add(-30 * time.Second)) {
			t.Errorf("%s: NotBefore %s not backdated", tc.id, c.NotBefore)
		}
	}
	if got := metricValue(web.refresh); got != 2 {
		t.Errorf("identity_cert_refresh_total = %v, want 2", got)
	}
	if n, err := gatherCount(reg, "identity_cert_expiration_timestamp_seconds"); err != nil || n != 2 {
		t.Errorf("expiration gauges: %d, %v; want 2", n, err)
	}
	if st := web.Status(); len(st) != 2 || st[0].ID != NodeID(testTD, "web1") || st[1].Service != "web" {
		t.Errorf("Status() = %+v", st)
	}

	// mTLS: app dials web asking for service "web" and sees svc/web; web
	// sees app's node identity. Without SNI, web presents its node SVID.
	m := serveMesh(t, web.Client)
	conn, id, _ := dialMesh(t, m, app.Client, "web")
	if id != ServiceID(testTD, "web") {
		t.Errorf("server identity %q, want svc/web", id)
	}
	if err := echo(conn, "hello"); err != nil {
		t.Fatal(err)
	}
	if got := <-m.peerIDs; got != NodeID(testTD, "app1") {
		t.Errorf("client identity %q, want node/app1", got)
	}
	_, id, _ = dialMesh(t, m, app.Client, "")
	if id != NodeID(testTD, "web1") {
		t.Errorf("server identity without sni %q, want node/web1", id)
	}
}

func TestJoinRefusals(t *testing.T) {
	ca := startCA(t, initDir(t), "")
	ctx := context.Background()

	t.Run("token used twice", func(t *testing.T) {
		tok, err := ca.CreateToken("n1", nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		waitReady(t, startClient(t, ClientOptions{NodeName: "n1", DB: openDB(t, ""), Token: tok}).Client)
		c, err := newTestClient(t, ClientOptions{NodeName: "n1", DB: openDB(t, ""), Token: tok})
		if err != nil {
			t.Fatal(err)
		}
		// Issue 15: the joining host is told exactly why, not smallstep's
		// "lacked necessary authorization".
		if _, err := c.step(ctx); apiStatus(err) != http.StatusUnauthorized || !strings.Contains(err.Error(), "this token was already used") ||
			!strings.Contains(err.Error(), "vmesh token create --node n1") {
			t.Errorf("second use: %v, want 401 saying the token was already used", err)
		}
		if f := c.Failures()[""]; !strings.Contains(f, "already used") {
			t.Errorf("Failures() after the refused join: %q", f)
		}
		nodes, err := ca.Nodes()
		if err != nil || len(nodes) == 0 || nodes[0].Node != "n1" || nodes[0].JoinedAt.IsZero() || nodes[0].TokenExpires.IsZero() {
			t.Errorf("Nodes() = %+v, %v; want n1 joined", nodes, err)
		}
		if nodeCert(c) != nil {
			t.Error("second use got a certificate")
		}
	})

	t.Run("ca unreachable at the token's address", func(t *testing.T) {
		// A CA host that advertised the wrong address (a tunnel's): its
		// tokens carry an address nobody reaches.
		wrong := startCA(t, initDir(t), "", func(o *ServerOptions) { o.URL = "https://127.0.0.1:1" })
		tok, err := wrong.CreateToken("n9", nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := newTestClient(t, ClientOptions{NodeName: "n9", DB: openDB(t, ""), Token: tok})
		if _, err := c.step(ctx); err == nil || !strings.Contains(err.Error(), "cannot reach the CA at https://127.0.0.1:1, the address in the join token") ||
			!strings.Contains(err.Error(), "gossip.advertise_addr") {
			t.Errorf("join with an unreachable CA address: %v", err)
		}
	})

	t.Run("expired token", func(t *testing.T) {
		ca.clock.Set(-2 * time.Hour)
		tok, err := ca.CreateToken("n2", nil, 15*time.Minute)
		ca.clock.Set(0)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := newTestClient(t, ClientOptions{NodeName: "n2", DB: openDB(t, ""), Token: tok})
		if _, err := c.step(ctx); apiStatus(err) != http.StatusUnauthorized || !strings.Contains(err.Error(), "expired") {
			t.Errorf("expired token: %v, want 401 expired", err)
		}
	})

	t.Run("token signed by another key", func(t *testing.T) {
		if _, err := ca.CreateToken("n3", nil, 0); err != nil { // a record exists
			t.Fatal(err)
		}
		other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		js, err := newJoinSigner(other)
		if err != nil {
			t.Fatal(err)
		}
		id := NodeID(testTD, "n3")
		cl := newClaims(id, ca.url+signPath, []string{id}, time.Now(), time.Minute)
		cl.SHA = ca.Fingerprint()
		forged, err := js.sign(cl)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := newTestClient(t, ClientOptions{NodeName: "n3", DB: openDB(t, ""), Token: forged})
		if _, err := c.step(ctx); apiStatus(err) != http.StatusUnauthorized || !strings.Contains(err.Error(), "not signed by this ca") {
			t.Errorf("forged token: %v, want 401", err)
		}
	})

	t.Run("token for another node", func(t *testing.T) {
		tok, _ := ca.CreateToken("n4", nil, 0)
		c, _ := newTestClient(t, ClientOptions{NodeName: "n5", DB: openDB(t, ""), Token: tok})
		if _, err := c.step(ctx); err == nil || !strings.Contains(err.Error(), "token is for") {
			t.Errorf("token for another node: %v", err)
		}
	})

	t.Run("superseded token", func(t *testing.T) {
		old, _ := ca.CreateToken("n6", nil, 0)
		if _, err := ca.CreateToken("n6", nil, 0); err != nil {
			t.Fatal(err)
		}
		c, _ := newTestClient(t, ClientOptions{NodeName: "n6", DB: openDB(t, ""), Token: old})
		if _, err := c.step(ctx); apiStatus(err) != http.StatusUnauthorized {
			t.Errorf("superseded token: %v, want 401", err)
		}
	})

	t.Run("service not granted", func(t *testing.T) {
		tok, _ := ca.CreateToken("n7", []string{"web"}, 0)
		c := startClient(t, ClientOptions{NodeName: "n7", Services: []string{"web", "db"}, DB: openDB(t, ""), Token: tok})
		eventually(t, 10*time.Second, "web svid", func() bool { return svcCert(c.Client, "web") != nil })
		err := c.obtainService(ctx, "db")
		if apiStatus(err) != http.StatusForbidden || !strings.Contains(err.Error(), "not granted") {
			t.Errorf("ungranted service: %v, want 403 not granted", err)
		}
		if svcCert(c.Client, "db") != nil {
			t.Error("got an svid for an ungranted service")
		}
		eventually(t, 10*time.Second, "the refusal recorded", func() bool {
			return strings.Contains(c.Failures()["db"], "not granted")
		})
		if _, ok := c.Failures()["web"]; ok {
			t.Errorf("a granted service is listed as failing: %v", c.Failures())
		}
		select {
		case <-c.Ready():
			t.Error("ready without the db svid")
		default:
		}
	})

	t.Run("csr for another trust domain", func(t *testing.T) {
		tok, _ := ca.CreateToken("n8", nil, 0)
		c, _ := newTestClient(t, ClientOptions{NodeName: "n8", DB: openDB(t, ""), Token: tok})
		roots, err := c.fetchRoots(ctx, ca.url, ca.Fingerprint())
		if err != nil {
			t.Fatal(err)
		}
		_ = c.setRoots(ca.url, roots)
		_, csr, _ := newCSR("spiffe://other.example/node/n8")
		var resp api.SignResponse
		req := api.SignRequest{CsrPEM: api.CertificateRequest{CertificateRequest: csr}, OTT: tok}
		if err := c.post(ctx, ca.url+signPath, req, &resp); apiStatus(err) != http.StatusForbidden {
			t.Errorf("join csr for other.example: %v, want 403", err)
		}
		// And a joined node asking for a service in another trust domain.
		tok, _ = ca.CreateToken("n9", []string{"web"}, 0)
		j := startClient(t, ClientOptions{NodeName: "n9", DB: openDB(t, ""), Token: tok})
		waitReady(t, j.Client)
		_, csr, _ = newCSR("spiffe://other.example/svc/web")
		if _, err := j.requestService(ctx, csr); apiStatus(err) != http.StatusBadRequest || !strings.Contains(err.Error(), "trust domain") {
			t.Errorf("service csr for other.example: %v, want 400 trust domain", err)
		}
		_, csr, _ = newCSR(NodeID(testTD, "other"))
		if _, err := j.requestService(ctx, csr); apiStatus(err) != http.StatusForbidden {
			t.Errorf("node csr on the service endpoint: %v, want 403", err)
		}
	})

	t.Run("service endpoint without node svid", func(t *testing.T) {
		c, _ := newTestClient(t, ClientOptions{NodeName: "n10", DB: openDB(t, "")})
		roots, _ := c.fetchRoots(ctx, ca.url, ca.Fingerprint())
		_ = c.setRoots(ca.url, roots)
		_, csr, _ := newCSR(ServiceID(testTD, "web"))
		if _, err := c.requestService(ctx, csr); apiStatus(err) != http.StatusUnauthorized {
			t.Errorf("no client cert: %v, want 401", err)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		for _, n := range []string{"", "A", "a/b", "-x", strings.Repeat("a", 64)} {
			if _, err := ca.CreateToken(n, nil, 0); err == nil {
				t.Errorf("CreateToken(%q) accepted", n)
			}
		}
		if _, err := ca.CreateToken("ok", []string{"Bad"}, 0); err == nil {
			t.Error("CreateToken accepted a bad service name")
		}
		if _, err := ca.CreateToken("ok", nil, -time.Second); err == nil {
			t.Error("CreateToken accepted a negative ttl")
		}
		for _, tok := range []string{"garbage", "a.b.c", ""} {
			c, err := newTestClient(t, ClientOptions{NodeName: "x", DB: openDB(t, ""), Token: tok})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.step(ctx); err == nil {
				t.Errorf("token %q accepted", tok)
			}
		}
	})
}

func TestRevoke(t *testing.T) {
	var logBuf lockedBuffer
	ca := startCA(t, initDir(t), "", func(o *ServerOptions) {
		o.Logger = slog.New(slog.NewTextHandler(&logBuf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	ctx := context.Background()
	tok, _ := ca.CreateToken("r1", []string{"web"}, 0)
	c := startClient(t, ClientOptions{NodeName: "r1", Services: []string{"web"}, DB: openDB(t, ""), Token: tok})
	waitReady(t, c.Client)
	c.stop()
	cur := c.node
	if err := c.obtainNode(ctx, cur); err != nil {
		t.Fatalf("renewal before revoke: %v", err)
	}
	if _, err := ca.Revoke("r1", false); err != nil {
		t.Fatal(err)
	}
	if err := c.obtainNode(ctx, c.node); apiStatus(err) != http.StatusUnauthorized {
		t.Errorf("renewal after revoke: %v, want 401", err)
	}
	// Issue 15: the refusal is logged in one line, without the stack
	// trace smallstep's errors carry.
	logged := logBuf.String()
	if !strings.Contains(logged, "refused") || strings.Contains(logged, ".go:") || strings.Contains(logged, "\n\t") {
		t.Errorf("the CA's log of a refused renewal:\n%s", logged)
	}
	if err := c.obtainService(ctx, "web"); apiStatus(err) != http.StatusForbidden || !strings.Contains(err.Error(), "revoked") {
		t.Errorf("service svid after revoke: %v, want 403 revoked", err)
	}
	// Service SVIDs never renew through smallstep's route.
	svc := c.svcs["web"].cert
	c.mu.Lock()
	c.node.cert = svc
	c.mu.Unlock()
	if err := c.obtainNode(ctx, c.node); apiStatus(err) != http.StatusUnauthorized && apiStatus(err) != http.StatusForbidden {
		t.Errorf("node renewal with a service svid: %v, want 401 or 403", err)
	}
	if _, ok := ca.NodeServices("r1"); ok {
		t.Error("NodeServices reports a revoked node")
	}
}

// TestRenewal: with a 6s lifetime the host renews on its own; a connection
// made after renewal presents the new certificate while an earlier one
// stays up.
func TestRenewal(t *testing.T) {
	ca := startCA(t, initDir(t), "", withLifetime(6*time.Second))
	tok, _ := ca.CreateToken("w", []string{"web"}, 0)
	web := startClient(t, ClientOptions{NodeName: "w", Services: []string{"web"}, DB: openDB(t, ""), Token: tok})
	tok, _ = ca.CreateToken("a", nil, 0)
	app := startClient(t, ClientOptions{NodeName: "a", DB: openDB(t, ""), Token: tok})
	waitReady(t, web.Client)
	waitReady(t, app.Client)

	m := serveMesh(t, web.Client)
	early, _, first := dialMesh(t, m, app.Client, "web")
	if err := echo(early, "before"); err != nil {
		t.Fatal(err)
	}
	firstNode := nodeCert(web.Client)
	eventually(t, 15*time.Second, "service svid renewal", func() bool {
		c := svcCert(web.Client, "web")
		return c != nil && c.SerialNumber.Cmp(first.SerialNumber) != 0
	})
	if n := nodeCert(web.Client); n.SerialNumber.Cmp(firstNode.SerialNumber) == 0 {
		t.Error("service svid renewed before the node svid")
	}
	late, id, second := dialMesh(t, m, app.Client, "web")
	if id != ServiceID(testTD, "web") || second.SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Errorf("new connection: id %s serial %v, want svc/web with a new serial", id, second.SerialNumber)
	}
	if err := echo(late, "after"); err != nil {
		t.Fatal(err)
	}
	if err := echo(early, "still up"); err != nil {
		t.Errorf("earlier connection broke after renewal: %v", err)
	}
	// Keeps renewing: a few lifetimes later everything is still valid.
	eventually(t, 20*time.Second, "third generation", func() bool {
		return web.refresh != nil && metricValue(web.refresh) >= 6
	})
	for _, st := range web.Status() {
		if !time.Now().Before(st.NotAfter) {
			t.Errorf("%s expired at %s", st.ID, st.NotAfter)
		}
	}
}

// TestCAOutage: with the CA down the client keeps its certificates and
// retries; when the CA returns it recovers.
func TestCAOutage(t *testing.T) {
	dir := initDir(t)
	ca := startCA(t, dir, "", withLifetime(9*time.Second))
	tok, _ := ca.CreateToken("o", []string{"web"}, 0)
	c := startClient(t, ClientOptions{NodeName: "o", Services: []string{"web"}, DB: openDB(t, ""), Token: tok})
	waitReady(t, c.Client)
	before := nodeCert(c.Client)
	ca.stop()
	eventually(t, 15*time.Second, "a failed renewal", func() bool { return metricValue(c.failed) >= 2 })
	if n := nodeCert(c.Client); n == nil || n.SerialNumber.Cmp(before.SerialNumber) != 0 {
		t.Fatal("client lost or replaced its certificate while the ca was down")
	}
	if _, err := c.GetCertificate(nil); err != nil {
		t.Fatalf("GetCertificate with the ca down: %v", err)
	}
	startCA(t, dir, ca.addr, withLifetime(9*time.Second))
	eventually(t, 15*time.Second, "renewal after the ca returned", func() bool {
		n := nodeCert(c.Client)
		s := svcCert(c.Client, "web")
		return n.SerialNumber.Cmp(before.SerialNumber) != 0 && s != nil && s.NotAfter.After(n.NotAfter.Add(-2*time.Second))
	})
}

// TestRestart: a host restarted with the same bbolt file keeps its identity
// without a token, and renews.
func TestRestart(t *testing.T) {
	ca := startCA(t, initDir(t), "")
	dbPath := filepath.Join(t.TempDir(), "node.db")
	tok, _ := ca.CreateToken("s", []string{"web"}, 0)
	db := openDB(t, dbPath)
	c := startClient(t, ClientOptions{NodeName: "s", Services: []string{"web"}, DB: db, Token: tok})
	waitReady(t, c.Client)
	orig := nodeCert(c.Client)
	c.stop()
	db.Close()

	db = openDB(t, dbPath)
	c2, err := newTestClient(t, ClientOptions{NodeName: "s", Services: []string{"web"}, DB: db, Token: tok /* used: must not matter */})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-c2.Ready():
	default:
		t.Fatal("restored client not ready before Run")
	}
	if n := nodeCert(c2); n == nil || n.SerialNumber.Cmp(orig.SerialNumber) != 0 {
		t.Fatal("restored client does not hold the persisted node certificate")
	}
	if _, err := c2.GetCertificate(nil); err != nil {
		t.Fatal(err)
	}
	// Renews without a token.
	c2.token = ""
	if err := c2.obtainNode(context.Background(), c2.node); err != nil {
		t.Fatalf("renewal after restart: %v", err)
	}
	if n := nodeCert(c2); n.URIs[0].String() != NodeID(testTD, "s") || n.SerialNumber.Cmp(orig.SerialNumber) == 0 {
		t.Errorf("after renewal: %v %v", n.URIs, n.SerialNumber)
	}
	// SetServices drops a service from memory and from the DB.
	if err := c2.SetServices(nil); err != nil {
		t.Fatal(err)
	}
	c2.Close()
	db.Close()
	db = openDB(t, dbPath)
	c3, err := newTestClient(t, ClientOptions{NodeName: "s", Services: []string{"web"}, DB: db})
	if err != nil {
		t.Fatal(err)
	}
	if svcCert(c3, "web") != nil {
		t.Error("dropped service svid still persisted")
	}
	if nodeCert(c3) == nil {
		t.Error("node svid lost")
	}
}

// TestTwoCAs: two hosts sharing the CA directory both issue, and a node that
// joined through one renews through the other.
func TestTwoCAs(t *testing.T) {
	dirA := initDir(t)
	dirB := filepath.Join(t.TempDir(), "ca")
	if err := os.MkdirAll(dirB, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{RootCertFile, IntermediateCertFile, IntermediateKeyFile, JoinKeyFile} {
		b, err := os.ReadFile(filepath.Join(dirA, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dirB, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	a := startCA(t, dirA, "")
	b := startCA(t, dirB, "")
	if a.Fingerprint() != b.Fingerprint() {
		t.Fatal("different roots")
	}
	tokA, _ := a.CreateToken("na", []string{"web"}, 0)
	tokB, _ := b.CreateToken("nb", []string{"db"}, 0)
	na := startClient(t, ClientOptions{NodeName: "na", Services: []string{"web"}, DB: openDB(t, ""), Token: tokA})
	nb := startClient(t, ClientOptions{NodeName: "nb", Services: []string{"db"}, DB: openDB(t, ""), Token: tokB})
	waitReady(t, na.Client)
	waitReady(t, nb.Client)
	svcFromA := na.svcs["web"].cert.Certificate
	// A token works only on the CA that minted it.
	tokA2, _ := a.CreateToken("nc", nil, 0)
	nc, _ := newTestClient(t, ClientOptions{NodeName: "nc", DB: openDB(t, ""), Token: tokA2, CAURL: b.url})
	if _, err := nc.step(context.Background()); apiStatus(err) != http.StatusUnauthorized {
		t.Errorf("token from A used on B: %v, want 401", err)
	}
	// na renews its node SVID through B.
	na.stop()
	na.opts.CAURL = b.url
	old := nodeCert(na.Client)
	if err := na.obtainNode(context.Background(), na.node); err != nil {
		t.Fatalf("renewing through the other ca: %v", err)
	}
	n := nodeCert(na.Client)
	if n.SerialNumber.Cmp(old.SerialNumber) == 0 {
		t.Error("not renewed")
	}
	// The renewed node SVID still carries A's grant, so B issues na's
	// granted service and refuses the others.
	if g, ok, err := certGrant(n); !ok || err != nil || len(g) != 1 || g[0] != "web" {
		t.Errorf("grant in renewed node svid: %v %v %v", g, ok, err)
	}
	if err := na.obtainService(context.Background(), "web"); err != nil {
		t.Errorf("service svid from the other ca: %v", err)
	}
	_, csr, _ := newCSR(ServiceID(testTD, "db"))
	if _, err := na.requestService(context.Background(), csr); apiStatus(err) != http.StatusForbidden {
		t.Errorf("ungranted service from the other ca: %v, want 403", err)
	}
	// Revoking a node the CA never heard of is an error unless it is known
	// as a member of the mesh.
	if _, err := b.Revoke("ghost", false); !errors.Is(err, ErrUnknownNode) {
		t.Errorf("revoking a node unknown to this CA: %v, want ErrUnknownNode", err)
	}
	// Issue 16: a revocation made on A, passed to B (gossip does that),
	// applies on B although the grant travels in na's certificate; and
	// proxies refuse na's node and service certificates.
	rev, err := a.Revoke("na", false)
	if err != nil {
		t.Fatal(err)
	}
	if err := na.obtainService(context.Background(), "web"); err != nil {
		t.Fatalf("service svid from B before it learned of the revocation: %v", err)
	}
	if _, err := b.ApplyRevocation(rev); err != nil {
		t.Fatal(err)
	}
	if err := na.obtainService(context.Background(), "web"); apiStatus(err) != http.StatusForbidden {
		t.Errorf("service svid from B after the revocation on A: %v, want 403", err)
	}
	if err := na.obtainNode(context.Background(), na.node); apiStatus(err) != http.StatusUnauthorized {
		t.Errorf("node renewal on B after the revocation on A: %v, want 401", err)
	}
	v := NewVerifier(nb.Roots, testTD)
	if _, err := v.Verify(na.node.cert.Certificate); err != nil {
		t.Fatalf("na's node certificate before the revocation reached the verifier: %v", err)
	}
	r, err := VerifyRevocation(rev, nb.Roots(), testTD)
	if err != nil {
		t.Fatal(err)
	}
	v.Revoke(r)
	if _, err := v.Verify(na.node.cert.Certificate); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Errorf("na's node certificate after the revocation: %v", err)
	}
	// The service SVID A issued na before the revocation is refused too.
	if _, err := v.Verify(svcFromA); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Errorf("na's service certificate from A after the revocation: %v", err)
	}
	forged := append([]byte(nil), rev...)
	forged[len(forged)/2] ^= 1
	if _, err := VerifyRevocation(forged, nb.Roots(), testTD); err == nil {
		t.Error("an altered revocation verified")
	}
	// Both hosts' SVIDs chain to the same roots: they talk mTLS.
	m := serveMesh(t, nb.Client)
	conn, id, _ := dialMesh(t, m, na.Client, "db")
	if id != ServiceID(testTD, "db") {
		t.Errorf("got %s", id)
	}
	if err := echo(conn, "x"); err != nil {
		t.Fatal(err)
	}
}

// TestLocalServer: a CA host issues for itself in-process, without a token.
func TestLocalServer(t *testing.T) {
	ca := startCA(t, initDir(t), "")
	c := startClient(t, ClientOptions{NodeName: "ca1", Services: []string{"api"}, DB: openDB(t, ""), LocalServer: ca.Server})
	waitReady(t, c.Client)
	if got := svcCert(c.Client, "api"); got == nil || got.URIs[0].String() != ServiceID(testTD, "api") {
		t.Fatalf("service svid: %v", got)
	}
	// It serves remote clients with the same roots.
	tok, _ := ca.CreateToken("r", nil, 0)
	r := startClient(t, ClientOptions{NodeName: "r", DB: openDB(t, ""), Token: tok})
	waitReady(t, r.Client)
	m := serveMesh(t, c.Client)
	_, id, _ := dialMesh(t, m, r.Client, "api")
	if id != ServiceID(testTD, "api") {
		t.Errorf("got %s", id)
	}
	// Outbound identity: the client presents a service SVID instead.
	o := startClient(t, ClientOptions{NodeName: "ca1", Services: []string{"api"}, DB: openDB(t, ""), LocalServer: ca.Server, OutboundIdentity: "api"})
	waitReady(t, o.Client)
	cert, err := o.GetClientCertificate(nil)
	if err != nil || cert.Leaf.URIs[0].String() != ServiceID(testTD, "api") {
		t.Errorf("outbound identity: %v %v", cert, err)
	}
}

func TestVerifySVID(t *testing.T) {
	ca := startCA(t, initDir(t), "")
	other := startCA(t, initDir(t), "")
	ctx := context.Background()
	issue := func(s *Server, tmpl func(*x509.CertificateRequest)) [][]byte {
		t.Helper()
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		u, _ := url.Parse(ServiceID(testTD, "x"))
		req := &x509.CertificateRequest{URIs: []*url.URL{u}}
		if tmpl != nil {
			tmpl(req)
		}
		der, err := x509.CreateCertificateRequest(rand.Reader, req, key)
		if err != nil {
			t.Fatal(err)
		}
		csr, _ := x509.ParseCertificateRequest(der)
		chain, err := s.issueToken(ctx, csr, csr.URIs[0].String())
		if err != nil {
			t.Fatal(err)
		}
		var raw [][]byte
		for _, c := range chain {
			raw = append(raw, c.Raw)
		}
		return raw
	}
	good := issue(ca.Server, nil)
	if id, err := VerifySVID(signDirect(t, ca.dir, nil), ca.Roots(), testTD); err != nil || id != ServiceID(testTD, "x") {
		t.Fatalf("directly signed control svid: %q %v", id, err)
	}
	if id, err := VerifySVID(good, ca.Roots(), testTD); err != nil || id != ServiceID(testTD, "x") {
		t.Errorf("good svid: %q %v", id, err)
	}
	for name, tc := range map[string]struct {
		raw   [][]byte
		roots *x509.CertPool
		td    string
	}{
		"other roots":        {good, other.Roots(), testTD},
		"wrong trust domain": {good, ca.Roots(), "other.example"},
		"no intermediate":    {good[:1], ca.Roots(), testTD},
		"empty":              {nil, ca.Roots(), testTD},
		"garbage":            {[][]byte{{1, 2, 3}}, ca.Roots(), testTD},
		"nil roots":          {good, nil, testTD},
		"two uris": {signDirect(t, ca.dir, func(c *x509.Certificate) {
			u, _ := url.Parse("spiffe://test.example/svc/y")
			c.URIs = append(c.URIs, u)
		}), ca.Roots(), testTD},
		"dns san":        {signDirect(t, ca.dir, func(c *x509.Certificate) { c.DNSNames = []string{"x.example"} }), ca.Roots(), testTD},
		"not spiffe":     {signDirect(t, ca.dir, func(c *x509.Certificate) { c.URIs[0], _ = url.Parse("https://test.example/svc/x") }), ca.Roots(), testTD},
		"code signing":   {signDirect(t, ca.dir, func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning} }), ca.Roots(), testTD},
		"expired":        {signDirect(t, ca.dir, func(c *x509.Certificate) { c.NotAfter = time.Now().Add(-time.Minute) }), ca.Roots(), testTD},
		"self-signed ca": {[][]byte{other.root.Raw}, other.Roots(), testTD},
	} {
		if id, err := VerifySVID(tc.raw, tc.roots, tc.td); err == nil {
			t.Errorf("%s: accepted as %q", name, id)
		}
	}
	// An intermediate presented as the leaf is not an SVID.
	inter, _ := readCertFile(filepath.Join(ca.dir, IntermediateCertFile))
	if _, err := VerifySVID([][]byte{inter.Raw}, ca.Roots(), testTD); err == nil {
		t.Error("accepted the intermediate")
	}
}

// signDirect signs a service SVID for svc/x with the intermediate of dir,
// after mod changes the template, and returns the chain as presented in TLS.
func signDirect(t *testing.T, dir string, mod func(*x509.Certificate)) [][]byte {
	t.Helper()
	inter, err := readCertFile(filepath.Join(dir, IntermediateCertFile))
	if err != nil {
		t.Fatal(err)
	}
	ikey, err := readKeyFile(filepath.Join(dir, IntermediateKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(ServiceID(testTD, "x"))
	tmpl := &x509.Certificate{
		SerialNumber: randSerial(),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		URIs:         []*url.URL{u},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	if mod != nil {
		mod(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, inter, &key.PublicKey, ikey)
	if err != nil {
		t.Fatal(err)
	}
	return [][]byte{der, inter.Raw}
}

// TestMalformedRequests: garbage to the API gets clear 4xx answers.
func TestMalformedRequests(t *testing.T) {
	ca := startCA(t, initDir(t), "")
	tok, _ := ca.CreateToken("m", []string{"web"}, 0)
	c := startClient(t, ClientOptions{NodeName: "m", DB: openDB(t, ""), Token: tok})
	waitReady(t, c.Client)
	ctx := context.Background()
	for _, tc := range []struct {
		path string
		body any
		want int
	}{
		{signPath, map[string]string{"ott": ""}, http.StatusBadRequest},
		{signPath, "not an object", http.StatusBadRequest},
		{signPath, map[string]string{"ott": "x.y.z", "csr": "nope"}, http.StatusUnauthorized},
		{svidPath, map[string]string{"csr": "nope"}, http.StatusBadRequest},
		{svidPath, 42, http.StatusBadRequest},
		{svidPath, map[string]string{"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}, http.StatusBadRequest},
		{"/1.0/rekey", map[string]string{"csr": "nope"}, http.StatusBadRequest},
		{"/1.0/revoke", map[string]string{}, http.StatusMethodNotAllowed}, // not mounted: 404 or 405
	} {
		var out map[string]any
		err := c.post(ctx, ca.url+tc.path, tc.body, &out)
		got := apiStatus(err)
		if tc.path == "/1.0/revoke" {
			if got != http.StatusNotFound && got != http.StatusMethodNotAllowed {
				t.Errorf("%s: %v, want not mounted", tc.path, err)
			}
			continue
		}
		if got != tc.want {
			t.Errorf("%s %v: %v, want %d", tc.path, tc.body, err, tc.want)
		}
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
