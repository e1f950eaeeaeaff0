package discovery

import (
	"fmt"
	"log"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// maxPacket is the largest UDP payload; memberlist's own packets are at
// most its UDPBufferSize (1400 bytes by default).
const maxPacket = 65536

// netTransport is gossip's transport over the network: packets over UDP
// and streams over TCP on one address, as memberlist.NetTransport, except
// that each packet is read into one reused buffer and memberlist gets a
// copy of exactly its bytes. NetTransport allocates a new 64 KiB buffer
// for every packet it reads (gossip packets are at most a few KB): that
// was most of what an idle agent allocated, about 90 KB/s on the CA host
// of a two-host mesh, 10 KB/s with this transport.
type netTransport struct {
	tcp      *net.TCPListener
	udp      *net.UDPConn
	logger   *log.Logger
	packetCh chan *memberlist.Packet
	streamCh chan net.Conn
	done     chan struct{} // closed by Shutdown
	once     sync.Once
	wg       sync.WaitGroup
}

var _ memberlist.NodeAwareTransport = (*netTransport)(nil)

// newNetTransport binds TCP and UDP on addr (port 0: a free port, the same
// for both) and starts reading; Shutdown stops it.
func newNetTransport(addr netip.AddrPort, logger *log.Logger) (*netTransport, error) {
	tcp, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(addr))
	if err != nil {
		return nil, fmt.Errorf("listening for gossip streams: %w", err)
	}
	port := uint16(tcp.Addr().(*net.TCPAddr).Port)
	udp, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr.Addr(), port)))
	if err != nil {
		tcp.Close()
		return nil, fmt.Errorf("listening for gossip packets: %w", err)
	}
	// A burst of gossip must not overflow the socket: ask for 2 MiB of
	// receive buffer, as NetTransport does, settling for what is allowed.
	for size := 2 << 20; size > 0; size /= 2 {
		if udp.SetReadBuffer(size) == nil {
			break
		}
	}
	t := &netTransport{
		tcp:      tcp,
		udp:      udp,
		logger:   logger,
		packetCh: make(chan *memberlist.Packet),
		streamCh: make(chan net.Conn),
		done:     make(chan struct{}),
	}
	t.wg.Add(2)
	go t.readPackets()
	go t.acceptStreams()
	return t, nil
}

// GetAutoBindPort returns the bound port (memberlist's name for it).
func (t *netTransport) GetAutoBindPort() int { return t.tcp.Addr().(*net.TCPAddr).Port }

// FinalAdvertiseAddr returns the address to advertise: ip if set, else the
// bound address, which must then be a specific one.
func (t *netTransport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	if ip != "" {
		a := net.ParseIP(ip)
		if a == nil {
			return nil, 0, fmt.Errorf("parsing gossip advertise address %q: invalid address", ip)
		}
		if a4 := a.To4(); a4 != nil {
			a = a4
		}
		return a, port, nil
	}
	bound := t.tcp.Addr().(*net.TCPAddr)
	if bound.IP.IsUnspecified() {
		return nil, 0, fmt.Errorf("choosing a gossip advertise address: bound to %s and none given", bound.IP)
	}
	return bound.IP, bound.Port, nil
}

func (t *netTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return time.Time{}, err
	}
	_, err = t.udp.WriteTo(b, ua)
	return time.Now(), err
}

func (t *netTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	return t.WriteTo(b, a.Addr)
}

func (t *netTransport) PacketCh() <-chan *memberlist.Packet { return t.packetCh }
func (t *netTransport) StreamCh() <-chan net.Conn           { return t.streamCh }

func (t *netTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	return d.Dial("tcp", addr)
}

func (t *netTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	return t.DialTimeout(a.Addr, timeout)
}

// Shutdown closes the sockets and waits for the readers (a reader waiting
// to hand over a packet or stream gives it up). It may be called more than
// once.
func (t *netTransport) Shutdown() error {
	t.once.Do(func() {
		close(t.done)
		t.tcp.Close()
		t.udp.Close()
	})
	t.wg.Wait()
	return nil
}

// readPackets reads packets into one buffer and hands each on as a copy
// the size of the packet.
func (t *netTransport) readPackets() {
	defer t.wg.Done()
	buf := make([]byte, maxPacket)
	for {
		n, from, err := t.udp.ReadFromUDPAddrPort(buf)
		now := time.Now()
		if err != nil {
			if t.closed() {
				return
			}
			t.logger.Printf("[ERR] memberlist: Error reading UDP packet: %v", err)
			continue
		}
		if n == 0 {
			continue
		}
		p := &memberlist.Packet{
			Buf:       append([]byte(nil), buf[:n]...),
			From:      net.UDPAddrFromAddrPort(netip.AddrPortFrom(from.Addr().Unmap(), from.Port())),
			Timestamp: now,
		}
		select {
		case t.packetCh <- p:
		case <-t.done:
			return
		}
	}
}

func (t *netTransport) acceptStreams() {
	defer t.wg.Done()
	var delay time.Duration
	for {
		conn, err := t.tcp.AcceptTCP()
		if err != nil {
			if t.closed() {
				return
			}
			// Out of descriptors, say: back off (5 ms doubling to 1 s, as
			// NetTransport) rather than spin.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			t.logger.Printf("[ERR] memberlist: Error accepting TCP connection: %v", err)
			time.Sleep(delay)
			continue
		}
		delay = 0
		select {
		case t.streamCh <- conn:
		case <-t.done:
			conn.Close()
			return
		}
	}
}

func (t *netTransport) closed() bool {
	select {
	case <-t.done:
		return true
	default:
		return false
	}
}
