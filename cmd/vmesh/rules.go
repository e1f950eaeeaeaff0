package main

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmesh/vmesh/node"
	"github.com/vmesh/vmesh/rules"
)

func newRulesCmd(cl *cli) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rules",
		Short: "Show, install or remove the iptables redirect rules of a configuration",
		Long: `The configuration is the one given (--config or VMESH_CONFIG), else the
running agent's (its file, or the in-memory one of 'vmesh agent -dev'), else
` + node.DefaultConfigPath + `.`,
		Args: noArgs,
	}
	// load returns the configuration and its rules, for the uid the agent
	// runs as when the configuration is the running agent's.
	load := func(ctx context.Context) (node.Config, *rules.Ruleset, error) {
		cfg, from, err := cl.config(ctx)
		if err != nil {
			return cfg, nil, usageError{err}
		}
		uid := uint32(os.Getuid())
		if st, err := cl.status(ctx); err == nil && from == "the running agent" {
			uid = uint32(st.UID)
		}
		return cfg, rules.Build(cfg.RulesState(uid)), nil
	}
	applier := func(cfg node.Config) (*rules.Applier, error) {
		opts := cfg.Rules.ApplierOptions()
		opts.Logger = cliLogger()
		return rules.NewApplier(opts)
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "show",
		Short: "Print the rules the configuration asks for (iptables-save form; no root needed)",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			_, rs, err := load(c.Context())
			if err != nil {
				return err
			}
			if cl.json() {
				// The same lines, by family: {"iptables": [...], "ip6tables": [...]}.
				out := map[string][]string{}
				fam := ""
				for _, l := range strings.Split(rs.String(), "\n") {
					switch {
					case strings.HasPrefix(l, "# "):
						fam = strings.TrimPrefix(l, "# ")
						out[fam] = []string{}
					case l != "" && fam != "":
						out[fam] = append(out[fam], l)
					}
				}
				return printJSON(c.OutOrStdout(), out)
			}
			_, err = fmt.Fprint(c.OutOrStdout(), rs.String())
			return err
		},
	}, &cobra.Command{
		Use:   "install",
		Short: "Install (or converge to) the configuration's rules; the agent does this itself on start",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cfg, rs, err := load(c.Context())
			if err != nil {
				return err
			}
			a, err := applier(cfg)
			if err != nil {
				return err
			}
			return a.Apply(c.Context(), rs)
		},
	}, &cobra.Command{
		Use:   "uninstall",
		Short: "Remove every vmesh rule and chain (and nothing else)",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cfg, _, err := cl.config(c.Context())
			if err != nil {
				// Removing rules must work even with a broken config.
				cfg = node.DefaultConfig()
			}
			a, err := applier(cfg)
			if err != nil {
				return err
			}
			return a.Cleanup(c.Context())
		},
	})
	return cmd
}
