package discovery

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/bbolt"
)

// Member states, as Members reports them.
const (
	StateAlive   = "alive"
	StateSuspect = "suspect"
	StateDead    = "dead"
	StateLeft    = "left"
)

// Tunables that are not configuration.
const (
	maxEntries          = 1 << 16                // peer entries kept (refused beyond)
	pullBackoff         = 2 * time.Second        // between two pulls of one host's entry
	antiEntropyEvery    = 250 * time.Millisecond // check metadata versions against entries
	pullGrace           = 500 * time.Millisecond // a newer version seen that long is pulled
	maxPullsPerTick     = 32
	reconnectTimeout    = 24 * time.Hour   // stop reconnecting to a dead host after
	unknownEntryTTL     = 10 * time.Minute // entries of hosts never seen as members
	updateMetaWait      = time.Second      // UpdateNode timeout
	sendTimeout         = 5 * time.Second
	workQueueLen        = 1024
	maxSends            = 64                    // reliable sends (TCP dials) in flight
	rebuildGap          = 50 * time.Millisecond // at most one snapshot rebuild per gap
	fullRebuildEvery    = 10 * time.Second      // a snapshot is rebuilt from every entry at least this often
	relayRetransmitMult = 2
	reconnectPerTick    = 3
)

// Options are Discovery's dependencies.
type Options struct {
	// Config is the [gossip] section. Required; must pass Validate.
	Config Config
	// NodeName is this host's name in the mesh. Required.
	NodeName string
	// AdvertiseAddr is the address peers reach this host on, for gossip and
	// for its services; health checks dial the services there. Required.
	AdvertiseAddr netip.Addr
	// ProxyPort is the port of this host's inbound proxy. Required.
	ProxyPort uint16
	// TrustDomain of the SPIFFE IDs. Required.
	TrustDomain string
	// Identity is this host's SPIFFE ID. Default
	// spiffe://<TrustDomain>/node/<NodeName>.
	Identity string
	// Roles are small facts about the host put in its gossip metadata (e.g.
	// "ca"). Optional.
	Roles []string
	// AgentVersion is the agent's version, put in the gossip metadata so
	// that `vmesh members` shows what each host runs (at most 40 bytes).
	// Optional.
	AgentVersion string
	// DB keeps the peers this host has seen and its catalog version, in
	// buckets named "discovery/...". Optional: nil forgets them on restart.
	DB *bbolt.DB
	// Keys are the gossip encryption keys, the first used for sending (see
	// ReadKeyFile). Optional: none means unencrypted gossip.
	Keys [][]byte
	// Logger. Optional: nil discards. Memberlist's own lines go to it at
	// debug level.
	Logger *slog.Logger
	// Registerer for the metrics. Optional.
	Registerer prometheus.Registerer
	// Transport replaces memberlist's UDP/TCP transport. Optional, for tests.
	Transport memberlist.Transport
	// CheckAddr is the address health checks dial the local services at.
	// Optional: the zero value means AdvertiseAddr. node sets the address
	// the inbound proxy connects to (loopback), so "healthy" means "the mesh
	// can reach it".
	CheckAddr netip.Addr
	// Signer signs this host's catalog entry with its node SVID. Optional:
	// nil publishes it unsigned, which peers with a Verifier refuse.
	Signer Signer
	// Verifier checks the node SVIDs that sign peers' entries: with it,
	// only entries signed by spiffe://TD/node/<that host>, whose services
	// the CA granted that host, are kept. Optional: nil accepts any entry
	// from a gossip-key holder (tests, single hosts).
	Verifier CertVerifier
	// Revocations verifies the CA's revocations, which Discovery spreads to
	// every host (PublishRevocation, Revocations). Optional: nil ignores
	// them.
	Revocations RevocationVerifier
	// Tune adjusts the memberlist configuration just before it is used.
	// Optional, for tests (e.g. shorter probe intervals); production keeps
	// memberlist's LAN defaults.
	Tune func(*memberlist.Config)
}

