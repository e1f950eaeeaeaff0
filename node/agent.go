package node

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"github.com/vmesh/vmesh/names"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
	"golang.org/x/sync/errgroup"

	"github.com/vmesh/vmesh/ca"
	"github.com/vmesh/vmesh/discovery"
	"github.com/vmesh/vmesh/proxy"
	"github.com/vmesh/vmesh/rules"
)

// Options are what the agent is built from.
type Options struct {
	// Config is the validated configuration. Required.
	Config Config
	// ConfigPath is re-read on Reload. Optional: without it Reload fails.
	ConfigPath string
	// Logger is the root logger. Optional: nil discards.
	Logger *slog.Logger
	// Notify tells systemd about state changes (READY=1, RELOADING=1,
	// STOPPING=1). Optional: nil uses sd_notify, which does nothing outside
	// systemd.
	Notify func(state string)
	// UID is the uid whose traffic the rules exempt when rules.proxy_uid is
	// -1. Optional: zero value means os.Getuid().
	UID *uint32
	// LogLevel is the level of Logger's handler (see NewLevelLogger), so
	// that a reload applies node.log_level. Optional: without it a change of
	// node.log_level needs a restart.
	LogLevel *slog.LevelVar
	// Version is the agent's version, shown by `vmesh members` and `vmesh
	// check`. Optional.
	Version string
	// Dev marks a throw-away single-host agent (`vmesh agent -dev`).
	// Optional.
	Dev bool
}

// Agent is one host's vmesh: CA (server and/or client), discovery, proxy
// and rules, with the admin API and the control socket.
type Agent struct {
	opts Options
	log  *slog.Logger

	mu  sync.Mutex // guards cfg during reloads
	cfg Config

	reg      *prometheus.Registry
	db       *bolt.DB
	caServer *ca.Server
	caClient *ca.Client
	disc     *discovery.Discovery
	prx      *proxy.Proxy
	dns      *names.DNSServer
	fds      *fdStore // listening sockets kept across restarts (fdstore.go)
	applier  *rules.Applier
	verifier *ca.Verifier // the proxy's: revocations go to it
	ruleset  *rules.Ruleset
	advAddr  netip.Addr

	ready     readiness
	rulesView rulesView      // /v1/status's cached view of the installed rules
	cat       catalogAdapter // the proxy's view of the catalog (VIPs included)
	adminLn   net.Listener
	ctlLn     net.Listener
	adminSrv  *http.Server
	ctlSrv    *http.Server

	everReady      atomic.Bool  // the host took traffic at least once
	rulesInstalled atomic.Bool  // applier and ruleset are set and were applied once
	phase          atomic.Int32 // how far start got: phaseCA, phaseDiscovery, phaseProxy
	cancelServe    context.CancelFunc

	closeOnce sync.Once
}

// Start-up phases (Agent.phase): the subsystem fields up to that phase are
// set and may be read by other goroutines.
const (
	phaseCA        = 1 + iota // caServer, caClient
	phaseDiscovery            // disc
	phaseProxy                // prx, listening
)

