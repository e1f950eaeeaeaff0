package rules

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// base is a typical host: own ports admin, CA, gossip; two services.
func base() State {
	return State{
		OwnPorts:         []uint16{4191, 4192, 7946},
		ServicePorts:     []uint16{8080, 6379},
		SkipInboundPorts: []uint16{22},
		ProxyUID:         2102,
		ProxyGID:         -1,
	}
}

func with(f func(*State)) State {
	s := base()
	f(&s)
	return s
}

const (
	outHead = `-A VMESH_OUTPUT -m owner --uid-owner 2102 -m comment --comment "vmesh/out-uid" -j RETURN
-A VMESH_OUTPUT -o lo -m comment --comment "vmesh/out-lo" -j RETURN
-A VMESH_OUTPUT -m addrtype --dst-type LOCAL -m comment --comment "vmesh/out-local" -j RETURN
`
	outSkipOwn = `-A VMESH_OUTPUT -p tcp -m multiport --dports 4140,4143,4191,4192,7946 -m comment --comment "vmesh/out-skip" -j RETURN
`
	outTail = `-A VMESH_OUTPUT -p tcp -m comment --comment "vmesh/out-redirect" -j REDIRECT --to-ports 4140
-A PREROUTING -p tcp -m comment --comment "vmesh/prerouting" -j VMESH_INBOUND
-A OUTPUT -p tcp -m comment --comment "vmesh/output" -j VMESH_OUTPUT
COMMIT
`
	head = "*nat\n:VMESH_INBOUND - [0:0]\n:VMESH_OUTPUT - [0:0]\n" + inLoopback4
	// inLoopback4 and inLoopback6 open every inbound chain: loopback
	// destinations from outside are never redirected.
	inLoopback4 = `-A VMESH_INBOUND -d 127.0.0.0/8 -m comment --comment "vmesh/in-loopback" -j RETURN
`
	inLoopback6 = `-A VMESH_INBOUND -d ::1/128 -m comment --comment "vmesh/in-loopback" -j RETURN
`
)

