package ca

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.etcd.io/bbolt"
)

// metricValue reads a counter or gauge.
func metricValue(m prometheus.Metric) float64 {
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		return -1
	}
	if d.Counter != nil {
		return d.Counter.GetValue()
	}
	return d.Gauge.GetValue()
}

// gatherCount counts the series of a metric family in reg.
func gatherCount(reg *prometheus.Registry, name string) (int, error) {
	mfs, err := reg.Gather()
	if err != nil {
		return 0, err
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return len(mf.GetMetric()), nil
		}
	}
	return 0, nil
}

const testTD = "test.example"

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

// clock is a settable offset from the real time.
type clock struct{ off atomic.Int64 }

func (c *clock) Now() time.Time        { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *clock) Set(off time.Duration) { c.off.Store(int64(off)) }
func newClock() *clock                 { return &clock{} }

type testCA struct {
	*Server
	dir, dbPath, addr, url string
	clock                  *clock
	cancel                 context.CancelFunc
	done                   chan error
}

type caOpt func(*ServerOptions)

func withLifetime(d time.Duration) caOpt {
	return func(o *ServerOptions) { o.Config.CertLifetime = d; o.Backdate = time.Second }
}

// initDir makes a CA directory for testTD.
func initDir(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := Init(dir, testTD); err != nil {
		t.Fatal(err)
	}
	return dir
}

// startCA starts a CA from dir on addr ("" = a fresh loopback port).
func startCA(t testing.TB, dir, addr string, opts ...caOpt) *testCA {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ca := &testCA{dir: dir, dbPath: filepath.Join(dir, "..", "ca-"+filepath.Base(dir)+".db"),
		addr: ln.Addr().String(), clock: newClock()}
	ca.url = "https://" + ca.addr
	o := ServerOptions{
		Config:   Config{TrustDomain: testTD, CertLifetime: time.Hour},
		Dir:      dir,
		DBPath:   ca.dbPath,
		URL:      ca.url,
		Listener: ln,
		Logger:   testLogger(t),
		Now:      ca.clock.Now,
	}
	for _, f := range opts {
		f(&o)
	}
	s, err := NewServer(o)
	if err != nil {
		ln.Close()
		t.Fatal(err)
	}
	ca.Server = s
	ctx, cancel := context.WithCancel(context.Background())
	ca.cancel = cancel
	ca.done = make(chan error, 1)
	go func() { ca.done <- s.Run(ctx) }()
	t.Cleanup(ca.stop)
	return ca
}

func (c *testCA) stop() {
	c.cancel()
	<-c.done
	c.done <- nil // later stops return at once
}

func openDB(t testing.TB, path string) *bbolt.DB {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "node.db")
	}
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

type testClient struct {
	*Client
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once
}

func (c *testClient) stop() {
	c.once.Do(func() {
		c.cancel()
		<-c.done
		c.Close()
	})
}

func startClient(t testing.TB, o ClientOptions) *testClient {
	t.Helper()
	c, err := newTestClient(t, o)
	if err != nil {
		t.Fatal(err)
	}
	return runClient(t, c)
}

func newTestClient(t testing.TB, o ClientOptions) (*Client, error) {
	if o.Config.TrustDomain == "" {
		o.Config.TrustDomain = testTD
	}
	if o.Logger == nil {
		o.Logger = testLogger(t)
	}
	if o.RetryMin == 0 {
		o.RetryMin = 100 * time.Millisecond
		o.RetryMax = 500 * time.Millisecond
	}
	return NewClient(o)
}

func runClient(t testing.TB, c *Client) *testClient {
	ctx, cancel := context.WithCancel(context.Background())
	tc := &testClient{Client: c, cancel: cancel, done: make(chan struct{})}
	go func() { defer close(tc.done); _ = c.Run(ctx) }()
	t.Cleanup(tc.stop)
	return tc
}

func waitReady(t testing.TB, c *Client) {
	t.Helper()
	select {
	case <-c.Ready():
	case <-time.After(20 * time.Second):
		t.Fatalf("client %s not ready after 20s; status %+v", c.NodeID(), c.Status())
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func nodeCert(c *Client) *x509.Certificate {
	cert, err := c.GetClientCertificate(nil)
	if err != nil {
		return nil
	}
	return cert.Leaf
}

func svcCert(c *Client, svc string) *x509.Certificate {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if id, ok := c.svcs[svc]; ok {
		return id.cert.Leaf
	}
	return nil
}

// meshPair serves mTLS on loopback with srv's certificates; dial connects
// with cli's. Both sides verify with VerifySVID.
type meshServer struct {
	ln      net.Listener
	peerIDs chan string
	conns   sync.WaitGroup
}

func serveMesh(t testing.TB, srv *Client) *meshServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &meshServer{ln: ln, peerIDs: make(chan string, 16)}
	conf := &tls.Config{
		GetCertificate:     srv.GetCertificate,
		ClientAuth:         tls.RequireAnyClientCert,
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, err := VerifySVID(raw, srv.Roots(), srv.TrustDomain())
			if err != nil {
				return err
			}
			m.peerIDs <- id
			return nil
		},
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			m.conns.Add(1)
			go func() {
				defer m.conns.Done()
				tc := tls.Server(c, conf)
				defer tc.Close()
				_, _ = io.Copy(tc, tc) // echo
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); m.conns.Wait() })
	return m
}

// dialMesh connects to m as cli, asking for service sni, and returns the
// connection and the server's verified SPIFFE ID and leaf.
func dialMesh(t testing.TB, m *meshServer, cli *Client, sni string) (*tls.Conn, string, *x509.Certificate) {
	t.Helper()
	var id string
	conf := &tls.Config{
		ServerName:           sni,
		InsecureSkipVerify:   true,
		MinVersion:           tls.VersionTLS13,
		GetClientCertificate: cli.GetClientCertificate,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			var err error
			id, err = VerifySVID(raw, cli.Roots(), cli.TrustDomain())
			return err
		},
	}
	c, err := tls.Dial("tcp", m.ln.Addr().String(), conf)
	if err != nil {
		t.Fatalf("mesh dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, id, c.ConnectionState().PeerCertificates[0]
}

func echo(c *tls.Conn, msg string) error {
	if err := c.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return err
	}
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return errors.New("echo mismatch")
	}
	return nil
}

func apiStatus(err error) int {
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.Status
	}
	return 0
}
