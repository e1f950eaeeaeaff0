package main

import (
	"context"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/vmesh/vmesh/node"
)

// Environment variables every command reads, below its flags.
const (
	envConfig = "VMESH_CONFIG" // the configuration file
	envAdmin  = "VMESH_ADMIN"  // the agent's admin address
	envSocket = "VMESH_SOCKET" // the agent's control socket
)

const defaultAdmin = "127.0.0.1:4191"

// cli holds the flags every command takes (--config, --admin, --socket,
// --output) and finds the running agent the same way for all of them:
// flags first, then the environment, then what the running agent says
// about itself (its config file, its socket), then the config file's
// settings, then the defaults.
type cli struct {
	configFlag string
	adminFlag  string
	socketFlag string
	output     string

	root *cobra.Command

	// Memoised per command run.
	statusDone bool
	st         *node.Status
	stErr      error
}

func (c *cli) addFlags(root *cobra.Command) {
	c.root = root
	f := root.PersistentFlags()
	f.StringVarP(&c.configFlag, "config", "c", "", "configuration file (env "+envConfig+"; default: the running agent's, else "+node.DefaultConfigPath+")")
	f.StringVar(&c.adminFlag, "admin", "", "the agent's admin address (env "+envAdmin+"; default: admin.addr of the config, else "+defaultAdmin+")")
	f.StringVar(&c.socketFlag, "socket", "", "the agent's control socket (env "+envSocket+"; default: the running agent's, else admin.socket of the config)")
	f.StringVarP(&c.output, "output", "o", "table", "output format of read commands: table or json")
}

func (c *cli) json() bool { return c.output == "json" }

func (c *cli) checkOutput() error {
	switch c.output {
	case "table", "json":
		return nil
	}
	return usageError{fmt.Errorf("--output must be table or json, got %q", c.output)}
}

// explicitConfig returns the config path given by flag or environment.
func (c *cli) explicitConfig() (string, bool) {
	if c.root.PersistentFlags().Changed("config") {
		return c.configFlag, true
	}
	if p := os.Getenv(envConfig); p != "" {
		return p, true
	}
	return "", false
}

// fileConfig loads the config file given explicitly, else the default one
// if it exists; ok is false when there is none to read.
func (c *cli) fileConfig() (cfg node.Config, path string, ok bool, err error) {
	path, explicit := c.explicitConfig()
	if !explicit {
		path = node.DefaultConfigPath
		if _, err := os.Stat(path); err != nil {
			return node.DefaultConfig(), "", false, nil
		}
	}
	cfg, err = node.LoadConfig(path)
	return cfg, path, true, err
}

// admin returns the admin address to ask.
func (c *cli) admin() string {
	if c.root.PersistentFlags().Changed("admin") {
		return c.adminFlag
	}
	if a := os.Getenv(envAdmin); a != "" {
		return a
	}
	if cfg, _, ok, err := c.fileConfig(); ok && err == nil {
		return cfg.Admin.Addr.String()
	}
	return defaultAdmin
}

// status asks the running agent about itself (once per command).
func (c *cli) status(ctx context.Context) (*node.Status, error) {
	if !c.statusDone {
		c.statusDone = true
		var st node.Status
		if err := adminGet(ctx, c.admin(), "/v1/status", &st); err != nil {
			c.stErr = err
		} else {
			c.st = &st
		}
	}
	return c.st, c.stErr
}

// configPath is the config file commands act on: explicit, else the
// running agent's, else the default. "" when the running agent has none
// (`vmesh agent -dev`) and none was given.
func (c *cli) configPath(ctx context.Context) string {
	if p, ok := c.explicitConfig(); ok {
		return p
	}
	if st, err := c.status(ctx); err == nil {
		return st.ConfigPath
	}
	return node.DefaultConfigPath
}

// config returns the configuration commands act on and where it came from:
// an explicit file; else the running agent's own (its file, or its
// in-memory config for a dev agent); else the default file.
func (c *cli) config(ctx context.Context) (node.Config, string, error) {
	if p, ok := c.explicitConfig(); ok {
		cfg, err := node.LoadConfig(p)
		return cfg, p, err
	}
	if _, err := c.status(ctx); err == nil {
		var cfg node.Config
		if err := adminGet(ctx, c.admin(), "/v1/config", &cfg); err != nil {
			return cfg, "", err
		}
		return cfg, "the running agent", nil
	}
	cfg, err := node.LoadConfig(node.DefaultConfigPath)
	return cfg, node.DefaultConfigPath, err
}

// socket returns the control socket to use.
func (c *cli) socket(ctx context.Context) string {
	if c.root.PersistentFlags().Changed("socket") {
		return c.socketFlag
	}
	if s := os.Getenv(envSocket); s != "" {
		return s
	}
	if st, err := c.status(ctx); err == nil && st.Socket != "" {
		return st.Socket
	}
	if cfg, _, ok, err := c.fileConfig(); ok && err == nil {
		return cfg.Admin.Socket
	}
	return node.DefaultConfig().Admin.Socket
}

// control returns a client for the agent's control socket.
func (c *cli) control(ctx context.Context) *node.ControlClient {
	return node.NewControlClient(c.socket(ctx))
}
