package node

import (
	"errors"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vmesh/vmesh/internal/field"
)

func TestDefaultTOMLIsDefaultConfig(t *testing.T) {
	got, err := ParseConfig([]byte(DefaultTOML()))
	if err != nil {
		t.Fatalf("default config does not parse: %v", err)
	}
	if diff := cmp.Diff(DefaultConfig(), got, cmpopts.EquateComparable(netip.AddrPort{}, netip.Addr{}, netip.Prefix{}), cmpopts.EquateEmpty()); diff != "" {
		t.Fatalf("`vmesh config default` differs from DefaultConfig() (-want +got):\n%s", diff)
	}
}

// Every key must be documented in the default file, set or commented out.
func TestDefaultTOMLDocumentsEveryKey(t *testing.T) {
	text := DefaultTOML()
	for _, key := range knownKeys(reflect.TypeOf(Config{}), "") {
		leaf := key[strings.LastIndex(key, ".")+1:]
		if !strings.Contains(text, "\n"+leaf+" =") && !strings.Contains(text, "# "+leaf+" =") &&
			!strings.Contains(text, "["+key+"]") && !strings.Contains(text, "[["+key+"]]") {
			t.Errorf("key %s is not documented in default.toml", key)
		}
	}
}

func TestDefaultConfigIsFresh(t *testing.T) {
	a := DefaultConfig()
	a.Proxy.OpaquePorts[0] = 1
	a.Rules.SkipInboundPorts[0] = 1
	b := DefaultConfig()
	if b.Proxy.OpaquePorts[0] != 25 || b.Rules.SkipInboundPorts[0] != 22 {
		t.Fatal("DefaultConfig shares slices between calls")
	}
}

func TestExamplesAreValid(t *testing.T) {
	files, _ := filepath.Glob("../examples/*.toml")
	for _, pattern := range []string{"../examples/*/*.toml", "../examples/*/*/*.toml"} {
		more, _ := filepath.Glob(pattern)
		files = append(files, more...)
	}
	if len(files) < 5 {
		t.Fatalf("found only %d example configs: %v", len(files), files)
	}
	for _, f := range files {
		if _, err := LoadConfig(f); err != nil {
			t.Errorf("%s:\n%v", f, err)
		}
	}
}

