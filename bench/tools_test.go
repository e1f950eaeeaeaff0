package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmesh/vmesh/internal/testbed"
)

// FortioVersion is the fortio the harness installs from the Go module proxy
// when none is on PATH (later versions need a module the proxy does not
// serve here).
const FortioVersion = "v1.66.5"

// tools are the binaries the harness runs, in a directory every user can
// read (load clients run as nobody).
type tools struct {
	dir       string // world-readable work directory
	fortio    string
	benchtool string
	vmesh     string
	meshproxy string
	versions  string
}

// prepareTools checks the load tools and builds the harness's own binaries
// (meshproxy only when its column runs).
func prepareTools(t *testing.T, meshproxy bool) *tools {
	t.Helper()
	for _, bin := range []string{"h2load", "iperf3", "redis-benchmark", "redis-server", "haproxy", "setpriv", "prlimit"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("bench needs %s: apt-get install nghttp2-client iperf3 redis-tools redis-server haproxy util-linux (or run make bench, which does)", bin)
		}
	}
	dir, err := os.MkdirTemp("", "vmesh-bench-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	tl := &tools{dir: dir}
	bin := filepath.Join(dir, "bin")
	os.MkdirAll(bin, 0o755)

	// fortio: PATH, else a cached `go install` of a pinned version.
	src, err := exec.LookPath("fortio")
	if err != nil {
		cache, err := os.UserCacheDir()
		if err != nil {
			cache = os.TempDir()
		}
		gobin := filepath.Join(cache, "vmesh-bench", "fortio-"+FortioVersion)
		src = filepath.Join(gobin, "fortio")
		if _, err := os.Stat(src); err != nil {
			t.Logf("installing fortio %s into %s", FortioVersion, gobin)
			cmd := exec.Command("go", "install", "fortio.org/fortio@"+FortioVersion)
			cmd.Env = append(os.Environ(), "GOBIN="+gobin, "GOFLAGS=-buildvcs=false")
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("installing fortio: %v: %s", err, out)
			}
		}
	}
	tl.fortio = filepath.Join(bin, "fortio")
	copyFile(t, src, tl.fortio)

	tl.benchtool = filepath.Join(bin, "benchtool")
	gobuild(t, tl.benchtool, "./benchtool", false)
	tl.vmesh = filepath.Join(bin, "vmesh")
	gobuild(t, tl.vmesh, "../cmd/vmesh", true)
	if meshproxy {
		tl.meshproxy = filepath.Join(bin, "meshproxy")
		gobuild(t, tl.meshproxy, "./meshproxy", true)
	}

	var vs []string
	ver := func(name string, args ...string) {
		out, _ := exec.Command(name, args...).CombinedOutput()
		line := strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
		vs = append(vs, line)
	}
	ver(tl.fortio, "version")
	ver("h2load", "--version")
	ver("iperf3", "-v")
	ver("redis-benchmark", "--version")
	ver("haproxy", "-v")
	tl.versions = "fortio " + strings.Join(vs, "; ")
	return tl
}

// gobuild builds pkg into out. shipped builds it as `make build` builds
// the agent (CGO_ENABLED=0 and the Makefile's -ldflags "-s -w"), so the
// harness measures the binary that ships: a default build links libc
// through cgo (libc and ld.so then add 1.4 MB to an idle agent's RSS) and
// carries symbols and DWARF.
func gobuild(t *testing.T, out, pkg string, shipped bool) {
	t.Helper()
	args := []string{"build", "-tags", "nobadger,nomysql,nopgx", "-trimpath"}
	if shipped {
		args = append(args, "-ldflags", "-s -w")
	}
	cmd := exec.Command("go", append(args, "-o", out, pkg)...)
	if shipped {
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	}
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building %s: %v: %s", pkg, err, b)
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// nofileLimit is the hard limit of open files this process may give its
// children (raising it needs CAP_SYS_RESOURCE, which containers often lack).
func nofileLimit() uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 1024
	}
	return rl.Max
}

// nofileArg is prlimit's option raising the soft limit of open files to
// the hard one.
func nofileArg() string {
	n := nofileLimit()
	return fmt.Sprintf("--nofile=%d:%d", n, n)
}

// startBackends starts the benchmark backends on a server host and waits
// until each listens.
func startBackends(t *testing.T, tl *tools, h *testbed.Host) {
	t.Helper()
	raise := []string{nofileArg(), "--"}
	h.Start(t, "prlimit", append(raise, tl.benchtool, "http", "-addr", ":8080")...)
	h.Start(t, "prlimit", append(raise, tl.benchtool, "grpc-server", "-addr", ":9003")...)
	h.Start(t, "prlimit", append(raise, tl.benchtool, "echo", "-addr", ":9001")...)
	h.Start(t, "prlimit", append(raise, tl.benchtool, "hold-server", "-addr", ":9002")...)
	h.Start(t, "iperf3", "-s", "-p", "5201")
	h.Start(t, "prlimit", append(raise, "redis-server", "--port", "6379", "--bind", "0.0.0.0",
		"--protected-mode", "no", "--save", "", "--appendonly", "no", "--maxclients", "10000")...)
	for _, s := range Services {
		waitListening(t, h, s.Port)
	}
}

