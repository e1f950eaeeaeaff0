package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmesh/vmesh/internal/testbed"
)

var (
	flagRounds   = flag.Int("bench.rounds", 3, "rounds of each measurement (interleaved across columns); the median is reported")
	flagDur      = flag.Duration("bench.dur", 5*time.Second, "duration of each timed load run (the fixed-rate runs: -bench.fixeddur)")
	flagFixedDur = flag.Duration("bench.fixeddur", 15*time.Second, "duration of each fixed-rate run (its CPU seconds are reported)")
	flagRates    = flag.String("bench.rates", "1000", "fixed request rates (comma list of req/s)")
	flagColumns  = flag.String("bench.columns", "direct,haproxy,vmesh,vmesh-dedicated,vmesh-vip", "columns to run (also: vmesh-proxy)")
	flagOnly     = flag.String("bench.only", "", "scenarios to run (comma list of "+strings.Join(scenarios, ",")+"); empty: all")
	flagHold     = flag.Int("bench.hold", 10000, "idle proxied connections to open for the memory scenario")
	flagOut      = flag.String("bench.out", "results", "directory for the JSON results; empty: none")
	flagDoc      = flag.String("bench.doc", "", "Markdown file whose results section to rewrite (make bench: ../BENCHMARKS.md); empty: none")
	flagVIPs     = flag.String("bench.vips", "", "the vmesh-vip column's VIPs as http=ADDR,echo=ADDR (default: found through the agent)")
	flagRender   = flag.String("bench.render", "", "TestRender: a results JSON file to render again into -bench.doc (no measuring)")
	flagVMeshEnv = flag.String("bench.vmeshenv", "", "environment for the vmesh agents only, as KEY=VALUE,... (e.g. GOMAXPROCS=1)")
	flagBEnv     = flag.String("bench.benv", "", "environment for the vmesh-b column's agents (added to -bench.vmeshenv's), as KEY=VALUE,...")
	flagBBin     = flag.String("bench.bbin", "", "a vmesh binary for the vmesh-b column's agents instead of the one built from this tree (an A/B of two builds in one run)")
	flagTrace    = flag.String("bench.trace", "", "profiles (comma list of labels, e.g. grpc16) to also take a runtime trace of, for go tool trace")
	flagAllocs   = flag.String("bench.allocs", "", "profiles (comma list of labels) to also take the allocations of (a delta heap profile: go tool pprof -sample_index=alloc_space)")
	flagPprof    = flag.Bool("bench.pprof", true, "profile the vmesh proxies (control socket /debug/pprof): CPU under HTTP max rate, h2load, sequential gRPC, iperf3 and new connections, heap holding idle connections")
)

// scenarios are the harness's scenarios, in the order they run.
var scenarios = []string{"fixed", "max", "h2", "grpc", "ws", "bulk", "conns", "redis", "syscalls", "memory", "balance"}

// nobody runs every load client: vmesh's rules never redirect the agent's
// own uid (root here), so clients must run as another user to be captured.
const nobodyUID = "65534"

