package names

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

type fakeCatalog map[string][]uint16

func (f fakeCatalog) VIP(s string) (netip.Addr, bool) {
	if _, ok := f[s]; !ok {
		return netip.Addr{}, false
	}
	return NewTable(DefaultRange, []string{"web", "kv"}).VIP(s)
}
func (f fakeCatalog) Ports(s string) []uint16 { return f[s] }

// upstream serves example.org A 192.0.2.7 (udp and tcp) and counts queries.
func upstream(t *testing.T) (netip.AddrPort, *atomic.Int64) {
	t.Helper()
	n := new(atomic.Int64)
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		n.Add(1)
		m := new(dns.Msg).SetReply(r)
		if r.Question[0].Name == "example.org." && r.Question[0].Qtype == dns.TypeA {
			rr, _ := dns.NewRR("example.org. 300 IN A 192.0.2.7")
			m.Answer = append(m.Answer, rr)
		} else {
			m.Rcode = dns.RcodeNameError
		}
		w.WriteMsg(m)
	})
	// The same port for udp and tcp: pick again when tcp's is in use.
	var pc net.PacketConn
	var ln net.Listener
	var addr netip.AddrPort
	for try := 0; ln == nil; try++ {
		var err error
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		addr = pc.LocalAddr().(*net.UDPAddr).AddrPort()
		if ln, err = net.Listen("tcp", addr.String()); err != nil {
			pc.Close()
			if try == 9 {
				t.Fatal(err)
			}
		}
	}
	u := &dns.Server{PacketConn: pc, Handler: h}
	tc := &dns.Server{Listener: ln, Handler: h}
	go u.ActivateAndServe()
	go tc.ActivateAndServe()
	t.Cleanup(func() { u.Shutdown(); tc.Shutdown() })
	return addr, n
}

func startDNS(t *testing.T, opts DNSOptions) netip.AddrPort {
	t.Helper()
	opts.Catalog = fakeCatalog{"web": {8080, 8443}, "kv": {6379}}
	s := NewDNSServer(opts)
	addr, err := s.Listen(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Serve(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return addr
}

func ask(t *testing.T, net string, server netip.AddrPort, name string, qtype uint16) *dns.Msg {
	t.Helper()
	m := new(dns.Msg).SetQuestion(name, qtype)
	c := &dns.Client{Net: net, Timeout: 5 * time.Second}
	var r *dns.Msg
	var err error
	for range 3 { // the server may not be accepting yet
		if r, _, err = c.Exchange(m, server.String()); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("%s %s over %s: %v", name, dns.TypeToString[qtype], net, err)
	}
	if r.Id != m.Id {
		t.Fatalf("answer id %d for query %d", r.Id, m.Id)
	}
	return r
}

func TestDNSAnswers(t *testing.T) {
	up, _ := upstream(t)
	srv := startDNS(t, DNSOptions{Upstreams: []netip.AddrPort{up}, TTL: 5 * time.Second})
	vip, _ := NewTable(DefaultRange, []string{"web", "kv"}).VIP("web")

	for _, proto := range []string{"udp", "tcp"} {
		r := ask(t, proto, srv, "Web.VMESH.", dns.TypeA)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 || !r.Authoritative {
			t.Fatalf("%s: A web.vmesh: %v", proto, r)
		}
		a := r.Answer[0].(*dns.A)
		if got, _ := netip.AddrFromSlice(a.A); got.Unmap() != vip || a.Hdr.Ttl != 5 {
			t.Errorf("%s: web.vmesh A %v ttl %d, want %v ttl 5", proto, a.A, a.Hdr.Ttl, vip)
		}
	}
	if r := ask(t, "udp", srv, "web.vmesh.", dns.TypeAAAA); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
		t.Errorf("AAAA web.vmesh: want NODATA (the VIP is IPv4), got %v", r)
	}
	r := ask(t, "udp", srv, "_web._tcp.vmesh.", dns.TypeSRV)
	var ports []uint16
	for _, rr := range r.Answer {
		s := rr.(*dns.SRV)
		ports = append(ports, s.Port)
		if s.Target != "web.vmesh." {
			t.Errorf("SRV target %q", s.Target)
		}
	}
	if !slices.Equal(ports, []uint16{8080, 8443}) || len(r.Extra) != 1 {
		t.Errorf("SRV _web._tcp.vmesh: ports %v, extra %v", ports, r.Extra)
	}
	if r := ask(t, "udp", srv, "web.vmesh.", dns.TypeSRV); len(r.Answer) != 2 {
		t.Errorf("SRV web.vmesh: %v", r)
	}
	for _, name := range []string{"nope.vmesh.", "a.web.vmesh.", "_web._udp.vmesh."} {
		r := ask(t, "udp", srv, name, dns.TypeA)
		if r.Rcode != dns.RcodeNameError || len(r.Ns) != 1 || r.Ns[0].Header().Ttl != 5 {
			t.Errorf("%s: want NXDOMAIN with the SOA (ttl 5), got %v", name, r)
		}
	}
	if r := ask(t, "udp", srv, "vmesh.", dns.TypeA); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
		t.Errorf("the apex: %v", r)
	}
}

