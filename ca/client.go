package ca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/smallstep/certificates/api"
	"go.etcd.io/bbolt"
)

// identityBucket is the bucket of the node's bbolt file where the client keeps
// its CA URL, roots, and each identity's key and chain.
var identityBucket = []byte("ca/identity")

const (
	keyURL   = "url"
	keyRoots = "roots"
	keyNode  = "node"
	svcKey   = "svc/"

	renewJitter     = 0.05 // ±5% of the lifetime around 2/3
	defaultRetryMin = time.Second
	defaultRetryMax = 2 * time.Minute
)

// ClientOptions configure a Client.
type ClientOptions struct {
	// Config is the [ca] section. Required: TrustDomain. URL and Token are
	// used unless CAURL/Token below are set.
	Config Config
	// NodeName is this host's node name (spiffe://TD/node/NodeName). Required.
	NodeName string
	// Services are the local services to get SVIDs for. Optional.
	Services []string
	// DB is the node's bbolt database, where the identity persists (bucket
	// "ca/identity", written 0600 by bbolt's file mode). Required.
	DB *bbolt.DB
	// Token is a join token, used only when the DB holds no usable node
	// identity. Optional; overrides Config.Token (node reads token_file).
	Token string
	// CAURL overrides the CA URL from Config.URL and from the token.
	// Optional.
	CAURL string
	// LocalServer, on a CA-holding host, issues this host's certificates
	// in-process; no token is needed. Optional.
	LocalServer *Server
	// OutboundIdentity names a local service whose SVID
	// GetClientCertificate presents instead of the node SVID. Optional.
	OutboundIdentity string
	// RetryMin and RetryMax bound the backoff when the CA cannot be
	// reached. Zero means 1s and 2m.
	RetryMin, RetryMax time.Duration
	// Logger is optional (default: discard).
	Logger *slog.Logger
	// Registerer is optional; nil registers no metrics.
	Registerer prometheus.Registerer
	// Now is the clock (optional, default time.Now).
	Now func() time.Time
}

// Client holds this host's SVIDs, gets them from the CA, renews them, and
// serves them to TLS through GetCertificate / GetClientCertificate.
type Client struct {
	opts   ClientOptions
	log    *slog.Logger
	now    func() time.Time
	td     string
	nodeID string
	token  string
	httpc  *http.Client

	mu        sync.RWMutex
	url       string
	rootCerts []*x509.Certificate
	roots     *x509.CertPool
	node      *identity
	svcs      map[string]*identity
	want      []string
	failures  map[string]string // service ("" for the node) -> why the latest request failed

	ready     chan struct{}
	readyOnce sync.Once
	wake      chan struct{}
	closeOnce sync.Once

	expiry  *prometheus.GaugeVec
	refresh prometheus.Counter
	failed  prometheus.Counter
}

type identity struct {
	id      string
	cert    *tls.Certificate
	renewAt time.Time
}

func (i *identity) notAfter() time.Time { return i.cert.Leaf.NotAfter }