// Discovery is one host's membership in the gossip cluster and its view of
// the service catalog. Create it with New, start it with Run, stop it with
// Leave (graceful) and Close.
//
// Lock order: memberlist calls the delegate with its own locks held, and the
// delegate takes mu; so nothing may call into memberlist while holding mu.
type Discovery struct {
	log       *slog.Logger
	cfg       Config
	name      string
	identity  string
	td        string
	advertise netip.Addr
	checkAt   netip.Addr // Options.CheckAddr
	proxyPort uint16
	roles     []string
	agent     string // Options.AgentVersion
	db        *bbolt.DB
	keyring   *memberlist.Keyring // nil: unencrypted
	transport memberlist.Transport
	tune      func(*memberlist.Config)
	// timeScale multiplies the package's timers (dur). It is 1 except in
	// the many-host simulation (bench_test.go), which runs the protocol
	// slower than real time when its hosts need more CPU than the machine
	// has.
	timeScale time.Duration
	metrics   *metrics
	queue     *memberlist.TransmitLimitedQueue // this host's own entry
	relay     *memberlist.TransmitLimitedQueue // peers' entries passed on
	http      *http.Client

	revVerifier RevocationVerifier // Options.Revocations
	signer      Signer             // Options.Signer
	verifier    CertVerifier       // Options.Verifier

	refusedLog atomic.Int64  // unix nanoseconds of the last refusal logged at warn
	sends      chan struct{} // bounds the reliable sends in flight

	snap     atomic.Pointer[snapshot]
	meta     atomic.Pointer[[]byte]
	numAlive atomic.Int64 // members alive, self included (broadcast fan-out)
	diag     diag
	left     atomic.Bool // Leave was called: stop joining

	dirty  chan struct{} // snapshot must be rebuilt
	slow   chan struct{} // metadata and bbolt need an update
	work   chan func()   // network sends
	ready  chan struct{} // closed when memberlist listens
	stop   chan struct{} // closed by Close
	wg     sync.WaitGroup
	lifeMu sync.Mutex // serialises Run's start, Leave and Close
	closed bool       // under lifeMu

	subMu sync.Mutex
	subs  map[chan struct{}]struct{}

	mu          sync.Mutex
	ml          *memberlist.Memberlist
	runCtx      context.Context // for health checkers; nil before Run
	version     uint64
	local       []localService
	self        *NodeEntry
	selfRaw     []byte
	entries     map[string]*peerEntry
	members     map[string]*member
	pullAt      map[string]pull
	newerSince  map[string]time.Time // a newer version than held was first seen in metadata
	changed     map[string]struct{}  // hosts whose entry or state changed since the last rebuild
	rebuildMu   sync.Mutex           // held by rebuild, before mu
	lastFull    time.Time            // of the last rebuild from every entry
	storedPeers map[string]storedPeer
	dirtyPeers  map[string]*storedPeer // nil value: delete
	saveVersion bool
	meshAddrs   map[netip.Addr]struct{}  // every member address ever seen (bbolt "discovery/addrs")
	revocations map[string][]byte        // verified revocations by key
	dirtyAddrs  []netip.Addr             // not yet written to bbolt
	certs       map[certID]*heldCert     // verified signing certificates of peers
	pending     map[string]*pendingEntry // signed entries waiting for their certificate
	certPullAt  map[certID]time.Time     // last request for a certificate
	selfCertID  certID                   // this host's signing certificate
	selfCert    []byte                   // its msgCert encoding; nil before it signed
	signedLeaf  []byte                   // the node SVID leaf the published entry is signed with
	checkGen    uint64
	leaving     bool // Leave was called: publish no services
	selfAddr    netip.AddrPort
	metaSent    uint64 // version last put in memberlist's metadata (slowLoop only)
}

type localService struct {
	Service
	health  Health
	gen     uint64 // checker generation owning health
	key     string // what the checker depends on
	stop    context.CancelFunc
	running bool
}

type peerEntry struct {
	entry *NodeEntry
	raw   []byte // encoded msgEntry or msgSigned, owned
	cert  certID // msgSigned: the signing certificate
	at    time.Time
}

// pull is the last request for a host's entry.
type pull struct {
	at      time.Time
	version uint64
}

type member struct {
	addr  netip.AddrPort
	state string // StateAlive, StateDead or StateLeft (suspect is memberlist's)
	meta  nodeMeta
	since time.Time
	// clock is the member's clock minus ours at its latest push/pull
	// (clockAt); clockAt is zero before the first.
	clock   time.Duration
	clockAt time.Time
}

