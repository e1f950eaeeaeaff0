//go:build !linux

package main

// mapOnlyWhatRuns is Linux's (see mappings_linux.go).
func mapOnlyWhatRuns() (int, error) { return 0, nil }