// Each class of bad input names the key (and its line).
func TestBadConfig(t *testing.T) {
	cases := []struct {
		name string
		toml string
		key  string
		line int
		msg  string
	}{
		{"unknown key", "[node]\nlgo_level = \"info\"\n", "node.lgo_level", 2, `did you mean "node.log_level"`},
		{"unknown section", "[proxi]\ninbound_addr = \"0.0.0.0:4143\"\n", "proxi.inbound_addr", 2, "did you mean \"proxy.inbound_addr\""},
		{"unknown service key", "[[service]]\nname = \"a\"\nport = 80\nprot = \"http1\"\n", "service.prot", 4, "unknown key"},
		{"wrong type", "[node]\nlog_level = 3\n", "node.log_level", 2, "incompatible types"},
		{"port out of range", "[[service]]\nname = \"a\"\nport = 70000\n", "service[1].port", 3, "out of range"},
		{"negative port", "[proxy]\nopaque_ports = [-1]\n", "proxy.opaque_ports", 2, "out of range"},
		{"bad address", "[proxy]\ninbound_addr = \"0.0.0.0\"\n", "proxy.inbound_addr", 2, ""},
		{"port clash vmesh", "[admin]\naddr = \"127.0.0.1:4143\"\n", "admin.addr", 2, "already used by proxy.inbound_addr"},
		{"port clash services", "[[service]]\nname = \"a\"\nport = 80\n[[service]]\nname = \"b\"\nport = 80\n", "service[2].port", 6, "already used by service[1].port"},
		{"service on skip port", "[[service]]\nname = \"ssh\"\nport = 22\n", "service[1].port", 3, "skip_inbound_ports"},
		{"service on skip outbound", "[rules]\nskip_outbound_ports = [5432]\n[[service]]\nname = \"db\"\nport = 5432\n", "service[1].port", 5, "skip_outbound_ports"},
		{"bad duration", "[proxy]\ndetect_timeout = \"10 parsecs\"\n", "proxy.detect_timeout", 2, "invalid duration"},
		{"integer duration", "[proxy]\ndetect_timeout = 10\n", "proxy.detect_timeout", 2, "must be a string with a unit"},
		{"negative duration", "[proxy]\ndetect_timeout = \"-1s\"\n", "proxy.detect_timeout", 2, "must be positive"},
		{"missing service name", "[[service]]\nport = 80\n", "service[1].name", 1, "is required"},
		{"missing service port", "[[service]]\nname = \"a\"\n", "service[1].port", 1, "is required"},
		{"duplicate service", "[[service]]\nname = \"a\"\nport = 1\n[[service]]\nname = \"a\"\nport = 2\n", "service[2].name", 5, "already declared"},
		{"bad policy", "[proxy]\ndefault_policy = \"allow-all\"\n", "proxy.default_policy", 2, "unknown policy"},
		{"bad service policy", "[[service]]\nname = \"a\"\nport = 1\npolicy = \"nope\"\n", "service[1].policy", 4, "unknown policy"},
		{"bad allow", "[[service]]\nname = \"a\"\nport = 1\nallow = [\"web\"]\n", "service[1].allow", 4, "SPIFFE ID"},
		{"bad protocol", "[[service]]\nname = \"a\"\nport = 1\nprotocol = \"http3\"\n", "service[1].protocol", 4, "must be one of"},
		{"bad health", "[[service]]\nname = \"a\"\nport = 1\n[service.health]\ntype = \"icmp\"\n", "service[1].health.type", 5, "tcp"},
		{"health timeout", "[[service]]\nname = \"a\"\nport = 1\n[service.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n", "service[1].health.timeout", 6, "shorter than interval"},
		{"bad role", "[ca]\nrole = \"master\"\n", "ca.role", 2, "client"},
		{"negative cpus", "[node]\ncpus = -2\n", "node.cpus", 2, "must be 0 (half the cores) to 1024"},
		{"bad trust domain", "[ca]\ntrust_domain = \"Prod Example\"\n", "ca.trust_domain", 2, "trust domain"},
		{"bad ca url", "[ca]\nurl = \"http://ca:4192\"\n", "ca.url", 2, "https"},
		{"bad join", "[gossip]\njoin = [\"not an address\"]\n", "gossip.join", 2, "not an ip"},
		{"bad on_stop", "[rules]\non_stop = \"explode\"\n", "rules.on_stop", 2, "remove"},
		{"bad cidr", "[rules]\nexclude_outbound_cidrs = [\"10.0.0.0/33\"]\n", "rules.exclude_outbound_cidrs", 2, ""},
		{"bad log level", "[node]\nlog_level = \"loud\"\n", "node.log_level", 2, "must be one of"},
		{"bad node name", "[node]\nname = \"Web 1\"\n", "node.name", 2, "not a valid name"},
		{"client identity not a service", "[proxy]\nclient_identity = \"web\"\n", "proxy.client_identity", 2, "not one of this host's services"},
		{"syntax", "[node\nname = \"a\"\n", "", 2, "to end table name"},
		{"dns domain", "[dns]\ndomain = \"Bad..x\"\n", "dns.domain", 2, "not a DNS domain"},
		{"dns integer ttl", "[dns]\nttl = 5\n", "dns.ttl", 2, "must be a string with a unit"},
		{"dns listen with capture", "[dns]\nlisten = \"127.0.0.53:53\"\n", "dns.listen", 2, "must listen on 127.0.0.1"},
		{"dns unknown key", "[dns]\ncapure = false\n", "dns.capure", 2, `did you mean "dns.capture"`},
		{"route status", "[[route]]\nservice = \"web\"\nretry_statuses = [700]\n", "route[1].retry_statuses", 3, "not an HTTP status"},
		{"route duplicate", "[[route]]\nservice = \"web\"\n[[route]]\nservice = \"web\"\n", "route[2].service", 4, "already has route[1]"},
		{"route match prefix", "[[route]]\nservice = \"web\"\n[[route.match]]\npath_prefix = \"/a\"\n[[route]]\nservice = \"api\"\n[[route.match]]\npath_prefix = \"/b\"\n[[route.match]]\npath_prefix = \"c\"\n",
			"route[2].match[2].path_prefix", 10, "must start with"},
		{"route match method", "[[route]]\nservice = \"web\"\n[[route.match]]\nmethod = \"get\"\npath_prefix = \"/\"\n", "route[1].match[1].method", 4, "not an HTTP method"},
		{"route unknown key", "[[route]]\nservice = \"web\"\ntimeuot = \"1s\"\n", "route.timeuot", 3, `did you mean "route.timeout"`},
		{"split weight", "[[split]]\nservice = \"web\"\n[[split.subset]]\nlabels = { version = \"v1\" }\nweight = 1001\n", "split[1].subset[1].weight", 5, "0-1000"},
		{"split labels", "[[split]]\nservice = \"web\"\n[[split.subset]]\nweight = 1\n", "split[1].subset[1].labels", 3, "is required"},
		{"split without subsets", "[[split]]\nservice = \"web\"\n", "split[1]", 1, "at least one"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.toml))
			if err == nil {
				t.Fatal("accepted")
			}
			var list field.List
			if !errors.As(err, &list) || len(list) == 0 {
				t.Fatalf("error is not a field list: %v", err)
			}
			var found *field.Error
			for _, e := range list {
				if tc.key == "" || e.Key == tc.key {
					found = e
					break
				}
			}
			if found == nil {
				t.Fatalf("no error names %q; got:\n%v", tc.key, err)
			}
			if found.Line != tc.line {
				t.Errorf("line = %d, want %d (%v)", found.Line, tc.line, found)
			}
			if !strings.Contains(found.Msg, tc.msg) {
				t.Errorf("message %q does not say %q", found.Msg, tc.msg)
			}
		})
	}
}

