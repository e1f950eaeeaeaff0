package ca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/smallstep/certificates/api"
	apilog "github.com/smallstep/certificates/api/log"
	"github.com/smallstep/certificates/authority"
	"github.com/smallstep/certificates/authority/config"
	"github.com/smallstep/certificates/authority/policy"
	"github.com/smallstep/certificates/authority/provisioner"
	"github.com/smallstep/certificates/db"
	"github.com/smallstep/certificates/errs"
	"github.com/smallstep/nosql/database"
	"go.step.sm/crypto/jose"
)

// svidTemplate makes X.509-SVIDs: empty subject, exactly the SANs of the
// request (one URI), usable for both ends of mTLS.
const svidTemplate = `{"subject": {}, "sans": {{ toJson .SANs }}, "keyUsage": ["digitalSignature"], "extKeyUsage": ["serverAuth", "clientAuth"]}`

// svidPath is vmesh's own endpoint for service SVIDs: POST a svidRequest over
// mTLS authenticated by the caller's node SVID.
const svidPath = "/vmesh/1.0/svid"

// nodesTable is the bucket of the CA's bbolt file holding nodeRecords.
var nodesTable = []byte("vmesh_nodes")

const (
	defaultBackdate = time.Minute
	defaultTokenTTL = 15 * time.Minute
	maxTokenTTL     = 7 * 24 * time.Hour
	maxBody         = 64 << 10
)

// ServerOptions configure a Server.
type ServerOptions struct {
	// Config is the [ca] section. Required: TrustDomain. CertLifetime zero
	// means 24h; ListenAddr is used when Listener is nil.
	Config Config
	// Dir is the CA directory made by Init (intermediate certificate and key,
	// root certificate, join key). Required (node passes Config.Dir resolved).
	Dir string
	// DBPath is the CA's own bbolt file (smallstep's nosql locks it
	// exclusively: never the agent's file). Required.
	DBPath string
	// URL is how clients reach this CA, e.g. "https://198.18.0.2:4192". It
	// goes into join tokens. Required for CreateToken.
	URL string
	// Listener, if set, is where Run serves the CA API (tests); otherwise
	// Run listens on Config.ListenAddr. Optional.
	Listener net.Listener
	// Backdate is subtracted from NotBefore for clock skew. Zero means 1m.
	Backdate time.Duration
	// Logger is optional (default: discard).
	Logger *slog.Logger
	// Registerer is optional; nil registers no metrics.
	Registerer prometheus.Registerer
	// Now is the clock for vmesh's own checks (token expiry, peer
	// verification). Optional (default time.Now). smallstep uses its own.
	Now func() time.Time
}

// Server is an embedded smallstep CA: it issues node SVIDs against join
// tokens, renews them, and issues service SVIDs to nodes allowed to have them.
type Server struct {
	opts     ServerOptions
	log      *slog.Logger
	now      func() time.Time
	td       string
	lifetime time.Duration
	backdate time.Duration
	url      string
	root     *x509.Certificate
	inter    *x509.Certificate
	interKey *ecdsa.PrivateKey // signs revocations
	roots    *x509.CertPool
	fp       string
	join     *joinSigner
	auth     *authority.Authority
	nodes    database.DB

	recMu sync.Mutex // serialises read-modify-write of node records

	tlsMu   sync.Mutex
	tlsCert *tls.Certificate
	tlsNext time.Time

	issued *prometheus.CounterVec

	mu        sync.Mutex
	srv       *http.Server
	closed    bool
	closeOnce sync.Once
	closeErr  error
}

// nodeRecord is what the CA remembers about a node, keyed by node name.
type nodeRecord struct {
	// Services the node's latest token granted.
	Services []string `json:"services"`
	// TokenID is the jti of the latest token; older tokens are refused.
	TokenID string `json:"token_id"`
	// Revoked nodes get nothing until a new token is created for them.
	Revoked   bool      `json:"revoked,omitempty"`
	UpdatedAt time.Time `json:"updated_at"`
	// Serials of the certificates this CA issued the node (node and
	// service SVIDs, the latest maxSerials): a revocation lists them so
	// proxies refuse the node's service SVIDs too.
	Serials []string `json:"serials,omitempty"`
	// TokenAt is when the latest token was made: a revocation from before
	// it no longer applies.
	TokenAt time.Time `json:"token_at,omitzero"`
	// TokenExpires is when the latest token stops working.
	TokenExpires time.Time `json:"token_expires,omitzero"`
	// JoinedAt is when the latest token was used (zero: not yet).
	JoinedAt time.Time `json:"joined_at,omitzero"`
}

