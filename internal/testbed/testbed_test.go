package testbed

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestHostsReachEachOther proves two hosts talk over the bridge with TCP.
func TestHostsReachEachOther(t *testing.T) {
	bed := New(t, 2)
	h1, h2 := bed.Hosts[0], bed.Hosts[1]
	var ln net.Listener
	if err := h2.Do(func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(h2.Addr.String(), "9000"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.WriteString(c, "hello from "+c.LocalAddr().String()+" to "+c.RemoteAddr().String())
	}()
	var got []byte
	if err := h1.Do(func() error {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(h2.Addr.String(), "9000"), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		got, err = io.ReadAll(c)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	want := "hello from 198.18.0.2:9000 to 198.18.0.1:"
	if !strings.HasPrefix(string(got), want) {
		t.Fatalf("got %q, want prefix %q", got, want)
	}
	// And with a real process inside the host.
	out := h1.Run(t, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
	if !strings.Contains(out, "198.18.0.1/24") {
		t.Fatalf("h1 eth0 has no 198.18.0.1/24: %s", out)
	}
}

// TestIsolatedFromMachine proves the bed cannot reach the machine's real
// interfaces and the machine cannot reach the bed.
func TestIsolatedFromMachine(t *testing.T) {
	bed := New(t, 1)
	h := bed.Hosts[0]
	// A test host has no default route: any address outside the bed is
	// unreachable.
	routes := h.Run(t, "ip", "route", "show")
	if strings.Contains(routes, "default") {
		t.Fatalf("test host has a default route: %s", routes)
	}
	var machineAddrs []netip.Addr
	ifaces, _ := net.InterfaceAddrs()
	for _, a := range ifaces {
		if p, err := netip.ParsePrefix(a.String()); err == nil && !p.Addr().IsLoopback() && p.Addr().Is4() {
			machineAddrs = append(machineAddrs, p.Addr())
		}
	}
	for _, a := range machineAddrs {
		err := h.Do(func() error {
			c, err := net.DialTimeout("tcp", netip.AddrPortFrom(a, 22).String(), time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil {
			t.Errorf("test host reached the machine's address %s", a)
		}
	}
	// Nothing of the bed is in the machine's namespace, so the machine has
	// no path into the bed. (Dialing a bed address from the machine would
	// follow its default route out to the real network: never do that.)
	out, _ := exec.Command("ip", "-o", "link", "show").Output()
	if strings.Contains(string(out), Prefix) {
		t.Fatalf("bed links in the machine's namespace: %s", out)
	}
}

// TestCutAndHeal proves a partition drops traffic and healing restores it.
func TestCutAndHeal(t *testing.T) {
	bed := New(t, 2)
	h1, h2 := bed.Hosts[0], bed.Hosts[1]
	var ln net.Listener
	if err := h2.Do(func() (err error) { ln, err = net.Listen("tcp", ":9001"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	dial := func() error {
		return h1.Do(func() error {
			c, err := net.DialTimeout("tcp", h2.Addr.String()+":9001", 500*time.Millisecond)
			if err == nil {
				c.Close()
			}
			return err
		})
	}
	if err := dial(); err != nil {
		t.Fatalf("before cut: %v", err)
	}
	bed.Cut(t, h1, h2)
	if err := dial(); err == nil {
		t.Fatal("dial succeeded across a cut")
	}
	bed.Heal(t, h1, h2)
	if err := dial(); err != nil {
		t.Fatalf("after heal: %v", err)
	}
}

// TestNothingLeftBehind runs a failing test and a killed test in child
// processes and checks that neither leaves a namespace or link behind.
func TestNothingLeftBehind(t *testing.T) {
	Require(t)
	if os.Getenv("VMESH_TESTBED_CHILD") != "" {
		t.Skip("child")
	}
	// A test that fails: its cleanup must remove everything.
	cmd := exec.Command(os.Args[0], "-test.run=^TestChildFails$", "-test.count=1")
	cmd.Env = append(os.Environ(), "VMESH_TESTBED_CHILD=fail")
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "deliberate failure") {
		t.Fatalf("child did not fail as planned: %v\n%s", err, out)
	}
	if left := leftovers(cmd.Process.Pid); left != "" {
		t.Fatalf("failing test left behind: %s", left)
	}

	// A test killed with SIGKILL: its cleanup never runs, so the next bed's
	// sweep must remove what it left.
	cmd = exec.Command(os.Args[0], "-test.run=^TestChildHangs$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), "VMESH_TESTBED_CHILD=hang")
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	ready := false
	for sc.Scan() {
		if strings.Contains(sc.Text(), "bed ready") {
			ready = true
			break
		}
	}
	if !ready {
		t.Fatal("child never reported its bed ready")
	}
	pid := cmd.Process.Pid
	if leftovers(pid) == "" {
		t.Fatal("child's bed is not visible: the leftover check cannot work")
	}
	cmd.Process.Kill()
	cmd.Wait()
	Sweep()
	if left := leftovers(pid); left != "" {
		t.Fatalf("sweep left behind: %s", left)
	}
}

func TestChildFails(t *testing.T) {
	if os.Getenv("VMESH_TESTBED_CHILD") != "fail" {
		t.Skip("run by TestNothingLeftBehind")
	}
	New(t, 2)
	t.Fatal("deliberate failure")
}

func TestChildHangs(t *testing.T) {
	if os.Getenv("VMESH_TESTBED_CHILD") != "hang" {
		t.Skip("run by TestNothingLeftBehind")
	}
	bed := New(t, 2)
	bed.Hosts[0].Start(t, "sleep", "600")
	t.Log("bed ready")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	<-ctx.Done()
}

// leftovers lists namespaces and links made by the process pid.
func leftovers(pid int) string {
	tag := Prefix + strconv.Itoa(pid)
	var left []string
	ns, _ := exec.Command("ip", "netns", "list").Output()
	links, _ := exec.Command("ip", "-o", "link", "show").Output()
	for _, line := range strings.Split(string(ns)+string(links), "\n") {
		for _, f := range strings.Fields(line) {
			f = strings.TrimSuffix(f, ":")
			if strings.HasPrefix(f, tag) {
				left = append(left, f)
			}
		}
	}
	return strings.Join(left, " ")
}