// TestBench is the benchmark harness; `make bench` runs it. It builds an
// eight-host test bed: vmesh agents on h1 (client) and h2 (server, CA); h3
// (client) and h4 (server) for the direct and HAProxy columns; h5 and h6 for
// vmesh's proxy alone (bench/meshproxy, when asked for); h7 and h8 for vmesh
// with dedicated opaque connections. Each pair has its own iptables rules,
// which never touch another column's traffic.
func TestBench(t *testing.T) {
	if os.Getenv("VMESH_BENCH") != "1" {
		t.Skip("benchmark harness: run with VMESH_BENCH=1 (make bench)")
	}
	testbed.Require(t)
	want := strings.Split(*flagColumns, ",")
	tl := prepareTools(t, slices.Contains(want, VMeshProxy))
	bed := testbed.New(t, 8)
	r := &run{t: t, tools: tl, bed: bed, report: &Report{
		Date:    time.Now().UTC().Format(time.RFC3339),
		Machine: machine(tl),
		Rounds:  *flagRounds,
		Method: fmt.Sprintf("%d rounds of every measurement, columns interleaved within each round (order rotated each round); "+
			"each cell is the median of the rounds; timed runs last %s, fixed-rate runs %s", *flagRounds, *flagDur, *flagFixedDur),
		Unavailable: map[string]string{},
	}}
	r.report.Notes = append(r.report.Notes, "load average before the run: "+loadavg())
	for _, h := range bed.Hosts {
		// Connection-rate runs leave tens of thousands of TIME_WAIT sockets
		// on the side that closes first; without reuse, connect() then
		// crawls through the ephemeral ports (tens of ms per connection).
		h.Run(t, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")
	}

	// Backends on every server host.
	for _, i := range []int{1, 3, 5, 7} {
		startBackends(t, tl, bed.Hosts[i])
	}
	direct := &column{name: Direct, client: bed.Hosts[2], server: bed.Hosts[3], target: map[string]string{}}
	for _, s := range Services {
		direct.target[s.Name] = fmt.Sprintf("%s:%d", bed.Hosts[3].Addr, s.Port)
	}
	var cols []*column
	if slices.Contains(want, Direct) {
		cols = append(cols, direct)
	}
	if slices.Contains(want, HAProxy) {
		if c, err := setupHAProxy(t, tl, bed.Hosts[2], bed.Hosts[3]); err != nil {
			r.report.Unavailable[HAProxy] = err.Error()
		} else {
			cols = append(cols, c)
		}
	}
	if slices.Contains(want, VMeshProxy) {
		if c, err := setupMeshProxy(t, tl, bed.Hosts[4], bed.Hosts[5]); err != nil {
			t.Logf("vmesh-proxy column unavailable: %v", err)
			r.report.Unavailable[VMeshProxy] = err.Error()
		} else {
			cols = append(cols, c)
		}
	}
	if slices.Contains(want, VMeshB) {
		if slices.Contains(want, VMeshProxy) {
			t.Fatalf("columns %s and %s share hosts h5 and h6: ask for one", VMeshB, VMeshProxy)
		}
		if c, err := setupVMesh(t, tl, bed.Hosts[4], bed.Hosts[5], VMeshB, nil); err != nil {
			t.Logf("vmesh-b column unavailable: %v", err)
			r.report.Unavailable[VMeshB] = err.Error()
		} else {
			cols = append(cols, c)
			note := "vmesh-b column: the vmesh agents with environment " + *flagBEnv
			if *flagBBin != "" {
				note += ", binary " + *flagBBin
			}
			r.report.Notes = append(r.report.Notes, note)
		}
	}
	var vm *column
	if slices.Contains(want, VMesh) || slices.Contains(want, VMeshVIP) {
		c, err := setupVMesh(t, tl, bed.Hosts[0], bed.Hosts[1], VMesh, nil)
		if err != nil {
			t.Logf("vmesh column unavailable: %v", err)
			r.report.Unavailable[VMesh] = err.Error()
		} else {
			vm = c
			if slices.Contains(want, VMesh) {
				cols = append(cols, c)
			}
			r.report.Notes = append(r.report.Notes, "vmesh column: the agents as shipped; "+shippedDefault(tl, "multiplex_opaque"))
		}
	}
	if slices.Contains(want, VMeshDedicated) {
		off := false
		if c, err := setupVMesh(t, tl, bed.Hosts[6], bed.Hosts[7], VMeshDedicated, &off); err != nil {
			t.Logf("vmesh-dedicated column unavailable: %v", err)
			r.report.Unavailable[VMeshDedicated] = err.Error()
		} else {
			c.only = []string{"bulk", "conns", "memory", "idle"}
			cols = append(cols, c)
		}
	}
	for _, c := range cols {
		if err := r.checkPath(c); err != nil {
			if c.name == Direct {
				t.Fatalf("%s: path check: %v", c.name, err)
			}
			t.Logf("%s column unavailable: path check: %v", c.name, err)
			r.report.Unavailable[c.name] = "path check: " + err.Error()
			continue
		}
		r.columns = append(r.columns, c)
	}
	// The VIP column needs the vmesh agents up and the service known.
	if slices.Contains(want, VMeshVIP) && vm != nil && r.report.Unavailable[VMesh] == "" {
		if c, err := vipColumn(r, vm); err != nil {
			t.Logf("vmesh-vip column unavailable: %v", err)
			r.report.Unavailable[VMeshVIP] = err.Error()
			r.report.NoteGroup(gBalance, "vmesh-vip: "+err.Error())
		} else if err := r.checkPath(c); err != nil {
			t.Logf("vmesh-vip column unavailable: path check: %v", err)
			r.report.Unavailable[VMeshVIP] = "path check: " + err.Error()
			r.report.NoteGroup(gBalance, "vmesh-vip: path check through the VIP failed: "+err.Error())
		} else {
			r.columns = append(r.columns, c)
		}
	}
	for _, name := range []string{Direct, HAProxy, VMesh, VMeshB, VMeshDedicated, VMeshVIP, VMeshProxy} {
		for _, c := range r.columns {
			if c.name == name {
				r.report.Columns = append(r.report.Columns, name)
			}
		}
	}

	start := time.Now()
	idle := r.idleRSS()
	for _, c := range r.columns {
		if c.name == VMesh {
			r.rssParts(c, "idle at start")
			if *flagPprof {
				r.heapProfiles(c, "idle at start", "idle")
			}
		}
	}
	only := func(name string) bool { return *flagOnly == "" || slices.Contains(strings.Split(*flagOnly, ","), name) }
	for _, s := range []struct {
		name string
		fn   func()
	}{
		{"fixed", r.fixedRate}, {"max", r.maxThroughput}, {"h2", r.h2load}, {"grpc", r.grpc}, {"ws", r.websocket},
		{"bulk", r.bulk}, {"conns", r.newConns}, {"redis", r.redis}, {"syscalls", r.syscalls},
	} {
		if only(s.name) {
			s.fn()
		}
	}
	r.addIdle("idle at start", idle)
	r.addIdle("idle after the loads", r.idleRSS())
	if only("memory") {
		r.memoryHold()
	}
	if only("balance") && slices.ContainsFunc(r.columns, func(c *column) bool { return c.name == VMeshVIP }) {
		r.balance()
	}
	r.setTargets()
	r.report.Finish()
	r.report.Notes = append(r.report.Notes, fmt.Sprintf("whole harness run: %s; load average after: %s",
		time.Since(start).Round(time.Second), loadavg()))

	var buf bytes.Buffer
	r.report.WriteText(&buf)
	fmt.Print(buf.String())
	r.save()
}

// TestRender rewrites -bench.doc's results section from a saved results
// file (-bench.render), e.g. after the rendering changed; it measures
// nothing.
func TestRender(t *testing.T) {
	if *flagRender == "" {
		t.Skip("re-renders a results file: -bench.render FILE -bench.doc ../BENCHMARKS.md")
	}
	b, err := os.ReadFile(*flagRender)
	if err != nil {
		t.Fatal(err)
	}
	var rep Report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("reading %s: %v", *flagRender, err)
	}
	var buf bytes.Buffer
	rep.WriteText(&buf)
	fmt.Print(buf.String())
	if *flagDoc != "" {
		if err := rewriteDoc(*flagDoc, &rep); err != nil {
			t.Fatal(err)
		}
	}
}

