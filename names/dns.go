package names

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
)

// The agent answers DNS for <service>.<domain> (by default web.vmesh) from
// the catalog and forwards every other query, unchanged, to the resolvers
// the host had. With capture on (the default) the rules redirect the
// host's udp and tcp port 53 traffic to it, as Istio's DNS proxy does, and
// its own queries to the upstreams are exempt (they carry the proxy's
// firewall mark); with capture off it serves on its configured address,
// for systemd-resolved (`resolvectl dns`, `domain ~vmesh`) or resolv.conf
// to point at.
//
// Answers:
//   - A: the service's VIP, when the service exists in the catalog (healthy
//     or not: the VIP balances over what is healthy when a connection is
//     made); AAAA: the VIP when it is IPv6, else an empty answer (NODATA),
//     so resolvers do not fall back to a search list;
//   - SRV for <service>.<domain> and _<service>._tcp.<domain>: one record
//     per port the service serves, targeting <service>.<domain> (its A
//     record in the additional section);
//   - NXDOMAIN for a name of the domain that is no service, with the
//     domain's SOA so that the negative answer is cached for TTL only.

// Catalog is what the DNS server needs to know about services.
type Catalog interface {
	// VIP returns the service's virtual IP, if the service exists.
	VIP(service string) (netip.Addr, bool)
	// Ports returns the ports the service serves, sorted.
	Ports(service string) []uint16
}

// DNSOptions configure a DNS server.
type DNSOptions struct {
	// Domain is the mesh's DNS domain, without dots: "vmesh".
	Domain string
	// TTL of every answer (and of negative answers). Short: a service's
	// VIP never changes, but its existence does.
	TTL time.Duration
	// Upstreams are the resolvers for every other name. Empty: those of
	// the host, read from ResolvConf (re-read when it changes).
	Upstreams []netip.AddrPort
	// ResolvConf is the host's resolver configuration, default
	// /etc/resolv.conf; when it names only systemd-resolved's stub
	// (127.0.0.53), the upstreams come from ResolvedConf instead
	// (default /run/systemd/resolve/resolv.conf).
	ResolvConf   string
	ResolvedConf string
	// Self are the server's own addresses: never used as upstreams (a
	// resolv.conf pointing at the agent would loop).
	Self []netip.AddrPort
	// Dialer dials the upstreams; it marks its sockets so that the capture
	// rules let them through.
	Dialer  *net.Dialer
	Catalog Catalog
	Logger  *slog.Logger
	// Stats, when set, counts queries.
	Stats *DNSStats
	// ListenPacket and Listen bind the server's sockets; nil: net's.
	ListenPacket func(network, addr string) (net.PacketConn, error)
	Listen       func(network, addr string) (net.Listener, error)
}

// DNSStats counts what the server did.
type DNSStats struct {
	Local     atomic.Uint64 // answered from the catalog (a service)
	NXDomain  atomic.Uint64 // names of the domain that are no service
	Forwarded atomic.Uint64 // relayed to an upstream and answered
	Failed    atomic.Uint64 // no upstream answered: SERVFAIL
}

// DNSServer answers and forwards DNS queries.
type DNSServer struct {
	opts   DNSOptions
	suffix string // ".vmesh."
	ttl    uint32
	soa    dns.RR

	mu        sync.Mutex
	upstreams []netip.AddrPort
	checked   time.Time // when resolv.conf was last looked at
	stamp     string    // its identity (mtime and size) when last read

	servers []*dns.Server
	closed  atomic.Bool
}