// New checks opts and builds the agent; it starts nothing and touches
// neither the network nor the disk.
func New(opts Options) (*Agent, error) {
	if err := opts.Config.Validate(); err != nil {
		return nil, err
	}
	if opts.Config.Gossip.KeyFile == "" && !opts.Config.Gossip.Insecure && !opts.Dev {
		return nil, errors.New("starting the agent: gossip.key_file is not set: unencrypted gossip lets anyone who reaches the gossip port join the mesh; " +
			"make a key with `vmesh keygen /etc/vmesh/gossip.key`, copy it to every host and set gossip.key_file (or set gossip.insecure = true to accept the risk)")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Notify == nil {
		opts.Notify = func(state string) { daemon.SdNotify(false, state) }
	}
	a := &Agent{opts: opts, log: opts.Logger.With("subsystem", "agent"), cfg: opts.Config}
	a.rulesView.check = func(ctx context.Context) (string, string, error) {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		cfg := a.config()
		drift, err := a.applier.Installed(ctx, rules.Build(cfg.RulesState(a.uid())))
		return drift, a.applier.Backend(), err
	}
	a.ready.set("starting")
	return a, nil
}

func (a *Agent) uid() uint32 {
	if a.opts.UID != nil {
		return *a.opts.UID
	}
	return uint32(os.Getuid())
}

func (a *Agent) sub(name string) *slog.Logger { return a.opts.Logger.With("subsystem", name) }

// runtimeProcs is the Go runtime's own GOMAXPROCS, the cores available to
// the process, read before any agent changed it: an agent run again in the
// same process (tests) starts from it, not from its predecessor's half.
var runtimeProcs = runtime.GOMAXPROCS(0)

// Run starts everything in an order that never exposes the host to broken
// traffic, and blocks until ctx is done; it then shuts down (see shutdown).
//
// Order: data dir and database; admin API and control socket (so /live and
// /ready answer from the start); CA; discovery (joins in the background);
// proxy listeners; then — only once this host has its certificates and the
// listeners are bound — the iptables rules, /ready, and READY to systemd.
// Redirected traffic therefore always lands on a live proxy that can do
// mTLS, and a host that cannot get certificates keeps its network as it was.
func (a *Agent) Run(ctx context.Context) error {
	cfg := a.config()
	if err := a.openState(cfg); err != nil {
		a.Close()
		return err
	}
	if os.Getenv("GOMAXPROCS") == "" {
		// Before the proxy: its pools spread over this many sessions.
		runtime.GOMAXPROCS(cfg.Node.Procs(runtimeProcs))
	}
	a.reg = prometheus.NewRegistry()
	a.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	adv, err := advertiseAddr(cfg)
	if err != nil {
		a.Close()
		return err
	}
	a.advAddr = adv
	a.fds = newFDStore(a.sub("systemd"))
	if err := a.startAPIs(cfg); err != nil {
		a.Close()
		return err
	}

	// The admin API, the control socket and the proxy outlive ctx: during
	// shutdown /ready answers 503 and established connections drain. Close
	// ends them. Everything else stops with ctx.
	serveCtx, cancelServe := context.WithCancel(context.Background())
	a.cancelServe = cancelServe
	runCtx, cancelRun := context.WithCancel(ctx)
	defer cancelRun()
	g, gctx := errgroup.WithContext(runCtx)
	g.Go(func() error { return serveUntil(serveCtx, a.adminSrv, a.adminLn) })
	g.Go(func() error { return serveUntil(serveCtx, a.ctlSrv, a.ctlLn) })

	if err := a.start(gctx, serveCtx, g, cfg); err != nil {
		return a.finish(g, cancelRun, err)
	}
	a.everReady.Store(true)
	a.fds.Release() // sockets of a previous configuration nothing took
	a.log.Info("vmesh is ready", "node", cfg.NodeName(), "identity", a.caClient.NodeID(),
		"outbound", a.prx.OutboundAddr(), "inbound", a.prx.InboundAddr(), "rules", cfg.Rules.Enabled, "cores", runtime.GOMAXPROCS(0))
	// Start-up (CA, certificates, first rules) leaves garbage behind: give
	// its pages back now rather than at the runtime's leisure, and let the
	// kernel reclaim the executable's pages start-up touched, so an idle
	// agent's RSS is its working set. This comes last, after the log line:
	// code that runs after it faults its pages back in.
	debug.FreeOSMemory()
	if _, err := pageOutExecutable(); err != nil {
		a.log.Debug("trimming resident memory", "err", err)
	}
	a.ready.set("")
	a.opts.Notify(daemon.SdNotifyReady)

	<-gctx.Done()
	return a.finish(g, cancelRun, nil)
}

// start builds and starts the subsystems in order (see Run) and returns
// once the host is ready to take traffic.
func (a *Agent) start(gctx, serveCtx context.Context, g *errgroup.Group, cfg Config) error {
	if err := a.buildCA(cfg); err != nil {
		return err
	}
	if a.caServer != nil {
		g.Go(func() error { return a.caServer.Run(gctx) })
	}
	g.Go(func() error { return a.caClient.Run(gctx) })
	expired := a.caClient.Expired
	a.ready.check.Store(&expired)
	a.phase.Store(phaseCA)

	if err := a.buildDiscovery(cfg); err != nil {
		return err
	}
	g.Go(func() error { return a.disc.Run(gctx) })
	a.phase.Store(phaseDiscovery)

	if err := a.buildProxy(cfg); err != nil {
		return err
	}
	if err := a.prx.Listen(); err != nil {
		return fmt.Errorf("binding proxy listeners: %w", err)
	}
	if a.fds.Resumed() {
		// A restart: the rules already send connections to the kept
		// sockets, and some wait there. Serve them once the catalog knows
		// the mesh again, or they would be refused as unknown.
		a.waitCatalog(gctx, 5*time.Second)
	}
	g.Go(func() error { return a.prx.Serve(serveCtx) })
	g.Go(func() error { a.applyRevocations(gctx, a.verifier, cfg.CA.TrustDomain); return nil })
	a.phase.Store(phaseProxy)
	if err := a.buildDNS(cfg); err != nil {
		return err
	}
	if a.dns != nil {
		// Like the proxy, it answers until Close: queries keep being
		// captured while established connections drain.
		g.Go(func() error { return a.dns.Serve(serveCtx) })
	}

	// Wait for certificates before redirecting anything.
	a.ready.set("waiting for certificates from the CA")
	if err := a.waitIdentity(gctx); err != nil {
		return err
	}
	if !cfg.Rules.Enabled {
		return nil
	}
	if err := a.buildRules(cfg); err != nil {
		return err
	}
	a.ready.set("installing iptables rules")
	if err := a.applier.Apply(gctx, a.ruleset); err != nil {
		return fmt.Errorf("installing iptables rules: %w", err)
	}
	if err := installVIPRoute(gctx, cfg.Proxy.VIPRange); err != nil {
		return fmt.Errorf("routing the service VIP range: %w", err)
	}
	a.rulesView.invalidate()
	a.rulesInstalled.Store(true)
	return nil
}

// finish shuts down, stops the subsystems and waits for them. It returns
// the first real error: the cause, else a subsystem's; a cancellation is
// the normal way to stop and is not an error.
func (a *Agent) finish(g *errgroup.Group, cancelRun context.CancelFunc, cause error) error {
	a.shutdown()
	cancelRun()
	werr := g.Wait()
	for _, err := range []error{cause, werr} {
		if err != nil && !errors.Is(err, context.Canceled) {
			return err
		}
	}
	return nil
}

// shutdown: not ready; leave the cluster (peers stop sending new
// connections at once); drain established connections for drain_timeout;
// then remove the rules when on_stop = "remove"; close everything.
//
// The rules go last: an established redirected connection depends on its
// NAT translation, which with the nft backend dies with vmesh's nat rules
// (the proxy's FIN would leave as 127.0.0.1:4140 and the app would see a
// reset or hang). While draining, new redirected connections are refused
// (fail closed); with on_stop = "keep" that goes on until the agent
// returns.
//
// `systemctl restart` therefore ends a host's established meshed
// connections once drain_timeout has passed (the new process does not
// inherit them), and refuses new ones from SIGTERM until the new process
// is ready: long-lived connections must reconnect.
func (a *Agent) shutdown() {
	cfg := a.config()
	a.opts.Notify(daemon.SdNotifyStopping)
	a.ready.set("shutting down")
	// Under systemd with the sockets in its store, the rules are left to
	// ExecStopPost (`vmesh agent --cleanup`, run as root): it sees whether
	// systemd is restarting the agent (keep them: connections queue at the
	// kept sockets, none goes out unproxied) or stopping it (remove them).
	// The agent itself can ask systemd only as root or with D-Bus; when it
	// learns of a restart it also stays in the cluster (it is back in
	// seconds).
	// Deferring needs a unit whose ExecStopPost cleans up (ours says so
	// with VMESH_STOPPOST_CLEANUP=1); otherwise only a restart systemd
	// confirmed keeps them.
	restart, deferRules := false, false
	if a.fds != nil && a.fds.Stored() && a.everReady.Load() && os.Getenv("INVOCATION_ID") != "" {
		var err error
		restart, err = restartJob(context.Background())
		deferRules = restart || os.Getenv("VMESH_STOPPOST_CLEANUP") == "1"
		a.log.Info("stopping under systemd", "restart", restart, "why_unknown", err, "rules_left_to_exec_stop_post", deferRules)
	}
	if a.disc != nil && !restart {
		if err := a.disc.Leave(2 * time.Second); err != nil {
			a.log.Warn("leaving the cluster", "err", err)
		}
	}
	if a.prx != nil {
		ctx, cancel := context.WithTimeout(context.Background(), cfg.Node.DrainTimeout)
		if err := a.prx.Shutdown(ctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
			a.log.Warn("draining connections", "err", err)
		}
		cancel()
	}
	// A run that never became ready removes its rules whatever on_stop
	// says: they would point at a proxy that never served.
	if a.applier != nil && !deferRules && (cfg.Rules.OnStop == "remove" || !a.everReady.Load()) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := a.applier.Uninstall(ctx); err != nil {
			a.log.Error("removing iptables rules", "err", err)
		}
		if err := removeVIPRoute(ctx, cfg.Proxy.VIPRange); err != nil {
			a.log.Error("removing the service VIP route", "err", err)
		}
		cancel()
	}
	a.Close()
}