// New checks opts and prepares a Discovery; it starts nothing.
func New(opts Options) (*Discovery, error) {
	if err := opts.Config.Validate(); err != nil {
		return nil, fmt.Errorf("creating discovery: %w", err)
	}
	switch {
	case opts.NodeName == "":
		return nil, errors.New("creating discovery: node name is required")
	case len(opts.NodeName) > maxString:
		return nil, errors.New("creating discovery: node name is too long")
	case !opts.AdvertiseAddr.IsValid():
		return nil, errors.New("creating discovery: advertise address is required")
	case opts.ProxyPort == 0:
		return nil, errors.New("creating discovery: proxy port is required")
	case opts.TrustDomain == "":
		return nil, errors.New("creating discovery: trust domain is required")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Discovery{
		log:         log.With("component", "discovery"),
		cfg:         opts.Config,
		name:        opts.NodeName,
		identity:    opts.Identity,
		td:          opts.TrustDomain,
		advertise:   opts.AdvertiseAddr.Unmap(),
		checkAt:     opts.CheckAddr,
		proxyPort:   opts.ProxyPort,
		roles:       slices.Clone(opts.Roles),
		agent:       opts.AgentVersion,
		db:          opts.DB,
		transport:   opts.Transport,
		tune:        opts.Tune,
		timeScale:   1,
		dirty:       make(chan struct{}, 1),
		slow:        make(chan struct{}, 1),
		work:        make(chan func(), workQueueLen),
		ready:       make(chan struct{}),
		stop:        make(chan struct{}),
		subs:        map[chan struct{}]struct{}{},
		entries:     map[string]*peerEntry{},
		members:     map[string]*member{},
		pullAt:      map[string]pull{},
		newerSince:  map[string]time.Time{},
		changed:     map[string]struct{}{},
		storedPeers: map[string]storedPeer{},
		dirtyPeers:  map[string]*storedPeer{},
		signer:      opts.Signer,
		verifier:    opts.Verifier,
		certs:       map[certID]*heldCert{},
		meshAddrs:   map[netip.Addr]struct{}{},
		revocations: map[string][]byte{},
		revVerifier: opts.Revocations,
		pending:     map[string]*pendingEntry{},
		certPullAt:  map[certID]time.Time{},
		sends:       make(chan struct{}, maxSends),
	}
	if d.identity == "" {
		d.identity = "spiffe://" + d.td + "/node/" + d.name
	}
	if len(opts.Keys) > 0 {
		kr, err := memberlist.NewKeyring(opts.Keys, opts.Keys[0])
		if err != nil {
			return nil, fmt.Errorf("creating discovery: gossip keys: %w", err)
		}
		d.keyring = kr
	}
	d.queue = &memberlist.TransmitLimitedQueue{
		NumNodes:       func() int { return int(d.numAlive.Load()) },
		RetransmitMult: memberlist.DefaultLANConfig().RetransmitMult,
	}
	// Entries passed on go out to fewer peers than the owner's own: every
	// host that got one relays it, so the epidemic needs few sends each
	// (with 2·log10(n) sends, about 0.3 % of hosts miss a change and pull
	// it on the next anti-entropy tick); the owner's count is memberlist's.
	d.relay = &memberlist.TransmitLimitedQueue{
		NumNodes:       func() int { return int(d.numAlive.Load()) },
		RetransmitMult: relayRetransmitMult,
	}
	d.numAlive.Store(1)
	d.http = &http.Client{
		Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true},
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
	d.metrics = newMetrics(d)
	d.diag.onCount = d.metrics.decrypt.Inc
	if err := d.loadStore(); err != nil {
		return nil, fmt.Errorf("creating discovery: %w", err)
	}
	d.mu.Lock()
	d.publishLocked()
	d.mu.Unlock()
	d.rebuild()
	if err := d.metrics.register(opts.Registerer); err != nil {
		return nil, fmt.Errorf("creating discovery: registering metrics: %w", err)
	}
	return d, nil
}

// Ready is closed once the gossip listeners are bound (Run has started).
func (d *Discovery) Ready() <-chan struct{} { return d.ready }

// LocalAddr returns the gossip address this host advertises, once Ready.
func (d *Discovery) LocalAddr() netip.AddrPort {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.selfAddr
}

// Run joins the cluster and keeps this host's part of it going until ctx is
// done or Close is called. It returns an error if the gossip listeners
// cannot be set up. Memberlist keeps running after Run returns, until Close,
// so that Leave can still be called.
func (d *Discovery) Run(ctx context.Context) error {
	d.lifeMu.Lock()
	if d.closed {
		d.lifeMu.Unlock()
		return errors.New("running discovery: already closed")
	}
	d.mu.Lock()
	started := d.ml != nil
	d.mu.Unlock()
	if started {
		d.lifeMu.Unlock()
		return errors.New("running discovery: already running")
	}
	ml, err := d.start()
	if err != nil {
		d.lifeMu.Unlock()
		return err
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	d.mu.Lock()
	d.ml = ml
	d.runCtx = runCtx
	d.mu.Unlock()
	d.wg.Add(4)
	go d.rebuildLoop(runCtx)
	go d.slowLoop(runCtx)
	go d.workLoop(runCtx)
	go d.joinLoop(runCtx)
	d.mu.Lock()
	d.reconcileChecksLocked()
	d.mu.Unlock()
	close(d.ready)
	d.lifeMu.Unlock()
	d.log.Info("gossip started", "addr", d.LocalAddr(), "encrypted", d.keyring != nil)

	select {
	case <-ctx.Done():
	case <-d.stop:
	}
	cancel()
	d.wg.Wait()
	return nil
}

// start builds the memberlist configuration and creates the memberlist.
func (d *Discovery) start() (*memberlist.Memberlist, error) {
	logger := d.memberlistLogger()
	conf := memberlist.DefaultLANConfig()
	conf.Name = d.name
	conf.BindAddr = d.cfg.BindAddr.Addr().String()
	conf.BindPort = int(d.cfg.BindAddr.Port())
	conf.AdvertiseAddr = d.advertise.String()
	conf.AdvertisePort = conf.BindPort
	conf.PushPullInterval = d.cfg.PushPullInterval
	conf.Keyring = d.keyring
	conf.GossipVerifyIncoming = true
	conf.GossipVerifyOutgoing = true
	// memberlist compresses every packet with a fresh LZW writer (about
	// 20 KB allocated per packet): at 200 hosts that was 43 % of all the
	// bytes the agents allocated, and it gains little on our messages,
	// whose signatures and certificates do not compress. Peers that
	// compress are still understood (decompression follows the message).
	conf.EnableCompression = false
	conf.Delegate = &delegate{d}
	conf.Events = &delegate{d}
	conf.Logger = logger
	if d.tune != nil {
		d.tune(conf)
	}
	inner := d.transport
	if inner != nil && conf.BindPort == 0 {
		if ap, ok := inner.(interface{ GetAutoBindPort() int }); ok {
			conf.BindPort = ap.GetAutoBindPort()
			conf.AdvertisePort = conf.BindPort
		}
	}
	if inner == nil {
		nt, err := newNetTransport(d.cfg.BindAddr, logger)
		if err != nil {
			return nil, fmt.Errorf("starting gossip on %s: %w", d.cfg.BindAddr, err)
		}
		if conf.BindPort == 0 {
			conf.BindPort = nt.GetAutoBindPort()
			conf.AdvertisePort = conf.BindPort
		}
		inner = nt
	}
	ct := newCountingTransport(inner, d.metrics)
	conf.Transport = ct
	ml, err := memberlist.Create(conf)
	if err != nil {
		ct.Shutdown()
		return nil, fmt.Errorf("starting gossip: %w", err)
	}
	return ml, nil
}

// Leave tells the cluster this host is going away, waiting up to timeout for
// the message to go out; peers then drop it at once instead of waiting for
// failure detection. Call Close afterwards.
func (d *Discovery) Leave(timeout time.Duration) error {
	d.lifeMu.Lock()
	defer d.lifeMu.Unlock()
	d.mu.Lock()
	ml := d.ml
	d.mu.Unlock()
	if ml == nil || d.closed {
		return nil
	}
	d.left.Store(true)
	// First the catalog: peers drop this host's endpoints and will record
	// it as left (memberlist's events do not tell left from dead).
	d.mu.Lock()
	d.leaving = true
	for i := range d.local {
		if d.local[i].stop != nil {
			d.local[i].stop()
		}
	}
	d.publishLocked()
	d.mu.Unlock()
	d.rebuild()
	// Let the leaving entry make all its transmissions before the leave:
	// after it, this host gossips no more.
	start := time.Now()
	for d.queue.NumQueued() > 0 && time.Since(start) < timeout/2 {
		time.Sleep(5 * time.Millisecond)
	}
	if err := ml.Leave(timeout - time.Since(start)); err != nil {
		return fmt.Errorf("leaving the cluster: %w", err)
	}
	return nil
}

// Close stops gossip without a leave message (peers will see this host
// fail) and waits for Discovery's goroutines. It is idempotent.
func (d *Discovery) Close() error {
	d.lifeMu.Lock()
	if d.closed {
		d.lifeMu.Unlock()
		return nil
	}
	d.closed = true
	close(d.stop)
	d.mu.Lock()
	ml := d.ml
	for i := range d.local {
		if d.local[i].stop != nil {
			d.local[i].stop()
		}
	}
	d.mu.Unlock()
	var err error
	if ml != nil {
		err = ml.Shutdown()
	}
	d.lifeMu.Unlock()
	d.wg.Wait()
	d.flushStore()
	if err != nil {
		return fmt.Errorf("closing discovery: %w", err)
	}
	return nil
}

// SetLocal replaces this host's services (node calls it at start and on
// reload). Health of a service whose port and check are unchanged carries
// over; others start as unknown. It bumps the catalog version and
// broadcasts the entry.
func (d *Discovery) SetLocal(services []Service) error {
	seen := map[string]bool{}
	local := make([]localService, 0, len(services))
	for _, s := range services {
		switch {
		case s.Name == "" || len(s.Name) > maxString:
			return fmt.Errorf("setting local services: invalid name %q", s.Name)
		case s.Port == 0:
			return fmt.Errorf("setting local services: %s: port is required", s.Name)
		case seen[s.Name]:
			return fmt.Errorf("setting local services: %s is declared twice", s.Name)
		case s.Weight < 0 || s.Weight > 1000:
			return fmt.Errorf("setting local services: %s: weight must be 1-1000", s.Name)
		case len(s.Labels) > maxLabels:
			return fmt.Errorf("setting local services: %s: more than %d labels", s.Name, maxLabels)
		}
		switch s.Protocol {
		case "":
			s.Protocol = ProtocolAuto
		case ProtocolAuto, ProtocolHTTP1, ProtocolHTTP2, ProtocolOpaque:
		default:
			return fmt.Errorf("setting local services: %s: unknown protocol %q", s.Name, s.Protocol)
		}
		if err := s.Health.Validate(); err != nil {
			return fmt.Errorf("setting local services: %s: health: %w", s.Name, err)
		}
		if s.Weight == 0 {
			s.Weight = 100
		}
		if s.Identity == "" {
			s.Identity = "spiffe://" + d.td + "/svc/" + s.Name
		}
		s.Labels = cloneMap(s.Labels)
		seen[s.Name] = true
		local = append(local, localService{
			Service: s,
			health:  HealthUnknown,
			key:     fmt.Sprintf("%d|%s|%+v", s.Port, s.CheckAddr, s.Health),
		})
	}
	d.mu.Lock()
	for i := range local {
		for j := range d.local {
			o := &d.local[j]
			if o.Name == local[i].Name && o.key == local[i].key {
				local[i].health, local[i].gen = o.health, o.gen
				local[i].stop, local[i].running = o.stop, o.running
				o.stop, o.running = nil, false // handed over
			}
		}
	}
	for j := range d.local {
		if d.local[j].stop != nil {
			d.local[j].stop()
		}
	}
	old := d.local
	d.local = local
	if size := len(encodeEntry(d.compact(d.localEntryLocked()))); size > maxEntryBytes {
		d.local = old
		d.mu.Unlock()
		return fmt.Errorf("setting local services: the catalog entry would be %d bytes, peers accept %d", size, maxEntryBytes)
	}
	d.reconcileChecksLocked()
	d.publishLocked()
	d.mu.Unlock()
	d.rebuild()
	return nil
}

// localEntryLocked builds this host's entry from the local services, with
// the current version.
func (d *Discovery) localEntryLocked() *NodeEntry {
	e := &NodeEntry{
		Node:      d.name,
		Addrs:     []netip.Addr{d.advertise},
		ProxyPort: d.proxyPort,
		Identity:  d.identity,
		Version:   d.version,
		Services:  make([]ServiceEntry, 0, len(d.local)),
		Leaving:   d.leaving,
	}
	for i := range d.local {
		if d.leaving {
			break
		}
		s := &d.local[i]
		e.Services = append(e.Services, ServiceEntry{
			Name:     s.Name,
			Port:     s.Port,
			Protocol: s.Protocol,
			Opaque:   s.Opaque,
			Health:   s.health,
			Weight:   s.Weight,
			Identity: s.Identity,
			Labels:   s.Labels,
		})
	}
	return e
}

// publishLocked gives the local entry a new version, queues its broadcast
// and asks for the metadata and stored version to follow. The caller
// rebuilds the snapshot.
func (d *Discovery) publishLocked() {
	d.version = max(d.version+1, uint64(time.Now().UnixNano()))
	e := d.localEntryLocked()
	raw := d.signLocked(encodeEntry(d.compact(e)))
	d.self, d.selfRaw = e, raw
	d.changed[d.name] = struct{}{}
	for _, a := range e.Addrs {
		d.noteAddrLocked(a)
	}
	d.broadcast(e.Node, e.Version, raw, false)
	meta := encodeMeta(nodeMeta{version: d.version, proxyPort: d.proxyPort, addrs: e.Addrs, roles: d.roles, agent: d.agent})
	d.meta.Store(&meta)
	d.saveVersion = true
	d.kick(d.slow)
}

// broadcast queues an entry for gossip: whole when small enough to ride in
// a gossip packet, otherwise as a notice that makes peers pull it. A
// peer's entry is passed on fewer times than this host's own, except the
// last entry of a host that left (full): only broadcasts carry it (push/
// pull carries live hosts' entries), and a host that misses it records
// the leaver dead rather than left.
func (d *Discovery) broadcast(node string, version uint64, raw []byte, leaving bool) {
	msg := raw
	if len(raw) > maxBroadcastSize {
		msg = encodeNotice(node, version)
	}
	q := d.queue
	if node != d.name && !leaving {
		q = d.relay
	}
	q.QueueBroadcast(&broadcast{node: node, msg: msg})
}

// broadcast is a queued catalog message; a newer one about the same host
// replaces it in the queue.
type broadcast struct {
	node string
	msg  []byte
}

var _ memberlist.NamedBroadcast = (*broadcast)(nil)

func (b *broadcast) Name() string                                { return b.node }
func (b *broadcast) Invalidates(other memberlist.Broadcast) bool { return false }
func (b *broadcast) Message() []byte                             { return b.msg }
func (b *broadcast) Finished()                                   {}

func (d *Discovery) kick(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// enqueue hands slow work (a network send) to the work goroutine, dropping
// it when the queue is full: every such send is repeated by anti-entropy.
func (d *Discovery) enqueue(f func()) {
	select {
	case d.work <- f:
	default:
		d.metrics.rejected.WithLabelValues(rejectQueueFull).Inc()
	}
}

// rebuildLoop rebuilds the snapshot after changes, and every
// antiEntropyEvery asks hosts whose metadata shows a newer catalog version
// than the entry held for their entry (a broadcast or a reply was lost).
func (d *Discovery) rebuildLoop(ctx context.Context) {
	defer d.wg.Done()
	t := time.NewTicker(d.dur(antiEntropyEvery))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.dirty:
			began := time.Now()
			d.rebuild()
			// A burst of changes (a join brings every host's entry)
			// would otherwise rebuild the snapshot once per entry:
			// O(hosts²) per host. Coalesce what comes in the next
			// rebuildGap into one rebuild, and when a rebuild is slow
			// (a large catalog, a busy machine) wait ten times as long
			// as it took, so that rebuilding never takes more than a
			// tenth of a core.
			select {
			case <-ctx.Done():
				return
			case <-time.After(max(d.dur(rebuildGap), 10*time.Since(began))):
			}
		case <-t.C:
			d.mu.Lock()
			stale := time.Since(d.lastFull) >= d.dur(fullRebuildEvery)
			d.mu.Unlock()
			if d.resignDue() {
				d.mu.Lock()
				d.publishLocked()
				d.mu.Unlock()
				d.rebuild()
			} else if stale {
				// The check against every entry runs even when nothing
				// was recorded as changed (it publishes nothing then).
				d.rebuild()
			}
			d.antiEntropy(time.Now())
		}
	}
}

// antiEntropy pulls the entries of hosts whose metadata has shown a newer
// version than the entry held for longer than pullGrace: the broadcast
// usually arrives first, and pulling at once made every host pull every
// change (a storm of streams at a few hundred hosts). At most
// maxPullsPerTick pulls start per tick.
func (d *Discovery) antiEntropy(now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	pulls := 0
	// newerSince holds the members whose metadata showed a newer version
	// than the entry held (memberAlive adds them): looking only at those
	// keeps a tick cheap at hundreds of hosts.
	for name, since := range d.newerSince {
		held := uint64(0)
		if pe := d.entries[name]; pe != nil {
			held = pe.entry.Version
		}
		m := d.members[name]
		if m == nil || m.state != StateAlive || m.meta.version <= held {
			delete(d.newerSince, name)
			continue
		}
		if now.Sub(since) >= d.dur(pullGrace) && pulls < maxPullsPerTick && d.wantLocked(name, m.meta.version) {
			pulls++
		}
	}
}

// rebuild publishes a new snapshot of the visible entries: this host's and
// those of peers memberlist holds alive (or suspect). It patches the
// previous snapshot with the hosts changed since (d.changed, which every
// change to an entry or a member's state records), and rebuilds from every
// entry at most every fullRebuildEvery, so that a change that was not
// recorded could not linger.
func (d *Discovery) rebuild() {
	// Rebuilds patch the snapshot before them: two at once (the rebuild
	// loop and SetLocal, a health check) would each drop the other's
	// changes.
	d.rebuildMu.Lock()
	defer d.rebuildMu.Unlock()
	prev := d.snap.Load()
	d.mu.Lock()
	visible := func(name string) *NodeEntry {
		if name == d.name {
			return d.self
		}
		pe, m := d.entries[name], d.members[name]
		if pe == nil || m == nil || m.state != StateAlive {
			return nil
		}
		return pe.entry
	}
	var list []*NodeEntry
	var updates map[string]*NodeEntry
	if now := time.Now(); prev == nil || now.Sub(d.lastFull) >= d.dur(fullRebuildEvery) {
		d.lastFull = now
		list = make([]*NodeEntry, 0, len(d.entries)+1)
		list = append(list, d.self)
		for name := range d.entries {
			if e := visible(name); e != nil {
				list = append(list, e)
			}
		}
	} else {
		updates = make(map[string]*NodeEntry, len(d.changed))
		for name := range d.changed {
			updates[name] = visible(name)
		}
	}
	clear(d.changed)
	// The snapshot shares the set of mesh addresses until it grows.
	hosts := prev.hostsOrNil()
	if hosts == nil || len(hosts) != len(d.meshAddrs) {
		hosts = maps.Clone(d.meshAddrs)
	}
	d.mu.Unlock()
	var s *snapshot
	if list != nil {
		s = buildSnapshot(prev, list)
	} else {
		s = patchSnapshot(prev, updates)
	}
	if s == prev {
		if len(hosts) == len(prev.hosts) {
			return // nothing changed
		}
		// Only the mesh addresses grew.
		s = &snapshot{views: prev.views, byIP: prev.byIP, svcs: prev.svcs, services: prev.services}
	}
	s.hosts = hosts
	if prev != nil {
		s.gen = prev.gen + 1
	}
	d.snap.Store(s)
	d.notifySubscribers()
}

// noteAddrLocked records a as a mesh address. Every address ever seen
// (an entry's, a member's, this host's) stays one, kept in bbolt: a host
// whose agent stopped or that left is still never sent to in clear.
func (d *Discovery) noteAddrLocked(a netip.Addr) {
	if !a.IsValid() {
		return
	}
	a = a.Unmap()
	if _, ok := d.meshAddrs[a]; !ok {
		d.meshAddrs[a] = struct{}{}
		d.dirtyAddrs = append(d.dirtyAddrs, a)
		d.kick(d.slow)
	}
}

// dur returns one of the package's timers, scaled by timeScale.
func (d *Discovery) dur(t time.Duration) time.Duration { return t * d.timeScale }

// hostsOrNil returns s's mesh addresses (nil for a nil snapshot).
func (s *snapshot) hostsOrNil() map[netip.Addr]struct{} {
	if s == nil {
		return nil
	}
	return s.hosts
}

func (d *Discovery) workLoop(ctx context.Context) {
	defer d.wg.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case f := <-d.work:
			f()
		}
	}
}

