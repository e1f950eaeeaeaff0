package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"
	"github.com/spf13/cobra"

	"github.com/vmesh/vmesh/ca"
	"github.com/vmesh/vmesh/internal/field"
	"github.com/vmesh/vmesh/node"
	"github.com/vmesh/vmesh/proxy"
	"github.com/vmesh/vmesh/rules"
)

// checkResult is one line of `vmesh check`.
type checkResult struct {
	Name   string `json:"name"`
	Status string `json:"status"` // ok, warn, fail
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

// checkReport is `vmesh check -o json`.
type checkReport struct {
	OK     bool          `json:"ok"`
	Checks []checkResult `json:"checks"`
}

// checkEnv is what the checks look at besides the agent's answers; tests
// replace the parts that need root or a real host.
type checkEnv struct {
	// ConfigPath is the config file given explicitly, "" if none.
	ConfigPath string
	// Admin is the agent's admin address.
	Admin string
	Now   time.Time
	// Leftovers lists vmesh's iptables rules on the host (one per line).
	Leftovers func(ctx context.Context, cfg node.Config) (string, error)
	// Dial connects to a service where the proxy dials it.
	Dial func(ctx context.Context, cfg node.Config, addr netip.AddrPort) error
	// Listeners lists the addresses listening on a TCP port.
	Listeners func(port uint16) []netip.AddrPort
	// Skew measures the offset of the CA host's clock from ours.
	Skew func(ctx context.Context, caURL string) (time.Duration, error)
	// Resolver is where the host's apps send DNS queries.
	Resolver func() netip.AddrPort
	// Query asks a DNS server.
	Query func(ctx context.Context, server netip.AddrPort, name string, qtype uint16) (*dns.Msg, error)
}

func hostCheckEnv(configPath, admin string) checkEnv {
	return checkEnv{
		ConfigPath: configPath, Admin: admin, Now: time.Now(),
		Leftovers: leftoverRules, Dial: dialService, Listeners: tcpListeners, Skew: caClockSkew,
		Resolver: hostResolver, Query: dnsQuery,
	}
}

func newCheckCmd(cl *cli) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Tell what is wrong with this host's mesh set-up, and how to fix it",
		Long: `Check the configuration, the running agent (found as every command finds it:
--admin, VMESH_ADMIN, the config's admin.addr), leftover iptables rules, each
declared service (reachable where the proxy dials it, healthy, certificate
granted), certificates and their expiry, the CA and the clock, gossip
membership and keys, listeners, and DNS (a live query through the capture,
or the resolver lines to add when capture is off). Every check runs, whatever failed before;
each problem comes with a one-line fix.
Exit code 0: the host works (warnings allowed); 1: something fails.`,
		Args: noArgs,
	}
	cmd.RunE = func(c *cobra.Command, _ []string) error {
		path, _ := cl.explicitConfig()
		results := runChecks(c.Context(), hostCheckEnv(path, cl.admin()))
		failed := false
		for _, r := range results {
			failed = failed || r.Status == "fail"
		}
		if cl.json() {
			printJSON(c.OutOrStdout(), checkReport{OK: !failed, Checks: results})
		} else {
			printChecks(c.OutOrStdout(), results)
		}
		if failed {
			return silentError{exitFailure}
		}
		return nil
	}
	return cmd
}

func printChecks(w io.Writer, results []checkResult) {
	marks := map[string]string{"ok": "√", "warn": "‼", "fail": "×"}
	for _, r := range results {
		fmt.Fprintf(w, "%s %s: %s\n", marks[r.Status], r.Name, r.Detail)
		if r.Fix != "" && r.Status != "ok" {
			fmt.Fprintf(w, "    fix: %s\n", r.Fix)
		}
	}
}

