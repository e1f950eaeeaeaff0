package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmesh/vmesh/internal/testbed"
)

var (
	flagRounds  = flag.Int("bench.rounds", 3, "rounds of each measurement (interleaved across columns); the median is reported")
	flagDur     = flag.Duration("bench.dur", 5*time.Second, "duration of each timed load run")
	flagColumns = flag.String("bench.columns", "direct,haproxy,vmesh-proxy,vmesh", "columns to run")
	flagOnly    = flag.String("bench.only", "", "scenarios to run (comma list of fixed,max,bulk,conns,redis,memory); empty: all")
	flagHold    = flag.Int("bench.hold", 10000, "idle proxied connections to open for the memory scenario")
	flagOut     = flag.String("bench.out", "results", "directory for the JSON results; empty: none")
	flagDoc     = flag.String("bench.doc", "", "Markdown file whose results section to rewrite (make bench: ../BENCHMARKS.md); empty: none")
	flagPprof   = flag.Bool("bench.pprof", true, "profile the vmesh proxies (control socket /debug/pprof): CPU under wrk, iperf3 and new connections, heap holding idle connections")
)

// nobody runs every load client: vmesh's rules never redirect the agent's
// own uid (root here), so clients must run as another user to be captured.
const nobodyUID = "65534"

// TestBench is the benchmark harness; `make bench` runs it. It builds a
// six-host test bed: vmesh agents on h1 (client) and h2 (server, CA); h3
// (client) and h4 (server) for the direct and HAProxy columns; h5 and h6 for
// vmesh's proxy alone (bench/meshproxy). Each pair has its own iptables
// rules, which never touch another column's traffic.
func TestBench(t *testing.T) {
	if os.Getenv("VMESH_BENCH") != "1" {
		t.Skip("benchmark harness: run with VMESH_BENCH=1 (make bench)")
	}
	testbed.Require(t)
	tl := prepareTools(t)
	bed := testbed.New(t, 6)
	r := &run{t: t, tools: tl, bed: bed, report: &Report{
		Date:    time.Now().UTC().Format(time.RFC3339),
		Machine: machine(tl),
		Rounds:  *flagRounds,
		Method: fmt.Sprintf("%d rounds of every measurement, columns interleaved within each round (order rotated each round); "+
			"each cell is the median of the rounds; timed runs last %s", *flagRounds, *flagDur),
		Unavailable: map[string]string{},
	}}
	want := strings.Split(*flagColumns, ",")
	r.report.Notes = append(r.report.Notes, "load average before the run: "+loadavg())
	for _, h := range bed.Hosts {
		// Connection-rate runs leave tens of thousands of TIME_WAIT sockets
		// on the side that closes first; without reuse, connect() then
		// crawls through the ephemeral ports (tens of ms per connection).
		h.Run(t, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")
	}

	// Backends on both server hosts.
	for _, h := range []*testbed.Host{bed.Hosts[1], bed.Hosts[3], bed.Hosts[5]} {
		startBackends(t, tl, h)
	}
	direct := &column{name: Direct, client: bed.Hosts[2], server: bed.Hosts[3], target: map[string]string{}}
	for _, s := range Services {
		direct.target[s.Name] = fmt.Sprintf("%s:%d", bed.Hosts[3].Addr, s.Port)
	}
	if slices.Contains(want, Direct) {
		r.columns = append(r.columns, direct)
	}
	if slices.Contains(want, HAProxy) {
		if c, err := setupHAProxy(t, tl, bed.Hosts[2], bed.Hosts[3]); err != nil {
			r.report.Unavailable[HAProxy] = err.Error()
		} else {
			r.columns = append(r.columns, c)
		}
	}
	if slices.Contains(want, VMeshProxy) {
		if c, err := setupMeshProxy(t, tl, bed.Hosts[4], bed.Hosts[5]); err != nil {
			t.Logf("vmesh-proxy column unavailable: %v", err)
			r.report.Unavailable[VMeshProxy] = err.Error()
		} else {
			r.columns = append(r.columns, c)
		}
	}
	if slices.Contains(want, VMesh) {
		if c, err := setupVMesh(t, tl, bed.Hosts[0], bed.Hosts[1]); err != nil {
			t.Logf("vmesh column unavailable: %v", err)
			r.report.Unavailable[VMesh] = err.Error()
		} else {
			r.columns = append(r.columns, c)
		}
	}
	ok := r.columns[:0]
	for _, c := range r.columns {
		if err := r.checkPath(c); err != nil {
			if c.name == Direct {
				t.Fatalf("%s: path check: %v", c.name, err)
			}
			t.Logf("%s column unavailable: path check: %v", c.name, err)
			r.report.Unavailable[c.name] = "path check: " + err.Error()
			continue
		}
		ok = append(ok, c)
		r.report.Columns = append(r.report.Columns, c.name)
	}
	r.columns = ok

	start := time.Now()
	idle := r.idleRSS()
	only := func(name string) bool { return *flagOnly == "" || slices.Contains(strings.Split(*flagOnly, ","), name) }
	if only("fixed") {
		r.fixedRate()
	}
	if only("max") {
		r.maxThroughput()
	}
	if only("bulk") {
		r.bulk()
	}
	if only("conns") {
		r.newConns()
	}
	if only("redis") {
		r.redis()
	}
	r.addIdle("idle at start", idle)
	r.addIdle("idle after the loads", r.idleRSS())
	if only("memory") {
		r.memoryHold()
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
	// control is the vmesh client agent's control socket (for pprof).
	controls map[string]string
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
	peakRSS int64         // peak of the sum of their RSS, bytes
}

// during runs fn while sampling the column's proxies.
func (c *column) during(fn func() error) (usage, error) {
	if len(c.procs) == 0 {
		return usage{}, fn()
	}
	cpu0 := c.cpuTicks()
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
	// /proc/<pid>/stat counts in USER_HZ, 100 on Linux.
	return usage{cpu: time.Duration(c.cpuTicks()-cpu0) * 10 * time.Millisecond, peakRSS: peak}, err
}

func (c *column) cpuTicks() int64 {
	var sum int64
	for _, p := range c.procs {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.pid))
		if err != nil {
			continue
		}
		if n, err := ParseProcStat(string(b)); err == nil {
			sum += n
		}
	}
	return sum
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

// rounds runs fn for every round and column, rotating the column order each
// round, and logs failures (a proxy's failure is a result; a direct one
// means the harness is broken).
func (r *run) rounds(what string, fn func(c *column, round int) error) {
	for round := range *flagRounds {
		n := len(r.columns)
		for i := range n {
			c := r.columns[(i+round)%n]
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

func (r *run) warmup(c *column) {
	// One short keep-alive run: opens pools and lets the proxies allocate.
	r.client(c, 30*time.Second, r.tools.fortio, "load", "-qps", "500", "-uniform", "-c", "16", "-t", "1s", "-quiet", c.url("/"))
}

const (
	gFixed = "HTTP/1.1 keep-alive at a fixed rate (fortio -uniform, 16 connections)"
	gMax   = "HTTP max throughput (wrk, 2 threads)"
	gBulk  = "Opaque TCP bulk throughput (iperf3)"
	gConns = "New connections per second (16 concurrent clients)"
	gRedis = "redis-benchmark through opaque port 6379 (50 connections)"
	gMem   = "Memory"
)

func (r *run) fixedRate() {
	for _, c := range r.columns {
		r.warmup(c)
	}
	for _, rate := range []int{500, 1000, 4000} {
		r.rounds(fmt.Sprintf("fixed %d rps", rate), func(c *column, round int) error {
			var res FortioResult
			u, err := c.during(func() error {
				out, err := r.client(c, *flagDur+time.Minute, r.tools.fortio, "load",
					"-qps", strconv.Itoa(rate), "-uniform", "-c", "16", "-t", flagDur.String(),
					"-r", "0.00001", "-p", "50,90,99,99.9", "-json", "-", "-quiet", c.url("/"))
				if err != nil {
					return err
				}
				res, err = ParseFortio(strings.NewReader(out))
				return err
			})
			if err != nil {
				return err
			}
			if res.Errors > 0 {
				return fmt.Errorf("%d of %d requests failed", res.Errors, res.Count)
			}
			for _, p := range []float64{50, 90, 99, 99.9} {
				r.report.Add(gFixed, fmt.Sprintf("%d rps p%v", rate, p), "ms", "lower", c.name, res.Percentiles[p]*1000)
			}
			r.report.Add(gFixed, fmt.Sprintf("%d rps achieved", rate), "rps", "higher", c.name, res.ActualQPS)
			if len(c.procs) > 0 {
				r.report.Add(gFixed, fmt.Sprintf("%d rps proxy CPU per request", rate), "µs", "lower", c.name,
					float64(u.cpu.Microseconds())/float64(res.Count))
			}
			r.peak(gFixed, c, round, u)
			return nil
		})
	}
	r.flushPeaks(gFixed)
}

func (r *run) maxThroughput() {
	for _, conns := range []int{16, 64} {
		r.rounds(fmt.Sprintf("wrk %d conns", conns), func(c *column, round int) error {
			var res WrkResult
			u, err := c.during(func() error {
				out, err := r.client(c, *flagDur+time.Minute, "wrk", "-t", "2", "-c", strconv.Itoa(conns),
					"-d", strconv.Itoa(int(flagDur.Seconds()))+"s", c.url("/"))
				if err != nil {
					return err
				}
				res, err = ParseWrk(out)
				return err
			})
			if err != nil {
				return err
			}
			if res.SocketErrs+res.Non2xx > 0 {
				return fmt.Errorf("wrk: %d socket errors, %d bad responses in %d requests", res.SocketErrs, res.Non2xx, res.Requests)
			}
			r.report.Add(gMax, fmt.Sprintf("%d connections", conns), "req/s", "higher", c.name, res.RPS)
			if len(c.procs) > 0 {
				r.report.Add(gMax, fmt.Sprintf("%d connections proxy CPU per request", conns), "µs", "lower", c.name,
					float64(u.cpu.Microseconds())/float64(res.Requests))
			}
			r.peak(gMax, c, round, u)
			return nil
		})
	}
	r.flushPeaks(gMax)
	if *flagPprof {
		r.profile("wrk16", func(c *column, secs int) {
			r.client(c, time.Duration(secs+60)*time.Second, "wrk", "-t", "2", "-c", "16", "-d", strconv.Itoa(secs)+"s", c.url("/"))
		})
	}
}

func (r *run) bulk() {
	for _, streams := range []int{1, 4} {
		r.rounds(fmt.Sprintf("iperf3 %d streams", streams), func(c *column, round int) error {
			host, port := splitHostPort(c.target["iperf"])
			var res IperfResult
			u, err := c.during(func() error {
				out, err := r.client(c, *flagDur+time.Minute, "iperf3", "-c", host, "-p", port,
					"-t", strconv.Itoa(int(flagDur.Seconds())), "-P", strconv.Itoa(streams), "-J")
				if err != nil {
					// iperf3 -J reports its errors in the JSON.
					if _, perr := ParseIperf(strings.NewReader(out)); perr != nil {
						return fmt.Errorf("%w (%v)", err, perr)
					}
					return err
				}
				res, err = ParseIperf(strings.NewReader(out))
				return err
			})
			if err != nil {
				return err
			}
			name := fmt.Sprintf("%d stream", streams)
			if streams > 1 {
				name += "s"
			}
			r.report.Add(gBulk, name, "Gbit/s", "higher", c.name, res.BitsPerSecond/1e9)
			if len(c.procs) > 0 {
				r.report.Add(gBulk, name+" proxy CPU per GB", "s", "lower", c.name,
					u.cpu.Seconds()/(float64(res.Bytes)/1e9))
			}
			r.peak(gBulk, c, round, u)
			return nil
		})
	}
	r.flushPeaks(gBulk)
	if *flagPprof {
		r.profile("iperf1", func(c *column, secs int) {
			host, port := splitHostPort(c.target["iperf"])
			r.client(c, time.Duration(secs+60)*time.Second, "iperf3", "-c", host, "-p", port, "-t", strconv.Itoa(secs), "-J")
		})
	}
}

func splitHostPort(hp string) (string, string) {
	i := strings.LastIndexByte(hp, ':')
	return hp[:i], hp[i+1:]
}

func (r *run) newConns() {
	dur := min(*flagDur, 4*time.Second)
	r.rounds("new HTTP connections", func(c *column, round int) error {
		var res FortioResult
		u, err := c.during(func() error {
			out, err := r.client(c, dur+time.Minute, r.tools.fortio, "load", "-qps", "0", "-c", "16",
				"-keepalive=false", "-t", dur.String(), "-r", "0.00001", "-p", "50,99", "-json", "-", "-quiet", c.url("/"))
			if err != nil {
				return err
			}
			res, err = ParseFortio(strings.NewReader(out))
			return err
		})
		if err != nil {
			return err
		}
		if res.Errors > 0 {
			return fmt.Errorf("%d of %d requests failed", res.Errors, res.Count)
		}
		r.report.Add(gConns, "HTTP, no keep-alive (fortio -keepalive=false)", "conn/s", "higher", c.name, res.ActualQPS)
		r.report.Add(gConns, "HTTP, no keep-alive p50", "ms", "lower", c.name, res.Percentiles[50]*1000)
		if len(c.procs) > 0 {
			r.report.Add(gConns, "HTTP, no keep-alive proxy CPU per connection", "µs", "lower", c.name,
				float64(u.cpu.Microseconds())/float64(res.Count))
		}
		r.peak(gConns, c, round, u)
		return nil
	})
	r.rounds("new TCP connections", func(c *column, round int) error {
		var res struct {
			Conns      int64   `json:"conns"`
			Errors     int64   `json:"errors"`
			Rate       float64 `json:"rate"`
			P50Ms      float64 `json:"p50_ms"`
			FirstError string  `json:"first_error"`
		}
		u, err := c.during(func() error {
			out, err := r.client(c, dur+time.Minute, r.tools.benchtool, "dial", "-addr", c.target["echo"],
				"-c", "16", "-t", dur.String())
			if err != nil {
				return err
			}
			return json.Unmarshal([]byte(out), &res)
		})
		if err != nil {
			return err
		}
		if res.Errors > 0 {
			return fmt.Errorf("%d of %d connections failed, first: %s", res.Errors, res.Conns+res.Errors, res.FirstError)
		}
		r.report.Add(gConns, "opaque TCP connect+echo+close (benchtool dial)", "conn/s", "higher", c.name, res.Rate)
		r.report.Add(gConns, "opaque TCP connect+echo+close p50", "ms", "lower", c.name, res.P50Ms)
		if len(c.procs) > 0 && res.Conns > 0 {
			r.report.Add(gConns, "opaque TCP proxy CPU per connection", "µs", "lower", c.name,
				float64(u.cpu.Microseconds())/float64(res.Conns))
		}
		r.peak(gConns, c, round, u)
		return nil
	})
	r.flushPeaks(gConns)
	if *flagPprof {
		r.profile("dial", func(c *column, secs int) {
			r.client(c, time.Duration(secs+60)*time.Second, r.tools.benchtool, "dial", "-addr", c.target["echo"],
				"-c", "16", "-t", fmt.Sprintf("%ds", secs))
		})
	}
}

func (r *run) redis() {
	const n = 50000
	r.rounds("redis-benchmark", func(c *column, round int) error {
		host, port := splitHostPort(c.target["redis"])
		var res map[string]RedisResult
		u, err := c.during(func() error {
			out, err := r.client(c, 2*time.Minute, "redis-benchmark", "-h", host, "-p", port,
				"-t", "set,get", "-n", strconv.Itoa(n), "-c", "50", "--csv")
			if err != nil {
				return err
			}
			res, err = ParseRedisBenchmark(out)
			return err
		})
		if err != nil {
			return err
		}
		for _, op := range []string{"SET", "GET"} {
			v, ok := res[op]
			if !ok {
				return fmt.Errorf("no %s result", op)
			}
			r.report.Add(gRedis, op, "req/s", "higher", c.name, v.RPS)
			r.report.Add(gRedis, op+" p50", "ms", "lower", c.name, v.P50Ms)
		}
		if len(c.procs) > 0 {
			r.report.Add(gRedis, "proxy CPU per request", "µs", "lower", c.name, float64(u.cpu.Microseconds())/(2*n))
		}
		r.peak(gRedis, c, round, u)
		return nil
	})
	r.flushPeaks(gRedis)
}

// idleRSS reads the proxies' RSS after a quiet second: per column, the
// largest process's and the sum.
func (r *run) idleRSS() map[string][2]int64 {
	time.Sleep(time.Second)
	m := map[string][2]int64{}
	for _, c := range r.columns {
		if len(c.procs) == 0 {
			continue
		}
		var biggest int64
		for _, p := range c.procs {
			biggest = max(biggest, procRSS(p.pid))
		}
		m[c.name] = [2]int64{biggest, c.rss()}
	}
	return m
}

func (r *run) addIdle(when string, m map[string][2]int64) {
	for _, c := range r.columns {
		if v, ok := m[c.name]; ok {
			r.report.Add(gMem, "RSS "+when+", largest proxy process", "MB", "lower", c.name, mb(v[0]))
			r.report.Add(gMem, "RSS "+when+", both hosts", "MB", "lower", c.name, mb(v[1]))
		}
	}
}

// memoryHold opens flagHold idle connections through each proxy column and
// records the proxies' RSS growth per connection. It runs once per column.
func (r *run) memoryHold() {
	n := *flagHold
	// Each proxy holds two descriptors per proxied connection (client
	// side, upstream side): stay under the hard limit of open files.
	if lim := int(nofileLimit()-300) / 2; n > lim {
		r.report.Notes = append(r.report.Notes, fmt.Sprintf(
			"memory: %d idle connections, not %d: the hard limit of open files here is %d and cannot be raised (no CAP_SYS_RESOURCE); a proxy needs two per connection",
			lim, n, nofileLimit()))
		n = lim
	}
	for _, c := range r.columns {
		if len(c.procs) == 0 {
			continue
		}
		before := c.rss()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		cmd := c.client.Command(ctx, "prlimit", nofileArg(), "--", "setpriv", "--reuid="+nobodyUID,
			"--regid="+nobodyUID, "--clear-groups", "--", r.tools.benchtool, "hold", "-addr", c.target["hold"],
			"-n", strconv.Itoa(n), "-c", "32", "-max", "2m")
		stdin, _ := cmd.StdinPipe()
		stdout, _ := cmd.StdoutPipe()
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			cancel()
			r.t.Errorf("%s: starting hold: %v", c.name, err)
			continue
		}
		var res HoldResultJSON
		err := json.NewDecoder(stdout).Decode(&res)
		if err == nil && res.Open < n {
			err = fmt.Errorf("opened %d of %d connections (%d errors, first: %s)", res.Open, n, res.Errors, res.FirstError)
		}
		if err != nil {
			msg := fmt.Sprintf("memory, %s: %v %s", c.name, err, lastLines(stderr.String(), 3))
			r.t.Log(msg)
			r.report.Notes = append(r.report.Notes, msg)
		}
		if res.Open > 0 {
			// Let the proxies settle (buffers released after the first
			// byte each way), then read RSS.
			time.Sleep(2 * time.Second)
			after := c.rss()
			r.report.Add(gMem, fmt.Sprintf("RSS with %d idle proxied connections, both hosts", res.Open), "MB", "lower", c.name, mb(after))
			r.report.Add(gMem, "per idle proxied connection (both hosts)", "KB", "lower", c.name,
				float64(after-before)/1024/float64(res.Open))
			r.report.Add(gMem, fmt.Sprintf("time to open %d connections", res.Open), "s", "lower", c.name, res.Seconds)
			if *flagPprof {
				r.heapProfiles(c, res.Open)
			}
		}
		stdin.Close()
		io.Copy(io.Discard, stdout)
		cmd.Wait()
		cancel()
	}
}

// HoldResultJSON mirrors benchtool's HoldResult.
type HoldResultJSON struct {
	Open       int     `json:"open"`
	Errors     int     `json:"errors"`
	Seconds    float64 `json:"seconds"`
	FirstError string  `json:"first_error"`
}

// setTargets attaches issue 9's targets to their rows.
func (r *run) setTargets() {
	rep := r.report
	rep.SetTarget(gFixed, "1000 rps p50", AddedAtMost, 0.100)
	rep.SetTarget(gFixed, "1000 rps p99", AddedAtMost, 0.300)
	rep.SetTarget(gBulk, "1 stream", RatioAtLeast, 0.5)
	rep.SetTarget(gBulk, "4 streams", RatioAtLeast, 0.5)
	rep.SetTarget(gConns, "opaque TCP connect+echo+close (benchtool dial)", AtLeast, 5000)
	rep.SetTarget(gMem, "RSS idle at start, largest proxy process", AtMost, 30)
	rep.SetTarget(gMem, "per idle proxied connection (both hosts)", AtMost, 20)
}

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
		doc, err := os.ReadFile(*flagDoc)
		if err != nil {
			r.t.Fatal(err)
		}
		upd, err := UpdateMarkdown(string(doc), r.report.Markdown())
		if err != nil {
			r.t.Fatal(err)
		}
		if err := os.WriteFile(*flagDoc, []byte(upd), 0o644); err != nil {
			r.t.Fatal(err)
		}
		r.t.Logf("results section of %s rewritten", *flagDoc)
	}
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
