package node_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmesh/vmesh/internal/testbed"
)

// echoServer accepts on port in h and echoes every line back.
func echoServer(t *testing.T, h *testbed.Host, port int) {
	t.Helper()
	var ln net.Listener
	if err := h.Do(func() (err error) { ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port)); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
}

// pinger is an app's long-lived connection that sends a line every 50ms
// and reads its echo, recording when each round trip succeeded and how the
// connection ended.
type pinger struct {
	mu   sync.Mutex
	last time.Time // last successful round trip
	err  error     // how it ended
	done chan struct{}
	conn net.Conn
}

func startPinger(t *testing.T, h *testbed.Host, to string) *pinger {
	t.Helper()
	var c net.Conn
	if err := h.Do(func() (err error) { c, err = net.DialTimeout("tcp", to, 5*time.Second); return err }); err != nil {
		t.Fatalf("dialing %s from %s: %v", to, h.Name, err)
	}
	t.Cleanup(func() { c.Close() })
	p := &pinger{done: make(chan struct{}), conn: c}
	go func() {
		defer close(p.done)
		r := bufio.NewReader(c)
		for i := 0; ; i++ {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			line := fmt.Sprintf("ping %d\n", i)
			_, err := io.WriteString(c, line)
			var got string
			if err == nil {
				got, err = r.ReadString('\n')
			}
			if err == nil && got != line {
				err = fmt.Errorf("echo %q, want %q", got, line)
			}
			p.mu.Lock()
			if err != nil {
				p.err = err
				p.mu.Unlock()
				return
			}
			p.last = time.Now()
			p.mu.Unlock()
			time.Sleep(50 * time.Millisecond)
		}
	}()
	return p
}

func (p *pinger) state() (time.Time, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last, p.err
}

// Issue 16: a stopping agent drains before it removes its rules, so that a
// redirected connection keeps its NAT translation: an app's long-lived
// opaque connection keeps flowing after SIGTERM until the drain ends, then
// sees its connection end (not hang); after a restart new connections
// work.
func TestShutdownDrainsBeforeRemovingRules(t *testing.T) {
	bed := testbed.New(t, 2)
	caH := newMeshHost(t, bed.Hosts[0], "ca1")
	cli := newMeshHost(t, bed.Hosts[1], "client")
	keyFile := filepath.Join(caH.dir, "gossip.key")
	caH.Run(t, vmeshBin, "keygen", keyFile)
	caH.Run(t, vmeshBin, "ca", "init", "--trust-domain", td, "--dir", filepath.Join(caH.dir, "ca"))
	echoServer(t, caH.Host, 7000)
	caH.writeConfig(t, keyFile, fmt.Sprintf("role = \"server\"\ndir = %q\n[[service]]\nname = \"echo\"\nport = 7000\nprotocol = \"opaque\"\n", filepath.Join(caH.dir, "ca")))
	caH.start(t)
	tok := strings.TrimSpace(caH.Run(t, vmeshBin, "token", "create", "--socket", caH.socket(), "--node", "client", "--services", ""))
	cli.writeConfig(t, keyFile, fmt.Sprintf("token = %q\n", tok))
	addJoin(t, cli.cfg, caH.Addr.String())
	if b, err := os.ReadFile(cli.cfg); err == nil {
		os.WriteFile(cli.cfg, []byte(strings.Replace(string(b), `drain_timeout = "2s"`, `drain_timeout = "3s"`, 1)), 0o600)
	}
	cli.start(t)
	to := caH.Addr.String() + ":7000"
	cli.waitFor(t, "echo in the client's catalog", 30*time.Second, func() bool {
		out, err := cli.Try(vmeshBin, "services")
		return err == nil && strings.Contains(out, "echo")
	})

	p := startPinger(t, cli.Host, to)
	cli.waitFor(t, "the first round trips", 10*time.Second, func() bool { last, _ := p.state(); return !last.IsZero() })
	if n := cli.metric(t, "tcp_open_total", map[string]string{"direction": "outbound", "service": "echo", "tls": "true"}); n < 1 {
		t.Fatalf("the app's connection did not go through the mesh (outbound tcp_open_total for echo = %v)", n)
	}

	stopped := time.Now()
	cli.agent.Process.Signal(syscall.SIGTERM)
	// Data keeps flowing during the drain (3s).
	cli.waitFor(t, "round trips 1.5s into the drain", 10*time.Second, func() bool {
		last, err := p.state()
		if err != nil {
			t.Fatalf("the app's connection broke %v after SIGTERM, during the drain: %v", time.Since(stopped).Round(time.Millisecond), err)
		}
		return last.Sub(stopped) > 1500*time.Millisecond
	})
	// When the drain ends the connection ends, and the app notices.
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		t.Fatal("the app's connection hangs after the agent stopped")
	}
	select {
	case <-cli.done:
	case <-time.After(30 * time.Second):
		t.Fatal("agent did not exit")
	}
	cli.start(t)
	p2 := startPinger(t, cli.Host, to)
	cli.waitFor(t, "round trips after the restart", 10*time.Second, func() bool { last, _ := p2.state(); return !last.IsZero() })
}