// All problems are reported, not only the first.
func TestBadConfigReportsEverything(t *testing.T) {
	_, err := ParseConfig([]byte(`
[node]
lgo_level = "info"
[proxy]
detect_timeout = 10
default_policy = "nope"
[[service]]
name = "a"
port = 70000
[[service]]
name = "b"
port = 22
`))
	var list field.List
	if !errors.As(err, &list) {
		t.Fatalf("got %v", err)
	}
	keys := map[string]bool{}
	for _, e := range list {
		keys[e.Key] = true
	}
	for _, k := range []string{"node.lgo_level", "proxy.detect_timeout", "proxy.default_policy", "service[1].port", "service[2].port"} {
		if !keys[k] {
			t.Errorf("missing error for %s; got:\n%v", k, err)
		}
	}
	// Ordered by line, so the output reads like the file.
	for i := 1; i < len(list); i++ {
		if list[i].Line < list[i-1].Line {
			t.Errorf("errors not ordered by line:\n%v", err)
		}
	}
}

// Issue 15: a type error in the first of two [[service]] tables names that
// table's line, and the keys of its sub-table are not called unknown (with a
// "did you mean" naming the key itself).
func TestBadConfigFirstOfTwoServices(t *testing.T) {
	_, err := ParseConfig([]byte(`[ca]
trust_domain = "nc.example"
[[service]]
name = "web"
port = "8080"
[service.health]
type = "http"
[[service]]
name = "echo"
port = 9000
`))
	var list field.List
	if !errors.As(err, &list) {
		t.Fatalf("got %v", err)
	}
	if len(list) != 1 {
		t.Fatalf("want exactly one problem, got:\n%v", err)
	}
	if e := list[0]; e.Key != "service[1].port" || e.Line != 5 || !strings.Contains(e.Msg, "incompatible types") {
		t.Errorf("got %v, want line 5: service[1].port: incompatible types", e)
	}
	if strings.Contains(err.Error(), "did you mean") {
		t.Errorf("bogus suggestion: %v", err)
	}
}