func TestDNSForwardsOtherNames(t *testing.T) {
	up, n := upstream(t)
	srv := startDNS(t, DNSOptions{Upstreams: []netip.AddrPort{up}})
	for _, proto := range []string{"udp", "tcp"} {
		r := ask(t, proto, srv, "example.org.", dns.TypeA)
		if len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "192.0.2.7" || r.Answer[0].Header().Ttl != 300 {
			t.Errorf("%s: example.org through vmesh: %v", proto, r)
		}
		if r := ask(t, proto, srv, "missing.example.", dns.TypeA); r.Rcode != dns.RcodeNameError {
			t.Errorf("%s: the upstream's NXDOMAIN: %v", proto, r)
		}
	}
	if n.Load() != 4 {
		t.Errorf("upstream saw %d queries, want 4", n.Load())
	}
	// No upstream answers: SERVFAIL, quickly enough for a resolver to try
	// its next server.
	dead := startDNS(t, DNSOptions{Upstreams: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:1")}})
	if r := ask(t, "tcp", dead, "example.org.", dns.TypeA); r.Rcode != dns.RcodeServerFailure {
		t.Errorf("no upstream: %v", r)
	}
}

func TestHostResolvers(t *testing.T) {
	dir := t.TempDir()
	rc := filepath.Join(dir, "resolv.conf")
	resolved := filepath.Join(dir, "resolved.conf")
	os.WriteFile(rc, []byte("# generated\nnameserver 198.18.0.53\nnameserver 2001:db8::53\nsearch example\n"), 0o644)
	got, err := HostResolvers(rc, resolved)
	want := []netip.AddrPort{netip.MustParseAddrPort("198.18.0.53:53"), netip.MustParseAddrPort("[2001:db8::53]:53")}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("plain resolv.conf: %v %v", got, err)
	}
	// systemd-resolved's stub: its upstreams, not the stub.
	os.WriteFile(rc, []byte("nameserver 127.0.0.53\noptions edns0 trust-ad\n"), 0o644)
	os.WriteFile(resolved, []byte("nameserver 198.18.1.1\n"), 0o644)
	if got, _ := HostResolvers(rc, resolved); !slices.Equal(got, []netip.AddrPort{netip.MustParseAddrPort("198.18.1.1:53")}) {
		t.Errorf("behind resolved's stub: %v", got)
	}
	os.Remove(resolved)
	if got, _ := HostResolvers(rc, resolved); !slices.Equal(got, []netip.AddrPort{netip.MustParseAddrPort("127.0.0.53:53")}) {
		t.Errorf("stub without resolved's list: %v", got)
	}
	// A resolv.conf naming vmesh itself never makes it forward to itself.
	self := netip.MustParseAddrPort("127.0.0.1:53")
	os.WriteFile(rc, []byte("nameserver 127.0.0.1\nnameserver 198.18.0.53\n"), 0o644)
	s := NewDNSServer(DNSOptions{ResolvConf: rc, ResolvedConf: resolved, Self: []netip.AddrPort{self}})
	if got := s.Upstreams(); !slices.Equal(got, want[:1]) {
		t.Errorf("upstreams with vmesh in resolv.conf: %v", got)
	}
}

func BenchmarkDNSAnswer(b *testing.B) {
	s := NewDNSServer(DNSOptions{Catalog: fakeCatalog{"web": {8080}}})
	req := new(dns.Msg).SetQuestion("web.vmesh.", dns.TypeA)
	b.ReportAllocs()
	for b.Loop() {
		if m := s.Answer(req); len(m.Answer) != 1 {
			b.Fatal(m)
		}
	}
}
