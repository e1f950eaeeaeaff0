package node_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// outcome is one request or connection of a load loop.
type outcome struct {
	at      time.Duration // since the loop started
	backend string        // who answered; "" on failure
	err     string
}

// loadLoop runs one call every interval until stop closes, each in its own
// goroutine (an open-loop load: a slow answer does not slow the rate), and
// returns every outcome once all calls returned.
func loadLoop(interval time.Duration, stop <-chan struct{}, call func() (string, error)) []outcome {
	var mu sync.Mutex
	var wg sync.WaitGroup
	var out []outcome
	start := time.Now()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			wg.Wait()
			return out
		case <-tick.C:
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			at := time.Since(start)
			b, err := call()
			o := outcome{at: at, backend: b}
			if err != nil {
				o.err = err.Error()
			}
			mu.Lock()
			out = append(out, o)
			mu.Unlock()
		}()
	}
}

// TestFailoverUnderLoad: 1000 GETs one at a time to web's VIP spread 40-60 %
// over its two backends. Then a client app sends a steady 200 GET/s to web's
// VIP and opens 20 connections/s to kv's VIP; both backends take requests;
// then web2's host loses its agent and its apps (SIGKILL, the
// apps' sockets closed: the host still answers with resets). Not one GET
// fails (a request whose endpoint died is retried on the other before the
// app sees anything), web1 answers everything within 5 s, and every kv
// connection opened 5 s after the kill succeeds.
func TestFailoverUnderLoad(t *testing.T) {
	vb := newVIPBed(t)
	cli := vb.cli
	tr := &http.Transport{DialContext: cli.DialContext, MaxIdleConnsPerHost: 256, IdleConnTimeout: time.Minute}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 15 * time.Second}
	url := fmt.Sprintf("http://%s:8080/", vb.webVIP)
	get := func() (string, error) {
		resp, err := client.Get(url)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err == nil && resp.StatusCode != 200 {
			err = fmt.Errorf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(b)))
		}
		return strings.TrimSpace(string(b)), err
	}
	kv := func() (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := cli.DialContext(ctx, "tcp", fmt.Sprintf("%s:9000", vb.kvVIP))
		if err != nil {
			return "", err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return "", fmt.Errorf("reading the backend's name: %w", err)
		}
		return strings.TrimSpace(line), nil
	}

	// The spread at equal weights: 1000 GETs, one at a time (a closed loop,
	// so the spread measures the balancer, not how a loaded machine happens
	// to schedule the open-loop load below).
	spread := map[string]int{}
	for i := range 1000 {
		name, err := get()
		if err != nil {
			t.Fatalf("GET %d of 1000 before the load: %v", i, err)
		}
		spread[name]++
	}
	t.Logf("1000 sequential GETs: %v", spread)
	if share := float64(spread["web1"]) / 1000; share < 0.4 || share > 0.6 {
		t.Errorf("web1 took %.0f%% of 1000 sequential GETs (%v); want 40-60%% at equal weights", 100*share, spread)
	}

	stop := make(chan struct{})
	var gets, conns []outcome
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); gets = loadLoop(5*time.Millisecond, stop, get) }()
	go func() { defer wg.Done(); conns = loadLoop(50*time.Millisecond, stop, kv) }()
	time.Sleep(6 * time.Second) // the load's duration before the kill, not a wait for an event
	killedAt := time.Now()
	vb.w2.stop(t, syscall.SIGKILL)
	vb.webApps["web2"].Close()
	vb.kvApps["web2"].Close()
	time.Sleep(9 * time.Second) // the load's duration after the kill
	close(stop)
	wg.Wait()
	loadStart := killedAt.Add(-6 * time.Second)
	kill := killedAt.Sub(loadStart)

	count := func(os []outcome, from, to time.Duration) (n int, by map[string]int, fails []string) {
		by = map[string]int{}
		for _, o := range os {
			if o.at < from || o.at >= to {
				continue
			}
			n++
			if o.err != "" {
				fails = append(fails, fmt.Sprintf("%.2fs: %s", (o.at-kill).Seconds(), o.err))
				continue
			}
			by[o.backend]++
		}
		return n, by, fails
	}
	n, by, fails := count(gets, time.Second, kill) // after the first second: pools warm
	t.Logf("before the kill: %d GETs, %v, %d failed", n, by, len(fails))
	if len(fails) > 0 || n < 800 {
		t.Errorf("before the kill: %d GETs, %d failed: %v", n, len(fails), fails)
	}
	if by["web1"] == 0 || by["web2"] == 0 {
		t.Errorf("before the kill one backend took every GET (%v): the load was not balanced", by)
	}
	n, by, fails = count(gets, kill, 1<<62)
	t.Logf("after the kill: %d GETs, %v, %d failed", n, by, len(fails))
	if len(fails) > 0 {
		t.Errorf("%d of %d GETs failed after web2 died (retries should hide it): %v", len(fails), n, fails)
	}
	if _, by, _ := count(gets, kill+5*time.Second, 1<<62); by["web2"] > 0 {
		t.Errorf("web2 answered %d GETs more than 5 s after it died", by["web2"])
	}
	n, by, fails = count(conns, kill+5*time.Second, 1<<62)
	t.Logf("kv connections from 5 s after the kill: %d, %v, %d failed", n, by, len(fails))
	if len(fails) > 0 || by["web1"] != n || n < 50 {
		t.Errorf("kv connections opened 5 s after web2 died: %d, %v; failed: %v", n, by, fails)
	}
	_, _, early := count(conns, kill, kill+5*time.Second)
	t.Logf("kv connections that failed in the first 5 s: %d", len(early))
}

