package proxy

import (
	"net"
	"net/netip"
	"testing"
)

// The outbound proxy at 127.0.0.1 also listens at [::1] on the same port,
// where ip6tables' OUTPUT redirect sends IPv6 connections.
func TestOutboundListensOnIPv6Loopback(t *testing.T) {
	probe, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	}
	port := addrPort(probe.Addr()).Port()
	probe.Close()
	cfg := DefaultConfig()
	cfg.OutboundAddr = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
	cfg.InboundAddr = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), port)
	ca := newTestCA(t, "td")
	p, err := New(cfg, Options{Catalog: newTestCatalog(), Identity: newTestIdentity(t, ca, "a")})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.Listen(); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp6", netip.AddrPortFrom(netip.IPv6Loopback(), port).String())
	if err != nil {
		t.Fatalf("no outbound listener at [::1]:%d: %v", port, err)
	}
	c.Close()
}
