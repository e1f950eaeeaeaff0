package node

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
)

// advertiseAddr is the address other hosts reach this one at (gossip, and
// the CA's URL in join tokens): gossip.advertise_addr, else a specific
// gossip.bind_addr, else the address of the interface holding the default
// route. A tunnel, docker0 or a second NIC must not be picked by interface
// order, so when the choice is ambiguous the agent refuses to start and
// names the candidates (as Consul does).
func advertiseAddr(cfg Config) (netip.Addr, error) {
	if cfg.Gossip.AdvertiseAddr.IsValid() {
		return cfg.Gossip.AdvertiseAddr, nil
	}
	if b := cfg.Gossip.BindAddr.Addr(); b.IsValid() && !b.IsUnspecified() {
		return b, nil
	}
	routes, err := defaultRoutes()
	if err != nil {
		return netip.Addr{}, fmt.Errorf("choosing the address to advertise: %w; set gossip.advertise_addr", err)
	}
	addrs, err := interfaceAddrs()
	if err != nil {
		return netip.Addr{}, fmt.Errorf("choosing the address to advertise: %w; set gossip.advertise_addr", err)
	}
	return pickAdvertise(routes, addrs)
}

// route is one IPv4 default route.
type route struct {
	iface  string
	metric int
}

// pickAdvertise chooses among the host's global unicast addresses by
// interface: those of the interface with the best default route; with no
// default route, all of them. Exactly one IPv4 address (else exactly one
// IPv6 address) is the answer; none is loopback (a host alone); more is an
// error naming them.
func pickAdvertise(routes []route, addrs map[string][]netip.Addr) (netip.Addr, error) {
	var ifaces []string
	why := "the host has no default route"
	if len(routes) > 0 {
		best := slices.MinFunc(routes, func(a, b route) int { return a.metric - b.metric })
		for _, r := range routes {
			if r.metric == best.metric && !slices.Contains(ifaces, r.iface) {
				ifaces = append(ifaces, r.iface)
			}
		}
		why = "the default route is on " + strings.Join(ifaces, " and ")
	} else {
		for name := range addrs {
			ifaces = append(ifaces, name)
		}
	}
	slices.Sort(ifaces)
	var v4, v6 []string
	var first4, first6 netip.Addr
	for _, name := range ifaces {
		for _, a := range addrs[name] {
			switch {
			case a.Is4():
				v4 = append(v4, a.String()+" ("+name+")")
				first4 = a
			default:
				v6 = append(v6, a.String()+" ("+name+")")
				first6 = a
			}
		}
	}
	switch {
	case len(v4) == 1:
		return first4, nil
	case len(v4) == 0 && len(v6) == 1:
		return first6, nil
	case len(v4) == 0 && len(v6) == 0 && len(routes) == 0:
		return netip.AddrFrom4([4]byte{127, 0, 0, 1}), nil
	case len(v4) == 0 && len(v6) == 0:
		return netip.Addr{}, fmt.Errorf("choosing the address to advertise: %s, which has no address; set gossip.advertise_addr to the address other hosts reach this one at", why)
	}
	cands := v4
	if len(cands) == 0 {
		cands = v6
	}
	return netip.Addr{}, fmt.Errorf("choosing the address to advertise: %s and there are %d candidates: %s; set gossip.advertise_addr to the one other hosts reach this one at",
		why, len(cands), strings.Join(cands, ", "))
}

// defaultRoutes reads the IPv4 default routes of the calling thread's
// network namespace.
func defaultRoutes() ([]route, error) {
	f, err := os.Open("/proc/thread-self/net/route")
	if err != nil {
		return nil, fmt.Errorf("reading routes: %w", err)
	}
	defer f.Close()
	var out []route
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		if len(fl) < 8 || fl[1] != "00000000" || fl[7] != "00000000" {
			continue
		}
		flags, _ := strconv.ParseUint(fl[3], 16, 32)
		if flags&1 == 0 { // RTF_UP
			continue
		}
		metric, _ := strconv.Atoi(fl[6])
		out = append(out, route{iface: fl[0], metric: metric})
	}
	return out, sc.Err()
}

// interfaceAddrs returns the global unicast addresses of the interfaces
// that are up, by interface name.
func interfaceAddrs() (map[string][]netip.Addr, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("listing interfaces: %w", err)
	}
	out := map[string][]netip.Addr{}
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		as, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range as {
			p, err := netip.ParsePrefix(a.String())
			if err != nil || !p.Addr().IsGlobalUnicast() {
				continue
			}
			out[ifc.Name] = append(out[ifc.Name], p.Addr().Unmap())
		}
	}
	return out, nil
}
