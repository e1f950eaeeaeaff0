package main

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/miekg/dns"

	"github.com/vmesh/vmesh/discovery"
	"github.com/vmesh/vmesh/names"
	"github.com/vmesh/vmesh/node"
)

// dnsQuery asks server for name's records of type qtype.
func dnsQuery(ctx context.Context, server netip.AddrPort, name string, qtype uint16) (*dns.Msg, error) {
	c := &dns.Client{Timeout: 3 * time.Second}
	m := new(dns.Msg).SetQuestion(dns.Fqdn(name), qtype)
	r, _, err := c.ExchangeContext(ctx, m, server.String())
	return r, err
}

// hostResolver is the first nameserver of /etc/resolv.conf (where apps'
// queries go), or 127.0.0.53:53 when it names none.
func hostResolver() netip.AddrPort {
	if ups, err := names.HostResolvers("/etc/resolv.conf", "/nonexistent"); err == nil && len(ups) > 0 {
		return ups[0]
	}
	return netip.MustParseAddrPort("127.0.0.53:53")
}

// fromVmesh reports whether r is vmesh's answer for its domain's apex:
// the SOA only vmesh's server gives (hostmaster.<domain>).
func fromVmesh(r *dns.Msg, domain string) bool {
	if r == nil || r.Rcode != dns.RcodeSuccess {
		return false
	}
	for _, rr := range append(r.Answer, r.Ns...) {
		if soa, ok := rr.(*dns.SOA); ok && soa.Mbox == "hostmaster."+dns.Fqdn(domain) {
			return true
		}
	}
	return false
}

// checkDNS asks, as an app would, whether service names resolve: with
// capture on, a live query to the host's resolver must come back from
// vmesh (the capture took it), and a service's name must give its VIP;
// with capture off, vmesh's server must answer and the host's resolver
// should send the domain to it (else the line to add).
func checkDNS(ctx context.Context, env checkEnv, cfg node.Config, st *node.Status, add addFunc) {
	if !cfg.DNS.Enabled {
		add("dns", "ok", "off (dns.enabled = false): services are reached by VIP or host address only", "")
		return
	}
	domain := cfg.DNS.Domain
	listen := cfg.DNS.Listen
	if listen.Addr().IsUnspecified() {
		listen = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), listen.Port())
	}
	resolver := env.Resolver()
	via := func(server netip.AddrPort) (bool, error) {
		r, err := env.Query(ctx, server, domain, dns.TypeSOA)
		return fromVmesh(r, domain), err
	}
	if cfg.DNSCapturePort() != 0 {
		if !st.Rules.Installed {
			add("dns capture", "warn", "the capture rules are not installed yet", "")
			return
		}
		ok, err := via(resolver)
		switch {
		case err != nil:
			add("dns capture", "fail", fmt.Sprintf("a query to the host's resolver %s failed: %v", resolver, err),
				"vmesh rules diff shows whether the VMESH_DNS rules are in place; journalctl -u vmesh -g dns")
			return
		case !ok:
			add("dns capture", "fail", fmt.Sprintf("the host's resolver %s answered ."+domain+" itself: queries are not captured", resolver),
				"vmesh rules diff; an iptables-legacy rule set or a resolver reached other than by port 53 escapes the capture")
			return
		}
		add("dns capture", "ok", fmt.Sprintf("queries to %s are answered by vmesh for .%s and forwarded otherwise", resolver, domain), "")
	} else {
		if ok, err := via(listen); !ok {
			add("dns", "fail", fmt.Sprintf("vmesh's DNS server at %s does not answer: %v", listen, err), "journalctl -u vmesh -g dns")
			return
		}
		if ok, _ := via(resolver); !ok {
			fix := fmt.Sprintf("with systemd-resolved: resolvectl dns lo %s; resolvectl domain lo ~%s (persist: DNS=%s and Domains=~%s in /etc/systemd/resolved.conf.d/vmesh.conf)",
				listen, domain, listen, domain)
			if listen.Port() == 53 {
				fix += fmt.Sprintf("; without it: put \"nameserver %s\" first in /etc/resolv.conf", listen.Addr())
			} else {
				fix += "; for resolv.conf, set dns.listen to port 53 (resolv.conf has no ports) or turn dns.capture on"
			}
			add("dns", "warn", fmt.Sprintf("vmesh answers on %s, but the host's resolver %s does not send .%s there: apps cannot resolve service names", listen, resolver, domain), fix)
			return
		}
		add("dns", "ok", fmt.Sprintf("the host's resolver sends .%s to vmesh at %s", domain, listen), "")
	}
	// A service's name, through the same path apps use.
	var entries []discovery.NodeEntry
	if err := adminGet(ctx, env.Admin, "/v1/services", &entries); err != nil {
		return
	}
	for _, e := range entries {
		for _, svc := range e.Services {
			if svc.VIP == "" {
				continue
			}
			name := svc.Name + "." + domain
			r, err := env.Query(ctx, resolver, name, dns.TypeA)
			got := ""
			if err == nil && len(r.Answer) > 0 {
				if a, ok := r.Answer[0].(*dns.A); ok {
					got = a.A.String()
				}
			}
			if got != svc.VIP {
				add("dns names", "fail", fmt.Sprintf("%s resolves to %q, want its VIP %s (%v)", name, got, svc.VIP, err), "journalctl -u vmesh -g dns")
			} else {
				add("dns names", "ok", fmt.Sprintf("%s is %s", name, got), "")
			}
			return
		}
	}
}
