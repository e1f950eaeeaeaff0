package rules

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vmesh/vmesh/internal/testbed"
)

// These tests run real iptables (nft and legacy) in network namespaces of
// the test bed, and real connections through the rules.

var counters = regexp.MustCompile(`\[\d+:\d+\]$`)

// nobody is the uid the tests declare as the proxy's: the test itself runs
// as root, so its own dials are redirected while a child as nobody's are not.
const nobody = 65534

func kernelState() State {
	return State{
		OwnPorts:          []uint16{4191, 4192, 7946},
		ServicePorts:      []uint16{8080},
		SkipInboundPorts:  []uint16{22},
		SkipOutboundPorts: []uint16{5432},
		ProxyUID:          nobody,
		ProxyGID:          -1,
		DNSPort:           15053,
		DNSv6:             true,
	}
}

// in runs fn in h's namespace and fails t on error.
func in(t *testing.T, h *testbed.Host, fn func() error) {
	t.Helper()
	if err := h.Do(fn); err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
}

// saveAll returns iptables-save and ip6tables-save of every table of one
// backend in h, without the timestamp comments.
func saveAll(t *testing.T, h *testbed.Host, backend string) string {
	t.Helper()
	var b strings.Builder
	for _, cmd := range []string{"iptables-" + backend + "-save", "ip6tables-" + backend + "-save"} {
		for _, l := range strings.Split(h.Run(t, cmd), "\n") {
			if strings.HasPrefix(l, "#") {
				continue
			}
			// Chain counters move with unrelated traffic (IPv6 neighbour
			// discovery); they are not rules.
			if strings.HasPrefix(l, ":") {
				l = counters.ReplaceAllString(l, "[0:0]")
			}
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// addForeignRules gives h's backend rules that are not vmesh's: Docker's
// embedded-DNS chains and an operator's own rules, nat and filter.
func addForeignRules(t *testing.T, h *testbed.Host, backend string) {
	t.Helper()
	for _, bin := range []string{"iptables-" + backend, "ip6tables-" + backend} {
		dns, dnsTo := "127.0.0.11/32", "127.0.0.11:40000"
		if strings.HasPrefix(bin, "ip6") {
			dns, dnsTo = "::1/128", "[::1]:40000"
		}
		for _, args := range [][]string{
			{"-t", "nat", "-N", "DOCKER_OUTPUT"},
			{"-t", "nat", "-N", "DOCKER_POSTROUTING"},
			{"-t", "nat", "-A", "OUTPUT", "-d", dns, "-j", "DOCKER_OUTPUT"},
			{"-t", "nat", "-A", "POSTROUTING", "-d", dns, "-j", "DOCKER_POSTROUTING"},
			{"-t", "nat", "-A", "DOCKER_OUTPUT", "-d", dns, "-p", "tcp", "--dport", "53", "-j", "DNAT", "--to-destination", dnsTo},
			{"-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "8443", "-m", "comment", "--comment", "operator: keep me", "-j", "REDIRECT", "--to-ports", "443"},
			{"-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "DROP"},
		} {
			h.Run(t, bin, args...)
		}
	}
}

// countingIPT counts the mutating calls made through it.
type countingIPT struct {
	iptablesAPI
	n *int
}

func (c countingIPT) NewChain(t, ch string) error   { *c.n++; return c.iptablesAPI.NewChain(t, ch) }
func (c countingIPT) ClearChain(t, ch string) error { *c.n++; return c.iptablesAPI.ClearChain(t, ch) }
func (c countingIPT) DeleteChain(t, ch string) error {
	*c.n++
	return c.iptablesAPI.DeleteChain(t, ch)
}
func (c countingIPT) Insert(t, ch string, p int, a ...string) error {
	*c.n++
	return c.iptablesAPI.Insert(t, ch, p, a...)
}
func (c countingIPT) Append(t, ch string, a ...string) error {
	*c.n++
	return c.iptablesAPI.Append(t, ch, a...)
}
func (c countingIPT) Delete(t, ch string, a ...string) error {
	*c.n++
	return c.iptablesAPI.Delete(t, ch, a...)
}
func (c countingIPT) DeleteById(t, ch string, id int) error {
	*c.n++
	return c.iptablesAPI.DeleteById(t, ch, id)
}

// TestKernelIdempotentAndUninstall, on each backend: applying 100 times
// leaves iptables-save as applying once did, with no change made after the
// first; what iptables prints back equals what Build wrote; uninstall
// restores the namespace's save exactly, foreign rules included.
func TestKernelIdempotentAndUninstall(t *testing.T) {
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			ctx := context.Background()
			h := testbed.New(t, 1).Hosts[0]
			addForeignRules(t, h, backend)
			before := saveAll(t, h, backend)

			changes := 0
			a, err := NewApplier(ApplierOptions{IPv6: "on", open: func(v6 bool) (iptablesAPI, error) {
				ipt, err := openBackend(backend, v6, 10*time.Second)
				if err != nil {
					return nil, err
				}
				return countingIPT{ipt, &changes}, nil
			}})
			if err != nil {
				t.Fatal(err)
			}
			rs := Build(kernelState())
			in(t, h, func() error { return a.Apply(ctx, rs) })
			once := saveAll(t, h, backend)
			if changes == 0 || !strings.Contains(once, "vmesh/out-redirect") {
				t.Fatalf("first apply installed nothing:\n%s", once)
			}
			for _, l := range strings.Split(rs.IPv4.String(), "\n") {
				if strings.HasPrefix(l, "-A ") && !strings.Contains(once, l+"\n") {
					t.Errorf("iptables-save lacks the built rule %q", l)
				}
			}
			// The DNS capture jumps come before Docker's DNAT of its
			// embedded resolver, which would otherwise end the chain.
			jump, docker := strings.Index(once, "-A OUTPUT -p udp -m udp --dport 53"), strings.Index(once, "-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT")
			if jump < 0 || docker < 0 || jump > docker {
				t.Errorf("the DNS capture jump is not above Docker's (at %d vs %d):\n%s", jump, docker, once)
			}
			first := changes
			start := time.Now()
			in(t, h, func() error {
				for range 99 {
					if err := a.Apply(ctx, rs); err != nil {
						return err
					}
				}
				return nil
			})
			t.Logf("99 re-applies in %v", time.Since(start))
			if changes != first {
				t.Errorf("re-applying made %d changes", changes-first)
			}
			if d := cmp.Diff(once, saveAll(t, h, backend)); d != "" {
				t.Errorf("save after 100 applies differs from after 1 (-once +100):\n%s", d)
			}
			in(t, h, func() error {
				diff, err := a.Installed(ctx, rs)
				if err == nil && diff != "" {
					err = fmt.Errorf("Installed reports drift right after Apply:\n%s", diff)
				}
				return err
			})

			// A changed config converges, then uninstall restores.
			in(t, h, func() error {
				return a.Apply(ctx, Build(with(func(s *State) { s.CaptureAllInbound = true; s.ProxyUID = 1 })))
			})
			if got := saveAll(t, h, backend); !strings.Contains(got, "vmesh/in-skip") || strings.Contains(got, "--uid-owner 65534") {
				t.Errorf("changed config not converged:\n%s", got)
			}
			in(t, h, func() error { return a.Uninstall(ctx) })
			if d := cmp.Diff(before, saveAll(t, h, backend)); d != "" {
				t.Errorf("uninstall did not restore the save (-before +after):\n%s", d)
			}
		})
	}
}

// TestKernelBackendDetectionAndCleanup: with legacy rules present and no
// nft rules, auto picks legacy; Cleanup from an nft applier sweeps vmesh
// leftovers from the legacy backend, and only those.
func TestKernelBackendDetectionAndCleanup(t *testing.T) {
	ctx := context.Background()
	h := testbed.New(t, 1).Hosts[0]
	addForeignRules(t, h, "legacy")
	before := saveAll(t, h, "legacy")
	auto, err := NewApplier(ApplierOptions{})
	if err != nil {
		t.Fatal(err)
	}
	in(t, h, func() error { return auto.Apply(ctx, Build(kernelState())) })
	if got := auto.Backend(); got != "legacy" {
		t.Fatalf("auto picked %q with only legacy rules present", got)
	}
	if !strings.Contains(saveAll(t, h, "legacy"), "vmesh/out-uid") {
		t.Fatal("rules not installed in legacy")
	}
	if strings.Contains(h.Run(t, "iptables-nft-save"), "vmesh") {
		t.Fatal("rules written to nft too")
	}

	// A crashed run: a leftover probe chain too.
	h.Run(t, "iptables-legacy", "-t", "nat", "-N", probeChain)
	nft, err := NewApplier(ApplierOptions{Backend: "nft"})
	if err != nil {
		t.Fatal(err)
	}
	in(t, h, func() error { return nft.Cleanup(ctx) })
	if d := cmp.Diff(before, saveAll(t, h, "legacy")); d != "" {
		t.Errorf("cleanup did not restore legacy (-before +after):\n%s", d)
	}
}

// TestKernelRedirect sends real connections through the rules of h1
// (proxy uid nobody; service port 8080; skip-outbound 5432; ssh 22).
func TestKernelRedirect(t *testing.T) {
	ctx := context.Background()
	bed := testbed.New(t, 2)
	h1, h2 := bed.Hosts[0], bed.Hosts[1]
	a, err := NewApplier(ApplierOptions{IPv6: "off"})
	if err != nil {
		t.Fatal(err)
	}
	state := kernelState()
	state.DNSPort = 0 // TestKernelDNSCapture's
	in(t, h1, func() error { return a.Apply(ctx, Build(state)) })
	t.Cleanup(func() { h1.Do(func() error { return a.Uninstall(ctx) }) })

	out := listen(t, h1, "127.0.0.1:4140")
	inb := listen(t, h1, "0.0.0.0:4143")
	ssh := listen(t, h1, "0.0.0.0:22")
	svc := listen(t, h1, "0.0.0.0:8080")
	remote80 := listen(t, h2, "0.0.0.0:80")
	remote5432 := listen(t, h2, "0.0.0.0:5432")
	h2addr := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(h2.Addr, port) }
	h1addr := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(h1.Addr, port) }

	t.Run("outbound redirected with original destination", func(t *testing.T) {
		dial(t, h1, h2addr(80), "out-1")
		expect(t, out, "out-1", h2addr(80))
	})
	t.Run("proxy uid not redirected", func(t *testing.T) {
		cmd := h1.Command(ctx, "setpriv", "--reuid", fmt.Sprint(nobody), "--regid", fmt.Sprint(nobody), "--clear-groups",
			"bash", "-c", fmt.Sprintf("exec 3<>/dev/tcp/%s/80 && echo uid-1 >&3", h2.Addr))
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("dial as nobody: %v: %s", err, b)
		}
		expect(t, remote80, "uid-1", netip.AddrPort{})
	})
	t.Run("skip-outbound port goes straight through", func(t *testing.T) {
		dial(t, h1, h2addr(5432), "skip-1")
		expect(t, remote5432, "skip-1", netip.AddrPort{})
	})
	t.Run("loopback not redirected", func(t *testing.T) {
		dial(t, h1, netip.MustParseAddrPort("127.0.0.1:8080"), "lo-1")
		expect(t, svc, "lo-1", netip.AddrPort{})
	})
	t.Run("inbound service port reaches 4143", func(t *testing.T) {
		dial(t, h2, h1addr(8080), "in-1")
		expect(t, inb, "in-1", h1addr(8080))
	})
	t.Run("loopback destination from a neighbour not redirected", func(t *testing.T) {
		// The attack: a neighbour sends to 127.0.0.1:8080 through h1's MAC.
		// It needs route_localnet and a route for 127.0.0.1 ahead of its own
		// local table (its kernel then also accepts replies from 127.0.0.1).
		// Were the packet redirected, the proxy would get 127.0.0.1:8080 as
		// the original destination: a loopback-only service reached from
		// the network.
		for _, args := range [][]string{
			{"sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1", "net.ipv4.conf.eth0.route_localnet=1"},
			{"ip", "rule", "add", "pref", "10", "to", "127.0.0.1/32", "lookup", "100"},
			{"ip", "route", "add", "127.0.0.1/32", "via", h1.Addr.String(), "dev", "eth0", "table", "100"},
			{"ip", "rule", "del", "pref", "0", "lookup", "local"},
			{"ip", "rule", "add", "pref", "20", "lookup", "local"},
		} {
			h2.Run(t, args[0], args[1:]...)
		}
		t.Cleanup(func() {
			h2.Try("ip", "rule", "add", "pref", "0", "lookup", "local")
			h2.Try("ip", "rule", "del", "pref", "20", "lookup", "local")
			h2.Try("ip", "rule", "del", "pref", "10")
		})
		err := h2.Do(func() error {
			c, err := net.DialTimeout("tcp4", "127.0.0.1:8080", 2*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write([]byte("lo-attack\n"))
			return err
		})
		if err == nil {
			t.Errorf("a neighbour connected to h1's 127.0.0.1:8080")
		}
		select {
		case g := <-inb.got:
			t.Fatalf("the inbound proxy got a connection from the network to %v (%q)", g.origDst, g.token)
		case <-time.After(500 * time.Millisecond):
		}
	})
	t.Run("ssh not redirected", func(t *testing.T) {
		dial(t, h2, h1addr(22), "ssh-1")
		expect(t, ssh, "ssh-1", netip.AddrPort{})
	})
	t.Run("docker dns added after vmesh still reached", func(t *testing.T) {
		// Docker (re)writes its embedded-DNS rules after vmesh installed,
		// so vmesh's jump comes first in OUTPUT: TCP DNS must still reach
		// Docker's DNAT, not the outbound proxy.
		dns := listen(t, h1, "127.0.0.11:40000")
		for _, args := range [][]string{
			{"-t", "nat", "-N", "DOCKER_OUTPUT"},
			{"-t", "nat", "-A", "OUTPUT", "-d", "127.0.0.11/32", "-j", "DOCKER_OUTPUT"},
			{"-t", "nat", "-A", "DOCKER_OUTPUT", "-d", "127.0.0.11/32", "-p", "tcp", "--dport", "53", "-j", "DNAT", "--to-destination", "127.0.0.11:40000"},
		} {
			h1.Run(t, "iptables", args...)
		}
		dial(t, h1, netip.MustParseAddrPort("127.0.0.11:53"), "dns-1")
		expect(t, dns, "dns-1", netip.MustParseAddrPort("127.0.0.11:53"))
		in(t, h1, func() error {
			diff, err := a.Installed(ctx, Build(state))
			if err == nil && diff != "" {
				err = fmt.Errorf("Docker's rules made vmesh's look stale:\n%s", diff)
			}
			return err
		})
	})
	for name, l := range map[string]*listener{"4140": out, "4143": inb, "22": ssh, "8080": svc, "h2:80": remote80, "h2:5432": remote5432} {
		select {
		case g := <-l.got:
			t.Errorf("listener %s got an unexpected connection %q", name, g.token)
		default:
		}
	}
}