// runChecks runs every check and returns them in order. None stops the
// others: a broken config or a dead agent still leaves the checks that
// can run without them.
func runChecks(ctx context.Context, env checkEnv) []checkResult {
	var out []checkResult
	add := func(name, status, detail, fix string) {
		out = append(out, checkResult{name, status, detail, fix})
	}

	var st *node.Status
	var stErr error
	{
		var s node.Status
		if stErr = adminGet(ctx, env.Admin, "/v1/status?rules=fresh", &s); stErr == nil {
			st = &s
		}
	}

	// The configuration: the file given, else the running agent's file,
	// else the default path. The checks below use the running agent's
	// configuration when there is one (what it applies), else the file's,
	// else the defaults.
	path := env.ConfigPath
	if path == "" && st != nil {
		path = st.ConfigPath
	}
	if path == "" && st == nil {
		path = node.DefaultConfigPath
	}
	cfg := node.DefaultConfig()
	fileOK := false
	switch {
	case path == "" && st.Dev:
		add("config", "ok", "the agent runs without a config file (vmesh agent -dev)", "")
	case path == "":
		add("config", "warn", "the agent runs without a config file: it cannot be reloaded", "start it with -c FILE")
	default:
		fc, err := node.LoadConfig(path)
		var list field.List
		switch {
		case errors.As(err, &list):
			detail := fmt.Sprintf("%s has %d problem(s): %s", path, len(list), list[0])
			if len(list) > 1 {
				detail += fmt.Sprintf(" (and %d more)", len(list)-1)
			}
			add("config", "fail", detail, "vmesh config check "+path+" lists every problem with its line")
		case err != nil:
			add("config", "fail", err.Error(), "write the configuration: vmesh config default > "+path+", then edit it")
		default:
			cfg, fileOK = fc, true
			add("config", "ok", path+" is valid", "")
		}
	}
	if st != nil {
		var running node.Config
		if err := adminGet(ctx, env.Admin, "/v1/config", &running); err == nil {
			if fileOK && path == st.ConfigPath && !sameConfig(cfg, running) {
				add("config reload", "warn", path+" differs from the configuration the agent runs",
					"vmesh reload (or systemctl reload vmesh) applies it; it says which settings need a restart")
			}
			cfg = running
		}
	}

	// The agent, and what a dead one leaves behind.
	if st == nil {
		add("agent", "fail", "not running: nothing answers at "+env.Admin+": "+stErr.Error(),
			"systemctl start vmesh; then journalctl -u vmesh -e")
		checkLeftovers(ctx, env, cfg, add)
	} else {
		checkAgent(ctx, env, cfg, st, add)
	}
	checkServices(ctx, env, cfg, st, add)
	if st != nil {
		checkMesh(ctx, env, cfg, st, add)
		checkDNS(ctx, env, cfg, st, add)
	}
	return out
}

// sameConfig compares two configurations as the agent serves them.
func sameConfig(a, b node.Config) bool {
	a.CA.Token, b.CA.Token = "", ""
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	var va, vb any
	json.Unmarshal(ja, &va)
	json.Unmarshal(jb, &vb)
	return reflect.DeepEqual(va, vb)
}

type addFunc func(name, status, detail, fix string)

// checkLeftovers: with no agent, vmesh rules still installed send the
// host's traffic to a proxy that is not there.
func checkLeftovers(ctx context.Context, env checkEnv, cfg node.Config, add addFunc) {
	left, err := env.Leftovers(ctx, cfg)
	switch {
	case err != nil:
		add("iptables", "warn", "cannot read the nat table to look for rules a dead agent left: "+err.Error(),
			"run vmesh check as root")
	case left != "":
		lines := strings.Split(strings.TrimSpace(left), "\n")
		add("iptables", "fail", fmt.Sprintf("%d vmesh rule(s) are installed but no agent runs: the host's redirected TCP goes to a dead proxy and fails: %s",
			len(lines), strings.Join(lines[:min(len(lines), 3)], "; ")),
			"vmesh agent --cleanup removes them (or start the agent: systemctl start vmesh)")
	default:
		add("iptables", "ok", "no vmesh rules installed (no agent runs; traffic flows unmeshed)", "")
	}
}

