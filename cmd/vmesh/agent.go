package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/vmesh/vmesh/ca"
	"github.com/vmesh/vmesh/node"
	"github.com/vmesh/vmesh/rules"
)

func newAgentCmd(cl *cli) *cobra.Command {
	var dev, cleanup, force bool
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the vmesh agent (usually as the systemd service)",
		Long: `Run the agent: CA client (and CA, with ca.role = "server"), gossip discovery,
the proxy and the iptables rules. SIGHUP reloads the configuration (a bad one
is refused and the running one stays); SIGTERM drains and stops.

  --dev       a single host with a throw-away CA and data dir, no join list.
  --cleanup   remove every vmesh iptables rule left behind and exit (systemd's
              ExecStopPost runs it, so a crash never leaves the host's
              networking redirected to a dead proxy).`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			configPath, explicit := cl.explicitConfig()
			if !explicit {
				configPath = node.DefaultConfigPath
			}
			if cleanup {
				return runCleanup(c.Context(), configPath, explicit, force)
			}
			var cfg node.Config
			var err error
			path := configPath
			if dev {
				cfg, err = devConfig(configPath, explicit)
				if err == nil {
					defer os.RemoveAll(cfg.Node.DataDir)
				}
				path = "" // the dev config lives only in memory: no reload
			} else {
				cfg, err = node.LoadConfig(configPath)
			}
			if err != nil {
				return usageError{err}
			}
			return runAgent(cfg, path, dev)
		},
	}
	cmd.Flags().BoolVar(&dev, "dev", false, "run a single host with a throw-away CA and data dir")
	cmd.Flags().BoolVar(&cleanup, "cleanup", false, "remove leftover vmesh iptables rules and exit (keeps them when rules.on_stop = \"keep\", unless --force)")
	cmd.Flags().BoolVar(&force, "force", false, "with --cleanup: remove the rules even when rules.on_stop = \"keep\"")
	return cmd
}

func runAgent(cfg node.Config, path string, dev bool) error {
	level := new(slog.LevelVar)
	level.Set(node.ParseLevel(cfg.Node.LogLevel))
	log := node.NewLevelLogger(os.Stderr, level, cfg.Node.LogFormat)
	a, err := node.New(node.Options{Config: cfg, ConfigPath: path, Logger: log, LogLevel: level,
		Version: agentVersion(), Dev: dev})
	if err != nil {
		return usageError{err}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-hup:
				a.Reload(ctx) // logs its own outcome
			case <-ctx.Done():
				return
			}
		}
	}()
	return a.Run(ctx)
}

// runCleanup removes leftover rules (systemd's ExecStopPost runs it, after a
// stop or a crash). With rules.on_stop = "keep" the operator chose fail
// closed, so it keeps them unless forced. It works without a valid config:
// a broken config must never keep an operator from restoring the network.
func runCleanup(ctx context.Context, path string, explicit, force bool) error {
	cfg, err := node.LoadConfig(path)
	if err != nil {
		if explicit {
			fmt.Fprintf(os.Stderr, "vmesh: %v\nvmesh: cleaning up with the default settings\n", err)
		}
		cfg = node.DefaultConfig()
	}
	if cfg.Rules.OnStop == "keep" && !force {
		fmt.Fprintln(os.Stderr, `vmesh: rules.on_stop = "keep": leaving the rules in place (fail closed); --force removes them`)
		return nil
	}
	if !force && node.RestartPending(ctx) {
		// The next agent starts at once and takes the kept sockets; if it
		// fails before it is ready, it removes the rules itself, and this
		// command runs again after it.
		fmt.Fprintln(os.Stderr, "vmesh: systemd is restarting vmesh: leaving the rules in place for the next agent")
		return nil
	}
	opts := cfg.Rules.ApplierOptions()
	opts.Logger = cliLogger()
	a, err := rules.NewApplier(opts)
	if err != nil {
		return err
	}
	if err := a.Cleanup(ctx); err != nil {
		return err
	}
	return node.CleanupVIPRoute(ctx, cfg)
}

// devConfig is a single-host configuration with a throw-away data dir and
// CA: the config file's settings when one is given, else the defaults.
func devConfig(path string, explicit bool) (node.Config, error) {
	cfg := node.DefaultConfig()
	if explicit {
		var err error
		if cfg, err = node.LoadConfig(path); err != nil {
			return cfg, err
		}
	}
	dir, err := os.MkdirTemp("", "vmesh-dev-")
	if err != nil {
		return cfg, err
	}
	cfg.Node.DataDir = dir
	cfg.Admin.Socket = filepath.Join(dir, "admin.sock")
	cfg.CA.Role = ca.RoleServer
	cfg.CA.Dir = filepath.Join(dir, "ca")
	cfg.CA.Token, cfg.CA.TokenFile = "", ""
	cfg.Gossip.Join = nil
	if os.Geteuid() != 0 {
		cfg.Rules.Enabled = false
	}
	fp, err := ca.Init(cfg.CA.Dir, cfg.CA.TrustDomain)
	if err != nil {
		os.RemoveAll(dir)
		return cfg, fmt.Errorf("creating the dev CA: %w", err)
	}
	fmt.Fprintf(os.Stderr, "vmesh dev: data dir %s, trust domain %s, root fingerprint %s\n", dir, cfg.CA.TrustDomain, fp)
	if !cfg.Rules.Enabled {
		fmt.Fprintln(os.Stderr, "vmesh dev: not root: iptables rules are off; dial the proxy at 127.0.0.1:4140 yourself")
	}
	return cfg, nil
}