// NewServer loads the CA directory and opens the CA database. It starts no
// goroutines; CreateToken and Revoke work before Run.
func NewServer(o ServerOptions) (*Server, error) {
	td := o.Config.TrustDomain
	switch {
	case !ValidTrustDomain(td):
		return nil, fmt.Errorf("creating ca server: invalid trust domain %q", td)
	case o.Dir == "":
		return nil, errors.New("creating ca server: no ca directory")
	case o.DBPath == "":
		return nil, errors.New("creating ca server: no database path")
	case o.Config.CertLifetime < 0:
		return nil, errors.New("creating ca server: negative certificate lifetime")
	case o.Backdate < 0:
		return nil, errors.New("creating ca server: negative backdate")
	}
	s := &Server{opts: o, td: td, log: o.Logger, now: o.Now,
		lifetime: o.Config.CertLifetime, backdate: o.Backdate}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.log = s.log.With("component", "ca-server")
	if s.now == nil {
		s.now = time.Now
	}
	if s.lifetime == 0 {
		s.lifetime = 24 * time.Hour
	}
	if s.backdate == 0 {
		s.backdate = defaultBackdate
	}
	if o.URL != "" {
		u, err := url.Parse(o.URL)
		if err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") {
			return nil, fmt.Errorf("creating ca server: url %q must be like https://198.18.0.2:4192", o.URL)
		}
		s.url = "https://" + u.Host
	}

	var err error
	if s.root, err = readCertFile(filepath.Join(o.Dir, RootCertFile)); err != nil {
		return nil, fmt.Errorf("creating ca server: loading root (run `vmesh ca init`?): %w", err)
	}
	if s.inter, err = readCertFile(filepath.Join(o.Dir, IntermediateCertFile)); err != nil {
		return nil, fmt.Errorf("creating ca server: loading intermediate: %w", err)
	}
	interKey, err := readKeyFile(filepath.Join(o.Dir, IntermediateKeyFile))
	if err != nil {
		return nil, fmt.Errorf("creating ca server: loading intermediate key: %w", err)
	}
	if err := s.inter.CheckSignatureFrom(s.root); err != nil {
		return nil, fmt.Errorf("creating ca server: intermediate is not signed by the root: %w", err)
	}
	if !interKey.PublicKey.Equal(s.inter.PublicKey) {
		return nil, errors.New("creating ca server: intermediate key does not match its certificate")
	}
	s.interKey = interKey
	joinKey, err := s.loadJoinKey()
	if err != nil {
		return nil, fmt.Errorf("creating ca server: %w", err)
	}
	if s.join, err = newJoinSigner(joinKey); err != nil {
		return nil, fmt.Errorf("creating ca server: %w", err)
	}
	s.roots = x509.NewCertPool()
	s.roots.AddCert(s.root)
	s.fp = Fingerprint(s.root)

	if s.auth, err = s.newAuthority(interKey); err != nil {
		return nil, fmt.Errorf("creating ca server: %w", err)
	}
	adb, ok := s.auth.GetDatabase().(*db.DB)
	if !ok {
		_ = s.auth.Shutdown()
		return nil, fmt.Errorf("creating ca server: unexpected database type %T", s.auth.GetDatabase())
	}
	s.nodes = adb.DB
	if err := s.nodes.CreateTable(nodesTable); err != nil {
		_ = s.auth.Shutdown()
		return nil, fmt.Errorf("creating ca server: creating nodes table: %w", err)
	}

	s.issued = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "ca_certificates_issued_total",
		Help: "Certificates issued by this CA host, by kind (node, svc, ca) and result.",
	}, []string{"kind", "result"})
	if o.Registerer != nil {
		if err := o.Registerer.Register(s.issued); err != nil {
			_ = s.auth.Shutdown()
			return nil, fmt.Errorf("creating ca server: registering metrics: %w", err)
		}
	}
	return s, nil
}

func (s *Server) loadJoinKey() (*ecdsa.PrivateKey, error) {
	p := filepath.Join(s.opts.Dir, JoinKeyFile)
	k, err := readKeyFile(p)
	if err == nil {
		return k, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("loading join key: %w", err)
	}
	s.log.Warn("no join key in ca directory; creating one", "path", p)
	k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating join key: %w", err)
	}
	if err := writeKeyFile(p, k); err != nil {
		return nil, err
	}
	return k, nil
}