// IdentityStatus describes one held certificate, for `vmesh check`.
type IdentityStatus struct {
	ID        string    `json:"id"`
	Service   string    `json:"service,omitempty"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	RenewAt   time.Time `json:"renew_at"`
}

// NewClient checks its options and loads any identity persisted in the DB,
// so GetCertificate works before Run when the host has joined before.
func NewClient(o ClientOptions) (*Client, error) {
	td := o.Config.TrustDomain
	switch {
	case !ValidTrustDomain(td):
		return nil, fmt.Errorf("creating ca client: invalid trust domain %q", td)
	case !ValidName(o.NodeName):
		return nil, fmt.Errorf("creating ca client: invalid node name %q", o.NodeName)
	case o.DB == nil:
		return nil, errors.New("creating ca client: no database")
	case o.RetryMin < 0 || o.RetryMax < 0:
		return nil, errors.New("creating ca client: negative retry bounds")
	}
	want, err := cleanServices(o.Services)
	if err != nil {
		return nil, fmt.Errorf("creating ca client: %w", err)
	}
	if o.OutboundIdentity != "" && !ValidName(o.OutboundIdentity) {
		return nil, fmt.Errorf("creating ca client: invalid outbound identity %q", o.OutboundIdentity)
	}
	if o.LocalServer != nil && o.LocalServer.td != td {
		return nil, fmt.Errorf("creating ca client: local ca is for trust domain %q, not %q", o.LocalServer.td, td)
	}
	c := &Client{
		opts: o, log: o.Logger, now: o.Now, td: td,
		nodeID:   NodeID(td, o.NodeName),
		token:    strings.TrimSpace(o.Token),
		svcs:     map[string]*identity{},
		failures: map[string]string{},
		want:     want,
		ready:    make(chan struct{}),
		wake:     make(chan struct{}, 1),
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	c.log = c.log.With("component", "ca-client", "node", o.NodeName)
	if c.now == nil {
		c.now = time.Now
	}
	if c.token == "" {
		c.token = strings.TrimSpace(o.Config.Token)
	}
	if c.opts.RetryMin == 0 {
		c.opts.RetryMin = defaultRetryMin
	}
	if c.opts.RetryMax == 0 {
		c.opts.RetryMax = defaultRetryMax
	}
	c.expiry = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "identity_cert_expiration_timestamp_seconds",
		Help: "NotAfter of the certificate held for each identity, in seconds since the epoch.",
	}, []string{"identity"})
	c.refresh = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "identity_cert_refresh_total",
		Help: "Certificates obtained from the CA (first issuance and renewals).",
	})
	c.failed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "identity_cert_refresh_errors_total",
		Help: "Failed attempts to obtain a certificate from the CA.",
	})
	if r := o.Registerer; r != nil {
		for _, m := range []prometheus.Collector{c.expiry, c.refresh, c.failed} {
			if err := r.Register(m); err != nil {
				return nil, fmt.Errorf("creating ca client: registering metrics: %w", err)
			}
		}
	}
	c.httpc = &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives:   true, // each request presents the current node svid
			TLSHandshakeTimeout: 10 * time.Second,
			TLSClientConfig: &tls.Config{
				MinVersion:            tls.VersionTLS12,
				InsecureSkipVerify:    true, // verified below: pinned roots, spiffe://TD/ca
				VerifyPeerCertificate: c.verifyCA,
				GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
					c.mu.RLock()
					defer c.mu.RUnlock()
					if c.node == nil {
						return &tls.Certificate{}, nil
					}
					return c.node.cert, nil
				},
			},
		},
	}
	if err := c.load(); err != nil {
		return nil, fmt.Errorf("creating ca client: %w", err)
	}
	return c, nil
}

func cleanServices(in []string) ([]string, error) {
	out := slices.Clone(in)
	for _, s := range out {
		if !ValidName(s) {
			return nil, fmt.Errorf("invalid service name %q", s)
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// TrustDomain returns the trust domain.
func (c *Client) TrustDomain() string { return c.td }

// NodeID returns this host's SPIFFE ID.
func (c *Client) NodeID() string { return c.nodeID }

// Roots returns the mesh roots (nil until the host has joined).
func (c *Client) Roots() *x509.CertPool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.roots
}

// Ready is closed once the node SVID and every declared service's SVID are
// held. It is closed once; services added later by SetServices do not reopen it.
func (c *Client) Ready() <-chan struct{} { return c.ready }

// GetCertificate is for tls.Config.GetCertificate on the inbound side: the
// SVID of the service named by SNI, else the node SVID.
func (c *Client) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if hello != nil && hello.ServerName != "" {
		if id, ok := c.svcs[hello.ServerName]; ok {
			return id.cert, nil
		}
	}
	if c.node == nil {
		return nil, errors.New("no node certificate yet: the host has not joined the mesh")
	}
	return c.node.cert, nil
}

// GetClientCertificate is for tls.Config.GetClientCertificate on the
// outbound side: the node SVID, or the OutboundIdentity service's SVID.
func (c *Client) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if s := c.opts.OutboundIdentity; s != "" {
		if id, ok := c.svcs[s]; ok {
			return id.cert, nil
		}
	}
	if c.node == nil {
		return nil, errors.New("no node certificate yet: the host has not joined the mesh")
	}
	return c.node.cert, nil
}

// Expired says which held certificate has expired, and since when, or ""
// when none has: mTLS with an expired certificate fails, so the host is not
// ready (the agent's /ready and `vmesh check` show this reason).
func (c *Client) Expired() string {
	now := c.now()
	c.mu.RLock()
	defer c.mu.RUnlock()
	ids := make([]*identity, 0, len(c.svcs)+1)
	if c.node != nil {
		ids = append(ids, c.node)
	}
	for _, s := range c.want {
		if id := c.svcs[s]; id != nil {
			ids = append(ids, id)
		}
	}
	for _, id := range ids {
		if !now.Before(id.notAfter()) {
			return fmt.Sprintf("certificate %s expired at %s; waiting for the ca to renew it", id.id, id.notAfter().Format(time.RFC3339))
		}
	}
	return ""
}

// Status lists the held identities, node first, then services by name.
func (c *Client) Status() []IdentityStatus {
	c.mu.RLock()
	defer c.mu.RUnlock()
	var out []IdentityStatus
	if c.node != nil {
		out = append(out, statusOf(c.node, ""))
	}
	names := make([]string, 0, len(c.svcs))
	for n := range c.svcs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		out = append(out, statusOf(c.svcs[n], n))
	}
	return out
}

// Failures says why the latest request for a certificate failed, by
// service ("" for the node certificate); a service whose latest request
// succeeded is absent. A service the CA refuses stays here with the CA's
// reason until it is granted or no longer declared.
func (c *Client) Failures() map[string]string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make(map[string]string, len(c.failures))
	for k, v := range c.failures {
		if k == "" || slices.Contains(c.want, k) {
			out[k] = v
		}
	}
	return out
}

func (c *Client) noteFailure(svc string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil {
		delete(c.failures, svc)
		return
	}
	c.failures[svc] = err.Error()
}

func statusOf(i *identity, svc string) IdentityStatus {
	return IdentityStatus{ID: i.id, Service: svc, NotBefore: i.cert.Leaf.NotBefore,
		NotAfter: i.cert.Leaf.NotAfter, RenewAt: i.renewAt}
}

// SetServices replaces the declared services (reload): new ones are fetched,
// removed ones dropped from memory and the DB.
func (c *Client) SetServices(services []string) error {
	want, err := cleanServices(services)
	if err != nil {
		return fmt.Errorf("setting services: %w", err)
	}
	c.mu.Lock()
	c.want = want
	var drop []string
	for n, id := range c.svcs {
		if !slices.Contains(want, n) {
			drop = append(drop, n)
			delete(c.svcs, n)
			c.expiry.DeleteLabelValues(id.id)
		}
	}
	c.mu.Unlock()
	if len(drop) > 0 {
		err := c.opts.DB.Update(func(tx *bbolt.Tx) error {
			b := tx.Bucket(identityBucket)
			if b == nil {
				return nil
			}
			for _, n := range drop {
				if err := b.Delete([]byte(svcKey + n)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("setting services: forgetting %v: %w", drop, err)
		}
		c.log.Info("service identities dropped", "services", drop)
	}
	c.poke()
	return nil
}

func (c *Client) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// Close releases idle connections. Idempotent; Run ends with its context.
func (c *Client) Close() error {
	c.closeOnce.Do(func() { c.httpc.CloseIdleConnections() })
	return nil
}

// Run obtains and renews the certificates until ctx is done. When the CA
// cannot be reached it keeps the current certificates and retries with
// backoff, logging at error level once expiry is near.
func (c *Client) Run(ctx context.Context) error {
	backoff := c.opts.RetryMin
	for {
		next, err := c.step(ctx)
		var wait time.Duration
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			c.logFailure(err)
			wait = jitter(backoff)
			backoff = min(2*backoff, c.opts.RetryMax)
			if d := next.Sub(c.now()); !next.IsZero() && d < wait && d > 0 {
				wait = d
			}
		} else {
			backoff = c.opts.RetryMin
			wait = max(next.Sub(c.now()), 0)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-c.wake:
			t.Stop()
		case <-t.C:
		}
	}
}

func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	n, err := rand.Int(rand.Reader, big.NewInt(int64(d/5)+1))
	if err != nil {
		return d
	}
	return d - d/10 + time.Duration(n.Int64())
}

func (c *Client) logFailure(err error) {
	c.failed.Inc()
	now := c.now()
	c.mu.RLock()
	ids := []*identity{}
	if c.node != nil {
		ids = append(ids, c.node)
	}
	for _, id := range c.svcs {
		ids = append(ids, id)
	}
	c.mu.RUnlock()
	var soonest *identity
	for _, id := range ids {
		if soonest == nil || id.notAfter().Before(soonest.notAfter()) {
			soonest = id
		}
	}
	if soonest == nil {
		c.log.Error("cannot get certificates from the ca; retrying", "err", err)
		return
	}
	left := soonest.notAfter().Sub(now)
	life := soonest.cert.Leaf.NotAfter.Sub(soonest.cert.Leaf.NotBefore)
	switch {
	case left <= 0:
		c.log.Error("CERTIFICATE EXPIRED and the ca cannot renew it; mTLS to and from this host fails", "identity", soonest.id, "expired_at", soonest.notAfter(), "err", err)
	case left < life/6:
		c.log.Error("certificate expires soon and the ca cannot renew it; retrying", "identity", soonest.id, "expires_in", left.Round(time.Second), "err", err)
	default:
		c.log.Warn("certificate renewal failed; keeping the current certificates and retrying", "err", err)
	}
}

// step does whatever is due and returns when the next renewal is due.
func (c *Client) step(ctx context.Context) (time.Time, error) {
	now := c.now()
	c.mu.RLock()
	node := c.node
	want := slices.Clone(c.want)
	var due []string
	var dueSoon bool
	for _, s := range want {
		id, ok := c.svcs[s]
		if !ok || !now.Before(id.renewAt) {
			due = append(due, s)
		}
	}
	c.mu.RUnlock()
	if node != nil {
		life := node.cert.Leaf.NotAfter.Sub(node.cert.Leaf.NotBefore)
		// Renew the node first when services are due and it is nearly due.
		dueSoon = len(due) > 0 && !now.Before(node.renewAt.Add(-life/10))
	}
	if node == nil || !now.Before(node.renewAt) || dueSoon || (c.token != "" && !now.Before(node.notAfter())) {
		err := c.obtainNode(ctx, node)
		c.noteFailure("", err)
		if err != nil {
			return c.nextDue(), err
		}
	}
	var errs []error
	for _, s := range due {
		err := c.obtainService(ctx, s)
		c.noteFailure(s, err)
		if err != nil {
			errs = append(errs, err)
		}
	}
	c.checkReady()
	return c.nextDue(), errors.Join(errs...)
}

func (c *Client) nextDue() time.Time {
	c.mu.RLock()
	defer c.mu.RUnlock()
	var next time.Time
	if c.node != nil {
		next = c.node.renewAt
	}
	for _, id := range c.svcs {
		if next.IsZero() || id.renewAt.Before(next) {
			next = id.renewAt
		}
	}
	return next
}

// checkReady closes Ready once the node SVID and every wanted service SVID
// are held and none has expired (certificates restored from the database
// after a long outage do not make a host ready).
func (c *Client) checkReady() {
	c.mu.RLock()
	ok := c.node != nil
	for _, s := range c.want {
		if _, have := c.svcs[s]; !have {
			ok = false
		}
	}
	c.mu.RUnlock()
	if ok && c.Expired() != "" {
		ok = false
	}
	if ok {
		c.readyOnce.Do(func() {
			c.log.Info("identity ready", "id", c.nodeID)
			close(c.ready)
		})
	}
}

// obtainNode gets the node SVID: in-process from a local CA, by rekeying
// the current one, or by joining with the token.
func (c *Client) obtainNode(ctx context.Context, cur *identity) error {
	key, csr, err := newCSR(c.nodeID)
	if err != nil {
		return err
	}
	var chain []*x509.Certificate
	switch {
	case c.opts.LocalServer != nil:
		if err := c.setRoots("", []*x509.Certificate{c.opts.LocalServer.root}); err != nil {
			return err
		}
		c.mu.RLock()
		want := slices.Clone(c.want)
		c.mu.RUnlock()
		if err := c.opts.LocalServer.grantSelf(c.opts.NodeName, want); err != nil {
			return fmt.Errorf("granting the ca host its own services: %w", err)
		}
		chain, err = c.opts.LocalServer.issueLocal(ctx, csr)
	case cur != nil:
		// Renewal through vmesh's endpoint: the CA applies the node's
		// current grant, and accepts a certificate that expired within
		// its grace period (the TLS handshake proves the key).
		chain, err = c.renewNode(ctx, csr)
		if err != nil && !c.now().Before(cur.notAfter()) {
			if c.token != "" {
				chain, err = c.join(ctx, csr)
				break
			}
			return fmt.Errorf("node certificate expired at %s and the ca refused to renew it (%w); create a new token with `vmesh token create --node %s` and restart with it",
				cur.notAfter().Format(time.RFC3339), err, c.opts.NodeName)
		}
	case c.token != "":
		chain, err = c.join(ctx, csr)
	default:
		return fmt.Errorf("host has not joined the mesh and has no token; create one with `vmesh token create --node %s` on a ca host", c.opts.NodeName)
	}
	if err != nil {
		return fmt.Errorf("getting node certificate %s: %w", c.nodeID, err)
	}
	return c.install("", c.nodeID, key, chain)
}

func (c *Client) obtainService(ctx context.Context, svc string) error {
	id := ServiceID(c.td, svc)
	key, csr, err := newCSR(id)
	if err != nil {
		return err
	}
	var chain []*x509.Certificate
	if c.opts.LocalServer != nil {
		chain, err = c.opts.LocalServer.issueLocal(ctx, csr)
	} else {
		chain, err = c.requestService(ctx, csr)
	}
	if err != nil {
		return fmt.Errorf("getting service certificate %s: %w", id, err)
	}
	c.mu.RLock()
	still := slices.Contains(c.want, svc)
	c.mu.RUnlock()
	if !still {
		return nil // dropped by SetServices meanwhile
	}
	return c.install(svc, id, key, chain)
}

// install verifies a new chain, persists it, and swaps it in.
func (c *Client) install(svc, id string, key *ecdsa.PrivateKey, chain []*x509.Certificate) error {
	c.mu.RLock()
	roots := c.roots
	c.mu.RUnlock()
	if len(chain) == 0 {
		return fmt.Errorf("installing %s: empty chain from the ca", id)
	}
	got, err := verifySVIDCerts(chain, roots, c.td, c.now())
	if err != nil {
		return fmt.Errorf("installing %s: %w", id, err)
	}
	if got != id {
		return fmt.Errorf("installing %s: ca issued %s instead", id, got)
	}
	if !key.PublicKey.Equal(chain[0].PublicKey) {
		return fmt.Errorf("installing %s: certificate is not for our key", id)
	}
	keyPEM, err := encodeKeyPEM(key)
	if err != nil {
		return fmt.Errorf("installing %s: %w", id, err)
	}
	rec, _ := json.Marshal(storedCert{Key: string(keyPEM), Chain: string(encodeCertsPEM(chain))})
	dbKey := keyNode
	if svc != "" {
		dbKey = svcKey + svc
	}
	if err := c.opts.DB.Update(func(tx *bbolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(identityBucket)
		if err != nil {
			return err
		}
		return b.Put([]byte(dbKey), rec)
	}); err != nil {
		return fmt.Errorf("installing %s: persisting: %w", id, err)
	}
	ident := &identity{id: id, cert: tlsCertificate(key, chain), renewAt: renewTime(chain[0], renewJitter)}
	c.mu.Lock()
	if svc == "" {
		c.node = ident
	} else {
		c.svcs[svc] = ident
	}
	c.mu.Unlock()
	c.refresh.Inc()
	c.expiry.WithLabelValues(id).Set(float64(chain[0].NotAfter.Unix()))
	c.log.Info("certificate installed", "identity", id, "not_after", chain[0].NotAfter, "renew_at", ident.renewAt)
	return nil
}

type storedCert struct {
	Key   string `json:"key"`
	Chain string `json:"chain"`
}

// load restores the persisted roots and identities.
func (c *Client) load() error {
	var url string
	var rootsPEM []byte
	stored := map[string][]byte{}
	err := c.opts.DB.View(func(tx *bbolt.Tx) error {
		b := tx.Bucket(identityBucket)
		if b == nil {
			return nil
		}
		url = string(b.Get([]byte(keyURL)))
		rootsPEM = bytes.Clone(b.Get([]byte(keyRoots)))
		return b.ForEach(func(k, v []byte) error {
			if string(k) == keyNode || strings.HasPrefix(string(k), svcKey) {
				stored[string(k)] = bytes.Clone(v)
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("loading identity: %w", err)
	}
	if len(rootsPEM) == 0 {
		return nil // never joined
	}
	roots, err := parseCertsPEM(rootsPEM)
	if err != nil {
		c.log.Warn("ignoring stored roots", "err", err)
		return nil
	}
	c.url = url
	c.rootCerts = roots
	c.roots = poolOf(roots)
	for k, v := range stored {
		svc := strings.TrimPrefix(k, svcKey)
		id := c.nodeID
		if k == keyNode {
			svc = ""
		} else {
			if !slices.Contains(c.want, svc) {
				continue
			}
			id = ServiceID(c.td, svc)
		}
		ident, err := c.parseStored(id, v)
		if err != nil {
			c.log.Warn("ignoring stored certificate", "identity", id, "err", err)
			continue
		}
		if svc == "" {
			c.node = ident
		} else {
			c.svcs[svc] = ident
		}
		c.expiry.WithLabelValues(id).Set(float64(ident.notAfter().Unix()))
	}
	if c.node != nil {
		c.log.Info("identity restored from database", "not_after", c.node.notAfter(), "services", len(c.svcs))
	}
	c.checkReady()
	return nil
}

func (c *Client) parseStored(id string, v []byte) (*identity, error) {
	var s storedCert
	if err := json.Unmarshal(v, &s); err != nil {
		return nil, err
	}
	key, err := parseKeyPEM([]byte(s.Key))
	if err != nil {
		return nil, err
	}
	chain, err := parseCertsPEM([]byte(s.Chain))
	if err != nil {
		return nil, err
	}
	// Check the chain at a time it was valid: an expired certificate is
	// still loaded (and reported) so the operator sees why.
	got, err := verifySVIDCerts(chain, c.roots, c.td, chain[0].NotBefore.Add(time.Second))
	if err != nil {
		return nil, err
	}
	if got != id {
		return nil, fmt.Errorf("stored certificate is for %s", got)
	}
	if !key.PublicKey.Equal(chain[0].PublicKey) {
		return nil, errors.New("stored key does not match the certificate")
	}
	return &identity{id: id, cert: tlsCertificate(key, chain), renewAt: renewTime(chain[0], renewJitter)}, nil
}

func poolOf(certs []*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

func (c *Client) setRoots(url string, roots []*x509.Certificate) error {
	err := c.opts.DB.Update(func(tx *bbolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(identityBucket)
		if err != nil {
			return err
		}
		if err := b.Put([]byte(keyURL), []byte(url)); err != nil {
			return err
		}
		return b.Put([]byte(keyRoots), encodeCertsPEM(roots))
	})
	if err != nil {
		return fmt.Errorf("persisting roots: %w", err)
	}
	c.mu.Lock()
	c.url = url
	c.rootCerts = roots
	c.roots = poolOf(roots)
	c.mu.Unlock()
	return nil
}

// verifyCA checks the CA API's certificate: chained to the pinned roots and
// naming spiffe://TD/ca. Hostnames are not checked: the root pin is the trust.
func (c *Client) verifyCA(raw [][]byte, _ [][]*x509.Certificate) error {
	c.mu.RLock()
	roots := c.roots
	c.mu.RUnlock()
	if roots == nil {
		return nil // bootstrap fetch of the roots; checked by fingerprint
	}
	id, err := verifySVID(raw, roots, c.td, c.now())
	if err != nil {
		return fmt.Errorf("verifying ca server: %w", err)
	}
	if id != caID(c.td) {
		return fmt.Errorf("verifying ca server: it presented %s, want %s", id, caID(c.td))
	}
	return nil
}

// CAURL returns the CA API this client renews against, or "" before it
// knows one.
func (c *Client) CAURL() string {
	u, _ := c.caURL()
	return u
}

func (c *Client) caURL() (string, error) {
	if c.opts.CAURL != "" {
		return strings.TrimSuffix(c.opts.CAURL, "/"), nil
	}
	if c.opts.Config.URL != "" {
		return strings.TrimSuffix(c.opts.Config.URL, "/"), nil
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.url != "" {
		return c.url, nil
	}
	return "", errors.New("no ca url: set ca.url or use a join token")
}

// join bootstraps trust from the token's fingerprint and signs the node CSR.
func (c *Client) join(ctx context.Context, csr *x509.CertificateRequest) ([]*x509.Certificate, error) {
	info, err := readJoinInfo(c.token)
	if err != nil {
		return nil, err
	}
	if info.nodeID != c.nodeID {
		return nil, fmt.Errorf("the token is for %s but this host is %s", info.nodeID, c.nodeID)
	}
	base := info.caURL
	if u, err := c.caURL(); err == nil {
		base = u
	}
	roots, err := c.fetchRoots(ctx, base, info.fingerprint)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && base == info.caURL {
			return nil, fmt.Errorf("cannot reach the CA at %s, the address in the join token: %w "+
				"(if other hosts reach the CA host at another address, set gossip.advertise_addr on the CA host and create a new token, or set ca.url here)", base, err)
		}
		return nil, err
	}
	if err := c.setRoots(base, roots); err != nil {
		return nil, err
	}
	c.log.Info("joining the mesh", "ca", base, "root_fingerprint", info.fingerprint)
	var resp api.SignResponse
	req := api.SignRequest{CsrPEM: api.CertificateRequest{CertificateRequest: csr}, OTT: c.token}
	if err := c.post(ctx, base+signPath, req, &resp); err != nil {
		return nil, err
	}
	return signChain(&resp)
}

func signChain(r *api.SignResponse) ([]*x509.Certificate, error) {
	var chain []*x509.Certificate
	for _, x := range r.CertChainPEM {
		if x.Certificate != nil {
			chain = append(chain, x.Certificate)
		}
	}
	if len(chain) == 0 && r.ServerPEM.Certificate != nil {
		chain = append(chain, r.ServerPEM.Certificate)
		if r.CaPEM.Certificate != nil {
			chain = append(chain, r.CaPEM.Certificate)
		}
	}
	if len(chain) == 0 {
		return nil, errors.New("ca returned no certificate")
	}
	return chain, nil
}

// fetchRoots gets the CA's roots over unauthenticated TLS and keeps the one
// whose fingerprint the token pins.
func (c *Client) fetchRoots(ctx context.Context, base, fp string) ([]*x509.Certificate, error) {
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		TLSClientConfig:   &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: true}, // pinned below
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/1.0/roots", nil)
	if err != nil {
		return nil, fmt.Errorf("fetching roots: %w", err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetching roots: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("fetching roots: %w", readAPIError(resp))
	}
	var rr api.RootsResponse
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxBody)).Decode(&rr); err != nil {
		return nil, fmt.Errorf("fetching roots: decoding: %w", err)
	}
	for _, r := range rr.Certificates {
		if r.Certificate != nil && Fingerprint(r.Certificate) == fp {
			return []*x509.Certificate{r.Certificate}, nil
		}
	}
	return nil, fmt.Errorf("fetching roots: %s has no root with fingerprint %s (wrong ca, or a man in the middle)", base, fp)
}

// renewNode asks the CA for a new node SVID over mTLS with the current one.
func (c *Client) renewNode(ctx context.Context, csr *x509.CertificateRequest) ([]*x509.Certificate, error) {
	return c.requestService(ctx, csr)
}

func (c *Client) requestService(ctx context.Context, csr *x509.CertificateRequest) ([]*x509.Certificate, error) {
	base, err := c.caURL()
	if err != nil {
		return nil, err
	}
	body := svidRequest{CSR: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr.Raw}))}
	var resp svidResponse
	if err := c.post(ctx, base+svidPath, body, &resp); err != nil {
		return nil, err
	}
	return parseCertsPEM([]byte(resp.Chain))
}

func (c *Client) post(ctx context.Context, url string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.httpc.Do(req)
	if err != nil {
		return fmt.Errorf("calling ca: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return readAPIError(resp)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(out); err != nil {
		return fmt.Errorf("decoding ca response: %w", err)
	}
	return nil
}

// APIError is a refusal from the CA.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string { return fmt.Sprintf("ca refused (%d): %s", e.Status, e.Message) }

func readAPIError(resp *http.Response) error {
	var m struct {
		Message string `json:"message"`
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 8<<10))
	if json.Unmarshal(b, &m) != nil || m.Message == "" {
		m.Message = strings.TrimSpace(string(b))
	}
	return &APIError{Status: resp.StatusCode, Message: m.Message}
}
