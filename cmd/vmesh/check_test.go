package main

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/vmesh/vmesh/ca"
	"github.com/vmesh/vmesh/discovery"
	"github.com/vmesh/vmesh/node"
)

// fakeAgent serves /v1/status and /v1/config as a running agent would.
func fakeAgent(t *testing.T, st node.Status, cfg node.Config) string {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/status":
			json.NewEncoder(w).Encode(st)
		case "/v1/config":
			json.NewEncoder(w).Encode(cfg)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

func writeTestConfig(t *testing.T, text string) string {
	p := filepath.Join(t.TempDir(), "vmesh.toml")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func find(results []checkResult, name string) *checkResult {
	for i := range results {
		if strings.HasPrefix(results[i].Name, name) {
			return &results[i]
		}
	}
	return nil
}

// testEnv is a host where every service answers, no rules are left over
// and the clocks agree.
func testEnv(path, admin string, now time.Time) checkEnv {
	return checkEnv{
		ConfigPath: path, Admin: admin, Now: now,
		Leftovers: func(context.Context, node.Config) (string, error) { return "", nil },
		Dial:      func(context.Context, node.Config, netip.AddrPort) error { return nil },
		Listeners: func(uint16) []netip.AddrPort { return nil },
		Skew:      func(context.Context, string) (time.Duration, error) { return 0, nil },
		Resolver:  func() netip.AddrPort { return netip.MustParseAddrPort("198.18.0.53:53") },
		Query:     vmeshAnswers,
	}
}

// vmeshAnswers answers as vmesh's DNS server does for the apex of "vmesh".
func vmeshAnswers(_ context.Context, _ netip.AddrPort, name string, qtype uint16) (*dns.Msg, error) {
	m := new(dns.Msg).SetQuestion(dns.Fqdn(name), qtype)
	r := new(dns.Msg).SetReply(m)
	r.Ns = append(r.Ns, &dns.SOA{Hdr: dns.RR_Header{Name: "vmesh.", Rrtype: dns.TypeSOA, Class: dns.ClassINET}, Ns: "ns.vmesh.", Mbox: "hostmaster.vmesh."})
	return r, nil
}

const testConfig = `[gossip]
join = ["198.18.0.1"]
key_file = "/etc/vmesh/gossip.key"
[[service]]
name = "web"
port = 8080
`

func healthyStatus(now time.Time, path string) node.Status {
	return node.Status{
		Node: "web", Identity: "spiffe://td/node/web", Ready: true, UID: 999, ConfigPath: path,
		Identities: []ca.IdentityStatus{
			{ID: "spiffe://td/node/web", NotBefore: now.Add(-time.Hour), NotAfter: now.Add(23 * time.Hour)},
			{ID: "spiffe://td/svc/web", Service: "web", NotBefore: now.Add(-time.Hour), NotAfter: now.Add(23 * time.Hour)},
		},
		Members:  []discovery.Member{{Name: "web", State: "alive"}, {Name: "ca", State: "alive"}},
		Outbound: "127.0.0.1:4140", Inbound: "[::]:4143",
		Rules:       node.RulesStatus{Enabled: true, Installed: true, Backend: "nft"},
		GossipKeyed: true,
		Services:    []node.ServiceStatus{{Name: "web", Port: 8080, Target: "127.0.0.1:8080", Health: "passing", Certificate: "granted"}},
	}
}

func TestCheckNamesProblems(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	path := writeTestConfig(t, testConfig)
	cfg, err := node.LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	healthy := healthyStatus(now, path)
	results := runChecks(t.Context(), testEnv("", fakeAgent(t, healthy, cfg), now))
	for _, r := range results {
		if r.Status != "ok" {
			t.Errorf("healthy host: %s is %s: %s", r.Name, r.Status, r.Detail)
		}
	}
	if r := find(results, "iptables"); r == nil || r.Detail != "rules installed and current (nft backend)" {
		t.Errorf("iptables on a healthy host: %+v", r)
	}
	if find(results, "service web") == nil {
		t.Errorf("no check of the declared service: %+v", results)
	}

	broken := healthy
	broken.Identities = []ca.IdentityStatus{{ID: "spiffe://td/node/web", NotBefore: now.Add(-25 * time.Hour), NotAfter: now.Add(-time.Hour)}}
	broken.Rules.Drift = "missing: -A VMESH_OUTPUT ..."
	broken.Members = []discovery.Member{{Name: "web", State: "alive"}, {Name: "ca", State: "dead"}}
	broken.CAURL = "https://127.0.0.1:1" // nothing listens on port 1
	results = runChecks(t.Context(), testEnv("", fakeAgent(t, broken, cfg), now))
	for name, want := range map[string]string{
		"certificate spiffe://td/node/web": "expired",
		"iptables":                         "missing or not current (nft backend)",
		"gossip":                           "alone",
		"ca":                               "cannot reach the CA",
	} {
		r := find(results, name)
		if r == nil || r.Status != "fail" || !strings.Contains(r.Detail, want) || r.Fix == "" {
			t.Errorf("%s: got %+v, want a failure saying %q with a fix", name, r, want)
		}
	}
}

// Issue 15: while the agent waits for its certificates, check must not say
// the rules are installed.
func TestCheckRulesPending(t *testing.T) {
	now := time.Now()
	path := writeTestConfig(t, testConfig)
	cfg, _ := node.LoadConfig(path)
	st := healthyStatus(now, path)
	st.Ready, st.NotReady = false, "waiting for certificates from the CA"
	st.Rules = node.RulesStatus{Enabled: true, Pending: "not installed yet: waiting for certificates from the CA"}
	results := runChecks(t.Context(), testEnv("", fakeAgent(t, st, cfg), now))
	r := find(results, "iptables")
	if r == nil || r.Status != "fail" || strings.Contains(r.Detail, "installed and current") || !strings.Contains(r.Detail, "waiting for certificates") {
		t.Errorf("iptables while waiting for certificates: %+v", r)
	}
}

// Issue 15: a declared service that is broken makes check fail: the app
// bound to the host's address instead of loopback, a failing health check,
// a certificate the CA refused; a gossip key mismatch is named as such.
func TestCheckServicesAndGossipKeys(t *testing.T) {
	now := time.Now()
	path := writeTestConfig(t, testConfig+"[[service]]\nname = \"api\"\nport = 9000\n")
	cfg, err := node.LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	st := healthyStatus(now, path)
	st.Services = []node.ServiceStatus{
		{Name: "web", Port: 8080, Target: "127.0.0.1:8080", Health: "failing", Certificate: "granted"},
		{Name: "api", Port: 9000, Target: "127.0.0.1:9000", Health: "passing", Certificate: "missing",
			CertError: "ca refused (403): service api is not granted to node web"},
	}
	st.Gossip = discovery.Diagnostics{DecryptFailures: 7, LastDecryptFailure: now.Add(-time.Minute), LastDecryptFrom: "198.18.0.3:7946"}
	env := testEnv("", fakeAgent(t, st, cfg), now)
	env.Dial = func(_ context.Context, _ node.Config, a netip.AddrPort) error {
		if a.Port() == 8080 {
			return syscall.ECONNREFUSED
		}
		return nil
	}
	env.Listeners = func(port uint16) []netip.AddrPort {
		if port == 8080 {
			return []netip.AddrPort{netip.MustParseAddrPort("198.18.0.2:8080")}
		}
		return nil
	}
	results := runChecks(t.Context(), env)
	web := find(results, "service web")
	if web == nil || web.Status != "fail" || !strings.Contains(web.Detail, "nothing answers at 127.0.0.1:8080") ||
		!strings.Contains(web.Detail, "the app listens on 198.18.0.2:8080") || !strings.Contains(web.Detail, "health check fails") ||
		!strings.Contains(web.Fix, `address = "198.18.0.2"`) {
		t.Errorf("service bound to the host's address: %+v", web)
	}
	api := find(results, "service api")
	if api == nil || api.Status != "fail" || !strings.Contains(api.Detail, "not granted") || !strings.Contains(api.Fix, "vmesh node grant web --services web,api") {
		t.Errorf("service the CA refused: %+v", api)
	}
	g := find(results, "gossip")
	if g == nil || g.Status != "fail" || !strings.Contains(g.Detail, "no installed keys could decrypt") || !strings.Contains(g.Detail, "198.18.0.3") {
		t.Errorf("gossip key mismatch: %+v", g)
	}
}

// Issue 15: with the agent dead and its rules left behind, check names the
// rules and the fix; it still checks the config and the services.
func TestCheckLeftoverRules(t *testing.T) {
	now := time.Now()
	path := writeTestConfig(t, testConfig)
	env := testEnv(path, "127.0.0.1:1", now)
	env.Leftovers = func(context.Context, node.Config) (string, error) {
		return "iptables: -D OUTPUT -p tcp -m comment --comment vmesh/output -j VMESH_OUTPUT\niptables: -X VMESH_OUTPUT\n", nil
	}
	env.Dial = func(context.Context, node.Config, netip.AddrPort) error { return errors.New("connection refused") }
	results := runChecks(t.Context(), env)
	if r := find(results, "agent"); r == nil || r.Status != "fail" || !strings.Contains(r.Fix, "systemctl start vmesh") {
		t.Errorf("no agent: %+v", r)
	}
	r := find(results, "iptables")
	if r == nil || r.Status != "fail" || !strings.Contains(r.Detail, "2 vmesh rule(s) are installed but no agent runs") ||
		!strings.Contains(r.Detail, "VMESH_OUTPUT") || !strings.Contains(r.Fix, "vmesh agent --cleanup") {
		t.Errorf("leftover rules: %+v", r)
	}
	if r := find(results, "service web"); r == nil || r.Status != "fail" {
		t.Errorf("services are not checked without an agent: %+v", results)
	}
}

// Issue 15: a config error does not stop check from checking the rest.
func TestCheckGoesOnAfterConfigError(t *testing.T) {
	now := time.Now()
	bad := writeTestConfig(t, "[proxy]\ndetect_timeout = 10\n")
	st := healthyStatus(now, bad)
	results := runChecks(t.Context(), testEnv(bad, fakeAgent(t, st, node.DefaultConfig()), now))
	if len(results) == 0 || results[0].Name != "config" || results[0].Status != "fail" || !strings.Contains(results[0].Detail, "proxy.detect_timeout") {
		t.Fatalf("bad config: %+v", results)
	}
	for _, name := range []string{"agent", "iptables", "certificate", "gossip"} {
		if find(results, name) == nil {
			t.Errorf("after a config error, %s was not checked: %+v", name, results)
		}
	}
}

func TestParseProcAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:1F90":                         "127.0.0.1:8080",
		"020012C6:1F90":                         "198.18.0.2:8080",
		"00000000000000000000000000000000:0050": "[::]:80",
		"0000000000000000FFFF00000100007F:0050": "127.0.0.1:80",
	} {
		got, ok := parseProcAddr(in)
		if !ok || got.String() != want {
			t.Errorf("parseProcAddr(%q) = %v, %v; want %s", in, got, ok, want)
		}
	}
}

