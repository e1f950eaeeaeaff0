package bench

import (
	"math"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/vmesh/vmesh/node"
)

// These tests run in `make test` (they need no root and no load tools):
// they pin the parsing of the load tools' outputs and the report's
// arithmetic, which every number in BENCHMARKS.md goes through.

func TestParseFortio(t *testing.T) {
	f, err := os.Open("testdata/fortio.json")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := ParseFortio(f)
	if err != nil {
		t.Fatal(err)
	}
	if got.Count != 200 || got.Errors != 0 || math.Abs(got.ActualQPS-196.8785) > 0.001 {
		t.Errorf("count %d errors %d qps %v, want 200, 0, 196.8785", got.Count, got.Errors, got.ActualQPS)
	}
	want := map[float64]float64{50: 0.00021000415577889447, 90: 0.00030805923115577894, 99: 0.00033012162311557786, 99.9: 0.0003323278623115578}
	if diff := cmp.Diff(want, got.Percentiles); diff != "" {
		t.Errorf("percentiles (-want +got):\n%s", diff)
	}
	bad := `{"ActualQPS": 10, "DurationHistogram": {"Count": 10}, "ErrorsDurationHistogram": {"Count": 2}, "RetCodes": {"200": 5, "503": 3, "-1": 2}}`
	got, err = ParseFortio(strings.NewReader(bad))
	if err != nil {
		t.Fatal(err)
	}
	if got.Errors != 5 {
		t.Errorf("errors = %d, want 5 (2 socket errors + 3 503s)", got.Errors)
	}
	if _, err := ParseFortio(strings.NewReader(`{"DurationHistogram": {"Count": 0}}`)); err == nil {
		t.Error("a run that timed no request parsed without error")
	}
}

func TestParseWrk(t *testing.T) {
	out := `Running 5s test @ http://198.18.0.4:8080/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   394.74us  529.91us   5.78ms   93.54%
    Req/Sec    20.80k     1.61k   24.23k    90.91%
  207950 requests in 5.10s, 33.10MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  40774.51
Transfer/sec:      6.49MB
`
	got, err := ParseWrk(out)
	if err != nil {
		t.Fatal(err)
	}
	want := WrkResult{Requests: 207950, Seconds: 5.10, RPS: 40774.51, SocketErrs: 6, Non2xx: 7}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	got, err = ParseWrk("  12 requests in 800.00ms, 1KB read\nRequests/sec: 15.00\n")
	if err != nil || got.Seconds != 0.8 {
		t.Errorf("ms duration: got %+v, %v; want 0.8 s", got, err)
	}
	if _, err := ParseWrk("unable to connect to 198.18.0.4:8080 Connection refused"); err == nil {
		t.Error("wrk failure parsed without error")
	}
}

func TestParseIperf(t *testing.T) {
	f, err := os.Open("testdata/iperf3.json")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := ParseIperf(f)
	if err != nil {
		t.Fatal(err)
	}
	if got.Bytes != 2762997760 || math.Abs(got.BitsPerSecond-22085342051.3) > 1 {
		t.Errorf("got %+v, want 2762997760 bytes at 22.085 Gbit/s", got)
	}
	if _, err := ParseIperf(strings.NewReader(`{"error": "unable to connect to server: Connection refused"}`)); err == nil ||
		!strings.Contains(err.Error(), "Connection refused") {
		t.Errorf("iperf3 error: got %v, want the iperf3 error", err)
	}
}

func TestParseH2load(t *testing.T) {
	out, err := os.ReadFile("testdata/h2load.txt")
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseH2load(string(out))
	if err != nil {
		t.Fatal(err)
	}
	want := H2loadResult{Protocol: "h2c", RPS: 26847.00, Done: 53694, Succeeded: 53694}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	// Nothing listening: no protocol negotiated, every request errored.
	refused, err := os.ReadFile("testdata/h2load-refused.txt")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ParseH2load(string(refused)); err == nil || got.Failed != 50 {
		t.Errorf("refused run: got %+v, %v; want an error and 50 failed", got, err)
	}
	bad := strings.Replace(string(out), "0 4xx, 0 5xx", "0 4xx, 12 5xx", 1)
	if got, err := ParseH2load(bad); err != nil || got.Non2xx != 12 {
		t.Errorf("5xx responses: got %+v, %v; want 12 not 2xx", got, err)
	}
	if _, err := ParseH2load("h2load: command not found"); err == nil {
		t.Error("garbage parsed without error")
	}
}

