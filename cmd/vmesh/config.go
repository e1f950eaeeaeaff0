package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vmesh/vmesh/internal/field"
	"github.com/vmesh/vmesh/node"
)

func newConfigCmd(cl *cli) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "Check a configuration file or print the default one",
		Args:  noArgs,
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "check [FILE]",
		Short: "Check a configuration file and print every problem, each with its key and line",
		Long: `Check decodes and validates FILE (default: --config, VMESH_CONFIG, the running
agent's file, else ` + node.DefaultConfigPath + `) as the agent would, and prints
every problem found (not only the first), each naming its key and line.
Exit code 0: valid; 2: invalid; 1: the file could not be read.`,
		Args: func(c *cobra.Command, args []string) error {
			if err := cobra.MaximumNArgs(1)(c, args); err != nil {
				return usageError{err}
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			if len(args) == 0 {
				p := cl.configPath(c.Context())
				if p == "" {
					return usageError{fmt.Errorf("the running agent has no config file (vmesh agent -dev): name one")}
				}
				args = []string{p}
			}
			_, err := node.LoadConfig(args[0])
			list, isList := err.(field.List)
			if cl.json() && (err == nil || isList) {
				r := configReport{File: args[0], OK: err == nil, Problems: []configProblem{}}
				for _, e := range list {
					r.Problems = append(r.Problems, configProblem{Key: e.Key, Line: e.Line, Message: e.Msg})
				}
				printJSON(c.OutOrStdout(), r)
				if err != nil {
					return silentError{exitUsage}
				}
				return nil
			}
			if err == nil {
				fmt.Fprintf(c.OutOrStdout(), "%s: ok\n", args[0])
				return nil
			}
			if !isList {
				return err
			}
			for _, e := range list {
				fmt.Fprintf(c.ErrOrStderr(), "%s:%s\n", args[0], formatFieldError(e))
			}
			fmt.Fprintf(c.ErrOrStderr(), "%s: %d problem(s)\n", args[0], len(list))
			return silentError{exitUsage}
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "default",
		Short: "Print the default configuration, every key commented",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			_, err := fmt.Fprint(c.OutOrStdout(), node.DefaultTOML())
			return err
		},
	})
	return cmd
}

// configReport is `vmesh config check -o json`.
type configReport struct {
	File     string          `json:"file"`
	OK       bool            `json:"ok"`
	Problems []configProblem `json:"problems"`
}

type configProblem struct {
	Key     string `json:"key"`
	Line    int    `json:"line,omitempty"`
	Message string `json:"message"`
}

// formatFieldError renders "LINE: key: message" (compiler style after the
// file name).
func formatFieldError(e *field.Error) string {
	if e.Line > 0 {
		return fmt.Sprintf("%d: %s: %s", e.Line, e.Key, e.Msg)
	}
	return fmt.Sprintf(" %s: %s", e.Key, e.Msg)
}