// slowLoop pushes metadata changes into memberlist and writes bbolt.
func (d *Discovery) slowLoop(ctx context.Context) {
	defer d.wg.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.slow:
		}
		d.mu.Lock()
		ml := d.ml
		d.mu.Unlock()
		d.mu.Lock()
		version := d.version
		d.mu.Unlock()
		if !d.left.Load() && version != d.metaSent {
			d.metaSent = version
			if err := ml.UpdateNode(updateMetaWait); err != nil {
				d.log.Debug("updating gossip metadata", "err", err)
			}
		}
		d.flushStore()
	}
}

// sendTo sends msg reliably (TCP) to the member called name, if alive.
//
// Nodes returned by memberlist (Members, LocalNode) point into its live
// state and cannot be read without racing with it; this package only reads
// nodes inside event callbacks and keeps its own copies.
func (d *Discovery) sendTo(name string, msg []byte) {
	d.mu.Lock()
	ml := d.ml
	m := d.members[name]
	var to *memberlist.Node
	if m != nil && m.state == StateAlive {
		to = &memberlist.Node{Name: name, Addr: m.addr.Addr().AsSlice(), Port: m.addr.Port()}
	}
	d.mu.Unlock()
	if to != nil && ml != nil {
		d.send(to, msg)
	}
}