func TestParseLoop(t *testing.T) {
	got, err := ParseLoop(`{"ops":4602,"errors":0,"seconds":1.000093192,"rate":4601.57,"p50_ms":0.191,"p99_ms":0.701}`)
	if err != nil || got.Ops != 4602 || got.Rate != 4601.57 || got.P50Ms != 0.191 {
		t.Errorf("got %+v, %v", got, err)
	}
	if _, err := ParseLoop(`{"ops":10,"errors":2,"first_error":"connection reset by peer"}`); err == nil ||
		!strings.Contains(err.Error(), "connection reset by peer") {
		t.Errorf("errors: got %v, want the first error named", err)
	}
	if _, err := ParseLoop(`{"ops":0,"errors":0}`); err == nil {
		t.Error("a run with no operation parsed without error")
	}
}

func TestParsePprofTop(t *testing.T) {
	out, err := os.ReadFile("testdata/pprof-top.txt")
	if err != nil {
		t.Fatal(err)
	}
	top, err := ParsePprofTop(string(out))
	if err != nil {
		t.Fatal(err)
	}
	if top.Total != "610ms" {
		t.Errorf("total %q, want 610ms", top.Total)
	}
	first := PprofFunc{Name: "internal/runtime/syscall/linux.Syscall6", Flat: 70.49, Cum: 70.49}
	if diff := cmp.Diff(first, top.Funcs[0]); diff != "" {
		t.Errorf("first function (-want +got):\n%s", diff)
	}
	for _, f := range top.Funcs {
		if strings.HasSuffix(f.Name, "(inline)") {
			t.Errorf("%q keeps pprof's inline mark", f.Name)
		}
	}
	kinds, fns := top.Summarise(3)
	if len(fns) != 3 || fns[2].Name != "bufio.(*Writer).Flush" {
		t.Errorf("top 3: %+v", fns)
	}
	want := map[string]float64{
		"system calls (read, write, …)":                               70.49, // the innermost frame here has the largest cum
		"scheduler (runtime.schedule: finding work, parking, waking)": 11.48,
	}
	for _, k := range kinds {
		if w, ok := want[k.What]; ok && math.Abs(k.Percent-w) > 1e-9 {
			t.Errorf("%s: %.2f%%, want %.2f%%", k.What, k.Percent, w)
		}
	}
	if _, err := ParsePprofTop("failed to fetch profile"); err == nil {
		t.Error("garbage parsed without error")
	}
}

func TestFindVIP(t *testing.T) {
	for _, c := range []struct {
		doc, service string
		want         string // "" for none
	}{
		{`[{"name":"http","vip":"240.0.0.7","endpoints":[{"node":"h2","addr":"198.18.0.2:8080"}]}]`, "http", "240.0.0.7"},
		{`{"services":[{"Service":"echo","VIPs":["fd00::5","240.1.2.3"]},{"Service":"http","VIPs":["240.9.9.9"]}]}`, "echo", "240.1.2.3"},
		{`[{"name":"http","vip_addr":"240.0.0.7:8080"}]`, "http", "240.0.0.7"},
		{`[{"name":"http","port":8080,"endpoints":[{"node":"h2","addr":"198.18.0.2"}]}]`, "http", ""},
		{`[{"name":"echo","vip":"240.0.0.8"}]`, "http", ""},
		{`not json`, "http", ""},
	} {
		got, ok := FindVIP([]byte(c.doc), c.service)
		if (c.want == "") == ok || (ok && got.String() != c.want) {
			t.Errorf("FindVIP(%s, %s) = %v, %v; want %q", c.doc, c.service, got, ok, c.want)
		}
	}
}

