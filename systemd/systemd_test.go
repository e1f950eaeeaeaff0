// Tests of the unit file and the install script: systemd-analyze verify and
// security on the unit, the contract the agent relies on, and install.sh
// against a scratch root (install, re-install, uninstall, purge).
package systemd_test

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// maxExposure is the highest `systemd-analyze security` exposure accepted
// (0 = fully locked down, 10 = unprotected; systemd calls < 2 "OK").
const maxExposure = 2.0

const unitFile = "vmesh.service"

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is missing (Debian package systemd): CI must install it", name)
		}
		t.Skipf("%s is missing", name)
	}
	return p
}

// stageUnit writes unit text into a scratch dir as vmesh.service, with the
// binary's path pointed at an executable stub (verify checks that every
// Exec*= command exists), and returns the file's path.
func stageUnit(t *testing.T, text string) string {
	t.Helper()
	dir := t.TempDir()
	stub := filepath.Join(dir, "vmesh")
	if err := os.WriteFile(stub, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	text = strings.ReplaceAll(text, "/usr/local/bin/vmesh", stub)
	p := filepath.Join(dir, unitFile)
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func readFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// verify runs systemd-analyze verify and returns its combined output.
func verify(t *testing.T, path string) (string, error) {
	t.Helper()
	cmd := exec.Command(needTool(t, "systemd-analyze"), "verify", path)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func TestUnitVerifies(t *testing.T) {
	out, err := verify(t, stageUnit(t, readFile(t, unitFile)))
	if err != nil || out != "" {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", unitFile, err, out)
	}
}

// The legacy-iptables drop-in merged into the unit still verifies.
func TestUnitWithLegacyDropInVerifies(t *testing.T) {
	text := readFile(t, unitFile) + "\n" + readFile(t, "iptables-legacy.conf")
	out, err := verify(t, stageUnit(t, text))
	if err != nil || out != "" {
		t.Fatalf("systemd-analyze verify (unit + iptables-legacy.conf): %v\n%s", err, out)
	}
}

// The verify check can fail: mistakes like these are reported.
func TestVerifyCatchesMistakes(t *testing.T) {
	good := readFile(t, unitFile)
	for name, edit := range map[string][2]string{
		"unknown key":      {"ProtectHome=yes", "ProtectHomes=yes"},
		"bad type":         {"Type=notify", "Type=notfy"},
		"missing exec":     {"ExecReload=/bin/kill", "ExecReload=/nonexistent/kill"},
		"bad address fam.": {"AF_NETLINK", "AF_NETLNK"},
	} {
		t.Run(name, func(t *testing.T) {
			if !strings.Contains(good, edit[0]) {
				t.Fatalf("unit has no %q to break", edit[0])
			}
			out, err := verify(t, stageUnit(t, strings.Replace(good, edit[0], edit[1], 1)))
			if err == nil && out == "" {
				t.Fatalf("verify accepted a unit with %s (%q)", name, edit[1])
			}
		})
	}
}

func TestUnitSecurityExposure(t *testing.T) {
	path := stageUnit(t, readFile(t, unitFile))
	out, _ := exec.Command(needTool(t, "systemd-analyze"), "security", "--offline=yes", "--no-pager", path).CombinedOutput()
	m := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+) (\S+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure level in systemd-analyze security output:\n%s", out)
	}
	score, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("systemd-analyze security: exposure %.1f %s (max %.1f)", score, m[2], maxExposure)
	if score > maxExposure {
		var lost []string
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(strings.TrimSpace(l), "✗") {
				lost = append(lost, l)
			}
		}
		t.Errorf("exposure %.1f > %.1f; unprotected:\n%s", score, maxExposure, strings.Join(lost, "\n"))
	}
}

// parseUnit returns the [Service] and [Unit] settings, key → values in order.
func parseUnit(text string) map[string][]string {
	kv := map[string][]string{}
	for _, l := range strings.Split(text, "\n") {
		l = strings.TrimSpace(l)
		if l == "" || l[0] == '#' || l[0] == ';' || l[0] == '[' {
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		if ok {
			kv[k] = append(kv[k], v)
		}
	}
	return kv
}

// The settings the agent and the operator rely on (DESIGN.md, issue 8).
func TestUnitContract(t *testing.T) {
	kv := parseUnit(readFile(t, unitFile))
	want := map[string][]string{
		"Type":                    {"notify"},
		"User":                    {"vmesh"},
		"Group":                   {"vmesh"},
		"ExecStart":               {"/usr/local/bin/vmesh agent --config /etc/vmesh/vmesh.toml"},
		"ExecReload":              {"/bin/kill -HUP $MAINPID"},
		"ExecStopPost":            {"+/usr/local/bin/vmesh agent --cleanup --config /etc/vmesh/vmesh.toml"},
		"Restart":                 {"on-failure"},
		"CapabilityBoundingSet":   {"CAP_NET_ADMIN"},
		"AmbientCapabilities":     {"CAP_NET_ADMIN"},
		"StateDirectory":          {"vmesh"},
		"StateDirectoryMode":      {"0700"},
		"RuntimeDirectory":        {"vmesh"},
		"ConfigurationDirectory":  {"vmesh"},
		"Wants":                   {"network-online.target"},
		"After":                   {"network-online.target"},
		"NoNewPrivileges":         {"yes"},
		"ProtectSystem":           {"strict"},
		"RestrictAddressFamilies": {"AF_INET AF_INET6 AF_UNIX AF_NETLINK"},
	}
	got := map[string][]string{}
	for k := range want {
		got[k] = kv[k]
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("unit settings (-want +got):\n%s", d)
	}
	// A unit that cannot reach the host's network namespace cannot work.
	for _, k := range []string{"PrivateNetwork", "PrivateUsers", "DynamicUser", "IPAddressDeny"} {
		if v, ok := kv[k]; ok {
			t.Errorf("%s=%v breaks the rules or the proxy", k, v)
		}
	}
}

// installer runs install.sh against a scratch root that starts with a copy
// of this host's user database.
type installer struct {
	t    *testing.T
	root string
	bin  string
}

func newInstaller(t *testing.T) *installer {
	t.Helper()
	if os.Getuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("install.sh tests need root")
		}
		t.Skip("install.sh tests need root")
	}
	needTool(t, "useradd")
	needTool(t, "systemctl")
	root := t.TempDir()
	for _, f := range []string{"passwd", "group", "shadow", "gshadow", "login.defs"} {
		b, err := os.ReadFile(filepath.Join("/etc", f))
		if err != nil {
			continue
		}
		if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "etc", f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// A stand-in binary: install.sh runs `vmesh config default` from it.
	bin := filepath.Join(t.TempDir(), "vmesh")
	stub := "#!/bin/sh\n[ \"$1 $2\" = 'config default' ] && echo '# default config' && exit 0\nexit 1\n"
	if err := os.WriteFile(bin, []byte(stub), 0o755); err != nil {
		t.Fatal(err)
	}
	return &installer{t: t, root: root, bin: bin}
}

func (in *installer) run(args ...string) string {
	in.t.Helper()
	args = append([]string{"--root", in.root, "--binary", in.bin, "--no-iptables-legacy"}, args...)
	cmd := exec.Command("./install.sh", args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		in.t.Fatalf("install.sh %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String()
}

func (in *installer) path(p string) string { return filepath.Join(in.root, p) }

// mode returns "perm owner:group" of a path in the scratch root, or "absent".
func (in *installer) mode(p string) string {
	in.t.Helper()
	fi, err := os.Lstat(in.path(p))
	if os.IsNotExist(err) {
		return "absent"
	}
	if err != nil {
		in.t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return fmt.Sprintf("%s %s:%s", fi.Mode(), in.name("passwd", st.Uid), in.name("group", st.Gid))
}

// name looks an id up in the scratch root's passwd or group file.
func (in *installer) name(db string, id uint32) string {
	in.t.Helper()
	for _, l := range strings.Split(readFile(in.t, in.path("etc/"+db)), "\n") {
		if f := strings.Split(l, ":"); len(f) > 2 && f[2] == strconv.Itoa(int(id)) {
			return f[0]
		}
	}
	return strconv.Itoa(int(id))
}

func (in *installer) vmeshIDs() string {
	in.t.Helper()
	for _, l := range strings.Split(readFile(in.t, in.path("etc/passwd")), "\n") {
		if f := strings.Split(l, ":"); f[0] == "vmesh" && len(f) == 7 {
			return f[2] + ":" + f[3] + " home=" + f[5] + " shell=" + f[6]
		}
	}
	return "none"
}

func TestInstallScript(t *testing.T) {
	in := newInstaller(t)

	in.run()
	want := map[string]string{
		"bin":    "-rwxr-xr-x root:root",
		"unit":   "-rw-r--r-- root:root",
		"wants":  "Lrwxrwxrwx root:root",
		"etc":    "drwxr-x--- root:vmesh",
		"config": "-rw-r----- root:vmesh",
		"state":  "drwx------ vmesh:vmesh",
		"dropin": "absent",
	}
	check := func(when string, want map[string]string) {
		t.Helper()
		got := map[string]string{}
		for k := range want {
			got[k] = map[string]string{
				"bin":    in.mode("usr/local/bin/vmesh"),
				"unit":   in.mode("etc/systemd/system/vmesh.service"),
				"wants":  in.mode("etc/systemd/system/multi-user.target.wants/vmesh.service"),
				"etc":    in.mode("etc/vmesh"),
				"config": in.mode("etc/vmesh/vmesh.toml"),
				"state":  in.mode("var/lib/vmesh"),
				"dropin": in.mode("etc/systemd/system/vmesh.service.d/iptables-legacy.conf"),
			}[k]
		}
		if d := cmp.Diff(want, got); d != "" {
			t.Errorf("%s: files (-want +got):\n%s", when, d)
		}
	}
	check("after install", want)
	if ids := in.vmeshIDs(); !strings.HasSuffix(ids, "home=/var/lib/vmesh shell=/usr/sbin/nologin") {
		t.Errorf("user vmesh: %s", ids)
	}
	if got := readFile(t, in.path("etc/systemd/system/vmesh.service")); got != readFile(t, unitFile) {
		t.Error("installed unit differs from systemd/vmesh.service")
	}
	if got := readFile(t, in.path("etc/vmesh/vmesh.toml")); got != "# default config\n" {
		t.Errorf("new config = %q, want the output of `vmesh config default`", got)
	}

	// Again, over an edited config: nothing changes, the config is kept.
	edited := "# edited by the operator\n"
	if err := os.WriteFile(in.path("etc/vmesh/vmesh.toml"), []byte(edited), 0o640); err != nil {
		t.Fatal(err)
	}
	ids := in.vmeshIDs()
	out := in.run()
	if strings.Contains(out, "installed") || strings.Contains(out, "created") {
		t.Errorf("second install changed something:\n%s", out)
	}
	if got := readFile(t, in.path("etc/vmesh/vmesh.toml")); got != edited {
		t.Errorf("second install overwrote the config: %q", got)
	}
	if got := in.vmeshIDs(); got != ids {
		t.Errorf("user vmesh changed: %s -> %s", ids, got)
	}
	check("after second install", want)

	// The legacy-iptables drop-in comes and goes with the backend.
	in.run("--iptables-legacy")
	check("with legacy iptables", map[string]string{"dropin": "-rw-r--r-- root:root"})
	in.run()
	check("back on nft", map[string]string{"dropin": "absent"})

	in.run("--uninstall")
	check("after uninstall", map[string]string{
		"bin": "absent", "unit": "absent", "wants": "absent",
		"etc": "drwxr-x--- root:vmesh", "config": "-rw-r----- root:vmesh", "state": "drwx------ vmesh:vmesh",
	})
	if in.vmeshIDs() == "none" {
		t.Error("uninstall without --purge removed user vmesh")
	}

	in.run("--uninstall", "--purge")
	check("after purge", map[string]string{"etc": "absent", "config": "absent", "state": "absent"})
	if got := in.vmeshIDs(); got != "none" {
		t.Errorf("purge kept user vmesh: %s", got)
	}
}
