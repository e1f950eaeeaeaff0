package node

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// Issue 15: what a reload may change is decided by comparing what each
// part was built from; the settings the issue found accepted and never
// applied are refused by name, the rest is applied.
func TestRestartNeeded(t *testing.T) {
	base := func() Config {
		c := DefaultConfig()
		c.Node.Name = "web"
		c.Gossip.Join = []string{"198.18.0.1"}
		c.Services = []ServiceConfig{{Name: "web", Port: 8080}}
		return c
	}
	cases := []struct {
		name     string
		edit     func(*Config)
		levelVar bool
		want     []string
	}{
		{"nothing", func(*Config) {}, true, nil},
		{"log level, live", func(c *Config) { c.Node.LogLevel = "debug" }, true, nil},
		{"log level, fixed handler", func(c *Config) { c.Node.LogLevel = "debug" }, false, []string{"node.log_level"}},
		{"services", func(c *Config) {
			c.Services = append(c.Services, ServiceConfig{Name: "api", Port: 8081, Address: netip.MustParseAddr("198.18.0.2")})
		}, true, nil},
		{"rule set", func(c *Config) {
			c.Rules.SkipOutboundPorts = []uint16{5432}
			c.Rules.OnStop = "keep"
		}, true, nil},
		{"drain timeout", func(c *Config) { c.Node.DrainTimeout = 1 }, true, nil},
		{"token removed after the join", func(c *Config) { c.CA.Token = "" }, true, nil},
		{"proxy mark", func(c *Config) { c.Rules.ProxyMark = 7 }, true, []string{"rules.proxy_mark"}},
		{"ipv6", func(c *Config) { c.Rules.IPv6 = "off" }, true, []string{"rules.ipv6"}},
		{"backend", func(c *Config) { c.Rules.Backend = "legacy" }, true, []string{"rules.backend"}},
		{"join", func(c *Config) { c.Gossip.Join = []string{"198.18.0.9"} }, true, []string{"gossip.join"}},
		{"key file", func(c *Config) { c.Gossip.KeyFile = "/etc/vmesh/other.key" }, true, []string{"gossip.key_file"}},
		{"ca url", func(c *Config) { c.CA.URL = "https://198.18.0.1:4192" }, true, []string{"ca.url"}},
		{"several", func(c *Config) {
			c.Proxy.DetectTimeout *= 2
			c.Admin.Addr = netip.MustParseAddrPort("127.0.0.1:4999")
		}, true, []string{"admin.addr", "proxy.detect_timeout"}},
		{"trust domain: every part", func(c *Config) { c.CA.TrustDomain = "other.example" }, true, []string{"ca.trust_domain"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			next := base()
			tc.edit(&next)
			got := restartNeeded(base(), next, tc.levelVar)
			if !slices.Equal(got, tc.want) {
				t.Errorf("restartNeeded = %v, want %v", got, tc.want)
			}
		})
	}
}

// Every key of the file is either in a part (restart) or deliberately
// reloadable; a new key lands in its section's part without anyone listing
// it.
func TestEveryKeyHasAnOwner(t *testing.T) {
	reloadable := []string{"node.log_level", "node.drain_timeout", "ca.token", "ca.token_file", "rules.capture_all_inbound",
		"rules.skip_inbound_ports", "rules.skip_outbound_ports", "rules.exclude_outbound_cidrs", "rules.proxy_uid",
		"rules.proxy_gid", "rules.on_stop"}
	inPart := map[string]bool{}
	for _, p := range parts(DefaultConfig(), true) {
		for k := range p.keys {
			inPart[k] = true
		}
	}
	for k := range flatten(DefaultConfig()) {
		if !inPart[k] && !slices.Contains(reloadable, k) {
			t.Errorf("key %s is neither built into a part nor known to be reloadable", k)
		}
		if strings.HasPrefix(k, "service") {
			t.Errorf("flatten includes service key %s", k)
		}
	}
}

func TestPickAdvertise(t *testing.T) {
	addrs := func(m map[string][]string) map[string][]netip.Addr {
		out := map[string][]netip.Addr{}
		for k, v := range m {
			for _, a := range v {
				out[k] = append(out[k], netip.MustParseAddr(a))
			}
		}
		return out
	}
	cases := []struct {
		name   string
		routes []route
		addrs  map[string][]string
		want   string
		errHas []string
	}{
		{"default route picks its interface over a tunnel listed first",
			[]route{{"eth0", 0}}, map[string][]string{"nebula1": {"10.42.0.1"}, "eth0": {"198.18.0.2"}, "docker0": {"172.17.0.1"}}, "198.18.0.2", nil},
		{"lowest metric wins", []route{{"wlan0", 600}, {"eth0", 100}}, map[string][]string{"wlan0": {"192.168.1.5"}, "eth0": {"198.18.0.2"}}, "198.18.0.2", nil},
		{"no default route, one address", nil, map[string][]string{"eth0": {"198.18.0.2"}}, "198.18.0.2", nil},
		{"nothing: loopback", nil, map[string][]string{}, "127.0.0.1", nil},
		{"IPv6 only", []route{{"eth0", 0}}, map[string][]string{"eth0": {"2001:db8::2"}}, "2001:db8::2", nil},
		{"two addresses on the default interface", []route{{"eth0", 0}}, map[string][]string{"eth0": {"198.18.0.2", "198.18.0.3"}}, "",
			[]string{"198.18.0.2 (eth0)", "198.18.0.3 (eth0)", "gossip.advertise_addr", "default route is on eth0"}},
		{"no default route, two interfaces", nil, map[string][]string{"eth0": {"198.18.0.2"}, "tailscale0": {"100.64.0.7"}}, "",
			[]string{"no default route", "198.18.0.2 (eth0)", "100.64.0.7 (tailscale0)", "gossip.advertise_addr"}},
		{"equal default routes on two interfaces", []route{{"eth0", 0}, {"eth1", 0}}, map[string][]string{"eth0": {"198.18.0.2"}, "eth1": {"198.19.0.2"}}, "",
			[]string{"eth0 and eth1", "gossip.advertise_addr"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := pickAdvertise(tc.routes, addrs(tc.addrs))
			if tc.errHas != nil {
				if err == nil {
					t.Fatalf("picked %s, want a refusal", got)
				}
				for _, s := range tc.errHas {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q does not say %q", err, s)
					}
				}
				return
			}
			if err != nil || got.String() != tc.want {
				t.Errorf("got %v, %v; want %s", got, err, tc.want)
			}
		})
	}
}