// shippedDefault says what `vmesh config default` sets key to in the tree
// measured.
func shippedDefault(tl *tools, key string) string {
	out, err := exec.Command(tl.vmesh, "config", "default").Output()
	if err != nil {
		return fmt.Sprintf("default of %s unknown (%v)", key, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && strings.TrimSpace(k) == key {
			return fmt.Sprintf("proxy.%s defaults to %s in this tree", key, strings.TrimSpace(v))
		}
	}
	return fmt.Sprintf("proxy.%s is not a key in this tree", key)
}

// run is one harness invocation.
type run struct {
	t       *testing.T
	tools   *tools
	bed     *testbed.Bed
	columns []*column
	report  *Report
	// peaks holds, per group, column and round, the proxies' peak RSS.
	peaks map[string]map[string][]int64
}

// column is one way of connecting the client host to the server host.
type column struct {
	name           string
	client, server *testbed.Host
	// target maps a service name to the host:port the client dials.
	target map[string]string
	// procs are the proxy processes whose CPU and memory are counted.
	procs []proc
	// controls are the vmesh agents' control sockets by host (pprof).
	controls map[string]string
	// only lists the scenarios the column runs; none: all but balance.
	only []string
}

// runs says whether the column takes part in a scenario. Balancing
// compares vmesh through a host address with vmesh through a VIP only.
func (c *column) runs(scenario string) bool {
	if scenario == "balance" {
		return c.name == VMesh || c.name == VMeshVIP
	}
	if c.only == nil {
		return c.name != VMeshVIP
	}
	return slices.Contains(c.only, scenario)
}

// proc is a proxy process, by host.
type proc struct {
	host string
	pid  int
}

func (c *column) url(path string) string { return "http://" + c.target["http"] + path }

// usage is what the proxies used during one run.
type usage struct {
	cpu     time.Duration // CPU time of all the column's proxies
	sys     time.Duration // the part of cpu in the kernel (system calls, and the network stack they run)
	peakRSS int64         // peak of the sum of their RSS, bytes
}

// during runs fn while sampling the column's proxies.
func (c *column) during(fn func() error) (usage, error) {
	if len(c.procs) == 0 {
		return usage{}, fn()
	}
	user0, sys0 := c.cpuTicks()
	var (
		peak int64
		wg   sync.WaitGroup
	)
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		tk := time.NewTicker(100 * time.Millisecond)
		defer tk.Stop()
		for {
			peak = max(peak, c.rss())
			select {
			case <-stop:
				return
			case <-tk.C:
			}
		}
	}()
	err := fn()
	close(stop)
	wg.Wait()
	peak = max(peak, c.rss())
	user1, sys1 := c.cpuTicks()
	// /proc/<pid>/stat counts in USER_HZ, 100 on Linux.
	const tick = 10 * time.Millisecond
	return usage{cpu: time.Duration(user1-user0+sys1-sys0) * tick, sys: time.Duration(sys1-sys0) * tick, peakRSS: peak}, err
}

