package node_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmesh/vmesh/internal/testbed"
)

// vmeshBin is the agent binary the end-to-end tests run, built once.
var vmeshBin string

func TestMain(m *testing.M) {
	code := func() int {
		if testbed.Available() == "" {
			dir, err := os.MkdirTemp("", "vmesh-e2e-bin-")
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			defer os.RemoveAll(dir)
			vmeshBin = filepath.Join(dir, "vmesh")
			cmd := exec.Command("go", "build", "-tags", "nobadger,nomysql,nopgx", "-o", vmeshBin, "github.com/vmesh/vmesh/cmd/vmesh")
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				fmt.Fprintf(os.Stderr, "building vmesh: %v\n%s", err, out)
				return 1
			}
		}
		return m.Run()
	}()
	os.Exit(code)
}

const td = "e2e.test"

// meshHost is one test-bed host running a vmesh agent.
type meshHost struct {
	*testbed.Host
	name  string
	dir   string
	cfg   string
	agent *exec.Cmd
	done  chan struct{} // closed when the agent has exited
	log   *lockedLog
}

type lockedLog struct {
	mu chan struct{}
	b  strings.Builder
}

func newLockedLog() *lockedLog { l := &lockedLog{mu: make(chan struct{}, 1)}; return l }
func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu <- struct{}{}
	defer func() { <-l.mu }()
	return l.b.Write(p)
}
func (l *lockedLog) String() string {
	l.mu <- struct{}{}
	defer func() { <-l.mu }()
	return l.b.String()
}

func newMeshHost(t *testing.T, h *testbed.Host, name string) *meshHost {
	dir := t.TempDir()
	return &meshHost{Host: h, name: name, dir: dir, cfg: filepath.Join(dir, "vmesh.toml")}
}

func (m *meshHost) socket() string { return filepath.Join(m.dir, "admin.sock") }

// writeConfig writes the host's config: common settings plus extra TOML.
func (m *meshHost) writeConfig(t *testing.T, keyFile, extra string) {
	t.Helper()
	text := fmt.Sprintf(`
[node]
name = %q
data_dir = %q
drain_timeout = "2s"
log_level = "debug"
[admin]
socket = %q
[proxy]
detect_timeout = "2s"
[gossip]
advertise_addr = %q
key_file = %q
retry_interval = "500ms"
[ca]
trust_domain = %q
`, m.name, filepath.Join(m.dir, "data"), m.socket(), m.Addr, keyFile, td) + extra
	if err := os.WriteFile(m.cfg, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}

// start runs the agent and waits until /ready says 200.
func (m *meshHost) start(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	m.launch(t, m.Command(ctx, vmeshBin, "agent", "-c", m.cfg), cancel)
	m.waitFor(t, "ready", 60*time.Second, func() bool {
		_, err := m.Try("curl", "-sf", "http://127.0.0.1:4191/ready")
		return err == nil
	})
}

// launch starts cmd (the host's agent, made with a context that cancel
// ends), logging to m.log; it is killed when t ends, its log shown if t
// failed.
func (m *meshHost) launch(t *testing.T, cmd *exec.Cmd, cancel context.CancelFunc) {
	t.Helper()
	m.log = newLockedLog()
	cmd.Stdout, cmd.Stderr = m.log, m.log
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	m.agent, m.done = cmd, done
	log := m.log
	t.Cleanup(func() {
		cancel()
		<-done
		if t.Failed() {
			t.Logf("%s agent log (pid %d):\n%s", m.name, cmd.Process.Pid, log.String())
		}
	})
}

// stop sends sig to the agent and waits for it to exit.
func (m *meshHost) stop(t *testing.T, sig syscall.Signal) {
	t.Helper()
	m.agent.Process.Signal(sig)
	select {
	case <-m.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: agent did not exit after %v", m.name, sig)
	}
}

func (m *meshHost) waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: timed out after %v waiting for %s", m.name, d, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// asApp runs a client command as an unprivileged app user (uid 65534), as
// apps usually run.
func (m *meshHost) asApp(name string, args ...string) (string, error) {
	return m.Try("setpriv", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", name}, args...)...)
}

// metric returns the sum of a metric's samples whose labels include all of
// want, from the host's /metrics.
func (m *meshHost) metric(t *testing.T, name string, want map[string]string) float64 {
	t.Helper()
	out := m.Run(t, "curl", "-sf", "http://127.0.0.1:4191/metrics")
	sum := 0.0
	re := regexp.MustCompile(`^` + name + `\{([^}]*)\} (\S+)$`)
	for _, line := range strings.Split(out, "\n") {
		mm := re.FindStringSubmatch(line)
		if mm == nil {
			continue
		}
		ok := true
		for k, v := range want {
			if !strings.Contains(mm[1], fmt.Sprintf(`%s=%q`, k, v)) {
				ok = false
			}
		}
		if ok {
			var f float64
			fmt.Sscan(mm[2], &f)
			sum += f
		}
	}
	return sum
}

func (m *meshHost) natRules(t *testing.T) string {
	out := m.Run(t, "iptables-save", "-t", "nat")
	var keep []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "#") {
			continue
		}
		// Chain counters move with traffic; compare the rules.
		if strings.HasPrefix(l, ":") {
			l = regexp.MustCompile(`\[\d+:\d+\]`).ReplaceAllString(l, "")
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "\n")
}

// serveHTTP starts a Go HTTP server on the host, answering with its name.
func serveHTTP(t *testing.T, h *testbed.Host, port int, body string) *http.Server {
	t.Helper()
	var ln net.Listener
	if err := h.Do(func() (err error) { ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port)); return err }); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, body)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return srv
}

