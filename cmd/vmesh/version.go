package main

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// buildInfo is what `vmesh version -o json` prints.
type buildInfo struct {
	Version  string `json:"version"`
	Revision string `json:"revision,omitempty"`
	Go       string `json:"go"`
	Platform string `json:"platform"`
}

func currentBuild() buildInfo {
	b := buildInfo{Version: version, Go: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				b.Revision = s.Value[:12]
			}
		}
	}
	return b
}

// versionString is the one line `vmesh version` and `vmesh --version` print.
func versionString() string {
	b := currentBuild()
	rev := ""
	if b.Revision != "" {
		rev = " " + b.Revision
	}
	return fmt.Sprintf("vmesh %s%s %s %s", b.Version, rev, b.Go, b.Platform)
}

// agentVersion is the version the agent reports to its peers (short).
func agentVersion() string {
	b := currentBuild()
	if b.Version == "dev" && b.Revision != "" {
		return "dev-" + b.Revision
	}
	return b.Version
}

func newVersionCmd(c *cli) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version of this binary (also: vmesh --version)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if c.json() {
				return printJSON(cmd.OutOrStdout(), currentBuild())
			}
			_, err := fmt.Fprintln(cmd.OutOrStdout(), versionString())
			return err
		},
	}
}
