package node

import (
	_ "embed"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/vmesh/vmesh/ca"
	"github.com/vmesh/vmesh/discovery"
	"github.com/vmesh/vmesh/internal/field"
	"github.com/vmesh/vmesh/proxy"
	"github.com/vmesh/vmesh/rules"
)

// DefaultConfigPath is where the agent looks for its configuration.
const DefaultConfigPath = "/etc/vmesh/vmesh.toml"

// Config is the whole configuration of one host: one TOML file.
type Config struct {
	Node     Section          `toml:"node"`
	Admin    AdminConfig      `toml:"admin"`
	Proxy    proxy.Config     `toml:"proxy"`
	Gossip   discovery.Config `toml:"gossip"`
	CA       ca.Config        `toml:"ca"`
	Rules    rules.Config     `toml:"rules"`
	DNS      DNSConfig        `toml:"dns"`
	Services []ServiceConfig  `toml:"service"`
	// Routes and Splits are this host's policies for calling services
	// (routes.go).
	Routes []RouteConfig `toml:"route"`
	Splits []SplitConfig `toml:"split"`
}

// DNSConfig is the [dns] section: names for services.
type DNSConfig struct {
	// Enabled runs the DNS server: <service>.<domain> answers the
	// service's VIP, every other name is forwarded. Default true.
	Enabled bool `toml:"enabled"`
	// Capture redirects the host's DNS queries (udp and tcp port 53, to
	// any server) to the agent, so apps resolve service names with no
	// resolver change; removed with the other rules. Default true. Off:
	// point systemd-resolved or resolv.conf at Listen (`vmesh check`
	// prints the line).
	Capture bool `toml:"capture"`
	// Domain of service names, default "vmesh": web.vmesh.
	Domain string `toml:"domain"`
	// Listen is where the server answers (udp and tcp). Default
	// 127.0.0.1:15053; with capture it must be on 127.0.0.1 (where the
	// kernel redirects), and [::1] on the same port takes IPv6 queries.
	Listen netip.AddrPort `toml:"listen"`
	// Upstreams answer every name outside Domain. Default: the host's
	// resolvers from /etc/resolv.conf (systemd-resolved's upstreams when
	// it names only resolved's stub), re-read when it changes.
	Upstreams []netip.AddrPort `toml:"upstreams"`
	// TTL of answers, and of negative answers. Default 5s.
	TTL time.Duration `toml:"ttl"`
}

// Section is the [node] section: the host itself.
type Section struct {
	// Name is the host's name in the mesh and in its SPIFFE ID
	// (spiffe://<trust_domain>/node/<name>). Default: the hostname.
	Name string `toml:"name"`
	// DataDir holds the state database, keys and certificates.
	// Default /var/lib/vmesh.
	DataDir string `toml:"data_dir"`
	// LogLevel is debug, info (default), warn or error.
	LogLevel string `toml:"log_level"`
	// LogFormat is "text" (default) or "json".
	LogFormat string `toml:"log_format"`
	// DrainTimeout is how long a stopping agent lets established
	// connections finish before closing them. Default 10s.
	DrainTimeout time.Duration `toml:"drain_timeout"`
	// CPUs is how many cores the agent's code runs on at once
	// (GOMAXPROCS). Default 0: half the cores the host gives the agent
	// (its CPU quota counts), at least 1. The environment variable
	// GOMAXPROCS, when set, wins.
	CPUs int `toml:"cpus"`
}

// Procs returns the number of cores the agent runs on (Section.CPUs); auto
// is the Go runtime's own default, the cores available to the process.
func (s Section) Procs(auto int) int {
	if s.CPUs > 0 {
		return s.CPUs
	}
	return max(1, auto/2)
}

// AdminConfig is the [admin] section.
type AdminConfig struct {
	// Addr serves the read-only admin HTTP API (/metrics, /ready, /live, JSON
	// views). Default 127.0.0.1:4191; open it to the network for Prometheus.
	Addr netip.AddrPort `toml:"addr"`
	// Socket is the control socket for mutating operations (token create,
	// revoke, reload); its file mode guards it. Default /run/vmesh/admin.sock.
	Socket string `toml:"socket"`
}