// Close releases everything; safe to call more than once and after a
// partial start.
func (a *Agent) Close() error {
	a.closeOnce.Do(func() {
		if a.cancelServe != nil {
			a.cancelServe()
		}
		if a.prx != nil {
			a.prx.Close()
		}
		if a.dns != nil {
			a.dns.Close()
		}
		if a.disc != nil {
			a.disc.Close()
		}
		if a.caClient != nil {
			a.caClient.Close()
		}
		if a.caServer != nil {
			a.caServer.Close()
		}
		if a.adminSrv != nil {
			a.adminSrv.Close()
		} else if a.adminLn != nil {
			a.adminLn.Close()
		}
		if a.ctlSrv != nil {
			a.ctlSrv.Close()
		} else if a.ctlLn != nil {
			a.ctlLn.Close()
		}
		if a.ctlLn != nil {
			os.Remove(a.config().Admin.Socket)
		}
		if a.db != nil {
			a.db.Close()
		}
	})
	return nil
}

func (a *Agent) config() Config {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cfg
}

// openState creates the data dir (0700) and opens the agent's database.
func (a *Agent) openState(cfg Config) error {
	if err := os.MkdirAll(cfg.Node.DataDir, 0o700); err != nil {
		return fmt.Errorf("creating data dir: %w", err)
	}
	path := filepath.Join(cfg.Node.DataDir, "vmesh.db")
	db, err := openDB(path)
	if err != nil {
		return err
	}
	a.db = db
	return nil
}

