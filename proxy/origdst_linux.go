package proxy

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"syscall"
)

// soOriginalDst is SO_ORIGINAL_DST (SOL_IP) and IP6T_SO_ORIGINAL_DST
// (SOL_IPV6); both are 80.
const soOriginalDst = 80

// originalDst returns the destination a REDIRECTed connection was sent to
// before netfilter rewrote it. On a connection that was not redirected the
// kernel returns the socket's local address; the caller compares.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("reading original destination: %w", err)
	}
	local, _ := netip.ParseAddrPort(c.LocalAddr().String())
	var ap netip.AddrPort
	var serr error
	err = rc.Control(func(fd uintptr) {
		if local.Addr().Unmap().Is4() {
			// struct sockaddr_in fits the 20 bytes of an ipv6_mreq.
			m, err := syscall.GetsockoptIPv6Mreq(int(fd), syscall.SOL_IP, soOriginalDst)
			if err != nil {
				serr = err
				return
			}
			b := m.Multiaddr[:]
			ip := netip.AddrFrom4([4]byte(b[4:8]))
			ap = netip.AddrPortFrom(ip, binary.BigEndian.Uint16(b[2:4]))
			return
		}
		// struct sockaddr_in6 (28 bytes) fits the 32 bytes of an ip6_mtuinfo.
		m, err := syscall.GetsockoptIPv6MTUInfo(int(fd), syscall.SOL_IPV6, soOriginalDst)
		if err != nil {
			serr = err
			return
		}
		var pb [2]byte // the port is in network order in memory
		binary.NativeEndian.PutUint16(pb[:], m.Addr.Port)
		port := binary.BigEndian.Uint16(pb[:])
		ap = netip.AddrPortFrom(netip.AddrFrom16(m.Addr.Addr), port)
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("reading original destination: %w", err)
	}
	return ap, nil
}
