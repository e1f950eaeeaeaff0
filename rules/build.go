package rules

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Chains vmesh owns in the nat table. Every chain whose name starts with
// ChainPrefix is vmesh's: Cleanup removes any it finds.
const (
	ChainPrefix   = "VMESH_"
	InboundChain  = "VMESH_INBOUND"
	OutboundChain = "VMESH_OUTPUT"
	// DNSChain redirects the host's DNS queries (udp and tcp port 53) to
	// the agent's DNS server, when capture is on.
	DNSChain = "VMESH_DNS"
	// CommentPrefix starts the comment of every rule vmesh writes.
	CommentPrefix = "vmesh/"
	// Table is the only table vmesh writes.
	Table = "nat"
)

// Default proxy ports, used when State leaves them zero.
const (
	DefaultInboundPort  = 4143
	DefaultOutboundPort = 4140
)

// maxMultiport is how many ports one -m multiport match takes.
const maxMultiport = 15

// State is everything Build needs to know about the host.
type State struct {
	// InboundPort is the inbound proxy's port, target of the PREROUTING
	// redirect. Zero means DefaultInboundPort.
	InboundPort uint16
	// OutboundPort is the outbound proxy's port, target of the OUTPUT
	// redirect. Zero means DefaultOutboundPort.
	OutboundPort uint16
	// OwnPorts are vmesh's other ports (admin, CA, gossip): never redirected
	// in either direction. The two proxy ports are added by Build.
	OwnPorts []uint16
	// ServicePorts are the local services' declared ports: inbound traffic to
	// them goes to the inbound proxy.
	ServicePorts []uint16
	// CaptureAllInbound redirects every inbound TCP port instead of only the
	// service ports (skip ports and own ports still excepted).
	CaptureAllInbound bool
	// SkipInboundPorts are never redirected inbound (22 by configuration
	// default; Build does not add it itself).
	SkipInboundPorts []uint16
	// SkipOutboundPorts are never redirected outbound.
	SkipOutboundPorts []uint16
	// ExcludeOutboundCIDRs are destinations never redirected outbound. Each
	// goes to the rules of its family.
	ExcludeOutboundCIDRs []netip.Prefix
	// VIPRanges hold the services' virtual IPs: always redirected outbound
	// (the agent routes them via loopback, which is otherwise exempt). Each
	// goes to the rules of its family.
	VIPRanges []netip.Prefix
	// ProxyUID is the uid vmesh runs as: its traffic is never redirected.
	ProxyUID uint32
	// ProxyGID, when >= 0, also exempts traffic of that gid. Negative: none.
	ProxyGID int
	// NoUIDExemption drops the ProxyUID rule: a root agent exempts its own
	// connections by ProxyMark only, so root's other programs stay meshed.
	NoUIDExemption bool
	// ProxyMark, when non-zero, exempts packets with this firewall mark: the
	// proxy sets it (SO_MARK) on the connections it opens.
	ProxyMark uint32
	// DNSPort, when non-zero, captures the host's DNS: queries to any
	// address's port 53 (udp and tcp) go to this port on loopback, where
	// the agent answers (its own queries, marked or of its uid, are
	// exempt). DNSv6 captures IPv6 queries too (the agent serves on ::1).
	DNSPort uint16
	DNSv6   bool
}

// Rule is one nat-table rule: the chain it is appended to and its arguments
// in the order `iptables -S` prints them (so that what vmesh reads back
// compares equal to what it wrote).
type Rule struct {
	Chain string
	Args  []string
}

// String returns the rule as `iptables -S` prints it.
func (r Rule) String() string {
	var b strings.Builder
	b.WriteString("-A ")
	b.WriteString(r.Chain)
	for i, a := range r.Args {
		b.WriteByte(' ')
		if i > 0 && r.Args[i-1] == "--comment" {
			b.WriteString(strconv.Quote(a))
			continue
		}
		b.WriteString(a)
	}
	return b.String()
}

// Comment returns the rule's vmesh/ comment, or "".
func (r Rule) Comment() string { return comment(r.Args) }

// Rules is the nat table of one family as vmesh wants it: the chains it
// owns and every rule it adds, in its own chains and in built-in ones.
type Rules struct {
	// Chains vmesh owns, in creation order.
	Chains []string
	// Rules in order; rules of one chain keep their relative order.
	Rules []Rule
}

// Ruleset is what vmesh installs: the nat rules for iptables and for
// ip6tables. Build returns it; the Applier installs it. A nil *Ruleset means
// "no vmesh rules at all".
type Ruleset struct {
	IPv4 Rules
	IPv6 Rules
}

// Build returns the rule set for s. It is pure: the same State always gives
// the same rules.
func Build(s State) *Ruleset {
	return &Ruleset{IPv4: build(s, false), IPv6: build(s, true)}
}