// openDB opens the agent's bbolt file and checks it: bbolt panics (or
// faults on its memory map) on some corruptions, which must end in an
// error that names the file and what to do, not a crash.
func openDB(path string) (db *bolt.DB, err error) {
	corrupt := func(why any) error {
		return fmt.Errorf("opening %s: the state database is corrupt (%v): stop the agent, move the file away (mv %s %s.corrupt) and start again; "+
			"the host then needs a join token (ca.token, from `vmesh token create --node NAME` on a CA host) and relearns its peers from gossip.join", path, why, path, path)
	}
	if fi, serr := os.Stat(path); serr == nil && fi.Size() > 0 && fi.Size()%int64(os.Getpagesize()) != 0 {
		return nil, corrupt(fmt.Sprintf("size %d is not a whole number of pages", fi.Size()))
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			if db != nil {
				db.Close()
			}
			db, err = nil, corrupt(r)
		}
	}()
	db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("opening %s: it is locked: is another agent running with this data dir?", path)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrChecksum), errors.Is(err, bolterrors.ErrVersionMismatch):
		return nil, corrupt(err)
	case err != nil:
		return nil, fmt.Errorf("opening state database %s: %w", path, err)
	}
	// The file is small (identity, peers, versions): check every page.
	cerr := db.View(func(tx *bolt.Tx) error {
		var errs []error
		for e := range tx.Check() {
			errs = append(errs, e)
		}
		return errors.Join(errs...)
	})
	if cerr != nil {
		db.Close()
		return nil, corrupt(cerr)
	}
	return db, nil
}

