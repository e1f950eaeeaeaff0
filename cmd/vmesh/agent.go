package main

import (
	"errors"

	"github.com/spf13/cobra"

	"github.com/vmesh/vmesh/node"
)

func newAgentCmd() *cobra.Command {
	var configPath string
	var dev bool
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the vmesh agent (usually as the systemd service)",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			_ = dev
			if _, err := node.LoadConfig(configPath); err != nil {
				return usageError{err}
			}
			return errors.New("the agent is not wired yet")
		},
	}
	cmd.Flags().StringVarP(&configPath, "config", "c", node.DefaultConfigPath, "configuration file")
	cmd.Flags().BoolVar(&dev, "dev", false, "run a single host with a throw-away CA and data dir")
	return cmd
}