func (s *Server) newAuthority(interKey *ecdsa.PrivateKey) (*authority.Authority, error) {
	dns := []string{"localhost"}
	if s.url != "" {
		u, _ := url.Parse(s.url)
		if h := u.Hostname(); h != "localhost" {
			dns = append(dns, h)
		}
	}
	minDur := 5 * time.Minute
	if s.lifetime < minDur {
		minDur = s.lifetime // tests
	}
	maxDur := max(s.lifetime, 24*time.Hour)
	prov := &provisioner.JWK{
		Type: "JWK",
		Name: joinProvisioner,
		Key:  s.join.pub,
		Claims: &provisioner.Claims{
			MinTLSDur:     &provisioner.Duration{Duration: minDur},
			MaxTLSDur:     &provisioner.Duration{Duration: maxDur},
			DefaultTLSDur: &provisioner.Duration{Duration: s.lifetime},
		},
		Options: &provisioner.Options{X509: &provisioner.X509Options{Template: svidTemplate}},
	}
	cfg := &config.Config{
		DNSNames: dns,
		DB:       &db.Config{Type: "bbolt", DataSource: s.opts.DBPath},
		AuthorityConfig: &config.AuthConfig{
			Provisioners:         provisioner.List{prov},
			DisableIssuedAtCheck: true,
			Backdate:             &provisioner.Duration{Duration: s.backdate},
			Policy: &policy.Options{X509: &policy.X509PolicyOptions{
				AllowedNames: &policy.X509NameOptions{URIDomains: []string{s.td}},
			}},
		},
	}
	a, err := authority.NewEmbedded(
		authority.WithConfig(cfg),
		authority.WithX509RootCerts(s.root),
		authority.WithX509Signer(s.inter, interKey),
		authority.WithAuthorizeRenewFunc(s.authorizeRenew),
		authority.WithX509Enforcers(provisioner.CertificateEnforcerFunc(s.addGrant)),
		authority.WithQuietInit(),
	)
	if err != nil {
		return nil, fmt.Errorf("starting embedded authority: %w", err)
	}
	return a, nil
}

// Fingerprint returns the root's SHA-256 fingerprint.
func (s *Server) Fingerprint() string { return s.fp }

// Roots returns the mesh roots.
func (s *Server) Roots() *x509.CertPool { return s.roots }

// TrustDomain returns the trust domain.
func (s *Server) TrustDomain() string { return s.td }

// CreateToken mints a single-use join token for node, valid for ttl (zero
// means 15m), that lets it get spiffe://TD/node/NODE and then the SVIDs of
// services. The grant is recorded in the CA database and replaces any
// earlier one for the node (older tokens stop working; a revoked node is
// re-admitted).
func (s *Server) CreateToken(node string, services []string, ttl time.Duration) (string, error) {
	if s.url == "" {
		return "", errors.New("creating token: this ca has no url configured for clients")
	}
	if !ValidName(node) {
		return "", fmt.Errorf("creating token: invalid node name %q (lower-case letters, digits, '.', '-', '_', at most 63)", node)
	}
	svcs := slices.Clone(services)
	for _, sv := range svcs {
		if !ValidName(sv) {
			return "", fmt.Errorf("creating token: invalid service name %q", sv)
		}
	}
	slices.Sort(svcs)
	svcs = slices.Compact(svcs)
	switch {
	case ttl == 0:
		ttl = defaultTokenTTL
	case ttl < 0 || ttl > maxTokenTTL:
		return "", fmt.Errorf("creating token: ttl %s must be between 0 and %s", ttl, maxTokenTTL)
	}
	id := NodeID(s.td, node)
	c := newClaims(id, s.url+signPath, []string{id}, s.now(), ttl)
	c.SHA = s.fp
	c.Services = svcs
	tok, err := s.join.sign(c)
	if err != nil {
		return "", fmt.Errorf("creating token: %w", err)
	}
	err = s.updateNode(node, func(r *nodeRecord) *nodeRecord {
		return &nodeRecord{Services: svcs, TokenID: c.ID, TokenExpires: c.Expiry.Time(), TokenAt: s.now()}
	})
	if err != nil {
		return "", fmt.Errorf("creating token: %w", err)
	}
	s.log.Info("join token created", "node", node, "services", svcs, "ttl", ttl)
	return tok, nil
}

// Grant replaces the services node may get SVIDs for, without a new
// token: a host that joined adds a service by declaring it and being
// granted it here. Its outstanding token, if any, stays as it was.
func (s *Server) Grant(node string, services []string) error {
	if !ValidName(node) {
		return fmt.Errorf("granting services: invalid node name %q", node)
	}
	svcs := slices.Clone(services)
	for _, sv := range svcs {
		if !ValidName(sv) {
			return fmt.Errorf("granting services: invalid service name %q", sv)
		}
	}
	slices.Sort(svcs)
	svcs = slices.Compact(svcs)
	var unknown, revoked bool
	err := s.updateNode(node, func(r *nodeRecord) *nodeRecord {
		switch {
		case r == nil:
			unknown = true
			return nil
		case r.Revoked:
			revoked = true
			return nil
		}
		r.Services = svcs
		return r
	})
	switch {
	case err != nil:
		return fmt.Errorf("granting services to %s: %w", node, err)
	case unknown:
		return fmt.Errorf("granting services: node %s is unknown to this ca: create a join token for it first", node)
	case revoked:
		return fmt.Errorf("granting services: node %s is revoked: create a new join token for it", node)
	}
	s.log.Info("services granted", "node", node, "services", svcs)
	return nil
}

