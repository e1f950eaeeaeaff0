package bench

import (
	"bufio"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
)

// FortioResult is what the harness keeps of one `fortio load -json -` run.
type FortioResult struct {
	// ActualQPS is the request rate fortio achieved.
	ActualQPS float64
	// Count is the number of requests timed; Errors those that failed
	// (a status other than 200, or a socket error).
	Count, Errors int64
	// Percentiles maps a percentile (50, 99.9) to a latency in seconds.
	Percentiles map[float64]float64
}

// ParseFortio reads fortio's JSON result.
func ParseFortio(r io.Reader) (FortioResult, error) {
	var raw struct {
		ActualQPS         float64
		DurationHistogram struct {
			Count       int64
			Percentiles []struct {
				Percentile float64
				Value      float64
			}
		}
		ErrorsDurationHistogram struct{ Count int64 }
		RetCodes                map[string]int64
	}
	if err := json.NewDecoder(r).Decode(&raw); err != nil {
		return FortioResult{}, fmt.Errorf("decoding fortio json: %w", err)
	}
	res := FortioResult{
		ActualQPS:   raw.ActualQPS,
		Count:       raw.DurationHistogram.Count,
		Errors:      raw.ErrorsDurationHistogram.Count,
		Percentiles: map[float64]float64{},
	}
	for code, n := range raw.RetCodes {
		if code != "200" && code != "-1" { // -1 is a socket error, already in Errors
			res.Errors += n
		}
	}
	for _, p := range raw.DurationHistogram.Percentiles {
		res.Percentiles[p.Percentile] = p.Value
	}
	if res.Count == 0 {
		return res, fmt.Errorf("fortio timed no request")
	}
	return res, nil
}

// WrkResult is what the harness keeps of one wrk run.
type WrkResult struct {
	Requests   int64
	Seconds    float64
	RPS        float64
	SocketErrs int64 // connect, read, write and timeout errors
	Non2xx     int64
}

var (
	wrkTotal  = regexp.MustCompile(`(\d+) requests in ([\d.]+)(us|ms|s|m)\b`)
	wrkRPS    = regexp.MustCompile(`Requests/sec:\s+([\d.]+)`)
	wrkSocket = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
	wrkNon2xx = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
)

// ParseWrk reads wrk's text report.
func ParseWrk(out string) (WrkResult, error) {
	var res WrkResult
	m := wrkTotal.FindStringSubmatch(out)
	if m == nil {
		return res, fmt.Errorf("wrk output has no request count: %q", out)
	}
	res.Requests, _ = strconv.ParseInt(m[1], 10, 64)
	res.Seconds, _ = strconv.ParseFloat(m[2], 64)
	switch m[3] {
	case "us":
		res.Seconds /= 1e6
	case "ms":
		res.Seconds /= 1e3
	case "m":
		res.Seconds *= 60
	}
	if m := wrkRPS.FindStringSubmatch(out); m != nil {
		res.RPS, _ = strconv.ParseFloat(m[1], 64)
	}
	if m := wrkSocket.FindStringSubmatch(out); m != nil {
		for _, s := range m[1:] {
			n, _ := strconv.ParseInt(s, 10, 64)
			res.SocketErrs += n
		}
	}
	if m := wrkNon2xx.FindStringSubmatch(out); m != nil {
		res.Non2xx, _ = strconv.ParseInt(m[1], 10, 64)
	}
	return res, nil
}

// IperfResult is what the harness keeps of one `iperf3 -J` client run.
type IperfResult struct {
	BitsPerSecond float64 // received by the server
	Bytes         int64   // received by the server
	Retransmits   int64
}