func build(s State, v6 bool) Rules {
	in, out := s.InboundPort, s.OutboundPort
	if in == 0 {
		in = DefaultInboundPort
	}
	if out == 0 {
		out = DefaultOutboundPort
	}
	own := append(slices.Clone(s.OwnPorts), in, out)
	var rs Rules
	rs.Chains = []string{InboundChain, OutboundChain}
	add := func(chain, name string, args ...string) {
		rs.Rules = append(rs.Rules, Rule{Chain: chain, Args: tagged(name, args)})
	}

	// Inbound: only traffic addressed to this host, never own or skip ports,
	// and never to loopback: a neighbour can send to 127.0.0.1 through this
	// host's MAC, and PREROUTING sees the packet before the kernel drops it
	// as a martian; redirected, it would reach loopback-only services.
	loopback := "127.0.0.0/8"
	if v6 {
		loopback = "::1/128"
	}
	add(InboundChain, "in-loopback", "-d", loopback, "-j", "RETURN")
	notInbound := ports(own, s.SkipInboundPorts)
	if s.CaptureAllInbound {
		for i, chunk := range chunks(notInbound) {
			add(InboundChain, numbered("in-skip", i), "-p", "tcp", "-m", "multiport", "--dports", chunk, "-j", "RETURN")
		}
		add(InboundChain, "in-redirect", "-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "REDIRECT", "--to-ports", itoa(in))
	} else {
		svc := without(ports(s.ServicePorts), notInbound)
		for i, chunk := range chunks(svc) {
			add(InboundChain, numbered("in-redirect", i), "-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL", "-m", "multiport", "--dports", chunk, "-j", "REDIRECT", "--to-ports", itoa(in))
		}
	}

	// The agent's own traffic (its mark, its uid or gid) is never
	// redirected: the exemptions head each of our outbound chains.
	exempt := func(chain, prefix string) {
		if s.ProxyMark != 0 {
			add(chain, prefix+"-mark", "-m", "mark", "--mark", "0x"+strconv.FormatUint(uint64(s.ProxyMark), 16), "-j", "RETURN")
		}
		if !s.NoUIDExemption {
			add(chain, prefix+"-uid", "-m", "owner", "--uid-owner", strconv.FormatUint(uint64(s.ProxyUID), 10), "-j", "RETURN")
		}
		if s.ProxyGID >= 0 {
			add(chain, prefix+"-gid", "-m", "owner", "--gid-owner", strconv.Itoa(s.ProxyGID), "-j", "RETURN")
		}
	}

	// Outbound: the exemptions live in our own chain, never in OUTPUT itself
	// (a RETURN there would skip Docker's DNS DNAT that follows it).
	exempt(OutboundChain, "out")
	for i, p := range prefixes(s.VIPRanges, v6) {
		add(OutboundChain, numbered("out-vip", i), "-d", p.String(), "-p", "tcp", "-j", "REDIRECT", "--to-ports", itoa(out))
	}
	add(OutboundChain, "out-lo", "-o", "lo", "-j", "RETURN")
	add(OutboundChain, "out-local", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "RETURN")
	for i, chunk := range chunks(ports(own, s.SkipOutboundPorts)) {
		add(OutboundChain, numbered("out-skip", i), "-p", "tcp", "-m", "multiport", "--dports", chunk, "-j", "RETURN")
	}
	for i, p := range prefixes(s.ExcludeOutboundCIDRs, v6) {
		add(OutboundChain, numbered("out-exclude", i), "-d", p.String(), "-j", "RETURN")
	}
	add(OutboundChain, "out-redirect", "-p", "tcp", "-j", "REDIRECT", "--to-ports", itoa(out))

	// DNS capture: its own chain, with the same exemptions, jumped to
	// from the top of OUTPUT (see JumpFirst: Docker's embedded DNS DNATs
	// 127.0.0.11:53 in OUTPUT, and a NAT target ends the chain).
	dns := s.DNSPort != 0 && (!v6 || s.DNSv6)
	if dns {
		rs.Chains = append(rs.Chains, DNSChain)
		exempt(DNSChain, "dns")
		add(DNSChain, "dns-udp", "-p", "udp", "-j", "REDIRECT", "--to-ports", itoa(s.DNSPort))
		add(DNSChain, "dns-tcp", "-p", "tcp", "-j", "REDIRECT", "--to-ports", itoa(s.DNSPort))
	}

	// Jumps from the built-in chains come last: Apply fills the chains
	// before it points traffic at them.
	add("PREROUTING", "prerouting", "-p", "tcp", "-j", InboundChain)
	add("OUTPUT", "output", "-p", "tcp", "-j", OutboundChain)
	if dns {
		add("OUTPUT", "output-dns-udp", "-p", "udp", "-m", "udp", "--dport", "53", "-j", DNSChain)
		add("OUTPUT", "output-dns-tcp", "-p", "tcp", "-m", "tcp", "--dport", "53", "-j", DNSChain)
	}
	return rs
}

// JumpFirst reports whether a rule of a built-in chain must come before
// every other rule there (the plan inserts it at the top, not appends it):
// the DNS capture jumps, which must see queries before Docker's DNAT of
// its embedded resolver does.
func JumpFirst(r Rule) bool {
	return strings.HasPrefix(r.Comment(), CommentPrefix+"output-dns-")
}

// tagged inserts the rule's comment before its target, where iptables -S
// prints it.
func tagged(name string, args []string) []string {
	j := slices.Index(args, "-j")
	out := make([]string, 0, len(args)+4)
	out = append(out, args[:j]...)
	out = append(out, "-m", "comment", "--comment", CommentPrefix+name)
	return append(out, args[j:]...)
}

func numbered(name string, i int) string {
	if i == 0 {
		return name
	}
	return name + "-" + strconv.Itoa(i+1)
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }

// ports returns the union of lists, sorted, without duplicates or zero.
func ports(lists ...[]uint16) []uint16 {
	var all []uint16
	for _, l := range lists {
		for _, p := range l {
			if p != 0 {
				all = append(all, p)
			}
		}
	}
	slices.Sort(all)
	return slices.Compact(all)
}

func without(ps, drop []uint16) []uint16 {
	return slices.DeleteFunc(ps, func(p uint16) bool { return slices.Contains(drop, p) })
}

// chunks formats ps as multiport lists of at most maxMultiport ports.
func chunks(ps []uint16) []string {
	var out []string
	for c := range slices.Chunk(ps, maxMultiport) {
		s := make([]string, len(c))
		for i, p := range c {
			s[i] = itoa(p)
		}
		out = append(out, strings.Join(s, ","))
	}
	return out
}

// prefixes returns the masked prefixes of one family, sorted, deduplicated.
func prefixes(ps []netip.Prefix, v6 bool) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if !p.IsValid() || p.Addr().Is4() == v6 {
			continue
		}
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(out)
}