// ErrUnknownNode is returned by Revoke for a node this CA has no record of.
var ErrUnknownNode = errors.New("unknown node")

// Revoke stops the CA from renewing node's certificate or issuing it service
// SVIDs, and voids its outstanding token, until a new token is created. It
// returns the revocation signed with the intermediate, for the other CA
// hosts (ApplyRevocation) and every proxy (Verifier.Revoke): pass it on by
// gossip. A node this CA has no record of is an error wrapping
// ErrUnknownNode, unless known says it is a member of the mesh (it joined
// through another CA host).
func (s *Server) Revoke(node string, known bool) ([]byte, error) {
	if !ValidName(node) {
		return nil, fmt.Errorf("revoking node: invalid node name %q", node)
	}
	var unknown bool
	var serials []string
	err := s.updateNode(node, func(r *nodeRecord) *nodeRecord {
		if r == nil {
			if !known {
				unknown = true
				return nil
			}
			r = &nodeRecord{}
		}
		r.Revoked = true
		r.TokenID = ""
		serials = r.Serials
		return r
	})
	switch {
	case err != nil:
		return nil, fmt.Errorf("revoking node %s: %w", node, err)
	case unknown:
		return nil, fmt.Errorf("revoking node %s: %w: no token was made for it here and it is not a member of the mesh (vmesh node list)", node, ErrUnknownNode)
	}
	rev, err := s.signRevocation(Revocation{Node: node, At: s.now(), Serials: serials})
	if err != nil {
		return nil, fmt.Errorf("revoking node %s: %w", node, err)
	}
	s.log.Warn("node revoked", "node", node)
	return rev, nil
}

// NodeServices returns the services node may get SVIDs for, and whether the
// node is known and not revoked.
func (s *Server) NodeServices(node string) ([]string, bool) {
	r, err := s.getNode(node)
	if err != nil || r == nil || r.Revoked {
		return nil, false
	}
	return slices.Clone(r.Services), true
}

// NodeInfo is what the CA remembers about one node, for `vmesh token list`.
type NodeInfo struct {
	Node         string    `json:"node"`
	Services     []string  `json:"services"`
	Revoked      bool      `json:"revoked,omitempty"`
	TokenExpires time.Time `json:"token_expires,omitzero"`
	JoinedAt     time.Time `json:"joined_at,omitzero"`
	UpdatedAt    time.Time `json:"updated_at"`
}

// Nodes lists the nodes this CA minted tokens for, by name.
func (s *Server) Nodes() ([]NodeInfo, error) {
	entries, err := s.nodes.List(nodesTable)
	if database.IsErrNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing nodes: %w", err)
	}
	out := make([]NodeInfo, 0, len(entries))
	for _, e := range entries {
		var r nodeRecord
		if err := json.Unmarshal(e.Value, &r); err != nil {
			return nil, fmt.Errorf("listing nodes: decoding %s: %w", e.Key, err)
		}
		out = append(out, NodeInfo{Node: string(e.Key), Services: r.Services, Revoked: r.Revoked,
			TokenExpires: r.TokenExpires, JoinedAt: r.JoinedAt, UpdatedAt: r.UpdatedAt})
	}
	slices.SortFunc(out, func(a, b NodeInfo) int { return strings.Compare(a.Node, b.Node) })
	return out, nil
}

func (s *Server) getNode(node string) (*nodeRecord, error) {
	b, err := s.nodes.Get(nodesTable, []byte(node))
	if database.IsErrNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading node record: %w", err)
	}
	var r nodeRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("decoding node record: %w", err)
	}
	return &r, nil
}

func (s *Server) updateNode(node string, fn func(*nodeRecord) *nodeRecord) error {
	s.recMu.Lock()
	defer s.recMu.Unlock()
	r, err := s.getNode(node)
	if err != nil {
		return err
	}
	r = fn(r)
	if r == nil {
		return nil
	}
	r.UpdatedAt = s.now()
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if err := s.nodes.Set(nodesTable, []byte(node), b); err != nil {
		return fmt.Errorf("writing node record: %w", err)
	}
	return nil
}