// send sends msg reliably (a TCP dial) on a goroutine of its own, so that
// a slow or unreachable peer never holds up the work goroutine; at most
// maxSends are in flight, beyond that the send is dropped and counted
// (anti-entropy repeats it).
func (d *Discovery) send(to *memberlist.Node, msg []byte) {
	d.mu.Lock()
	ml := d.ml
	d.mu.Unlock()
	if ml == nil {
		return
	}
	select {
	case d.sends <- struct{}{}:
	default:
		d.metrics.rejected.WithLabelValues(rejectQueueFull).Inc()
		return
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer func() { <-d.sends }()
		if err := ml.SendReliable(to, msg); err != nil {
			d.log.Debug("sending catalog message", "to", to.Name, "err", err)
		}
	}()
}

// joinLoop joins the cluster: the configured hosts and the peers remembered
// from earlier runs while this host is alone, retrying every RetryInterval;
// and, once in, a few hosts held dead, so that a healed partition merges.
func (d *Discovery) joinLoop(ctx context.Context) {
	defer d.wg.Done()
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d.joinOnce()
		t.Reset(d.cfg.RetryInterval)
	}
}

func (d *Discovery) joinOnce() {
	if d.left.Load() {
		return
	}
	d.mu.Lock()
	ml := d.ml
	d.mu.Unlock()
	self := d.LocalAddr()
	alone := d.numAlive.Load() <= 1
	var cands []string
	add := func(a netip.AddrPort) {
		if a.IsValid() && a != self && !slices.Contains(cands, a.String()) {
			cands = append(cands, a.String())
		}
	}
	d.mu.Lock()
	if alone {
		for _, j := range d.cfg.Join {
			add(joinAddr(j, d.cfg.BindAddr.Port()))
		}
		for _, p := range d.storedPeers {
			add(p.Addr)
		}
	}
	var dead []netip.AddrPort
	now := time.Now()
	for name, m := range d.members {
		switch {
		case m.state == StateDead && now.Sub(m.since) > reconnectTimeout,
			m.state == StateLeft && now.Sub(m.since) > reconnectTimeout:
			delete(d.members, name)
			delete(d.entries, name)
			d.changed[name] = struct{}{}
		case m.state == StateDead:
			dead = append(dead, m.addr)
		}
	}
	for name, pe := range d.entries {
		if d.members[name] == nil && now.Sub(pe.at) > unknownEntryTTL {
			delete(d.entries, name)
			d.changed[name] = struct{}{}
		}
	}
	d.mu.Unlock()
	rand.Shuffle(len(dead), func(i, j int) { dead[i], dead[j] = dead[j], dead[i] })
	for _, a := range dead[:min(len(dead), reconnectPerTick)] {
		add(a)
	}
	if len(cands) == 0 {
		return
	}
	n, err := ml.Join(cands)
	switch {
	case n > 0:
		d.diag.setJoinError("")
		d.log.Debug("joined", "reached", n, "tried", len(cands))
	case alone:
		if err != nil {
			d.diag.setJoinError(err.Error())
			// The peer answered with gossip this host cannot decrypt: the
			// keys differ. Count it where the operator looks (check).
			if isDecryptFailure(err.Error()) {
				d.diag.noteDecryptFailure(err.Error(), time.Now())
			}
		}
		d.log.Warn("joining the cluster: no peer reached, retrying", "tried", cands, "err", err, "every", d.cfg.RetryInterval)
	}
}