// Issue 16: a service whose every client so far is meshed but whose policy
// still takes plaintext is flagged; one that also has plaintext clients is
// not (all-authenticated would cut them off).
func TestCheckWarnsOnUnauthenticatedMeshedService(t *testing.T) {
	now := time.Now()
	path := writeTestConfig(t, testConfig)
	cfg, err := node.LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	st := healthyStatus(now, path)
	st.Services[0].Policy = "all-unauthenticated"
	st.Services[0].InboundMTLS = 12
	results := runChecks(t.Context(), testEnv("", fakeAgent(t, st, cfg), now))
	r := find(results, "service web policy")
	if r == nil || r.Status != "warn" || !strings.Contains(r.Detail, "all-unauthenticated") || !strings.Contains(r.Fix, `policy = "all-authenticated"`) {
		t.Errorf("meshed clients only, all-unauthenticated: %+v", r)
	}
	st.Services[0].InboundPlain = 1
	results = runChecks(t.Context(), testEnv("", fakeAgent(t, st, cfg), now))
	if r := find(results, "service web policy"); r != nil {
		t.Errorf("a plaintext client is still there, yet check says: %+v", r)
	}
}

// Issue 15: clock skew against peers (measured by gossip) and the CA.
func TestCheckClockSkew(t *testing.T) {
	now := time.Now()
	path := writeTestConfig(t, testConfig)
	cfg, _ := node.LoadConfig(path)
	st := healthyStatus(now, path)
	small, large := 2*time.Second, -3*time.Minute
	st.Members = []discovery.Member{{Name: "web", State: "alive"}, {Name: "ca", State: "alive", ClockOffset: &small}, {Name: "db", State: "alive", ClockOffset: &large}}
	results := runChecks(t.Context(), testEnv("", fakeAgent(t, st, cfg), now))
	if r := find(results, "clock"); r == nil || r.Status != "fail" || !strings.Contains(r.Detail, "db's clock is -3m0s off") || !strings.Contains(r.Fix, "timedatectl") {
		t.Errorf("a peer 3 minutes behind: %+v", r)
	}
	st.Members[2].ClockOffset = &small
	results = runChecks(t.Context(), testEnv("", fakeAgent(t, st, cfg), now))
	if r := find(results, "clock"); r == nil || r.Status != "ok" || !strings.Contains(r.Detail, "2 peer(s)") {
		t.Errorf("peers in step: %+v", r)
	}
}

