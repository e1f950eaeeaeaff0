package discovery

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/bbolt"
)

// Agents in these tests are real: memberlist over UDP and TCP on their own
// loopback addresses (127.0.77.x), each with its own bbolt file.

// fastTune shortens memberlist's timers so that failure detection takes
// about a second instead of LAN's several. Gossip keeps its LAN
// interval (200ms), so propagation times are those of production.
func fastTune(c *memberlist.Config) {
	c.ProbeInterval = 200 * time.Millisecond
	c.ProbeTimeout = 100 * time.Millisecond
	c.SuspicionMult = 2
	c.TCPTimeout = time.Second
	c.GossipToTheDeadTime = 2 * time.Second
}

type agent struct {
	t      *testing.T
	i      int
	name   string
	addr   netip.Addr
	port   uint16
	dbPath string
	keys   [][]byte
	wrap   func(memberlist.Transport) memberlist.Transport
	// newTransport, if set, makes the agent's transport (test bed hosts).
	newTransport func() memberlist.Transport
	// tweak, if set, adjusts the options before New.
	tweak func(*Options)
	reg   *prometheus.Registry

	d      *Discovery
	db     *bbolt.DB
	cancel context.CancelFunc
	done   chan error
}

// debugLog, when set (e.g. to os.Stderr), receives every agent's debug log,
// memberlist's included.
var debugLog io.Writer

func agentAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{127, 0, 77, byte(10 + i)}) }

// newAgent prepares agent i; start runs it.
func newAgent(t *testing.T, i int) *agent {
	return &agent{
		t:      t,
		i:      i,
		name:   fmt.Sprintf("host-%d", i),
		addr:   agentAddr(i),
		dbPath: filepath.Join(t.TempDir(), "state.db"),
	}
}

func (a *agent) start(join ...netip.AddrPort) {
	t := a.t
	t.Helper()
	db, err := bbolt.Open(a.dbPath, 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.BindAddr = netip.AddrPortFrom(a.addr, a.port)
	cfg.RetryInterval = 300 * time.Millisecond
	cfg.PushPullInterval = 2 * time.Second
	for _, j := range join {
		cfg.Join = append(cfg.Join, j.String())
	}
	opts := Options{
		Config:        cfg,
		NodeName:      a.name,
		AdvertiseAddr: a.addr,
		ProxyPort:     4143,
		TrustDomain:   "test.example",
		DB:            db,
		Keys:          a.keys,
		Tune:          fastTune,
	}
	if debugLog != nil {
		opts.Logger = slog.New(slog.NewTextHandler(debugLog, &slog.HandlerOptions{Level: slog.LevelDebug})).With("host", a.name)
	}
	if a.wrap != nil {
		nt, err := newNetTransport(netip.AddrPortFrom(a.addr, a.port), log.New(io.Discard, "", 0))
		if err != nil {
			t.Fatal(err)
		}
		opts.Transport = a.wrap(nt)
	}
	if a.newTransport != nil {
		opts.Transport = a.newTransport()
	}
	a.reg = prometheus.NewRegistry()
	opts.Registerer = a.reg
	if a.tweak != nil {
		a.tweak(&opts)
	}
	d, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a.d, a.db, a.cancel, a.done = d, db, cancel, make(chan error, 1)
	go func() { a.done <- d.Run(ctx) }()
	select {
	case <-d.Ready():
	case err := <-a.done:
		t.Fatalf("%s: Run: %v", a.name, err)
	}
	a.port = d.LocalAddr().Port()
	t.Cleanup(a.kill)
}

// kill stops the agent without a leave message: what SIGKILL does.
func (a *agent) kill() {
	if a.d == nil {
		return
	}
	a.cancel()
	if err := <-a.done; err != nil {
		a.t.Errorf("%s: Run: %v", a.name, err)
	}
	if err := a.d.Close(); err != nil {
		a.t.Errorf("%s: Close: %v", a.name, err)
	}
	a.db.Close()
	a.d = nil
}

func (a *agent) gossipAddr() netip.AddrPort { return netip.AddrPortFrom(a.addr, a.port) }

// waitFor polls cond until it holds or timeout passes, and returns how long
// it took.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

func memberState(d *Discovery, name string) string {
	for _, m := range d.Members() {
		if m.Name == name {
			return m.State
		}
	}
	return ""
}

func entryOf(d *Discovery, node string) NodeEntry {
	for _, e := range d.Catalog() {
		if e.Node == node {
			return e
		}
	}
	return NodeEntry{}
}

func allAlive(agents []*agent) func() bool {
	return func() bool {
		for _, a := range agents {
			n := 0
			for _, m := range a.d.Members() {
				if m.State == StateAlive {
					n++
				}
			}
			if n != len(agents) {
				return false
			}
		}
		return true
	}
}

// startCluster starts n agents, all but the first joining the first.
func startCluster(t *testing.T, n int) []*agent {
	agents := make([]*agent, n)
	for i := range agents {
		agents[i] = newAgent(t, i)
		if i == 0 {
			agents[i].start()
		} else {
			agents[i].start(agents[0].gossipAddr())
		}
	}
	waitFor(t, 10*time.Second, "all agents alive everywhere", allAlive(agents))
	return agents
}

// listen opens a TCP listener on the agent's address.
func listen(t *testing.T, a netip.Addr) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(a, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln
}

var netipCmp = cmp.Options{
	cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
	cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b }),
}