// joinAddr turns a configured join entry ("ip" or "ip:port") into an
// address; a bare IP gets this host's gossip port.
func joinAddr(s string, port uint16) netip.AddrPort {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.AddrPortFrom(a, port)
	}
	return netip.AddrPort{}
}

// Member is one host of the cluster as memberlist sees it.
type Member struct {
	Name      string         `json:"name"`
	Addr      netip.AddrPort `json:"addr"`
	State     string         `json:"state"`
	Services  int            `json:"services"`
	Version   uint64         `json:"version"`
	ProxyPort uint16         `json:"proxy_port"`
	Roles     []string       `json:"roles,omitempty"`
	// Agent is the version of the host's agent ("" if it did not say).
	Agent string `json:"agent,omitempty"`
	// ClockOffset is the host's clock minus this one's, measured at the
	// latest full state exchange with it (to within the network delay);
	// nil before one happened.
	ClockOffset *time.Duration `json:"clock_offset,omitempty"`
}

// Members returns the hosts of the cluster, this one included, sorted by
// name: those alive, and those dead or left in the last 24 hours.
// Memberlist does not expose its suspect state, so a suspect host shows as
// alive until it is declared dead.
func (d *Discovery) Members() []Member {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]Member, 0, len(d.members)+1)
	self := d.selfAddr
	if !self.IsValid() {
		self = netip.AddrPortFrom(d.advertise, d.cfg.BindAddr.Port())
	}
	out = append(out, d.memberLocked(d.name, self, StateAlive))
	for name, m := range d.members {
		out = append(out, d.memberLocked(name, m.addr, m.state))
	}
	slices.SortFunc(out, func(a, b Member) int {
		if a.Name < b.Name {
			return -1
		}
		if a.Name > b.Name {
			return 1
		}
		return 0
	})
	return out
}