// TestSplitAndLatency: web1 (labels version=v1) and web2 (v2) serve web.
// With web2 made 20 ms slower, the latency-aware balancer sends it less
// than a quarter of 1000 requests. Then a 90/10 split is added to the
// client's config by reload, with a keep-alive connection open across it:
// the connection goes on, 1000 requests split 90/10 (±5 %), and `vmesh
// stat` shows both subsets.
func TestSplitAndLatency(t *testing.T) {
	vb := newVIPBed(t)
	cli := vb.cli
	tr := &http.Transport{DialContext: cli.DialContext, MaxConnsPerHost: 4, MaxIdleConnsPerHost: 4}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	url := fmt.Sprintf("http://%s:8080/", vb.webVIP)
	run := func(n int) map[string]int {
		t.Helper()
		var mu sync.Mutex
		got := map[string]int{}
		var wg sync.WaitGroup
		work := make(chan struct{})
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range work {
					resp, err := client.Get(url)
					name := "error"
					if err == nil {
						b, _ := io.ReadAll(resp.Body)
						resp.Body.Close()
						name = strings.TrimSpace(string(b))
					}
					mu.Lock()
					got[name]++
					mu.Unlock()
				}
			}()
		}
		for range n {
			work <- struct{}{}
		}
		close(work)
		wg.Wait()
		return got
	}

	vb.webDelay["web2"].Store(int64(20 * time.Millisecond))
	run(100) // the balancer learns the latencies
	got := run(1000)
	t.Logf("web2 20 ms slower: %v", got)
	if got["web1"]+got["web2"] != 1000 || got["web2"] >= 250 {
		t.Errorf("with web2 20 ms slower, 1000 requests went %v; want web2 under a quarter", got)
	}
	vb.webDelay["web2"].Store(0)

	// One connection open across the reload.
	held := &http.Client{Transport: &http.Transport{DialContext: cli.DialContext, MaxConnsPerHost: 1}, Timeout: 10 * time.Second}
	conns := 0
	trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) {
		if !i.Reused {
			conns++
		}
	}}
	heldGet := func() error {
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "GET", url, nil)
		resp, err := held.Do(req)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		return resp.Body.Close()
	}
	if err := heldGet(); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(cli.cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`
[[split]]
service = "web"
[[split.subset]]
name = "stable"
labels = { version = "v1" }
weight = 90
[[split.subset]]
name = "canary"
labels = { version = "v2" }
weight = 10
`)
	f.Close()
	cli.Run(t, vmeshBin, "reload", "--socket", cli.socket())
	if err := heldGet(); err != nil || conns != 1 {
		t.Errorf("the keep-alive connection across the reload: %v, %d connections (want 1)", err, conns)
	}

	statOut := make(chan string, 1)
	go func() {
		out, err := cli.Try(vmeshBin, "stat", "-o", "json", "--window", "2s")
		if err != nil {
			out = err.Error()
		}
		statOut <- out
	}()
	got = run(1000)
	t.Logf("90/10 split: %v", got)
	if got["web1"]+got["web2"] != 1000 || got["web1"] < 850 || got["web1"] > 950 {
		t.Errorf("1000 requests with a 90/10 split went %v; want web1 90 %% ±5", got)
	}
	var report struct {
		Endpoints []struct {
			Subset, Endpoint string
			Share            float64
		}
	}
	out := <-statOut
	if err := json.Unmarshal([]byte(out), &report); err != nil {
		t.Fatalf("vmesh stat -o json: %v\n%s", err, out)
	}
	subsets := map[string]string{}
	for _, e := range report.Endpoints {
		subsets[e.Subset] = e.Endpoint
	}
	if subsets["stable"] != "web1" || subsets["canary"] != "web2" {
		t.Errorf("vmesh stat's endpoints: %s", out)
	}
}
