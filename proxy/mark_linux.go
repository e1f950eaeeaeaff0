package proxy

import (
	"fmt"
	"net"
	"syscall"
	"time"
)

// MarkDialer returns a Dialer for Options.Dialer whose connections carry the
// firewall mark mark (SO_MARK, which needs CAP_NET_ADMIN), so that the
// redirect rules exempt the proxy's own connections. A zero mark gives a
// plain dialer. timeout bounds each dial.
func MarkDialer(mark uint32, timeout time.Duration) *net.Dialer {
	d := &net.Dialer{Timeout: timeout, KeepAlive: 30 * time.Second}
	if mark == 0 {
		return d
	}
	d.Control = func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, int(mark))
		}); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("setting SO_MARK (needs CAP_NET_ADMIN): %w", serr)
		}
		return nil
	}
	return d
}