func portOf(ln net.Listener) uint16 { return uint16(ln.Addr().(*net.TCPAddr).Port) }

var fastCheck = HealthCheck{Interval: 100 * time.Millisecond, Timeout: 50 * time.Millisecond, UnhealthyThreshold: 2}

func TestServicePropagation(t *testing.T) {
	agents := startCluster(t, 5)
	owner := agents[2]
	ln := listen(t, owner.addr)
	ep := netip.AddrPortFrom(owner.addr, portOf(ln))

	start := time.Now()
	err := owner.d.SetLocal([]Service{{Name: "web", Port: ep.Port(), Protocol: ProtocolHTTP1, Labels: map[string]string{"version": "v1"}, Health: fastCheck}})
	if err != nil {
		t.Fatal(err)
	}
	seenHealthy := func(want bool) func() bool {
		return func() bool {
			for _, a := range agents {
				e, ok := a.d.Lookup(ep)
				if !ok || e.Healthy != want {
					return false
				}
			}
			return true
		}
	}
	waitFor(t, 5*time.Second, "web visible and healthy on every host", seenHealthy(true))
	t.Logf("service added: healthy on all 5 hosts %s after SetLocal", time.Since(start))

	for _, a := range agents {
		e, _ := a.d.Lookup(ep)
		want := Endpoint{Node: "host-2", Service: "web", Addr: ep, Proxy: netip.AddrPortFrom(owner.addr, 4143),
			Protocol: ProtocolHTTP1, Identity: "spiffe://test.example/svc/web", NodeIdentity: "spiffe://test.example/node/host-2",
			Healthy: true, Weight: 100, Labels: map[string]string{"version": "v1"}}
		if !cmp.Equal(e, want, netipCmp) {
			t.Errorf("%s: Lookup(%s) = %+v, want %+v", a.name, ep, e, want)
		}
		if eps := a.d.Endpoints("web"); len(eps) != 1 || eps[0].Addr != ep {
			t.Errorf("%s: Endpoints(web) = %+v", a.name, eps)
		}
	}

	// The service goes down: its host sees it fail (2 checks), then the
	// news spreads.
	sub, cancel := owner.d.Subscribe()
	defer cancel()
	ln.Close()
	start = time.Now()
	for {
		<-sub
		if e, _ := owner.d.Lookup(ep); !e.Healthy {
			break
		}
	}
	detected := time.Since(start)
	spread := waitFor(t, 5*time.Second, "web unhealthy on every host", seenHealthy(false))
	t.Logf("service down: detected by its host in %s, unhealthy on all 5 hosts %s later", detected, spread)
	for _, a := range agents {
		if eps := a.d.Endpoints("web"); len(eps) != 0 {
			t.Errorf("%s: unhealthy web still offered for load balancing: %+v", a.name, eps)
		}
	}
}