// cpuTicks sums the column's proxies' user and kernel CPU time.
func (c *column) cpuTicks() (user, system int64) {
	for _, p := range c.procs {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.pid))
		if err != nil {
			continue
		}
		if u, s, err := ParseProcStat(string(b)); err == nil {
			user += u
			system += s
		}
	}
	return user, system
}

func (c *column) rss() int64 {
	var sum int64
	for _, p := range c.procs {
		sum += procRSS(p.pid)
	}
	return sum
}

func procRSS(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	n, _ := ParseVmRSS(string(b))
	return n
}

// rssParts notes what a column's processes' RSS is made of: anonymous
// memory (heap, stacks, runtime) and pages of the binary and libraries.
func (r *run) rssParts(c *column, when string) {
	for _, p := range c.procs {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid))
		if err != nil {
			continue
		}
		var parts []string
		for _, k := range []string{"RssAnon", "RssFile"} {
			if n, err := ParseStatusBytes(string(b), k); err == nil {
				parts = append(parts, fmt.Sprintf("%s %d kB", k, n>>10))
			}
		}
		msg := fmt.Sprintf("memory, %s on %s %s: %s", c.name, p.host, when, strings.Join(parts, ", "))
		r.t.Log(msg)
		r.report.Notes = append(r.report.Notes, msg)
	}
}

// client runs a load client in the column's client host as nobody, bounded
// by timeout, and returns its standard output.
func (r *run) client(c *column, timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	argv := append([]string{nofileArg(), "--", "setpriv", "--reuid=" + nobodyUID, "--regid=" + nobodyUID, "--clear-groups", "--", name}, args...)
	cmd := c.client.Command(ctx, "prlimit", argv...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, lastLines(stderr.String(), 5))
	}
	return stdout.String(), nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// checkPath proves where the column's HTTP traffic goes: the backend
