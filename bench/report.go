package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"slices"
	"strings"
)

// Column names. Direct is the baseline every ratio is taken against.
const (
	Direct  = "direct"
	HAProxy = "haproxy"
	VMesh   = "vmesh"
	// VMeshProxy is vmesh's data path alone (bench/meshproxy).
	VMeshProxy = "vmesh-proxy"
	// VMeshDedicated is vmesh with proxy.multiplex_opaque = false: each
	// opaque connection on a dedicated mTLS connection (opaque rows only).
	VMeshDedicated = "vmesh-dedicated"
	// VMeshVIP is the vmesh column's agents dialed through the service's
	// virtual IP instead of the server host's address (balancing rows).
	VMeshVIP = "vmesh-vip"
	// VMeshB is the vmesh column again, its agents run with
	// -bench.benv's environment: an A/B comparison inside one run.
	VMeshB = "vmesh-b"
)

// ratioPairs are the comparisons every table shows, when both columns have
// a value: each proxy against direct, and vmesh against HAProxy.
var ratioPairs = [][2]string{{HAProxy, Direct}, {VMesh, Direct}, {VMesh, HAProxy}, {VMeshB, HAProxy}, {VMeshB, VMesh}}

// Report is one harness run: what bench/results/<date>.json holds.
type Report struct {
	Date    string  `json:"date"` // RFC 3339, UTC
	Machine Machine `json:"machine"`
	// Method says how rounds were run and aggregated.
	Method  string   `json:"method"`
	Rounds  int      `json:"rounds"`
	Columns []string `json:"columns"`
	// Unavailable maps a column that could not run to why.
	Unavailable map[string]string `json:"unavailable,omitempty"`
	Rows        []*Row            `json:"rows"`
	// GroupNotes are said under a group's table (a group may have only
	// notes: a scenario that could not run here).
	GroupNotes []GroupNote `json:"group_notes,omitempty"`
	// Profiles summarise the CPU profiles taken under load.
	Profiles []ProfileSummary `json:"profiles,omitempty"`
	Notes    []string         `json:"notes,omitempty"`
}

// GroupNote is a remark on one group of rows.
type GroupNote struct {
	Group string `json:"group"`
	Text  string `json:"text"`
}

// ProfileSummary is where one proxy process's CPU went under a load.
type ProfileSummary struct {
	Column string `json:"column"`
	Host   string `json:"host"`
	Side   string `json:"side"` // "client" or "server"
	Load   string `json:"load"`
	// Total is the CPU time sampled, as pprof prints it.
	Total string      `json:"total"`
	Kinds []Share     `json:"kinds"`
	Top   []PprofFunc `json:"top"`
	File  string      `json:"file"` // the saved profile
}

// Machine describes where the numbers were taken.
type Machine struct {
	Nproc     int    `json:"nproc"`
	Kernel    string `json:"kernel"`
	CPU       string `json:"cpu"`
	GoVersion string `json:"go"`
	Tools     string `json:"tools"`
	// Revision is the git revision of the tree measured (with "-dirty"
	// when it had uncommitted changes).
	Revision string `json:"revision,omitempty"`
}

// Row is one measured quantity across the columns.
type Row struct {
	Group string `json:"group"`
	Name  string `json:"name"`
	Unit  string `json:"unit"`
	// Better is "lower" or "higher"; ratios and targets read it.
	Better string `json:"better,omitempty"`
	// Samples holds each round's value per column; Values their median.
	Samples map[string][]float64 `json:"samples"`
	Values  map[string]float64   `json:"values"`
	Target  *Target              `json:"target,omitempty"`
}

// TargetKind says how a Target's Value is compared; "ref" is the target's
// reference column's value (direct unless Ref says otherwise).
type TargetKind string

// Target kinds.
const (
	AddedAtMost  TargetKind = "added_at_most"  // value - ref <= Value
	RatioAtLeast TargetKind = "ratio_at_least" // value / ref >= Value
	RatioAtMost  TargetKind = "ratio_at_most"  // value / ref <= Value
	RatioWithin  TargetKind = "ratio_within"   // |value / ref - 1| <= Value
	AtMost       TargetKind = "at_most"        // value <= Value
	AtLeast      TargetKind = "at_least"       // value >= Value
)

