package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmesh/vmesh/ca"
	"github.com/vmesh/vmesh/discovery"
	"github.com/vmesh/vmesh/node"
)

// fakeAgent serves /v1/status as a running agent would.
func fakeAgent(t *testing.T, st node.Status) string {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/status" {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(st)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

func writeTestConfig(t *testing.T, text string) string {
	p := filepath.Join(t.TempDir(), "vmesh.toml")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func find(results []checkResult, name string) *checkResult {
	for i := range results {
		if strings.HasPrefix(results[i].Name, name) {
			return &results[i]
		}
	}
	return nil
}

func TestCheckNamesProblems(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	cfg := writeTestConfig(t, "[gossip]\njoin = [\"198.18.0.1\"]\nkey_file = \"/etc/vmesh/gossip.key\"\n")
	healthy := node.Status{
		Node: "web", Identity: "spiffe://td/node/web", Ready: true, UID: 999,
		Identities: []ca.IdentityStatus{{ID: "spiffe://td/node/web", NotBefore: now.Add(-time.Hour), NotAfter: now.Add(23 * time.Hour)}},
		Members:    []discovery.Member{{Name: "web", State: "alive"}, {Name: "ca", State: "alive"}},
		Outbound:   "127.0.0.1:4140", Inbound: "[::]:4143",
		Rules:       node.RulesStatus{Enabled: true, Backend: "nft"},
		GossipKeyed: true,
	}
	results := runChecks(t.Context(), cfg, fakeAgent(t, healthy), now)
	for _, r := range results {
		if r.Status != "ok" {
			t.Errorf("healthy host: %s is %s: %s", r.Name, r.Status, r.Detail)
		}
	}

	broken := healthy
	broken.Identities = []ca.IdentityStatus{{ID: "spiffe://td/node/web", NotBefore: now.Add(-25 * time.Hour), NotAfter: now.Add(-time.Hour)}}
	broken.Rules.Drift = "missing: -A VMESH_OUTPUT ..."
	broken.Members = []discovery.Member{{Name: "web", State: "alive"}, {Name: "ca", State: "dead"}}
	broken.CAURL = "https://127.0.0.1:1" // nothing listens on port 1
	results = runChecks(t.Context(), cfg, fakeAgent(t, broken), now)
	for name, want := range map[string]string{
		"certificate spiffe://td/node/web": "expired",
		"iptables":                         "missing or not current",
		"gossip":                           "alone",
		"ca":                               "cannot reach the CA",
	} {
		r := find(results, name)
		if r == nil || r.Status != "fail" || !strings.Contains(r.Detail, want) || r.Fix == "" {
			t.Errorf("%s: got %+v, want a failure saying %q with a fix", name, r, want)
		}
	}

	// No agent at all: one failure that says to start it.
	results = runChecks(t.Context(), cfg, "127.0.0.1:1", now)
	if r := find(results, "agent"); r == nil || r.Status != "fail" || !strings.Contains(r.Fix, "systemctl start vmesh") {
		t.Errorf("no agent: %+v", results)
	}

	// A bad config is named first.
	bad := writeTestConfig(t, "[proxy]\ndetect_timeout = 10\n")
	results = runChecks(t.Context(), bad, "127.0.0.1:1", now)
	if len(results) != 1 || results[0].Status != "fail" || !strings.Contains(results[0].Detail, "proxy.detect_timeout") {
		t.Errorf("bad config: %+v", results)
	}
}
