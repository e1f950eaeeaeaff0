package discovery

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// memNetwork is an in-memory network for many agents in one process. Unlike
// memberlist's MockNetwork, whose unbuffered channels make two hosts that
// ping each other at once wait on each other forever (and block senders
// towards a stopped host), packets here behave like UDP: queued, and dropped
// when the receiver is gone or its queue is full. Streams are net.Pipe pairs.
type memNetwork struct {
	mu    sync.Mutex
	hosts map[string]*memTransport
	port  int
}

type memTransport struct {
	net     *memNetwork
	addr    *net.UDPAddr
	packets chan *memberlist.Packet
	streams chan net.Conn
	done    chan struct{}
	once    sync.Once
}

var _ memberlist.NodeAwareTransport = (*memTransport)(nil)

func (n *memNetwork) newTransport() *memTransport {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.hosts == nil {
		n.hosts = map[string]*memTransport{}
	}
	n.port++
	t := &memTransport{
		net:     n,
		addr:    &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: n.port},
		packets: make(chan *memberlist.Packet, 256), // about a socket buffer: more is dropped
		streams: make(chan net.Conn),
		done:    make(chan struct{}),
	}
	n.hosts[t.addr.String()] = t
	return t
}

func (n *memNetwork) host(addr string) *memTransport {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.hosts[addr]
}

func (t *memTransport) FinalAdvertiseAddr(string, int) (net.IP, int, error) {
	return t.addr.IP, t.addr.Port, nil
}

func (t *memTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	now := time.Now()
	dest := t.net.host(addr)
	if dest == nil {
		return now, nil // lost, like a datagram to nowhere
	}
	p := &memberlist.Packet{Buf: append([]byte(nil), b...), From: t.addr, Timestamp: now}
	select {
	case dest.packets <- p:
	default: // receiver queue full: dropped
	}
	return now, nil
}

func (t *memTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	return t.WriteTo(b, a.Addr)
}

func (t *memTransport) PacketCh() <-chan *memberlist.Packet { return t.packets }
func (t *memTransport) StreamCh() <-chan net.Conn           { return t.streams }

func (t *memTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	dest := t.net.host(addr)
	if dest == nil {
		return nil, fmt.Errorf("dial %s: connection refused", addr)
	}
	local, remote := net.Pipe()
	select {
	case dest.streams <- remote:
		return local, nil
	case <-dest.done:
	case <-time.After(timeout):
	}
	local.Close()
	remote.Close()
	return nil, errors.New("dial " + addr + ": timeout")
}

func (t *memTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	return t.DialTimeout(a.Addr, timeout)
}

func (t *memTransport) Shutdown() error {
	t.once.Do(func() {
		t.net.mu.Lock()
		delete(t.net.hosts, t.addr.String())
		t.net.mu.Unlock()
		close(t.done)
	})
	return nil
}
