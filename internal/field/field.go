// Package field carries configuration errors that name the offending key.
//
// Each package validates its own configuration section and reports problems
// as *Error values keyed by the TOML key relative to that section; the node
// package prefixes the section name and adds the line the key stands on.
package field

import (
	"errors"
	"fmt"
	"strings"
)

// Error is a problem with one configuration key.
type Error struct {
	// Key is the dotted TOML key, e.g. "proxy.detect_timeout" or
	// "service[2].port".
	Key string
	// Line is the 1-based line of the key in the file, or 0 if unknown.
	Line int
	// Msg says what is wrong, in lower case, without the key.
	Msg string
}

func (e *Error) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("line %d: %s: %s", e.Line, e.Key, e.Msg)
	}
	return fmt.Sprintf("%s: %s", e.Key, e.Msg)
}

// Errorf returns an *Error for key.
func Errorf(key, format string, args ...any) *Error {
	return &Error{Key: key, Msg: fmt.Sprintf(format, args...)}
}

// List collects field errors in order.
type List []*Error

// Add appends an error for key.
func (l *List) Add(key, format string, args ...any) {
	*l = append(*l, Errorf(key, format, args...))
}

// Merge appends the errors in err (a List, an *Error or a joined error),
// prefixing each key with prefix and a dot. Other errors are kept under the
// prefix itself.
func (l *List) Merge(prefix string, err error) {
	if err == nil {
		return
	}
	for _, e := range Flatten(err) {
		var fe *Error
		if errors.As(e, &fe) {
			k := fe.Key
			if prefix != "" {
				k = prefix + "." + k
			}
			*l = append(*l, &Error{Key: k, Line: fe.Line, Msg: fe.Msg})
			continue
		}
		*l = append(*l, &Error{Key: prefix, Msg: e.Error()})
	}
}

// Err returns nil for an empty list, or the list as an error.
func (l List) Err() error {
	if len(l) == 0 {
		return nil
	}
	return l
}

func (l List) Error() string {
	s := make([]string, len(l))
	for i, e := range l {
		s[i] = e.Error()
	}
	return strings.Join(s, "\n")
}

// Unwrap lets errors.As find each *Error.
func (l List) Unwrap() []error {
	out := make([]error, len(l))
	for i, e := range l {
		out[i] = e
	}
	return out
}

// Flatten returns the individual errors inside err: the members of a List or
// of errors.Join, recursively, or err itself.
func Flatten(err error) []error {
	if err == nil {
		return nil
	}
	if fe, ok := err.(*Error); ok {
		return []error{fe}
	}
	if u, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range u.Unwrap() {
			out = append(out, Flatten(e)...)
		}
		return out
	}
	return []error{err}
}