func TestFailureLeaveAndRestart(t *testing.T) {
	agents := startCluster(t, 5)
	for _, a := range agents {
		ln := listen(t, a.addr)
		if err := a.d.SetLocal([]Service{{Name: "svc", Port: portOf(ln), Health: fastCheck}}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 5*time.Second, "5 healthy endpoints everywhere", func() bool {
		for _, a := range agents {
			if len(a.d.Endpoints("svc")) != 5 {
				return false
			}
		}
		return true
	})

	eps, gen := agents[0].d.ServiceEndpoints("svc")
	if len(eps) != 5 {
		t.Fatalf("ServiceEndpoints: %d endpoints, want 5", len(eps))
	}

	// Killed: detected by failure detection.
	victim := agents[4]
	victimEP := victim.d.Endpoints("svc")[4]
	victimSvc := victim.d.local[0].Service
	victim.kill()
	start := time.Now()
	rest := agents[:4]
	waitFor(t, 10*time.Second, "the killed host dead and its endpoint gone everywhere", func() bool {
		for _, a := range rest {
			if _, ok := a.d.Lookup(victimEP.Addr); ok || memberState(a.d, victim.name) != StateDead {
				return false
			}
		}
		return true
	})
	t.Logf("killed host: dead and its endpoints dropped on all 4 peers after %s", time.Since(start))
	for _, a := range rest {
		// Its address stays a mesh address: its traffic is never sent in
		// clear while it is gone.
		if !a.d.MemberAddr(victimEP.Addr.Addr()) {
			t.Errorf("%s: the dead host's address is no longer a member's", a.name)
		}
	}
	if eps, g := agents[0].d.ServiceEndpoints("svc"); len(eps) != 4 || g == gen {
		t.Errorf("after the death: %d endpoints, generation %d (was %d); want 4 and a new generation", len(eps), g, gen)
	}
	if agents[0].d.MemberAddr(netip.MustParseAddr("192.0.2.1")) {
		t.Error("an address never in the mesh is a member's")
	}

	// Restarted with its database and no join list: rejoins by itself.
	start = time.Now()
	victim.start()
	if err := victim.d.SetLocal([]Service{victimSvc}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the restarted host back with its service", func() bool {
		want := entryOf(victim.d, victim.name)
		if len(want.Services) != 1 || want.Services[0].Health != HealthPassing {
			return false
		}
		for _, a := range agents {
			// The new entry, not the one held from before the crash.
			if got := entryOf(a.d, victim.name); got.Version != want.Version || memberState(a.d, victim.name) != StateAlive {
				return false
			}
			if e, ok := a.d.Lookup(victimEP.Addr); !ok || !e.Healthy {
				return false
			}
		}
		return true
	})
	t.Logf("restarted host (no join list): back with its services on all hosts after %s", time.Since(start))

	// Graceful leave: gone at once.
	leaver := agents[3]
	leaverEP := leaver.d.Endpoints("svc")[3]
	start = time.Now()
	if err := leaver.d.Leave(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	left := time.Since(start)
	leaver.kill()
	others := []*agent{agents[0], agents[1], agents[2], agents[4]}
	var why string
	defer func() {
		if t.Failed() {
			t.Log("last seen:", why)
		}
	}()
	waitFor(t, 5*time.Second, "the leaving host gone everywhere", func() bool {
		for _, a := range others {
			_, ok := a.d.Lookup(leaverEP.Addr)
			if st := memberState(a.d, leaver.name); ok || st != StateLeft {
				why = fmt.Sprintf("%s: endpoint still there %v, member state %q, catalog entry leaving %v", a.name, ok, st, entryOf(a.d, leaver.name).Leaving)
				return false
			}
		}
		return true
	})
	t.Logf("graceful leave: Leave returned after %s; gone on all 4 peers %s after Leave was called", left, time.Since(start))
}

func TestGossipKeys(t *testing.T) {
	keyA := mustKey(t)
	keyB := mustKey(t)
	agents := make([]*agent, 3)
	for i := range agents {
		agents[i] = newAgent(t, 20+i)
		agents[i].keys = [][]byte{keyA}
		if i == 0 {
			agents[i].start()
		} else {
			agents[i].start(agents[0].gossipAddr())
		}
	}
	waitFor(t, 10*time.Second, "the keyed cluster formed", allAlive(agents))

	// Outsiders with the wrong key or none cannot get in.
	for _, keys := range [][][]byte{{keyB}, nil} {
		out := newAgent(t, 30)
		out.keys = keys
		out.start(agents[0].gossipAddr())
		time.Sleep(5 * out.d.cfg.RetryInterval) // several join attempts; nothing to await
		if n := len(out.d.Members()); n != 1 {
			t.Errorf("outsider with keys %d sees %d members, want only itself", len(keys), n)
		}
		for _, a := range agents {
			if s := memberState(a.d, out.name); s != "" {
				t.Errorf("%s lists the outsider (keys %d) as %s", a.name, len(keys), s)
			}
		}
		// Issue 15: the real cause is counted where it happens, not only
		// logged: the cluster's host could not decrypt the outsider, and
		// the outsider knows why its join failed.
		if len(keys) == 1 {
			dg := agents[0].d.Diagnostics()
			if dg.DecryptFailures == 0 || dg.LastDecryptFrom == "" {
				t.Errorf("%s's diagnostics after a wrong-key join: %+v", agents[0].name, dg)
			}
		}
		if dg := out.d.Diagnostics(); dg.JoinError == "" || strings.Contains(dg.JoinError, "error occurred") {
			t.Errorf("the outsider (keys %d) has no (tidy) join error: %+v", len(keys), dg)
		}
		// The outsider with the wrong key sees the cause too: the reply it
		// got could not be decrypted.
		if dg := out.d.Diagnostics(); len(keys) == 1 && (dg.DecryptFailures == 0 || !strings.HasPrefix(dg.LastDecryptFrom, agents[0].addr.String())) {
			t.Errorf("the outsider with the wrong key did not count a decrypt failure: %+v", dg)
		}
		out.kill()
	}

	// Rotate A → B across the running cluster; watch that nobody drops.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var dropped error
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			for _, a := range agents {
				for _, m := range a.d.Members() {
					if m.State != StateAlive && dropped == nil {
						dropped = fmt.Errorf("%s saw %s %s during rotation", a.name, m.Name, m.State)
					}
				}
			}
		}
	}()
	step := func(what string, f func(*Discovery) error) {
		for _, a := range agents {
			if err := f(a.d); err != nil {
				t.Fatalf("%s on %s: %v", what, a.name, err)
			}
		}
		time.Sleep(time.Second) // let gossip and probes run under the new keys
	}
	step("install", func(d *Discovery) error { return d.InstallKey(keyB) })
	step("use", func(d *Discovery) error { return d.UseKey(keyB) })
	step("remove", func(d *Discovery) error { return d.RemoveKey(keyA) })
	close(stop)
	wg.Wait()
	if dropped != nil {
		t.Error(dropped)
	}

	// Now B gets in and A does not.
	late := newAgent(t, 31)
	late.keys = [][]byte{keyB}
	late.start(agents[1].gossipAddr())
	waitFor(t, 10*time.Second, "a host with the new key joined", allAlive(append(agents, late)))
	old := newAgent(t, 32)
	old.keys = [][]byte{keyA}
	old.start(agents[1].gossipAddr())
	time.Sleep(5 * old.d.cfg.RetryInterval)
	if n := len(old.d.Members()); n != 1 {
		t.Errorf("a host with the removed key sees %d members, want 1", n)
	}
}