func checkAgent(ctx context.Context, env checkEnv, cfg node.Config, st *node.Status, add addFunc) {
	version := ""
	if st.Version != "" {
		version = " (" + st.Version + ")"
	}
	if st.Ready {
		add("agent", "ok", "running and ready as "+st.Identity+version, "")
	} else {
		add("agent", "fail", "running but not ready: "+st.NotReady+version, "see the checks below, and journalctl -u vmesh -e")
	}
	switch {
	case st.UID == 0 && cfg.Rules.ProxyMark == 0 && cfg.Rules.ProxyUID < 0:
		add("user", "warn", "the agent runs as root without rules.proxy_mark, so all of root's connections bypass the mesh",
			"run it as the vmesh user (systemd/vmesh.service does) or set rules.proxy_mark")
	case st.UID == 0:
		add("user", "ok", "the agent runs as root; only its own marked connections are exempt from redirection", "")
	default:
		add("user", "ok", fmt.Sprintf("the agent runs as uid %d; that uid's traffic is exempt from redirection", st.UID), "")
	}
	switch {
	case st.Outbound == "" || st.Inbound == "":
		add("listeners", "fail", "the proxy listeners are not bound", "check `ss -ltnp` for another process on "+cfg.Proxy.OutboundAddr.String()+" or "+cfg.Proxy.InboundAddr.String())
	default:
		add("listeners", "ok", "outbound "+st.Outbound+", inbound "+st.Inbound, "")
	}
	backend := st.Rules.Backend
	if backend == "" {
		backend = "unknown"
	}
	switch {
	case !st.Rules.Enabled:
		add("iptables", "warn", "rules are disabled (rules.enabled = false): apps must dial the proxy themselves", "set rules.enabled = true")
	case !st.Rules.Installed:
		detail := "no rules installed yet"
		if st.Rules.Pending != "" {
			detail = "rules " + st.Rules.Pending
		}
		add("iptables", "fail", detail+": the host's traffic is not meshed", "the agent installs them once it has its certificates: see the certificate checks")
	case st.Rules.Error != "":
		add("iptables", "fail", st.Rules.Error+" ("+backend+" backend)", "install iptables and run the agent with CAP_NET_ADMIN")
	case st.Rules.Drift != "":
		add("iptables", "fail", "rules are missing or not current ("+backend+" backend): "+firstLine(st.Rules.Drift),
			"vmesh reload puts them back (or systemctl reload vmesh)")
	default:
		add("iptables", "ok", "rules installed and current ("+backend+" backend)", "")
	}

	if why, ok := st.CertFailures[""]; ok && len(st.Identities) == 0 {
		add("certificates", "fail", "no node certificate: "+why, "give the host a new join token (ca.token_file) from `vmesh token create --node "+st.Node+"` on a CA host")
	} else if len(st.Identities) == 0 {
		add("certificates", "fail", "no certificates yet", "give the host a join token (ca.token_file) from `vmesh token create` on a CA host")
	}
	for _, id := range st.Identities {
		left := id.NotAfter.Sub(env.Now)
		life := id.NotAfter.Sub(id.NotBefore)
		name := "certificate " + id.ID
		switch {
		case left <= 0:
			add(name, "fail", "expired at "+id.NotAfter.Format(time.RFC3339),
				"the CA is unreachable or refused renewal: see the CA check and journalctl -u vmesh")
		case left < life/6:
			add(name, "warn", fmt.Sprintf("expires in %s and was due for renewal at %s", left.Round(time.Second), id.RenewAt.Format(time.RFC3339)),
				"renewal is failing: check that the CA is reachable")
		case id.NotBefore.After(env.Now):
			add(name, "fail", "not valid before "+id.NotBefore.Format(time.RFC3339)+": this host's clock is behind",
				"synchronise the clock (timedatectl set-ntp true)")
		default:
			add(name, "ok", fmt.Sprintf("valid until %s (%s left), renewal due %s", id.NotAfter.Format(time.RFC3339),
				left.Round(time.Minute), id.RenewAt.Format(time.RFC3339)), "")
		}
	}
}

// checkServices checks each declared service where the proxy dials it,
// its health and its certificate. Without an agent only reachability can
// be checked.
func checkServices(ctx context.Context, env checkEnv, cfg node.Config, st *node.Status, add addFunc) {
	byName := map[string]node.ServiceStatus{}
	if st != nil {
		for _, s := range st.Services {
			byName[s.Name] = s
		}
	}
	for _, s := range cfg.Services {
		name := "service " + s.Name
		target := s.Target()
		var problems []string
		fixes := []string{}
		status := "ok"
		if err := env.Dial(ctx, cfg, target); err != nil {
			status = "fail"
			msg := fmt.Sprintf("nothing answers at %s, where the proxy dials it (%v)", target, err)
			if ls := env.Listeners(s.Port); len(ls) > 0 {
				var at []string
				for _, l := range ls {
					at = append(at, l.String())
				}
				msg += "; the app listens on " + strings.Join(at, ", ")
				fixes = append(fixes, fmt.Sprintf("set address = %q in the [[service]] named %s (or bind the app to 127.0.0.1 or 0.0.0.0)", ls[0].Addr(), s.Name))
			} else {
				fixes = append(fixes, "start the app, listening on "+target.String())
			}
			problems = append(problems, msg)
		}
		if ss, ok := byName[s.Name]; ok {
			switch ss.Health {
			case "passing":
			case "failing":
				status = "fail"
				problems = append(problems, "its health check fails (peers do not send it traffic)")
				if len(fixes) == 0 {
					fixes = append(fixes, "see the app, and the health check in [service.health]")
				}
			default:
				if status == "ok" {
					status = "warn"
				}
				problems = append(problems, "health not known yet")
			}
			if ss.Certificate != "granted" {
				status = "fail"
				why := "the CA has not issued its certificate yet"
				if ss.CertError != "" {
					why = "the CA refused its certificate: " + ss.CertError
				}
				problems = append(problems, why)
				fixes = append(fixes, fmt.Sprintf("on a CA host: vmesh node grant %s --services %s", st.Node, strings.Join(serviceList(cfg), ",")))
			}
		}
		if len(problems) == 0 {
			add(name, "ok", fmt.Sprintf("reachable at %s, healthy, certificate granted", target), "")
		} else {
			add(name, status, strings.Join(problems, "; "), strings.Join(fixes, "; "))
		}
		// Every client seen is meshed, yet the service still takes
		// plaintext: anyone on the network may connect in clear.
		if ss, ok := byName[s.Name]; ok && ss.Policy == "all-unauthenticated" && ss.InboundMTLS > 0 && ss.InboundPlain == 0 {
			add(name+" policy", "warn",
				fmt.Sprintf("every client seen is meshed (%d mTLS connections, none in clear) but the policy is all-unauthenticated: anyone on the network may connect in clear", ss.InboundMTLS),
				fmt.Sprintf("set policy = \"all-authenticated\" in the [[service]] named %s (or proxy.default_policy), then vmesh reload", s.Name))
		}
	}
}

