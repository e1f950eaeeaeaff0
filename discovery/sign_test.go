package discovery

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
)

// testCA stands in for the mesh CA: it issues "certificates" (opaque
// blobs) binding a node name, a grant and an Ed25519 key, and verifies
// them. The real X.509 chain checks are ca's and tested there.
type testCA struct {
	mu     sync.Mutex
	issued map[string]NodeCert
}

func (c *testCA) issue(node string, services ...string) *testSigner {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	blob := make([]byte, 32)
	rand.Read(blob)
	cert := append([]byte("cert:"+node+":"), blob...)
	c.mu.Lock()
	if c.issued == nil {
		c.issued = map[string]NodeCert{}
	}
	c.issued[string(cert)] = NodeCert{Node: node, Services: services, Key: pub, NotAfter: time.Now().Add(time.Hour)}
	c.mu.Unlock()
	return &testSigner{key: priv, cert: cert}
}

func (c *testCA) VerifyNodeChain(chain [][]byte) (NodeCert, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	nc, ok := c.issued[string(chain[0])]
	if !ok {
		return NodeCert{}, errors.New("not issued by the mesh CA")
	}
	return nc, nil
}

type testSigner struct {
	key  ed25519.PrivateKey
	cert []byte
}

func (s *testSigner) SignEntry(digest []byte) ([]byte, [][]byte, error) {
	return ed25519.Sign(s.key, digest), [][]byte{s.cert}, nil
}

func (s *testSigner) NodeCert() []byte { return s.cert }

// signedCluster starts n agents signing with certificates of ca granting
// each the services "web" and "api", and verifying each other's.
func signedCluster(t *testing.T, ca *testCA, n int) ([]*agent, []*testSigner) {
	agents := make([]*agent, n)
	signers := make([]*testSigner, n)
	for i := range agents {
		a := newAgent(t, i)
		s := ca.issue(a.name, "web", "api")
		a.tweak = func(o *Options) { o.Signer, o.Verifier = s, ca }
		agents[i], signers[i] = a, s
		if i == 0 {
			a.start()
		} else {
			a.start(agents[0].gossipAddr())
		}
	}
	waitFor(t, 10*time.Second, "all agents alive everywhere", allAlive(agents))
	return agents, signers
}

func rejected(agents []*agent, reason string) float64 {
	var n float64
	for _, a := range agents {
		mfs, _ := a.reg.Gather()
		for _, mf := range mfs {
			if mf.GetName() != "gossip_rejected_total" {
				continue
			}
			for _, m := range mf.GetMetric() {
				if m.GetLabel()[0].GetValue() == reason {
					n += m.GetCounter().GetValue()
				}
			}
		}
	}
	return n
}