// ParseIperf reads iperf3's JSON result.
func ParseIperf(r io.Reader) (IperfResult, error) {
	var raw struct {
		End struct {
			SumSent struct {
				Retransmits int64 `json:"retransmits"`
			} `json:"sum_sent"`
			SumReceived struct {
				Bytes         int64   `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.NewDecoder(r).Decode(&raw); err != nil {
		return IperfResult{}, fmt.Errorf("decoding iperf3 json: %w", err)
	}
	if raw.Error != "" {
		return IperfResult{}, fmt.Errorf("iperf3: %s", raw.Error)
	}
	if raw.End.SumReceived.Bytes == 0 {
		return IperfResult{}, fmt.Errorf("iperf3 moved no bytes")
	}
	return IperfResult{
		BitsPerSecond: raw.End.SumReceived.BitsPerSecond,
		Bytes:         raw.End.SumReceived.Bytes,
		Retransmits:   raw.End.SumSent.Retransmits,
	}, nil
}

// RedisResult is one test line of `redis-benchmark --csv`.
type RedisResult struct {
	RPS, P50Ms, P99Ms float64
}

// ParseRedisBenchmark reads redis-benchmark's CSV output (redis 7 columns:
// test, rps, avg, min, p50, p95, p99, max) keyed by test name ("SET").
func ParseRedisBenchmark(out string) (map[string]RedisResult, error) {
	rd := csv.NewReader(strings.NewReader(out))
	rd.FieldsPerRecord = -1
	recs, err := rd.ReadAll()
	if err != nil {
		return nil, fmt.Errorf("reading redis-benchmark csv: %w", err)
	}
	res := map[string]RedisResult{}
	col := map[string]int{}
	for _, rec := range recs {
		if len(rec) > 0 && rec[0] == "test" {
			for i, name := range rec {
				col[name] = i
			}
			continue
		}
		if len(rec) < 2 {
			continue
		}
		get := func(name string) float64 {
			i, ok := col[name]
			if !ok || i >= len(rec) {
				return 0
			}
			v, _ := strconv.ParseFloat(rec[i], 64)
			return v
		}
		rps, err := strconv.ParseFloat(rec[1], 64)
		if err != nil {
			continue
		}
		res[rec[0]] = RedisResult{RPS: rps, P50Ms: get("p50_latency_ms"), P99Ms: get("p99_latency_ms")}
	}
	if len(res) == 0 {
		return nil, fmt.Errorf("redis-benchmark printed no result: %q", out)
	}
	return res, nil
}

// ParseProcStat returns utime and stime (user and kernel CPU), in clock
// ticks, from the content of /proc/<pid>/stat.
func ParseProcStat(stat string) (user, system int64, err error) {
	// The command name (field 2) is in parentheses and may hold spaces:
	// count fields after the last ')'.
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("parsing proc stat: no command name")
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("parsing proc stat: %d fields", len(f)+2)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("parsing proc stat: utime %q stime %q", f[11], f[12])
	}
	return ut, st, nil
}

// ParseVmRSS returns VmRSS in bytes from the content of /proc/<pid>/status.
func ParseVmRSS(status string) (int64, error) { return ParseStatusBytes(status, "VmRSS") }

// ParseStatusBytes returns the value of a "kB" line of /proc/<pid>/status
// (VmRSS, RssAnon, RssFile, …) in bytes.
func ParseStatusBytes(status, key string) (int64, error) {
	sc := bufio.NewScanner(strings.NewReader(status))
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, key+":"); ok {
			f := strings.Fields(rest)
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("parsing %s line %q", key, line)
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parsing %s line %q: %w", key, line, err)
			}
			return kb * 1024, nil
		}
	}
	return 0, fmt.Errorf("no %s in status", key)
}

// H2loadResult is what the harness keeps of one h2load run.
type H2loadResult struct {
	// Protocol is the application protocol h2load negotiated ("h2c").
	Protocol string
	RPS      float64
	// Done counts finished requests, Succeeded those answered 2xx/3xx;
	// Failed those that were not (errored and timed out included).
	Done, Succeeded, Failed int64
	Non2xx                  int64 // 3xx, 4xx and 5xx responses
}

var (
	h2Proto    = regexp.MustCompile(`(?m)^Application protocol: (\S+)`)
	h2Finished = regexp.MustCompile(`(?m)^finished in [\d.]+\w+, ([\d.]+) req/s`)
	h2Requests = regexp.MustCompile(`(?m)^requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed`)
	h2Status   = regexp.MustCompile(`(?m)^status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx`)
)

// ParseH2load reads h2load's text report (nghttp2 1.52). A run that
// negotiated no protocol (nothing connected) or finished no request is an
// error.
func ParseH2load(out string) (H2loadResult, error) {
	var res H2loadResult
	m := h2Requests.FindStringSubmatch(out)
	f := h2Finished.FindStringSubmatch(out)
	if m == nil || f == nil {
		return res, fmt.Errorf("h2load output has no result: %q", lastLine(out))
	}
	res.RPS, _ = strconv.ParseFloat(f[1], 64)
	res.Done, _ = strconv.ParseInt(m[1], 10, 64)
	res.Succeeded, _ = strconv.ParseInt(m[2], 10, 64)
	res.Failed, _ = strconv.ParseInt(m[3], 10, 64)
	if s := h2Status.FindStringSubmatch(out); s != nil {
		for _, v := range s[1:] {
			n, _ := strconv.ParseInt(v, 10, 64)
			res.Non2xx += n
		}
	}
	if p := h2Proto.FindStringSubmatch(out); p != nil {
		res.Protocol = p[1]
	}
	if res.Protocol == "" {
		return res, fmt.Errorf("h2load connected to nothing (%d requests failed)", res.Failed)
	}
	if res.Done == 0 {
		return res, fmt.Errorf("h2load finished no request")
	}
	return res, nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	return s[strings.LastIndexByte(s, '\n')+1:]
}

// LoopResult mirrors what benchtool's loop clients (dial, grpc, ws) print.
type LoopResult struct {
	Ops        int64   `json:"ops"`
	Errors     int64   `json:"errors"`
	Seconds    float64 `json:"seconds"`
	Rate       float64 `json:"rate"`
	P50Ms      float64 `json:"p50_ms"`
	P99Ms      float64 `json:"p99_ms"`
	FirstError string  `json:"first_error"`
}

// ParseLoop reads a benchtool loop client's JSON result; a run with errors
// or with no operation is an error (every operation must succeed).
func ParseLoop(out string) (LoopResult, error) {
	var res LoopResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		return res, fmt.Errorf("decoding benchtool result: %w", err)
	}
	if res.Errors > 0 {
		return res, fmt.Errorf("%d of %d operations failed, first: %s", res.Errors, res.Ops+res.Errors, res.FirstError)
	}
	if res.Ops == 0 {
		return res, fmt.Errorf("no operation completed")
	}
	return res, nil
}

// PprofFunc is one function of a CPU profile: its own share of the samples
// (flat) and its share including what it called (cum), in percent.
type PprofFunc struct {
	Name      string
	Flat, Cum float64
}

// PprofTop is a parsed `go tool pprof -top` report.
type PprofTop struct {
	// Total is the profile's total sample value as pprof prints it
	// ("1.30s").
	Total string
	Funcs []PprofFunc // in pprof's order (flat, descending)
}

var (
	pprofTotal = regexp.MustCompile(`Showing nodes accounting for \S+, [\d.]+% of (\S+) total`)
	pprofLine  = regexp.MustCompile(`^\s*[\d.]+\w*\s+([\d.]+)%\s+[\d.]+%\s+[\d.]+\w*\s+([\d.]+)%\s+(.+?)\s*$`)
)

// ParsePprofTop reads the text of `go tool pprof -top`.
func ParsePprofTop(out string) (PprofTop, error) {
	var top PprofTop
	if m := pprofTotal.FindStringSubmatch(out); m != nil {
		top.Total = m[1]
	}
	for _, line := range strings.Split(out, "\n") {
		m := pprofLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		flat, _ := strconv.ParseFloat(m[1], 64)
		cum, _ := strconv.ParseFloat(m[2], 64)
		name := strings.TrimSuffix(m[3], " (inline)")
		top.Funcs = append(top.Funcs, PprofFunc{Name: name, Flat: flat, Cum: cum})
	}
	if top.Total == "" || len(top.Funcs) == 0 {
		return top, fmt.Errorf("pprof -top output has no functions: %q", lastLine(out))
	}
	return top, nil
}

// Share is one row of a profile summary: a kind of work and its share of
// the CPU, in percent.
type Share struct {
	What    string  `json:"what"`
	Percent float64 `json:"percent"`
}

// profileKinds are the kinds of work a proxy's CPU profile is summarised
// by: each is the largest cumulative share among the functions named (the
// outermost frame of that kind of work, so nothing is counted twice within
// a kind), or the sum of the flat shares of the functions under a prefix.
// Kinds may overlap: allocation runs inside request handling.
var profileKinds = []struct {
	what     string
	funcs    []string
	prefixes []string
}{
	{"system calls (read, write, …)", []string{"syscall.Syscall", "syscall.Syscall6", "syscall.RawSyscall6", "internal/runtime/syscall/linux.Syscall6", "internal/runtime/syscall.Syscall6"}, nil},
	{"scheduler (runtime.schedule: finding work, parking, waking)", []string{"runtime.schedule"}, nil},
	{"garbage collection (background mark workers)", []string{"runtime.gcBgMarkWorker"}, nil},
	{"allocation (runtime.mallocgc)", []string{"runtime.mallocgc"}, nil},
	{"cryptography (flat, crypto/...)", nil, []string{"crypto/", "vendor/golang.org/x/crypto/", "golang.org/x/crypto/"}},
}

// Summarise returns the profile's kinds of work (see profileKinds) and its
// n functions with the most flat samples.
func (p PprofTop) Summarise(n int) (kinds []Share, top []PprofFunc) {
	cum := map[string]float64{}
	for _, f := range p.Funcs {
		cum[f.Name] = f.Cum
	}
	for _, k := range profileKinds {
		var v float64
		for _, name := range k.funcs {
			v = max(v, cum[name])
		}
		for _, f := range p.Funcs {
			for _, pre := range k.prefixes {
				if strings.HasPrefix(f.Name, pre) {
					v += f.Flat
					break
				}
			}
		}
		kinds = append(kinds, Share{What: k.what, Percent: v})
	}
	top = p.Funcs[:min(n, len(p.Funcs))]
	return kinds, top
}

// FindVIP looks for service's virtual IP in the JSON of `vmesh services -o
// json`, whatever its exact shape: an object naming the service (key
// "name" or "service", any case) with a key containing "vip" whose value is
// an address (or address:port, or a list of them; IPv4 first). It reports
// false when the tree's agent offers no VIPs.
func FindVIP(servicesJSON []byte, service string) (netip.Addr, bool) {
	var doc any
	if err := json.Unmarshal(servicesJSON, &doc); err != nil {
		return netip.Addr{}, false
	}
	var found []netip.Addr
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case []any:
			for _, e := range v {
				walk(e)
			}
		case map[string]any:
			named := false
			for k, x := range v {
				if s, ok := x.(string); ok && s == service && (strings.EqualFold(k, "name") || strings.EqualFold(k, "service")) {
					named = true
				}
			}
			if named {
				for k, x := range v {
					if strings.Contains(strings.ToLower(k), "vip") {
						found = append(found, addrsIn(x)...)
					}
				}
			}
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(doc)
	for _, a := range found {
		if a.Is4() {
			return a, true
		}
	}
	if len(found) > 0 {
		return found[0], true
	}
	return netip.Addr{}, false
}

func addrsIn(v any) []netip.Addr {
	switch v := v.(type) {
	case string:
		if a, err := netip.ParseAddr(v); err == nil {
			return []netip.Addr{a}
		}
		if ap, err := netip.ParseAddrPort(v); err == nil {
			return []netip.Addr{ap.Addr()}
		}
	case []any:
		var out []netip.Addr
		for _, e := range v {
			out = append(out, addrsIn(e)...)
		}
		return out
	}
	return nil
}

// ParsePerfStat reads `perf stat -x,` output: the count of each event by
// its name. An event perf could not count is an error.
func ParsePerfStat(s string) (map[string]int64, error) {
	counts := map[string]int64{}
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Split(line, ",")
		if len(f) < 3 {
			return nil, fmt.Errorf("perf stat: unexpected line %q", line)
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("perf stat: %s: not counted (%q)", f[2], f[0])
		}
		counts[f[2]] = n
	}
	if len(counts) == 0 {
		return nil, fmt.Errorf("perf stat: no counts in %q", s)
	}
	return counts, nil
}
