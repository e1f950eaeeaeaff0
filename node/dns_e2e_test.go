package node_test

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/vmesh/vmesh/internal/testbed"
	"github.com/vmesh/vmesh/names"
)

// serveUpstreamDNS runs the test bed's "corporate" resolver on h, port 53
// (udp and tcp): example.test A 192.0.2.7, anything else NXDOMAIN.
func serveUpstreamDNS(t *testing.T, h *testbed.Host) {
	t.Helper()
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg).SetReply(r)
		m.Authoritative = true
		if q := r.Question[0]; q.Name == "example.test." && q.Qtype == dns.TypeA {
			rr, _ := dns.NewRR("example.test. 300 IN A 192.0.2.7")
			m.Answer = append(m.Answer, rr)
		} else {
			m.Rcode = dns.RcodeNameError
		}
		w.WriteMsg(m)
	})
	var pc net.PacketConn
	var ln net.Listener
	if err := h.Do(func() (err error) {
		if pc, err = net.ListenPacket("udp4", ":53"); err != nil {
			return err
		}
		ln, err = net.Listen("tcp4", ":53")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	u, tc := &dns.Server{PacketConn: pc, Handler: handler}, &dns.Server{Listener: ln, Handler: handler}
	go u.ActivateAndServe()
	go tc.ActivateAndServe()
	t.Cleanup(func() { pc.Close(); ln.Close() })
}

// TestServiceDNS: a client host resolves web.vmesh with no resolver change
// (its resolv.conf names only the network's resolver): getent, dig over
// udp and tcp, SRV, NXDOMAIN, and curl by name. Other names get the same
// answers through the capture as without it, and once the agent stopped
// DNS works exactly as before and web.vmesh is gone.
func TestServiceDNS(t *testing.T) {
	bed := testbed.New(t, 3)
	caH := newMeshHost(t, bed.Hosts[0], "ca1")
	web := newMeshHost(t, bed.Hosts[1], "web1")
	cli := newMeshHost(t, bed.Hosts[2], "client")
	serveUpstreamDNS(t, bed.Hosts[0])
	for _, h := range bed.Hosts {
		if err := h.SetResolver(bed.Hosts[0].Addr); err != nil {
			t.Fatal(err)
		}
	}

	keyFile := filepath.Join(caH.dir, "gossip.key")
	key := strings.TrimSpace(caH.Run(t, vmeshBin, "keygen"))
	os.WriteFile(keyFile, []byte(key+"\n"), 0o600)
	caH.Run(t, vmeshBin, "ca", "init", "--trust-domain", td, "--dir", filepath.Join(caH.dir, "ca"))
	caH.writeConfig(t, keyFile, fmt.Sprintf("role = \"server\"\ndir = %q\n", filepath.Join(caH.dir, "ca")))
	caH.start(t)
	token := func(node, services string) string {
		return strings.TrimSpace(caH.Run(t, vmeshBin, "token", "create", "--socket", caH.socket(), "--node", node, "--services", services))
	}
	serveHTTP(t, web.Host, 8080, "web1\n")
	web.writeConfig(t, keyFile, fmt.Sprintf("token = %q\n", token("web1", "web"))+`
[[service]]
name = "web"
port = 8080
`)
	addJoin(t, web.cfg, caH.Addr.String())
	web.start(t)

	dig := func(args ...string) string {
		out, err := cli.asApp("dig", append([]string{"+time=3", "+tries=1"}, args...)...)
		if err != nil {
			t.Fatalf("dig %v: %v\n%s", args, err, out)
		}
		return out
	}
	answers := func(args ...string) string { // the answer section, TTLs and all
		return strings.TrimSpace(dig(append([]string{"+noall", "+answer"}, args...)...))
	}
	before := map[string]string{}
	for _, q := range [][]string{{"example.test"}, {"+tcp", "example.test"}} {
		before[strings.Join(q, " ")] = answers(q...)
	}
	if !strings.Contains(before["example.test"], "192.0.2.7") {
		t.Fatalf("the bed's resolver does not answer: %q", before["example.test"])
	}
	if !strings.Contains(dig("web.vmesh"), "status: NXDOMAIN") {
		t.Fatal("web.vmesh resolves before vmesh runs")
	}
	rulesBefore := cli.natRules(t)

	cli.writeConfig(t, keyFile, fmt.Sprintf("token = %q\n", token("client", "")))
	addJoin(t, cli.cfg, caH.Addr.String())
	cli.start(t)
	vip, _ := names.NewTable(names.DefaultRange, []string{"web"}).VIP("web")
	cli.waitFor(t, "web in the catalog", 30*time.Second, func() bool {
		out, err := cli.Try(vmeshBin, "services")
		return err == nil && strings.Contains(out, "web.vmesh")
	})

	if out, err := cli.asApp("getent", "hosts", "web.vmesh"); err != nil || !strings.HasPrefix(out, vip.String()+" ") {
		t.Errorf("getent hosts web.vmesh: %q %v, want %s", out, err, vip)
	}
	for _, proto := range []string{"+notcp", "+tcp"} {
		if got := strings.TrimSpace(dig("+short", proto, "web.vmesh")); got != vip.String() {
			t.Errorf("dig %s web.vmesh: %q, want %s", proto, got, vip)
		}
	}
	if got := strings.TrimSpace(dig("+short", "SRV", "_web._tcp.vmesh")); got != "0 100 8080 web.vmesh." {
		t.Errorf("SRV _web._tcp.vmesh: %q", got)
	}
	if out := dig("nope.vmesh"); !strings.Contains(out, "status: NXDOMAIN") {
		t.Errorf("nope.vmesh is not NXDOMAIN:\n%s", out)
	}
	if out, err := cli.asApp("curl", "-sS", "--max-time", "10", "http://web.vmesh:8080/"); err != nil || out != "web1\n" {
		t.Errorf("curl http://web.vmesh:8080/: %q %v", out, err)
	}
	for q, want := range before {
		if got := answers(strings.Fields(q)...); got != want {
			t.Errorf("dig %s through the capture: %q, without it %q", q, got, want)
		}
	}
	out, err := cli.Try(vmeshBin, "check", "-c", cli.cfg)
	if err != nil || !strings.Contains(out, "√ dns capture:") || !strings.Contains(out, "√ dns names: web.vmesh is "+vip.String()) {
		t.Errorf("vmesh check does not see DNS working: %v\n%s", err, out)
	}
	if n := cli.metric(t, "dns_queries_total", map[string]string{"result": "forwarded"}); n < 2 {
		t.Errorf("the agent forwarded %v queries: the capture did not see them", n)
	}

	// Stopped: the capture is gone, DNS is as it was.
	cli.stop(t, syscall.SIGTERM)
	if got := cli.natRules(t); got != rulesBefore {
		t.Errorf("nat table after stop differs from before start:\n%s\nwant\n%s", got, rulesBefore)
	}
	for q, want := range before {
		if got := answers(strings.Fields(q)...); got != want {
			t.Errorf("dig %s after the agent stopped: %q, before %q", q, got, want)
		}
	}
	if _, err := cli.asApp("getent", "hosts", "web.vmesh"); err == nil {
		t.Error("web.vmesh still resolves with the agent stopped")
	}
}
