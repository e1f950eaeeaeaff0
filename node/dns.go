package node

import (
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vmesh/vmesh/names"
	"github.com/vmesh/vmesh/proxy"
)

// buildDNS binds the DNS server ([dns]): on dns.listen, and with capture
// on [::1] at the same port too, where ip6tables redirects IPv6 queries (a
// host without IPv6 has no ::1 and no ip6tables rules: then only IPv4).
// Its upstream queries carry the proxy's mark, which the capture exempts.
func (a *Agent) buildDNS(cfg Config) error {
	if !cfg.DNS.Enabled {
		return nil
	}
	stats := new(names.DNSStats)
	srv := names.NewDNSServer(names.DNSOptions{
		Domain:    cfg.DNS.Domain,
		TTL:       cfg.DNS.TTL,
		Upstreams: cfg.DNS.Upstreams,
		Dialer:    proxy.MarkDialer(cfg.Rules.ProxyMark, 0),
		Catalog:   dnsCatalog{a.catalog(cfg)},
		Logger:    a.sub("dns"),
		Stats:     stats,
		ListenPacket: func(network, addr string) (net.PacketConn, error) {
			return a.fds.packetConn(dnsSocketName(addr, "u"), network, addr)
		},
		Listen: func(network, addr string) (net.Listener, error) {
			return a.fds.listener(dnsSocketName(addr, "t"), network, addr)
		},
	})
	self := []netip.AddrPort{cfg.DNS.Listen}
	if _, err := srv.Listen(cfg.DNS.Listen); err != nil {
		return fmt.Errorf("starting the DNS server (dns.listen): %w", err)
	}
	if cfg.DNSCapturePort() != 0 {
		six := netip.AddrPortFrom(netip.IPv6Loopback(), cfg.DNS.Listen.Port())
		if _, err := srv.Listen(six); err != nil {
			a.log.Debug("no IPv6 loopback: DNS capture is IPv4 only", "err", err)
		} else {
			self = append(self, six)
		}
	}
	if cfg.DNS.Listen.Addr().IsUnspecified() {
		self = append(self, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), cfg.DNS.Listen.Port()))
	}
	srv.SetSelf(self)
	a.dns = srv
	for result, c := range map[string]func() uint64{
		"service": stats.Local.Load, "nxdomain": stats.NXDomain.Load,
		"forwarded": stats.Forwarded.Load, "failed": stats.Failed.Load,
	} {
		a.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name:        "dns_queries_total",
			Help:        "DNS queries the agent answered: from the catalog (service), NXDOMAIN in the mesh's domain, forwarded to the host's resolvers and answered, or failed (SERVFAIL: no upstream answered).",
			ConstLabels: prometheus.Labels{"result": result},
		}, func() float64 { return float64(c()) }))
	}
	return nil
}

// dnsSocketName names a DNS socket in systemd's store: dns4u, dns6t, ...
func dnsSocketName(addr, kind string) string {
	if ap, err := netip.ParseAddrPort(addr); err == nil && ap.Addr().Is6() && !ap.Addr().Is4In6() {
		return "dns6" + kind
	}
	return "dns4" + kind
}

// dnsCatalog answers the DNS server's questions from the catalog.
type dnsCatalog struct{ c catalogAdapter }

func (d dnsCatalog) VIP(service string) (netip.Addr, bool) {
	if eps, _ := d.c.Endpoints(service); len(eps) == 0 {
		return netip.Addr{}, false
	}
	return d.c.VIP(service)
}

func (d dnsCatalog) Ports(service string) []uint16 {
	eps, _ := d.c.Endpoints(service)
	var out []uint16
	for _, e := range eps {
		out = append(out, e.Addr.Port())
	}
	slices.Sort(out)
	return slices.Compact(out)
}
