package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/vmesh/vmesh/node"
	"github.com/vmesh/vmesh/rules"
)

func newRulesCmd() *cobra.Command {
	var configPath string
	cmd := &cobra.Command{
		Use:   "rules",
		Short: "Show, install or remove the iptables redirect rules of a configuration",
		Args:  noArgs,
	}
	cmd.PersistentFlags().StringVarP(&configPath, "config", "c", node.DefaultConfigPath, "configuration file")
	load := func() (node.Config, *rules.Ruleset, error) {
		cfg, err := node.LoadConfig(configPath)
		if err != nil {
			return cfg, nil, usageError{err}
		}
		return cfg, rules.Build(cfg.RulesState(uint32(os.Getuid()))), nil
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
			_, rs, err := load()
			if err != nil {
				return err
			}
			_, err = fmt.Fprint(c.OutOrStdout(), rs.String())
			return err
		},
	}, &cobra.Command{
		Use:   "install",
		Short: "Install (or converge to) the configuration's rules; the agent does this itself on start",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cfg, rs, err := load()
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
			cfg, err := node.LoadConfig(configPath)
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
