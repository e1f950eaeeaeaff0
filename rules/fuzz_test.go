package rules

import (
	"slices"
	"strings"
	"testing"
	"unicode"
)

// FuzzParseRules: whatever `iptables -S` prints (other tools' rules
// included) parses without panicking, and a rule vmesh writes, whatever
// its comment's printable text, reads back as written.
func FuzzParseRules(f *testing.F) {
	for _, l := range []string{
		`-A VMESH_OUTPUT -p tcp -m comment --comment "vmesh/out-redirect" -j REDIRECT --to-ports 4140`,
		`-A PREROUTING -p tcp --dport 8443 -m comment --comment "operator: \"keep\" me" -j REDIRECT --to-ports 443`,
		`-A X -m comment --comment "unterminated`,
		`-A X \`,
		`-N VMESH_INBOUND`,
		"",
	} {
		f.Add(l, "vmesh/out-redirect")
	}
	f.Fuzz(func(t *testing.T, line, comment string) {
		parseRules(strings.Split(line, "\n"), "VMESH_OUTPUT")
		if comment == "" || strings.IndexFunc(comment, func(r rune) bool { return r > unicode.MaxASCII || !unicode.IsPrint(r) }) >= 0 {
			return
		}
		want := []string{"-p", "tcp", "-m", "comment", "--comment", comment, "-j", "RETURN"}
		got, err := parseRules([]string{Rule{Chain: "VMESH_OUTPUT", Args: want}.String()}, "VMESH_OUTPUT")
		if err != nil || len(got) != 1 || !slices.Equal(got[0], want) {
			t.Fatalf("rule with comment %q reads back as %q, %v", comment, got, err)
		}
	})
}