// Target is an issue's goal for a row; it is reported, never asserted.
type Target struct {
	Kind  TargetKind `json:"kind"`
	Value float64    `json:"value"`
	// Ref is the column relative kinds compare with; "" is direct.
	Ref string `json:"ref,omitempty"`
	// Cols are the columns judged; none: every column but direct and Ref.
	Cols []string `json:"cols,omitempty"`
	// Met maps each judged column that has a value (and whose reference
	// has one) to whether it meets the target; Got to the compared
	// quantity (the ratio, or the difference for AddedAtMost).
	Met map[string]bool    `json:"met,omitempty"`
	Got map[string]float64 `json:"got,omitempty"`
}

func (t *Target) ref() string {
	if t.Ref == "" {
		return Direct
	}
	return t.Ref
}

func (t *Target) String() string {
	switch t.Kind {
	case AddedAtMost:
		if t.ref() == Direct {
			return fmt.Sprintf("+≤%s", fmtNum(t.Value))
		}
		return fmt.Sprintf("≤ %s %+.3f", t.ref(), t.Value)
	case RatioAtLeast:
		return fmt.Sprintf("≥%.2f× %s", t.Value, t.ref())
	case RatioAtMost:
		return fmt.Sprintf("≤%.2f× %s", t.Value, t.ref())
	case RatioWithin:
		return fmt.Sprintf("within %.0f%% of %s", t.Value*100, t.ref())
	case AtMost:
		return fmt.Sprintf("≤%s", fmtNum(t.Value))
	case AtLeast:
		return fmt.Sprintf("≥%s", fmtNum(t.Value))
	}
	return string(t.Kind)
}

// judge sets Met and Got from the row's values.
func (t *Target) judge(values map[string]float64) {
	t.Met, t.Got = map[string]bool{}, map[string]float64{}
	ref, hasRef := values[t.ref()]
	cols := t.Cols
	if len(cols) == 0 {
		for col := range values {
			if col != Direct && col != t.ref() {
				cols = append(cols, col)
			}
		}
	}
	for _, col := range cols {
		v, ok := values[col]
		if !ok {
			continue
		}
		switch t.Kind {
		case AddedAtMost:
			if hasRef {
				t.Got[col] = v - ref
				t.Met[col] = v-ref <= t.Value+1e-9
			}
		case RatioAtLeast, RatioAtMost, RatioWithin:
			if !hasRef || ref == 0 {
				continue
			}
			q := v / ref
			t.Got[col] = q
			switch t.Kind {
			case RatioAtLeast:
				t.Met[col] = q >= t.Value-1e-9
			case RatioAtMost:
				t.Met[col] = q <= t.Value+1e-9
			default:
				t.Met[col] = math.Abs(q-1) <= t.Value+1e-9
			}
		case AtMost:
			t.Met[col] = v <= t.Value
		case AtLeast:
			t.Met[col] = v >= t.Value
		}
	}
}

// Add records one round's value of a row, creating the row on first use.
func (r *Report) Add(group, name, unit, better, column string, v float64) *Row {
	row := r.Row(group, name)
	if row == nil {
		row = &Row{Group: group, Name: name, Unit: unit, Better: better,
			Samples: map[string][]float64{}, Values: map[string]float64{}}
		r.Rows = append(r.Rows, row)
	}
	if !math.IsNaN(v) && !math.IsInf(v, 0) {
		row.Samples[column] = append(row.Samples[column], v)
	}
	return row
}

// Row returns the row named so, or nil.
func (r *Report) Row(group, name string) *Row {
	for _, row := range r.Rows {
		if row.Group == group && row.Name == name {
			return row
		}
	}
	return nil
}

// SetTarget attaches a target to a row (if it exists).
func (r *Report) SetTarget(group, name string, t Target) {
	if row := r.Row(group, name); row != nil {
		row.Target = &t
	}
}

// NoteGroup adds a remark under a group's table.
func (r *Report) NoteGroup(group, text string) {
	r.GroupNotes = append(r.GroupNotes, GroupNote{Group: group, Text: text})
}

