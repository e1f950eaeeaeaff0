package bench

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmesh/vmesh/internal/testbed"
)

// setupVMesh starts vmesh agents on client and server (the CA host, which
// offers the benchmark services) as column name; multiplexOpaque, when
// set, sets proxy.multiplex_opaque on both. An error makes the column
// unavailable. Only the vmesh column is profiled.
func setupVMesh(t *testing.T, tl *tools, client, server *testbed.Host, name string, multiplexOpaque *bool) (*column, error) {
	dir := filepath.Join(tl.dir, name)
	sdir, cdir := filepath.Join(dir, server.Name), filepath.Join(dir, client.Name)
	for _, d := range []string{sdir, cdir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	key, err := server.Try(tl.vmesh, "keygen")
	if err != nil {
		return nil, fmt.Errorf("vmesh keygen: %w", err)
	}
	keyFile := filepath.Join(dir, "gossip.key")
	if err := os.WriteFile(keyFile, []byte(strings.TrimSpace(key)+"\n"), 0o600); err != nil {
		return nil, err
	}
	scfg := AgentConfig{
		Name: server.Name, Addr: server.Addr, DataDir: filepath.Join(sdir, "data"),
		Socket: filepath.Join(sdir, "admin.sock"), KeyFile: keyFile, CAServer: true, CADir: filepath.Join(sdir, "ca"),
		Services: Services, MultiplexOpaque: multiplexOpaque,
	}
	if out, err := server.Try(tl.vmesh, "ca", "init", "--trust-domain", TrustDomain, "--dir", scfg.CADir); err != nil {
		return nil, fmt.Errorf("vmesh ca init: %v %s", err, out)
	}
	spath := filepath.Join(sdir, "vmesh.toml")
	if err := os.WriteFile(spath, []byte(scfg.TOML()), 0o600); err != nil {
		return nil, err
	}
	if out, err := server.Try(tl.vmesh, "config", "check", spath); err != nil {
		return nil, fmt.Errorf("server config: %v %s", err, out)
	}
	sp := server.Start(t, "prlimit", agentCommand(name, tl.vmesh, "agent", "--config", spath)...)
	if err := waitReady(server, tl, sp.Process.Pid, 30*time.Second); err != nil {
		return nil, fmt.Errorf("server agent: %w", err)
	}

	token, err := server.Try(tl.vmesh, "token", "create", "--socket", scfg.Socket, "--node", client.Name)
	if err != nil {
		return nil, fmt.Errorf("vmesh token create: %w", err)
	}
	ccfg := AgentConfig{
		Name: client.Name, Addr: client.Addr, DataDir: filepath.Join(cdir, "data"),
		Socket: filepath.Join(cdir, "admin.sock"), KeyFile: keyFile, Join: []netip.Addr{server.Addr},
		Token: strings.TrimSpace(token), MultiplexOpaque: multiplexOpaque,
	}
	cpath := filepath.Join(cdir, "vmesh.toml")
	if err := os.WriteFile(cpath, []byte(ccfg.TOML()), 0o600); err != nil {
		return nil, err
	}
	cp := client.Start(t, "prlimit", agentCommand(name, tl.vmesh, "agent", "--config", cpath)...)
	if err := waitReady(client, tl, cp.Process.Pid, 30*time.Second); err != nil {
		return nil, fmt.Errorf("client agent: %w", err)
	}
	c := &column{name: name, client: client, server: server, target: map[string]string{},
		procs: []proc{{host: client.Name, pid: cp.Process.Pid}, {host: server.Name, pid: sp.Process.Pid}}}
	if name == VMesh {
		c.controls = map[string]string{client.Name: ccfg.Socket, server.Name: scfg.Socket}
	}
	for _, s := range Services {
		c.target[s.Name] = fmt.Sprintf("%s:%d", server.Addr, s.Port)
	}
	return c, nil
}

// waitReady polls the agent's /ready in its host until it answers 200, or
// fails early if the agent process exits.
func waitReady(h *testbed.Host, tl *tools, pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
			return fmt.Errorf("agent exited (%v)", last)
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			if f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:])); len(f) > 0 && f[0] == "Z" {
				return fmt.Errorf("agent exited (%v)", last)
			}
		}
		_, last = h.Try(tl.benchtool, "get", "-url", "http://127.0.0.1:4191/ready")
		if last == nil {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("not ready after %s: %v", timeout, last)
}

