package bench

import (
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// vipColumn makes the vmesh-vip column: vm's agents, dialed through the
// virtual IPs of the http and echo services instead of the server host's
// address. The VIPs come from `vmesh services -o json` on the client host,
// or else from resolving <service>.vmesh there (through the agent's DNS
// capture, as an app would). A tree without VIPs makes the column
// unavailable with "n/a: no VIP support in this tree".
//
// -bench.vips (service=address,...) names the VIPs instead, for an agent
// whose VIPs neither way finds.
func vipColumn(r *run, vm *column) (*column, error) {
	sock := vm.controls[vm.client.Name]
	c := &column{name: VMeshVIP, client: vm.client, server: vm.server, procs: vm.procs, target: map[string]string{}}
	if *flagVIPs != "" {
		given := map[string]netip.Addr{}
		for _, f := range strings.Split(*flagVIPs, ",") {
			name, addr, _ := strings.Cut(f, "=")
			a, err := netip.ParseAddr(addr)
			if err != nil {
				return nil, fmt.Errorf("-bench.vips: %q: want service=address", f)
			}
			given[name] = a
		}
		for _, s := range Services {
			if a, ok := given[s.Name]; ok {
				c.target[s.Name] = netip.AddrPortFrom(a, s.Port).String()
			}
		}
		if c.target["http"] == "" || c.target["echo"] == "" {
			return nil, fmt.Errorf("-bench.vips names no VIP for http or echo")
		}
		r.report.Notes = append(r.report.Notes, "vmesh-vip: VIPs given by -bench.vips "+*flagVIPs)
		return c, nil
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, s := range Services {
		if s.Name != "http" && s.Name != "echo" {
			continue
		}
		for {
			vip, how, err := findVIP(r, vm, sock, s.Name)
			if err == nil {
				c.target[s.Name] = netip.AddrPortFrom(vip, s.Port).String()
				r.report.Notes = append(r.report.Notes, fmt.Sprintf("vmesh-vip: %s's VIP is %s (from %s)", s.Name, vip, how))
				break
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("n/a: no VIP support in this tree (%s: %v)", s.Name, err)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	return c, nil
}

// findVIP asks the client host's agent, then its DNS, for service's VIP.
func findVIP(r *run, vm *column, sock, service string) (netip.Addr, string, error) {
	out, err := vm.client.Try(r.tools.vmesh, "services", "-o", "json", "--socket", sock)
	if err == nil {
		if vip, ok := FindVIP([]byte(out), service); ok {
			return vip, "vmesh services -o json", nil
		}
	}
	name := service + ".vmesh"
	res, derr := r.client(vm, 10*time.Second, "getent", "ahostsv4", name)
	if derr == nil {
		for _, line := range strings.Split(res, "\n") {
			if f := strings.Fields(line); len(f) > 0 {
				if a, err := netip.ParseAddr(f[0]); err == nil && a != vm.server.Addr {
					return a, "getent ahostsv4 " + name, nil
				}
			}
		}
	}
	return netip.Addr{}, "", fmt.Errorf("vmesh services -o json names no VIP, and %s does not resolve on %s: %v", name, vm.client.Name, derr)
}
