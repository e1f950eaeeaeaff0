package node

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
)

// Restarts under systemd. The agent keeps its listening sockets (proxy,
// admin, DNS) in systemd's file-descriptor store (FDSTORE=1; the unit sets
// FileDescriptorStoreMax=), and takes them back on start (LISTEN_FDS).
// Across `systemctl restart` the sockets therefore never close: the kernel
// queues new connections and queries while the old process drains and the
// new one starts, and the redirect rules stay in place (the stopping agent
// and `agent --cleanup` see systemd's restart job and keep them), so no
// connection is refused and none goes out unproxied. What the old process
// cannot hand over is its established relays (their TLS state lives in
// its memory): HTTP/1 keep-alive connections close between requests, and
// long-lived connections drain for node.drain_timeout.

// fdStore hands listeners between the agent and systemd.
type fdStore struct {
	log *slog.Logger

	mu        sync.Mutex
	inherited map[string]*os.File // from LISTEN_FDS, by name, not yet taken
	stored    map[string]bool     // names this run put in the store
	resumed   bool                // a listener was taken over from the previous agent
}

// newFDStore takes the sockets systemd passed (and unsets LISTEN_*).
func newFDStore(log *slog.Logger) *fdStore {
	s := &fdStore{log: log, inherited: map[string]*os.File{}, stored: map[string]bool{}}
	for name, files := range activation.FilesWithNames() {
		for i, f := range files {
			if i == 0 {
				s.inherited[name] = f
				continue
			}
			f.Close() // a duplicate name: keep the first
		}
	}
	return s
}

// listener returns the inherited listener name when it is bound to addr,
// else a new one, and keeps it in the store.
func (s *fdStore) listener(name, network, addr string) (net.Listener, error) {
	if f := s.take(name); f != nil {
		ln, err := net.FileListener(f)
		f.Close()
		if err == nil && sameAddr(ln.Addr(), addr) {
			s.log.Info("listening on a socket kept across the restart", "name", name, "addr", ln.Addr().String())
			s.mu.Lock()
			s.stored[name], s.resumed = true, true
			s.mu.Unlock()
			return ln, nil
		}
		if err == nil {
			ln.Close()
		}
		s.remove(name) // the configuration moved it
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		return nil, err
	}
	s.store(name, ln)
	return ln, nil
}

// packetConn is listener for a UDP socket.
func (s *fdStore) packetConn(name, network, addr string) (net.PacketConn, error) {
	if f := s.take(name); f != nil {
		pc, err := net.FilePacketConn(f)
		f.Close()
		if err == nil && sameAddr(pc.LocalAddr(), addr) {
			s.mu.Lock()
			s.stored[name] = true
			s.mu.Unlock()
			return pc, nil
		}
		if err == nil {
			pc.Close()
		}
		s.remove(name)
	}
	pc, err := net.ListenPacket(network, addr)
	if err != nil {
		return nil, err
	}
	s.store(name, pc)
	return pc, nil
}

func (s *fdStore) take(name string) *os.File {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.inherited[name]
	delete(s.inherited, name)
	return f
}

// Release closes inherited sockets nothing took (a listener the new
// configuration no longer has) and drops them from the store.
func (s *fdStore) Release() {
	s.mu.Lock()
	left := s.inherited
	s.inherited = map[string]*os.File{}
	s.mu.Unlock()
	for name, f := range left {
		f.Close()
		s.remove(name)
	}
}

func sameAddr(a net.Addr, want string) bool {
	host, port, err := net.SplitHostPort(want)
	if err != nil {
		return false
	}
	ghost, gport, err := net.SplitHostPort(a.String())
	if err != nil || gport != port {
		return false
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		return ghost == "::" || ghost == "0.0.0.0" || ghost == host
	}
	return net.ParseIP(host).Equal(net.ParseIP(ghost))
}

