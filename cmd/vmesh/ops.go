package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmesh/vmesh/ca"
	"github.com/vmesh/vmesh/discovery"
	"github.com/vmesh/vmesh/node"
)

func newCACmd() *cobra.Command {
	cmd := &cobra.Command{Use: "ca", Short: "Manage the mesh's certificate authority", Args: noArgs}
	var td, dir string
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "Create the root and intermediate CA (ECDSA P-256); refuses to overwrite",
		Long: `Create a root (10 years) and an intermediate (1 year) for the trust domain in
DIR, keys mode 0600, and print the root's fingerprint. A host whose ca.dir
holds the intermediate can run with ca.role = "server". The root key can then
be moved offline.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if !ca.ValidTrustDomain(td) {
				return usageError{fmt.Errorf("--trust-domain %q is not a valid SPIFFE trust domain", td)}
			}
			fp, err := ca.Init(dir, td)
			if err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "CA created in %s for trust domain %s\nroot fingerprint: %s\n", dir, td, fp)
			return nil
		},
	}
	initCmd.Flags().StringVar(&td, "trust-domain", "vmesh.local", "SPIFFE trust domain")
	initCmd.Flags().StringVar(&dir, "dir", "/var/lib/vmesh/ca", "directory for the CA's keys and certificates")
	cmd.AddCommand(initCmd)
	return cmd
}

func newTokenCmd(cl *cli) *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Join tokens for new hosts", Args: noArgs}
	var nodeName string
	var services []string
	var ttl time.Duration
	create := &cobra.Command{
		Use:   "create",
		Short: "Mint a single-use join token on a CA host (asks the running agent)",
		Long: `Mint a one-time join token for host NODE, allowed the given services. The new
host puts it in ca.token (or ca.token_file); it is used once, on first start.
Runs on a CA host: the token is minted by the running agent over its control
socket.`,
		Args: noArgs,
	}
	create.RunE = func(c *cobra.Command, _ []string) error {
		if nodeName == "" {
			return usageError{fmt.Errorf("--node is required")}
		}
		var resp node.TokenResponse
		err := cl.control(c.Context()).Do(c.Context(), http.MethodPost, "/v1/token",
			node.TokenRequest{Node: nodeName, Services: services, TTL: ttl.String()}, &resp)
		if err != nil {
			return err
		}
		fmt.Fprintln(c.OutOrStdout(), resp.Token)
		return nil
	}
	create.Flags().StringVar(&nodeName, "node", "", "the new host's node name (required)")
	create.Flags().StringSliceVar(&services, "services", nil, "services the host may get certificates for (comma-separated)")
	create.Flags().DurationVar(&ttl, "ttl", 15*time.Minute, "how long the token is valid")
	list := newNodeListCmd(cl, "List the hosts this CA minted join tokens for: services granted, token expiry, joined, revoked")
	cmd.AddCommand(create, list)
	return cmd
}

// newNodeListCmd lists the nodes a CA host knows (`vmesh token list`,
// `vmesh node list`).
func newNodeListCmd(cl *cli, short string) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: short,
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			var nodes []ca.NodeInfo
			if err := cl.control(c.Context()).Do(c.Context(), http.MethodGet, "/v1/tokens", nil, &nodes); err != nil {
				return err
			}
			if cl.json() {
				return printJSON(c.OutOrStdout(), nodes)
			}
			tw := tabwriter.NewWriter(c.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NODE\tSERVICES\tTOKEN\tJOINED\tREVOKED")
			now := time.Now()
			for _, n := range nodes {
				tok := "expired " + n.TokenExpires.Format(time.RFC3339)
				switch {
				case !n.JoinedAt.IsZero():
					tok = "used"
				case n.TokenExpires.IsZero():
					tok = "-"
				case now.Before(n.TokenExpires):
					tok = "valid until " + n.TokenExpires.Format(time.RFC3339)
				}
				joined := "-"
				if !n.JoinedAt.IsZero() {
					joined = n.JoinedAt.Format(time.RFC3339)
				}
				svcs := strings.Join(n.Services, ",")
				if svcs == "" {
					svcs = "-"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%v\n", n.Node, svcs, tok, joined, n.Revoked)
			}
			return tw.Flush()
		},
	}
}

func newNodeCmd(cl *cli) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Manage mesh hosts on a CA host", Args: noArgs}
	revoke := &cobra.Command{
		Use:   "revoke NAME",
		Short: "Revoke NAME: every CA host refuses its renewals and every proxy its certificates, within seconds",
		Args:  exactArgs(1),
	}
	revoke.RunE = func(c *cobra.Command, args []string) error {
		if err := cl.control(c.Context()).Do(c.Context(), http.MethodPost, "/v1/revoke", node.NodeRequest{Node: args[0]}, nil); err != nil {
			return err
		}
		fmt.Fprintf(c.OutOrStdout(), "node %s revoked: its certificates are refused and will not be renewed\n", args[0])
		return nil
	}
	var services []string
	grant := &cobra.Command{
		Use:   "grant NAME --services a,b",
		Short: "Set the services NAME may get certificates for (all of them), without a new token",
		Long: `Grant replaces the services host NAME may get certificates for: list all of
them, old and new. Then add the new [[service]] to NAME's configuration and
reload its agent; it asks for the new certificate by itself.`,
		Args: exactArgs(1),
	}
	grant.Flags().StringSliceVar(&services, "services", nil, "every service the host may have (comma-separated)")
	grant.RunE = func(c *cobra.Command, args []string) error {
		if err := cl.control(c.Context()).Do(c.Context(), http.MethodPost, "/v1/grant", node.GrantRequest{Node: args[0], Services: services}, nil); err != nil {
			return err
		}
		fmt.Fprintf(c.OutOrStdout(), "node %s may now get certificates for: %s\n", args[0], strings.Join(services, ","))
		return nil
	}
	list := newNodeListCmd(cl, "List the hosts this CA knows: services granted, token, joined, revoked")
	cmd.AddCommand(revoke, grant, list)
	return cmd
}

func newKeygenCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "keygen [PATH]",
		Short: "Make a new gossip encryption key (base64, for gossip.key_file)",
		Long: `Make a new gossip encryption key. With PATH, write it there (mode 0600,
refusing to overwrite an existing file); without, print it.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			k, err := discovery.GenerateKey()
			if err != nil {
				return err
			}
			if len(args) == 0 {
				fmt.Fprintln(c.OutOrStdout(), k)
				return nil
			}
			return writeKeyFile(args[0], k)
		},
	}
}