// authorizeRenew is smallstep's renew/rekey hook: only node SVIDs of nodes
// that are not revoked may renew; service SVIDs are re-issued through the
// svid endpoint so that the grant is checked every time.
func (s *Server) authorizeRenew(ctx context.Context, p *provisioner.Controller, cert *x509.Certificate) error {
	id, err := svidURI(cert, s.td)
	if err != nil {
		return errs.Unauthorized("renewal refused: %s", err)
	}
	kind, name, err := ParseID(id, s.td)
	if err != nil || kind != kindNode {
		return errs.Unauthorized("renewal refused: only node svids renew, not %s", id)
	}
	r, err := s.getNode(name)
	switch {
	case err != nil:
		return errs.InternalServerErr(err)
	case r != nil && r.Revoked:
		s.log.Warn("renewal refused: node revoked", "node", name)
		return errs.Unauthorized("renewal refused: node %s is revoked", name)
	}
	return provisioner.DefaultAuthorizeRenew(ctx, p, cert)
}

// granted returns the services node may get: this CA's record when it has
// one (the latest token), else the grant carried in the node SVID (a node
// that joined through another CA host sharing the intermediate).
func (s *Server) granted(node string, nodeCert *x509.Certificate) ([]string, error) {
	rec, err := s.getNode(node)
	switch {
	case err != nil:
		return nil, err
	case rec != nil && rec.Revoked:
		return nil, fmt.Errorf("node %s is revoked", node)
	case rec != nil:
		return rec.Services, nil
	}
	g, ok, err := certGrant(nodeCert)
	switch {
	case err != nil:
		return nil, err
	case !ok:
		return nil, fmt.Errorf("node %s is unknown to this ca and its certificate carries no grant", node)
	}
	return g, nil
}

// addGrant runs on every certificate the authority signs (not renewals):
// a node SVID gets the services this CA recorded for the node.
func (s *Server) addGrant(c *x509.Certificate) error {
	if len(c.URIs) != 1 {
		return nil
	}
	kind, node, err := parseIDURL(c.URIs[0], s.td)
	if err != nil || kind != kindNode {
		return nil
	}
	rec, err := s.getNode(node)
	if err != nil || rec == nil {
		return err
	}
	ext, err := grantExtension(rec.Services)
	if err != nil {
		return err
	}
	c.ExtraExtensions = append(c.ExtraExtensions, ext)
	return nil
}

// issue signs csr for exactly the SPIFFE ID id, in-process, through the
// join provisioner (same template, lifetime and policy as joins).
func (s *Server) issue(ctx context.Context, csr *x509.CertificateRequest, id string) ([]*x509.Certificate, error) {
	kind := "ca"
	if k, _, err := ParseID(id, s.td); err == nil {
		kind = k
	}
	chain, err := s.issueToken(ctx, csr, id)
	if err != nil {
		s.issued.WithLabelValues(kind, "error").Inc()
		return nil, err
	}
	s.issued.WithLabelValues(kind, "ok").Inc()
	return chain, nil
}

func (s *Server) issueToken(ctx context.Context, csr *x509.CertificateRequest, id string) ([]*x509.Certificate, error) {
	aud := "https://localhost" + signPath
	tok, err := s.join.sign(newClaims(id, aud, []string{id}, time.Now(), time.Minute))
	if err != nil {
		return nil, err
	}
	ctx = authority.NewContextWithSkipTokenReuse(ctx)
	ctx = provisioner.NewContextWithMethod(ctx, provisioner.SignMethod)
	opts, err := s.auth.Authorize(ctx, tok)
	if err != nil {
		return nil, fmt.Errorf("authorizing %s: %w", id, err)
	}
	chain, err := s.auth.SignWithContext(ctx, csr, provisioner.SignOptions{}, opts...)
	if err != nil {
		return nil, fmt.Errorf("signing %s: %w", id, err)
	}
	return chain, nil
}

// issueLocal issues for the CA host itself: its node SVID and any service
// (the CA host is trusted with its own configuration).
func (s *Server) issueLocal(ctx context.Context, csr *x509.CertificateRequest) ([]*x509.Certificate, error) {
	id, err := csrID(csr, s.td)
	if err != nil {
		return nil, err
	}
	return s.issue(ctx, csr, id)
}

// csrID checks a CSR's signature and SAN shape and returns its SPIFFE ID.
func csrID(csr *x509.CertificateRequest, td string) (string, error) {
	if err := csr.CheckSignature(); err != nil {
		return "", fmt.Errorf("invalid csr signature: %w", err)
	}
	if len(csr.URIs) != 1 || len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) > 0 {
		return "", errors.New("csr must have exactly one uri san and no other sans")
	}
	if _, ok := csr.PublicKey.(*ecdsa.PublicKey); !ok {
		return "", errors.New("csr key must be ecdsa p-256")
	}
	id := csr.URIs[0].String()
	if _, _, err := parseIDURL(csr.URIs[0], td); err != nil {
		return "", err
	}
	return id, nil
}

