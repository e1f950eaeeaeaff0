package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmesh/vmesh/node"
	"github.com/vmesh/vmesh/proxy"
)

// errEnough ends a tap stream once --count events were printed.
var errEnough = errors.New("enough events")

// tapFlags are the filters of tap and top.
type tapFlags struct {
	f proxy.TapFilter
}

func (t *tapFlags) add(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&t.f.Direction, "direction", "", "only inbound or outbound")
	fl.StringVar(&t.f.Identity, "identity", "", "only this client or server identity (a SPIFFE ID, or its tail: node/web1, svc/api)")
	fl.StringVar(&t.f.PathPrefix, "path", "", "only HTTP requests whose path starts with this")
	fl.StringVar(&t.f.Method, "method", "", "only HTTP requests with this method")
}

func (t *tapFlags) filter(args []string) (proxy.TapFilter, error) {
	f := t.f
	if len(args) == 1 {
		f.Service = args[0]
	}
	if f.Direction != "" && f.Direction != "inbound" && f.Direction != "outbound" {
		return f, usageError{fmt.Errorf("--direction must be inbound or outbound, got %q", f.Direction)}
	}
	return f, nil
}

// interruptible returns ctx ended by SIGINT or SIGTERM too.
func interruptible(ctx context.Context) (context.Context, context.CancelFunc) {
	if ctx == nil {
		ctx = context.Background()
	}
	return signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
}

func newTapCmd(cl *cli) *cobra.Command {
	var tf tapFlags
	var count int
	cmd := &cobra.Command{
		Use:   "tap [SERVICE]",
		Short: "Stream the requests and TCP connections through this host, live",
		Long: `Stream the requests and connections the agent's proxy sees, as they end:
time, direction, client and server identity, method, authority, path, status,
latency and bytes for HTTP; open and close (with bytes) for TCP. Filter by
service (the argument), direction, identity, path prefix and method. -o json
prints one JSON object a line. Costs nothing on the agent when nobody taps;
a slow reader loses events (counted, shown as "dropped").`,
		Args: func(c *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usageError{fmt.Errorf("tap takes at most one SERVICE, got %d arguments", len(args))}
			}
			return nil
		},
	}
	tf.add(cmd)
	cmd.Flags().IntVarP(&count, "count", "n", 0, "stop after this many events (0: until interrupted)")
	cmd.RunE = func(c *cobra.Command, args []string) error {
		f, err := tf.filter(args)
		if err != nil {
			return err
		}
		ctx, cancel := interruptible(c.Context())
		defer cancel()
		out := c.OutOrStdout()
		enc := json.NewEncoder(out)
		n := 0
		err = cl.control(ctx).Tap(ctx, f, func(l node.TapLine) error {
			if l.Kind == node.TapDropped {
				fmt.Fprintf(c.ErrOrStderr(), "vmesh: %d events dropped so far (the agent's queue was full)\n", l.Dropped)
				return nil
			}
			if cl.json() {
				if err := enc.Encode(l.TapEvent); err != nil {
					return err
				}
			} else {
				fmt.Fprintln(out, formatTap(&l.TapEvent))
			}
			n++
			if count > 0 && n >= count {
				return errEnough
			}
			return nil
		})
		if errors.Is(err, errEnough) {
			return nil
		}
		return err
	}
	return cmd
}

// shortID is a SPIFFE ID without its scheme and trust domain.
func shortID(id string) string {
	if rest, ok := strings.CutPrefix(id, "spiffe://"); ok {
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			return rest[i+1:]
		}
	}
	return id
}

// formatTap is one event as a line of text.
func formatTap(ev *proxy.TapEvent) string {
	dir := "in "
	if ev.Direction == "outbound" {
		dir = "out"
	}
	client, server := shortID(ev.ClientID), shortID(ev.ServerID)
	if client == "" {
		client = "-"
	}
	if server == "" {
		server = "-"
		if ev.Service != "" && ev.Direction == "inbound" {
			server = "svc/" + ev.Service + " (here)"
		}
	}
	if ev.Direction == "outbound" {
		client = "(here)"
	}
	if ev.TLS {
		server += " mtls"
	}
	t := ev.Time.Local().Format("15:04:05.000")
	switch ev.Kind {
	case proxy.TapHTTP:
		return fmt.Sprintf("%s %s %s %s%s %d %s %s -> %s req=%dB resp=%dB", t, dir, ev.Method, ev.Authority, ev.Path,
			ev.Status, fmtMS(ev.LatencyMS), client, server, ev.BytesIn, ev.BytesOut)
	case proxy.TapTCPOpen:
		return fmt.Sprintf("%s %s tcp open  %s %s -> %s", t, dir, ev.Service, client, server)
	default:
		return fmt.Sprintf("%s %s tcp close %s %s -> %s in=%dB out=%dB after %s", t, dir, ev.Service, client, server,
			ev.BytesIn, ev.BytesOut, fmtMS(ev.LatencyMS))
	}
}

