package proxy

import (
	"net/netip"
	"time"

	"github.com/vmesh/vmesh/internal/field"
)

// DefaultOpaquePorts are the ports on which no protocol detection is done,
// Linkerd's default list: SMTP (25, 587), MySQL (3306), Galera (4444),
// PostgreSQL (5432), Redis (6379), Elasticsearch (9300), memcached (11211).
// Server-speaks-first protocols would otherwise wait the detect timeout.
func DefaultOpaquePorts() []uint16 {
	return []uint16{25, 587, 3306, 4444, 5432, 6379, 9300, 11211}
}

// Policy is a default authorization policy for inbound connections.
type Policy string

// The default policies, as in Linkerd.
const (
	// PolicyAllUnauthenticated allows every client, meshed or not.
	PolicyAllUnauthenticated Policy = "all-unauthenticated"
	// PolicyAllAuthenticated allows only clients with a valid mesh SVID.
	PolicyAllAuthenticated Policy = "all-authenticated"
	// PolicyDeny refuses every connection.
	PolicyDeny Policy = "deny"
	// PolicyAudit allows every client but logs and counts what would be denied.
	PolicyAudit Policy = "audit"
)

// Valid reports whether p is one of the known policies.
func (p Policy) Valid() bool {
	switch p {
	case PolicyAllUnauthenticated, PolicyAllAuthenticated, PolicyDeny, PolicyAudit:
		return true
	}
	return false
}

// Config is the [proxy] section of the configuration.
type Config struct {
	// OutboundAddr is where the outbound proxy listens; the OUTPUT redirect
	// sends the host's TCP connections here. Default 127.0.0.1:4140.
	OutboundAddr netip.AddrPort `toml:"outbound_addr"`
	// InboundAddr is where the inbound proxy listens: the PREROUTING redirect
	// target and where peer proxies dial with mTLS. Default 0.0.0.0:4143.
	InboundAddr netip.AddrPort `toml:"inbound_addr"`
	// DetectTimeout bounds the first read used for protocol detection.
	// Default 10s. A server-speaks-first service on a non-opaque port waits
	// this long before its first byte.
	DetectTimeout time.Duration `toml:"detect_timeout"`
	// ConnectTimeout bounds dialing a peer proxy or a local service.
	// Default 1s.
	ConnectTimeout time.Duration `toml:"connect_timeout"`
	// OpaquePorts skip protocol detection (still mTLS, authorization and TCP
	// metrics). Default: DefaultOpaquePorts. An empty list disables the
	// default list.
	OpaquePorts []uint16 `toml:"opaque_ports"`
	// DefaultPolicy authorizes inbound connections to services that do not
	// set their own policy. Default "all-unauthenticated" (Linkerd's).
	DefaultPolicy Policy `toml:"default_policy"`
	// RequestTimeout bounds each outbound HTTP request, from the request to
	// the end of the response body; a request that runs out of time gets 504
	// with l5d-proxy-error (or, if the response had begun, is cut). Default
	// 0: no timeout (Linkerd's default). Streams that outlive it are cut too,
	// so leave it 0 for long-lived gRPC streams.
	RequestTimeout time.Duration `toml:"request_timeout"`
	// MultiplexOpaque carries opaque (non-HTTP) connections to a peer as
	// streams (internal/mux) on pooled mTLS connections, up to 100 streams a
	// connection, instead of one mTLS connection each: no handshake per
	// connection and less memory per idle connection. Each direction ends
	// on its own (a FIN is a FIN, a reset a reset) and each stream has its
	// own 1 MiB window. Default true; false gives every opaque connection
	// its own mTLS connection.
	MultiplexOpaque bool `toml:"multiplex_opaque"`
	// OutboundUnknown says what to do with outbound connections to addresses
	// the mesh does not know: "passthrough" (default) or "deny".
	OutboundUnknown string `toml:"outbound_unknown"`
	// ClientIdentity names one of this host's services whose SVID the
	// outbound proxy presents to peers (spiffe://td/svc/<name>), so that
	// peers can authorize this host by service. Default "": the node SVID
	// (spiffe://td/node/<name>).
	ClientIdentity string `toml:"client_identity"`
	// VIPRange holds the services' virtual IPs (package names): a
	// connection to VIP:port is a connection to the service, balanced over
	// its endpoints. It must not overlap a real network. Default
	// 240.0.0.0/4 (class E, as Consul and Kuma use).
	VIPRange netip.Prefix `toml:"vip_range"`
}

// DefaultConfig returns a fresh proxy configuration with every default set.
func DefaultConfig() Config {
	return Config{
		OutboundAddr:    netip.MustParseAddrPort("127.0.0.1:4140"),
		InboundAddr:     netip.MustParseAddrPort("0.0.0.0:4143"),
		DetectTimeout:   10 * time.Second,
		ConnectTimeout:  time.Second,
		OpaquePorts:     DefaultOpaquePorts(),
		DefaultPolicy:   PolicyAllUnauthenticated,
		OutboundUnknown: "passthrough",
		MultiplexOpaque: true,
		VIPRange:        netip.MustParsePrefix("240.0.0.0/4"),
	}
}

// Validate checks c without changing it. Keys are relative to [proxy].
func (c *Config) Validate() error {
	var errs field.List
	if c == nil {
		return nil
	}
	switch {
	case !c.OutboundAddr.IsValid() || c.OutboundAddr.Port() == 0:
		errs.Add("outbound_addr", "must be an address with a non-zero port, e.g. 127.0.0.1:4140")
	}
	switch {
	case !c.InboundAddr.IsValid() || c.InboundAddr.Port() == 0:
		errs.Add("inbound_addr", "must be an address with a non-zero port, e.g. 0.0.0.0:4143")
	}
	switch {
	case c.DetectTimeout <= 0:
		errs.Add("detect_timeout", "must be positive, e.g. \"10s\"")
	case c.DetectTimeout > 5*time.Minute:
		errs.Add("detect_timeout", "must be at most 5m, got %s", c.DetectTimeout)
	}
	if c.ConnectTimeout <= 0 {
		errs.Add("connect_timeout", "must be positive, e.g. \"1s\"")
	}
	if c.RequestTimeout < 0 {
		errs.Add("request_timeout", "must not be negative (0 means no timeout), got %s", c.RequestTimeout)
	}
	switch {
	case !c.VIPRange.IsValid():
		errs.Add("vip_range", "must be a CIDR prefix, e.g. \"240.0.0.0/4\"")
	case c.VIPRange.Addr().BitLen()-c.VIPRange.Bits() < 8:
		errs.Add("vip_range", "must hold at least 256 addresses, got %s", c.VIPRange)
	case c.VIPRange.Addr().IsLoopback() || c.VIPRange.Contains(netip.MustParseAddr("127.0.0.1")):
		errs.Add("vip_range", "must not be loopback, got %s", c.VIPRange)
	}
	for i, p := range c.OpaquePorts {
		if p == 0 {
			errs.Add("opaque_ports", "entry %d: port 0 is not a port", i+1)
		}
	}
	if !c.DefaultPolicy.Valid() {
		errs.Add("default_policy", "unknown policy %q (want all-unauthenticated, all-authenticated, deny or audit)", c.DefaultPolicy)
	}
	switch c.OutboundUnknown {
	case "passthrough", "deny":
	default:
		errs.Add("outbound_unknown", "must be \"passthrough\" or \"deny\", got %q", c.OutboundUnknown)
	}
	return errs.Err()
}
