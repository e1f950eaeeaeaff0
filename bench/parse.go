package bench

import (
	"bufio"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
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

// ParseProcStat returns utime+stime, in clock ticks, from the content of
// /proc/<pid>/stat.
func ParseProcStat(stat string) (int64, error) {
	// The command name (field 2) is in parentheses and may hold spaces:
	// count fields after the last ')'.
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("parsing proc stat: no command name")
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("parsing proc stat: %d fields", len(f)+2)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("parsing proc stat: utime %q stime %q", f[11], f[12])
	}
	return ut + st, nil
}

// ParseVmRSS returns VmRSS in bytes from the content of /proc/<pid>/status.
func ParseVmRSS(status string) (int64, error) {
	sc := bufio.NewScanner(strings.NewReader(status))
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("parsing VmRSS line %q", line)
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parsing VmRSS line %q: %w", line, err)
			}
			return kb * 1024, nil
		}
	}
	return 0, fmt.Errorf("no VmRSS in status")
}