// Issue 16: a meshed host whose agent stopped is never sent to in clear,
// even by a client whose agent restarted since (it remembers every member
// address in bbolt): the app's connection is refused, counted and logged,
// and its bytes never reach the wire.
func TestNoPlaintextToStoppedMeshHost(t *testing.T) {
	if _, err := exec.LookPath("tcpdump"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("tcpdump missing (apt-get install tcpdump)")
		}
		t.Skip("tcpdump missing")
	}
	bed := testbed.New(t, 3)
	caH := newMeshHost(t, bed.Hosts[0], "ca1")
	web := newMeshHost(t, bed.Hosts[1], "web")
	cli := newMeshHost(t, bed.Hosts[2], "client")
	keyFile := filepath.Join(caH.dir, "gossip.key")
	caH.Run(t, vmeshBin, "keygen", keyFile)
	caH.Run(t, vmeshBin, "ca", "init", "--trust-domain", td, "--dir", filepath.Join(caH.dir, "ca"))
	caH.writeConfig(t, keyFile, fmt.Sprintf("role = \"server\"\ndir = %q\n", filepath.Join(caH.dir, "ca")))
	caH.start(t)
	token := func(node, services string) string {
		return strings.TrimSpace(caH.Run(t, vmeshBin, "token", "create", "--socket", caH.socket(), "--node", node, "--services", services))
	}
	echoServer(t, web.Host, 7000)
	web.writeConfig(t, keyFile, fmt.Sprintf("token = %q\n[[service]]\nname = \"echo\"\nport = 7000\nprotocol = \"opaque\"\n", token("web", "echo")))
	addJoin(t, web.cfg, caH.Addr.String())
	web.start(t)
	cli.writeConfig(t, keyFile, fmt.Sprintf("token = %q\n", token("client", "")))
	addJoin(t, cli.cfg, caH.Addr.String())
	cli.start(t)
	cli.waitFor(t, "echo in the client's catalog", 30*time.Second, func() bool {
		out, err := cli.Try(vmeshBin, "services")
		return err == nil && strings.Contains(out, "echo")
	})
	to := web.Addr.String() + ":7000"
	p := startPinger(t, cli.Host, to)
	cli.waitFor(t, "a round trip through the mesh", 10*time.Second, func() bool { last, _ := p.state(); return !last.IsZero() })

	web.stop(t, syscall.SIGTERM)
	cli.stop(t, syscall.SIGTERM)
	cli.start(t) // knows web only from its database now

	// A plain listener on the client host: the bed's last marker comes
	// from web (no agent there any more) to it, in clear.
	var ln net.Listener
	if err := cli.Do(func() (err error) { ln, err = net.Listen("tcp", ":9999"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	stop := tcpdumpBridge(t, bed)
	secret := fmt.Sprintf("SECRET-%d", time.Now().UnixNano())
	err := cli.Do(func() error {
		c, err := net.DialTimeout("tcp", to, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, secret+"\n"); err != nil {
			return err
		}
		_, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	if err == nil {
		t.Error("the app reached the stopped mesh host (echo came back): the connection was passed in clear")
	}
	last := fmt.Sprintf("LAST-%d", time.Now().UnixNano())
	if err := web.Do(func() error {
		c, err := net.DialTimeout("tcp", cli.Addr.String()+":9999", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = io.WriteString(c, last)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if capture := stop(last); strings.Contains(string(capture), secret) {
		t.Error("the app's bytes to a stopped mesh host went on the wire in clear")
	}
	if n := cli.metric(t, "tcp_refused_total", map[string]string{"direction": "outbound", "reason": "mesh_host"}); n < 1 {
		t.Errorf("tcp_refused_total{reason=mesh_host} = %v, want >= 1", n)
	}
	cli.waitFor(t, "the refusal logged at warn", 5*time.Second, func() bool {
		l := cli.log.String()
		return strings.Contains(l, "level=WARN") && strings.Contains(l, "connection refused") && strings.Contains(l, "mesh_host")
	})
}

// tcpdumpBridge captures the bed's bridge until stop is called; stop first
// waits until the capture holds last, a marker sent in clear as the last
// packet, so nothing sent before is missing.
func tcpdumpBridge(t *testing.T, bed *testbed.Bed) (stop func(last string) []byte) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "bridge.pcap")
	cmd := exec.Command("ip", "netns", "exec", bed.Switch, "tcpdump", "-i", "br0", "-U", "-s", "0", "-w", file, "tcp")
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "listening on") {
				close(ready)
				io.Copy(io.Discard, stderr)
				return
			}
		}
	}()
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		t.Fatal("tcpdump did not start")
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return func(last string) []byte {
		deadline := time.Now().Add(10 * time.Second)
		for {
			b, _ := os.ReadFile(file)
			if strings.Contains(string(b), last) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the capture never held the last marker")
			}
			time.Sleep(50 * time.Millisecond)
		}
		stopped = true
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
}
