package rules

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-iptables/iptables"
)

// Errors an Applier returns (wrapped, with the details and what to do);
// test them with errors.Is.
var (
	// ErrNoIptables: the iptables command of the chosen backend is missing.
	ErrNoIptables = errors.New("iptables is not installed (install the iptables package)")
	// ErrPermission: iptables refused for lack of privilege.
	ErrPermission = errors.New("iptables needs root or CAP_NET_ADMIN (iptables-legacy also needs CAP_NET_RAW)")
	// ErrOwnerMatch: the owner match, which keeps the proxy's own traffic
	// from being redirected back to it, is unavailable.
	ErrOwnerMatch = errors.New("the iptables owner match (-m owner) is unavailable: " +
		"the kernel needs xt_owner (CONFIG_NETFILTER_XT_MATCH_OWNER) and iptables its owner extension; " +
		"without it vmesh cannot tell its own traffic from the apps' and would loop")
	// ErrNoNAT: the kernel has no nat table for this family.
	ErrNoNAT = errors.New("the nat table is unavailable (kernel module iptable_nat / ip6table_nat, or nf_nat for nft)")
)

// iptablesAPI is the part of go-iptables the applier uses; tests put an
// in-memory fake behind it.
type iptablesAPI interface {
	ListChains(table string) ([]string, error)
	List(table, chain string) ([]string, error)
	NewChain(table, chain string) error
	ClearChain(table, chain string) error
	DeleteChain(table, chain string) error
	Insert(table, chain string, pos int, rulespec ...string) error
	Append(table, chain string, rulespec ...string) error
	Delete(table, chain string, rulespec ...string) error
	DeleteById(table, chain string, id int) error
}

var _ iptablesAPI = (*iptables.IPTables)(nil)

// ApplierOptions configure NewApplier. All fields are optional.
type ApplierOptions struct {
	// Logger receives what the applier changes. Nil: discard.
	Logger *slog.Logger
	// IPv6 is "auto" (or ""): program ip6tables when it works on this host;
	// "on": program it or fail; "off": never program it (vmesh rules found
	// there are still removed).
	IPv6 string
	// Backend is "auto" (or ""): the backend that already holds rules, else
	// the one of the `iptables` on PATH; or "nft", or "legacy".
	Backend string
	// LockWait bounds the wait for the xtables lock. Zero: 10 s.
	LockWait time.Duration

	// open replaces backend detection in tests: it returns the iptables of
	// one family.
	open func(v6 bool) (iptablesAPI, error)
}

// Applier installs, converges and removes a Ruleset. Its methods are safe
// for concurrent use; they serialise.
type Applier struct {
	opts ApplierOptions
	log  *slog.Logger

	mu      sync.Mutex
	ready   bool
	backend string    // "nft" or "legacy", once detected
	fams    []*family // iptables, then ip6tables if present
	probed  bool      // owner match known to work
}

// family is the nat table of one IP family on the chosen backend.
type family struct {
	name    string // "iptables" or "ip6tables"
	v6      bool
	ipt     iptablesAPI
	program bool // install rules here (else only remove vmesh's)
	strict  bool // errors here fail the call (else they are logged)
}

// NewApplier checks opts and returns an Applier. It runs nothing: the
// backend is detected on first use.
func NewApplier(opts ApplierOptions) (*Applier, error) {
	switch opts.IPv6 {
	case "", "auto", "on", "off":
	default:
		return nil, fmt.Errorf("creating rules applier: ipv6 must be auto, on or off, got %q", opts.IPv6)
	}
	switch opts.Backend {
	case "", "auto", "nft", "legacy":
	default:
		return nil, fmt.Errorf("creating rules applier: backend must be auto, nft or legacy, got %q", opts.Backend)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &Applier{opts: opts, log: log.With("component", "rules")}, nil
}

func (a *Applier) lockWait() time.Duration {
	if a.opts.LockWait > 0 {
		return a.opts.LockWait
	}
	return 10 * time.Second
}

func (a *Applier) ipv6Mode() string {
	if a.opts.IPv6 == "" {
		return "auto"
	}
	return a.opts.IPv6
}

// Backend returns "nft" or "legacy" once the applier has been used, or "".
func (a *Applier) Backend() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.backend
}

