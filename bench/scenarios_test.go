package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// Row groups, one per scenario, in the order they run.
const (
	gFixed   = "HTTP/1.1 keep-alive at a fixed rate (fortio -uniform, 16 connections)"
	gMax     = "HTTP/1.1 keep-alive max throughput (fortio -qps 0)"
	gH2      = "HTTP/2 cleartext max throughput (h2load, 8 connections × 10 streams)"
	gGRPC    = "gRPC unary calls (grpc-go, benchtool grpc, 64-byte payload)"
	gWS      = "WebSocket echo (benchtool ws, 16 connections, 64-byte messages)"
	gBulk    = "Opaque TCP bulk throughput (iperf3)"
	gConns   = "New connections per second (16 concurrent clients)"
	gRedis   = "redis-benchmark through opaque port 6379 (50 connections)"
	gMem     = "Memory"
	gBalance = "Balancing (issue 14): vmesh through the service VIP vs through the host's address"
)

func (r *run) warmup(c *column) {
	// One short keep-alive run: opens pools and lets the proxies allocate.
	r.client(c, 30*time.Second, r.tools.fortio, "load", "-qps", "500", "-uniform", "-c", "16", "-t", "1s", "-quiet", c.url("/"))
}

// perOp records the proxies' CPU per operation of a run, and the part of
// it in the kernel (system calls and the network stack they run), if the
// column has proxies.
func (r *run) perOp(group, name string, c *column, u usage, ops int64) {
	if len(c.procs) > 0 && ops > 0 {
		r.report.Add(group, name, "µs", "lower", c.name, float64(u.cpu.Microseconds())/float64(ops))
		r.report.Add(group, name+", in the kernel", "µs", "lower", c.name, float64(u.sys.Microseconds())/float64(ops))
	}
}