// ServiceConfig is one [[service]] this host offers.
type ServiceConfig struct {
	// Name of the service; its identity is spiffe://<td>/svc/<name>. Required.
	Name string `toml:"name"`
	// Port the service listens on. Required.
	Port uint16 `toml:"port"`
	// Address is where the app listens: the inbound proxy and the health
	// checks dial Address:Port. Default 127.0.0.1 (an app bound to
	// 0.0.0.0 or to loopback); set it for an app bound to one of the host's
	// own addresses only.
	Address netip.Addr `toml:"address"`
	// Protocol is "auto" (default: detect), "http1", "http2" or "opaque"
	// (no detection: mTLS and TCP metrics only).
	Protocol string `toml:"protocol"`
	// Policy overrides proxy.default_policy for this service.
	Policy proxy.Policy `toml:"policy"`
	// Allow lists the SPIFFE IDs allowed to connect, with '*' matching one
	// path segment or a trailing '**' any rest, e.g.
	// "spiffe://prod.example/svc/web". Empty: the policy alone decides.
	Allow []string `toml:"allow"`
	// Weight for load balancing, 1-1000. Default 100.
	Weight int `toml:"weight"`
	// Labels are free-form facts gossiped with the service (e.g. version).
	Labels map[string]string `toml:"labels"`
	// Health is the service's health check. Default: a TCP connect every 10s.
	Health discovery.HealthCheck `toml:"health"`
}

// ServiceProtocol returns the protocol, resolving the default.
func (s *ServiceConfig) ServiceProtocol() string {
	if s.Protocol == "" {
		return "auto"
	}
	return s.Protocol
}

// Target is where the proxy and the health checks reach the app:
// Address:Port, by default 127.0.0.1:Port.
func (s *ServiceConfig) Target() netip.AddrPort {
	a := s.Address
	if !a.IsValid() {
		a = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	return netip.AddrPortFrom(a, s.Port)
}

// ServiceWeight returns the weight, resolving the default.
func (s *ServiceConfig) ServiceWeight() int {
	if s.Weight == 0 {
		return 100
	}
	return s.Weight
}

// DefaultConfig returns a fresh, complete configuration with every default
// set. Fields that need the host (node name) are resolved at start-up.
func DefaultConfig() Config {
	return Config{
		Node: Section{
			DataDir:      "/var/lib/vmesh",
			LogLevel:     "info",
			LogFormat:    "text",
			DrainTimeout: 10 * time.Second,
		},
		Admin: AdminConfig{
			Addr:   netip.MustParseAddrPort("127.0.0.1:4191"),
			Socket: "/run/vmesh/admin.sock",
		},
		Proxy:  proxy.DefaultConfig(),
		Gossip: discovery.DefaultConfig(),
		CA:     ca.DefaultConfig(),
		Rules:  rules.DefaultConfig(),
		DNS: DNSConfig{
			Enabled: true,
			Capture: true,
			Domain:  "vmesh",
			Listen:  netip.MustParseAddrPort("127.0.0.1:15053"),
			TTL:     5 * time.Second,
		},
	}
}

// NodeName returns the configured node name or the hostname.
func (c *Config) NodeName() string {
	if c.Node.Name != "" {
		return c.Node.Name
	}
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "localhost"
	}
	return strings.ToLower(h)
}

var (
	nameRE     = regexp.MustCompile(`^[a-z0-9]([a-z0-9\-_.]{0,61}[a-z0-9])?$`)
	logLevels  = []string{"debug", "info", "warn", "error"}
	protocols  = []string{"auto", "http1", "http2", "opaque"}
	spiffePath = regexp.MustCompile(`^spiffe://[a-z0-9.\-_*]+(/[A-Za-z0-9.\-_*]+)*$`)
)

// ValidName reports whether s is usable as a node or service name (it ends
// up in SPIFFE IDs, metric labels and file names).
func ValidName(s string) bool { return nameRE.MatchString(s) }

