package rules

import (
	"net/netip"

	"github.com/vmesh/vmesh/internal/field"
)

// Config is the [rules] section of the configuration.
type Config struct {
	// Enabled installs the redirect rules. Default true. With false the
	// proxy still runs; apps must then dial it explicitly.
	Enabled bool `toml:"enabled"`
	// CaptureAllInbound redirects every inbound TCP port (except skip ports
	// and vmesh's own) instead of only the declared service ports.
	// Default false.
	CaptureAllInbound bool `toml:"capture_all_inbound"`
	// SkipInboundPorts are never redirected inbound. Default [22] so that
	// SSH can never be locked out; an empty list removes even 22.
	SkipInboundPorts []uint16 `toml:"skip_inbound_ports"`
	// SkipOutboundPorts are never redirected outbound. Default [22]: SSH
	// to another mesh host goes direct (the mesh never carries it in
	// clear, so without this it would be refused as a mesh host's port
	// with no service).
	SkipOutboundPorts []uint16 `toml:"skip_outbound_ports"`
	// ExcludeOutboundCIDRs are destinations never redirected outbound.
	ExcludeOutboundCIDRs []netip.Prefix `toml:"exclude_outbound_cidrs"`
	// ProxyUID is the uid whose traffic is never redirected (the uid vmesh
	// runs as). Default -1: the agent's own uid at start-up — except root:
	// a root agent exempts its own connections by ProxyMark alone, so that
	// root's programs stay meshed.
	ProxyUID int `toml:"proxy_uid"`
	// ProxyGID, when >= 0, also exempts traffic of that gid. Default -1: off.
	ProxyGID int `toml:"proxy_gid"`
	// ProxyMark is the firewall mark (SO_MARK) the proxy puts on the
	// connections it opens; marked traffic is never redirected. Default
	// 0x4143; 0 turns it off (then only the uid exempts the proxy, and a
	// root agent must not run with proxy_uid = -1... see ProxyUID).
	ProxyMark uint32 `toml:"proxy_mark"`
	// OnStop is what happens to the rules when the agent stops:
	// "remove" (default, fail open: traffic flows unproxied) or "keep"
	// (fail closed: redirected traffic is refused until the agent returns).
	OnStop string `toml:"on_stop"`
	// IPv6 programs ip6tables too: "auto" (default: when the host has IPv6),
	// "on" or "off".
	IPv6 string `toml:"ipv6"`
	// Backend is the iptables backend: "auto" (default: the one that
	// already holds the host's rules, else that of the iptables on PATH),
	// "nft" or "legacy".
	Backend string `toml:"backend"`
}

// DefaultConfig returns a fresh rules configuration with every default set.
func DefaultConfig() Config {
	return Config{
		Enabled:           true,
		SkipInboundPorts:  []uint16{22},
		SkipOutboundPorts: []uint16{22},
		ProxyUID:          -1,
		ProxyGID:          -1,
		ProxyMark:         0x4143,
		OnStop:            "remove",
		IPv6:              "auto",
		Backend:           "auto",
	}
}

// Validate checks c without changing it. Keys are relative to [rules].
func (c *Config) Validate() error {
	if c == nil {
		return nil
	}
	var errs field.List
	for i, p := range c.SkipInboundPorts {
		if p == 0 {
			errs.Add("skip_inbound_ports", "entry %d: port 0 is not a port", i+1)
		}
	}
	for i, p := range c.SkipOutboundPorts {
		if p == 0 {
			errs.Add("skip_outbound_ports", "entry %d: port 0 is not a port", i+1)
		}
	}
	if c.ProxyUID < -1 {
		errs.Add("proxy_uid", "must be a uid or -1 for the agent's own, got %d", c.ProxyUID)
	}
	if c.ProxyGID < -1 {
		errs.Add("proxy_gid", "must be a gid or -1 for none, got %d", c.ProxyGID)
	}
	switch c.OnStop {
	case "remove", "keep":
	default:
		errs.Add("on_stop", "must be \"remove\" or \"keep\", got %q", c.OnStop)
	}
	switch c.IPv6 {
	case "auto", "on", "off":
	default:
		errs.Add("ipv6", "must be \"auto\", \"on\" or \"off\", got %q", c.IPv6)
	}
	switch c.Backend {
	case "auto", "nft", "legacy":
	default:
		errs.Add("backend", "must be \"auto\", \"nft\" or \"legacy\", got %q", c.Backend)
	}
	for i, p := range c.ExcludeOutboundCIDRs {
		if !p.IsValid() {
			errs.Add("exclude_outbound_cidrs", "entry %d: not a CIDR", i+1)
		}
	}
	return errs.Err()
}

// State returns base with this section's settings filled in: capture-all,
// skip ports, excluded CIDRs and the proxy uid/gid, where ProxyUID -1 becomes
// agentUID (the uid the agent runs as). base carries what other sections
// own: the proxy ports, vmesh's own ports and the service ports.
func (c *Config) State(base State, agentUID uint32) State {
	s := base
	s.CaptureAllInbound = c.CaptureAllInbound
	s.SkipInboundPorts = append([]uint16(nil), c.SkipInboundPorts...)
	s.SkipOutboundPorts = append([]uint16(nil), c.SkipOutboundPorts...)
	s.ExcludeOutboundCIDRs = append([]netip.Prefix(nil), c.ExcludeOutboundCIDRs...)
	s.ProxyUID = agentUID
	s.NoUIDExemption = c.ProxyUID < 0 && agentUID == 0 && c.ProxyMark != 0
	if c.ProxyUID >= 0 {
		s.ProxyUID = uint32(c.ProxyUID)
	}
	s.ProxyMark = c.ProxyMark
	s.ProxyGID = c.ProxyGID
	return s
}

// ApplierOptions returns the applier options this section sets (IPv6 and
// Backend); the caller adds its Logger.
func (c *Config) ApplierOptions() ApplierOptions {
	return ApplierOptions{IPv6: c.IPv6, Backend: c.Backend}
}
