package node_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// fakeSystemd plays systemd's part in a restart: the notification socket
// (READY=1, FDSTORE=1 with the sockets, FDSTOREREMOVE=1) and, for the next
// start, LISTEN_FDS with the stored sockets, as systemd does for a unit
// with FileDescriptorStoreMax=.
type fakeSystemd struct {
	dir    string
	sock   *net.UnixConn
	mu     sync.Mutex
	stored map[string]*os.File
	ready  chan struct{}
}

func newFakeSystemd(t *testing.T) *fakeSystemd {
	t.Helper()
	dir := t.TempDir()
	addr := &net.UnixAddr{Name: filepath.Join(dir, "notify"), Net: "unixgram"}
	c, err := net.ListenUnixgram("unixgram", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &fakeSystemd{dir: dir, sock: c, stored: map[string]*os.File{}, ready: make(chan struct{}, 8)}
	t.Cleanup(func() {
		c.Close()
		for _, f := range s.stored {
			f.Close()
		}
	})
	// `systemctl list-jobs` says a restart is under way while the flag
	// file exists.
	script := fmt.Sprintf("#!/bin/sh\n[ -e %s/restarting ] && echo \"7 vmesh.service restart running\"\nexit 0\n", dir)
	if err := os.WriteFile(filepath.Join(dir, "systemctl"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	go s.serve()
	return s
}

func (s *fakeSystemd) serve() {
	buf, oob := make([]byte, 4096), make([]byte, 1024)
	for {
		n, oobn, _, _, err := s.sock.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		var fds []int
		if msgs, err := syscall.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, m := range msgs {
				if r, err := syscall.ParseUnixRights(&m); err == nil {
					fds = append(fds, r...)
				}
			}
		}
		vars := map[string]string{}
		for _, l := range strings.Split(string(buf[:n]), "\n") {
			k, v, _ := strings.Cut(l, "=")
			vars[k] = v
		}
		s.mu.Lock()
		switch {
		case vars["FDSTORE"] == "1" && len(fds) == 1:
			if old := s.stored[vars["FDNAME"]]; old != nil {
				old.Close()
			}
			s.stored[vars["FDNAME"]] = os.NewFile(uintptr(fds[0]), vars["FDNAME"])
			fds = nil
		case vars["FDSTOREREMOVE"] == "1":
			if old := s.stored[vars["FDNAME"]]; old != nil {
				old.Close()
				delete(s.stored, vars["FDNAME"])
			}
		case vars["READY"] == "1":
			s.ready <- struct{}{}
		}
		s.mu.Unlock()
		for _, fd := range fds {
			syscall.Close(fd)
		}
	}
}

// start runs `vmesh agent` in m's host as systemd would: NOTIFY_SOCKET,
// INVOCATION_ID, and the stored sockets as LISTEN_FDS (fd 3 on) with
// LISTEN_PID the agent's own pid.
func (s *fakeSystemd) start(t *testing.T, m *meshHost) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := m.Command(ctx, "sh", "-c", `LISTEN_PID=$$ exec "$0" "$@"`, vmeshBin, "agent", "-c", m.cfg)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+s.sock.LocalAddr().String(), "INVOCATION_ID=test",
		"VMESH_SYSTEMCTL="+filepath.Join(s.dir, "systemctl"), "VMESH_UNIT=vmesh.service")
	s.mu.Lock()
	var names []string
	for name, f := range s.stored {
		names = append(names, name)
		cmd.ExtraFiles = append(cmd.ExtraFiles, f)
	}
	s.mu.Unlock()
	if len(names) > 0 {
		cmd.Env = append(cmd.Env, fmt.Sprintf("LISTEN_FDS=%d", len(names)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
	}
	m.launch(t, cmd, cancel)
	select {
	case <-s.ready:
	case <-m.done:
		t.Fatalf("%s: the agent exited before READY=1", m.name)
	case <-time.After(60 * time.Second):
		t.Fatalf("%s: no READY=1", m.name)
	}
}

// TestRestartKeepsRulesAndSockets: `systemctl restart vmesh` on a client
// host, with systemd's fd store (emulated). Across the restart an app's
// HTTP keep-alive load (100 req/s) sees no error at all, a long-lived
// opaque connection active when the restart begins finishes its exchange,
// the redirect rules never leave the nat table (no connection goes out
// unproxied, none is refused), the next agent serves on the kept sockets,
// and ExecStopPost's `agent --cleanup` keeps the rules for it; a plain
// stop (no restart job) then removes them.
func TestRestartKeepsRulesAndSockets(t *testing.T) {
	vb := newVIPBed(t)
	cli := vb.cli
	// The client's agent, restarted under the fake systemd with a drain
	// long enough for the long-lived connection below.
	cli.stop(t, syscall.SIGTERM)
	b, _ := os.ReadFile(cli.cfg)
	os.WriteFile(cli.cfg, []byte(strings.Replace(string(b), `drain_timeout = "2s"`, `drain_timeout = "5s"`, 1)), 0o600)
	sd := newFakeSystemd(t)
	sd.start(t, cli)
	cli.waitFor(t, "both web endpoints healthy", 30*time.Second, func() bool {
		out, err := cli.Try(vmeshBin, "services")
		return err == nil && strings.Count(out, "passing") >= 4
	})
	sd.mu.Lock()
	nStored := len(sd.stored)
	sd.mu.Unlock()
	if nStored < 3 {
		t.Fatalf("the agent stored %d sockets in the fd store, want its listeners (outbound, inbound, admin, dns)", nStored)
	}
	rules := cli.natRules(t)

	// Load: 100 GET/s over keep-alive connections, and a watcher of the
	// nat table.
	tr := &http.Transport{DialContext: cli.DialContext, MaxIdleConnsPerHost: 16}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 20 * time.Second}
	url := fmt.Sprintf("http://%s:8080/", vb.webVIP)
	stop := make(chan struct{})
	var gets []outcome
	loadDone := make(chan struct{})
	go func() {
		defer close(loadDone)
		gets = loadLoop(10*time.Millisecond, stop, func() (string, error) {
			resp, err := client.Get(url)
			if err != nil {
				return "", err
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err == nil && resp.StatusCode != 200 {
				err = fmt.Errorf("HTTP %d: %s", resp.StatusCode, body)
			}
			return strings.TrimSpace(string(body)), err
		})
	}()
	var ruleGaps []string
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		for {
			select {
			case <-stop:
				return
			default:
			}
			out, err := cli.Try("iptables-save", "-t", "nat")
			if err == nil && !strings.Contains(out, "vmesh/out-redirect") {
				ruleGaps = append(ruleGaps, time.Now().Format("15:04:05.000"))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	time.Sleep(time.Second) // load before the restart, not a wait for an event

	// A long-lived opaque connection to web1's echo service.
	p := startPinger(t, cli.Host, vb.w1.Addr.String()+":9100")
	cli.waitFor(t, "the long-lived connection's first round trips", 10*time.Second, func() bool { last, _ := p.state(); return !last.IsZero() })

	// systemctl restart: SIGTERM with a restart job, ExecStopPost, start.
	os.WriteFile(filepath.Join(sd.dir, "restarting"), nil, 0o644)
	restartAt := time.Now()
	cli.agent.Process.Signal(syscall.SIGTERM)
	time.Sleep(time.Second) // the app keeps using its connection during the drain
	if _, err := p.state(); err != nil {
		t.Errorf("the long-lived connection broke %v into the restart: %v", time.Since(restartAt), err)
	}
	lastPing, _ := p.state()
	if lastPing.Before(restartAt.Add(500 * time.Millisecond)) {
		t.Errorf("no round trip on the long-lived connection during the drain (last %v after the restart began)", lastPing.Sub(restartAt))
	}
	p.close()
	select {
	case <-cli.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the old agent did not exit")
	}
	cmd := exec.Command("ip", "netns", "exec", cli.NS, vmeshBin, "agent", "--cleanup", "-c", cli.cfg)
	cmd.Env = append(os.Environ(), "INVOCATION_ID=test", "VMESH_SYSTEMCTL="+filepath.Join(sd.dir, "systemctl"), "VMESH_UNIT=vmesh.service")
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "restarting") {
		t.Errorf("ExecStopPost during a restart: %v: %s", err, out)
	}
	sd.start(t, cli)
	os.Remove(filepath.Join(sd.dir, "restarting"))
	t.Logf("restart took %v", time.Since(restartAt))
	time.Sleep(2 * time.Second) // load after the restart
	close(stop)
	<-loadDone
	<-watchDone

	var fails []string
	for _, o := range gets {
		if o.err != "" {
			fails = append(fails, fmt.Sprintf("%.2fs: %s", (o.at).Seconds(), o.err))
		}
	}
	t.Logf("%d GETs across the restart, %d failed", len(gets), len(fails))
	if len(fails) > 0 || len(gets) < 300 {
		t.Errorf("GETs across the restart: %d, failed %d: %v", len(gets), len(fails), fails)
	}
	if len(ruleGaps) > 0 {
		t.Errorf("the redirect rules were missing during the restart at %v", ruleGaps)
	}
	if got := cli.natRules(t); got != rules {
		t.Errorf("rules after the restart differ:\n%s\nbefore:\n%s", got, rules)
	}
	if !strings.Contains(cli.log.String(), "listening on a socket kept across the restart") {
		t.Error("the next agent did not take the kept sockets")
	}

	// A stop: no restart job, so ExecStopPost removes the rules.
	cli.stop(t, syscall.SIGTERM)
	cmd = exec.Command("ip", "netns", "exec", cli.NS, vmeshBin, "agent", "--cleanup", "-c", cli.cfg)
	cmd.Env = append(os.Environ(), "INVOCATION_ID=test", "VMESH_SYSTEMCTL="+filepath.Join(sd.dir, "systemctl"), "VMESH_UNIT=vmesh.service")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("ExecStopPost after a stop: %v: %s", err, out)
	}
	if strings.Contains(cli.natRules(t), "vmesh/") {
		t.Error("rules left after a stop and ExecStopPost")
	}
}

// close ends the pinger's connection from the app's side.
func (p *pinger) close() {
	p.mu.Lock()
	c := p.conn
	p.mu.Unlock()
	if c != nil {
		c.Close()
	}
	<-p.done
}