type arrival struct {
	token   string
	local   netip.AddrPort
	origDst netip.AddrPort
	odErr   error // SO_ORIGINAL_DST failed (ENOENT where nat never saw the flow)
	err     error
}

// TestKernelDNSCapture: in a host whose nat table already holds Docker's
// embedded-DNS DNAT (as in a container), vmesh's DNS capture sends a
// program's query to 127.0.0.11:53 to the agent's DNS port, with its
// original destination; the agent's own query (uid nobody here) still
// reaches Docker's resolver; uninstalling gives the query back to Docker.
func TestKernelDNSCapture(t *testing.T) {
	ctx := context.Background()
	h := testbed.New(t, 1).Hosts[0]
	docker := listen(t, h, "127.0.0.11:40000")
	for _, args := range [][]string{
		{"-t", "nat", "-N", "DOCKER_OUTPUT"},
		{"-t", "nat", "-A", "OUTPUT", "-d", "127.0.0.11/32", "-j", "DOCKER_OUTPUT"},
		{"-t", "nat", "-A", "DOCKER_OUTPUT", "-d", "127.0.0.11/32", "-p", "tcp", "--dport", "53", "-j", "DNAT", "--to-destination", "127.0.0.11:40000"},
	} {
		h.Run(t, "iptables", args...)
	}
	a, err := NewApplier(ApplierOptions{IPv6: "off"})
	if err != nil {
		t.Fatal(err)
	}
	in(t, h, func() error { return a.Apply(ctx, Build(kernelState())) })
	t.Cleanup(func() { h.Do(func() error { return a.Uninstall(ctx) }) })
	agent := listen(t, h, "127.0.0.1:15053")
	dockerDNS := netip.MustParseAddrPort("127.0.0.11:53")

	dial(t, h, dockerDNS, "app-query")
	expect(t, agent, "app-query", dockerDNS)
	cmd := h.Command(ctx, "setpriv", "--reuid", fmt.Sprint(nobody), "--regid", fmt.Sprint(nobody), "--clear-groups",
		"bash", "-c", "exec 3<>/dev/tcp/127.0.0.11/53 && echo agent-query >&3")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("the agent's own query: %v: %s", err, b)
	}
	expect(t, docker, "agent-query", dockerDNS) // DNATed by Docker only

	in(t, h, func() error { return a.Uninstall(ctx) })
	dial(t, h, dockerDNS, "after")
	expect(t, docker, "after", dockerDNS)
}