// Issue 16: a gossip-key holder (a member of the cluster with a node
// certificate of its own) forges another host's entry: unsigned and empty,
// signed with its own certificate, or with a service its own grant lacks.
// Nothing changes anywhere: the victim keeps its services on every host.
func TestForgedEntriesChangeNothing(t *testing.T) {
	ca := &testCA{}
	agents, signers := signedCluster(t, ca, 4)
	forger, victim := agents[0], agents[2]
	port := portOf(listen(t, victim.addr))
	if err := victim.d.SetLocal([]Service{{Name: "web", Port: port}}); err != nil {
		t.Fatal(err)
	}
	if err := forger.d.SetLocal([]Service{{Name: "api", Port: 9}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the victim's service everywhere", func() bool {
		for _, a := range agents {
			v := entryOf(a.d, victim.name)
			if len(v.Services) != 1 || v.Services[0].Health != HealthPassing || len(entryOf(a.d, forger.name).Services) != 1 {
				return false
			}
		}
		return true
	})
	want := entryOf(agents[1].d, victim.name)

	future := uint64(time.Now().Add(time.Minute).UnixNano())
	empty := NodeEntry{Node: victim.name, Identity: "spiffe://test.example/node/" + victim.name, Version: future,
		Addrs: want.Addrs, ProxyPort: 4143}
	altered := empty
	altered.Services = []ServiceEntry{{Name: "web", Port: 1, Protocol: ProtocolAuto, Health: HealthPassing, Weight: 100}}
	own := NodeEntry{Node: forger.name, Identity: "spiffe://test.example/node/" + forger.name, Version: future,
		Addrs: []netip.Addr{forger.addr}, ProxyPort: 4143,
		Services: []ServiceEntry{{Name: "api", Port: 9, Protocol: ProtocolAuto, Health: HealthPassing, Weight: 100},
			{Name: "db", Port: 5432, Protocol: ProtocolAuto, Health: HealthPassing, Weight: 100}}}
	sign := func(s *testSigner, e *NodeEntry) []byte {
		payload := encodeEntry(e)
		digest := sha256.Sum256(payload)
		sig, chain, _ := s.SignEntry(digest[:])
		return encodeSigned(payload, sig, idOf(chain[0]))
	}
	unknown := ca.issue(victim.name, "web") // a certificate the cluster has never seen...
	ca.mu.Lock()
	delete(ca.issued, string(unknown.cert)) // ...and the CA never issued
	ca.mu.Unlock()
	forgeries := map[string][]byte{
		"unsigned empty":              encodeEntry(&empty),
		"empty, forger's signature":   sign(signers[0], &empty),
		"altered, forger's signature": sign(signers[0], &altered),
		"altered, unknown cert":       sign(unknown, &altered),
		"forger's own, not granted":   sign(signers[0], &own),
		"certificate not issued":      encodeCert([][]byte{unknown.cert}),
	}
	for name, msg := range forgeries {
		forger.d.queue.QueueBroadcast(&broadcast{node: "forgery " + name, msg: msg})
	}
	others := agents[1:]
	waitFor(t, 10*time.Second, "every kind of forgery refused", func() bool {
		return rejected(others, rejectUnsigned) > 0 && rejected(others, rejectSignature) > 0 &&
			rejected(others, rejectGrant) > 0 && rejected(others, rejectCert) > 0
	})
	want = entryOf(victim.d, victim.name) // the owner's own, current entry
	for _, a := range agents {
		got := entryOf(a.d, victim.name)
		if got.Version != want.Version || len(got.Services) != 1 || got.Services[0].Port != port {
			t.Errorf("%s holds %s's entry %+v, want %+v", a.name, victim.name, got, want)
		}
		if f := entryOf(a.d, forger.name); len(f.Services) != 1 || f.Services[0].Name != "api" {
			t.Errorf("%s holds the forger's entry with %+v", a.name, f.Services)
		}
	}
}

// Issue 16: an owner that sees a newer entry of its own than it published
// (a forgery where entries are not signed, or an earlier run's entry) makes
// its own entry win again.
func TestOwnerRepublishesAboveNewerEntry(t *testing.T) {
	agents := startCluster(t, 3)
	forger, victim := agents[0], agents[2]
	port := portOf(listen(t, victim.addr))
	if err := victim.d.SetLocal([]Service{{Name: "web", Port: port}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the service everywhere", func() bool {
		for _, a := range agents {
			if len(entryOf(a.d, victim.name).Services) != 1 {
				return false
			}
		}
		return true
	})
	forged := NodeEntry{Node: victim.name, Identity: "spiffe://test.example/node/" + victim.name,
		Version: uint64(time.Now().Add(time.Minute).UnixNano()), Addrs: []netip.Addr{victim.addr}, ProxyPort: 4143}
	forger.d.queue.QueueBroadcast(&broadcast{node: "forgery", msg: encodeEntry(&forged)})
	waitFor(t, 10*time.Second, "the victim to publish above the forgery everywhere", func() bool {
		for _, a := range agents {
			e := entryOf(a.d, victim.name)
			if e.Version <= forged.Version || len(e.Services) != 1 {
				return false
			}
		}
		return true
	})
}

