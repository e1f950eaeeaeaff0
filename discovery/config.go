package discovery

import (
	"net/netip"
	"time"

	"github.com/vmesh/vmesh/internal/field"
)

// Config is the [gossip] section of the configuration.
type Config struct {
	// BindAddr is the address memberlist listens on, TCP and UDP.
	// Default 0.0.0.0:7946.
	BindAddr netip.AddrPort `toml:"bind_addr"`
	// AdvertiseAddr is the address other hosts use to reach this one and
	// the address its services are published under. Default: the first
	// non-loopback address of the host (or BindAddr's address when set).
	AdvertiseAddr netip.Addr `toml:"advertise_addr"`
	// Join lists hosts ("ip" or "ip:port") to join at start. Joining is
	// retried in the background; known peers from earlier runs are tried too.
	Join []string `toml:"join"`
	// RetryInterval is the pause between join attempts while no peer has
	// been reached. Default 5s.
	RetryInterval time.Duration `toml:"retry_interval"`
	// KeyFile holds the cluster's gossip encryption keys (base64, one per
	// line, the first is used for sending). Create one with `vmesh keygen`.
	// Empty means unencrypted gossip, which the agent refuses unless
	// Insecure is set (or it runs with -dev).
	KeyFile string `toml:"key_file"`
	// Insecure lets the agent run with unencrypted gossip (no KeyFile):
	// anyone who can reach the gossip port can then join the cluster and
	// read its catalog. Default false. `vmesh check` flags it.
	Insecure bool `toml:"insecure"`
	// PushPullInterval is how often full state is exchanged with a random
	// peer. Default 30s.
	PushPullInterval time.Duration `toml:"push_pull_interval"`
}

// DefaultConfig returns a fresh discovery configuration with every default set.
func DefaultConfig() Config {
	return Config{
		BindAddr:         netip.MustParseAddrPort("0.0.0.0:7946"),
		RetryInterval:    5 * time.Second,
		PushPullInterval: 30 * time.Second,
	}
}

// Validate checks c without changing it. Keys are relative to [gossip].
func (c *Config) Validate() error {
	if c == nil {
		return nil
	}
	var errs field.List
	if !c.BindAddr.IsValid() {
		errs.Add("bind_addr", "must be an address with a port, e.g. 0.0.0.0:7946")
	}
	for i, j := range c.Join {
		if _, err := netip.ParseAddrPort(j); err == nil {
			continue
		}
		if _, err := netip.ParseAddr(j); err == nil {
			continue
		}
		errs.Add("join", "entry %d: %q is not an ip or ip:port", i+1, j)
	}
	if c.RetryInterval <= 0 {
		errs.Add("retry_interval", "must be positive, e.g. \"5s\"")
	}
	if c.PushPullInterval <= 0 {
		errs.Add("push_pull_interval", "must be positive, e.g. \"30s\"")
	}
	return errs.Err()
}
