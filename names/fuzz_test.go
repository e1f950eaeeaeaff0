package names

import (
	"net"
	"net/netip"
	"testing"

	"github.com/miekg/dns"
)

// FuzzDNSQuery: whatever an app sends, a query that parses is answered
// without a panic, for names in the mesh's domain and out of it (those
// answer SERVFAIL here: no upstream), and the answer packs.
func FuzzDNSQuery(f *testing.F) {
	for _, q := range []struct {
		name  string
		qtype uint16
	}{{"web.vmesh.", dns.TypeA}, {"_web._tcp.vmesh.", dns.TypeSRV}, {"vmesh.", dns.TypeSOA}, {"a.b.vmesh.", dns.TypeAAAA}, {"example.org.", dns.TypeA}} {
		b, _ := new(dns.Msg).SetQuestion(q.name, q.qtype).Pack()
		f.Add(b)
	}
	// Out of the domain: forwarded to a port where nothing listens (the
	// refusal comes back at once): SERVFAIL.
	s := NewDNSServer(DNSOptions{Catalog: fakeCatalog{"web": {8080, 8443}, "kv": {6379}},
		Upstreams: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:1")}})
	f.Fuzz(func(t *testing.T, b []byte) {
		req := new(dns.Msg)
		if req.Unpack(b) != nil {
			return
		}
		w := &recorder{}
		s.ServeDNS(w, req)
		if w.msg == nil {
			t.Fatal("no answer")
		}
		if _, err := w.msg.Pack(); err != nil {
			t.Fatalf("the answer does not pack: %v", err)
		}
	})
}

// recorder is a dns.ResponseWriter that keeps the answer (UDP from
// 127.0.0.1).
type recorder struct {
	dns.ResponseWriter
	msg *dns.Msg
}

func (r *recorder) WriteMsg(m *dns.Msg) error { r.msg = m; return nil }
func (r *recorder) RemoteAddr() net.Addr      { return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5353} }