func fmtMS(ms float64) string {
	if ms < 10 {
		return fmt.Sprintf("%.2fms", ms)
	}
	return fmt.Sprintf("%.0fms", ms)
}

func newPingCmd(cl *cli) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ping SERVICE|NODE",
		Short: "One mTLS round trip to each endpoint of a service, or to a node's proxy",
		Long: `Ask the agent to make one mTLS round trip to each endpoint of SERVICE (or, when
no service has that name, to NODE's proxy): it prints the identity each server
proved, the connect and handshake time and the round trip. Exits 1 when any
endpoint fails.`,
		Args: exactArgs(1),
	}
	cmd.RunE = func(c *cobra.Command, args []string) error {
		var resp node.PingResponse
		if err := cl.control(c.Context()).Do(c.Context(), http.MethodPost, "/v1/ping", node.PingRequest{Target: args[0]}, &resp); err != nil {
			return err
		}
		failed := 0
		for _, r := range resp.Results {
			if r.Error != "" {
				failed++
			}
		}
		out := c.OutOrStdout()
		if cl.json() {
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			if err := enc.Encode(resp); err != nil {
				return err
			}
		} else {
			printPing(out, resp)
		}
		if failed > 0 {
			if !cl.json() {
				fmt.Fprintf(c.ErrOrStderr(), "vmesh: %d of %d endpoints of %s failed\n", failed, len(resp.Results), resp.Target)
			}
			return silentError{exitFailure}
		}
		return nil
	}
	return cmd
}

func printPing(out io.Writer, resp node.PingResponse) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tADDRESS\tIDENTITY\tCONNECT+TLS\tRTT\tRESULT")
	for _, r := range resp.Results {
		res := "ok"
		if r.Error != "" {
			res = "FAILED: " + r.Error
		} else if r.Healthy != nil && !*r.Healthy {
			res = "ok (mesh reachable; health check failing)"
		}
		conn, rtt := fmtMS(r.ConnectMS), fmtMS(r.RTTMS)
		if r.Error != "" {
			conn, rtt = "-", "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.Node, r.Addr, r.Identity, conn, rtt, res)
	}
	tw.Flush()
}

// topKey groups events in top.
type topKey struct {
	Direction string `json:"direction"`
	Service   string `json:"service"`
	Authority string `json:"authority,omitempty"`
	Path      string `json:"path,omitempty"` // without the query; "" for TCP
	TCP       bool   `json:"tcp,omitempty"`
}

// topRow is one line of top.
type topRow struct {
	topKey
	Count     int     `json:"count"`
	Successes int     `json:"successes"`
	Success   float64 `json:"success_rate"`
	P50       float64 `json:"p50_ms"`
	P95       float64 `json:"p95_ms"`
	P99       float64 `json:"p99_ms"`
	BytesIn   int64   `json:"bytes_in"`
	BytesOut  int64   `json:"bytes_out"`
	lat       []float64
}

// topMaxSamples bounds the latencies kept per row.
const topMaxSamples = 4096

// topAgg aggregates tap events.
type topAgg struct {
	rows map[topKey]*topRow
}

func (a *topAgg) add(ev *proxy.TapEvent) {
	if ev.Kind == proxy.TapTCPOpen || ev.Kind == node.TapDropped {
		return
	}
	k := topKey{Direction: ev.Direction, Service: ev.Service}
	if ev.Kind == proxy.TapHTTP {
		k.Authority = ev.Authority
		k.Path, _, _ = strings.Cut(ev.Path, "?")
	} else {
		k.TCP = true
	}
	if a.rows == nil {
		a.rows = map[topKey]*topRow{}
	}
	r := a.rows[k]
	if r == nil {
		r = &topRow{topKey: k}
		a.rows[k] = r
	}
	r.Count++
	if ev.Kind != proxy.TapHTTP || (ev.Status != 0 && ev.Status < 500) {
		r.Successes++
	}
	r.BytesIn += ev.BytesIn
	r.BytesOut += ev.BytesOut
	if ev.Kind == proxy.TapHTTP && len(r.lat) < topMaxSamples {
		r.lat = append(r.lat, ev.LatencyMS)
	}
}