// writeKeyFile creates path with mode 0600 (whatever the umask) and writes
// the key; an existing file is left alone.
func writeKeyFile(path, key string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("writing the gossip key: %w", err)
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("writing the gossip key: %w", err)
	}
	if _, err := fmt.Fprintln(f, key); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("writing the gossip key: %w", err)
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return fmt.Errorf("writing the gossip key: %w", err)
	}
	return nil
}

func newKeyringCmd(cl *cli) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "keyring",
		Short: "Rotate gossip keys on a running agent: install, use, remove, list",
		Long: `Rotate the cluster key without downtime: on every host 'install' the new key,
then on every host 'use' it, then 'remove' the old one (and update
gossip.key_file so a restart keeps the new key).`,
		Args: noArgs,
	}
	for _, op := range []string{"install", "use", "remove", "list"} {
		op := op
		sub := &cobra.Command{Use: op + map[bool]string{true: "", false: " KEY"}[op == "list"], Short: op + " a gossip key"}
		if op == "list" {
			sub.Args = noArgs
		} else {
			sub.Args = exactArgs(1)
		}
		sub.RunE = func(c *cobra.Command, args []string) error {
			req := node.KeyRequest{Op: op}
			if len(args) == 1 {
				req.Key = args[0]
			}
			var resp node.KeyResponse
			if err := cl.control(c.Context()).Do(c.Context(), http.MethodPost, "/v1/keyring", req, &resp); err != nil {
				return err
			}
			if cl.json() {
				return printJSON(c.OutOrStdout(), resp)
			}
			for i, k := range resp.Keys {
				mark := ""
				if i == 0 {
					mark = " (primary)"
				}
				fmt.Fprintf(c.OutOrStdout(), "%s%s\n", k, mark)
			}
			return nil
		}
		cmd.AddCommand(sub)
	}
	return cmd
}

