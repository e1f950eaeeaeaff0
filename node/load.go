package node

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/vmesh/vmesh/internal/field"
)

// LoadConfig reads, decodes and validates the configuration file at path.
// Every problem is reported, each naming its key and line (a field.List);
// a file that cannot be read is an ordinary error.
func LoadConfig(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("reading config: %w", err)
	}
	return ParseConfig(data)
}

// ParseConfig decodes TOML text over DefaultConfig and validates the result.
func ParseConfig(data []byte) (Config, error) {
	cfg := DefaultConfig()
	text := string(data)
	lines := locateKeys(text)
	// Decode section by section so that a wrong type in one section does
	// not hide the problems of the others.
	var top map[string]toml.Primitive
	md, err := toml.Decode(text, &top)
	if err != nil {
		return Config{}, field.List{decodeError(err, "")}
	}
	var errs field.List
	// failed holds the tables that did not decode: their fields are partly
	// unset, so validating them would only add bogus errors.
	failed := map[string]bool{}
	sections := map[string]any{
		"node": &cfg.Node, "admin": &cfg.Admin, "proxy": &cfg.Proxy,
		"gossip": &cfg.Gossip, "ca": &cfg.CA, "rules": &cfg.Rules, "dns": &cfg.DNS,
	}
	arrays := map[string]any{"service": &cfg.Services, "route": &cfg.Routes, "split": &cfg.Splits}
	for name, prim := range top {
		if dst, ok := arrays[name]; ok {
			var elems []toml.Primitive
			if err := md.PrimitiveDecode(prim, &elems); err != nil {
				errs = append(errs, decodeError(err, name))
				continue
			}
			slice := reflect.ValueOf(dst).Elem()
			slice.Set(reflect.MakeSlice(slice.Type(), len(elems), len(elems)))
			for i, e := range elems {
				if err := md.PrimitiveDecode(e, slice.Index(i).Addr().Interface()); err != nil {
					fe := decodeError(err, "")
					fe.Key = fmt.Sprintf("%s[%d].%s", name, i+1, strings.TrimPrefix(fe.Key, name+"."))
					// The decoder names the line of the key's last
					// occurrence in any such table; find this element's
					// own.
					if n := lines.lookup(fe.Key); n > 0 {
						fe.Line = n
					}
					errs = append(errs, fe)
					failed[fmt.Sprintf("%s[%d]", name, i+1)] = true
				}
			}
			continue
		}
		dst, ok := sections[name]
		if !ok {
			continue // reported as undecoded below
		}
		if err := md.PrimitiveDecode(prim, dst); err != nil {
			errs = append(errs, decodeError(err, name))
			failed[name] = true
		}
	}
	known := knownKeys(reflect.TypeOf(cfg), "")
	for _, k := range md.Undecoded() {
		key := k.String()
		if slices.Contains(known, key) {
			// A known key left undecoded belongs to a table that failed to
			// decode: that failure is reported, the key is not unknown.
			continue
		}
		msg := "unknown key"
		if s := suggest(key, known); s != "" {
			msg += fmt.Sprintf(" (did you mean %q?)", s)
		}
		errs = append(errs, &field.Error{Key: key, Line: lines.line(key), Msg: msg})
	}
	// An integer where a duration belongs is read as nanoseconds by the
	// decoder: "detect_timeout = 10" would be 10ns. Refuse it.
	durations := durationKeys(reflect.TypeOf(cfg), "")
	for _, k := range md.Keys() {
		key := k.String()
		if durations[stripIndexes(key)] && md.Type(k...) == "Integer" {
			errs = append(errs, &field.Error{Key: key, Line: lines.line(key),
				Msg: "a duration must be a string with a unit, e.g. \"10s\" or \"500ms\""})
		}
	}
	if err := cfg.Validate(); err != nil {
		for _, e := range field.Flatten(err) {
			var fe *field.Error
			if errors.As(e, &fe) {
				if failed[strings.SplitN(fe.Key, ".", 2)[0]] {
					continue
				}
				if fe.Line == 0 {
					fe.Line = lines.lookup(fe.Key)
				}
				errs = append(errs, fe)
			} else {
				errs = append(errs, &field.Error{Key: "(config)", Msg: e.Error()})
			}
		}
	}
	if len(errs) > 0 {
		return Config{}, tidy(errs)
	}
	return cfg, nil
}

// tidy keeps the first error per key (a value that did not decode is not
// also reported as missing) and orders errors by line.
func tidy(errs field.List) field.List {
	seen := map[string]bool{}
	out := errs[:0]
	for _, e := range errs {
		if seen[e.Key] {
			continue
		}
		seen[e.Key] = true
		out = append(out, e)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Line < out[j].Line })
	return out
}

var typeErrRE = regexp.MustCompile(`^toml: (?:line (\d+) )?\(last key "([^"]*)"\): (.*)$`)