// snapshot returns the rows, busiest first, with rates and percentiles.
func (a *topAgg) snapshot() []topRow {
	out := make([]topRow, 0, len(a.rows))
	for _, r := range a.rows {
		row := *r
		row.Success = float64(r.Successes) / float64(r.Count)
		lat := slices.Clone(r.lat)
		slices.Sort(lat)
		row.P50, row.P95, row.P99 = sampleQuantile(lat, .5), sampleQuantile(lat, .95), sampleQuantile(lat, .99)
		row.lat = nil
		out = append(out, row)
	}
	slices.SortFunc(out, func(x, y topRow) int {
		if x.Count != y.Count {
			return y.Count - x.Count
		}
		return strings.Compare(x.Service+x.Path, y.Service+y.Path)
	})
	return out
}

func sampleQuantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.5) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func printTop(out io.Writer, rows []topRow, since time.Time) {
	fmt.Fprintf(out, "vmesh top — %s, %d routes (Ctrl-C to quit)\n\n", time.Since(since).Round(time.Second), len(rows))
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DIR\tSERVICE\tROUTE\tCOUNT\tSUCCESS\tP50\tP95\tP99\tBYTES IN/OUT")
	for _, r := range rows {
		route := r.Authority + r.Path
		if r.TCP {
			route = "(tcp)"
		}
		p := func(v float64) string {
			if r.TCP {
				return "-"
			}
			return fmtMS(v)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%.1f%%\t%s\t%s\t%s\t%d/%d\n", r.Direction, r.Service, route, r.Count,
			100*r.Success, p(r.P50), p(r.P95), p(r.P99), r.BytesIn, r.BytesOut)
	}
	tw.Flush()
}

func newTopCmd(cl *cli) *cobra.Command {
	var tf tapFlags
	var interval, window time.Duration
	cmd := &cobra.Command{
		Use:   "top [SERVICE]",
		Short: "Live table of the busiest routes through this host (from the tap)",
		Long: `Aggregate the tap per direction, service, authority and path (TCP per
service): count, success rate (HTTP: a response below 500), latency
percentiles and bytes, redrawn every --interval. With -o json, tap for
--window and print one JSON snapshot.`,
		Args: func(c *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usageError{fmt.Errorf("top takes at most one SERVICE, got %d arguments", len(args))}
			}
			return nil
		},
	}
	tf.add(cmd)
	cmd.Flags().DurationVar(&interval, "interval", 2*time.Second, "redraw every")
	cmd.Flags().DurationVar(&window, "window", 10*time.Second, "with -o json: how long to aggregate before the snapshot")
	cmd.RunE = func(c *cobra.Command, args []string) error {
		f, err := tf.filter(args)
		if err != nil {
			return err
		}
		if interval <= 0 || window <= 0 {
			return usageError{errors.New("--interval and --window must be positive")}
		}
		ctx, cancel := interruptible(c.Context())
		defer cancel()
		if cl.json() {
			ctx, cancel = context.WithTimeout(ctx, window)
			defer cancel()
		}
		events := make(chan proxy.TapEvent, 1024)
		tapErr := make(chan error, 1)
		go func() {
			tapErr <- cl.control(ctx).Tap(ctx, f, func(l node.TapLine) error {
				select {
				case events <- l.TapEvent:
				case <-ctx.Done():
				}
				return nil
			})
			close(events)
		}()
		var agg topAgg
		start := time.Now()
		out := c.OutOrStdout()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		redraw := func() {
			if !cl.json() {
				fmt.Fprint(out, "\033[H\033[2J")
				printTop(out, agg.snapshot(), start)
			}
		}
		redraw()
		for {
			select {
			case ev, ok := <-events:
				if !ok {
					if err := <-tapErr; err != nil {
						return err
					}
					if cl.json() {
						enc := json.NewEncoder(out)
						enc.SetIndent("", "  ")
						return enc.Encode(agg.snapshot())
					}
					return nil
				}
				agg.add(&ev)
			case <-tick.C:
				redraw()
			}
		}
	}
	return cmd
}