func (a *Agent) startAPIs(cfg Config) error {
	ln, err := a.fds.listener("admin", "tcp", cfg.Admin.Addr.String())
	if err != nil {
		return fmt.Errorf("binding admin API: %w", err)
	}
	a.adminLn = ln
	a.adminSrv = &http.Server{Handler: adminMux(a.reg, &a.ready, a.views()), ReadHeaderTimeout: 10 * time.Second}
	cl, err := listenControl(cfg.Admin.Socket)
	if err != nil {
		return err
	}
	a.ctlLn = cl
	a.ctlSrv = &http.Server{Handler: a.controlMux(), ReadHeaderTimeout: 10 * time.Second}
	return nil
}

// serveUntil serves srv on ln until ctx is done.
func serveUntil(ctx context.Context, srv *http.Server, ln net.Listener) error {
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// caDir is where the CA material lives.
func caDir(cfg Config) string {
	if cfg.CA.Dir != "" {
		return cfg.CA.Dir
	}
	return filepath.Join(cfg.Node.DataDir, "ca")
}

func (a *Agent) buildCA(cfg Config) error {
	var err error
	if cfg.CA.Role == ca.RoleServer {
		a.caServer, err = ca.NewServer(ca.ServerOptions{
			Config:     cfg.CA,
			Dir:        caDir(cfg),
			DBPath:     filepath.Join(cfg.Node.DataDir, "ca.db"),
			URL:        "https://" + netip.AddrPortFrom(a.advAddr, cfg.CA.ListenAddr.Port()).String(),
			Logger:     a.sub("ca-server"),
			Registerer: a.reg,
		})
		if err != nil {
			return fmt.Errorf("starting the CA: %w", err)
		}
	}
	token := cfg.CA.Token
	if cfg.CA.TokenFile != "" {
		b, err := os.ReadFile(cfg.CA.TokenFile)
		switch {
		case err == nil:
			token = strings.TrimSpace(string(b))
		case errors.Is(err, os.ErrNotExist):
			// Fine once the identity is in the database.
		default:
			return fmt.Errorf("reading ca.token_file: %w", err)
		}
	}
	a.caClient, err = ca.NewClient(ca.ClientOptions{
		Config:           cfg.CA,
		NodeName:         cfg.NodeName(),
		Services:         serviceNames(cfg),
		DB:               a.db,
		Token:            token,
		LocalServer:      a.caServer,
		OutboundIdentity: cfg.Proxy.ClientIdentity,
		Logger:           a.sub("ca"),
		Registerer:       a.reg,
	})
	if err != nil {
		return fmt.Errorf("starting the certificate client: %w", err)
	}
	return nil
}

func (a *Agent) waitIdentity(ctx context.Context) error {
	t := time.NewTicker(15 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-a.caClient.Ready():
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			a.log.Warn("still waiting for certificates from the CA: no traffic is redirected until they arrive")
		}
	}
}

func (a *Agent) buildDiscovery(cfg Config) error {
	var keys [][]byte
	if cfg.Gossip.KeyFile != "" {
		k, err := discovery.ReadKeyFile(cfg.Gossip.KeyFile)
		if err != nil {
			return fmt.Errorf("reading gossip.key_file: %w", err)
		}
		keys = k
	} else {
		a.log.Warn("gossip is not encrypted: set gossip.key_file (make a key with `vmesh keygen`)")
	}
	var roles []string
	if cfg.CA.Role == ca.RoleServer {
		roles = append(roles, "ca")
	}
	d, err := discovery.New(discovery.Options{
		Config:        cfg.Gossip,
		NodeName:      cfg.NodeName(),
		AdvertiseAddr: a.advAddr,
		AgentVersion:  a.opts.Version,
		// Health is checked where the inbound proxy connects (each
		// service's address, by default loopback): healthy means reachable
		// through the mesh.
		CheckAddr:   netip.AddrFrom4([4]byte{127, 0, 0, 1}),
		ProxyPort:   cfg.Proxy.InboundAddr.Port(),
		TrustDomain: cfg.CA.TrustDomain,
		Roles:       roles,
		DB:          a.db,
		Keys:        keys,
		// Each host's entry is signed with its node SVID; peers keep only
		// entries signed by that host for services the CA granted it.
		Revocations: revocationVerifier{roots: a.caClient.Roots, td: cfg.CA.TrustDomain},
		Signer:      a.caClient,
		Verifier:    nodeVerifier{ca.NewNodeVerifier(a.caClient.Roots, cfg.CA.TrustDomain)},
		Logger:      a.sub("discovery"),
		Registerer:  a.reg,
	})
	if err != nil {
		return fmt.Errorf("starting discovery: %w", err)
	}
	if err := d.SetLocal(discoveryServices(cfg)); err != nil {
		return fmt.Errorf("publishing local services: %w", err)
	}
	a.disc = d
	return nil
}