func (r *run) fixedRate() {
	for _, c := range r.columns {
		if c.runs("fixed") {
			r.warmup(c)
		}
	}
	for _, f := range strings.Split(*flagRates, ",") {
		rate, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || rate <= 0 {
			r.t.Fatalf("-bench.rates: %q is not a request rate", f)
		}
		r.rounds(fmt.Sprintf("fixed %d rps", rate), "fixed", func(c *column, round int) error {
			var res FortioResult
			u, err := c.during(func() error {
				out, err := r.client(c, *flagFixedDur+time.Minute, r.tools.fortio, "load",
					"-qps", strconv.Itoa(rate), "-uniform", "-c", "16", "-t", flagFixedDur.String(),
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
				r.report.Add(gFixed, fmt.Sprintf("%d rps proxy CPU over %s, both hosts", rate, *flagFixedDur), "s", "lower", c.name, u.cpu.Seconds())
			}
			r.perOp(gFixed, fmt.Sprintf("%d rps proxy CPU per request", rate), c, u, res.Count)
			r.peak(gFixed, c, round, u)
			return nil
		})
	}
	r.flushPeaks(gFixed)
}

// fortioMax runs fortio at its maximum rate with keep-alive connections.
func (r *run) fortioMax(c *column, conns int, dur time.Duration) (FortioResult, error) {
	out, err := r.client(c, dur+time.Minute, r.tools.fortio, "load", "-qps", "0", "-c", strconv.Itoa(conns),
		"-t", dur.String(), "-r", "0.00001", "-p", "50,99", "-json", "-", "-quiet", c.url("/"))
	if err != nil {
		return FortioResult{}, err
	}
	res, err := ParseFortio(strings.NewReader(out))
	if err == nil && res.Errors > 0 {
		err = fmt.Errorf("%d of %d requests failed", res.Errors, res.Count)
	}
	return res, err
}

func (r *run) maxThroughput() {
	for _, conns := range []int{16, 64} {
		r.rounds(fmt.Sprintf("max rate %d conns", conns), "max", func(c *column, round int) error {
			var res FortioResult
			u, err := c.during(func() (err error) {
				res, err = r.fortioMax(c, conns, *flagDur)
				return err
			})
			if err != nil {
				return err
			}
			r.report.Add(gMax, fmt.Sprintf("%d connections", conns), "req/s", "higher", c.name, res.ActualQPS)
			r.report.Add(gMax, fmt.Sprintf("%d connections p50", conns), "ms", "lower", c.name, res.Percentiles[50]*1000)
			r.perOp(gMax, fmt.Sprintf("%d connections proxy CPU per request", conns), c, u, res.Count)
			r.peak(gMax, c, round, u)
			return nil
		})
	}
	r.flushPeaks(gMax)
	if *flagPprof {
		r.profile("HTTP/1.1 max rate, 16 connections (fortio)", "http16", func(c *column, secs int) {
			r.fortioMax(c, 16, time.Duration(secs)*time.Second)
		})
		r.profile("HTTP/1.1 max rate, 64 connections (fortio)", "http64", func(c *column, secs int) {
			r.fortioMax(c, 64, time.Duration(secs)*time.Second)
		})
	}
}

// runH2load runs h2load (h2c, 8 connections × 10 streams) for secs
// seconds.
func (r *run) runH2load(c *column, secs int) (H2loadResult, error) {
	out, err := r.client(c, time.Duration(secs+60)*time.Second, "h2load", "-c", "8", "-m", "10", "-D", strconv.Itoa(secs), c.url("/"))
	if err != nil {
		return H2loadResult{}, err
	}
	return ParseH2load(out)
}

func (r *run) h2load() {
	r.rounds("h2load", "h2", func(c *column, round int) error {
		var res H2loadResult
		u, err := c.during(func() (err error) {
			res, err = r.runH2load(c, int(flagDur.Seconds()))
			return err
		})
		if err != nil {
			return err
		}
		if res.Protocol != "h2c" {
			return fmt.Errorf("h2load negotiated %q, not h2c", res.Protocol)
		}
		if res.Failed+res.Non2xx > 0 {
			return fmt.Errorf("h2load: %d failed, %d not 2xx of %d", res.Failed, res.Non2xx, res.Done)
		}
		r.report.Add(gH2, "requests", "req/s", "higher", c.name, res.RPS)
		r.perOp(gH2, "proxy CPU per request", c, u, res.Succeeded)
		r.peak(gH2, c, round, u)
		return nil
	})
	r.flushPeaks(gH2)
	if *flagPprof {
		r.profile("h2load h2c, 8 connections × 10 streams", "h2load", func(c *column, secs int) {
			r.runH2load(c, secs)
		})
	}
}

// loopClient runs a benchtool loop client (dial, grpc, ws) with args and
// the column's proxies sampled.
func (r *run) loopClient(c *column, dur time.Duration, args ...string) (LoopResult, usage, error) {
	var res LoopResult
	u, err := c.during(func() error {
		out, err := r.client(c, dur+time.Minute, r.tools.benchtool, append(args, "-t", dur.String())...)
		if err != nil {
			return err
		}
		res, err = ParseLoop(out)
		return err
	})
	return res, u, err
}

// grpcLoop runs benchtool grpc with conc callers on one connection.
func (r *run) grpcLoop(c *column, dur time.Duration, conc int) (LoopResult, usage, error) {
	return r.loopClient(c, dur, "grpc", "-addr", c.target["grpc"], "-c", strconv.Itoa(conc))
}

// wsLoop runs benchtool ws: 16 WebSocket connections echoing in turn.
func (r *run) wsLoop(c *column, dur time.Duration) (LoopResult, usage, error) {
	return r.loopClient(c, dur, "ws", "-url", "ws://"+c.target["http"]+"/ws", "-c", "16")
}

func (r *run) grpc() {
	for _, conc := range []int{1, 16} {
		name := "sequential"
		if conc > 1 {
			name = fmt.Sprintf("%d concurrent callers, one client connection", conc)
		}
		r.rounds("grpc "+name, "grpc", func(c *column, round int) error {
			res, u, err := r.grpcLoop(c, *flagDur, conc)
			if err != nil {
				return err
			}
			r.report.Add(gGRPC, name, "calls/s", "higher", c.name, res.Rate)
			r.report.Add(gGRPC, name+" p50", "ms", "lower", c.name, res.P50Ms)
			r.perOp(gGRPC, name+" proxy CPU per call", c, u, res.Ops)
			r.peak(gGRPC, c, round, u)
			return nil
		})
	}
	r.flushPeaks(gGRPC)
	if *flagPprof {
		r.profile("gRPC unary calls, sequential", "grpc1", func(c *column, secs int) {
			r.grpcLoop(c, time.Duration(secs)*time.Second, 1)
		})
		r.profile("gRPC unary calls, 16 concurrent callers", "grpc16", func(c *column, secs int) {
			r.grpcLoop(c, time.Duration(secs)*time.Second, 16)
		})
	}
}

func (r *run) websocket() {
	r.rounds("websocket", "ws", func(c *column, round int) error {
		res, u, err := r.wsLoop(c, *flagDur)
		if err != nil {
			return err
		}
		r.report.Add(gWS, "echoed messages", "msg/s", "higher", c.name, res.Rate)
		r.report.Add(gWS, "round trip p50", "ms", "lower", c.name, res.P50Ms)
		r.perOp(gWS, "proxy CPU per message", c, u, res.Ops)
		r.peak(gWS, c, round, u)
		return nil
	})
	r.flushPeaks(gWS)
}

func (r *run) bulk() {
	for _, streams := range []int{1, 4} {
		r.rounds(fmt.Sprintf("iperf3 %d streams", streams), "bulk", func(c *column, round int) error {
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
		r.profile("iperf3, 1 stream", "iperf1", func(c *column, secs int) {
			host, port := splitHostPort(c.target["iperf"])
			r.client(c, time.Duration(secs+60)*time.Second, "iperf3", "-c", host, "-p", port, "-t", strconv.Itoa(secs), "-J")
		})
	}
}

func splitHostPort(hp string) (string, string) {
	i := strings.LastIndexByte(hp, ':')
	return hp[:i], hp[i+1:]
}

// connsDur is the duration of a connection-rate run (shorter: each leaves
// tens of thousands of TIME_WAIT sockets behind).
func connsDur() time.Duration { return min(*flagDur, 4*time.Second) }

func (r *run) newConns() {
	dur := connsDur()
	r.rounds("new HTTP connections", "conns-http", func(c *column, round int) error {
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
		r.perOp(gConns, "HTTP, no keep-alive proxy CPU per connection", c, u, res.Count)
		r.peak(gConns, c, round, u)
		return nil
	})
	r.rounds("new TCP connections", "conns", func(c *column, round int) error {
		res, u, err := r.loopClient(c, dur, "dial", "-addr", c.target["echo"], "-c", "16")
		if err != nil {
			return err
		}
		r.report.Add(gConns, rowDial, "conn/s", "higher", c.name, res.Rate)
		r.report.Add(gConns, "opaque TCP connect+echo+close p50", "ms", "lower", c.name, res.P50Ms)
		r.perOp(gConns, "opaque TCP proxy CPU per connection", c, u, res.Ops)
		r.peak(gConns, c, round, u)
		return nil
	})
	r.flushPeaks(gConns)
	if *flagPprof {
		r.profile("new opaque connections (benchtool dial)", "dial", func(c *column, secs int) {
			r.client(c, time.Duration(secs+60)*time.Second, r.tools.benchtool, "dial", "-addr", c.target["echo"],
				"-c", "16", "-t", fmt.Sprintf("%ds", secs))
		})
	}
}

const rowDial = "opaque TCP connect+echo+close (benchtool dial)"

func (r *run) redis() {
	const n = 50000
	r.rounds("redis-benchmark", "redis", func(c *column, round int) error {
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
		r.perOp(gRedis, "proxy CPU per request", c, u, 2*n)
		r.peak(gRedis, c, round, u)
		return nil
	})
	r.flushPeaks(gRedis)
}

// balance compares vmesh reached through the service's VIP with vmesh
// reached through the server host's address: the same agents, the same
// backend; the VIP path adds the balancer's pick per request (HTTP) or per
// connection (opaque TCP).
func (r *run) balance() {
	for _, c := range r.columns {
		if c.runs("balance") {
			r.warmup(c)
		}
	}
	r.rounds("balance HTTP", "balance", func(c *column, round int) error {
		var res FortioResult
		u, err := c.during(func() (err error) {
			res, err = r.fortioMax(c, 16, *flagDur)
			return err
		})
		if err != nil {
			return err
		}
		r.report.Add(gBalance, rowBalHTTP, "req/s", "higher", c.name, res.ActualQPS)
		r.perOp(gBalance, rowBalHTTPCPU, c, u, res.Count)
		return nil
	})
	r.rounds("balance TCP", "balance", func(c *column, round int) error {
		res, u, err := r.loopClient(c, connsDur(), "dial", "-addr", c.target["echo"], "-c", "16")
		if err != nil {
			return err
		}
		r.report.Add(gBalance, rowBalDial, "conn/s", "higher", c.name, res.Rate)
		r.perOp(gBalance, rowBalDialCPU, c, u, res.Ops)
		return nil
	})
}

const (
	rowBalHTTP    = "HTTP/1.1 keep-alive max rate, 16 connections (fortio)"
	rowBalHTTPCPU = "HTTP proxy CPU per request"
	rowBalDial    = "new opaque connections (benchtool dial)"
	rowBalDialCPU = "opaque proxy CPU per connection"
)

// idleRSS reads the proxies' RSS after a quiet second: per column, the
// server host's (for vmesh the CA host's whole agent) and the sum.
func (r *run) idleRSS() map[string][2]int64 {
	time.Sleep(time.Second)
	m := map[string][2]int64{}
	for _, c := range r.columns {
		if len(c.procs) == 0 || !c.runs("idle") {
			continue
		}
		var server int64
		for _, p := range c.procs {
			if p.host == c.server.Name {
				server = procRSS(p.pid)
			}
		}
		m[c.name] = [2]int64{server, c.rss()}
	}
	return m
}

const rowIdleServer = "RSS idle at start, server host (vmesh: the CA host's whole agent)"

func (r *run) addIdle(when string, m map[string][2]int64) {
	for _, c := range r.columns {
		if v, ok := m[c.name]; ok {
			r.report.Add(gMem, "RSS "+when+", server host (vmesh: the CA host's whole agent)", "MB", "lower", c.name, mb(v[0]))
			r.report.Add(gMem, "RSS "+when+", both hosts", "MB", "lower", c.name, mb(v[1]))
		}
	}
}

const rowPerConn = "per idle proxied connection (both hosts)"

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
		if len(c.procs) == 0 || !c.runs("memory") {
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
			r.report.Add(gMem, "RSS with the idle proxied connections open, both hosts", "MB", "lower", c.name, mb(after))
			r.report.Add(gMem, rowPerConn, "KB", "lower", c.name, float64(after-before)/1024/float64(res.Open))
			r.report.Add(gMem, "idle proxied connections held", "conns", "higher", c.name, float64(res.Open))
			r.report.Add(gMem, "time to open them", "s", "lower", c.name, res.Seconds)
			if *flagPprof {
				r.heapProfiles(c, fmt.Sprintf("holding %d idle connections", res.Open), "hold")
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

// setTargets attaches the issues' targets to their rows: issue 13's "Done
// when" (vmesh against HAProxy and direct) and issue 14's balancing row.
func (r *run) setTargets() {
	rep := r.report
	vm := []string{VMesh, VMeshProxy}
	vsHAProxy := func(kind TargetKind, v float64) Target { return Target{Kind: kind, Value: v, Ref: HAProxy, Cols: vm} }
	vsDirect := func(v float64) Target { return Target{Kind: RatioAtLeast, Value: v, Cols: vm} }
	for _, rate := range strings.Split(*flagRates, ",") {
		rate = strings.TrimSpace(rate)
		rep.SetTarget(gFixed, rate+" rps p50", vsHAProxy(AddedAtMost, 0.050))
		rep.SetTarget(gFixed, rate+" rps p99", vsHAProxy(AddedAtMost, 0))
		rep.SetTarget(gFixed, rate+" rps proxy CPU per request", vsHAProxy(RatioAtMost, 1))
		rep.SetTarget(gFixed, fmt.Sprintf("%s rps proxy CPU over %s, both hosts", rate, *flagFixedDur), vsHAProxy(RatioAtMost, 1))
	}
	for _, conns := range []string{"16", "64"} {
		rep.SetTarget(gMax, conns+" connections", vsHAProxy(RatioAtLeast, 1))
		rep.SetTarget(gMax, conns+" connections proxy CPU per request", vsHAProxy(RatioAtMost, 1))
	}
	rep.SetTarget(gH2, "requests", vsDirect(0.25))
	rep.SetTarget(gGRPC, "sequential", vsDirect(0.6))
	rep.SetTarget(gGRPC, "16 concurrent callers, one client connection", vsDirect(0.6))
	rep.SetTarget(gWS, "echoed messages", vsDirect(0.7))
	rep.SetTarget(gConns, rowDial, vsHAProxy(RatioAtLeast, 3))
	rep.SetTarget(gBulk, "1 stream", vsHAProxy(RatioAtLeast, 1))
	rep.SetTarget(gBulk, "4 streams", Target{Kind: RatioAtLeast, Value: 1, Ref: VMeshDedicated, Cols: []string{VMesh}})
	rep.SetTarget(gMem, rowIdleServer, Target{Kind: AtMost, Value: 20, Cols: vm})
	rep.SetTarget(gMem, rowPerConn, Target{Kind: AtMost, Value: 20, Cols: vm})
	for _, row := range []string{rowBalHTTP, rowBalHTTPCPU, rowBalDialCPU} {
		rep.SetTarget(gBalance, row, Target{Kind: RatioWithin, Value: 0.10, Ref: VMesh, Cols: []string{VMeshVIP}})
	}
}