// Finish computes medians and evaluates targets.
func (r *Report) Finish() {
	for _, row := range r.Rows {
		for col, s := range row.Samples {
			if len(s) > 0 {
				row.Values[col] = Median(s)
			}
		}
		if row.Target != nil {
			row.Target.judge(row.Values)
		}
	}
}

// Median returns the median of xs (the mean of the middle two for an even
// count); NaN for none.
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// WriteJSON writes the report, indented.
func (r *Report) WriteJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding report: %w", err)
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// fmtNum prints a value with about four significant digits.
func fmtNum(v float64) string {
	a := math.Abs(v)
	switch {
	case math.IsNaN(v):
		return "–"
	case a >= 1000:
		return groupThousands(fmt.Sprintf("%.0f", v))
	case a >= 100:
		return fmt.Sprintf("%.1f", v)
	case a >= 10:
		return fmt.Sprintf("%.2f", v)
	case a == 0:
		return "0"
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

func groupThousands(s string) string {
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// groupColumns are the columns with a value in some row of group g, in
// the report's column order.
func (r *Report) groupColumns(g string) []string {
	var cols []string
	for _, col := range r.Columns {
		for _, row := range r.Rows {
			if _, ok := row.Values[col]; ok && row.Group == g {
				cols = append(cols, col)
				break
			}
		}
	}
	return cols
}

// groupRatios are the ratio columns of group g: ratioPairs whose columns
// both appear in it.
func groupRatios(cols []string) [][2]string {
	var out [][2]string
	for _, p := range ratioPairs {
		if slices.Contains(cols, p[0]) && slices.Contains(cols, p[1]) {
			out = append(out, p)
		}
	}
	return out
}

// cells renders a row: the columns' values, the ratios, and the target
// with its verdicts.
func (r *Report) cells(row *Row, cols []string) []string {
	out := []string{row.Name, row.Unit}
	for _, col := range cols {
		v, ok := row.Values[col]
		if !ok {
			out = append(out, "–")
			continue
		}
		out = append(out, fmtNum(v))
	}
	for _, p := range groupRatios(cols) {
		v, ok1 := row.Values[p[0]]
		base, ok2 := row.Values[p[1]]
		if !ok1 || !ok2 || base == 0 {
			out = append(out, "")
			continue
		}
		c := fmt.Sprintf("×%.2f", v/base)
		if row.Unit == "ms" {
			c += fmt.Sprintf(" (%+.3f)", v-base)
		}
		out = append(out, c)
	}
	tgt := ""
	if t := row.Target; t != nil {
		tgt = t.String()
		var verdicts []string
		for _, col := range r.Columns {
			met, ok := t.Met[col]
			if !ok {
				continue
			}
			mark := "met"
			if !met {
				mark = "MISSED"
			}
			got := ""
			if g, ok := t.Got[col]; ok {
				if t.Kind == AddedAtMost {
					got = fmt.Sprintf(" %+.3f", g)
				} else {
					got = fmt.Sprintf(" ×%.2f", g)
				}
			}
			verdicts = append(verdicts, col+got+" "+mark)
		}
		if len(verdicts) > 0 {
			tgt += ": " + strings.Join(verdicts, ", ")
		}
	}
	return append(out, tgt)
}

func header(cols []string) []string {
	h := []string{"measure", "unit"}
	h = append(h, cols...)
	for _, p := range groupRatios(cols) {
		h = append(h, p[0]+" ÷ "+p[1])
	}
	return append(h, "target")
}

// groups returns the row groups in order of first appearance (of a row,
// or else of a note).
func (r *Report) groups() []string {
	var gs []string
	for _, row := range r.Rows {
		if !slices.Contains(gs, row.Group) {
			gs = append(gs, row.Group)
		}
	}
	for _, n := range r.GroupNotes {
		if !slices.Contains(gs, n.Group) {
			gs = append(gs, n.Group)
		}
	}
	return gs
}

func (r *Report) groupNotes(g string) []string {
	var out []string
	for _, n := range r.GroupNotes {
		if n.Group == g {
			out = append(out, n.Text)
		}
	}
	return out
}

// WriteText prints the results as aligned plain-text tables, one per group.
func (r *Report) WriteText(w io.Writer) {
	fmt.Fprintf(w, "vmesh benchmarks %s — %d CPUs, %s, kernel %s; %s\n", r.Date, r.Machine.Nproc, r.Machine.CPU, r.Machine.Kernel, r.Method)
	for _, col := range slices.Sorted(maps.Keys(r.Unavailable)) {
		fmt.Fprintf(w, "column %s unavailable: %s\n", col, r.Unavailable[col])
	}
	for _, g := range r.groups() {
		fmt.Fprintf(w, "\n== %s\n", g)
		cols := r.groupColumns(g)
		lines := [][]string{header(cols)}
		for _, row := range r.Rows {
			if row.Group == g {
				lines = append(lines, r.cells(row, cols))
			}
		}
		if len(lines) > 1 {
			printAligned(w, lines)
		}
		for _, n := range r.groupNotes(g) {
			fmt.Fprintln(w, "  note:", n)
		}
	}
	if glance := r.Glance(); len(glance) > 1 {
		fmt.Fprintln(w, "\n== targets")
		printAligned(w, glance)
	}
	for _, p := range r.Profiles {
		fmt.Fprintf(w, "\nprofile %s %s (%s side) under %s, %s sampled:", p.Column, p.Host, p.Side, p.Load, p.Total)
		for _, k := range p.Kinds {
			fmt.Fprintf(w, " %s %.1f%%;", k.What, k.Percent)
		}
		fmt.Fprintln(w)
	}
	for _, n := range r.Notes {
		fmt.Fprintln(w, "note:", n)
	}
}

// printAligned prints lines of cells as aligned plain-text columns.
func printAligned(w io.Writer, lines [][]string) {
	width := make([]int, len(lines[0]))
	for _, line := range lines {
		for i, c := range line {
			width[i] = max(width[i], len([]rune(c)))
		}
	}
	for _, line := range lines {
		var b strings.Builder
		for i, c := range line {
			b.WriteString(c)
			b.WriteString(strings.Repeat(" ", width[i]-len([]rune(c))+2))
		}
		fmt.Fprintln(w, strings.TrimRight(b.String(), " "))
	}
}

// Markdown returns the results as Markdown tables, one per group, and the
// profile summaries.
func (r *Report) Markdown() string {
	var b strings.Builder
	line := func(cells []string) {
		b.WriteString("| " + strings.Join(cells, " | ") + " |\n")
	}
	fmt.Fprintf(&b, "Run %s on %d CPUs (%s), kernel %s, %s. %s\n", r.Date, r.Machine.Nproc, r.Machine.CPU, r.Machine.Kernel, r.Machine.GoVersion, r.Method)
	if r.Machine.Revision != "" {
		fmt.Fprintf(&b, "Tree: %s.\n", r.Machine.Revision)
	}
	if r.Machine.Tools != "" {
		fmt.Fprintf(&b, "Tools: %s.\n", r.Machine.Tools)
	}
	for _, col := range slices.Sorted(maps.Keys(r.Unavailable)) {
		fmt.Fprintf(&b, "\nColumn **%s** unavailable in this run: %s\n", col, r.Unavailable[col])
	}
	if glance := r.Glance(); len(glance) > 1 {
		b.WriteString("\n**Targets at a glance** (every row with a target; the tables below have the rest)\n\n")
		for i, cells := range glance {
			line(cells)
			if i == 0 {
				sep := make([]string, len(cells))
				for i := range sep {
					sep[i] = "---"
				}
				line(sep)
			}
		}
	}
	for _, g := range r.groups() {
		fmt.Fprintf(&b, "\n**%s**\n\n", g)
		cols := r.groupColumns(g)
		hdr := header(cols)
		has := false
		for _, row := range r.Rows {
			if row.Group != g {
				continue
			}
			if !has {
				line(hdr)
				sep := make([]string, len(hdr))
				for i := range sep {
					sep[i] = "---"
				}
				line(sep)
				has = true
			}
			line(r.cells(row, cols))
		}
		if notes := r.groupNotes(g); len(notes) > 0 {
			if has {
				b.WriteString("\n")
			}
			for _, n := range notes {
				fmt.Fprintf(&b, "- %s\n", n)
			}
		}
	}
	if len(r.Profiles) > 0 {
		b.WriteString("\n**Where the time goes: CPU profiles of the vmesh agents under load**\n\n")
		b.WriteString("Shares of each agent's sampled CPU (kinds overlap: allocation happens inside request handling); " +
			"the profiles are saved next to the JSON results.\n")
		var loads []string
		for _, p := range r.Profiles {
			if !slices.Contains(loads, p.Load) {
				loads = append(loads, p.Load)
			}
		}
		for _, load := range loads {
			var ps []ProfileSummary
			for _, p := range r.Profiles {
				if p.Load == load {
					ps = append(ps, p)
				}
			}
			slices.SortFunc(ps, func(a, b ProfileSummary) int { return strings.Compare(a.Side, b.Side) })
			fmt.Fprintf(&b, "\n*%s*\n\n", load)
			hdr := []string{"share of CPU"}
			for _, p := range ps {
				hdr = append(hdr, fmt.Sprintf("%s %s (%s side, %s sampled)", p.Column, p.Host, p.Side, p.Total))
			}
			line(hdr)
			sep := make([]string, len(hdr))
			for i := range sep {
				sep[i] = "---"
			}
			line(sep)
			for i, k := range ps[0].Kinds {
				cells := []string{k.What}
				for _, p := range ps {
					if i < len(p.Kinds) {
						cells = append(cells, fmt.Sprintf("%.1f %%", p.Kinds[i].Percent))
					}
				}
				line(cells)
			}
			cells := []string{"top functions (flat)"}
			for _, p := range ps {
				var top []string
				for _, f := range p.Top {
					if f.Flat > 0 {
						top = append(top, fmt.Sprintf("`%s` %.1f %%", strings.TrimPrefix(f.Name, "github.com/vmesh/vmesh/"), f.Flat))
					}
				}
				cells = append(cells, strings.Join(top, ", "))
			}
			line(cells)
		}
	}
	if len(r.Notes) > 0 {
		b.WriteString("\n")
		for _, n := range r.Notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	return b.String()
}

// Glance returns the targets table: a header, then one line per judged
// column of every row with a target: the row, direct's and HAProxy's
// values, the judged column's, the target's reference, the compared
// quantity, the target and the verdict.
func (r *Report) Glance() [][]string {
	out := [][]string{{"row", "unit", "direct", "haproxy", "judged", "value", "compared with", "got", "target", "verdict"}}
	val := func(row *Row, col string) string {
		if v, ok := row.Values[col]; ok {
			return fmtNum(v)
		}
		return "–"
	}
	for _, row := range r.Rows {
		t := row.Target
		if t == nil {
			continue
		}
		for _, col := range r.Columns {
			met, ok := t.Met[col]
			if !ok {
				continue
			}
			verdict, got, ref := "met", "", "–"
			if !met {
				verdict = "**MISSED**"
			}
			switch t.Kind {
			case AddedAtMost:
				got = fmt.Sprintf("%+.3f", t.Got[col])
				ref = t.ref() + " " + val(row, t.ref())
			case RatioAtLeast, RatioAtMost, RatioWithin:
				got = fmt.Sprintf("×%.2f", t.Got[col])
				ref = t.ref() + " " + val(row, t.ref())
			}
			out = append(out, []string{shortGroup(row.Group) + ": " + row.Name, row.Unit, val(row, Direct), val(row, HAProxy),
				col, val(row, col), ref, got, t.String(), verdict})
		}
	}
	return out
}

// shortGroup is a group's title up to its first parenthesis or colon.
func shortGroup(g string) string {
	if i := strings.IndexAny(g, "(:"); i > 0 {
		return strings.TrimSpace(g[:i])
	}
	return g
}

// Result markers in BENCHMARKS.md: UpdateMarkdown replaces what is between.
const (
	BeginMarker = "<!-- bench:results:begin -->"
	EndMarker   = "<!-- bench:results:end -->"
)

// UpdateMarkdown replaces the text between the result markers of doc with
// body; it fails if the markers are missing.
func UpdateMarkdown(doc, body string) (string, error) {
	i := strings.Index(doc, BeginMarker)
	j := strings.Index(doc, EndMarker)
	if i < 0 || j < i {
		return "", fmt.Errorf("updating results: markers %q and %q not found in order", BeginMarker, EndMarker)
	}
	return doc[:i+len(BeginMarker)] + "\n" + body + doc[j:], nil
}
