package proxy

import (
	"strings"
	"testing"
)

// refMatch is the allow-pattern semantics written as plainly as possible:
// both sides split into segments after "spiffe://"; "*" matches one
// non-empty segment; a trailing "**" matches nothing more or a non-empty
// remainder (which, as implemented, may hold empty segments: "a//b"; SVIDs
// never do); every other segment matches itself.
func refMatch(pattern, id string) bool {
	if !strings.HasPrefix(id, "spiffe://") {
		return false
	}
	ps := strings.Split(strings.TrimPrefix(pattern, "spiffe://"), "/")
	is := strings.Split(strings.TrimPrefix(id, "spiffe://"), "/")
	rest := len(ps) > 1 && ps[len(ps)-1] == "**"
	if rest {
		ps = ps[:len(ps)-1]
	}
	if len(is) < len(ps) || (!rest && len(is) != len(ps)) {
		return false
	}
	for i, s := range is[:len(ps)] {
		if s == "" || (ps[i] != "*" && ps[i] != s) {
			return false
		}
	}
	return len(is) == len(ps) || strings.Join(is[len(ps):], "/") != ""
}

// FuzzAllowPattern: the allow-list matcher agrees with refMatch on every
// pattern it accepts and every identity.
func FuzzAllowPattern(f *testing.F) {
	for _, c := range [][2]string{
		{"spiffe://td/svc/web", "spiffe://td/svc/web"},
		{"spiffe://td/svc/*", "spiffe://td/svc/web"},
		{"spiffe://td/**", "spiffe://td"},
		{"spiffe://td/svc/**", "spiffe://td/svc/a//b"},
		{"spiffe://td/svc/**", "spiffe://td/svc/"},
		{"spiffe://td/*/web", "spiffe://td/node/web/x"},
		{"spiffe://*/svc/web", "spiffe://other/svc/web"},
	} {
		f.Add(c[0], c[1])
	}
	f.Fuzz(func(t *testing.T, pattern, id string) {
		p, err := parseIDPattern(pattern)
		if err != nil {
			return
		}
		if got, want := p.match(id), refMatch(pattern, id); got != want {
			t.Fatalf("pattern %q, id %q: match %v, reference %v", pattern, id, got, want)
		}
	})
}