func (d *Discovery) memberLocked(name string, addr netip.AddrPort, state string) Member {
	m := Member{Name: name, Addr: addr, State: state}
	if name == d.name {
		m.Services, m.Version, m.ProxyPort, m.Roles, m.Agent = len(d.self.Services), d.self.Version, d.proxyPort, d.roles, d.agent
		return m
	}
	if mm := d.members[name]; mm != nil {
		m.Version, m.ProxyPort, m.Roles, m.Agent = mm.meta.version, mm.meta.proxyPort, mm.meta.roles, mm.meta.agent
		if !mm.clockAt.IsZero() {
			off := mm.clock
			m.ClockOffset = &off
		}
	}
	if pe := d.entries[name]; pe != nil {
		m.Services, m.Version = len(pe.entry.Services), max(m.Version, pe.entry.Version)
	}
	return m
}

func nodeAddr(n *memberlist.Node) netip.AddrPort {
	a, _ := netip.AddrFromSlice(n.Addr)
	return netip.AddrPortFrom(a.Unmap(), n.Port)
}

func cloneMap(m map[string]string) map[string]string {
	if len(m) == 0 {
		return nil
	}
	c := make(map[string]string, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// probe runs one health check against addr.
func (d *Discovery) probe(ctx context.Context, hc *HealthCheck, addr netip.AddrPort) error {
	ctx, cancel := context.WithTimeout(ctx, hc.CheckTimeout())
	defer cancel()
	if hc.CheckType() == "http" {
		u := "http://" + addr.String() + hc.CheckPath()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return err
		}
		req.Header.Set("User-Agent", "vmesh-health-check")
		resp, err := d.http.Do(req)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if resp.StatusCode != hc.Status() {
			return errors.New("status " + strconv.Itoa(resp.StatusCode) + ", want " + strconv.Itoa(hc.Status()))
		}
		return nil
	}
	var dialer net.Dialer
	c, err := dialer.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		return err
	}
	return c.Close()
}

// compact returns e as it goes on the wire: identities that are the
// default for their name (spiffe://TD/node/NAME, spiffe://TD/svc/NAME) are
// left out, and expand puts them back. It saves about a third of a typical
// entry.
func (d *Discovery) compact(e *NodeEntry) *NodeEntry {
	c := *e
	if c.Identity == "spiffe://"+d.td+"/node/"+c.Node {
		c.Identity = ""
	}
	c.Services = slices.Clone(e.Services)
	for i := range c.Services {
		if s := &c.Services[i]; s.Identity == "spiffe://"+d.td+"/svc/"+s.Name {
			s.Identity = ""
		}
	}
	return &c
}

// expand undoes compact on a decoded entry.
func (d *Discovery) expand(e *NodeEntry) {
	if e.Identity == "" {
		e.Identity = "spiffe://" + d.td + "/node/" + e.Node
	}
	for i := range e.Services {
		if s := &e.Services[i]; s.Identity == "" {
			s.Identity = "spiffe://" + d.td + "/svc/" + s.Name
		}
	}
}