// comment returns the vmesh/ comment in args, or "".
func comment(args []string) string {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == "--comment" && strings.HasPrefix(args[i+1], CommentPrefix) {
			return args[i+1]
		}
	}
	return ""
}

// Equal reports whether r and o hold the same rules. Two nil rule sets are
// equal; nil never equals a non-nil one.
func (r *Ruleset) Equal(o *Ruleset) bool {
	if r == nil || o == nil {
		return r == o
	}
	return r.IPv4.equal(&o.IPv4) && r.IPv6.equal(&o.IPv6)
}

func (t *Rules) equal(o *Rules) bool {
	return slices.Equal(t.Chains, o.Chains) && slices.EqualFunc(t.Rules, o.Rules, func(a, b Rule) bool {
		return a.Chain == b.Chain && slices.Equal(a.Args, b.Args)
	})
}

// Clone returns a deep copy of r (nil for nil).
func (r *Ruleset) Clone() *Ruleset {
	if r == nil {
		return nil
	}
	return &Ruleset{IPv4: r.IPv4.clone(), IPv6: r.IPv6.clone()}
}

func (t Rules) clone() Rules {
	c := Rules{Chains: slices.Clone(t.Chains), Rules: make([]Rule, len(t.Rules))}
	for i, r := range t.Rules {
		c.Rules[i] = Rule{Chain: r.Chain, Args: slices.Clone(r.Args)}
	}
	return c
}

// Family returns the rules for IPv4 (v6 false) or IPv6.
func (r *Ruleset) Family(v6 bool) *Rules {
	if v6 {
		return &r.IPv6
	}
	return &r.IPv4
}

// String returns the rule set in iptables-save form, IPv4 then IPv6, each
// under a "# iptables" / "# ip6tables" header. A nil rule set is "".
func (r *Ruleset) String() string {
	if r == nil {
		return ""
	}
	var b strings.Builder
	b.WriteString("# iptables\n")
	r.IPv4.write(&b)
	b.WriteString("# ip6tables\n")
	r.IPv6.write(&b)
	return b.String()
}

// String returns one family's rules in iptables-save form.
func (t *Rules) String() string {
	var b strings.Builder
	t.write(&b)
	return b.String()
}

func (t *Rules) write(b *strings.Builder) {
	b.WriteString("*nat\n")
	for _, c := range t.Chains {
		b.WriteString(":" + c + " - [0:0]\n")
	}
	for _, r := range t.Rules {
		b.WriteString(r.String())
		b.WriteByte('\n')
	}
	b.WriteString("COMMIT\n")
}

// chainRules returns the rules of chain, in order.
func (t *Rules) chainRules(chain string) []Rule {
	var out []Rule
	for _, r := range t.Rules {
		if r.Chain == chain {
			out = append(out, r)
		}
	}
	return out
}