// Validate checks the whole configuration without changing it and returns
// every problem found, each naming its key (a field.List).
func (c *Config) Validate() error {
	var errs field.List
	if c.Node.Name != "" && !ValidName(c.Node.Name) {
		errs.Add("node.name", "%q is not a valid name (lower-case letters, digits, '-', '_', '.'; at most 63)", c.Node.Name)
	}
	if c.Node.DataDir == "" {
		errs.Add("node.data_dir", "is required")
	}
	if !slices.Contains(logLevels, c.Node.LogLevel) {
		errs.Add("node.log_level", "must be one of %s, got %q", strings.Join(logLevels, ", "), c.Node.LogLevel)
	}
	switch c.Node.LogFormat {
	case "text", "json":
	default:
		errs.Add("node.log_format", "must be \"text\" or \"json\", got %q", c.Node.LogFormat)
	}
	if c.Node.DrainTimeout < 0 {
		errs.Add("node.drain_timeout", "must not be negative, got %s", c.Node.DrainTimeout)
	}
	if c.Node.CPUs < 0 || c.Node.CPUs > 1024 {
		errs.Add("node.cpus", "must be 0 (half the cores) to 1024, got %d", c.Node.CPUs)
	}
	if !c.Admin.Addr.IsValid() || c.Admin.Addr.Port() == 0 {
		errs.Add("admin.addr", "must be an address with a non-zero port, e.g. 127.0.0.1:4191")
	}
	if c.Admin.Socket == "" {
		errs.Add("admin.socket", "is required")
	}
	errs.Merge("proxy", c.Proxy.Validate())
	errs.Merge("gossip", c.Gossip.Validate())
	errs.Merge("ca", c.CA.Validate())
	errs.Merge("rules", c.Rules.Validate())
	c.DNS.validate(&errs)
	c.validateRoutes(&errs)

	names := map[string]int{}
	for i := range c.Services {
		s := &c.Services[i]
		key := fmt.Sprintf("service[%d]", i+1)
		switch {
		case s.Name == "":
			errs.Add(key+".name", "is required")
		case !ValidName(s.Name):
			errs.Add(key+".name", "%q is not a valid name (lower-case letters, digits, '-', '_', '.')", s.Name)
		default:
			if j, dup := names[s.Name]; dup {
				errs.Add(key+".name", "service %q is already declared as service[%d]", s.Name, j)
			}
			names[s.Name] = i + 1
		}
		if s.Port == 0 {
			errs.Add(key+".port", "is required (1-65535)")
		}
		if a := s.Address; a.IsValid() && (a.IsUnspecified() || a.IsMulticast()) {
			errs.Add(key+".address", "must be an address the app listens on (default 127.0.0.1), got %s", a)
		}
		if !slices.Contains(protocols, s.ServiceProtocol()) {
			errs.Add(key+".protocol", "must be one of %s, got %q", strings.Join(protocols, ", "), s.Protocol)
		}
		if s.Policy != "" && !s.Policy.Valid() {
			errs.Add(key+".policy", "unknown policy %q (want all-unauthenticated, all-authenticated, deny or audit)", s.Policy)
		}
		for j, a := range s.Allow {
			if !spiffePath.MatchString(a) {
				errs.Add(key+".allow", "entry %d: %q is not a SPIFFE ID pattern like \"spiffe://td/svc/name\"", j+1, a)
			}
		}
		if w := s.ServiceWeight(); w < 1 || w > 1000 {
			errs.Add(key+".weight", "must be 1-1000, got %d", s.Weight)
		}
		errs.Merge(key+".health", s.Health.Validate())
	}
	if id := c.Proxy.ClientIdentity; id != "" {
		if _, ok := names[id]; !ok {
			errs.Add("proxy.client_identity", "%q is not one of this host's services", id)
		}
	}
	c.validatePorts(&errs)
	return errs.Err()
}

var domainRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?)*$`)

func (d *DNSConfig) validate(errs *field.List) {
	if !domainRE.MatchString(d.Domain) {
		errs.Add("dns.domain", "%q is not a DNS domain (lower-case labels, no leading or trailing dot), e.g. \"vmesh\"", d.Domain)
	}
	if !d.Listen.IsValid() || d.Listen.Port() == 0 {
		errs.Add("dns.listen", "must be an address with a non-zero port, e.g. 127.0.0.1:15053")
	} else if d.Enabled && d.Capture && d.Listen.Addr() != netip.AddrFrom4([4]byte{127, 0, 0, 1}) && !d.Listen.Addr().IsUnspecified() {
		errs.Add("dns.listen", "with dns.capture the server must listen on 127.0.0.1 (where the kernel redirects queries), got %s", d.Listen)
	}
	for i, u := range d.Upstreams {
		if !u.IsValid() || u.Port() == 0 {
			errs.Add("dns.upstreams", "entry %d: must be an address with a port, e.g. \"198.18.0.53:53\"", i+1)
		} else if u == d.Listen {
			errs.Add("dns.upstreams", "entry %d: %s is vmesh's own DNS address", i+1, u)
		}
	}
	if d.TTL < time.Second || d.TTL > time.Hour {
		errs.Add("dns.ttl", "must be between 1s and 1h, got %s", d.TTL)
	}
}

// DNSCapturePort is the port the rules redirect the host's DNS queries
// to, or 0 when DNS is not captured.
func (c *Config) DNSCapturePort() uint16 {
	if !c.DNS.Enabled || !c.DNS.Capture || !c.Rules.Enabled {
		return 0
	}
	return c.DNS.Listen.Port()
}

// validatePorts refuses two things on one port, and service ports that are
// also skip ports (their traffic would silently bypass the mesh).
func (c *Config) validatePorts(errs *field.List) {
	type owner struct{ key string }
	used := map[uint16]owner{}
	claim := func(key string, p uint16) {
		if p == 0 {
			return
		}
		if o, ok := used[p]; ok {
			errs.Add(key, "port %d is already used by %s", p, o.key)
			return
		}
		used[p] = owner{key}
	}
	claim("proxy.outbound_addr", c.Proxy.OutboundAddr.Port())
	claim("proxy.inbound_addr", c.Proxy.InboundAddr.Port())
	claim("admin.addr", c.Admin.Addr.Port())
	claim("gossip.bind_addr", c.Gossip.BindAddr.Port())
	if c.DNS.Enabled {
		claim("dns.listen", c.DNS.Listen.Port())
	}
	if c.CA.Role == ca.RoleServer {
		claim("ca.listen_addr", c.CA.ListenAddr.Port())
	}
	for i := range c.Services {
		s := &c.Services[i]
		key := fmt.Sprintf("service[%d].port", i+1)
		claim(key, s.Port)
		if s.Port != 0 && slices.Contains(c.Rules.SkipInboundPorts, s.Port) {
			errs.Add(key, "port %d is also in rules.skip_inbound_ports: its traffic would bypass the mesh", s.Port)
		}
		if s.Port != 0 && slices.Contains(c.Rules.SkipOutboundPorts, s.Port) {
			errs.Add(key, "port %d is also in rules.skip_outbound_ports: its traffic would bypass the mesh", s.Port)
		}
	}
}

//go:embed default.toml
var defaultTOML string

// DefaultTOML returns the default configuration as commented TOML, for
// `vmesh config default`. Parsing it yields DefaultConfig().
func DefaultTOML() string { return defaultTOML }

// RulesState is the input of rules.Build for this configuration, with uid
// the agent's own uid (used when rules.proxy_uid is -1).
func (c *Config) RulesState(uid uint32) rules.State {
	// The CA port is vmesh's own on every host: a client's renewals must
	// reach the CA host unproxied whatever uid the agent runs as.
	own := []uint16{c.Admin.Addr.Port(), c.Gossip.BindAddr.Port(), c.CA.ListenAddr.Port()}
	if c.DNS.Enabled {
		own = append(own, c.DNS.Listen.Port())
	}
	var svc []uint16
	for _, s := range c.Services {
		svc = append(svc, s.Port)
	}
	return c.Rules.State(rules.State{
		InboundPort:  c.Proxy.InboundAddr.Port(),
		OutboundPort: c.Proxy.OutboundAddr.Port(),
		OwnPorts:     own,
		ServicePorts: svc,
		VIPRanges:    []netip.Prefix{c.Proxy.VIPRange},
		DNSPort:      c.DNSCapturePort(),
		DNSv6:        true, // the agent serves on [::1] too
	}, uid)
}
