package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/vmesh/vmesh/discovery"
)

// Issue 16: `vmesh keygen PATH` writes the key 0600 whatever the umask,
// readable by ReadKeyFile, and never overwrites a key file.
func TestKeygenWritesKeyFile0600(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	path := filepath.Join(t.TempDir(), "gossip.key")
	if out, err := runCLI(t, "keygen", path); err != nil {
		t.Fatalf("vmesh keygen %s: %v\n%s", path, err, out)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", fi.Mode().Perm())
	}
	keys, err := discovery.ReadKeyFile(path)
	if err != nil || len(keys) != 1 {
		t.Fatalf("reading the written key: %v (%d keys)", err, len(keys))
	}
	before, _ := os.ReadFile(path)
	if out, err := runCLI(t, "keygen", path); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("keygen over an existing key file: %v\n%s", err, out)
	}
	if after, _ := os.ReadFile(path); string(after) != string(before) {
		t.Error("keygen overwrote an existing key file")
	}
}