type listener struct {
	got chan arrival
}

// listen listens in h on addr and reports each connection's first line and
// SO_ORIGINAL_DST.
func listen(t *testing.T, h *testbed.Host, addr string) *listener {
	t.Helper()
	var ln net.Listener
	in(t, h, func() (err error) {
		ln, err = net.Listen("tcp4", addr)
		return err
	})
	t.Cleanup(func() { ln.Close() })
	l := &listener{got: make(chan arrival, 8)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				line, err := bufio.NewReader(c).ReadString('\n')
				od, oerr := originalDst(c.(*net.TCPConn))
				local := c.LocalAddr().(*net.TCPAddr).AddrPort()
				l.got <- arrival{token: strings.TrimSpace(line), local: local, origDst: od, odErr: oerr, err: err}
			}()
		}
	}()
	return l
}

// dial connects from h to to and sends token.
func dial(t *testing.T, h *testbed.Host, to netip.AddrPort, token string) {
	t.Helper()
	in(t, h, func() error {
		c, err := net.DialTimeout("tcp4", to.String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte(token + "\n"))
		return err
	})
}

// expect waits for token at l. A valid origDst must be the connection's
// original destination; a zero one means "not redirected": SO_ORIGINAL_DST
// then gives the socket's own address (or fails, where nat never saw it).
func expect(t *testing.T, l *listener, token string, origDst netip.AddrPort) {
	t.Helper()
	select {
	case g := <-l.got:
		if g.err != nil {
			t.Fatalf("connection %q: %v", g.token, g.err)
		}
		if g.token != token {
			t.Fatalf("got connection %q, want %q", g.token, token)
		}
		switch {
		case origDst.IsValid() && g.odErr != nil:
			t.Fatalf("connection %q: %v", token, g.odErr)
		case origDst.IsValid() && g.origDst != origDst:
			t.Fatalf("connection %q: original destination %v, want %v", token, g.origDst, origDst)
		case !origDst.IsValid() && g.odErr == nil && g.origDst != g.local:
			t.Fatalf("connection %q was redirected: original destination %v, local %v", token, g.origDst, g.local)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("connection %q never arrived at the expected listener", token)
	}
}

// originalDst reads SO_ORIGINAL_DST (IPv4) of a redirected connection.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var mreq *syscall.IPv6Mreq
	var serr error
	if err := rc.Control(func(fd uintptr) {
		mreq, serr = syscall.GetsockoptIPv6Mreq(int(fd), syscall.SOL_IP, 80) // SO_ORIGINAL_DST
	}); err != nil {
		return netip.AddrPort{}, err
	}
	if serr != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", serr)
	}
	b := mreq.Multiaddr
	port := binary.BigEndian.Uint16(b[2:4])
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), port), nil
}
