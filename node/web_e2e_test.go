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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/vmesh/vmesh/internal/testbed"
)

// browser returns the Chromium binary, or skips (fails under CI=true).
func browser(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("no chromium (apt-get install chromium); CI must run this test")
	}
	t.Skip("no chromium (apt-get install chromium)")
	return ""
}

// artifactDir is where tests leave files for people to look at:
// $VMESH_ARTIFACTS, else artifacts/ at the top of the repository
// (gitignored).
func artifactDir(t *testing.T) string {
	dir := os.Getenv("VMESH_ARTIFACTS")
	if dir == "" {
		dir = filepath.Join("..", "artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs(dir)
	return abs
}

// TestWebPage loads the admin page of a host of a running two-host mesh in
// headless Chromium and checks what it renders: the service, its endpoint's
// health, a non-zero request rate computed live, the edge with mTLS, the
// members and the certificates. It saves a screenshot.
func TestWebPage(t *testing.T) {
	bed := testbed.New(t, 2)
	chromium := browser(t)
	caH := newMeshHost(t, bed.Hosts[0], "ca1")
	web := newMeshHost(t, bed.Hosts[1], "web")

	keyFile := filepath.Join(caH.dir, "gossip.key")
	key := strings.TrimSpace(caH.Run(t, vmeshBin, "keygen"))
	os.WriteFile(keyFile, []byte(key+"\n"), 0o600)
	caH.Run(t, vmeshBin, "ca", "init", "--trust-domain", td, "--dir", filepath.Join(caH.dir, "ca"))
	serveHTTP(t, web.Host, 8080, "hello from web\n")
	// echo listens on web's address only, not on loopback: its
	// [[service]] says so with `address`, and the proxy dials it there.
	var echoLn net.Listener
	if err := web.Do(func() (err error) { echoLn, err = net.Listen("tcp", web.Addr.String()+":9000"); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { echoLn.Close() })
	go func() {
		for {
			c, err := echoLn.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()

	caH.writeConfig(t, keyFile, fmt.Sprintf("role = \"server\"\ndir = %q\n", filepath.Join(caH.dir, "ca")))
	caH.start(t)
	tok := strings.TrimSpace(caH.Run(t, vmeshBin, "token", "create", "--socket", caH.socket(), "--node", "web", "--services", "web,echo"))
	web.writeConfig(t, keyFile, fmt.Sprintf("token = %q\n[[service]]\nname = \"web\"\nport = 8080\nprotocol = \"http1\"\n"+
		"[[service]]\nname = \"echo\"\nport = 9000\nprotocol = \"opaque\"\naddress = %q\n", tok, web.Addr))
	addJoin(t, web.cfg, caH.Addr.String())
	web.start(t)
	caH.waitFor(t, "web and echo in ca1's catalog", 30*time.Second, func() bool {
		out, err := caH.Try(vmeshBin, "services", "--admin", "127.0.0.1:4191")
		return err == nil && strings.Count(out, "passing") == 2
	})

	// Traffic from ca1 to web through both proxies, until the test ends:
	// the test process is root on ca1, whose programs are meshed.
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
			err = caH.Do(func() error {
				var d net.Dialer
				c, err = d.DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var served, failed, echoed atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			resp, err := client.Get("http://" + web.Addr.String() + ":8080/")
			if err != nil {
				failed.Add(1)
				continue
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			// And an opaque TCP round trip, now and then.
			if served.Add(1)%10 == 1 {
				var c net.Conn
				if err := caH.Do(func() (err error) {
					c, err = net.DialTimeout("tcp", web.Addr.String()+":9000", 5*time.Second)
					return err
				}); err == nil {
					c.SetDeadline(time.Now().Add(5 * time.Second))
					io.WriteString(c, "ping\n")
					buf := make([]byte, 5)
					if _, err := io.ReadFull(c, buf); err == nil && string(buf) == "ping\n" {
						echoed.Add(1)
					}
					c.Close()
				}
			}
		}
	}()
	defer func() { close(stop); wg.Wait() }()

	// Chromium runs inside web's namespace, where the admin API listens.
	wrapper := filepath.Join(t.TempDir(), "chromium-in-netns")
	os.WriteFile(wrapper, []byte(fmt.Sprintf("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n", web.NS, chromium)), 0o755)
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(wrapper), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()), chromedp.WindowSize(1280, 1100))
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelA()
	// The first Run starts the browser, which lives as long as the
	// context of that call: no timeout on it (go test's bounds the test).
	ctx, cancelB := chromedp.NewContext(actx)
	defer cancelB()
	if err := chromedp.Do(ctx, chromedp.Navigate("http://127.0.0.1:4191/?refresh=1")); err != nil {
		t.Fatalf("loading the page: %v", err)
	}
	table := func(id string) [][]string {
		rows, err := chromedp.Run(ctx, chromedp.Evaluate[[][]string](
			`[...document.querySelectorAll('#`+id+` tbody tr')].map(tr => [...tr.cells].map(c => c.textContent))`))
		if err != nil {
			t.Fatalf("reading #%s: %v", id, err)
		}
		return rows
	}
	var golden [][]string
	deadline := time.Now().Add(30 * time.Second)
	for {
		golden = table("golden")
		if rps := inboundRPS(golden, "web"); rps > 0 {
			t.Logf("the page shows web inbound at %.1f req/s", rps)
			break
		}
		if time.Now().After(deadline) {
			body, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body.innerText`))
			t.Logf("page text:\n%s", body)
			t.Fatalf("no non-zero req/s for web on the page after 30s (%d requests served, %d failed); golden table: %q", served.Load(), failed.Load(), golden)
		}
		time.Sleep(250 * time.Millisecond)
	}
	summary, err := chromedp.Run(ctx, chromedp.Text("#summary"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(summary, "ready") || !strings.Contains(summary, "2 member(s) alive") {
		t.Errorf("summary: %q", summary)
	}
	if !rowWith(table("services"), "web", "passing") {
		t.Errorf("services table has no passing web: %q", table("services"))
	}
	if !rowWith(table("edges"), "spiffe://"+td+"/node/ca1", "web", "mTLS") {
		t.Errorf("edges table has no mTLS edge from ca1 to web: %q", table("edges"))
	}
	if !rowWith(table("members"), "ca1", "alive") || !rowWith(table("members"), "web", "alive") {
		t.Errorf("members table: %q", table("members"))
	}
	if !rowWith(table("certs"), "spiffe://"+td+"/svc/web") {
		t.Errorf("certificates table has no web certificate: %q", table("certs"))
	}
	if echoed.Load() == 0 {
		t.Errorf("no echo round trip through the mesh to a service bound to %s (address set)", web.Addr)
	}
	// Every metric the example Grafana dashboard queries is exported by
	// the agents of a mesh carrying traffic.
	checkDashboardMetrics(t, web.Run(t, "curl", "-sf", "http://127.0.0.1:4191/metrics"), caH.Run(t, "curl", "-sf", "http://127.0.0.1:4191/metrics"))

	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	shot := filepath.Join(artifactDir(t), "web-page.png")
	if err := os.WriteFile(shot, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot of the page: %s", shot)
	fmt.Fprintf(os.Stderr, "web page screenshot: %s\n", shot)
}

// inboundRPS returns the req/s the golden table shows for service inbound.
func inboundRPS(rows [][]string, service string) float64 {
	for _, r := range rows {
		if len(r) >= 4 && r[0] == service && r[1] == "inbound" {
			f, err := strconv.ParseFloat(r[3], 64)
			if err == nil {
				return f
			}
		}
	}
	return 0
}

// rowWith reports whether a row holds every one of cells (as whole cells).
func rowWith(rows [][]string, cells ...string) bool {
	for _, r := range rows {
		all := true
		for _, c := range cells {
			found := false
			for _, have := range r {
				if have == c {
					found = true
				}
			}
			all = all && found
		}
		if all {
			return true
		}
	}
	return false
}