// store puts the socket's descriptor in systemd's store under name (the
// kernel passes systemd its own copy). Without systemd (no NOTIFY_SOCKET)
// it does nothing.
func (s *fdStore) store(name string, sock any) {
	sc, ok := sock.(syscall.Conn)
	if !ok || os.Getenv("NOTIFY_SOCKET") == "" {
		return
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		s.log.Warn("cannot keep a socket across restarts", "name", name, "err", err)
		return
	}
	// Control, not File or Fd: those switch the socket to blocking mode,
	// and a blocking accept is never woken by Close.
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = notifyWithFDs("FDSTORE=1\nFDNAME="+name, int(fd)) }); err != nil {
		serr = err
	}
	if serr != nil {
		s.log.Warn("cannot keep a socket across restarts (is FileDescriptorStoreMax= set?)", "name", name, "err", serr)
		return
	}
	s.mu.Lock()
	s.stored[name] = true
	s.mu.Unlock()
}

func (s *fdStore) remove(name string) {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return
	}
	if err := notifyWithFDs("FDSTOREREMOVE=1\nFDNAME=" + name); err != nil {
		s.log.Debug("removing a stored socket", "name", name, "err", err)
	}
	s.mu.Lock()
	delete(s.stored, name)
	s.mu.Unlock()
}

// Resumed reports whether a listener was taken over from the previous
// agent: connections may be waiting in it already.
func (s *fdStore) Resumed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.resumed
}

// Stored reports whether this run's listening sockets are in the store.
func (s *fdStore) Stored() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.stored) > 0
}

// notifyWithFDs sends state to systemd's notification socket with files
// attached (sd_pid_notify_with_fds).
func notifyWithFDs(state string, fds ...int) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return errors.New("NOTIFY_SOCKET is not set")
	}
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	var oob []byte
	if len(fds) > 0 {
		oob = syscall.UnixRights(fds...)
	}
	// "@name" is an abstract socket; syscall.SockaddrUnix reads it so.
	return syscall.Sendmsg(fd, []byte(state), oob, &syscall.SockaddrUnix{Name: path}, 0)
}

// restartPending reports whether systemd is restarting this agent's unit
// (`systemctl restart`: the job of the stopping unit is a restart), asked
// through systemctl (VMESH_SYSTEMCTL names another, for tests). Not under
// systemd, or when systemctl cannot say: false.
func restartPending(ctx context.Context) bool {
	ok, err := restartJob(ctx)
	if err != nil {
		slog.Default().Debug("asking systemd whether it restarts vmesh", "err", err)
	}
	return ok
}

func restartJob(ctx context.Context) (bool, error) {
	if os.Getenv("INVOCATION_ID") == "" && os.Getenv("VMESH_SYSTEMCTL") == "" {
		return false, nil
	}
	unit := ownUnit()
	if unit == "" {
		return false, errors.New("no systemd unit in /proc/self/cgroup")
	}
	systemctl := os.Getenv("VMESH_SYSTEMCTL")
	if systemctl == "" {
		systemctl = "systemctl"
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, systemctl, "list-jobs", "--no-legend", "--plain", unit).CombinedOutput()
	if err != nil {
		return false, fmt.Errorf("%s list-jobs %s: %w: %s", systemctl, unit, err, strings.TrimSpace(string(out)))
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		f := strings.Fields(sc.Text()) // JOB UNIT TYPE STATE
		if len(f) >= 3 && f[1] == unit && (f[2] == "restart" || f[2] == "try-restart") {
			return true, nil
		}
	}
	return false, fmt.Errorf("no restart job for %s in %q", unit, strings.TrimSpace(string(out)))
}

// ownUnit is the systemd unit this process runs in, from its cgroup
// ("0::/system.slice/vmesh.service" -> "vmesh.service"); VMESH_UNIT
// overrides it.
func ownUnit() string {
	if u := os.Getenv("VMESH_UNIT"); u != "" {
		return u
	}
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		i := strings.LastIndexByte(line, '/')
		if i < 0 {
			continue
		}
		if u := line[i+1:]; strings.HasSuffix(u, ".service") {
			return u
		}
	}
	return ""
}

// RestartPending is restartPending for `vmesh agent --cleanup`: rules are
// kept while systemd restarts the agent.
func RestartPending(ctx context.Context) bool { return restartPending(ctx) }
