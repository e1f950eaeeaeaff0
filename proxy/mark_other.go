//go:build !linux

package proxy

import (
	"net"
	"time"
)

// MarkDialer returns a plain dialer: firewall marks exist only on Linux.
func MarkDialer(_ uint32, timeout time.Duration) *net.Dialer {
	return &net.Dialer{Timeout: timeout, KeepAlive: 30 * time.Second}
}