func TestBuildGolden(t *testing.T) {
	tests := []struct {
		name   string
		state  State
		v4, v6 string // v6 "" means same as v4
	}{
		{
			name:  "declared service ports",
			state: base(),
			v4: head +
				`-A VMESH_INBOUND -p tcp -m addrtype --dst-type LOCAL -m multiport --dports 6379,8080 -m comment --comment "vmesh/in-redirect" -j REDIRECT --to-ports 4143
` + outHead + outSkipOwn + outTail,
		},
		{
			name: "service ports that are skip or own ports are never redirected",
			state: with(func(s *State) {
				s.ServicePorts = []uint16{22, 4191, 8080, 8080, 7946, 4143}
			}),
			v4: head +
				`-A VMESH_INBOUND -p tcp -m addrtype --dst-type LOCAL -m multiport --dports 8080 -m comment --comment "vmesh/in-redirect" -j REDIRECT --to-ports 4143
` + outHead + outSkipOwn + outTail,
		},
		{
			name:  "no service ports: empty inbound chain",
			state: with(func(s *State) { s.ServicePorts = nil }),
			v4:    head + outHead + outSkipOwn + outTail,
		},
		{
			name: "capture all inbound skips ssh and own ports",
			state: with(func(s *State) {
				s.CaptureAllInbound = true
				s.SkipInboundPorts = []uint16{22, 5432}
			}),
			v4: head +
				`-A VMESH_INBOUND -p tcp -m multiport --dports 22,4140,4143,4191,4192,5432,7946 -m comment --comment "vmesh/in-skip" -j RETURN
-A VMESH_INBOUND -p tcp -m addrtype --dst-type LOCAL -m comment --comment "vmesh/in-redirect" -j REDIRECT --to-ports 4143
` + outHead + outSkipOwn + outTail,
		},
		{
			name: "capture all with ssh removed from skip list redirects 22",
			state: with(func(s *State) {
				s.CaptureAllInbound = true
				s.SkipInboundPorts = nil
			}),
			v4: head +
				`-A VMESH_INBOUND -p tcp -m multiport --dports 4140,4143,4191,4192,7946 -m comment --comment "vmesh/in-skip" -j RETURN
-A VMESH_INBOUND -p tcp -m addrtype --dst-type LOCAL -m comment --comment "vmesh/in-redirect" -j REDIRECT --to-ports 4143
` + outHead + outSkipOwn + outTail,
		},
		{
			name: "more than 15 ports split into multiport chunks",
			state: with(func(s *State) {
				s.ServicePorts = nil
				for p := uint16(9001); p <= 9017; p++ {
					s.ServicePorts = append(s.ServicePorts, p)
				}
				s.SkipOutboundPorts = []uint16{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}
			}),
			v4: head +
				`-A VMESH_INBOUND -p tcp -m addrtype --dst-type LOCAL -m multiport --dports 9001,9002,9003,9004,9005,9006,9007,9008,9009,9010,9011,9012,9013,9014,9015 -m comment --comment "vmesh/in-redirect" -j REDIRECT --to-ports 4143
-A VMESH_INBOUND -p tcp -m addrtype --dst-type LOCAL -m multiport --dports 9016,9017 -m comment --comment "vmesh/in-redirect-2" -j REDIRECT --to-ports 4143
` + outHead +
				`-A VMESH_OUTPUT -p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,4140,4143,4191,4192 -m comment --comment "vmesh/out-skip" -j RETURN
-A VMESH_OUTPUT -p tcp -m multiport --dports 7946 -m comment --comment "vmesh/out-skip-2" -j RETURN
` + outTail,
		},
		{
			name: "root agent: exempt by mark, not by uid",
			state: with(func(s *State) {
				s.ProxyUID = 0
				s.NoUIDExemption = true
				s.ProxyMark = 0x4143
				s.ServicePorts = []uint16{80}
			}),
			v4: head +
				`-A VMESH_INBOUND -p tcp -m addrtype --dst-type LOCAL -m multiport --dports 80 -m comment --comment "vmesh/in-redirect" -j REDIRECT --to-ports 4143
-A VMESH_OUTPUT -m mark --mark 0x4143 -m comment --comment "vmesh/out-mark" -j RETURN
-A VMESH_OUTPUT -o lo -m comment --comment "vmesh/out-lo" -j RETURN
-A VMESH_OUTPUT -m addrtype --dst-type LOCAL -m comment --comment "vmesh/out-local" -j RETURN
-A VMESH_OUTPUT -p tcp -m multiport --dports 4140,4143,4191,4192,7946 -m comment --comment "vmesh/out-skip" -j RETURN
` + outTail,
		},
		{
			name: "gid, other proxy ports, excluded CIDRs per family",
			state: with(func(s *State) {
				s.ProxyUID = 0
				s.ProxyGID = 998
				s.InboundPort = 15006
				s.OutboundPort = 15001
				s.OwnPorts = nil
				s.ServicePorts = []uint16{80}
				s.ExcludeOutboundCIDRs = []netip.Prefix{
					netip.MustParsePrefix("10.1.2.3/8"),
					netip.MustParsePrefix("fd00::/8"),
					netip.MustParsePrefix("169.254.169.254/32"),
					netip.MustParsePrefix("10.0.0.0/8"),
				}
			}),
			v4: head +
				`-A VMESH_INBOUND -p tcp -m addrtype --dst-type LOCAL -m multiport --dports 80 -m comment --comment "vmesh/in-redirect" -j REDIRECT --to-ports 15006
-A VMESH_OUTPUT -m owner --uid-owner 0 -m comment --comment "vmesh/out-uid" -j RETURN
-A VMESH_OUTPUT -m owner --gid-owner 998 -m comment --comment "vmesh/out-gid" -j RETURN
-A VMESH_OUTPUT -o lo -m comment --comment "vmesh/out-lo" -j RETURN
-A VMESH_OUTPUT -m addrtype --dst-type LOCAL -m comment --comment "vmesh/out-local" -j RETURN
-A VMESH_OUTPUT -p tcp -m multiport --dports 15001,15006 -m comment --comment "vmesh/out-skip" -j RETURN
-A VMESH_OUTPUT -d 10.0.0.0/8 -m comment --comment "vmesh/out-exclude" -j RETURN
-A VMESH_OUTPUT -d 169.254.169.254/32 -m comment --comment "vmesh/out-exclude-2" -j RETURN
-A VMESH_OUTPUT -p tcp -m comment --comment "vmesh/out-redirect" -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -m comment --comment "vmesh/prerouting" -j VMESH_INBOUND
-A OUTPUT -p tcp -m comment --comment "vmesh/output" -j VMESH_OUTPUT
COMMIT
`,
			v6: head +
				`-A VMESH_INBOUND -p tcp -m addrtype --dst-type LOCAL -m multiport --dports 80 -m comment --comment "vmesh/in-redirect" -j REDIRECT --to-ports 15006
-A VMESH_OUTPUT -m owner --uid-owner 0 -m comment --comment "vmesh/out-uid" -j RETURN
-A VMESH_OUTPUT -m owner --gid-owner 998 -m comment --comment "vmesh/out-gid" -j RETURN
-A VMESH_OUTPUT -o lo -m comment --comment "vmesh/out-lo" -j RETURN
-A VMESH_OUTPUT -m addrtype --dst-type LOCAL -m comment --comment "vmesh/out-local" -j RETURN
-A VMESH_OUTPUT -p tcp -m multiport --dports 15001,15006 -m comment --comment "vmesh/out-skip" -j RETURN
-A VMESH_OUTPUT -d fd00::/8 -m comment --comment "vmesh/out-exclude" -j RETURN
-A VMESH_OUTPUT -p tcp -m comment --comment "vmesh/out-redirect" -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -m comment --comment "vmesh/prerouting" -j VMESH_INBOUND
-A OUTPUT -p tcp -m comment --comment "vmesh/output" -j VMESH_OUTPUT
COMMIT
`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs := Build(tt.state)
			if d := cmp.Diff(tt.v4, rs.IPv4.String()); d != "" {
				t.Errorf("IPv4 rules (-want +got):\n%s", d)
			}
			v6 := tt.v6
			if v6 == "" {
				v6 = tt.v4
			}
			v6 = strings.Replace(v6, inLoopback4, inLoopback6, 1)
			if d := cmp.Diff(v6, rs.IPv6.String()); d != "" {
				t.Errorf("IPv6 rules (-want +got):\n%s", d)
			}
			if d := cmp.Diff("# iptables\n"+tt.v4+"# ip6tables\n"+v6, rs.String()); d != "" {
				t.Errorf("String (-want +got):\n%s", d)
			}
			if !Build(tt.state).Equal(rs) {
				t.Error("Build is not deterministic")
			}
		})
	}
}

