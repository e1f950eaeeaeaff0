package proxy

import (
	"crypto/tls"
	"net"
	"syscall"
)

// peerClosed reports whether the other end of an idle connection c has
// closed it (or reset it): a peek that does not wait finds EOF or an error
// rather than nothing to read. Bytes pending on a plain connection (a
// server speaking unasked) count as closed; on a TLS connection they do
// not (a session ticket).
func peerClosed(c net.Conn) bool {
	plain := true
	if tc, ok := c.(*tls.Conn); ok {
		c, plain = tc.NetConn(), false
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return true
	}
	closed := false
	err = rc.Read(func(fd uintptr) bool {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		closed = (n == 0 && err == nil) || (n > 0 && plain) || (err != nil && err != syscall.EAGAIN && err != syscall.EINTR)
		return true
	})
	return closed || err != nil
}
