// Package testbed builds throw-away multi-host networks for tests: each host
// is a Linux network namespace with one veth leg on a private bridge, with an
// address from 198.18.0.0/24 (a benchmarking range, never a real network's).
// The bridge lives in a namespace of its own (the bed's "switch"), so nothing
// of the bed touches the machine's own namespace: test hosts reach each other
// and nothing else, and the machine's firewall (Docker's FORWARD policy, for
// one) never sees their frames.
//
// Everything a Bed creates is removed when the test ends, pass or fail, and
// New first sweeps what an interrupted earlier run left behind (names carry
// the creating process's pid).
package testbed

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Prefix starts the name of every namespace and link a Bed creates.
const Prefix = "vmt"

// Subnet is the address range of test hosts.
var Subnet = netip.MustParsePrefix("198.18.0.0/24")

// Bed is a set of hosts on one bridge.
type Bed struct {
	Hosts []*Host
	// Switch is the namespace that holds the bridge "br0" and the hosts'
	// peer links: run tcpdump there to see the wire.
	Switch string
	id     string
}

// Host is one network namespace on the bed's bridge.
type Host struct {
	Name string     // "h1", "h2", ...
	NS   string     // the netns name, for `ip netns exec`
	Addr netip.Addr // 198.18.0.<n>
	Veth string     // the host's link on the bridge, in the Switch namespace
	bed  *Bed
}

// Available reports why test beds cannot be made here, or "" if they can.
func Available() string {
	if os.Geteuid() != 0 {
		return "test bed needs root (network namespaces)"
	}
	for _, bin := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(bin); err != nil {
			return "test bed needs " + bin + " (apt-get install iproute2 iptables)"
		}
	}
	return ""
}

// Require skips t when test beds cannot be made, except under CI=true,
// where it fails: in CI these tests must run.
func Require(t testing.TB) {
	t.Helper()
	if why := Available(); why != "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s; CI must run this test", why)
		}
		t.Skip(why)
	}
}

var seq struct {
	sync.Mutex
	n int
}

// New creates n hosts (n <= 200) and removes them when t ends.
func New(t testing.TB, n int) *Bed {
	t.Helper()
	Require(t)
	if n < 1 || n > 200 {
		t.Fatalf("testbed: %d hosts is out of range 1..200", n)
	}
	Sweep()
	seq.Lock()
	seq.n++
	id := fmt.Sprintf("%d%c", os.Getpid(), 'a'+rune(seq.n%26))
	seq.Unlock()
	b := &Bed{Switch: Prefix + id + "sw", id: id}
	t.Cleanup(b.destroy)
	must := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("testbed: ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	must("netns", "add", b.Switch)
	must("-n", b.Switch, "link", "add", "br0", "type", "bridge")
	must("-n", b.Switch, "link", "set", "br0", "up")
	base := Subnet.Addr().As4()
	for i := 1; i <= n; i++ {
		a := base
		a[3] = byte(i)
		h := &Host{
			Name: fmt.Sprintf("h%d", i),
			NS:   fmt.Sprintf("%s%sh%d", Prefix, id, i),
			Addr: netip.AddrFrom4(a),
			Veth: fmt.Sprintf("veth%d", i),
			bed:  b,
		}
		b.Hosts = append(b.Hosts, h)
		must("netns", "add", h.NS)
		must("-n", h.NS, "link", "add", "eth0", "type", "veth", "peer", "name", h.Veth, "netns", b.Switch)
		must("-n", b.Switch, "link", "set", h.Veth, "master", "br0")
		must("-n", b.Switch, "link", "set", h.Veth, "up")
		must("-n", h.NS, "addr", "add", netip.PrefixFrom(h.Addr, Subnet.Bits()).String(), "dev", "eth0")
		must("-n", h.NS, "link", "set", "eth0", "up")
		must("-n", h.NS, "link", "set", "lo", "up")
		// The host's resolver, as a VM's would be, on its own network
		// (nothing answers there unless a test serves it): commands run
		// through `ip netns exec` see this resolv.conf, not the machine's.
		if err := h.SetResolver(Resolver); err != nil {
			t.Fatalf("testbed: %v", err)
		}
	}
	return b
}

// Resolver is the address every host's resolv.conf names by default: the
// last address of the bed's subnet, which no host has.
var Resolver = netip.MustParseAddr("198.18.0.254")

// SetResolver writes the host's resolv.conf (/etc/netns/<ns>/resolv.conf,
// which `ip netns exec` bind-mounts over /etc/resolv.conf): nameserver ns.
func (h *Host) SetResolver(ns netip.Addr) error {
	dir := filepath.Join("/etc/netns", h.NS)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte("nameserver "+ns.String()+"\noptions timeout:2 attempts:1\n"), 0o644)
}