// decodeError turns a decoder error into a field error with key and line.
func decodeError(err error, section string) *field.Error {
	var pe toml.ParseError
	if errors.As(err, &pe) {
		key := pe.LastKey
		if key == "" {
			key = section
		}
		if key == "" {
			key = "(syntax)"
		}
		return &field.Error{Key: key, Line: pe.Position.Line, Msg: pe.Message}
	}
	// Type mismatches come as plain errors in a fixed form.
	if m := typeErrRE.FindStringSubmatch(err.Error()); m != nil {
		line, _ := strconv.Atoi(m[1])
		return &field.Error{Key: m[2], Line: line, Msg: m[3]}
	}
	if section == "" {
		section = "(file)"
	}
	return &field.Error{Key: section, Msg: err.Error()}
}

// keyLines maps dotted keys ("proxy.detect_timeout", "service[2].port") and
// table headers ("proxy", "service[2]") to the line they stand on.
type keyLines map[string]int

// locateKeys scans TOML text for table headers and key assignments. It is a
// deliberately small scanner (no multi-line strings or inline tables), used
// only to point error messages at a line.
func locateKeys(text string) keyLines {
	out := keyLines{}
	table := ""
	counts := map[string]int{}    // expanded array path ("route[2].match") -> elements so far
	latest := map[string]string{} // plain array path ("route.match") -> its latest element ("route[2].match[1]")
	// expand names a plain path by the latest elements of the arrays on
	// it: "route.match.x" -> "route[2].match[1].x".
	expand := func(name string) string {
		best := ""
		for arr := range latest {
			if (name == arr || strings.HasPrefix(name, arr+".")) && len(arr) > len(best) {
				best = arr
			}
		}
		if best == "" {
			return name
		}
		return latest[best] + strings.TrimPrefix(name, best)
	}
	for i, raw := range strings.Split(text, "\n") {
		ln := strings.TrimSpace(raw)
		switch {
		case ln == "" || ln[0] == '#':
			continue
		case strings.HasPrefix(ln, "[["):
			name := strings.TrimSpace(strings.Trim(strings.SplitN(ln, "]]", 2)[0], "["))
			full := name
			if dot := strings.LastIndexByte(name, '.'); dot > 0 {
				full = expand(name[:dot]) + name[dot:]
			}
			counts[full]++
			table = fmt.Sprintf("%s[%d]", full, counts[full])
			latest[name] = table
			out[table] = i + 1
			continue
		case ln[0] == '[':
			// A table, or a sub-table of an array element: [service.health].
			table = expand(strings.TrimSpace(strings.Trim(strings.SplitN(ln, "]", 2)[0], "[")))
			out[table] = i + 1
			continue
		}
		eq := strings.IndexByte(ln, '=')
		if eq <= 0 {
			continue
		}
		key := strings.Trim(strings.TrimSpace(ln[:eq]), `"`)
		if table != "" {
			key = table + "." + key
		}
		if _, seen := out[key]; !seen {
			out[key] = i + 1
		}
	}
	return out
}

// lookup returns the line of key, or of its nearest enclosing table, or 0.
func (kl keyLines) lookup(key string) int {
	for k := key; k != ""; {
		if n, ok := kl[k]; ok {
			return n
		}
		i := strings.LastIndexAny(k, ".[")
		if i < 0 {
			break
		}
		k = k[:i]
	}
	return 0
}

// line finds a key as the decoder names it ("service.health.interval"), which
// has no array indexes: it tries each element in turn.
func (kl keyLines) line(key string) int {
	if n, ok := kl[key]; ok {
		return n
	}
	parts := strings.SplitN(key, ".", 2)
	if len(parts) == 2 {
		for i := 1; ; i++ {
			head := fmt.Sprintf("%s[%d]", parts[0], i)
			if _, ok := kl[head]; !ok {
				break
			}
			if n, ok := kl[head+"."+parts[1]]; ok {
				return n
			}
		}
	}
	return kl.lookup(key)
}

func stripIndexes(key string) string {
	var b strings.Builder
	skip := false
	for _, r := range key {
		switch {
		case r == '[':
			skip = true
		case r == ']':
			skip = false
		case !skip:
			b.WriteRune(r)
		}
	}
	return b.String()
}

var durationType = reflect.TypeOf(time.Duration(0))

// durationKeys lists the dotted keys of every time.Duration field under t.
func durationKeys(t reflect.Type, prefix string) map[string]bool {
	out := map[string]bool{}
	walkKeys(t, prefix, func(key string, ft reflect.Type) {
		if ft == durationType {
			out[key] = true
		}
	})
	return out
}

// knownKeys lists every dotted key of t, for suggestions.
func knownKeys(t reflect.Type, prefix string) []string {
	var out []string
	walkKeys(t, prefix, func(key string, _ reflect.Type) { out = append(out, key) })
	return out
}

func walkKeys(t reflect.Type, prefix string, fn func(string, reflect.Type)) {
	for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name := strings.Split(f.Tag.Get("toml"), ",")[0]
		if name == "" || name == "-" {
			continue
		}
		key := name
		if prefix != "" {
			key = prefix + "." + name
		}
		fn(key, f.Type)
		ft := f.Type
		if ft.Kind() == reflect.Slice {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct && ft.PkgPath() != "net/netip" && ft != durationType {
			walkKeys(ft, key, fn)
		}
	}
}

// suggest returns the known key closest to key, if it is close enough to be
// a typo.
func suggest(key string, known []string) string {
	best, bestD := "", 4
	for _, k := range known {
		if d := editDistance(key, k); d < bestD {
			best, bestD = k, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