// NewDNSServer returns a server; Serve starts it.
func NewDNSServer(opts DNSOptions) *DNSServer {
	if opts.Domain == "" {
		opts.Domain = "vmesh"
	}
	if opts.TTL <= 0 {
		opts.TTL = 5 * time.Second
	}
	if opts.ResolvConf == "" {
		opts.ResolvConf = "/etc/resolv.conf"
	}
	if opts.ResolvedConf == "" {
		opts.ResolvedConf = "/run/systemd/resolve/resolv.conf"
	}
	if opts.Dialer == nil {
		opts.Dialer = &net.Dialer{}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Stats == nil {
		opts.Stats = new(DNSStats)
	}
	zone := dns.Fqdn(strings.ToLower(opts.Domain))
	ttl := uint32(opts.TTL / time.Second)
	if ttl == 0 {
		ttl = 1
	}
	s := &DNSServer{opts: opts, suffix: "." + zone, ttl: ttl}
	s.soa = &dns.SOA{
		Hdr:     dns.RR_Header{Name: zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: ttl},
		Ns:      "ns." + zone,
		Mbox:    "hostmaster." + zone,
		Serial:  1,
		Refresh: 3600, Retry: 600, Expire: 86400,
		Minttl: ttl,
	}
	return s
}

// Listen binds udp and tcp on addr (port 0: the port udp got) and returns
// the address bound. Call it for each address to serve.
func (s *DNSServer) Listen(addr netip.AddrPort) (netip.AddrPort, error) {
	listenPacket, listen := s.opts.ListenPacket, s.opts.Listen
	if listenPacket == nil {
		listenPacket = net.ListenPacket
	}
	if listen == nil {
		listen = net.Listen
	}
	// With port 0 the kernel picks udp's port, which tcp may already
	// have in use: pick again a few times.
	var pc net.PacketConn
	var ln net.Listener
	for try := 0; ; try++ {
		var err error
		pc, err = listenPacket("udp", addr.String())
		if err != nil {
			return addr, fmt.Errorf("dns: listening on udp %s: %w", addr, err)
		}
		bound := pc.LocalAddr().(*net.UDPAddr).AddrPort()
		ln, err = listen("tcp", bound.String())
		if err == nil {
			addr = bound
			break
		}
		pc.Close()
		if addr.Port() != 0 || try == 9 {
			return bound, fmt.Errorf("dns: listening on tcp %s: %w", bound, err)
		}
	}
	s.servers = append(s.servers,
		&dns.Server{PacketConn: pc, Handler: s, UDPSize: dns.DefaultMsgSize},
		&dns.Server{Listener: ln, Handler: s, ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second})
	return addr, nil
}

// SetSelf sets the server's own addresses (DNSOptions.Self), before Serve.
func (s *DNSServer) SetSelf(self []netip.AddrPort) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.opts.Self = self
	s.stamp = "" // re-read the upstreams
}

// Serve serves until ctx ends or Close.
func (s *DNSServer) Serve(ctx context.Context) error {
	errc := make(chan error, len(s.servers))
	for _, srv := range s.servers {
		go func() { errc <- srv.ActivateAndServe() }()
	}
	var err error
	pending := len(s.servers)
	select {
	case <-ctx.Done():
	case err = <-errc:
		pending--
	}
	closing := s.closed.Load()
	s.Close()
	for range pending {
		<-errc
	}
	if err != nil && !closing {
		return fmt.Errorf("dns: %w", err)
	}
	return nil
}

// Close stops the server: it closes the sockets themselves, which ends
// Serve whether or not it started.
func (s *DNSServer) Close() {
	if s.closed.Swap(true) {
		return
	}
	for _, srv := range s.servers {
		if srv.PacketConn != nil {
			srv.PacketConn.Close()
		}
		if srv.Listener != nil {
			srv.Listener.Close()
		}
	}
}

// ServeDNS answers one query.
func (s *DNSServer) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	if len(req.Question) != 1 || req.Opcode != dns.OpcodeQuery {
		s.reply(w, new(dns.Msg).SetRcode(req, dns.RcodeNotImplemented))
		return
	}
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	if name == s.suffix[1:] || strings.HasSuffix(name, s.suffix) {
		s.reply(w, s.Answer(req))
		return
	}
	s.forward(w, req)
}

func (s *DNSServer) reply(w dns.ResponseWriter, m *dns.Msg) {
	if err := w.WriteMsg(m); err != nil {
		s.opts.Logger.Debug("dns: writing an answer", "client", w.RemoteAddr().String(), "err", err)
	}
}

// Answer answers a query for a name of the mesh's domain.
func (s *DNSServer) Answer(req *dns.Msg) *dns.Msg {
	m := new(dns.Msg).SetReply(req)
	m.Authoritative = true
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	if name == s.suffix[1:] { // the apex: SOA, nothing else
		if q.Qtype == dns.TypeSOA || q.Qtype == dns.TypeANY {
			m.Answer = append(m.Answer, s.soa)
		} else {
			m.Ns = append(m.Ns, s.soa)
		}
		return m
	}
	label := strings.TrimSuffix(name, s.suffix)
	srvForm := false
	if rest, ok := strings.CutPrefix(label, "_"); ok { // _web._tcp
		svc, proto, ok := strings.Cut(rest, ".")
		if !ok || proto != "_tcp" {
			return s.nxdomain(m)
		}
		label, srvForm = svc, true
	}
	if strings.Contains(label, ".") {
		return s.nxdomain(m)
	}
	vip, ok := s.opts.Catalog.VIP(label)
	if !ok {
		return s.nxdomain(m)
	}
	s.opts.Stats.Local.Add(1)
	target := label + s.suffix
	addr := s.addrRR(target, vip)
	switch {
	case q.Qtype == dns.TypeSRV:
		for _, p := range s.opts.Catalog.Ports(label) {
			m.Answer = append(m.Answer, &dns.SRV{
				Hdr:    dns.RR_Header{Name: q.Name, Rrtype: dns.TypeSRV, Class: dns.ClassINET, Ttl: s.ttl},
				Weight: 100, Port: p, Target: target,
			})
		}
		m.Extra = append(m.Extra, addr)
	case srvForm:
		m.Ns = append(m.Ns, s.soa) // the SRV name has no address: NODATA
	case q.Qtype == dns.TypeA && vip.Is4(), q.Qtype == dns.TypeAAAA && vip.Is6(), q.Qtype == dns.TypeANY:
		addr.Header().Name = q.Name
		m.Answer = append(m.Answer, addr)
	default:
		m.Ns = append(m.Ns, s.soa) // NODATA: the name exists
	}
	return m
}