// Run serves the CA API until ctx is done, then closes the server.
func (s *Server) Run(ctx context.Context) error {
	ln := s.opts.Listener
	if ln == nil {
		addr := s.opts.Config.ListenAddr
		if !addr.IsValid() {
			return errors.New("running ca server: no listen address")
		}
		var err error
		if ln, err = net.Listen("tcp", addr.String()); err != nil {
			return fmt.Errorf("running ca server: %w", err)
		}
	}
	srv := &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		BaseContext: func(net.Listener) context.Context {
			c := authority.NewContext(context.Background(), s.auth)
			return apilog.WithErrorLogger(c, func(_ http.ResponseWriter, r *http.Request, err error) {
				// err.Error(), not err: smallstep's errors print their
				// stack trace under %+v, which is how slog formats values.
				s.log.Info("ca api request refused", "path", r.URL.Path, "remote", r.RemoteAddr, "err", err.Error())
			})
		},
		TLSConfig: s.tlsConfig(),
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return errors.New("running ca server: closed")
	}
	s.srv = srv
	s.mu.Unlock()
	s.log.Info("ca api serving", "addr", ln.Addr().String(), "fingerprint", s.fp)
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	select {
	case <-ctx.Done():
		return s.Close()
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		s.Close()
		return fmt.Errorf("serving ca api: %w", err)
	}
}

// Close stops serving and closes the CA database. Idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		srv := s.srv
		s.mu.Unlock()
		if srv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = srv.Shutdown(ctx)
			cancel()
			srv.Close()
		}
		s.closeErr = s.auth.Shutdown()
	})
	return s.closeErr
}

func (s *Server) tlsConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.serverCert() },
		// Client certificates are verified by verifyClient rather than by
		// crypto/tls, which refuses an expired one outright: a node whose
		// certificate expired within the grace period may renew it.
		ClientAuth:            tls.RequestClientCert,
		VerifyPeerCertificate: s.verifyClient,
		Time:                  s.now,
		NextProtos:            []string{"http/1.1"},
	}
}

// verifyClient verifies a client certificate chain, if one is given,
// against the mesh roots: as of now, or, for a leaf that expired less than
// renew_after_expiry ago, as of just before it expired. Handlers that must
// not accept an expired certificate check the time again (only node
// self-renewal does not; smallstep's renew refuses expired certificates).
func (s *Server) verifyClient(raw [][]byte, _ [][]*x509.Certificate) error {
	if len(raw) == 0 {
		return nil
	}
	certs := make([]*x509.Certificate, 0, len(raw))
	for _, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return fmt.Errorf("verifying client certificate: %w", err)
		}
		certs = append(certs, c)
	}
	_, err := verifySVIDCerts(certs, s.roots, s.td, s.clientVerifyTime(certs[0]))
	return err
}

// clientVerifyTime is the time a client's certificate is verified at: now,
// or just before it expired when that was less than the grace period ago.
func (s *Server) clientVerifyTime(leaf *x509.Certificate) time.Time {
	now := s.now()
	if grace := s.opts.Config.renewAfterExpiry(); now.After(leaf.NotAfter) && now.Sub(leaf.NotAfter) <= grace {
		return leaf.NotAfter.Add(-time.Second)
	}
	return now
}

// serverCert returns the CA API's own certificate (spiffe://TD/ca), issued
// in-process and refreshed at 2/3 of its lifetime.
func (s *Server) serverCert() (*tls.Certificate, error) {
	s.tlsMu.Lock()
	defer s.tlsMu.Unlock()
	now := time.Now()
	if s.tlsCert != nil && now.Before(s.tlsNext) {
		return s.tlsCert, nil
	}
	key, csr, err := newCSR(caID(s.td))
	if err != nil {
		return nil, err
	}
	chain, err := s.issue(context.Background(), csr, caID(s.td))
	if err != nil {
		if s.tlsCert != nil && now.Before(s.tlsCert.Leaf.NotAfter) {
			s.log.Error("refreshing ca api certificate failed; keeping the current one", "err", err)
			return s.tlsCert, nil
		}
		return nil, fmt.Errorf("issuing ca api certificate: %w", err)
	}
	c := tlsCertificate(key, chain)
	s.tlsCert = c
	s.tlsNext = renewTime(c.Leaf, 0)
	return c, nil
}

