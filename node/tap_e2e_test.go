package node_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmesh/vmesh/internal/testbed"
)

// tapEvent is the part of a `vmesh tap -o json` line the tests check.
type tapEvent struct {
	Kind, Direction, Service, Method, Authority, Path string
	ClientID                                          string `json:"client_id"`
	ServerID                                          string `json:"server_id"`
	TLS                                               bool
	Status                                            int
	LatencyMS                                         float64 `json:"latency_ms"`
}

// runTap starts `vmesh tap -o json ARGS...` on m's host and returns a
// channel of its events (closed when it exits).
func runTap(t *testing.T, m *meshHost, args ...string) <-chan tapEvent {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cmd := m.Command(ctx, vmeshBin, append([]string{"tap", "-o", "json", "--socket", m.socket()}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ch := make(chan tapEvent, 100)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var ev tapEvent
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				t.Errorf("vmesh tap -o json printed %q: %v", sc.Text(), err)
				continue
			}
			ch <- ev
		}
		cmd.Wait()
	}()
	return ch
}

// Issue 15: real curl traffic shows up in `vmesh tap -o json` on both
// hosts with the right identities and status; `vmesh top -o json`
// aggregates it; `vmesh ping` proves each endpoint's identity and fails for
// what does not answer; a TCP connection the server's policy denies is
// logged and counted on the client host too.
func TestTapTopPing(t *testing.T) {
	bed := testbed.New(t, 2)
	caH := newMeshHost(t, bed.Hosts[0], "ca1")
	web := newMeshHost(t, bed.Hosts[1], "web")
	keyFile := filepath.Join(caH.dir, "gossip.key")
	key := strings.TrimSpace(caH.Run(t, vmeshBin, "keygen"))
	os.WriteFile(keyFile, []byte(key+"\n"), 0o600)
	caH.Run(t, vmeshBin, "ca", "init", "--trust-domain", td, "--dir", filepath.Join(caH.dir, "ca"))
	serveHTTP(t, web.Host, 8080, "hello from web\n")
	serveHTTP(t, web.Host, 9100, "secret\n")

	caH.writeConfig(t, keyFile, fmt.Sprintf("role = \"server\"\ndir = %q\n", filepath.Join(caH.dir, "ca")))
	caH.start(t)
	tok := strings.TrimSpace(caH.Run(t, vmeshBin, "token", "create", "--socket", caH.socket(), "--node", "web", "--services", "web,secret"))
	web.writeConfig(t, keyFile, fmt.Sprintf("token = %q\n[[service]]\nname = \"web\"\nport = 8080\nprotocol = \"http1\"\n"+
		"[[service]]\nname = \"secret\"\nport = 9100\nprotocol = \"opaque\"\nallow = [\"spiffe://%s/node/nobody\"]\n", tok, td))
	addJoin(t, web.cfg, caH.Addr.String())
	web.start(t)
	caH.waitFor(t, "web and secret in ca1's catalog", 30*time.Second, func() bool {
		out, err := caH.Try(vmeshBin, "services", "--admin", "127.0.0.1:4191")
		return err == nil && strings.Count(out, "passing") == 2
	})

	// Taps on both hosts; curl until both saw a request.
	out := runTap(t, caH, "web", "--direction", "outbound", "--path", "/hello", "-n", "1")
	in := runTap(t, web, "--identity", "node/ca1", "--method", "GET", "-n", "1")
	url := "http://" + web.Addr.String() + ":8080/hello"
	var outEv, inEv *tapEvent
	deadline := time.Now().Add(30 * time.Second)
	for (outEv == nil || inEv == nil) && time.Now().Before(deadline) {
		if code, err := caH.asApp("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url); err != nil || code != "200" {
			t.Fatalf("curl %s: %q, %v", url, code, err)
		}
		for _, tc := range []struct {
			ch  <-chan tapEvent
			got **tapEvent
		}{{out, &outEv}, {in, &inEv}} {
			select {
			case ev, ok := <-tc.ch:
				if ok && *tc.got == nil {
					*tc.got = &ev
				}
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	if outEv == nil || inEv == nil {
		t.Fatalf("no tap events within 30s: outbound %v, inbound %v", outEv, inEv)
	}
	wantOut := tapEvent{Kind: "http", Direction: "outbound", Service: "web", ServerID: "spiffe://" + td + "/svc/web", TLS: true,
		Method: "GET", Authority: web.Addr.String() + ":8080", Path: "/hello", Status: 200}
	if got := *outEv; got.LatencyMS <= 0 || func() tapEvent { got.LatencyMS = 0; return got }() != wantOut {
		t.Errorf("ca1's tap:\n got %+v\nwant %+v", *outEv, wantOut)
	}
	wantIn := wantOut
	wantIn.Direction, wantIn.ServerID, wantIn.ClientID = "inbound", "", "spiffe://"+td+"/node/ca1"
	if got := *inEv; func() tapEvent { got.LatencyMS = 0; return got }() != wantIn {
		t.Errorf("web's tap:\n got %+v\nwant %+v", *inEv, wantIn)
	}

	// top: a snapshot after a window with traffic in it.
	topDone := make(chan string, 1)
	go func() {
		o, err := caH.Try(vmeshBin, "top", "-o", "json", "--window", "3s", "--socket", caH.socket())
		if err != nil {
			o = "error: " + err.Error() + "\n" + o
		}
		topDone <- o
	}()
	var topOut string
loop:
	for {
		select {
		case topOut = <-topDone:
			break loop
		case <-time.After(100 * time.Millisecond):
			caH.asApp("curl", "-s", "-o", "/dev/null", url)
		}
	}
	var rows []struct {
		Direction, Service, Path string
		Count                    int
		Success                  float64 `json:"success_rate"`
	}
	if err := json.Unmarshal([]byte(topOut), &rows); err != nil {
		t.Fatalf("vmesh top -o json: %v\n%s", err, topOut)
	}
	found := false
	for _, r := range rows {
		if r.Direction == "outbound" && r.Service == "web" && r.Path == "/hello" && r.Count > 0 && r.Success == 1 {
			found = true
		}
	}
	if !found {
		t.Errorf("vmesh top -o json has no outbound web /hello row with full success:\n%s", topOut)
	}

	// ping: a service's endpoints and a node, with the identity proved.
	if o, err := caH.Try(vmeshBin, "ping", "web", "--socket", caH.socket()); err != nil || !strings.Contains(o, "spiffe://"+td+"/svc/web") || !strings.Contains(o, " ok") {
		t.Errorf("vmesh ping web: %v\n%s", err, o)
	}
	if o, err := web.Try(vmeshBin, "ping", "ca1", "--socket", web.socket()); err != nil || !strings.Contains(o, "spiffe://"+td+"/node/ca1") {
		t.Errorf("vmesh ping ca1 (a node): %v\n%s", err, o)
	}
	if o, err := caH.Try(vmeshBin, "ping", "nosuch", "--socket", caH.socket()); err == nil || !strings.Contains(o+err.Error(), "neither a service") {
		t.Errorf("vmesh ping nosuch: %v\n%s", err, o)
	}
	// A host whose proxy does not answer (killed: still in the catalog
	// until gossip declares it dead): ping fails, exit 1.
	web.stop(t, syscall.SIGKILL)
	if o, err := caH.Try(vmeshBin, "ping", "web", "--socket", caH.socket()); err == nil || !strings.Contains(o, "FAILED") {
		t.Errorf("vmesh ping web with web's agent stopped: %v\n%s", err, o)
	}
}

// Issue 15: a TCP connection denied by the server's policy is logged and
// counted on the client host too, not just connected then closed.
func TestDeniedTCPSeenOnClient(t *testing.T) {
	bed := testbed.New(t, 2)
	caH := newMeshHost(t, bed.Hosts[0], "ca1")
	web := newMeshHost(t, bed.Hosts[1], "web")
	keyFile := filepath.Join(caH.dir, "gossip.key")
	key := strings.TrimSpace(caH.Run(t, vmeshBin, "keygen"))
	os.WriteFile(keyFile, []byte(key+"\n"), 0o600)
	caH.Run(t, vmeshBin, "ca", "init", "--trust-domain", td, "--dir", filepath.Join(caH.dir, "ca"))
	serveHTTP(t, web.Host, 9100, "secret\n")
	caH.writeConfig(t, keyFile, fmt.Sprintf("role = \"server\"\ndir = %q\n", filepath.Join(caH.dir, "ca")))
	caH.start(t)
	tok := strings.TrimSpace(caH.Run(t, vmeshBin, "token", "create", "--socket", caH.socket(), "--node", "web", "--services", "secret"))
	web.writeConfig(t, keyFile, fmt.Sprintf("token = %q\n[[service]]\nname = \"secret\"\nport = 9100\nprotocol = \"opaque\"\nallow = [\"spiffe://%s/node/nobody\"]\n", tok, td))
	addJoin(t, web.cfg, caH.Addr.String())
	web.start(t)
	caH.waitFor(t, "secret in ca1's catalog", 30*time.Second, func() bool {
		out, err := caH.Try(vmeshBin, "services", "--admin", "127.0.0.1:4191")
		return err == nil && strings.Count(out, "passing") == 1
	})
	var c net.Conn
	if err := caH.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", web.Addr.String()+":9100", 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "GET / HTTP/1.0\r\n\r\n")
	if got, _ := io.ReadAll(c); len(got) != 0 {
		t.Errorf("denied connection got %q", got)
	}
	c.Close()
	caH.waitFor(t, "the refusal counted on the client host", 10*time.Second, func() bool {
		return caH.metric(t, "proxy_errors_total", map[string]string{"direction": "outbound", "reason": "peer_refused"}) == 1
	})
	if !strings.Contains(caH.log.String(), "peer proxy refused the connection") {
		t.Errorf("client host's log does not say the peer refused")
	}
	web.waitFor(t, "the denial counted on the server host", 10*time.Second, func() bool {
		return web.metric(t, "proxy_errors_total", map[string]string{"direction": "inbound", "reason": "denied"}) == 1
	})
	if l := web.log.String(); !strings.Contains(l, "inbound tcp denied") || !strings.Contains(l, "spiffe://"+td+"/node/ca1") {
		t.Errorf("server host's log does not name the denied client")
	}
}