// setupMeshProxy starts the vmesh-proxy column: bench/meshproxy (the proxy
// package with a static catalog and harness-made SVIDs) on both hosts, with
// the rules `vmesh rules install` puts in place for the same configuration
// the agents would have.
func setupMeshProxy(t *testing.T, tl *tools, client, server *testbed.Host) (*column, error) {
	dir := filepath.Join(tl.dir, "meshproxy")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	var names, specs []string
	for _, s := range Services {
		proto := "auto"
		if s.Opaque {
			proto = "opaque"
		}
		names = append(names, s.Name)
		specs = append(specs, fmt.Sprintf("%s:%d:%s", s.Name, s.Port, proto))
	}
	root, err := WriteSVIDs(dir, TrustDomain, map[string][]string{client.Name: nil, server.Name: names})
	if err != nil {
		return nil, err
	}
	// Rules from the agents' own configurations.
	for _, a := range []struct {
		h   *testbed.Host
		cfg AgentConfig
	}{
		{client, AgentConfig{Name: client.Name, Addr: client.Addr, DataDir: dir, Socket: filepath.Join(dir, "c.sock"), Token: "unused"}},
		{server, AgentConfig{Name: server.Name, Addr: server.Addr, DataDir: dir, Socket: filepath.Join(dir, "s.sock"), CAServer: true, Services: Services}},
	} {
		p := filepath.Join(dir, a.h.Name+".toml")
		if err := os.WriteFile(p, []byte(a.cfg.TOML()), 0o600); err != nil {
			return nil, err
		}
		if out, err := a.h.Try(tl.vmesh, "rules", "install", "--config", p); err != nil {
			return nil, fmt.Errorf("vmesh rules install on %s: %v %s", a.h.Name, err, out)
		}
	}
	ctl := map[string]string{client.Name: filepath.Join(dir, client.Name+".pprof.sock"), server.Name: filepath.Join(dir, server.Name+".pprof.sock")}
	sp := server.Start(t, "prlimit", nofileArg(), "--", tl.meshproxy, "-td", TrustDomain, "-root", root,
		"-node", filepath.Join(dir, "node-"+server.Name+".pem"), "-svc-dir", dir,
		"-local", strings.Join(specs, ","), "-control", ctl[server.Name])
	cp := client.Start(t, "prlimit", nofileArg(), "--", tl.meshproxy, "-td", TrustDomain, "-root", root,
		"-node", filepath.Join(dir, "node-"+client.Name+".pem"), "-peer", server.Addr.String(),
		"-remote", strings.Join(specs, ","), "-control", ctl[client.Name])
	waitListening(t, server, 4143)
	waitListening(t, client, 4140)
	c := &column{name: VMeshProxy, client: client, server: server, target: map[string]string{},
		procs:    []proc{{host: client.Name, pid: cp.Process.Pid}, {host: server.Name, pid: sp.Process.Pid}},
		controls: ctl}
	for _, s := range Services {
		c.target[s.Name] = fmt.Sprintf("%s:%d", server.Addr, s.Port)
	}
	return c, nil
}

// TestColumnScenarios pins which columns take part in which scenario: the
// dedicated-connection column in the opaque ones, the VIP column in
// balancing only, and balancing between vmesh and its VIP only.
func TestColumnScenarios(t *testing.T) {
	cols := map[string]*column{
		Direct:         {name: Direct},
		HAProxy:        {name: HAProxy},
		VMesh:          {name: VMesh},
		VMeshDedicated: {name: VMeshDedicated, only: []string{"bulk", "conns", "memory", "idle"}},
		VMeshVIP:       {name: VMeshVIP},
	}
	want := map[string][]string{
		"fixed":      {Direct, HAProxy, VMesh},
		"h2":         {Direct, HAProxy, VMesh},
		"bulk":       {Direct, HAProxy, VMesh, VMeshDedicated},
		"conns":      {Direct, HAProxy, VMesh, VMeshDedicated},
		"conns-http": {Direct, HAProxy, VMesh},
		"idle":       {Direct, HAProxy, VMesh, VMeshDedicated},
		"balance":    {VMesh, VMeshVIP},
	}
	for scn, names := range want {
		var got []string
		for _, name := range []string{Direct, HAProxy, VMesh, VMeshDedicated, VMeshVIP} {
			if cols[name].runs(scn) {
				got = append(got, name)
			}
		}
		if strings.Join(got, ",") != strings.Join(names, ",") {
			t.Errorf("scenario %s runs %v, want %v", scn, got, names)
		}
	}
}

// agentCommand is prlimit's arguments for running a vmesh agent: the file
// limit, and -bench.vmeshenv's variables (through env, which keeps the pid);
// the vmesh-b column's agents also get -bench.benv's, and run -bench.bbin's
// binary when set.
func agentCommand(column string, args ...string) []string {
	var env []string
	if *flagVMeshEnv != "" {
		env = strings.Split(*flagVMeshEnv, ",")
	}
	if column == VMeshB && *flagBEnv != "" {
		env = append(env, strings.Split(*flagBEnv, ",")...)
	}
	if column == VMeshB && *flagBBin != "" {
		args = append([]string{*flagBBin}, args[1:]...)
	}
	out := []string{nofileArg(), "--"}
	if len(env) > 0 {
		out = append(append(out, "env"), env...)
	}
	return append(out, args...)
}
