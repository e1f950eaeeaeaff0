package rules

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// fakeIPT is an in-memory nat table that behaves like iptables where the
// applier depends on it: -S output in iptables-save quoting, errors for a
// missing chain or rule, a chain that is not empty or still referenced, a
// jump to a chain that does not exist, an insert out of range.
type fakeIPT struct {
	mu      sync.Mutex
	chains  []string // built-in first, then user chains in creation order
	rules   map[string][][]string
	changes int // mutating calls that succeeded
	// failMatch makes rules using this match fail as a missing extension.
	failMatch string
}

var _ iptablesAPI = (*fakeIPT)(nil)

func newFakeIPT() *fakeIPT {
	return &fakeIPT{chains: slices.Clone(builtinChains), rules: map[string][][]string{}}
}

func (f *fakeIPT) exists(chain string) bool { return slices.Contains(f.chains, chain) }

func noChain(chain string) error {
	return fmt.Errorf("iptables: No chain/target/match by that name (%s)", chain)
}

func (f *fakeIPT) ListChains(table string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if table != Table {
		return nil, fmt.Errorf("fake has only the nat table, not %q", table)
	}
	return slices.Clone(f.chains), nil
}

func (f *fakeIPT) List(table, chain string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.exists(chain) {
		return nil, noChain(chain)
	}
	var out []string
	if isBuiltin(chain) {
		out = append(out, "-P "+chain+" ACCEPT")
	} else {
		out = append(out, "-N "+chain)
	}
	for _, r := range f.rules[chain] {
		out = append(out, Rule{Chain: chain, Args: r}.String())
	}
	return out, nil
}

// check validates a rule as iptables would before adding it.
func (f *fakeIPT) check(args []string) error {
	if f.failMatch != "" && slices.Contains(args, f.failMatch) {
		return fmt.Errorf("iptables v1.8.9 (nf_tables): Couldn't load match `%s':No such file or directory", f.failMatch)
	}
	if j := slices.Index(args, "-j"); j >= 0 && j+1 < len(args) {
		t := args[j+1]
		if t != "RETURN" && t != "REDIRECT" && t != "ACCEPT" && t != "DNAT" && t != "MASQUERADE" && !f.exists(t) {
			return noChain(t)
		}
	}
	return nil
}

func (f *fakeIPT) NewChain(table, chain string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.exists(chain) {
		return errors.New("iptables: Chain already exists.")
	}
	f.chains = append(f.chains, chain)
	f.changes++
	return nil
}

func (f *fakeIPT) ClearChain(table, chain string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.exists(chain) {
		f.chains = append(f.chains, chain)
	}
	f.rules[chain] = nil
	f.changes++
	return nil
}

func (f *fakeIPT) DeleteChain(table, chain string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.exists(chain) || isBuiltin(chain) {
		return noChain(chain)
	}
	if len(f.rules[chain]) > 0 {
		return errors.New("iptables: Directory not empty.")
	}
	for c, rs := range f.rules {
		for _, r := range rs {
			if j := slices.Index(r, "-j"); j >= 0 && r[j+1] == chain {
				return fmt.Errorf("iptables: Too many links (referenced from %s).", c)
			}
		}
	}
	f.chains = slices.DeleteFunc(f.chains, func(c string) bool { return c == chain })
	delete(f.rules, chain)
	f.changes++
	return nil
}

func (f *fakeIPT) Insert(table, chain string, pos int, args ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.exists(chain) {
		return noChain(chain)
	}
	if pos < 1 || pos > len(f.rules[chain])+1 {
		return errors.New("iptables: Index of insertion too big.")
	}
	if err := f.check(args); err != nil {
		return err
	}
	f.rules[chain] = slices.Insert(f.rules[chain], pos-1, slices.Clone(args))
	f.changes++
	return nil
}

func (f *fakeIPT) Append(table, chain string, args ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.exists(chain) {
		return noChain(chain)
	}
	if err := f.check(args); err != nil {
		return err
	}
	f.rules[chain] = append(f.rules[chain], slices.Clone(args))
	f.changes++
	return nil
}

func (f *fakeIPT) Delete(table, chain string, args ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := slices.IndexFunc(f.rules[chain], func(r []string) bool { return slices.Equal(r, args) })
	if !f.exists(chain) || i < 0 {
		return errors.New("iptables: Bad rule (does a matching rule exist in that chain?).")
	}
	f.rules[chain] = slices.Delete(f.rules[chain], i, i+1)
	f.changes++
	return nil
}

func (f *fakeIPT) DeleteById(table, chain string, id int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.exists(chain) || id < 1 || id > len(f.rules[chain]) {
		return errors.New("iptables: Index of deletion too big.")
	}
	f.rules[chain] = slices.Delete(f.rules[chain], id-1, id)
	f.changes++
	return nil
}

// save returns the whole table in iptables-save form.
func (f *fakeIPT) save() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var b strings.Builder
	b.WriteString("*nat\n")
	for _, c := range f.chains {
		if isBuiltin(c) {
			b.WriteString(":" + c + " ACCEPT [0:0]\n")
		} else {
			b.WriteString(":" + c + " - [0:0]\n")
		}
	}
	for _, c := range f.chains {
		for _, r := range f.rules[c] {
			b.WriteString(Rule{Chain: c, Args: r}.String() + "\n")
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// vmeshOnly returns what save would print of vmesh's chains and rules alone,
// in Rules.String form, for comparison with a built rule set.
func (f *fakeIPT) vmeshOnly() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var t Rules
	for _, c := range f.chains {
		if strings.HasPrefix(c, ChainPrefix) {
			t.Chains = append(t.Chains, c)
		}
	}
	// Own chains first, then built-in chains, as Build orders them.
	for _, c := range t.Chains {
		for _, r := range f.rules[c] {
			t.Rules = append(t.Rules, Rule{Chain: c, Args: r})
		}
	}
	for _, c := range builtinChains {
		for _, r := range f.rules[c] {
			if ours(r) {
				t.Rules = append(t.Rules, Rule{Chain: c, Args: r})
			}
		}
	}
	return t.String()
}

// addForeign puts rules that are not vmesh's in the table, like Docker's
// embedded DNS and an operator's own: the applier must never touch them.
func (f *fakeIPT) addForeign() {
	must := func(err error) {
		if err != nil {
			panic(err)
		}
	}
	must(f.NewChain(Table, "DOCKER_OUTPUT"))
	must(f.NewChain(Table, "DOCKER_POSTROUTING"))
	must(f.Append(Table, "OUTPUT", "-d", "127.0.0.11/32", "-j", "DOCKER_OUTPUT"))
	must(f.Append(Table, "POSTROUTING", "-d", "127.0.0.11/32", "-j", "DOCKER_POSTROUTING"))
	must(f.Append(Table, "DOCKER_OUTPUT", "-d", "127.0.0.11/32", "-p", "tcp", "-m", "tcp", "--dport", "53", "-j", "DNAT", "--to-destination", "127.0.0.11:40000"))
	must(f.Append(Table, "PREROUTING", "-p", "tcp", "-m", "tcp", "--dport", "8443", "-m", "comment", "--comment", "operator: keep me", "-j", "REDIRECT", "--to-ports", "443"))
	f.changes = 0
}
