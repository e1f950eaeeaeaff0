package node_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmesh/vmesh/internal/testbed"
)

// startDev runs `vmesh agent -dev` (with extra arguments) on h and waits
// until it is ready, or returns its log if it exits first.
func startDev(t *testing.T, h *testbed.Host, args ...string) (*meshHost, string) {
	t.Helper()
	m := &meshHost{Host: h, name: "dev", log: newLockedLog()}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := h.Command(ctx, vmeshBin, append([]string{"agent", "-dev"}, args...)...)
	cmd.Stdout, cmd.Stderr = m.log, m.log
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	m.agent, m.done = cmd, done
	t.Cleanup(func() {
		cancel()
		<-done
		if t.Failed() {
			t.Logf("dev agent log:\n%s", m.log.String())
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case <-done:
			return nil, m.log.String()
		default:
		}
		if _, err := h.Try("curl", "-sf", "http://127.0.0.1:4191/ready"); err == nil {
			return m, ""
		}
		if time.Now().After(deadline) {
			t.Fatalf("dev agent not ready after 60s:\n%s", m.log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Issue 15: after `vmesh agent -dev`, `vmesh check` is green and `vmesh
// rules show` works, with no flags: the CLI asks the agent. After the agent
// is SIGKILLed, check names the rules it left and the fix, and the fix
// works.
func TestCheckAfterDevAndKill(t *testing.T) {
	bed := testbed.New(t, 1)
	h := bed.Hosts[0]
	if out := h.Run(t, vmeshBin, "--version"); !strings.HasPrefix(out, "vmesh ") {
		t.Errorf("vmesh --version: %q", out)
	}
	m, log := startDev(t, h)
	if m == nil {
		t.Fatalf("dev agent exited:\n%s", log)
	}
	out, err := h.Try(vmeshBin, "check")
	if err != nil || strings.Contains(out, "×") || !strings.Contains(out, "rules installed and current (") || strings.Contains(out, "( backend)") {
		t.Errorf("vmesh check after vmesh agent -dev: %v\n%s", err, out)
	}
	var report struct {
		OK     bool
		Checks []struct{ Name, Status string }
	}
	out, err = h.Try(vmeshBin, "check", "-o", "json")
	if err != nil || json.Unmarshal([]byte(out), &report) != nil || !report.OK || len(report.Checks) < 5 {
		t.Errorf("vmesh check -o json: %v\n%s", err, out)
	}
	if out, err := h.Try(vmeshBin, "rules", "show"); err != nil || !strings.Contains(out, "VMESH_OUTPUT") {
		t.Errorf("vmesh rules show after vmesh agent -dev: %v\n%s", err, out)
	}
	var members []struct{ Name, Agent string }
	if out, err := h.Try(vmeshBin, "members", "-o", "json"); err != nil || json.Unmarshal([]byte(out), &members) != nil || len(members) != 1 || members[0].Agent == "" {
		t.Errorf("vmesh members -o json (with the agent version): %v\n%s", err, out)
	}
	var stat struct {
		Services, Endpoints *[]json.RawMessage
	}
	if out, err := h.Try(vmeshBin, "stat", "-o", "json", "--window", "200ms"); err != nil || json.Unmarshal([]byte(out), &stat) != nil || stat.Services == nil || stat.Endpoints == nil {
		t.Errorf("vmesh stat -o json: %v\n%s", err, out)
	}
	if out, err := h.Try(vmeshBin, "token", "list"); err != nil || !strings.Contains(out, "NODE") {
		t.Errorf("vmesh token list on the dev CA host: %v\n%s", err, out)
	}
	// The environment overrides what the agent says: a wrong admin
	// address is used, and fails.
	if out, err := h.Try("env", "VMESH_ADMIN=127.0.0.1:1", vmeshBin, "members"); err == nil || !strings.Contains(err.Error(), "127.0.0.1:1") {
		t.Errorf("VMESH_ADMIN is not used: %v\n%s", err, out)
	}

	m.stop(t, syscall.SIGKILL)
	out, err = h.Try(vmeshBin, "check")
	if err == nil || !strings.Contains(out, "× agent: not running") ||
		!regexp.MustCompile(`× iptables: \d+ vmesh rule\(s\) are installed but no agent runs`).MatchString(out) ||
		!strings.Contains(out, "VMESH_") || !strings.Contains(out, "fix: vmesh agent --cleanup") {
		t.Errorf("vmesh check after SIGKILL: %v\n%s", err, out)
	}
	h.Run(t, vmeshBin, "agent", "--cleanup")
	out, _ = h.Try(vmeshBin, "check")
	if !strings.Contains(out, "√ iptables: no vmesh rules installed") {
		t.Errorf("vmesh check after vmesh agent --cleanup:\n%s", out)
	}
}

// Issue 15: an app bound to the host's address instead of loopback makes
// check fail, naming where the app listens and the setting that fixes it;
// with `address` set, health checks reach it.
func TestCheckServiceAddress(t *testing.T) {
	bed := testbed.New(t, 1)
	h := bed.Hosts[0]
	var ln net.Listener
	if err := h.Do(func() (err error) { ln, err = net.Listen("tcp", h.Addr.String()+":8080"); return err }); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	dir := t.TempDir()
	cfg := filepath.Join(dir, "vmesh.toml")
	write := func(extra string) {
		text := "[[service]]\nname = \"web\"\nport = 8080\n" + extra + "[service.health]\ninterval = \"1s\"\ntimeout = \"500ms\"\n"
		if err := os.WriteFile(cfg, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("")
	m, log := startDev(t, h, "-c", cfg)
	if m == nil {
		t.Fatalf("dev agent exited:\n%s", log)
	}
	var out string
	m.waitFor(t, "check to see the service unhealthy", 20*time.Second, func() bool {
		out, _ = h.Try(vmeshBin, "check")
		return strings.Contains(out, "health check fails")
	})
	if !strings.Contains(out, "× service web: nothing answers at 127.0.0.1:8080") ||
		!strings.Contains(out, "the app listens on "+h.Addr.String()+":8080") ||
		!strings.Contains(out, fmt.Sprintf(`address = %q`, h.Addr.String())) {
		t.Errorf("vmesh check with the app on the host's address:\n%s", out)
	}
	m.stop(t, syscall.SIGTERM)

	write(fmt.Sprintf("address = %q\n", h.Addr))
	m, log = startDev(t, h, "-c", cfg)
	if m == nil {
		t.Fatalf("dev agent exited:\n%s", log)
	}
	m.waitFor(t, "the service healthy at its address", 20*time.Second, func() bool {
		out, _ = h.Try(vmeshBin, "check")
		return strings.Contains(out, "√ service web: reachable at "+h.Addr.String()+":8080, healthy, certificate granted")
	})
}

// Issue 15: the advertised address is the default route's interface's; with
// two interfaces and no default route the agent refuses to start, naming
// the candidates and gossip.advertise_addr.
func TestAdvertiseAddress(t *testing.T) {
	bed := testbed.New(t, 1)
	h := bed.Hosts[0]
	// A second interface (a tunnel, docker0, a second NIC): one end of a
	// veth pair, the other end kept down.
	h.Run(t, "ip", "link", "add", "tun0", "type", "veth", "peer", "name", "tun0peer")
	h.Run(t, "ip", "addr", "add", "198.19.7.1/24", "dev", "tun0")
	h.Run(t, "ip", "link", "set", "tun0", "up")

	m, log := startDev(t, h)
	if m != nil {
		t.Fatal("the agent started although its address is ambiguous")
	}
	for _, want := range []string{"198.19.7.1 (tun0)", h.Addr.String() + " (eth0)", "gossip.advertise_addr"} {
		if !strings.Contains(log, want) {
			t.Errorf("refusal does not name %q:\n%s", want, log)
		}
	}

	h.Run(t, "ip", "route", "add", "default", "dev", "eth0")
	m, log = startDev(t, h)
	if m == nil {
		t.Fatalf("dev agent with a default route exited:\n%s", log)
	}
	var members []struct{ Addr string }
	out := h.Run(t, vmeshBin, "members", "-o", "json")
	if json.Unmarshal([]byte(out), &members) != nil || len(members) != 1 || !strings.HasPrefix(members[0].Addr, h.Addr.String()+":") {
		t.Errorf("advertised address with the default route on eth0: %s", out)
	}
}

// Issue 15: a reload refuses, by name, what a running part was built from
// (rules.proxy_mark) and applies the rest (node.log_level, services); a
// service the CA has not granted shows red in check, and `vmesh node grant`
// plus a reload makes it green without a new token. The CLI finds each
// agent with no flags.
func TestReloadAndGrant(t *testing.T) {
	bed := testbed.New(t, 2)
	caH := newMeshHost(t, bed.Hosts[0], "ca1")
	web := newMeshHost(t, bed.Hosts[1], "web")
	keyFile := filepath.Join(caH.dir, "gossip.key")
	os.WriteFile(keyFile, []byte(strings.TrimSpace(caH.Run(t, vmeshBin, "keygen"))+"\n"), 0o600)
	caH.Run(t, vmeshBin, "ca", "init", "--trust-domain", td, "--dir", filepath.Join(caH.dir, "ca"))
	caH.writeConfig(t, keyFile, fmt.Sprintf("role = \"server\"\ndir = %q\n", filepath.Join(caH.dir, "ca")))
	caH.start(t)
	serveHTTP(t, web.Host, 8080, "web\n")
	serveHTTP(t, web.Host, 8081, "api\n")
	tok := strings.TrimSpace(caH.Run(t, vmeshBin, "token", "create", "--node", "web", "--services", "web"))
	services := "[[service]]\nname = \"web\"\nport = 8080\n"
	web.writeConfig(t, keyFile, fmt.Sprintf("token = %q\n", tok)+services)
	addJoin(t, web.cfg, caH.Addr.String())
	base, _ := os.ReadFile(web.cfg)
	info := strings.Replace(string(base), `log_level = "debug"`, `log_level = "info"`, 1)
	os.WriteFile(web.cfg, []byte(info), 0o600)
	web.start(t)
	if out, err := web.Try(vmeshBin, "check"); err != nil {
		t.Fatalf("vmesh check on the joined host: %v\n%s", err, out)
	}

	// A change the running proxy cannot take is refused by name; the
	// log level alongside it is not named.
	mixed := strings.Replace(info, `log_level = "info"`, `log_level = "debug"`, 1) + "\n[rules]\nproxy_mark = 0x99\n"
	os.WriteFile(web.cfg, []byte(mixed), 0o600)
	out, err := web.Try(vmeshBin, "reload")
	if err == nil || !strings.Contains(err.Error(), "rules.proxy_mark") || strings.Contains(err.Error(), "node.log_level") {
		t.Fatalf("reload with rules.proxy_mark changed: %v\n%s", err, out)
	}
	if out, _ := web.Try(vmeshBin, "check"); !strings.Contains(out, "‼ config reload:") {
		t.Errorf("check does not say the file differs from the running config:\n%s", out)
	}

	// The log level and a new service are applied.
	next := strings.Replace(info, `log_level = "info"`, `log_level = "debug"`, 1) + "[[service]]\nname = \"api\"\nport = 8081\n"
	os.WriteFile(web.cfg, []byte(next), 0o600)
	mark := len(web.log.String())
	web.Run(t, vmeshBin, "reload")
	web.waitFor(t, "debug lines after the reload", 20*time.Second, func() bool {
		return strings.Contains(web.log.String()[mark:], "level=DEBUG")
	})

	// api is not granted: check is red and says why and what to do.
	web.waitFor(t, "check to name the refused certificate", 20*time.Second, func() bool {
		out, _ = web.Try(vmeshBin, "check")
		return strings.Contains(out, "not granted")
	})
	if !strings.Contains(out, "× service api:") || !strings.Contains(out, "vmesh node grant web --services web,api") {
		t.Errorf("check with an ungranted service:\n%s", out)
	}
	if _, err := web.Try(vmeshBin, "check"); err == nil {
		t.Error("check exits 0 with an ungranted service")
	}
	caH.Run(t, vmeshBin, "node", "grant", "web", "--services", "web,api")
	if out, err := caH.Try(vmeshBin, "token", "list"); err != nil || !regexp.MustCompile(`web\s+api,web\s+used`).MatchString(out) {
		t.Errorf("token list after the grant: %v\n%s", err, out)
	}
	web.Run(t, vmeshBin, "reload")
	web.waitFor(t, "check to be green after the grant", 30*time.Second, func() bool {
		out, err = web.Try(vmeshBin, "check")
		return err == nil
	})
	if !strings.Contains(out, "√ service api: reachable at 127.0.0.1:8081, healthy, certificate granted") {
		t.Errorf("check after the grant:\n%s", out)
	}
}

// Issue 15: a wrong gossip key shows in `vmesh check` as what it is, on
// both hosts, not as "alone".
func TestCheckWrongGossipKey(t *testing.T) {
	bed := testbed.New(t, 2)
	caH := newMeshHost(t, bed.Hosts[0], "ca1")
	web := newMeshHost(t, bed.Hosts[1], "web")
	keyA, keyB := filepath.Join(caH.dir, "a.key"), filepath.Join(web.dir, "b.key")
	os.WriteFile(keyA, []byte(strings.TrimSpace(caH.Run(t, vmeshBin, "keygen"))+"\n"), 0o600)
	os.WriteFile(keyB, []byte(strings.TrimSpace(web.Run(t, vmeshBin, "keygen"))+"\n"), 0o600)
	caH.Run(t, vmeshBin, "ca", "init", "--trust-domain", td, "--dir", filepath.Join(caH.dir, "ca"))
	caH.writeConfig(t, keyA, fmt.Sprintf("role = \"server\"\ndir = %q\n", filepath.Join(caH.dir, "ca")))
	caH.start(t)
	tok := strings.TrimSpace(caH.Run(t, vmeshBin, "token", "create", "--node", "web"))
	web.writeConfig(t, keyB, fmt.Sprintf("token = %q\n", tok))
	addJoin(t, web.cfg, caH.Addr.String())
	web.start(t) // the join through the CA works: the token carries its address

	var out string
	web.waitFor(t, "check on web to name the key mismatch", 20*time.Second, func() bool {
		out, _ = web.Try(vmeshBin, "check")
		return strings.Contains(out, "no installed keys could decrypt")
	})
	if !strings.Contains(out, "× gossip: gossip from "+caH.Addr.String()) || !strings.Contains(out, "the hosts use different gossip keys") {
		t.Errorf("check on the host with the odd key:\n%s", out)
	}
	if _, err := web.Try(vmeshBin, "check"); err == nil {
		t.Error("check exits 0 with a gossip key mismatch")
	}
	caH.waitFor(t, "check on ca1 to name the key mismatch", 20*time.Second, func() bool {
		out, _ = caH.Try(vmeshBin, "check")
		return strings.Contains(out, "× gossip: gossip from "+web.Addr.String())
	})
}