func newReloadCmd(cl *cli) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "reload",
		Short: "Ask the running agent to re-read its configuration (like SIGHUP), and say whether it took",
		Args:  noArgs,
	}
	cmd.RunE = func(c *cobra.Command, _ []string) error {
		if err := cl.control(c.Context()).Do(c.Context(), http.MethodPost, "/v1/reload", nil, nil); err != nil {
			return err
		}
		fmt.Fprintln(c.OutOrStdout(), "configuration reloaded")
		return nil
	}
	return cmd
}

// adminGet fetches a JSON view from the admin API.
func adminGet(ctx context.Context, admin, path string, out any) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+admin+path, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the agent's admin API at %s (is it running?): %w", admin, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 32<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", path, resp.Status, strings.TrimSpace(string(body)))
	}
	return json.Unmarshal(body, out)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newMembersCmd(cl *cli) *cobra.Command {
	cmd := &cobra.Command{Use: "members", Short: "List the mesh's hosts as this agent sees them, with their agent version and roles", Args: noArgs}
	cmd.RunE = func(c *cobra.Command, _ []string) error {
		var ms []discovery.Member
		if err := adminGet(c.Context(), cl.admin(), "/v1/members", &ms); err != nil {
			return err
		}
		if cl.json() {
			return printJSON(c.OutOrStdout(), ms)
		}
		sort.Slice(ms, func(i, j int) bool { return ms[i].Name < ms[j].Name })
		tw := tabwriter.NewWriter(c.OutOrStdout(), 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tADDRESS\tSTATE\tSERVICES\tAGENT\tROLES")
		for _, m := range ms {
			agent, roles := m.Agent, strings.Join(m.Roles, ",")
			if agent == "" {
				agent = "-"
			}
			if roles == "" {
				roles = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", m.Name, m.Addr, m.State, m.Services, agent, roles)
		}
		return tw.Flush()
	}
	return cmd
}

func newServicesCmd(cl *cli) *cobra.Command {
	cmd := &cobra.Command{Use: "services", Short: "List the mesh's services and their endpoints", Args: noArgs}
	cmd.RunE = func(c *cobra.Command, _ []string) error {
		var entries []discovery.NodeEntry
		if err := adminGet(c.Context(), cl.admin(), "/v1/services", &entries); err != nil {
			return err
		}
		if cl.json() {
			return printJSON(c.OutOrStdout(), entries)
		}
		type row struct{ svc, name, vip, node, addr, proto, health string }
		var rows []row
		for _, e := range entries {
			for _, s := range e.Services {
				proto := s.Protocol
				if s.Opaque && proto != "opaque" {
					proto += " (opaque)"
				}
				addr := "-"
				if len(e.Addrs) > 0 {
					addr = fmt.Sprintf("%s:%d", e.Addrs[0], s.Port)
				}
				vip := s.VIP
				if vip == "" {
					vip = "-"
				}
				name := s.DNSName
				if name == "" {
					name = "-"
				}
				rows = append(rows, row{s.Name, name, vip, e.Node, addr, proto, string(s.Health)})
			}
		}
		sort.Slice(rows, func(i, j int) bool {
			if rows[i].svc != rows[j].svc {
				return rows[i].svc < rows[j].svc
			}
			return rows[i].node < rows[j].node
		})
		tw := tabwriter.NewWriter(c.OutOrStdout(), 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "SERVICE\tDNS NAME\tVIP\tNODE\tADDRESS\tPROTOCOL\tHEALTH")
		for _, r := range rows {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.svc, r.name, r.vip, r.node, r.addr, r.proto, r.health)
		}
		return tw.Flush()
	}
	return cmd
}