// TestBuildInvariants checks, for every golden state, what must hold of any
// rule set: every rule tagged, no RETURN in a built-in chain, no multiport
// list longer than 15.
func TestBuildInvariants(t *testing.T) {
	states := []State{base(), with(func(s *State) { s.CaptureAllInbound = true }), {}}
	for _, s := range states {
		for _, v6 := range []bool{false, true} {
			for _, r := range Build(s).Family(v6).Rules {
				if !strings.HasPrefix(r.Comment(), CommentPrefix) {
					t.Errorf("untagged rule %s", r)
				}
				if isBuiltin(r.Chain) && !strings.HasPrefix(r.Args[len(r.Args)-1], ChainPrefix) {
					t.Errorf("rule in built-in chain is not a jump to a vmesh chain: %s", r)
				}
				for i, a := range r.Args {
					if a == "--dports" && strings.Count(r.Args[i+1], ",") >= maxMultiport {
						t.Errorf("multiport list over %d ports: %s", maxMultiport, r)
					}
				}
			}
		}
	}
}

func TestRulesetEqualClone(t *testing.T) {
	a := Build(base())
	c := a.Clone()
	if !a.Equal(c) || !c.Equal(a) {
		t.Fatal("clone differs from original")
	}
	c.IPv4.Rules[0].Args[0] = "-X"
	if a.Equal(c) {
		t.Fatal("changing a clone's rule changed nothing visible to Equal")
	}
	if a.IPv4.Rules[0].Args[0] == "-X" {
		t.Fatal("clone shares argument slices with the original")
	}
	if !Build(base()).Equal(a) {
		t.Fatal("original changed through its clone")
	}
	if a.Equal(nil) || !(*Ruleset)(nil).Equal(nil) || (*Ruleset)(nil).Clone() != nil {
		t.Fatal("nil handling wrong")
	}
	if Build(base()).Equal(Build(with(func(s *State) { s.ProxyUID = 1 }))) {
		t.Fatal("different uids compare equal")
	}
	if (*Ruleset)(nil).String() != "" {
		t.Fatal("nil rule set prints something")
	}
}

func TestConfigState(t *testing.T) {
	c := DefaultConfig()
	c.SkipOutboundPorts = []uint16{25}
	s := c.State(State{InboundPort: 4143, ServicePorts: []uint16{80}}, 1000)
	want := State{
		InboundPort:       4143,
		ServicePorts:      []uint16{80},
		SkipInboundPorts:  []uint16{22},
		SkipOutboundPorts: []uint16{25},
		ProxyUID:          1000,
		ProxyGID:          -1,
		ProxyMark:         0x4143,
	}
	if d := cmp.Diff(want, s, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); d != "" {
		t.Errorf("State (-want +got):\n%s", d)
	}
	// A root agent exempts itself by mark only; a non-root one by uid too.
	if st := c.State(State{}, 0); !st.NoUIDExemption {
		t.Error("root agent with a mark still exempts all of root's traffic")
	}
	c.ProxyMark = 0
	if st := c.State(State{}, 0); st.NoUIDExemption {
		t.Error("root agent without a mark has no exemption at all")
	}
	c.ProxyMark = 0x4143
	c.ProxyUID = 7
	if got := c.State(State{}, 1000).ProxyUID; got != 7 {
		t.Errorf("configured proxy uid 7 gave %d", got)
	}
	s.SkipInboundPorts[0] = 99
	if c.SkipInboundPorts[0] != 22 {
		t.Error("State shares the config's slices")
	}
	c.Backend = "iptables"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "backend") {
		t.Errorf("bad backend: got %v", err)
	}
}
