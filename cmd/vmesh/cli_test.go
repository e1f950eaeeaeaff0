package main

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/vmesh/vmesh/discovery"
	"github.com/vmesh/vmesh/node"
)

func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(goStyleFlags(args))
	err := root.Execute()
	return out.String(), err
}

func TestVersionFlag(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"-version"}, {"version"}} {
		out, err := runCLI(t, args...)
		if err != nil || !strings.HasPrefix(out, "vmesh ") {
			t.Errorf("vmesh %v: %q, %v", args, out, err)
		}
	}
}

// Every command finds the agent the same way: --admin, else VMESH_ADMIN,
// else the config's admin.addr; -o json works on read commands.
func TestCLIFindsTheAgent(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/members":
			json.NewEncoder(w).Encode([]discovery.Member{{Name: "web", State: "alive", Agent: "v1.2.3"}})
		case "/v1/status":
			json.NewEncoder(w).Encode(node.Status{Node: "web", Socket: "/run/x.sock"})
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")

	t.Setenv(envConfig, writeTestConfig(t, "[admin]\naddr = \"127.0.0.1:1\"\n"))
	if _, err := runCLI(t, "members"); err == nil || !strings.Contains(err.Error(), "127.0.0.1:1") {
		t.Errorf("members does not use the config's admin.addr: %v", err)
	}
	t.Setenv(envAdmin, addr)
	out, err := runCLI(t, "members")
	if err != nil || !strings.Contains(out, "v1.2.3") || !strings.Contains(out, "AGENT") {
		t.Errorf("members with VMESH_ADMIN: %q, %v", out, err)
	}
	out, err = runCLI(t, "members", "-o", "json")
	var ms []discovery.Member
	if err != nil || json.Unmarshal([]byte(out), &ms) != nil || ms[0].Agent != "v1.2.3" {
		t.Errorf("members -o json: %q, %v", out, err)
	}
	if _, err := runCLI(t, "members", "--admin", "127.0.0.1:2"); err == nil || !strings.Contains(err.Error(), "127.0.0.1:2") {
		t.Errorf("--admin does not win over VMESH_ADMIN: %v", err)
	}
	// The control socket comes from the agent's own answer.
	c := &cli{}
	c.addFlags(&cobra.Command{Use: "vmesh"})
	if s := c.socket(t.Context()); s != "/run/x.sock" {
		t.Errorf("socket = %q, want the agent's /run/x.sock", s)
	}
	t.Setenv(envSocket, "/tmp/y.sock")
	if s := c.socket(t.Context()); s != "/tmp/y.sock" {
		t.Errorf("socket = %q, want VMESH_SOCKET's", s)
	}
}

func TestRulesShowJSON(t *testing.T) {
	t.Setenv(envAdmin, "127.0.0.1:1") // no agent: the file's rules
	path := writeTestConfig(t, "[[service]]\nname = \"web\"\nport = 8080\n")
	out, err := runCLI(t, "rules", "show", "-c", path, "-o", "json")
	var fams map[string][]string
	if err != nil || json.Unmarshal([]byte(out), &fams) != nil {
		t.Fatalf("rules show -o json: %v\n%s", err, out)
	}
	found := false
	for _, l := range fams["iptables"] {
		found = found || strings.Contains(l, "--dports 8080") && strings.Contains(l, "REDIRECT --to-ports 4143")
	}
	if !found {
		t.Errorf("no inbound redirect for 8080 in %v", fams)
	}
}
