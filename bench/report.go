package bench

import (
	"encoding/json"
	"fmt"
	"io"
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
)

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
	Notes       []string          `json:"notes,omitempty"`
}

// Machine describes where the numbers were taken.
type Machine struct {
	Nproc     int    `json:"nproc"`
	Kernel    string `json:"kernel"`
	CPU       string `json:"cpu"`
	GoVersion string `json:"go"`
	Tools     string `json:"tools"`
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

// TargetKind says how a Target's Value is compared.
type TargetKind string

// Target kinds.
const (
	AddedAtMost  TargetKind = "added_at_most"  // value - direct <= Value
	RatioAtLeast TargetKind = "ratio_at_least" // value / direct >= Value
	AtMost       TargetKind = "at_most"        // value <= Value
	AtLeast      TargetKind = "at_least"       // value >= Value
)

// Target is an issue's goal for a row; it is reported, never asserted.
type Target struct {
	Kind  TargetKind `json:"kind"`
	Value float64    `json:"value"`
	// Met maps each proxy column that has a value to whether it meets the
	// target.
	Met map[string]bool `json:"met,omitempty"`
}

func (t *Target) String() string {
	switch t.Kind {
	case AddedAtMost:
		return fmt.Sprintf("+≤%s", fmtNum(t.Value))
	case RatioAtLeast:
		return fmt.Sprintf("≥%.0f%% of direct", t.Value*100)
	case AtMost:
		return fmt.Sprintf("≤%s", fmtNum(t.Value))
	case AtLeast:
		return fmt.Sprintf("≥%s", fmtNum(t.Value))
	}
	return string(t.Kind)
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
func (r *Report) SetTarget(group, name string, kind TargetKind, v float64) {
	if row := r.Row(group, name); row != nil {
		row.Target = &Target{Kind: kind, Value: v}
	}
}

// Finish computes medians and evaluates targets.
func (r *Report) Finish() {
	for _, row := range r.Rows {
		for col, s := range row.Samples {
			if len(s) > 0 {
				row.Values[col] = Median(s)
			}
		}
		t := row.Target
		if t == nil {
			continue
		}
		t.Met = map[string]bool{}
		base, hasBase := row.Values[Direct]
		for col, v := range row.Values {
			if col == Direct {
				continue
			}
			switch t.Kind {
			case AddedAtMost:
				if hasBase {
					t.Met[col] = v-base <= t.Value
				}
			case RatioAtLeast:
				if hasBase && base > 0 {
					t.Met[col] = v/base >= t.Value
				}
			case AtMost:
				t.Met[col] = v <= t.Value
			case AtLeast:
				t.Met[col] = v >= t.Value
			}
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

// cells renders a row: the columns' values, each proxy's comparison with
// direct, and the target verdicts.
func (r *Report) cells(row *Row) []string {
	out := []string{row.Name, row.Unit}
	for _, col := range r.Columns {
		v, ok := row.Values[col]
		if !ok {
			out = append(out, "–")
			continue
		}
		out = append(out, fmtNum(v))
	}
	base, hasBase := row.Values[Direct]
	for _, col := range r.Columns {
		if col == Direct {
			continue
		}
		v, ok := row.Values[col]
		if !ok || !hasBase || base == 0 {
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
			if met, ok := t.Met[col]; ok {
				mark := "met"
				if !met {
					mark = "MISSED"
				}
				verdicts = append(verdicts, col+" "+mark)
			}
		}
		if len(verdicts) > 0 {
			tgt += ": " + strings.Join(verdicts, ", ")
		}
	}
	return append(out, tgt)
}

func (r *Report) header() []string {
	h := []string{"measure", "unit"}
	h = append(h, r.Columns...)
	for _, col := range r.Columns {
		if col != Direct {
			h = append(h, col+"/direct")
		}
	}
	return append(h, "target")
}

// groups returns the row groups in order of first appearance.
func (r *Report) groups() []string {
	var gs []string
	for _, row := range r.Rows {
		if !slices.Contains(gs, row.Group) {
			gs = append(gs, row.Group)
		}
	}
	return gs
}

// WriteText prints the results as aligned plain-text tables, one per group.
func (r *Report) WriteText(w io.Writer) {
	hdr := r.header()
	var all [][]string
	for _, row := range r.Rows {
		all = append(all, r.cells(row))
	}
	width := make([]int, len(hdr))
	for _, line := range append(all, hdr) {
		for i, c := range line {
			width[i] = max(width[i], len([]rune(c)))
		}
	}
	pr := func(line []string) {
		var b strings.Builder
		for i, c := range line {
			b.WriteString(c)
			b.WriteString(strings.Repeat(" ", width[i]-len([]rune(c))+2))
		}
		fmt.Fprintln(w, strings.TrimRight(b.String(), " "))
	}
	fmt.Fprintf(w, "vmesh benchmarks %s — %d CPUs, %s, kernel %s; %s\n", r.Date, r.Machine.Nproc, r.Machine.CPU, r.Machine.Kernel, r.Method)
	for col, why := range r.Unavailable {
		fmt.Fprintf(w, "column %s unavailable: %s\n", col, why)
	}
	for _, g := range r.groups() {
		fmt.Fprintf(w, "\n== %s\n", g)
		pr(hdr)
		for _, row := range r.Rows {
			if row.Group == g {
				pr(r.cells(row))
			}
		}
	}
	for _, n := range r.Notes {
		fmt.Fprintln(w, "note:", n)
	}
}

// Markdown returns the results as Markdown tables, one per group.
func (r *Report) Markdown() string {
	var b strings.Builder
	hdr := r.header()
	line := func(cells []string) {
		b.WriteString("| " + strings.Join(cells, " | ") + " |\n")
	}
	fmt.Fprintf(&b, "Run %s on %d CPUs (%s), kernel %s, %s. %s\n", r.Date, r.Machine.Nproc, r.Machine.CPU, r.Machine.Kernel, r.Machine.GoVersion, r.Method)
	if r.Machine.Tools != "" {
		fmt.Fprintf(&b, "Tools: %s.\n", r.Machine.Tools)
	}
	cols := slices.Sorted(func(yield func(string) bool) {
		for c := range r.Unavailable {
			if !yield(c) {
				return
			}
		}
	})
	for _, col := range cols {
		fmt.Fprintf(&b, "\nColumn **%s** unavailable in this run: %s\n", col, r.Unavailable[col])
	}
	for _, g := range r.groups() {
		fmt.Fprintf(&b, "\n**%s**\n\n", g)
		line(hdr)
		sep := make([]string, len(hdr))
		for i := range sep {
			sep[i] = "---"
		}
		line(sep)
		for _, row := range r.Rows {
			if row.Group == g {
				line(r.cells(row))
			}
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