func TestParseRedisBenchmark(t *testing.T) {
	out := `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"SET","69204.15","0.383","0.056","0.343","0.583","1.079","1.807"
"GET","68259.38","0.393","0.112","0.383","0.511","0.775","1.319"
`
	got, err := ParseRedisBenchmark(out)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]RedisResult{
		"SET": {RPS: 69204.15, P50Ms: 0.343, P99Ms: 1.079},
		"GET": {RPS: 68259.38, P50Ms: 0.383, P99Ms: 0.775},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if _, err := ParseRedisBenchmark("Could not connect to Redis at 198.18.0.2:6379: Connection refused\n"); err == nil {
		t.Error("redis-benchmark failure parsed without error")
	}
}

func TestParseProc(t *testing.T) {
	// A command name with spaces and parentheses must not shift fields.
	stat := "4242 (vm (a) b) S 1 4242 4242 0 -1 4194560 1000 0 0 0 1234 567 0 0 20 0 9 0 100 2000000 3000 18446744073709551615"
	user, system, err := ParseProcStat(stat)
	if err != nil || user != 1234 || system != 567 {
		t.Errorf("ParseProcStat = %d, %d, %v; want 1234, 567", user, system, err)
	}
	self, err := os.ReadFile("/proc/self/stat")
	if err == nil {
		if _, _, err := ParseProcStat(string(self)); err != nil {
			t.Errorf("own /proc/self/stat: %v", err)
		}
	}
	rss, err := ParseVmRSS("Name:\tvmesh\nVmPeak:\t  20000 kB\nVmRSS:\t   12345 kB\nThreads:\t9\n")
	if err != nil || rss != 12345*1024 {
		t.Errorf("ParseVmRSS = %d, %v; want %d", rss, err, 12345*1024)
	}
	if _, err := ParseVmRSS("Name:\tkthread\n"); err == nil {
		t.Error("status without VmRSS parsed without error")
	}
}