func (s *DNSServer) addrRR(name string, a netip.Addr) dns.RR {
	if a.Is4() {
		return &dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: s.ttl}, A: a.AsSlice()}
	}
	return &dns.AAAA{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: s.ttl}, AAAA: a.AsSlice()}
}

func (s *DNSServer) nxdomain(m *dns.Msg) *dns.Msg {
	s.opts.Stats.NXDomain.Add(1)
	m.Rcode = dns.RcodeNameError
	m.Ns = append(m.Ns, s.soa)
	return m
}

// forward relays a query to the upstreams in turn over the transport it
// came on, and relays the first answer unchanged (a truncated UDP answer
// too: the client retries over TCP, which is captured as well).
func (s *DNSServer) forward(w dns.ResponseWriter, req *dns.Msg) {
	network := "udp"
	if _, ok := w.RemoteAddr().(*net.TCPAddr); ok {
		network = "tcp"
	}
	ups := s.Upstreams()
	c := &dns.Client{Net: network, Dialer: s.opts.Dialer, Timeout: 2 * time.Second, UDPSize: dns.MaxMsgSize}
	var lastErr error
	for _, up := range ups {
		resp, _, err := c.Exchange(req, up.String())
		if err != nil {
			lastErr = err
			continue
		}
		s.opts.Stats.Forwarded.Add(1)
		s.reply(w, resp)
		return
	}
	s.opts.Stats.Failed.Add(1)
	if lastErr == nil {
		lastErr = errors.New("no upstream resolver (resolv.conf names none but vmesh itself)")
	}
	s.opts.Logger.Debug("dns: forwarding failed", "name", req.Question[0].Name, "err", lastErr)
	s.reply(w, new(dns.Msg).SetRcode(req, dns.RcodeServerFailure))
}

// Upstreams returns the resolvers queries are forwarded to: the configured
// ones, else the host's, re-read when resolv.conf changes (checked at most
// once a second).
func (s *DNSServer) Upstreams() []netip.AddrPort {
	if len(s.opts.Upstreams) > 0 {
		return s.opts.Upstreams
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if time.Since(s.checked) < time.Second && s.checked != (time.Time{}) {
		return s.upstreams
	}
	s.checked = time.Now()
	stamp := fileStamp(s.opts.ResolvConf) + fileStamp(s.opts.ResolvedConf)
	if stamp == s.stamp && s.upstreams != nil {
		return s.upstreams
	}
	ups, err := HostResolvers(s.opts.ResolvConf, s.opts.ResolvedConf)
	if err != nil {
		s.opts.Logger.Warn("dns: reading the host's resolvers", "err", err)
	}
	s.upstreams = slices.DeleteFunc(ups, func(a netip.AddrPort) bool { return slices.Contains(s.opts.Self, a) })
	s.stamp = stamp
	return s.upstreams
}

func fileStamp(path string) string {
	fi, err := os.Stat(path)
	if err != nil {
		return "-"
	}
	return fmt.Sprintf("%d/%d;", fi.ModTime().UnixNano(), fi.Size())
}

// resolvedStub is systemd-resolved's stub resolver address.
var resolvedStub = netip.MustParseAddr("127.0.0.53")

// HostResolvers returns the nameservers of resolvConf, port 53; when its
// only nameserver is systemd-resolved's stub and resolvedConf (resolved's
// list of its upstreams) names some, those.
func HostResolvers(resolvConf, resolvedConf string) ([]netip.AddrPort, error) {
	ups, err := readResolvConf(resolvConf)
	if err != nil {
		return nil, err
	}
	if len(ups) == 1 && ups[0].Addr() == resolvedStub {
		if real, err := readResolvConf(resolvedConf); err == nil && len(real) > 0 {
			return real, nil
		}
	}
	return ups, nil
}

func readResolvConf(path string) ([]netip.AddrPort, error) {
	cc, err := dns.ClientConfigFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var out []netip.AddrPort
	for _, s := range cc.Servers {
		a, err := netip.ParseAddr(s)
		if err != nil {
			continue // a scoped link-local address, say: not reachable by plain name
		}
		out = append(out, netip.AddrPortFrom(a.Unmap(), 53))
	}
	return out, nil
}