// Apply makes the nat tables hold exactly rs's vmesh rules: it reads what is
// there and changes only the difference, so applying the same rule set again
// changes nothing. Rules that are not vmesh's are never touched. A nil rs
// removes every vmesh rule and chain.
func (a *Applier) Apply(ctx context.Context, rs *Ruleset) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.init(ctx); err != nil {
		return err
	}
	var errs []error
	for _, f := range a.fams {
		var want *Rules
		if rs != nil && f.program {
			want = rs.Family(f.v6)
		}
		if err := a.converge(ctx, f, want); err != nil {
			if !f.strict {
				a.log.Warn("removing vmesh rules failed", "family", f.name, "err", err)
				continue
			}
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Uninstall removes every vmesh rule and chain, and nothing else.
func (a *Applier) Uninstall(ctx context.Context) error { return a.Apply(ctx, nil) }

// Cleanup sweeps what a crashed run left behind: vmesh chains and tagged
// rules in both families, whatever the IPv6 setting, and also in the other
// backend (nft or legacy) if it holds any.
func (a *Applier) Cleanup(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.init(ctx); err != nil {
		return err
	}
	var errs []error
	for _, f := range a.fams {
		if err := a.converge(ctx, f, nil); err != nil {
			errs = append(errs, err)
		}
	}
	if a.opts.open == nil {
		other := "legacy"
		if a.backend == "legacy" {
			other = "nft"
		}
		for _, v6 := range []bool{false, true} {
			f, err := leftoversIn(ctx, other, v6, a.lockWait())
			if err != nil {
				errs = append(errs, err)
			}
			if f == nil {
				continue
			}
			a.log.Info("sweeping vmesh rules from the other backend", "backend", other, "family", f.name)
			if err := a.converge(ctx, f, nil); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// Installed compares the host's nat tables with want. It returns "" when
// they are current (vmesh check: "rules installed and current"), or the
// changes Apply would make, one per line ("iptables: -A VMESH_OUTPUT ...").
func (a *Applier) Installed(ctx context.Context, want *Ruleset) (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.init(ctx); err != nil {
		return "", err
	}
	var b strings.Builder
	for _, f := range a.fams {
		var w *Rules
		if want != nil && f.program {
			w = want.Family(f.v6)
		}
		cur, err := readState(f)
		if err != nil {
			if !f.strict {
				continue
			}
			return "", err
		}
		for _, o := range plan(cur, w) {
			fmt.Fprintf(&b, "%s: %s\n", f.name, o)
		}
	}
	return b.String(), nil
}

// converge applies the plan from f's current state to want.
func (a *Applier) converge(ctx context.Context, f *family, want *Rules) error {
	cur, err := readState(f)
	if err != nil {
		return err
	}
	ops := plan(cur, want)
	if len(ops) == 0 {
		a.log.Debug("rules current", "family", f.name)
		return nil
	}
	if want != nil && !a.probed {
		if err := probeOwner(f); err != nil {
			return err
		}
		a.probed = true
	}
	for _, o := range ops {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("applying %s rules: %w", f.name, err)
		}
		a.log.Debug("rules change", "family", f.name, "op", o.String())
		if err := do(f.ipt, o); err != nil {
			return fmt.Errorf("applying %s rules: %s: %w", f.name, o, explain(err))
		}
	}
	a.log.Info("rules changed", "family", f.name, "changes", len(ops), "removed_all", want == nil)
	return nil
}

func do(ipt iptablesAPI, o op) error {
	switch o.kind {
	case opNewChain:
		return ipt.NewChain(Table, o.chain)
	case opInsert:
		return ipt.Insert(Table, o.chain, o.pos, o.args...)
	case opAppend:
		return ipt.Append(Table, o.chain, o.args...)
	case opDeleteAt:
		return ipt.DeleteById(Table, o.chain, o.pos)
	case opDelete:
		return ipt.Delete(Table, o.chain, o.args...)
	case opFlush:
		return ipt.ClearChain(Table, o.chain)
	case opDeleteChain:
		return ipt.DeleteChain(Table, o.chain)
	}
	return fmt.Errorf("unknown operation %d", o.kind)
}

// readState reads the chains and the rules vmesh cares about.
func readState(f *family) (natState, error) {
	chains, err := f.ipt.ListChains(Table)
	if err != nil {
		return natState{}, fmt.Errorf("reading %s nat table: %w", f.name, explain(err))
	}
	st := natState{chains: chains, rules: map[string][][]string{}}
	for _, c := range chains {
		if !strings.HasPrefix(c, ChainPrefix) && !isBuiltin(c) {
			continue
		}
		lines, err := f.ipt.List(Table, c)
		if err != nil {
			return natState{}, fmt.Errorf("reading %s nat chain %s: %w", f.name, c, explain(err))
		}
		if st.rules[c], err = parseRules(lines, c); err != nil {
			return natState{}, fmt.Errorf("reading %s nat chain %s: %w", f.name, c, err)
		}
	}
	return st, nil
}

func isBuiltin(c string) bool {
	for _, b := range builtinChains {
		if b == c {
			return true
		}
	}
	return false
}

// probeChain is a scratch chain for probing; a leftover is swept like any
// vmesh chain.
const probeChain = ChainPrefix + "PROBE"

// probeOwner checks that an owner-match rule can be added, in a scratch
// chain no traffic reaches, so that a missing match is explained before any
// real rule changes.
func probeOwner(f *family) error {
	if err := f.ipt.ClearChain(Table, probeChain); err != nil {
		return fmt.Errorf("probing %s: creating chain %s: %w", f.name, probeChain, explain(err))
	}
	perr := f.ipt.Append(Table, probeChain, "-m", "owner", "--uid-owner", "0",
		"-m", "comment", "--comment", CommentPrefix+"probe", "-j", "RETURN")
	if err := f.ipt.ClearChain(Table, probeChain); err != nil && perr == nil {
		perr = err
	}
	if err := f.ipt.DeleteChain(Table, probeChain); err != nil && perr == nil {
		perr = err
	}
	if perr != nil {
		err := explain(perr)
		if !errors.Is(err, ErrPermission) && !errors.Is(err, ErrNoNAT) {
			err = fmt.Errorf("%w: %w", ErrOwnerMatch, perr)
		}
		return fmt.Errorf("probing %s for the owner match: %w", f.name, err)
	}
	return nil
}

// explain wraps err with the sentinel that says what is wrong, when its
// message shows it.
func explain(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	has := func(subs ...string) bool {
		for _, s := range subs {
			if strings.Contains(msg, s) {
				return true
			}
		}
		return false
	}
	switch {
	case has("Permission denied", "must be root", "Operation not permitted"):
		return fmt.Errorf("%w: %w", ErrPermission, err)
	case has("match `owner'", "match \"owner\"", "Extension owner", "owner revision"):
		return fmt.Errorf("%w: %w", ErrOwnerMatch, err)
	case has("Table does not exist", "can't initialize iptables table `nat'"):
		return fmt.Errorf("%w: %w", ErrNoNAT, err)
	}
	return err
}

// init detects the backend and opens the families, once.
func (a *Applier) init(ctx context.Context) error {
	if a.ready {
		return nil
	}
	mode := a.ipv6Mode()
	open := a.opts.open
	if open == nil {
		be, err := detectBackend(ctx, a.opts.Backend)
		if err != nil {
			return err
		}
		a.backend = be
		wait := a.lockWait()
		open = func(v6 bool) (iptablesAPI, error) { return openBackend(be, v6, wait) }
	} else {
		a.backend = "fake"
	}
	v4, err := open(false)
	if err != nil {
		return err
	}
	fams := []*family{{name: "iptables", ipt: v4, program: true, strict: true}}
	f6 := &family{name: "ip6tables", v6: true, program: mode != "off", strict: mode == "on"}
	f6.ipt, err = open(true)
	if err == nil {
		// The family works only if its nat table can be read.
		_, err = f6.ipt.ListChains(Table)
		if err != nil {
			err = fmt.Errorf("reading ip6tables nat table: %w", explain(err))
		}
	}
	switch {
	case err == nil:
		fams = append(fams, f6)
	case mode == "on":
		return fmt.Errorf("enabling IPv6 rules (ipv6 = \"on\"): %w", err)
	default:
		a.log.Info("ip6tables not used", "ipv6", mode, "reason", err)
	}
	a.fams = fams
	a.ready = true
	a.log.Info("rules backend", "backend", a.backend, "ipv6", len(fams) == 2 && f6.program)
	return nil
}

// binaries returns the commands of a backend for one family, in order of
// preference.
func binaries(backend string, v6 bool) []string {
	base := "iptables"
	if v6 {
		base = "ip6tables"
	}
	if backend == "legacy" {
		return []string{base + "-legacy", base}
	}
	return []string{base + "-nft", base}
}

// openBackend returns the iptables of one family on backend: its specific
// binary (iptables-nft, iptables-legacy) or a plain iptables in that mode.
func openBackend(backend string, v6 bool, wait time.Duration) (iptablesAPI, error) {
	proto := iptables.ProtocolIPv4
	if v6 {
		proto = iptables.ProtocolIPv6
	}
	var tried []string
	for _, bin := range binaries(backend, v6) {
		path, err := exec.LookPath(bin)
		if err != nil {
			tried = append(tried, bin)
			continue
		}
		if !strings.Contains(bin, "-") && modeOf(path) != backend {
			tried = append(tried, bin+" (not "+backend+")")
			continue
		}
		ipt, err := iptables.New(iptables.Path(path), iptables.IPFamily(proto), iptables.Timeout(int(wait/time.Second)))
		if err != nil {
			return nil, fmt.Errorf("opening %s: %w", path, err)
		}
		return ipt, nil
	}
	return nil, fmt.Errorf("opening %s backend: none of %s found: %w", backend, strings.Join(tried, ", "), ErrNoIptables)
}

// modeOf returns "nft" or "legacy" from `path -V`, or "".
func modeOf(path string) string {
	out, err := exec.Command(path, "-V").Output()
	if err != nil {
		return ""
	}
	return modeFromVersion(string(out))
}

func modeFromVersion(v string) string {
	switch {
	case strings.Contains(v, "nf_tables"):
		return "nft"
	case strings.Contains(v, "legacy"):
		return "legacy"
	case strings.HasPrefix(v, "iptables v1.") || strings.HasPrefix(v, "ip6tables v1."):
		// Before 1.8 there was only legacy, and it did not say so.
		return "legacy"
	}
	return ""
}

// detectBackend picks the backend: the configured one, else the one that
// holds more rules (a host's firewall, Docker and kube-proxy write to one of
// them, and mixing would run our nat rules in the wrong order against
// theirs), else the mode of the `iptables` on PATH.
func detectBackend(ctx context.Context, configured string) (string, error) {
	if configured == "nft" || configured == "legacy" {
		return configured, nil
	}
	nft := countRules(ctx, "iptables-nft-save") + countRules(ctx, "ip6tables-nft-save")
	legacy := countRules(ctx, "iptables-legacy-save") + countRules(ctx, "ip6tables-legacy-save")
	return chooseBackend(nft, legacy, func() (string, error) {
		path, err := exec.LookPath("iptables")
		if err != nil {
			return "", fmt.Errorf("detecting the iptables backend: %w", ErrNoIptables)
		}
		m := modeOf(path)
		if m == "" {
			return "", fmt.Errorf("detecting the iptables backend: %s -V names neither nf_tables nor legacy", path)
		}
		return m, nil
	})
}

// chooseBackend picks by rule counts, falling back to onPath on a tie.
func chooseBackend(nft, legacy int, onPath func() (string, error)) (string, error) {
	switch {
	case nft > legacy:
		return "nft", nil
	case legacy > nft:
		return "legacy", nil
	}
	return onPath()
}

// countRules counts the rules `save` prints (0 if it is missing or fails).
func countRules(ctx context.Context, save string) int {
	out, err := saveOutput(ctx, save)
	if err != nil {
		return 0
	}
	n := 0
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "-A ") {
			n++
		}
	}
	return n
}

func saveOutput(ctx context.Context, save string) (string, error) {
	path, err := exec.LookPath(save)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, path)
	cmd.Stdout = &out
	if err := cmd.Run(); err != nil {
		return "", err
	}
	return out.String(), nil
}

// leftoversIn returns the family of backend that holds vmesh rules, or nil.
func leftoversIn(ctx context.Context, backend string, v6 bool, wait time.Duration) (*family, error) {
	base := "iptables"
	if v6 {
		base = "ip6tables"
	}
	out, err := saveOutput(ctx, base+"-"+backend+"-save")
	if err != nil || !strings.Contains(out, CommentPrefix) && !strings.Contains(out, ChainPrefix) {
		return nil, nil
	}
	ipt, err := openBackend(backend, v6, wait)
	if err != nil {
		return nil, err
	}
	return &family{name: base + "-" + backend, v6: v6, ipt: ipt, strict: true}, nil
}
