//go:build !linux

package proxy

import (
	"errors"
	"net"
	"net/netip"
)

func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	return netip.AddrPort{}, errors.New("reading original destination: only supported on linux")
}