func TestLoadConfigMissingFile(t *testing.T) {
	_, err := LoadConfig(filepath.Join(t.TempDir(), "nope.toml"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("got %v, want not-exist", err)
	}
}

// The control socket is created 0600, refuses to replace a live agent's
// socket, and replaces a stale one.
func TestControlSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "admin.sock")
	ln, err := listenControl(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v; want 0600", fi.Mode().Perm(), err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := listenControl(path); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second agent on a live socket: %v", err)
	}
	ln.Close()
	// A stale socket file (the agent crashed) is replaced.
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ln2, err := listenControl(path)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	ln2.Close()
}

// ParseConfig never panics, and whatever it accepts validates.
func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(DefaultTOML()))
	f.Add([]byte("[[service]]\nname = \"a\"\nport = 1\n[service.health]\ntype = \"http\"\n"))
	f.Add([]byte("[node\nname = 1"))
	f.Add([]byte("[[service]]\n[[service.health]]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseConfig(data)
		if err == nil {
			if verr := cfg.Validate(); verr != nil {
				t.Fatalf("accepted a config that does not validate: %v", verr)
			}
		}
	})
}

// The admin page and its assets are served from the embedded files.
func TestWebAssets(t *testing.T) {
	mux := adminMux(prometheus.NewRegistry(), &readiness{}, webHandlers())
	for path, want := range map[string]string{"/": "<title>vmesh</title>", "/ui/app.js": "function quantile", "/ui/style.css": "font"} {
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		if rec.Code != 200 || !strings.Contains(rec.Body.String(), want) {
			t.Errorf("GET %s: %d %.80q", path, rec.Code, rec.Body.String())
		}
	}
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest("GET", "/nothing", nil))
	if rec.Code != 404 {
		t.Errorf("GET /nothing: %d, want 404", rec.Code)
	}
}

// Issue 16: the agent refuses to start with unencrypted gossip unless the
// operator says so (gossip.insecure) or it is a -dev agent.
func TestAgentRefusesUnencryptedGossip(t *testing.T) {
	cfg := DefaultConfig()
	_, err := New(Options{Config: cfg})
	if err == nil || !strings.Contains(err.Error(), "gossip.key_file") || !strings.Contains(err.Error(), "vmesh keygen") {
		t.Errorf("no key file, not insecure: %v, want a refusal naming gossip.key_file and vmesh keygen", err)
	}
	if _, err := New(Options{Config: cfg, Dev: true}); err != nil {
		t.Errorf("-dev without a key file: %v", err)
	}
	cfg.Gossip.Insecure = true
	if _, err := New(Options{Config: cfg}); err != nil {
		t.Errorf("gossip.insecure = true: %v", err)
	}
	cfg.Gossip.Insecure = false
	cfg.Gossip.KeyFile = "/etc/vmesh/gossip.key"
	if _, err := New(Options{Config: cfg}); err != nil {
		t.Errorf("with a key file: %v", err)
	}
}

// node.cpus: 0 runs the agent on half the cores it has (at least one),
// leaving the rest to the host's apps; a number runs it on that many.
func TestProcs(t *testing.T) {
	for _, c := range []struct{ cpus, auto, want int }{
		{0, 1, 1}, {0, 2, 1}, {0, 3, 1}, {0, 8, 4}, {0, 64, 32}, {3, 2, 3}, {1, 16, 1},
	} {
		if got := (Section{CPUs: c.cpus}).Procs(c.auto); got != c.want {
			t.Errorf("cpus = %d on %d cores: %d, want %d", c.cpus, c.auto, got, c.want)
		}
	}
}