// Issue 16: a pull request makes its receiver reply to the requester's
// memberlist address only, never to an address named in the message.
func TestPullRequestNeverDialsNamedAddress(t *testing.T) {
	agents := startCluster(t, 2)
	ln, err := net.Listen("tcp", netip.AddrPortFrom(agentAddr(9), 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dialed := make(chan struct{}, 8)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
			dialed <- struct{}{}
		}
	}()
	target := ln.Addr().(*net.TCPAddr).AddrPort()
	g := &delegate{agents[0].d}
	for range 5 {
		g.NotifyMsg(encodeRequest("ghost", target))        // not a member
		g.NotifyMsg(encodeRequest(agents[1].name, target)) // a member, but not at that address
	}
	// Nothing to await: the test asserts that no dial happens at all.
	select {
	case <-dialed:
		t.Fatal("a pull request made the host dial the address named in it")
	case <-time.After(time.Second):
	}
}

// Issue 16: every member address ever seen stays a mesh address, across
// the member's death and this host's restart (kept in bbolt), so that the
// proxy never sends to it in clear.
func TestMeshAddressesRemembered(t *testing.T) {
	agents := startCluster(t, 2)
	a, b := agents[0], agents[1]
	// Snapshots are rebuilt at most every 50 ms: await the join's.
	waitFor(t, 5*time.Second, "a live member's address to be a mesh address", func() bool { return a.d.MemberAddr(b.addr) })
	b.kill()
	a.kill()
	a.start() // alone, from its database
	if !a.d.MemberAddr(b.addr) {
		t.Error("after a restart, the address of a member seen before is not a mesh address")
	}
	if a.d.MemberAddr(netip.MustParseAddr("127.0.77.250")) {
		t.Error("an address never seen is a mesh address")
	}
}

// testRevocations accepts blobs that start with "revoke:" (signed by the
// CA, in this test's world) and keys them by what follows up to ";".
type testRevocations struct{}

func (testRevocations) VerifyRevocation(b []byte) (string, error) {
	s := string(b)
	if !strings.HasPrefix(s, "revoke:") {
		return "", errors.New("not signed by the CA")
	}
	k, _, _ := strings.Cut(strings.TrimPrefix(s, "revoke:"), ";")
	return k, nil
}

// Issue 16: a revocation published on one host (a CA host) reaches every
// host within seconds, small or too large for a gossip packet, and reaches
// a host that joins later; a forged one is refused everywhere.
func TestRevocationsSpread(t *testing.T) {
	agents := make([]*agent, 5)
	for i := range agents {
		agents[i] = newAgent(t, i)
		agents[i].tweak = func(o *Options) { o.Revocations = testRevocations{} }
	}
	for i, a := range agents[:4] {
		if i == 0 {
			a.start()
		} else {
			a.start(agents[0].gossipAddr())
		}
	}
	waitFor(t, 10*time.Second, "all agents alive everywhere", allAlive(agents[:4]))
	has := func(a *agent, key string) bool {
		for _, b := range a.d.Revocations() {
			if k, _ := (testRevocations{}).VerifyRevocation(b); k == key {
				return true
			}
		}
		return false
	}
	small := []byte("revoke:node-a;small")
	large := []byte("revoke:node-b;" + strings.Repeat("x", 3000))
	for _, b := range [][]byte{small, large} {
		if err := agents[0].d.PublishRevocation(b); err != nil {
			t.Fatal(err)
		}
	}
	if err := agents[0].d.PublishRevocation([]byte("forged")); err == nil {
		t.Error("a revocation that does not verify was published")
	}
	agents[1].d.relay.QueueBroadcast(&broadcast{node: "forged", msg: encodeRevocation([]byte("node-c"))})
	took := waitFor(t, 5*time.Second, "both revocations on every host", func() bool {
		for _, a := range agents[:4] {
			if !has(a, "node-a") || !has(a, "node-b") {
				return false
			}
		}
		return true
	})
	t.Logf("revocations reached every host in %v", took)
	waitFor(t, 5*time.Second, "the forged revocation refused", func() bool { return rejected(agents[:4], rejectRevocation) > 0 })
	for _, a := range agents[:4] {
		if n := len(a.d.Revocations()); n != 2 {
			t.Errorf("%s holds %d revocations, want 2", a.name, n)
		}
	}
	agents[4].start(agents[2].gossipAddr())
	waitFor(t, 10*time.Second, "a late joiner to hold both", func() bool { return has(agents[4], "node-a") && has(agents[4], "node-b") })
}