// Handler returns the CA API: smallstep's routes for roots, sign (join),
// renew and rekey under /1.0, plus vmesh's service SVID endpoint. It expects
// requests over TLS with the authority in the context (Run arranges both).
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	allowed := map[string]bool{
		"GET /health": true, "GET /version": true, "GET /roots": true, "GET /roots.pem": true,
		"GET /intermediates": true, "GET /intermediates.pem": true,
		"POST /sign": true, "POST /renew": true, "POST /rekey": true,
	}
	api.Route(routerFunc(func(method, pattern string, h http.HandlerFunc) {
		if !allowed[method+" "+pattern] {
			return
		}
		if pattern == "/sign" {
			h = s.checkJoin(h)
		}
		mux.HandleFunc(method+" /1.0"+pattern, h)
	}))
	mux.HandleFunc("POST "+svidPath, s.handleSVID)
	return mux
}

type routerFunc func(method, pattern string, h http.HandlerFunc)

func (f routerFunc) MethodFunc(method, pattern string, h http.HandlerFunc) { f(method, pattern, h) }

// checkJoin runs before smallstep's sign handler: the token must be the
// latest one created on this CA for a node that is not revoked, and not
// expired by our clock. smallstep then checks signature, audience, single use
// and that the CSR asks for exactly the token's SANs.
func (s *Server) checkJoin(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, maxBody))
		if err != nil {
			writeError(w, http.StatusBadRequest, "reading request: %v", err)
			return
		}
		var req struct {
			OTT string `json:"ott"`
		}
		if err := json.Unmarshal(body, &req); err != nil || req.OTT == "" {
			writeError(w, http.StatusBadRequest, "request must be json with a join token (ott)")
			return
		}
		node, err := s.checkToken(req.OTT)
		if err != nil {
			s.log.Warn("join refused", "remote", r.RemoteAddr, "err", err)
			writeError(w, http.StatusUnauthorized, "join refused: %v", err)
			return
		}
		s.log.Info("node joining", "node", node, "remote", r.RemoteAddr)
		r.Body = io.NopCloser(bytes.NewReader(body))
		sw := &statusWriter{ResponseWriter: w}
		next(sw, r)
		if sw.code/100 == 2 {
			// Remember the use, so that a second use is refused with a
			// message that says so (smallstep's says only "unauthorized").
			err := s.updateNode(node, func(r *nodeRecord) *nodeRecord {
				if r != nil {
					r.JoinedAt = s.now()
				}
				return r
			})
			if err != nil {
				s.log.Warn("recording a join", "node", node, "err", err)
			}
		}
	}
}

// statusWriter remembers the status code written through it.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

func (s *Server) checkToken(tok string) (node string, err error) {
	jwt, err := jose.ParseSigned(strings.TrimSpace(tok))
	if err != nil {
		return "", fmt.Errorf("parsing token: %w", err)
	}
	c := new(tokenClaims)
	if err := jwt.Claims(s.join.pub, c); err != nil {
		return "", errors.New("token is not signed by this ca")
	}
	kind, node, err := ParseID(c.Subject, s.td)
	if err != nil || kind != kindNode {
		return "", fmt.Errorf("token subject %q is not a node of %s", c.Subject, s.td)
	}
	if c.Expiry == nil || !s.now().Before(c.Expiry.Time()) {
		return "", errors.New("token expired")
	}
	r, err := s.getNode(node)
	switch {
	case err != nil:
		return "", err
	case r == nil:
		return "", fmt.Errorf("no token was created on this ca for node %s", node)
	case r.Revoked:
		return "", fmt.Errorf("node %s is revoked", node)
	case r.TokenID != c.ID:
		return "", fmt.Errorf("token for node %s was superseded by a newer one", node)
	case !r.JoinedAt.IsZero():
		return "", fmt.Errorf("this token was already used: node %s joined with it at %s, and a token works once "+
			"(a host that lost its data dir needs a new token: vmesh token create --node %s --services %s)",
			node, r.JoinedAt.UTC().Format(time.RFC3339), node, strings.Join(r.Services, ","))
	}
	return node, nil
}

// svidRequest is the body of POST /vmesh/1.0/svid.
type svidRequest struct {
	CSR string `json:"csr"` // PEM
}

// svidResponse carries the new certificate chain, leaf first.
type svidResponse struct {
	Chain string `json:"chain"` // PEM
}

