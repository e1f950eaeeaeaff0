package bench

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

const gSys = "System calls, context switches and page faults of the proxies per operation (perf stat, both hosts, one run each)"

// syscalls counts the proxies' system calls, context switches and page
// faults per operation under the HTTP/1.1, h2c, gRPC and WebSocket loads: where the
// kernel part of the CPU rows comes from, and how many times a request
// wakes a proxy. One run each (counts, not timings, vary little), after
// the measured rounds, so that perf's tracepoint does not slow them.
func (r *run) syscalls() {
	if _, err := exec.LookPath("perf"); err != nil {
		r.report.NoteGroup(gSys, "not measured: perf is not installed (bench/deps.sh installs linux-perf)")
		return
	}
	loads := []struct {
		name, unit string
		run        func(c *column) (int64, error)
	}{
		{"HTTP/1.1 max rate, 16 connections", "per request", func(c *column) (int64, error) {
			res, err := r.fortioMax(c, 16, *flagDur)
			return res.Count, err
		}},
		{"h2load h2c, 8 connections × 10 streams", "per request", func(c *column) (int64, error) {
			res, err := r.runH2load(c, int(flagDur.Seconds()))
			return res.Succeeded, err
		}},
		{"gRPC sequential", "per call", func(c *column) (int64, error) {
			res, _, err := r.grpcLoop(c, *flagDur, 1)
			return res.Ops, err
		}},
		{"gRPC 16 concurrent callers", "per call", func(c *column) (int64, error) {
			res, _, err := r.grpcLoop(c, *flagDur, 16)
			return res.Ops, err
		}},
		{"WebSocket echo, 16 connections", "per message", func(c *column) (int64, error) {
			res, _, err := r.wsLoop(c, *flagDur)
			return res.Ops, err
		}},
	}
	for _, c := range r.columns {
		if len(c.procs) == 0 || !c.runs("syscalls") {
			continue
		}
		for _, l := range loads {
			counts, ops, err := r.perfStat(c, l.run)
			if err == nil && ops <= 0 {
				err = fmt.Errorf("no operations")
			}
			if err != nil {
				msg := fmt.Sprintf("system calls, %s, %s: %v", l.name, c.name, err)
				r.t.Log(msg)
				r.report.Notes = append(r.report.Notes, msg)
				continue
			}
			r.report.Add(gSys, l.name+": system calls "+l.unit, "", "lower", c.name, float64(counts["raw_syscalls:sys_enter"])/float64(ops))
			r.report.Add(gSys, l.name+": context switches "+l.unit, "", "lower", c.name, float64(counts["context-switches"])/float64(ops))
			r.report.Add(gSys, l.name+": page faults "+l.unit, "", "lower", c.name, float64(counts["page-faults"])/float64(ops))
		}
	}
}

// perfStat counts the column's proxies' system calls and context switches
// while load runs; load returns the operations it made.
func (r *run) perfStat(c *column, load func(*column) (int64, error)) (map[string]int64, int64, error) {
	var pids []string
	for _, p := range c.procs {
		pids = append(pids, strconv.Itoa(p.pid))
	}
	out := filepath.Join(r.t.TempDir(), "perf.csv")
	cmd := exec.Command("perf", "stat", "-x,", "-o", out, "-e", "raw_syscalls:sys_enter,context-switches,page-faults", "-p", strings.Join(pids, ","))
	if err := cmd.Start(); err != nil {
		return nil, 0, err
	}
	// perf attaches in a few milliseconds; the proxies are idle until the
	// load starts, so starting it early adds (almost) nothing.
	time.Sleep(300 * time.Millisecond)
	ops, lerr := load(c)
	cmd.Process.Signal(os.Interrupt)
	werr := cmd.Wait()
	if lerr != nil {
		return nil, 0, lerr
	}
	b, err := os.ReadFile(out)
	if err != nil {
		return nil, 0, fmt.Errorf("perf stat: %v (%v)", err, werr)
	}
	counts, err := ParsePerfStat(string(b))
	return counts, ops, err
}