func serviceList(cfg node.Config) []string {
	out := make([]string, 0, len(cfg.Services))
	for _, s := range cfg.Services {
		out = append(out, s.Name)
	}
	return out
}

// checkMesh checks the CA, the clock and gossip.
func checkMesh(ctx context.Context, env checkEnv, cfg node.Config, st *node.Status, add addFunc) {
	var clocks []peerClock
	caURL := ""
	switch {
	case cfg.CA.Role == ca.RoleServer:
		caURL = "https://" + net.JoinHostPort("127.0.0.1", fmt.Sprint(cfg.CA.ListenAddr.Port()))
	case st.CAURL != "":
		caURL = st.CAURL
	}
	if caURL != "" {
		u, _ := url.Parse(caURL)
		caAddr := caURL
		if u != nil {
			caAddr = u.Host
		}
		if err := probeTCP(ctx, caAddr); err != nil {
			add("ca", "fail", "cannot reach the CA at "+caAddr+": "+err.Error(),
				"start the CA host's agent, or open TCP "+caAddr+" between the hosts")
		} else {
			add("ca", "ok", "CA reachable at "+caAddr, "")
			if cfg.CA.Role != ca.RoleServer {
				skew, err := env.Skew(ctx, caURL)
				if err != nil {
					add("clock", "warn", "cannot compare the clock with the CA host's: "+err.Error(), "")
				} else {
					clocks = append(clocks, peerClock{"the CA host", skew})
				}
			}
		}
	}
	for _, m := range st.Members {
		if m.State == "alive" && m.ClockOffset != nil && m.Name != st.Node {
			clocks = append(clocks, peerClock{m.Name, *m.ClockOffset})
		}
	}
	if len(clocks) > 0 {
		worst := clocks[0]
		for _, c := range clocks[1:] {
			if c.offset.Abs() > worst.offset.Abs() {
				worst = c
			}
		}
		off := fmt.Sprintf("%s's clock is %s off this host's", worst.name, worst.offset.Round(time.Second))
		switch {
		case worst.offset.Abs() >= time.Minute:
			add("clock", "fail", off+": certificates look not yet valid or expired to peers",
				"synchronise the clocks (timedatectl set-ntp true) on both hosts")
		case worst.offset.Abs() >= 10*time.Second:
			add("clock", "warn", off, "synchronise the clocks (timedatectl set-ntp true)")
		default:
			add("clock", "ok", fmt.Sprintf("in step with %d peer(s) (at most %s off, %s)", len(clocks), worst.offset.Round(time.Second), worst.name), "")
		}
	}

	alive := 0
	for _, m := range st.Members {
		if m.State == "alive" {
			alive++
		}
	}
	g := st.Gossip
	recentDecrypt := g.DecryptFailures > 0 && env.Now.Sub(g.LastDecryptFailure) < 10*time.Minute
	switch {
	case recentDecrypt:
		add("gossip", "fail", fmt.Sprintf("gossip from %s could not be decrypted (no installed keys could decrypt the message; %d time(s), last at %s): the hosts use different gossip keys; %d member(s) alive",
			g.LastDecryptFrom, g.DecryptFailures, g.LastDecryptFailure.Format(time.RFC3339), alive),
			"copy the same gossip.key_file to every host and restart the odd one out (vmesh keyring list shows this host's keys)")
	case alive <= 1 && len(cfg.Gossip.Join) > 0:
		detail := fmt.Sprintf("alone: %d member(s) alive although gossip.join lists %v", alive, cfg.Gossip.Join)
		if g.JoinError != "" {
			detail += "; the last join failed: " + g.JoinError
		}
		fix := "open TCP and UDP 7946 between the hosts and use the same gossip key on all of them"
		switch je := strings.ToLower(g.JoinError); {
		case strings.Contains(je, "encryption is not configured"):
			fix = "the cluster's gossip is encrypted and this host has no key: copy the cluster's key file and set gossip.key_file"
		case strings.Contains(je, "remote state is not encrypted"):
			fix = "the peer's gossip is not encrypted but this host's is: use the same gossip.key_file on every host"
		}
		add("gossip", "fail", detail, fix)
	default:
		add("gossip", "ok", fmt.Sprintf("%d member(s) alive", alive), "")
	}
	if st.GossipKeyed {
		add("gossip encryption", "ok", "gossip is encrypted", "")
	} else {
		add("gossip encryption", "warn", "gossip is not encrypted", "vmesh keygen /etc/vmesh/gossip.key on one host, copy it to all, set gossip.key_file")
	}
}

