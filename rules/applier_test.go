package rules

import (
	"context"
	"errors"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// fakeApplier returns an Applier over two fakes (iptables, ip6tables) that
// already hold foreign rules.
func fakeApplier(t *testing.T, ipv6 string) (*Applier, *fakeIPT, *fakeIPT) {
	t.Helper()
	v4, v6 := newFakeIPT(), newFakeIPT()
	v4.addForeign()
	v6.addForeign()
	a, err := NewApplier(ApplierOptions{IPv6: ipv6, open: func(is6 bool) (iptablesAPI, error) {
		if is6 {
			return v6, nil
		}
		return v4, nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	return a, v4, v6
}

// transitionStates are configs between which the applier must converge.
func transitionStates() map[string]State {
	return map[string]State{
		"base":        base(),
		"capture-all": with(func(s *State) { s.CaptureAllInbound = true }),
		"no-services": with(func(s *State) { s.ServicePorts = nil }),
		"other-uid":   with(func(s *State) { s.ProxyUID = 999; s.ProxyGID = 998 }),
		"many-ports": with(func(s *State) {
			for p := uint16(9000); p < 9040; p++ {
				s.ServicePorts = append(s.ServicePorts, p)
				s.SkipOutboundPorts = append(s.SkipOutboundPorts, p+100)
			}
		}),
		"excludes": with(func(s *State) {
			s.ExcludeOutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("198.18.0.0/24"), netip.MustParsePrefix("fd00::/8")}
			s.SkipOutboundPorts = []uint16{25, 587}
		}),
		"other-ports": with(func(s *State) { s.InboundPort = 15006; s.OutboundPort = 15001 }),
		"nil":         {}, // stands for Apply(nil)
	}
}

// TestApplyTransitions applies configs in random order, several rounds,
// and checks after each: vmesh's rules are exactly the built ones, foreign
// rules are untouched, and applying again changes nothing.
func TestApplyTransitions(t *testing.T) {
	ctx := context.Background()
	a, v4, v6 := fakeApplier(t, "on")
	foreign4, foreign6 := v4.save(), v6.save()
	states := transitionStates()
	names := make([]string, 0, len(states))
	for n := range states {
		names = append(names, n)
	}
	slices.Sort(names)
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	for round := range 6 {
		rng.Shuffle(len(names), func(i, j int) { names[i], names[j] = names[j], names[i] })
		for _, n := range names {
			var rs *Ruleset
			if n != "nil" {
				rs = Build(states[n])
			}
			if err := a.Apply(ctx, rs); err != nil {
				t.Fatalf("round %d: applying %s: %v", round, n, err)
			}
			for _, f := range []struct {
				name    string
				fake    *fakeIPT
				foreign string
				want    *Rules
			}{{"iptables", v4, foreign4, nil}, {"ip6tables", v6, foreign6, nil}} {
				if rs != nil {
					f.want = rs.Family(f.fake == v6)
				}
				wantText := (&Rules{}).String()
				if f.want != nil {
					wantText = f.want.String()
				}
				if d := cmp.Diff(wantText, f.fake.vmeshOnly()); d != "" {
					t.Fatalf("round %d, after %s: %s vmesh rules (-want +got):\n%s", round, n, f.name, d)
				}
				if d := cmp.Diff(foreign(f.foreign), foreign(f.fake.save())); d != "" {
					t.Fatalf("round %d, after %s: %s foreign rules changed (-before +after):\n%s", round, n, f.name, d)
				}
			}
			if n == "nil" {
				if v4.save() != foreign4 || v6.save() != foreign6 {
					t.Fatalf("round %d: Apply(nil) left the table different from before install:\n%s", round, v4.save())
				}
			}
			c4, c6 := v4.changes, v6.changes
			if err := a.Apply(ctx, rs); err != nil {
				t.Fatal(err)
			}
			if v4.changes != c4 || v6.changes != c6 {
				t.Fatalf("round %d: re-applying %s made %d changes", round, n, v4.changes-c4+v6.changes-c6)
			}
			if diff, err := a.Installed(ctx, rs); err != nil || diff != "" {
				t.Fatalf("round %d: Installed after applying %s = %q, %v", round, n, diff, err)
			}
		}
	}
}

// foreign returns the lines of a save that are not vmesh's.
func foreign(save string) string {
	var out []string
	for _, l := range strings.Split(save, "\n") {
		if strings.Contains(l, CommentPrefix) || strings.Contains(l, ChainPrefix) {
			continue
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

// TestApplyKeepsExemptionDuringUIDChange: while a changed proxy uid is
// applied, there is never a moment when neither uid is exempted ahead of the
// redirect (the proxy's own dials would loop).
func TestApplyKeepsExemptionDuringUIDChange(t *testing.T) {
	ctx := context.Background()
	a, v4, _ := fakeApplier(t, "off")
	if err := a.Apply(ctx, Build(base())); err != nil {
		t.Fatal(err)
	}
	cur, err := readState(&family{name: "iptables", ipt: v4})
	if err != nil {
		t.Fatal(err)
	}
	next := Build(with(func(s *State) { s.ProxyUID = 3000 }))
	ops := plan(cur, &next.IPv4)
	var got []string
	for _, o := range ops {
		got = append(got, o.String())
	}
	want := []string{
		`-I VMESH_OUTPUT 1 -m owner --uid-owner 3000 -m comment --comment "vmesh/out-uid" -j RETURN`,
		`-D VMESH_OUTPUT 2`,
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Fatalf("plan for a uid change (-want +got):\n%s", d)
	}
}

func TestInstalledReportsDrift(t *testing.T) {
	ctx := context.Background()
	a, v4, _ := fakeApplier(t, "off")
	rs := Build(base())
	diff, err := a.Installed(ctx, rs)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(diff, "iptables: -N VMESH_OUTPUT") || !strings.Contains(diff, `iptables: -A OUTPUT -p tcp -m comment --comment "vmesh/output" -j VMESH_OUTPUT`) {
		t.Fatalf("diff before install lacks the chain or jump:\n%s", diff)
	}
	if err := a.Apply(ctx, rs); err != nil {
		t.Fatal(err)
	}
	// Someone deletes our jump, and a stray duplicate of it sits elsewhere.
	if err := v4.Delete(Table, "OUTPUT", "-p", "tcp", "-m", "comment", "--comment", "vmesh/output", "-j", "VMESH_OUTPUT"); err != nil {
		t.Fatal(err)
	}
	if err := v4.Append(Table, "POSTROUTING", "-m", "comment", "--comment", "vmesh/old", "-j", "RETURN"); err != nil {
		t.Fatal(err)
	}
	diff, err = a.Installed(ctx, rs)
	if err != nil {
		t.Fatal(err)
	}
	want := `iptables: -A OUTPUT -p tcp -m comment --comment "vmesh/output" -j VMESH_OUTPUT
iptables: -D POSTROUTING -m comment --comment "vmesh/old" -j RETURN
`
	if d := cmp.Diff(want, diff); d != "" {
		t.Fatalf("drift (-want +got):\n%s", d)
	}
	if err := a.Apply(ctx, rs); err != nil {
		t.Fatal(err)
	}
	if diff, _ := a.Installed(ctx, rs); diff != "" {
		t.Fatalf("not converged:\n%s", diff)
	}
}

// TestCleanupSweepsLeftovers: a crashed run left chains, duplicate jumps,
// rules of an older version and a probe chain; Cleanup removes exactly those.
func TestCleanupSweepsLeftovers(t *testing.T) {
	ctx := context.Background()
	a, v4, v6 := fakeApplier(t, "off") // IPv6 off: Cleanup still sweeps ip6tables
	before4, before6 := v4.save(), v6.save()
	for _, f := range []*fakeIPT{v4, v6} {
		for _, r := range Build(base()).IPv4.Rules {
			if !f.exists(r.Chain) {
				f.NewChain(Table, r.Chain)
			}
		}
		for _, r := range Build(base()).IPv4.Rules {
			if err := f.Append(Table, r.Chain, r.Args...); err != nil {
				t.Fatal(err)
			}
		}
		f.Append(Table, "OUTPUT", "-p", "tcp", "-m", "comment", "--comment", "vmesh/output", "-j", "VMESH_OUTPUT")
		f.NewChain(Table, "VMESH_OLD")
		f.Append(Table, "VMESH_OLD", "-j", "RETURN")
		f.Append(Table, "PREROUTING", "-j", "VMESH_OLD") // untagged jump to a vmesh chain
		f.ClearChain(Table, probeChain)
	}
	if err := a.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(before4, v4.save()); d != "" {
		t.Errorf("iptables after Cleanup (-before +after):\n%s", d)
	}
	if d := cmp.Diff(before6, v6.save()); d != "" {
		t.Errorf("ip6tables after Cleanup (-before +after):\n%s", d)
	}
}

func TestIPv6Modes(t *testing.T) {
	ctx := context.Background()
	for _, mode := range []string{"auto", "on", "off"} {
		a, v4, v6 := fakeApplier(t, mode)
		if err := a.Apply(ctx, Build(base())); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(v4.save(), "VMESH_OUTPUT") {
			t.Errorf("%s: no IPv4 rules", mode)
		}
		if got := strings.Contains(v6.save(), "VMESH_OUTPUT"); got != (mode != "off") {
			t.Errorf("ipv6 %s: ip6tables has vmesh rules: %v", mode, got)
		}
	}
	// No ip6tables at all: auto goes on without it, on fails.
	for _, mode := range []string{"auto", "on"} {
		v4 := newFakeIPT()
		a, _ := NewApplier(ApplierOptions{IPv6: mode, open: func(is6 bool) (iptablesAPI, error) {
			if is6 {
				return nil, ErrNoIptables
			}
			return v4, nil
		}})
		err := a.Apply(ctx, Build(base()))
		if mode == "auto" && err != nil {
			t.Errorf("auto without ip6tables: %v", err)
		}
		if mode == "on" && !errors.Is(err, ErrNoIptables) {
			t.Errorf("on without ip6tables: got %v, want ErrNoIptables", err)
		}
	}
	if _, err := NewApplier(ApplierOptions{IPv6: "yes"}); err == nil {
		t.Error("ipv6 \"yes\" accepted")
	}
}

// TestOwnerMatchMissing: without the owner match nothing is changed and the
// error says why.
func TestOwnerMatchMissing(t *testing.T) {
	ctx := context.Background()
	a, v4, _ := fakeApplier(t, "off")
	v4.failMatch = "owner"
	before := v4.save()
	err := a.Apply(ctx, Build(base()))
	if !errors.Is(err, ErrOwnerMatch) {
		t.Fatalf("got %v, want ErrOwnerMatch", err)
	}
	if !strings.Contains(err.Error(), "xt_owner") {
		t.Errorf("error does not say what to install: %v", err)
	}
	if v4.save() != before {
		t.Errorf("table changed despite the failed probe:\n%s", v4.save())
	}
}

func TestExplain(t *testing.T) {
	for msg, want := range map[string]error{
		"iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)":        ErrPermission,
		"iptables v1.8.7 (legacy): can't initialize iptables table `nat': Permission denied (you must be root)":            ErrPermission,
		"iptables v1.8.9 (nf_tables): Couldn't load match `owner':No such file or directory":                               ErrOwnerMatch,
		"iptables: Extension owner revision 0 not supported, missing kernel module?":                                       ErrOwnerMatch,
		"ip6tables v1.8.4 (legacy): can't initialize ip6tables table `nat': Table does not exist (do you need to insmod?)": ErrNoNAT,
	} {
		if err := explain(errors.New(msg)); !errors.Is(err, want) {
			t.Errorf("explain(%q) = %v, want %v", msg, err, want)
		}
	}
}

func TestSplitArgs(t *testing.T) {
	for line, want := range map[string][]string{
		`-A X -m comment --comment "vmesh/a b" -j RETURN`: {"-A", "X", "-m", "comment", "--comment", "vmesh/a b", "-j", "RETURN"},
		`-A X -m comment --comment vmesh/x -j RETURN`:     {"-A", "X", "-m", "comment", "--comment", "vmesh/x", "-j", "RETURN"},
		`-A X --comment "say \"hi\"" -j A`:                {"-A", "X", "--comment", `say "hi"`, "-j", "A"},
		`-A X --comment ""`:                               {"-A", "X", "--comment", ""},
	} {
		got, err := splitArgs(line)
		if err != nil {
			t.Fatal(err)
		}
		if d := cmp.Diff(want, got); d != "" {
			t.Errorf("splitArgs(%q) (-want +got):\n%s", line, d)
		}
	}
	if _, err := splitArgs(`-A X --comment "open`); err == nil {
		t.Error("unterminated quote accepted")
	}
}

// TestEditChain checks the chain edit against every pair of small rule
// lists: replaying its operations on cur must give want, and keeping
// unchanged rules in place is minimal (no operation for equal lists).
func TestEditChain(t *testing.T) {
	pool := [][]string{{"a"}, {"b"}, {"c"}, {"d"}}
	var lists [][][]string
	var gen func(prefix [][]string)
	gen = func(prefix [][]string) {
		lists = append(lists, slices.Clone(prefix))
		if len(prefix) == 4 {
			return
		}
		for _, r := range pool {
			gen(append(slices.Clone(prefix), r))
		}
	}
	gen(nil)
	for _, cur := range lists {
		for _, want := range lists {
			f := newFakeIPT()
			f.NewChain(Table, "VMESH_T")
			for _, r := range cur {
				f.Append(Table, "VMESH_T", r...)
			}
			ops := editChain("VMESH_T", cur, want)
			for _, o := range ops {
				if err := do(f, o); err != nil {
					t.Fatalf("%v -> %v: %s: %v", cur, want, o, err)
				}
			}
			if !slices.EqualFunc(f.rules["VMESH_T"], want, slices.Equal) {
				t.Fatalf("%v -> %v gave %v", cur, want, f.rules["VMESH_T"])
			}
			if slices.EqualFunc(cur, want, slices.Equal) && len(ops) != 0 {
				t.Fatalf("%v -> itself made %d changes", cur, len(ops))
			}
		}
	}
}

func TestChooseBackend(t *testing.T) {
	onPath := func() (string, error) { return "legacy", nil }
	for _, tc := range []struct {
		nft, legacy int
		want        string
	}{{10, 0, "nft"}, {0, 3, "legacy"}, {0, 0, "legacy"}, {5, 5, "legacy"}} {
		got, err := chooseBackend(tc.nft, tc.legacy, onPath)
		if err != nil || got != tc.want {
			t.Errorf("chooseBackend(%d, %d) = %q, %v; want %q", tc.nft, tc.legacy, got, err, tc.want)
		}
	}
	for v, want := range map[string]string{
		"iptables v1.8.9 (nf_tables)\n": "nft",
		"iptables v1.8.9 (legacy)\n":    "legacy",
		"iptables v1.6.1\n":             "legacy",
		"something else":                "",
	} {
		if got := modeFromVersion(v); got != want {
			t.Errorf("modeFromVersion(%q) = %q, want %q", v, got, want)
		}
	}
}
