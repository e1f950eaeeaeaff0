package node

import (
	"io"
	"log/slog"
)

// NewLogger returns the agent's root logger: text for terminals and
// journald, JSON for log shippers. Subsystems derive theirs with
// Logger.With("subsystem", name).
func NewLogger(w io.Writer, level, format string) *slog.Logger {
	lv := new(slog.LevelVar)
	lv.Set(ParseLevel(level))
	return NewLevelLogger(w, lv, format)
}

// NewLevelLogger is NewLogger with a level that can change while it runs
// (pass the same LevelVar as Options.LogLevel and a reload applies
// node.log_level).
func NewLevelLogger(w io.Writer, level *slog.LevelVar, format string) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