func (a *Agent) buildProxy(cfg Config) error {
	// Peers are verified as the CA defines an SVID: chain to the mesh roots
	// (none yet: refuse), one spiffe URI SAN of a node or service in our
	// trust domain, the right key usages; verdicts are cached per leaf.
	verifier := ca.NewVerifier(a.caClient.Roots, cfg.CA.TrustDomain)
	a.verifier = verifier
	p, err := proxy.New(cfg.Proxy, proxy.Options{
		VerifyPeer: verifier.Verify,
		Dialer:     proxy.MarkDialer(cfg.Rules.ProxyMark, cfg.Proxy.ConnectTimeout),
		Listen:     a.fds.listener,
		Catalog:    a.catalog(cfg),
		Identity:   a.caClient,
		Services:   proxyServices(cfg),
		Logger:     a.sub("proxy"),
		Registerer: a.reg,
	})
	if err != nil {
		return fmt.Errorf("starting the proxy: %w", err)
	}
	p.SetPolicies(servicePolicies(cfg))
	a.prx = p
	return nil
}

func (a *Agent) buildRules(cfg Config) error {
	opts := cfg.Rules.ApplierOptions()
	opts.Logger = a.sub("rules")
	ap, err := rules.NewApplier(opts)
	if err != nil {
		return err
	}
	a.applier = ap
	a.ruleset = rules.Build(cfg.RulesState(a.uid()))
	return nil
}

// revocationVerifier gives discovery the CA's revocation check.
type revocationVerifier struct {
	roots func() *x509.CertPool
	td    string
}

func (r revocationVerifier) VerifyRevocation(blob []byte) (string, error) {
	rev, err := ca.VerifyRevocation(blob, r.roots(), r.td)
	if err != nil {
		return "", err
	}
	return rev.Node, nil
}