// peerClock is another host's clock offset from ours.
type peerClock struct {
	name   string
	offset time.Duration
}

func probeTCP(ctx context.Context, addr string) error {
	d := net.Dialer{Timeout: 3 * time.Second}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	return c.Close()
}

func firstLine(s string) string {
	for i, r := range s {
		if r == '\n' {
			return s[:i] + " …"
		}
	}
	return s
}

// leftoverRules lists the vmesh rules installed on the host.
func leftoverRules(ctx context.Context, cfg node.Config) (string, error) {
	if os.Geteuid() != 0 {
		return "", fmt.Errorf("not root (uid %d)", os.Geteuid())
	}
	opts := cfg.Rules.ApplierOptions()
	opts.Logger = cliLogger()
	a, err := rules.NewApplier(opts)
	if err != nil {
		return "", err
	}
	// What Apply would do to remove everything is exactly what is there.
	return a.Installed(ctx, nil)
}

// dialService connects to addr as the proxy would: with the proxy's mark
// when root (so the rules never redirect the check itself).
func dialService(ctx context.Context, cfg node.Config, addr netip.AddrPort) error {
	mark := cfg.Rules.ProxyMark
	if os.Geteuid() != 0 {
		mark = 0
	}
	d := proxy.MarkDialer(mark, 3*time.Second)
	c, err := d.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Err != nil {
			return oe.Err
		}
		return err
	}
	return c.Close()
}

// tcpListeners reads /proc/net/tcp{,6} for sockets listening on port.
func tcpListeners(port uint16) []netip.AddrPort {
	var out []netip.AddrPort
	for _, f := range []string{"/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"} {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		sc.Scan()
		for sc.Scan() {
			fl := strings.Fields(sc.Text())
			if len(fl) < 4 || fl[3] != "0A" { // TCP_LISTEN
				continue
			}
			if ap, ok := parseProcAddr(fl[1]); ok && ap.Port() == port {
				out = append(out, ap)
			}
		}
		fh.Close()
	}
	return out
}

// parseProcAddr parses "0100007F:1F90" (IPv4) or the 32-digit IPv6 form:
// each 32-bit word in host (little-endian) order.
func parseProcAddr(s string) (netip.AddrPort, bool) {
	hexAddr, hexPort, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, false
	}
	b, err := hex.DecodeString(hexAddr)
	if err != nil || (len(b) != 4 && len(b) != 16) {
		return netip.AddrPort{}, false
	}
	for i := 0; i < len(b); i += 4 {
		b[i], b[i+1], b[i+2], b[i+3] = b[i+3], b[i+2], b[i+1], b[i]
	}
	p, err := strconv.ParseUint(hexPort, 16, 16)
	if err != nil {
		return netip.AddrPort{}, false
	}
	a, _ := netip.AddrFromSlice(b)
	return netip.AddrPortFrom(a.Unmap(), uint16(p)), true
}

// caClockSkew compares the CA host's clock (its HTTP Date header) with
// ours. Only the header is used, so the CA's certificate is not verified.
func caClockSkew(ctx context.Context, caURL string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // only the Date header is read
	defer hc.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(caURL, "/")+"/1.0/health", nil)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	end := time.Now()
	date, err := http.ParseTime(resp.Header.Get("Date"))
	if err != nil {
		return 0, fmt.Errorf("the CA sent no usable Date header: %w", err)
	}
	mid := start.Add(end.Sub(start) / 2)
	// Date has a resolution of one second: round to it.
	return date.Sub(mid.Truncate(time.Second)), nil
}