// TestAgentsEndToEnd is the three-host acceptance test: a CA host with
// redis, a web host, and a client host, all with agents and real iptables.
func TestAgentsEndToEnd(t *testing.T) {
	bed := testbed.New(t, 4)
	outsider := bed.Hosts[3] // no agent: an unmeshed client
	caH := newMeshHost(t, bed.Hosts[0], "ca1")
	web := newMeshHost(t, bed.Hosts[1], "web")
	cli := newMeshHost(t, bed.Hosts[2], "client")

	keyFile := filepath.Join(caH.dir, "gossip.key")
	key := strings.TrimSpace(caH.Run(t, vmeshBin, "keygen"))
	os.WriteFile(keyFile, []byte(key+"\n"), 0o600)
	caH.Run(t, vmeshBin, "ca", "init", "--trust-domain", td, "--dir", filepath.Join(caH.dir, "ca"))

	// redis listens on loopback only, as Debian's package does: the mesh
	// still reaches it, and its health check (made where the inbound proxy
	// connects) passes.
	caH.Start(t, "redis-server", "--port", "6379", "--bind", "127.0.0.1", "--protected-mode", "no", "--save", "", "--appendonly", "no")
	serveHTTP(t, web.Host, 8080, "hello from web\n")
	serveHTTP(t, web.Host, 8081, "hello from api\n")
	serveHTTP(t, web.Host, 9090, "admin secrets\n")

	caH.writeConfig(t, keyFile, fmt.Sprintf(`
role = "server"
dir = %q
[[service]]
name = "redis"
port = 6379
policy = "all-authenticated"
`, filepath.Join(caH.dir, "ca")))
	// ca1's outbound connections present its redis service's identity.
	addKey(t, caH.cfg, "proxy", `client_identity = "redis"`)
	caH.start(t)

	token := func(node, services string) string {
		return strings.TrimSpace(caH.Run(t, vmeshBin, "token", "create", "--socket", caH.socket(), "--node", node, "--services", services))
	}
	webToken := token("web", "web,api,admin")
	cliToken := token("client", "")

	webServices := `
[[service]]
name = "web"
port = 8080
policy = "all-authenticated"
[[service]]
name = "admin"
port = 9090
allow = ["spiffe://e2e.test/svc/redis"]
`
	webBase := fmt.Sprintf("token = %q\n", webToken)
	rulesBefore := web.natRules(t)
	web.writeConfig(t, keyFile, webBase+webServices)
	addJoin(t, web.cfg, caH.Addr.String())
	web.start(t)

	cli.writeConfig(t, keyFile, fmt.Sprintf("token = %q\n", cliToken))
	addJoin(t, cli.cfg, caH.Addr.String())
	cli.start(t)

	cli.waitFor(t, "3 members alive and web's services in the catalog", 30*time.Second, func() bool {
		out, err := cli.Try(vmeshBin, "services")
		m, _ := cli.Try(vmeshBin, "members")
		return err == nil && strings.Count(m, "alive") == 3 && strings.Contains(out, "web") &&
			regexp.MustCompile(`redis\s+redis\.vmesh\s+\S+\s+ca1\s+\S+\s+\S+( \(opaque\))?\s+passing`).MatchString(out)
	})

	// node.cpus by default: the agent runs on half the host's cores, at
	// least one (the Go runtime's gauge of GOMAXPROCS).
	if mm := regexp.MustCompile(`(?m)^go_sched_gomaxprocs_threads (\S+)$`).FindStringSubmatch(
		cli.Run(t, "curl", "-sf", "http://127.0.0.1:4191/metrics")); mm == nil || mm[1] != strconv.Itoa(max(1, runtime.NumCPU()/2)) {
		t.Errorf("go_sched_gomaxprocs_threads: %v, want %d (half of %d cores)", mm, max(1, runtime.NumCPU()/2), runtime.NumCPU())
	}

	t.Logf("step: %s", "HTTP through both proxies")
	// HTTP through both proxies, with mTLS and identities in the metrics.
	out, err := cli.asApp("curl", "-sS", "--max-time", "10", "http://"+web.Addr.String()+":8080/")
	if err != nil || out != "hello from web\n" {
		t.Fatalf("curl client -> web through the mesh: %q, %v", out, err)
	}
	if n := web.metric(t, "request_total", map[string]string{"direction": "inbound", "service": "web", "client_id": "spiffe://e2e.test/node/client", "tls": "true"}); n < 1 {
		t.Errorf("web's inbound request_total for client's identity = %v, want >= 1", n)
	}
	if n := cli.metric(t, "request_total", map[string]string{"direction": "outbound", "service": "web", "tls": "true"}); n < 1 {
		t.Errorf("client's outbound request_total for web = %v, want >= 1", n)
	}

	t.Logf("step: %s", "Redis (an opaque port)")
	// Redis (an opaque port) through the mesh.
	if out, err := cli.asApp("redis-cli", "-h", caH.Addr.String(), "SET", "vmesh", "works"); err != nil || strings.TrimSpace(out) != "OK" {
		t.Fatalf("redis SET through the mesh: %q, %v", out, err)
	}
	if out, err := cli.asApp("redis-cli", "-h", caH.Addr.String(), "GET", "vmesh"); err != nil || strings.TrimSpace(out) != "works" {
		t.Fatalf("redis GET through the mesh: %q, %v", out, err)
	}
	if n := caH.metric(t, "tcp_open_total", map[string]string{"direction": "inbound", "service": "redis", "client_id": "spiffe://e2e.test/node/client", "tls": "true"}); n < 2 {
		t.Errorf("ca1's inbound tcp_open_total for redis from client = %v, want >= 2", n)
	}

	t.Logf("step: %s", "Authorization: admin")
	// Authorization: admin allows only the redis service's identity, which
	// ca1 presents (proxy.client_identity): ca1 gets in, client gets 403.
	code, _ := cli.asApp("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "http://"+web.Addr.String()+":9090/")
	if code != "403" {
		t.Errorf("client -> admin (not on the allow list): HTTP %q, want 403", code)
	}
	if out, err := caH.asApp("curl", "-sS", "--max-time", "10", "http://"+web.Addr.String()+":9090/"); err != nil || out != "admin secrets\n" {
		t.Errorf("ca1 (as svc/redis) -> admin: %q, %v", out, err)
	}
	if n := web.metric(t, "request_total", map[string]string{"direction": "inbound", "service": "admin", "client_id": "spiffe://e2e.test/svc/redis", "tls": "true"}); n < 1 {
		t.Errorf("web did not see ca1's request as spiffe://e2e.test/svc/redis (request_total = %v)", n)
	}
	// An unmeshed client reaching an all-authenticated service is refused:
	// its plaintext HTTP is detected and denied per request with 403.
	if out, err := outsider.Try("curl", "-sS", "-i", "--max-time", "5", "http://"+web.Addr.String()+":8080/"); err != nil || !strings.HasPrefix(out, "HTTP/1.1 403") || strings.Contains(out, "hello") {
		t.Errorf("plaintext client to an all-authenticated service: %q, %v; want 403", out, err)
	}
	// Root's programs on a meshed host are meshed too (the root agent
	// exempts only its own marked connections).
	before := web.metric(t, "request_total", map[string]string{"direction": "inbound", "service": "web", "client_id": "spiffe://e2e.test/node/client"})
	if out, err := cli.Try("curl", "-sS", "--max-time", "10", "http://"+web.Addr.String()+":8080/"); err != nil || out != "hello from web\n" {
		t.Fatalf("root's curl on the client host: %q, %v", out, err)
	}
	if after := web.metric(t, "request_total", map[string]string{"direction": "inbound", "service": "web", "client_id": "spiffe://e2e.test/node/client"}); after != before+1 {
		t.Errorf("root's request was not meshed: inbound request_total %v -> %v", before, after)
	}

	t.Logf("step: %s", "SIGHUP with a broken config")
	// SIGHUP with a broken config: refused, the old one keeps serving.
	good, _ := os.ReadFile(web.cfg)
	os.WriteFile(web.cfg, append(good, []byte("\n[proxy]\nbogus_key = 1\n")...), 0o600)
	web.agent.Process.Signal(syscall.SIGHUP)
	web.waitFor(t, "the reload to be refused", 10*time.Second, func() bool {
		return strings.Contains(web.log.String(), "reload refused")
	})
	if out, err := cli.asApp("curl", "-sS", "--max-time", "10", "http://"+web.Addr.String()+":8080/"); err != nil || out != "hello from web\n" {
		t.Fatalf("after a refused reload: %q, %v", out, err)
	}

	t.Logf("step: %s", "SIGHUP with a new service")
	// SIGHUP with a new service: reachable through the mesh, no restart.
	os.WriteFile(web.cfg, append(good, []byte("\n[[service]]\nname = \"api\"\nport = 8081\n")...), 0o600)
	pid := web.agent.Process.Pid
	web.agent.Process.Signal(syscall.SIGHUP)
	cli.waitFor(t, "the api service in the catalog", 20*time.Second, func() bool {
		out, _ := cli.Try(vmeshBin, "services")
		return strings.Contains(out, "api")
	})
	if out, err := cli.asApp("curl", "-sS", "--max-time", "10", "http://"+web.Addr.String()+":8081/"); err != nil || out != "hello from api\n" {
		t.Fatalf("new service after reload: %q, %v", out, err)
	}
	if n := web.metric(t, "request_total", map[string]string{"direction": "inbound", "service": "api", "tls": "true"}); n < 1 {
		t.Errorf("api request did not go through the mesh (inbound request_total = %v)", n)
	}
	if web.agent.Process.Pid != pid {
		t.Fatal("agent restarted")
	}

	t.Logf("step: %s", "Kill the web agent")
	// Kill the web agent outright; restart it with its data dir: same
	// identity, no new token needed, traffic resumes.
	os.WriteFile(web.cfg, []byte(strings.Replace(string(append(good, []byte("\n[[service]]\nname = \"api\"\nport = 8081\n")...)), webToken, "used-up", 1)), 0o600)
	web.stop(t, syscall.SIGKILL)
	web.start(t)
	cli.waitFor(t, "traffic to resume after the web agent restarted", 30*time.Second, func() bool {
		out, err := cli.asApp("curl", "-sS", "--max-time", "3", "http://"+web.Addr.String()+":8080/")
		return err == nil && out == "hello from web\n"
	})

	t.Logf("step: %s", "SIGTERM: the host")
	// vmesh check: all green on a healthy host; names missing rules and a
	// stopped CA.
	if out, err := cli.Try(vmeshBin, "check", "-c", cli.cfg); err != nil || strings.Contains(out, "×") {
		t.Errorf("vmesh check on a healthy host: %v\n%s", err, out)
	}
	cli.Run(t, "iptables", "-t", "nat", "-F", "VMESH_OUTPUT")
	out, err = cli.Try(vmeshBin, "check", "-c", cli.cfg)
	if err == nil || !strings.Contains(out, "× iptables: rules are missing or not current") {
		t.Errorf("vmesh check with missing rules: %v\n%s", err, out)
	}
	cli.Run(t, vmeshBin, "reload", "--socket", cli.socket()) // puts the rules back
	if out, err := cli.Try(vmeshBin, "check", "-c", cli.cfg); err != nil {
		t.Errorf("vmesh check after reload restored the rules: %v\n%s", err, out)
	}

	// SIGTERM: the host's iptables are exactly as before the agent started.
	web.stop(t, syscall.SIGTERM)
	if after := web.natRules(t); after != rulesBefore {
		t.Errorf("nat table after SIGTERM differs from before the agent:\nbefore:\n%s\nafter:\n%s", rulesBefore, after)
	}
	if !strings.Contains(web.log.String(), "rules changed") {
		t.Error("the agent never logged its rule changes")
	}
	// Gossip key rotation with the CLI on the running cluster (ca1 and
	// client; web has stopped): install the new key everywhere, use it
	// everywhere, remove the old one; nobody drops out.
	newKey := strings.TrimSpace(cli.Run(t, vmeshBin, "keygen"))
	for _, op := range []string{"install", "use"} {
		for _, m := range []*meshHost{caH, cli} {
			m.Run(t, vmeshBin, "keyring", op, newKey, "--socket", m.socket())
		}
	}
	for _, m := range []*meshHost{caH, cli} {
		out := m.Run(t, vmeshBin, "keyring", "remove", key, "--socket", m.socket())
		if !strings.HasPrefix(out, newKey+" (primary)") || strings.Contains(out, key) {
			t.Fatalf("%s keyring after rotation:\n%s", m.name, out)
		}
	}
	if out, err := cli.asApp("redis-cli", "-h", caH.Addr.String(), "PING"); err != nil || strings.TrimSpace(out) != "PONG" {
		t.Fatalf("redis after key rotation: %q, %v", out, err)
	}
	ms := cli.Run(t, vmeshBin, "members")
	if !regexp.MustCompile(`ca1\s+\S+\s+alive`).MatchString(ms) {
		t.Fatalf("ca1 dropped out after key rotation:\n%s", ms)
	}

	// CA operations through the control socket: only a CA host mints
	// tokens; revoking a node is acknowledged (its effect on renewals is
	// tested in package ca).
	if out, err := cli.Try(vmeshBin, "token", "create", "--socket", cli.socket(), "--node", "x"); err == nil || !strings.Contains(err.Error(), "does not hold the CA") {
		t.Errorf("token create on a host without the CA: %q, %v", out, err)
	}
	if out := caH.Run(t, vmeshBin, "node", "revoke", "web", "--socket", caH.socket()); !strings.Contains(out, "node web revoked") {
		t.Errorf("node revoke: %q", out)
	}
	// Issue 16: the revocation reaches the other hosts' proxies by gossip
	// within seconds; an unknown node is an error; node list shows it.
	cli.waitFor(t, "the revocation to reach the client's proxy", 10*time.Second, func() bool {
		return strings.Contains(cli.log.String(), "node revoked: its certificates are refused from now on") &&
			strings.Contains(cli.log.String(), "revoked_node=web")
	})
	if out, err := caH.Try(vmeshBin, "node", "revoke", "nosuch", "--socket", caH.socket()); err == nil || !strings.Contains(err.Error(), "unknown node") {
		t.Errorf("node revoke of an unknown node: %q, %v", out, err)
	}
	if out := caH.Run(t, vmeshBin, "node", "list", "--socket", caH.socket()); !regexp.MustCompile(`(?m)^web\s.*true$`).MatchString(out) {
		t.Errorf("node list does not show web revoked:\n%s", out)
	}

	// Drain: a connection established before SIGTERM keeps working while
	// the stopping agent drains (drain_timeout), after it stopped being
	// ready.
	var rc net.Conn
	if err := cli.Do(func() (err error) {
		rc, err = net.DialTimeout("tcp", caH.Addr.String()+":6379", 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	ping := func() error {
		rc.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(rc, "PING\r\n"); err != nil {
			return err
		}
		buf := make([]byte, 7)
		if _, err := io.ReadFull(rc, buf); err != nil {
			return err
		}
		if string(buf) != "+PONG\r\n" {
			return fmt.Errorf("got %q", buf)
		}
		return nil
	}
	if err := ping(); err != nil {
		t.Fatalf("redis through the mesh before SIGTERM: %v", err)
	}
	caH.agent.Process.Signal(syscall.SIGTERM)
	caH.waitFor(t, "ca1 to stop being ready", 10*time.Second, func() bool {
		out, _ := caH.Try("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:4191/ready")
		return out == "503"
	})
	if err := ping(); err != nil {
		t.Errorf("an established connection broke while the agent drained: %v", err)
	}
	caH.stop(t, syscall.SIGTERM)
	out, err = cli.Try(vmeshBin, "check", "-c", cli.cfg)
	if err == nil || !strings.Contains(out, "× ca: cannot reach the CA at "+caH.Addr.String()+":4192") {
		t.Errorf("vmesh check with the CA stopped: %v\n%s", err, out)
	}

	var members []struct{ Name, State string }
	cli.waitFor(t, "web to leave", 10*time.Second, func() bool {
		out, err := cli.Try(vmeshBin, "members", "-o", "json")
		if err != nil || json.Unmarshal([]byte(out), &members) != nil {
			return false
		}
		for _, m := range members {
			if m.Name == "web" && m.State == "alive" {
				return false
			}
		}
		return true
	})
}

// addJoin appends a join list to the [gossip] section of a config file.
func addJoin(t *testing.T, path, addr string) {
	t.Helper()
	addKey(t, path, "gossip", fmt.Sprintf("join = [%q]", addr))
}

// addKey adds a key line at the top of a section of a config file.
func addKey(t *testing.T, path, section, line string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	header := "[" + section + "]\n"
	if !strings.Contains(string(b), header) {
		t.Fatalf("%s has no %s section", path, header)
	}
	s := strings.Replace(string(b), header, header+line+"\n", 1)
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestDevAgent runs the README's first command, `vmesh agent -dev`, on a
// fresh host: it becomes ready with its own CA, installs its rules, serves a
// meshed request to itself through the mesh's admin view, and leaves the
// host's iptables as it found them.
func TestDevAgent(t *testing.T) {
	bed := testbed.New(t, 1)
	h := bed.Hosts[0]
	before := (&meshHost{Host: h}).natRules(t)
	m := &meshHost{Host: h, name: "dev"}
	m.log = newLockedLog()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := h.Command(ctx, vmeshBin, "agent", "-dev")
	cmd.Stdout, cmd.Stderr = m.log, m.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	m.agent, m.done = cmd, done
	defer func() {
		if t.Failed() {
			t.Logf("dev agent log:\n%s", m.log.String())
		}
	}()
	m.waitFor(t, "the dev agent to be ready", 60*time.Second, func() bool {
		select {
		case <-done:
			t.Fatalf("dev agent exited:\n%s", m.log.String())
		default:
		}
		_, err := h.Try("curl", "-sf", "http://127.0.0.1:4191/ready")
		return err == nil
	})
	rules := m.natRules(t)
	if !strings.Contains(rules, "VMESH_OUTPUT") || !strings.Contains(rules, "--to-ports 4140") {
		t.Fatalf("dev agent installed no redirect rules:\n%s", rules)
	}
	if out := h.Run(t, vmeshBin, "members"); !strings.Contains(out, "alive") {
		t.Fatalf("vmesh members on the dev host: %s", out)
	}
	dataDir := regexp.MustCompile(`data dir (\S+),`).FindStringSubmatch(m.log.String())
	if dataDir == nil {
		t.Fatalf("dev agent did not say where its data dir is:\n%s", m.log.String())
	}
	m.stop(t, syscall.SIGTERM)
	if after := m.natRules(t); after != before {
		t.Errorf("iptables after the dev agent stopped:\n%s\nwant:\n%s", after, before)
	}
	if _, err := os.Stat(dataDir[1]); !os.IsNotExist(err) {
		t.Errorf("throw-away data dir %s is still there (%v)", dataDir[1], err)
	}
}

// TestCleanup: `vmesh agent --cleanup` (systemd's ExecStopPost) removes the
// rules a crashed agent left, except when the operator chose fail closed
// (rules.on_stop = "keep"); --force removes them anyway.
func TestCleanup(t *testing.T) {
	bed := testbed.New(t, 1)
	m := newMeshHost(t, bed.Hosts[0], "h")
	before := m.natRules(t)
	for _, tc := range []struct {
		onStop string
		force  bool
		kept   bool
	}{{"remove", false, false}, {"keep", false, true}, {"keep", true, false}} {
		m.writeConfig(t, "", fmt.Sprintf("[rules]\non_stop = %q\n[[service]]\nname = \"web\"\nport = 8080\n", tc.onStop))
		m.Run(t, vmeshBin, "rules", "install", "-c", m.cfg)
		if !strings.Contains(m.natRules(t), "VMESH_INBOUND") {
			t.Fatal("rules install installed nothing")
		}
		args := []string{"agent", "--cleanup", "-c", m.cfg}
		if tc.force {
			args = append(args, "--force")
		}
		m.Run(t, vmeshBin, args...)
		after := m.natRules(t)
		if kept := after != before; kept != tc.kept {
			t.Errorf("on_stop=%s force=%v: rules kept = %v, want %v\n%s", tc.onStop, tc.force, kept, tc.kept, after)
		}
	}
	m.Run(t, vmeshBin, "rules", "uninstall", "-c", m.cfg)
	if after := m.natRules(t); after != before {
		t.Errorf("rules uninstall left:\n%s", after)
	}
}