func (s *Server) handleSVID(w http.ResponseWriter, r *http.Request) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		writeError(w, http.StatusUnauthorized, "a node svid (mtls client certificate) is required")
		return
	}
	var req svidRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, maxBody)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "decoding request: %v", err)
		return
	}
	blk, _ := pem.Decode([]byte(req.CSR))
	if blk == nil || blk.Type != "CERTIFICATE REQUEST" {
		writeError(w, http.StatusBadRequest, "csr must be a pem certificate request")
		return
	}
	csr, err := x509.ParseCertificateRequest(blk.Bytes)
	if err != nil {
		writeError(w, http.StatusBadRequest, "parsing csr: %v", err)
		return
	}
	id, err := csrID(csr, s.td)
	if err != nil {
		writeError(w, http.StatusBadRequest, "%v", err)
		return
	}
	k, svc, _ := ParseID(id, s.td)
	// A service SVID needs a current node SVID; a node renewing its own
	// SVID may present one that expired within the grace period.
	at := s.now()
	if k == kindNode {
		at = s.clientVerifyTime(r.TLS.PeerCertificates[0])
	}
	peer, err := verifySVIDCerts(r.TLS.PeerCertificates, s.roots, s.td, at)
	if err != nil {
		writeError(w, http.StatusUnauthorized, "%v", err)
		return
	}
	kind, node, err := ParseID(peer, s.td)
	if err != nil || kind != kindNode {
		writeError(w, http.StatusForbidden, "only node svids may request svids, not %s", peer)
		return
	}
	if k == kindNode {
		s.renewNode(w, r, csr, id, peer, node)
		return
	}
	if k != kindSvc {
		writeError(w, http.StatusForbidden, "%s is not a service id", id)
		return
	}
	granted, err := s.granted(node, r.TLS.PeerCertificates[0])
	switch {
	case err != nil:
		s.log.Warn("service svid refused", "node", node, "service", svc, "err", err)
		writeError(w, http.StatusForbidden, "%v", err)
		return
	case !slices.Contains(granted, svc):
		s.log.Warn("service svid refused: not granted", "node", node, "service", svc)
		writeError(w, http.StatusForbidden, "node %s was not granted service %q (granted: %s)", node, svc, strings.Join(granted, ","))
		return
	}
	chain, err := s.issue(r.Context(), csr, id)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "issuing %s: %v", id, err)
		return
	}
	s.noteSerial(node, chain[0])
	s.log.Debug("service svid issued", "node", node, "id", id, "not_after", chain[0].NotAfter)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(svidResponse{Chain: string(encodeCertsPEM(chain))})
}

// writeError writes an error in smallstep's JSON shape.
func writeError(w http.ResponseWriter, status int, format string, args ...any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"status": status, "message": fmt.Sprintf(format, args...)})
}

// renewNode issues a node its own SVID again (mTLS with its current one,
// which may have expired within renew_after_expiry), with the grant this
// CA records for it now: unlike smallstep's renew, which copies the old
// certificate, a `vmesh node grant` reaches the node SVID. A node this CA
// has no record of (it joined through another CA host) is adopted with the
// grant its certificate carries.
func (s *Server) renewNode(w http.ResponseWriter, r *http.Request, csr *x509.CertificateRequest, id, peer, node string) {
	if id != peer {
		writeError(w, http.StatusForbidden, "node %s may not get the svid of %s", peer, id)
		return
	}
	grant, _, err := certGrant(r.TLS.PeerCertificates[0])
	if err != nil {
		writeError(w, http.StatusBadRequest, "%v", err)
		return
	}
	var revoked bool
	err = s.updateNode(node, func(rec *nodeRecord) *nodeRecord {
		switch {
		case rec == nil:
			return &nodeRecord{Services: grant}
		case rec.Revoked:
			revoked = true
		}
		return nil
	})
	switch {
	case err != nil:
		writeError(w, http.StatusInternalServerError, "renewing %s: %v", id, err)
		return
	case revoked:
		s.log.Warn("renewal refused: node revoked", "node", node)
		writeError(w, http.StatusUnauthorized, "renewal refused: node %s is revoked", node)
		return
	}
	chain, err := s.issue(r.Context(), csr, id)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "issuing %s: %v", id, err)
		return
	}
	s.noteSerial(node, chain[0])
	if leaf := r.TLS.PeerCertificates[0]; s.now().After(leaf.NotAfter) {
		s.log.Info("expired node certificate renewed", "node", node, "expired_at", leaf.NotAfter)
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(svidResponse{Chain: string(encodeCertsPEM(chain))})
}

// grantSelf records the services of the CA host's own node (it is trusted
// with its own configuration), so that its node SVID carries them.
func (s *Server) grantSelf(node string, services []string) error {
	svcs := slices.Clone(services)
	slices.Sort(svcs)
	svcs = slices.Compact(svcs)
	return s.updateNode(node, func(rec *nodeRecord) *nodeRecord {
		if rec == nil {
			rec = &nodeRecord{}
		}
		if slices.Equal(rec.Services, svcs) && !rec.Revoked {
			return nil
		}
		rec.Services, rec.Revoked = svcs, false
		return rec
	})
}
