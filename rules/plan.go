package rules

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// builtinChains are the nat table's own chains: vmesh adds jumps to some and
// sweeps its tagged rules from all of them, never touching anything else.
var builtinChains = []string{"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}

// natState is the nat table of one family as read from iptables: the chains
// that exist and the rules of the chains vmesh looks at (built-in ones and
// its own), each as the argument list after "-A CHAIN".
type natState struct {
	chains []string
	rules  map[string][][]string
}

// ours reports whether a rule found in a built-in chain is vmesh's: tagged
// with a vmesh/ comment or jumping to a vmesh chain.
func ours(args []string) bool {
	if comment(args) != "" {
		return true
	}
	j := slices.Index(args, "-j")
	return j >= 0 && j+1 < len(args) && strings.HasPrefix(args[j+1], ChainPrefix)
}

// opKind is one iptables operation.
type opKind int

const (
	opNewChain    opKind = iota // -N chain
	opInsert                    // -I chain pos args
	opAppend                    // -A chain args
	opDeleteAt                  // -D chain pos (only in vmesh's own chains)
	opDelete                    // -D chain args
	opFlush                     // -F chain
	opDeleteChain               // -X chain
)

type op struct {
	kind  opKind
	chain string
	pos   int
	args  []string
}

func (o op) String() string {
	r := Rule{Chain: o.chain, Args: o.args}.String()
	rest := strings.TrimPrefix(r, "-A "+o.chain)
	switch o.kind {
	case opNewChain:
		return "-N " + o.chain
	case opInsert:
		return "-I " + o.chain + " " + strconv.Itoa(o.pos) + rest
	case opAppend:
		return "-A " + o.chain + rest
	case opDeleteAt:
		return "-D " + o.chain + " " + strconv.Itoa(o.pos)
	case opDelete:
		return "-D " + o.chain + rest
	case opFlush:
		return "-F " + o.chain
	case opDeleteChain:
		return "-X " + o.chain
	}
	return fmt.Sprintf("op(%d)", o.kind)
}

// plan returns the operations that turn cur into want (nil: no vmesh rules),
// touching only vmesh's chains and vmesh's rules in built-in chains. It
// changes nothing that already matches: a current table gives no operations.
//
// Order keeps traffic safe throughout: chains are created and filled before
// jumps point at them; within a chain, new rules go in before the rules they
// replace are deleted (a changed proxy uid is exempted before the old
// exemption goes); jumps go before their chains are removed.
func plan(cur natState, want *Rules) []op {
	if want == nil {
		want = &Rules{}
	}
	var ops []op
	for _, c := range want.Chains {
		if !slices.Contains(cur.chains, c) {
			ops = append(ops, op{kind: opNewChain, chain: c})
		}
	}
	for _, c := range want.Chains {
		ops = append(ops, editChain(c, cur.rules[c], argsOf(want.chainRules(c)))...)
	}
	// Built-in chains: add missing jumps, then delete any other vmesh rule.
	var dels []op
	for _, c := range builtinChains {
		wanted := argsOf(want.chainRules(c))
		have := slices.Clone(wanted)
		for _, args := range cur.rules[c] {
			if !ours(args) {
				continue
			}
			if i := slices.IndexFunc(have, func(w []string) bool { return slices.Equal(w, args) }); i >= 0 {
				have = slices.Delete(have, i, i+1)
				continue
			}
			dels = append(dels, op{kind: opDelete, chain: c, args: args})
		}
		for _, args := range have {
			if JumpFirst(Rule{Chain: c, Args: args}) {
				ops = append(ops, op{kind: opInsert, chain: c, pos: 1, args: args})
				continue
			}
			ops = append(ops, op{kind: opAppend, chain: c, args: args})
		}
	}
	ops = append(ops, dels...)
	for _, c := range cur.chains {
		if strings.HasPrefix(c, ChainPrefix) && !slices.Contains(want.Chains, c) {
			if len(cur.rules[c]) > 0 {
				ops = append(ops, op{kind: opFlush, chain: c})
			}
			ops = append(ops, op{kind: opDeleteChain, chain: c})
		}
	}
	return ops
}

func argsOf(rs []Rule) [][]string {
	out := make([][]string, len(rs))
	for i, r := range rs {
		out[i] = r.Args
	}
	return out
}

// editChain returns the inserts and deletes that turn the rules of one of
// vmesh's own chains from cur into want, keeping their longest common
// subsequence in place. Inserts come first, each new rule placed before the
// old rules of its gap; deletes follow, from the bottom up, by position.
func editChain(chain string, cur, want [][]string) []op {
	key := func(a []string) string { return strings.Join(a, "\x00") }
	n, m := len(cur), len(want)
	// lcs[i][j] = length of the LCS of cur[i:] and want[j:].
	lcs := make([][]int, n+1)
	for i := range lcs {
		lcs[i] = make([]int, m+1)
	}
	for i := n - 1; i >= 0; i-- {
		for j := m - 1; j >= 0; j-- {
			if key(cur[i]) == key(want[j]) {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var ins []op
	var delAt []int
	pos := 1 // 1-based position in the live chain as the inserts proceed
	i, j := 0, 0
	for i < n || j < m {
		switch {
		case i < n && j < m && key(cur[i]) == key(want[j]) && lcs[i][j] == lcs[i+1][j+1]+1:
			pos++
			i++
			j++
		case j < m && (i == n || lcs[i][j+1] >= lcs[i+1][j]):
			ins = append(ins, op{kind: opInsert, chain: chain, pos: pos, args: want[j]})
			pos++
			j++
		default:
			delAt = append(delAt, pos)
			pos++
			i++
		}
	}
	ops := ins
	for k := len(delAt) - 1; k >= 0; k-- {
		ops = append(ops, op{kind: opDeleteAt, chain: chain, pos: delAt[k]})
	}
	return ops
}

// parseRules returns the arguments of chain's rules in `iptables -S` output.
func parseRules(lines []string, chain string) ([][]string, error) {
	var out [][]string
	for _, l := range lines {
		if !strings.HasPrefix(l, "-A ") {
			continue
		}
		f, err := splitArgs(l)
		if err != nil {
			return nil, fmt.Errorf("parsing rule %q: %w", l, err)
		}
		if len(f) < 2 || f[1] != chain {
			continue
		}
		out = append(out, f[2:])
	}
	return out, nil
}

// splitArgs splits an iptables -S line into arguments the way iptables-save
// quotes them: double quotes group, a backslash escapes the next character.
func splitArgs(s string) ([]string, error) {
	var out []string
	var cur strings.Builder
	inArg, quoted := false, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\\' && i+1 < len(s):
			i++
			cur.WriteByte(s[i])
			inArg = true
		case c == '"':
			quoted = !quoted
			inArg = true
		case (c == ' ' || c == '\t') && !quoted:
			if inArg {
				out = append(out, cur.String())
				cur.Reset()
				inArg = false
			}
		default:
			cur.WriteByte(c)
			inArg = true
		}
	}
	if quoted {
		return nil, fmt.Errorf("unterminated quote")
	}
	if inArg {
		out = append(out, cur.String())
	}
	return out, nil
}