// reports the peer it saw, and a request must succeed.
func (r *run) checkPath(c *column) error {
	var out string
	var err error
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err = r.client(c, 10*time.Second, r.tools.benchtool, "get", "-url", c.url("/whoami"))
		// Through a proxy the backend must not see the client host's own
		// address (that would be a passthrough: the mesh does not know the
		// service yet).
		if err == nil && c.name != Direct && strings.HasPrefix(out, c.client.Addr.String()+":") {
			err = fmt.Errorf("not proxied: the backend saw %s", strings.TrimSpace(out))
		}
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	r.t.Logf("%s: backend saw %s", c.name, strings.TrimSpace(out))
	r.report.Notes = append(r.report.Notes, fmt.Sprintf("path check %s: the backend saw the request from %s", c.name, strings.TrimSpace(out)))
	return nil
}

// rounds runs fn for every round and column taking part in scenario,
// rotating the column order each round, and logs failures (a proxy's
// failure is a result; a direct one means the harness is broken).
func (r *run) rounds(what, scenario string, fn func(c *column, round int) error) {
	var cols []*column
	for _, c := range r.columns {
		if c.runs(scenario) {
			cols = append(cols, c)
		}
	}
	for round := range *flagRounds {
		n := len(cols)
		for i := range n {
			c := cols[(i+round)%n]
			if err := fn(c, round); err != nil {
				msg := fmt.Sprintf("%s, %s, round %d: %v", what, c.name, round+1, err)
				if c.name == Direct {
					r.t.Errorf("%s", msg)
				} else {
					r.t.Logf("%s", msg)
				}
				r.report.Notes = append(r.report.Notes, msg)
			}
		}
	}
}

// peak records a run's peak RSS for a group's "peak RSS" row.
func (r *run) peak(group string, c *column, round int, u usage) {
	if len(c.procs) == 0 {
		return
	}
	if r.peaks == nil {
		r.peaks = map[string]map[string][]int64{}
	}
	if r.peaks[group] == nil {
		r.peaks[group] = map[string][]int64{}
	}
	p := r.peaks[group][c.name]
	for len(p) <= round {
		p = append(p, 0)
	}
	p[round] = max(p[round], u.peakRSS)
	r.peaks[group][c.name] = p
}

func (r *run) flushPeaks(group string) {
	for col, ps := range r.peaks[group] {
		for _, p := range ps {
			r.report.Add(group, "peak RSS of the proxies (both hosts)", "MB", "lower", col, mb(p))
		}
	}
}

func mb(b int64) float64 { return float64(b) / (1 << 20) }

func (r *run) save() {
	stamp := strings.NewReplacer(":", "", "-", "").Replace(r.report.Date)
	if *flagOut != "" {
		if err := os.MkdirAll(*flagOut, 0o755); err != nil {
			r.t.Fatal(err)
		}
		path := filepath.Join(*flagOut, stamp+".json")
		if err := r.report.WriteJSON(path); err != nil {
			r.t.Fatal(err)
		}
		r.t.Logf("results written to %s", path)
	}
	if *flagDoc != "" {
		if err := rewriteDoc(*flagDoc, r.report); err != nil {
			r.t.Fatal(err)
		}
		r.t.Logf("results section of %s rewritten", *flagDoc)
	}
}

// rewriteDoc replaces the results section of the Markdown file path with
// rep.
func rewriteDoc(path string, rep *Report) error {
	doc, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	upd, err := UpdateMarkdown(string(doc), rep.Markdown())
	if err != nil {
		return err
	}
	return os.WriteFile(path, []byte(upd), 0o644)
}

// loadavg returns the machine's 1, 5 and 15-minute load averages: other
// work on the machine skews a run, and this shows it.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func machine(tl *tools) Machine {
	m := Machine{Nproc: runtime.NumCPU(), GoVersion: runtime.Version(), Tools: tl.versions}
	if out, err := exec.Command("git", "describe", "--always", "--dirty", "--abbrev=12").Output(); err == nil {
		m.Revision = strings.TrimSpace(string(out))
		if b, err := exec.Command("git", "rev-parse", "--abbrev-ref", "HEAD").Output(); err == nil {
			m.Revision += " (" + strings.TrimSpace(string(b)) + ")"
		}
	}
	if out, err := exec.Command("uname", "-r").Output(); err == nil {
		m.Kernel = strings.TrimSpace(string(out))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	return m
}
