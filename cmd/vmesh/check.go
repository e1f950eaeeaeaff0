package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmesh/vmesh/ca"
	"github.com/vmesh/vmesh/internal/field"
	"github.com/vmesh/vmesh/node"
)

// checkResult is one line of `vmesh check`.
type checkResult struct {
	Name   string `json:"name"`
	Status string `json:"status"` // ok, warn, fail
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

func newCheckCmd() *cobra.Command {
	var configPath string
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Tell what is wrong with this host's mesh set-up, and how to fix it",
		Long: `Check the configuration, the running agent, its iptables rules, certificates,
CA, gossip membership and listeners. Each problem comes with a one-line fix.
Exit code 0: all green (warnings allowed); 1: something fails.`,
		Args: noArgs,
	}
	admin, output := outputFlags(cmd)
	cmd.Flags().StringVarP(&configPath, "config", "c", node.DefaultConfigPath, "configuration file")
	cmd.RunE = func(c *cobra.Command, _ []string) error {
		results := runChecks(c.Context(), configPath, *admin, time.Now())
		failed := false
		for _, r := range results {
			failed = failed || r.Status == "fail"
		}
		if *output == "json" {
			printJSON(c.OutOrStdout(), results)
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

func runChecks(ctx context.Context, configPath, admin string, now time.Time) []checkResult {
	var out []checkResult
	add := func(name, status, detail, fix string) {
		out = append(out, checkResult{name, status, detail, fix})
	}
	cfg, err := node.LoadConfig(configPath)
	if err != nil {
		var list field.List
		detail := err.Error()
		if errors.As(err, &list) {
			detail = fmt.Sprintf("%d problem(s), first: %s", len(list), list[0])
		}
		add("config", "fail", detail, "vmesh config check "+configPath+" lists every problem with its line")
		return out
	}
	add("config", "ok", configPath+" is valid", "")

	var st node.Status
	if err := adminGet(ctx, admin, "/v1/status", &st); err != nil {
		add("agent", "fail", "the agent is not running or its admin API is unreachable: "+err.Error(),
			"systemctl start vmesh; then journalctl -u vmesh -e")
		return out
	}
	if st.Ready {
		add("agent", "ok", "running and ready as "+st.Identity, "")
	} else {
		add("agent", "fail", "running but not ready: "+st.NotReady, "journalctl -u vmesh -e says why")
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

	switch {
	case !st.Rules.Enabled:
		add("iptables", "warn", "rules are disabled (rules.enabled = false): apps must dial the proxy themselves", "set rules.enabled = true")
	case st.Rules.Error != "":
		add("iptables", "fail", st.Rules.Error, "install iptables and run the agent with CAP_NET_ADMIN")
	case st.Rules.Drift != "":
		add("iptables", "fail", "rules are missing or not current ("+st.Rules.Backend+"): "+firstLine(st.Rules.Drift),
			"systemctl reload vmesh (or vmesh rules install -c "+configPath+")")
	default:
		add("iptables", "ok", "rules installed and current ("+st.Rules.Backend+" backend)", "")
	}

	if len(st.Identities) == 0 {
		add("certificates", "fail", "no certificates yet", "give the host a join token (ca.token_file) from `vmesh token create` on a CA host")
	}
	for _, id := range st.Identities {
		left := id.NotAfter.Sub(now)
		life := id.NotAfter.Sub(id.NotBefore)
		switch {
		case left <= 0:
			add("certificate "+id.ID, "fail", "expired at "+id.NotAfter.Format(time.RFC3339),
				"the CA is unreachable or refused renewal: see the CA check and journalctl -u vmesh")
		case left < life/6:
			add("certificate "+id.ID, "warn", fmt.Sprintf("expires in %s and was due for renewal at %s", left.Round(time.Second), id.RenewAt.Format(time.RFC3339)),
				"renewal is failing: check that the CA is reachable")
		default:
			add("certificate "+id.ID, "ok", "valid until "+id.NotAfter.Format(time.RFC3339), "")
		}
	}

	caAddr := ""
	switch {
	case cfg.CA.Role == ca.RoleServer:
		caAddr = net.JoinHostPort("127.0.0.1", fmt.Sprint(cfg.CA.ListenAddr.Port()))
	case st.CAURL != "":
		if u, err := url.Parse(st.CAURL); err == nil {
			caAddr = u.Host
		}
	}
	if caAddr != "" {
		if err := probeTCP(ctx, caAddr); err != nil {
			add("ca", "fail", "cannot reach the CA at "+caAddr+": "+err.Error(),
				"start the CA host's agent, or open TCP "+caAddr+" between the hosts")
		} else {
			add("ca", "ok", "CA reachable at "+caAddr, "")
		}
	}

	alive := 0
	for _, m := range st.Members {
		if m.State == "alive" {
			alive++
		}
	}
	switch {
	case alive <= 1 && len(cfg.Gossip.Join) > 0:
		add("gossip", "fail", fmt.Sprintf("alone: %d member(s) alive although gossip.join lists %v", alive, cfg.Gossip.Join),
			"open TCP and UDP 7946 between the hosts and use the same gossip key on all of them")
	default:
		add("gossip", "ok", fmt.Sprintf("%d member(s) alive", alive), "")
	}
	if st.GossipKeyed {
		add("gossip encryption", "ok", "gossip is encrypted", "")
	} else {
		add("gossip encryption", "warn", "gossip is not encrypted", "vmesh keygen > /etc/vmesh/gossip.key on one host, copy it to all, set gossip.key_file")
	}
	return out
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
