package bench

import (
	"fmt"
	"net/netip"
	"strings"
)

// TrustDomain is the bench mesh's trust domain.
const TrustDomain = "bench.local"

// AgentConfig describes one benchmark host's vmesh agent.
type AgentConfig struct {
	Name    string
	Addr    netip.Addr // the host's address, advertised to gossip
	DataDir string
	Socket  string // control socket (per host: the file system is shared)
	// KeyFile holds the gossip encryption key; "" means unencrypted.
	KeyFile string
	// Join lists the hosts to join.
	Join []netip.Addr
	// CAServer makes this host hold the CA (made by `vmesh ca init` in
	// CADir); otherwise Token is its one-time join token.
	CAServer bool
	CADir    string
	Token    string
	// Services are declared on this host.
	Services []Service
	// MultiplexOpaque, when set, sets proxy.multiplex_opaque; nil keeps
	// the shipped default.
	MultiplexOpaque *bool
}

// TOML renders the agent's configuration file. Only what differs from the
// defaults is set: the numbers are for vmesh as shipped.
func (a AgentConfig) TOML() string {
	var b strings.Builder
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	fmt.Fprintf(&b, "[node]\nname = %s\ndata_dir = %s\nlog_level = \"warn\"\n\n", q(a.Name), q(a.DataDir))
	fmt.Fprintf(&b, "[admin]\nsocket = %s\n\n", q(a.Socket))
	var join []string
	for _, j := range a.Join {
		join = append(join, q(j.String()))
	}
	fmt.Fprintf(&b, "[gossip]\nadvertise_addr = %s\njoin = [%s]\nretry_interval = \"500ms\"\nkey_file = %s\n\n",
		q(a.Addr.String()), strings.Join(join, ", "), q(a.KeyFile))
	fmt.Fprintf(&b, "[ca]\ntrust_domain = %s\n", q(TrustDomain))
	if a.CADir != "" {
		fmt.Fprintf(&b, "dir = %s\n", q(a.CADir))
	}
	if a.CAServer {
		b.WriteString("role = \"server\"\n")
	} else {
		fmt.Fprintf(&b, "role = \"client\"\ntoken = %s\n", q(a.Token))
	}
	if a.MultiplexOpaque != nil {
		fmt.Fprintf(&b, "\n[proxy]\nmultiplex_opaque = %t\n", *a.MultiplexOpaque)
	}
	for _, s := range a.Services {
		proto := "auto"
		if s.Opaque {
			proto = "opaque"
		}
		fmt.Fprintf(&b, "\n[[service]]\nname = %s\nport = %d\nprotocol = %s\n", q(s.Name), s.Port, q(proto))
	}
	return b.String()
}