// waitListening polls the host's listening sockets until port is there.
func waitListening(t *testing.T, h *testbed.Host, port uint16) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, _ := h.Try("ss", "-Htln", "sport = :"+strconv.Itoa(int(port)))
		if strings.TrimSpace(out) != "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: nothing listens on port %d", h.Name, port)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// setupHAProxy starts HAProxy on both hosts with mTLS between them.
func setupHAProxy(t *testing.T, tl *tools, client, server *testbed.Host) (*column, error) {
	dir := filepath.Join(tl.dir, "haproxy")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	certs, err := WritePeerCerts(dir)
	if err != nil {
		return nil, err
	}
	// Each proxied connection takes two descriptors in each HAProxy.
	ccfg, scfg := HAProxyConfigs(server.Addr, certs, int(nofileLimit()-200)/2)
	cpath, spath := filepath.Join(dir, "client.cfg"), filepath.Join(dir, "server.cfg")
	if err := os.WriteFile(cpath, []byte(ccfg), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(spath, []byte(scfg), 0o644); err != nil {
		return nil, err
	}
	for _, p := range []string{cpath, spath} {
		if out, err := exec.Command("haproxy", "-c", "-f", p).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("haproxy rejects %s: %v: %s", p, err, out)
		}
	}
	sp := server.Start(t, "prlimit", nofileArg(), "--", "haproxy", "-db", "-f", spath)
	cp := client.Start(t, "prlimit", nofileArg(), "--", "haproxy", "-db", "-f", cpath)
	c := &column{name: HAProxy, client: client, server: server, target: map[string]string{},
		procs: []proc{{host: client.Name, pid: cp.Process.Pid}, {host: server.Name, pid: sp.Process.Pid}}}
	for _, s := range Services {
		c.target[s.Name] = fmt.Sprintf("127.0.0.1:%d", HAProxyLocalOffset+int(s.Port))
		waitListening(t, client, HAProxyLocalOffset+s.Port)
		waitListening(t, server, HAProxyTLSOffset+s.Port)
	}
	return c, nil
}

// profile takes CPU profiles of the vmesh proxies while load(c, seconds)
// runs, summarises them in the report (where the time goes) and logs their
// top functions; the profiles are saved next to the JSON results as
// <date>-<column>-<host>-<label>.cpu.pprof.
func (r *run) profile(load, label string, run func(c *column, secs int)) {
	for _, c := range r.columns {
		if len(c.controls) == 0 {
			continue
		}
		secs := max(2, int(flagDur.Seconds()))
		type got struct {
			host string
			data []byte
			err  error
		}
		ch := make(chan got, len(c.controls))
		for host, sock := range c.controls {
			go func() {
				b, err := fetchUnix(sock, fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs), time.Duration(secs+30)*time.Second)
				ch <- got{host, b, err}
			}()
		}
		// What -bench.trace and -bench.allocs ask for, taken over the
		// same seconds: a runtime trace, the allocations (a delta profile).
		type extra struct{ path, ext string }
		var extras []extra
		if slices.Contains(strings.Split(*flagTrace, ","), label) {
			extras = append(extras, extra{"/debug/pprof/trace", "trace"})
		}
		if slices.Contains(strings.Split(*flagAllocs, ","), label) {
			extras = append(extras, extra{"/debug/pprof/allocs", "allocs.pprof"})
		}
		more := make(chan got, len(c.controls)*len(extras))
		for _, x := range extras {
			for host, sock := range c.controls {
				go func() {
					b, err := fetchUnix(sock, fmt.Sprintf("%s?seconds=%d", x.path, secs), time.Duration(secs+30)*time.Second)
					more <- got{host + "-" + x.ext, b, err}
				}()
			}
		}
		time.Sleep(200 * time.Millisecond)
		run(c, secs)
		for range cap(more) {
			g := <-more
			host, ext, _ := strings.Cut(g.host, "-")
			path := filepath.Join(r.outDir(), fmt.Sprintf("%s-%s-%s-%s.%s", r.stamp(), c.name, host, label, ext))
			if g.err == nil {
				g.err = os.WriteFile(path, g.data, 0o644)
			}
			if g.err != nil {
				r.t.Logf("%s %s %s: %v", ext, c.name, host, g.err)
				continue
			}
			r.t.Logf("%s of the %s proxy on %s under %s: %s", ext, c.name, host, load, path)
		}
		for range c.controls {
			g := <-ch
			if g.err != nil {
				msg := fmt.Sprintf("pprof %s %s: %v", c.name, g.host, g.err)
				r.t.Log(msg)
				r.report.Notes = append(r.report.Notes, msg)
				continue
			}
			path := filepath.Join(r.outDir(), fmt.Sprintf("%s-%s-%s-%s.cpu.pprof", r.stamp(), c.name, g.host, label))
			if err := os.WriteFile(path, g.data, 0o644); err != nil {
				r.t.Log(err)
				continue
			}
			out, err := exec.Command("go", "tool", "pprof", "-top", "-nodecount=0", path).CombinedOutput()
			if err != nil {
				r.t.Logf("pprof -top %s: %v: %s", path, err, out)
				continue
			}
			top, err := ParsePprofTop(string(out))
			if err != nil {
				r.t.Logf("%s: %v", path, err)
				continue
			}
			kinds, funcs := top.Summarise(8)
			side := "client"
			if g.host == c.server.Name {
				side = "server"
			}
			r.report.Profiles = append(r.report.Profiles, ProfileSummary{Column: c.name, Host: g.host, Side: side,
				Load: load, Total: top.Total, Kinds: kinds, Top: funcs, File: filepath.Base(path)})
			r.t.Logf("CPU profile of the %s proxy on %s under %s (%s):\n%s", c.name, g.host, load, path, firstLines(string(out), 40))
		}
	}
}