// A host without the cluster's key learns it from its join error.
func TestCheckGossipKeyMissing(t *testing.T) {
	now := time.Now()
	path := writeTestConfig(t, testConfig)
	cfg, _ := node.LoadConfig(path)
	st := healthyStatus(now, path)
	st.Members = []discovery.Member{{Name: "web", State: "alive"}}
	st.Gossip.JoinError = "failed to join 198.18.0.1:7946: remote state is encrypted and encryption is not configured"
	results := runChecks(t.Context(), testEnv("", fakeAgent(t, st, cfg), now))
	if r := find(results, "gossip"); r == nil || r.Status != "fail" || !strings.Contains(r.Detail, "encryption is not configured") || !strings.Contains(r.Fix, "gossip.key_file") {
		t.Errorf("joining an encrypted cluster without a key: %+v", r)
	}
}

// The DNS check asks the host's resolver as an app would: vmesh's answer
// means the capture works; the upstream's own answer means it does not;
// with capture off, the missing resolver line is named.
func TestCheckDNS(t *testing.T) {
	now := time.Now()
	path := writeTestConfig(t, testConfig)
	cfg, err := node.LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	st := healthyStatus(now, path)
	st.Rules.Installed = true
	upstream := func(_ context.Context, _ netip.AddrPort, name string, qtype uint16) (*dns.Msg, error) {
		m := new(dns.Msg).SetQuestion(dns.Fqdn(name), qtype)
		return new(dns.Msg).SetRcode(m, dns.RcodeNameError), nil
	}

	env := testEnv(path, fakeAgent(t, st, cfg), now)
	if r := find(runChecks(context.Background(), env), "dns capture"); r == nil || r.Status != "ok" {
		t.Errorf("capture answered by vmesh: %+v", r)
	}
	env.Query = upstream
	if r := find(runChecks(context.Background(), env), "dns capture"); r == nil || r.Status != "fail" || !strings.Contains(r.Detail, "not captured") {
		t.Errorf("capture bypassed: %+v", r)
	}

	cfg.DNS.Capture = false
	env = testEnv(path, fakeAgent(t, st, cfg), now)
	env.Query = func(ctx context.Context, server netip.AddrPort, name string, qtype uint16) (*dns.Msg, error) {
		if server == cfg.DNS.Listen {
			return vmeshAnswers(ctx, server, name, qtype)
		}
		return upstream(ctx, server, name, qtype)
	}
	r := find(runChecks(context.Background(), env), "dns")
	if r == nil || r.Status != "warn" || !strings.Contains(r.Fix, "resolvectl domain lo ~vmesh") {
		t.Errorf("capture off, resolver not pointed at vmesh: %+v", r)
	}
}