// destroy removes the bed's processes, namespaces and links.
func (b *Bed) destroy() {
	for _, h := range b.Hosts {
		killNamespace(h.NS)
		exec.Command("ip", "netns", "del", h.NS).Run()
		os.RemoveAll(filepath.Join("/etc/netns", h.NS))
	}
	killNamespace(b.Switch)
	exec.Command("ip", "netns", "del", b.Switch).Run()
}

// killNamespace kills every process left in the namespace.
func killNamespace(ns string) {
	out, _ := exec.Command("ip", "netns", "pids", ns).Output()
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil && pid != os.Getpid() {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// Sweep removes namespaces left by test beds whose process is
// gone (an interrupted or crashed run). It is safe to call any time.
func Sweep() {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		name := f[0]
		if pid, ok := ownerPid(name); ok && !alive(pid) {
			killNamespace(name)
			exec.Command("ip", "netns", "del", name).Run()
		}
	}
	dirs, _ := filepath.Glob(filepath.Join("/etc/netns", Prefix+"*"))
	for _, d := range dirs {
		if pid, ok := ownerPid(filepath.Base(d)); ok && !alive(pid) {
			os.RemoveAll(d)
		}
	}
}

// ownerPid parses the pid out of a name made by New ("vmt1234a...").
func ownerPid(name string) (int, bool) {
	if !strings.HasPrefix(name, Prefix) {
		return 0, false
	}
	rest := strings.TrimPrefix(name, Prefix)
	end := 0
	for end < len(rest) && rest[end] >= '0' && rest[end] <= '9' {
		end++
	}
	pid, err := strconv.Atoi(rest[:end])
	return pid, err == nil
}

func alive(pid int) bool {
	if pid == os.Getpid() {
		return true
	}
	return syscall.Kill(pid, 0) == nil
}

// Command returns a command that runs inside the host's namespace. Its
// process is killed when ctx is done.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// Run runs a command in the host, fails t if it fails, and returns its
// standard output.
func (h *Host) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := h.Try(name, args...)
	if err != nil {
		t.Fatalf("%s: %s %s: %v", h.Name, name, strings.Join(args, " "), err)
	}
	return out
}

// Try runs a command in the host (bounded to two minutes) and returns its
// standard output; a failure's error includes standard error.
func (h *Host) Try(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := h.Command(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Start starts a background command in the host; it is killed (with its
// process group) when t ends. Its output goes to t's log when it fails.
func (h *Host) Start(t testing.TB, name string, args ...string) *exec.Cmd {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := h.Command(ctx, name, args...)
	var out lockedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("%s: starting %s: %v", h.Name, name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		if t.Failed() || os.Getenv("TESTBED_LOGS") != "" {
			t.Logf("%s: output of %s:\n%s", h.Name, name, out.String())
		}
	})
	return cmd
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
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

// Do runs fn on an OS thread switched into the host's namespace. Sockets
// that fn creates (listeners, dials) stay in that namespace after Do
// returns; goroutines that fn starts do not run in it.
func (h *Host) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// The thread is not unlocked on failure to switch back: it then
		// exits with the goroutine instead of serving others in the wrong
		// namespace.
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- fmt.Errorf("opening own netns: %w", err)
			return
		}
		defer orig.Close()
		target, err := os.Open("/run/netns/" + h.NS)
		if err != nil {
			errc <- fmt.Errorf("opening netns %s: %w", h.NS, err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("entering netns %s: %w", h.NS, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("leaving netns %s: %w", h.NS, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Cut partitions hosts a and b: packets between them are dropped both ways
// (in each host's filter table, so nothing outside the bed is touched).
func (b *Bed) Cut(t testing.TB, x, y *Host) {
	t.Helper()
	x.Run(t, "iptables", "-I", "INPUT", "-s", y.Addr.String(), "-j", "DROP", "-m", "comment", "--comment", "testbed-cut")
	y.Run(t, "iptables", "-I", "INPUT", "-s", x.Addr.String(), "-j", "DROP", "-m", "comment", "--comment", "testbed-cut")
}

// Heal undoes Cut.
func (b *Bed) Heal(t testing.TB, x, y *Host) {
	t.Helper()
	x.Run(t, "iptables", "-D", "INPUT", "-s", y.Addr.String(), "-j", "DROP", "-m", "comment", "--comment", "testbed-cut")
	y.Run(t, "iptables", "-D", "INPUT", "-s", x.Addr.String(), "-j", "DROP", "-m", "comment", "--comment", "testbed-cut")
}

// DialContext dials from inside the host's namespace (the socket is made
// there and stays there), for Go clients in the test process, e.g. as an
// http.Transport's DialContext. Addresses must be IPs: names would be
// resolved outside the namespace.
func (h *Host) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := h.Do(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}