// outDir is where profiles go: -bench.out, else the tools' directory.
func (r *run) outDir() string {
	dir := *flagOut
	if dir == "" {
		dir = r.tools.dir
	}
	os.MkdirAll(dir, 0o755)
	return dir
}

// stamp is the run's date as file names carry it.
func (r *run) stamp() string {
	return strings.NewReplacer(":", "", "-", "").Replace(r.report.Date)
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	return strings.Join(lines[:min(n, len(lines))], "\n")
}

// heapProfiles saves the heap profiles of a column's proxies (while they
// do what says, e.g. "holding 10000 idle connections"; tag names the
// file), and logs their goroutine counts and top allocation sites: where
// the memory goes.
func (r *run) heapProfiles(c *column, what, tag string) {
	for host, sock := range c.controls {
		g, err := fetchUnix(sock, "/debug/pprof/goroutine?debug=1", 30*time.Second)
		if err == nil {
			first := strings.SplitN(string(g), "\n", 2)[0]
			msg := fmt.Sprintf("memory, %s on %s %s: %s", c.name, host, what, first)
			r.t.Log(msg)
			r.report.Notes = append(r.report.Notes, msg)
		}
		if st, err := fetchUnix(sock, "/debug/pprof/heap?debug=1&gc=1", 30*time.Second); err == nil {
			var parts []string
			for _, l := range strings.Split(string(st), "\n") {
				for _, k := range []string{"# HeapInuse = ", "# Stack = "} {
					if v, ok := strings.CutPrefix(l, k); ok {
						n, _ := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
						parts = append(parts, fmt.Sprintf("%s %.1f MB", strings.TrimSuffix(k[2:], " = "), float64(n)/(1<<20)))
					}
				}
			}
			msg := fmt.Sprintf("memory, %s on %s %s: %s", c.name, host, what, strings.Join(parts, ", "))
			r.t.Log(msg)
			r.report.Notes = append(r.report.Notes, msg)
		}
		b, err := fetchUnix(sock, "/debug/pprof/heap", 30*time.Second)
		if err != nil {
			r.t.Logf("heap profile %s %s: %v", c.name, host, err)
			continue
		}
		path := filepath.Join(r.outDir(), fmt.Sprintf("%s-%s-%s-%s.heap.pprof", r.stamp(), c.name, host, tag))
		if err := os.WriteFile(path, b, 0o644); err != nil {
			r.t.Log(err)
			continue
		}
		top, err := exec.Command("go", "tool", "pprof", "-top", "-sample_index=inuse_space", "-nodecount=20", path).CombinedOutput()
		if err != nil {
			r.t.Logf("pprof -top %s: %v: %s", path, err, top)
			continue
		}
		r.t.Logf("heap of the %s proxy on %s %s (%s):\n%s", c.name, host, what, path, top)
	}
}

// fetchUnix GETs path from an HTTP server on a unix socket.
func fetchUnix(sock, path string, timeout time.Duration) ([]byte, error) {
	cl := &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	resp, err := cl.Get("http://control" + path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", path, resp.Status, b)
	}
	return b, nil
}