// applyRevocations hands every revocation discovery holds to the proxies'
// verifier (peers' certificates of a revoked node are refused from then on)
// and, on a CA host, to the CA (it refuses the node's renewals too), as
// they arrive.
func (a *Agent) applyRevocations(ctx context.Context, verifier *ca.Verifier, td string) {
	changed, stop := a.disc.Subscribe()
	defer stop()
	applied := map[string]bool{}
	for {
		for _, blob := range a.disc.Revocations() {
			if applied[string(blob)] {
				continue
			}
			rev, err := ca.VerifyRevocation(blob, a.caClient.Roots(), td)
			if err != nil {
				continue // discovery verified it; the roots may have changed
			}
			applied[string(blob)] = true
			verifier.Revoke(rev)
			if a.caServer != nil {
				if _, err := a.caServer.ApplyRevocation(blob); err != nil {
					a.log.Error("applying a revocation from another CA host", "revoked_node", rev.Node, "err", err)
				}
			}
			a.log.Warn("node revoked: its certificates are refused from now on", "revoked_node", rev.Node, "at", rev.At)
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}

// waitCatalog waits until every live member's catalog entry arrived (at
// least one member besides this host), or for at most max.
func (a *Agent) waitCatalog(ctx context.Context, max time.Duration) {
	start := time.Now()
	ch, unsub := a.disc.Subscribe()
	defer unsub()
	timer := time.NewTimer(max)
	defer timer.Stop()
	cfg := a.config()
	self := cfg.NodeName()
	for {
		// The catalog snapshot (what the proxy resolves with), not the
		// member list: entries reach the snapshot a moment later.
		have := map[string]bool{}
		for _, e := range a.disc.Catalog() {
			have[e.Node] = true
		}
		others, missing := 0, 0
		for _, m := range a.disc.Members() {
			if m.Name == self || m.State != "alive" {
				continue
			}
			others++
			if !have[m.Name] {
				missing++
			}
		}
		if others > 0 && missing == 0 {
			a.log.Info("catalog restored after the restart", "members", others, "took", time.Since(start).Round(time.Millisecond))
			return
		}
		if others == 0 && time.Since(start) > time.Second {
			return // alone: nothing to wait for
		}
		select {
		case <-ch:
		case <-time.After(50 * time.Millisecond):
		case <-timer.C:
			a.log.Warn("serving before the catalog is complete", "members", others, "without_entry", missing, "waited", max)
			return
		case <-ctx.Done():
			return
		}
	}
}

// nodeVerifier gives discovery the CA's node certificate checks.
type nodeVerifier struct{ v *ca.NodeVerifier }

var _ discovery.CertVerifier = nodeVerifier{}

func (n nodeVerifier) VerifyNodeChain(chain [][]byte) (discovery.NodeCert, error) {
	c, err := n.v.VerifyNodeChain(chain)
	if err != nil {
		return discovery.NodeCert{}, err
	}
	return discovery.NodeCert{Node: c.Node, Services: c.Services, Key: c.Key, NotAfter: c.NotAfter}, nil
}

// catalogAdapter gives the proxy discovery's lookups in its own terms. The
// identity a server must present is derived from the service's name, not
// taken from gossip: only hosts the CA granted the service hold that SVID,
// so a forged catalog entry cannot make the proxy accept another identity.
type catalogAdapter struct {
	d     *discovery.Discovery
	td    string
	self  string    // this host's node name: its endpoints are Local
	cache *sync.Map // service -> *adaptedEndpoints, converted once per generation
	vips  *vipCache // the services' VIPs, rebuilt when the catalog changes
}

// vipCache holds the VIP table of one catalog generation.
type vipCache struct {
	prefix netip.Prefix
	cur    atomic.Pointer[vipTable]
}

type vipTable struct {
	gen uint64
	t   *names.Table
}

// table returns the VIP table for the catalog's current generation.
func (c catalogAdapter) vipTable() *names.Table {
	_, gen := c.d.ServiceEndpoints("")
	if v := c.vips.cur.Load(); v != nil && v.gen == gen {
		return v.t
	}
	var svcs []string
	for _, n := range c.d.Catalog() {
		for _, s := range n.Services {
			svcs = append(svcs, s.Name)
		}
	}
	t := names.NewTable(c.vips.prefix, svcs)
	c.vips.cur.Store(&vipTable{gen: gen, t: t})
	return t
}

// adaptedEndpoints are a service's endpoints converted for the proxy, for
// one catalog generation.
type adaptedEndpoints struct {
	gen uint64
	eps []proxy.Endpoint
}

var _ proxy.Catalog = catalogAdapter{}

// catalog returns the proxy's view of the catalog (built once per agent).
func (a *Agent) catalog(cfg Config) catalogAdapter {
	if a.cat.d == nil {
		a.cat = catalogAdapter{d: a.disc, td: cfg.CA.TrustDomain, self: cfg.NodeName(), cache: new(sync.Map), vips: &vipCache{prefix: cfg.Proxy.VIPRange.Masked()}}
	}
	return a.cat
}

// Resolve says what an outbound destination is: a declared service port of
// a mesh host (DestEndpoint), another address of a mesh host (DestMeshHost:
// never in clear), or an address the mesh does not know (DestUnknown).
func (c catalogAdapter) Resolve(addr netip.AddrPort) proxy.Destination {
	if c.vips != nil && c.vips.prefix.Contains(addr.Addr().Unmap()) {
		return c.resolveVIP(addr)
	}
	if e, ok := c.d.Lookup(addr); ok {
		ep := c.endpoint(e)
		return proxy.Destination{Kind: proxy.DestEndpoint, Endpoint: ep, Service: ep.Service}
	}
	if c.d.MemberAddr(addr.Addr()) {
		return proxy.Destination{Kind: proxy.DestMeshHost}
	}
	return proxy.Destination{Kind: proxy.DestUnknown}
}

// resolveVIP says what a connection to a VIP is: the service whose VIP it
// is, with a representative endpoint (a healthy one serving that port if
// any) whose protocol decides detection; a VIP of no service, or a port
// the service does not serve, is a mesh address (refused, never in clear).
func (c catalogAdapter) resolveVIP(addr netip.AddrPort) proxy.Destination {
	svc, ok := c.vipTable().Service(addr.Addr().Unmap())
	if !ok {
		return proxy.Destination{Kind: proxy.DestMeshHost}
	}
	eps, _ := c.Endpoints(svc)
	var rep proxy.Endpoint
	for _, ep := range eps {
		if ep.Addr.Port() != addr.Port() {
			continue
		}
		if rep.Service == "" || (ep.Healthy && !rep.Healthy) {
			rep = ep
		}
	}
	if rep.Service == "" {
		return proxy.Destination{Kind: proxy.DestMeshHost}
	}
	return proxy.Destination{Kind: proxy.DestService, Service: svc, Endpoint: rep}
}

// VIP returns a service's virtual IP (for `vmesh services` and DNS).
func (c catalogAdapter) VIP(service string) (netip.Addr, bool) {
	if c.vips == nil {
		return netip.Addr{}, false
	}
	return c.vipTable().VIP(service)
}

// Endpoints returns the service's endpoints, healthy or not, and the
// catalog generation. The slice is converted once per generation and
// shared.
func (c catalogAdapter) Endpoints(service string) ([]proxy.Endpoint, uint64) {
	es, gen := c.d.ServiceEndpoints(service)
	if v, ok := c.cache.Load(service); ok {
		if a := v.(*adaptedEndpoints); a.gen == gen {
			return a.eps, gen
		}
	}
	out := make([]proxy.Endpoint, len(es))
	for i, e := range es {
		out[i] = c.endpoint(e)
	}
	c.cache.Store(service, &adaptedEndpoints{gen: gen, eps: out})
	return out, gen
}

func (c catalogAdapter) endpoint(e discovery.Endpoint) proxy.Endpoint {
	return proxy.Endpoint{
		Node:      e.Node,
		Service:   e.Service,
		Addr:      e.Addr,
		ProxyAddr: e.Proxy,
		Identity:  ca.ServiceID(c.td, e.Service),
		Protocol:  e.Protocol,
		Opaque:    e.Opaque,
		Healthy:   e.Healthy,
		Weight:    e.Weight,
		Labels:    e.Labels,
		Local:     e.Node == c.self,
	}
}

func serviceNames(cfg Config) []string {
	out := make([]string, 0, len(cfg.Services))
	for _, s := range cfg.Services {
		out = append(out, s.Name)
	}
	return out
}

func discoveryServices(cfg Config) []discovery.Service {
	out := make([]discovery.Service, 0, len(cfg.Services))
	for _, s := range cfg.Services {
		out = append(out, discovery.Service{
			Name:      s.Name,
			Port:      s.Port,
			Protocol:  s.ServiceProtocol(),
			Opaque:    cfg.Proxy.IsOpaque(s.ServiceProtocol(), false, s.Port),
			Weight:    s.ServiceWeight(),
			Labels:    s.Labels,
			Identity:  ca.ServiceID(cfg.CA.TrustDomain, s.Name),
			Health:    s.Health,
			CheckAddr: s.Target().Addr(),
		})
	}
	return out
}

func proxyServices(cfg Config) []proxy.LocalService {
	out := make([]proxy.LocalService, 0, len(cfg.Services))
	for _, s := range cfg.Services {
		out = append(out, proxy.LocalService{
			Name:     s.Name,
			Port:     s.Port,
			Protocol: s.ServiceProtocol(),
			Policy:   s.Policy,
			Allow:    s.Allow,
			Target:   s.Target(),
		})
	}
	return out
}