func TestReportTargetsAndMedians(t *testing.T) {
	rep := &Report{Columns: []string{Direct, HAProxy, VMesh}}
	for _, v := range []float64{0.30, 0.32, 0.90} {
		rep.Add("g", "p50", "ms", "lower", Direct, v)
	}
	for _, v := range []float64{0.50, 0.41, 0.39} {
		rep.Add("g", "p50", "ms", "lower", VMesh, v)
	}
	for _, v := range []float64{1.2, 1.1} {
		rep.Add("g", "p50", "ms", "lower", HAProxy, v)
	}
	rep.Add("g", "bulk", "Gbit/s", "higher", Direct, 10)
	rep.Add("g", "bulk", "Gbit/s", "higher", VMesh, 4.9)
	rep.Add("g", "rss", "MB", "lower", VMesh, 29)
	rep.SetTarget("g", "p50", Target{Kind: AddedAtMost, Value: 0.100})
	rep.SetTarget("g", "bulk", Target{Kind: RatioAtLeast, Value: 0.5})
	rep.SetTarget("g", "rss", Target{Kind: AtMost, Value: 30})
	// Against HAProxy: vmesh's p50 within +0.05 ms of HAProxy's, judged
	// for vmesh only.
	rep.Add("h", "p50", "ms", "lower", Direct, 0.3)
	rep.Add("h", "p50", "ms", "lower", HAProxy, 1.0)
	rep.Add("h", "p50", "ms", "lower", VMesh, 1.04)
	rep.SetTarget("h", "p50", Target{Kind: AddedAtMost, Value: 0.05, Ref: HAProxy, Cols: []string{VMesh}})
	rep.Add("h", "req/s", "req/s", "higher", HAProxy, 1000)
	rep.Add("h", "req/s", "req/s", "higher", VMesh, 900)
	rep.SetTarget("h", "req/s", Target{Kind: RatioAtLeast, Value: 1, Ref: HAProxy, Cols: []string{VMesh}})
	rep.Add("h", "cpu", "µs", "lower", HAProxy, 50)
	rep.Add("h", "cpu", "µs", "lower", VMesh, 50)
	rep.SetTarget("h", "cpu", Target{Kind: RatioAtMost, Value: 1, Ref: HAProxy, Cols: []string{VMesh}})
	rep.Add("h", "vip", "req/s", "higher", VMesh, 1000)
	rep.Add("h", "vip", "req/s", "higher", VMeshVIP, 890)
	rep.SetTarget("h", "vip", Target{Kind: RatioWithin, Value: 0.1, Ref: VMesh, Cols: []string{VMeshVIP}})
	rep.Columns = append(rep.Columns, VMeshVIP)
	rep.NoteGroup("n/a", "no such thing here")
	rep.Finish()
	p50 := rep.Row("g", "p50")
	if p50.Values[Direct] != 0.32 || p50.Values[VMesh] != 0.41 || math.Abs(p50.Values[HAProxy]-1.15) > 1e-9 {
		t.Errorf("medians %v, want direct 0.32, vmesh 0.41, haproxy 1.15", p50.Values)
	}
	if !p50.Target.Met[VMesh] || p50.Target.Met[HAProxy] {
		t.Errorf("p50 target verdicts %v, want vmesh met (+0.09), haproxy missed", p50.Target.Met)
	}
	if rep.Row("g", "bulk").Target.Met[VMesh] {
		t.Error("4.9 of 10 Gbit/s met a ≥50% target")
	}
	if !rep.Row("g", "rss").Target.Met[VMesh] {
		t.Error("29 MB missed a ≤30 MB target")
	}
	for _, c := range []struct {
		row      string
		met      bool
		judged   string
		unjudged string
	}{
		{"p50", true, VMesh, HAProxy},   // +0.04 over HAProxy
		{"req/s", false, VMesh, Direct}, // 0.9× HAProxy
		{"cpu", true, VMesh, HAProxy},   // 1.0× HAProxy
		{"vip", false, VMeshVIP, VMesh}, // 11 % off
	} {
		tg := rep.Row("h", c.row).Target
		if met, ok := tg.Met[c.judged]; !ok || met != c.met {
			t.Errorf("row %s: %s met = %v (judged %v), want %v", c.row, c.judged, met, ok, c.met)
		}
		if _, ok := tg.Met[c.unjudged]; ok {
			t.Errorf("row %s: %s judged, want only %s", c.row, c.unjudged, c.judged)
		}
	}
	md := rep.Markdown()
	for _, want := range []string{
		"| measure | unit | direct | haproxy | vmesh | haproxy ÷ direct | vmesh ÷ direct | vmesh ÷ haproxy | target |",
		"| p50 | ms | 0.320 | 1.150 | 0.410 | ×3.59 (+0.830) | ×1.28 (+0.090) | ×0.36 (-0.740) | +≤0.100: haproxy +0.830 MISSED, vmesh +0.090 met |",
		"| bulk | Gbit/s | 10.00 | – | 4.900 |  | ×0.49 |  | ≥0.50× direct: vmesh ×0.49 MISSED |",
		"| p50 | ms | 0.300 | 1.000 | 1.040 | – | ×3.33 (+0.700) | ×3.47 (+0.740) | ×1.04 (+0.040) | ≤ haproxy +0.050: vmesh +0.040 met |",
		"| vip | req/s | – | – | 1,000 | 890.0 |  |  |  | within 10% of vmesh: vmesh-vip ×0.89 MISSED |",
		"**n/a**\n\n- no such thing here\n",
		"| g: p50 | ms | 0.320 | 1.150 | vmesh | 0.410 | direct 0.320 | +0.090 | +≤0.100 | met |",
		"| h: req/s | req/s | – | 1,000 | vmesh | 900.0 | haproxy 1,000 | ×0.90 | ≥1.00× haproxy | **MISSED** |",
		"| h: vip | req/s | – | – | vmesh-vip | 890.0 | vmesh 1,000 | ×0.89 | within 10% of vmesh | **MISSED** |",
		"| g: rss | MB | – | – | vmesh | 29.00 | – |  | ≤30.00 | met |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	doc := "# B\n\nintro\n" + BeginMarker + "\nold\n" + EndMarker + "\ntail\n"
	upd, err := UpdateMarkdown(doc, "new\n")
	if err != nil || upd != "# B\n\nintro\n"+BeginMarker+"\nnew\n"+EndMarker+"\ntail\n" {
		t.Errorf("UpdateMarkdown = %q, %v", upd, err)
	}
	if _, err := UpdateMarkdown("no markers", "x"); err == nil {
		t.Error("UpdateMarkdown without markers succeeded")
	}
}

// TestHAProxyConfigs checks the generated configurations with haproxy -c
// when HAProxy is installed: mTLS both ways, one frontend per service.
func TestHAProxyConfigs(t *testing.T) {
	dir := t.TempDir()
	certs, err := WritePeerCerts(dir)
	if err != nil {
		t.Fatal(err)
	}
	client, server := HAProxyConfigs(netip.MustParseAddr("198.18.0.4"), certs, 1000)
	for _, want := range []string{"bind 127.0.0.1:18080", "server s1 198.18.0.4:28080 ssl crt " + certs.Client + " ca-file " + certs.CA + " verify required verifyhost server.bench"} {
		if !strings.Contains(client, want) {
			t.Errorf("client config lacks %q:\n%s", want, client)
		}
	}
	for _, want := range []string{"bind 198.18.0.4:26379 ssl crt " + certs.Server + " ca-file " + certs.CA + " verify required", "server s1 127.0.0.1:6379"} {
		if !strings.Contains(server, want) {
			t.Errorf("server config lacks %q:\n%s", want, server)
		}
	}
	if _, err := exec.LookPath("haproxy"); err != nil {
		t.Log("haproxy not installed: configuration not checked by haproxy -c")
		return
	}
	for name, cfg := range map[string]string{"client": client, "server": server} {
		p := filepath.Join(dir, name+".cfg")
		os.WriteFile(p, []byte(cfg), 0o644)
		if out, err := exec.Command("haproxy", "-c", "-f", p).CombinedOutput(); err != nil {
			t.Errorf("haproxy -c %s: %v: %s", name, err, out)
		}
	}
}

// TestAgentConfigTOML checks the bench agents' configurations against the
// agent's own loader, so a renamed key breaks make test, not make bench.
func TestAgentConfigTOML(t *testing.T) {
	client := AgentConfig{Name: "h1", Addr: netip.MustParseAddr("198.18.0.1"), DataDir: "/d1", Socket: "/d1/s.sock",
		Join: []netip.Addr{netip.MustParseAddr("198.18.0.2")}, Token: "tok"}
	server := AgentConfig{Name: "h2", Addr: netip.MustParseAddr("198.18.0.2"), DataDir: "/d2", Socket: "/d2/s.sock",
		CAServer: true, CADir: "/d2/ca", Services: Services}
	got := client.TOML()
	for _, want := range []string{"name = \"h1\"", "join = [\"198.18.0.2\"]", "role = \"client\"\ntoken = \"tok\""} {
		if !strings.Contains(got, want) {
			t.Errorf("client config lacks %q:\n%s", want, got)
		}
	}
	if want := "[[service]]\nname = \"iperf\"\nport = 5201\nprotocol = \"opaque\""; !strings.Contains(server.TOML(), want) {
		t.Errorf("server config lacks %q:\n%s", want, server.TOML())
	}
	if strings.Contains(server.TOML(), "multiplex_opaque") {
		t.Errorf("server config sets multiplex_opaque without being asked:\n%s", server.TOML())
	}
	off := false
	dedicated := server
	dedicated.MultiplexOpaque = &off
	if want := "[proxy]\nmultiplex_opaque = false\n"; !strings.Contains(dedicated.TOML(), want) {
		t.Errorf("dedicated config lacks %q:\n%s", want, dedicated.TOML())
	}
	for _, a := range []AgentConfig{client, server, dedicated} {
		if _, err := node.ParseConfig([]byte(a.TOML())); err != nil {
			t.Errorf("the agent rejects %s's configuration: %v\n%s", a.Name, err, a.TOML())
		}
	}
}

func TestParsePerfStat(t *testing.T) {
	out := "# started on Fri Dec  4 23:59:01 2026\n\n109452,,raw_syscalls:sys_enter,645603,100.00,,\n1771,,context-switches,645603,100.00,,\n"
	got, err := ParsePerfStat(out)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(map[string]int64{"raw_syscalls:sys_enter": 109452, "context-switches": 1771}, got); diff != "" {
		t.Errorf("counts (-want +got):\n%s", diff)
	}
	for _, bad := range []string{"", "<not counted>,,context-switches,0,0.00,,\n", "garbage\n"} {
		if _, err := ParsePerfStat(bad); err == nil {
			t.Errorf("ParsePerfStat(%q): no error", bad)
		}
	}
}
