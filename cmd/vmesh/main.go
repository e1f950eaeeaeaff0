// Command vmesh is the vmesh agent and its operator CLI. It is thin: it
// parses flags and calls the packages; node does the work.
package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmesh/vmesh/node"
)

// Exit codes scripts can rely on.
const (
	exitOK      = 0
	exitFailure = 1 // the command ran and something is wrong
	exitUsage   = 2 // bad flags, arguments or configuration
)

// usageError marks errors that are the caller's (flags, arguments, config).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// silentError is an error whose message the command already printed.
type silentError struct{ code int }

func (e silentError) Error() string { return fmt.Sprintf("exit %d", e.code) }

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	root := newRootCmd()
	root.SetArgs(goStyleFlags(args))
	err := root.Execute()
	var se silentError
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &se):
		return se.code
	case errors.As(err, &ue):
		fmt.Fprintln(os.Stderr, "vmesh:", err)
		return exitUsage
	default:
		fmt.Fprintln(os.Stderr, "vmesh:", err)
		return exitFailure
	}
}

// goStyleFlags accepts Go-style single-dash long flags (`vmesh agent -dev`,
// `-config FILE`) by rewriting them to the double-dash form cobra parses.
func goStyleFlags(args []string) []string {
	long := map[string]bool{"dev": true, "cleanup": true, "config": true, "socket": true, "admin": true, "output": true,
		"version": true, "window": true, "force": true,
		"direction": true, "identity": true, "path": true, "method": true, "count": true, "interval": true}
	out := make([]string, len(args))
	for i, a := range args {
		name := strings.SplitN(strings.TrimPrefix(a, "-"), "=", 2)[0]
		if len(a) > 2 && a[0] == '-' && a[1] != '-' && long[name] {
			a = "-" + a
		}
		out[i] = a
	}
	return out
}

func newRootCmd() *cobra.Command {
	c := &cli{}
	root := &cobra.Command{
		Use:   "vmesh",
		Short: "A service mesh for plain VMs: mTLS, identity, authorization and metrics",
		Long: `vmesh is a service mesh for plain VMs and bare-metal hosts. Every host runs one
agent that joins a gossip cluster, takes its certificates from an embedded CA,
redirects the host's TCP traffic through itself with iptables, and proxies it
with mTLS, protocol detection, authorization and golden metrics.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       versionString(),
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return c.checkOutput()
		},
	}
	root.SetVersionTemplate("{{.Version}}\n")
	c.addFlags(root)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usageError{fmt.Errorf("%w (see '%s --help')", err, c.CommandPath())}
	})
	root.AddCommand(
		newAgentCmd(c),
		newConfigCmd(c),
		newVersionCmd(c),
		newStatCmd(c),
		newRulesCmd(c),
		newCACmd(),
		newTokenCmd(c),
		newNodeCmd(c),
		newKeygenCmd(),
		newKeyringCmd(c),
		newReloadCmd(c),
		newMembersCmd(c),
		newServicesCmd(c),
		newCheckCmd(c),
		newTapCmd(c),
		newTopCmd(c),
		newPingCmd(c),
	)
	return root
}

// exactArgs is cobra.ExactArgs with a usage exit code.
func exactArgs(n int) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if err := cobra.ExactArgs(n)(c, args); err != nil {
			return usageError{err}
		}
		return nil
	}
}

// noArgs refuses positional arguments with a usage exit code.
func noArgs(c *cobra.Command, args []string) error {
	if err := cobra.NoArgs(c, args); err != nil {
		return usageError{err}
	}
	return nil
}

// cliLogger logs to stderr for one-shot commands.
func cliLogger() *slog.Logger {
	return node.NewLogger(os.Stderr, "info", "text")
}