func mustKey(t *testing.T) []byte {
	s, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	k, err := ParseKeys([]byte(s + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	return k[0]
}

// partition blocks traffic between two sets of agents, in both directions.
type partition struct {
	mu      sync.Mutex
	blocked map[[2]string]bool // addr pairs (from, to)
}

func (p *partition) cut(a, b []*agent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.blocked = map[[2]string]bool{}
	for _, x := range a {
		for _, y := range b {
			p.blocked[[2]string{x.gossipAddr().String(), y.gossipAddr().String()}] = true
			p.blocked[[2]string{y.gossipAddr().String(), x.gossipAddr().String()}] = true
		}
	}
}

func (p *partition) heal() {
	p.mu.Lock()
	p.blocked = nil
	p.mu.Unlock()
}

func (p *partition) isBlocked(from, to string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.blocked[[2]string{from, to}]
}

// partitionedTransport drops what its host sends to a blocked peer.
type partitionedTransport struct {
	*netTransport
	p    *partition
	self func() string
}

var errPartitioned = errors.New("partitioned")

func (t *partitionedTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	if t.p.isBlocked(t.self(), addr) {
		return time.Now(), nil
	}
	return t.netTransport.WriteTo(b, addr)
}

func (t *partitionedTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	return t.WriteTo(b, a.Addr)
}

func (t *partitionedTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	if t.p.isBlocked(t.self(), addr) {
		return nil, errPartitioned
	}
	return t.netTransport.DialTimeout(addr, timeout)
}

func (t *partitionedTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	return t.DialTimeout(a.Addr, timeout)
}

func TestPartitionHeals(t *testing.T) {
	p := &partition{}
	agents := make([]*agent, 4)
	for i := range agents {
		a := newAgent(t, 40+i)
		a.wrap = func(inner memberlist.Transport) memberlist.Transport {
			nt := inner.(*netTransport)
			return &partitionedTransport{netTransport: nt, p: p, self: func() string {
				return netip.AddrPortFrom(a.addr, uint16(nt.GetAutoBindPort())).String()
			}}
		}
		agents[i] = a
		if i == 0 {
			a.start()
		} else {
			a.start(agents[0].gossipAddr())
		}
	}
	waitFor(t, 10*time.Second, "cluster formed", allAlive(agents))
	for _, a := range agents {
		ln := listen(t, a.addr)
		if err := a.d.SetLocal([]Service{{Name: "svc", Port: portOf(ln), Health: fastCheck}}); err != nil {
			t.Fatal(err)
		}
	}
	took := waitFor(t, 5*time.Second, "4 endpoints everywhere", func() bool {
		for _, a := range agents {
			if len(a.d.Endpoints("svc")) != 4 {
				return false
			}
		}
		return true
	})
	t.Logf("4 services added at once: all healthy everywhere after %s", took)

	left, right := agents[:2], agents[2:]
	p.cut(left, right)
	start := time.Now()
	waitFor(t, 15*time.Second, "each half sees the other dead", func() bool {
		for _, a := range left {
			for _, b := range right {
				if memberState(a.d, b.name) != StateDead || memberState(b.d, a.name) != StateDead {
					return false
				}
			}
		}
		return true
	})
	t.Logf("partition: each half holds the other dead after %s", time.Since(start))
	// The snapshot follows the member states within a rebuild gap.
	waitFor(t, 2*time.Second, "host-40 to offer only its half's 2 endpoints", func() bool {
		return len(agents[0].d.Endpoints("svc")) == 2
	})

	// A change on the right during the partition must reach the left.
	ln := listen(t, agents[3].addr)
	if err := agents[3].d.SetLocal([]Service{{Name: "svc", Port: portOf(ln), Health: fastCheck}, {Name: "extra", Port: portOf(ln), Health: fastCheck}}); err != nil {
		t.Fatal(err)
	}
	p.heal()
	start = time.Now()
	waitFor(t, 20*time.Second, "catalogs reconverged", func() bool {
		if !allAlive(agents)() {
			return false
		}
		for _, a := range agents {
			if len(a.d.Endpoints("svc")) != 4 || len(a.d.Endpoints("extra")) != 1 {
				return false
			}
		}
		return true
	})
	t.Logf("partition healed: all alive and catalogs converged after %s", time.Since(start))
}

// Issue 15 (vmesh check: clock skew against peers): each full state
// exchange carries the sender's clock, and Members reports every peer's
// offset from ours.
func TestClockOffset(t *testing.T) {
	agents := startCluster(t, 2)
	a, b := agents[0], agents[1]
	offset := func() *time.Duration {
		for _, m := range a.d.Members() {
			if m.Name == b.name {
				return m.ClockOffset
			}
		}
		return nil
	}
	waitFor(t, 10*time.Second, "a push/pull to measure b's clock", func() bool { return offset() != nil })
	if off := *offset(); off.Abs() > time.Second {
		t.Errorf("b's clock offset on one machine = %v, want about 0", off)
	}
	// b's clock two minutes ahead, as a push/pull from it would show.
	b.d.mu.Lock()
	raw := bytes.Clone(b.d.selfRaw)
	b.d.mu.Unlock()
	(&delegate{a.d}).MergeRemoteState(encodeState([][]byte{raw}, time.Now().Add(2*time.Minute)), false)
	if off := *offset(); off < 119*time.Second || off > 121*time.Second {
		t.Errorf("b's clock offset after a state sent 2 minutes ahead = %v", off)
	}
}
