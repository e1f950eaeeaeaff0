package discovery

import (
	"net"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
)

// countingTransport wraps memberlist's transport to count gossip packets,
// streams and bytes in both directions.
type countingTransport struct {
	inner    memberlist.Transport
	aware    memberlist.NodeAwareTransport // inner, if it is node aware
	packetCh chan *memberlist.Packet
	streamCh chan net.Conn
	done     chan struct{}
	wg       sync.WaitGroup
	once     sync.Once

	msgIn, msgOut, bytesIn, bytesOut prometheus.Counter
}

var _ memberlist.NodeAwareTransport = (*countingTransport)(nil)

// newCountingTransport wraps t and starts the two goroutines that forward
// (and count) incoming packets and streams; Shutdown stops them.
func newCountingTransport(t memberlist.Transport, m *metrics) *countingTransport {
	c := &countingTransport{
		inner:    t,
		packetCh: make(chan *memberlist.Packet),
		streamCh: make(chan net.Conn),
		done:     make(chan struct{}),
		msgIn:    m.messages.WithLabelValues("in"),
		msgOut:   m.messages.WithLabelValues("out"),
		bytesIn:  m.bytes.WithLabelValues("in"),
		bytesOut: m.bytes.WithLabelValues("out"),
	}
	c.aware, _ = t.(memberlist.NodeAwareTransport)
	c.wg.Add(2)
	go c.forwardPackets()
	go c.forwardStreams()
	return c
}

func (c *countingTransport) forwardPackets() {
	defer c.wg.Done()
	in := c.inner.PacketCh()
	for {
		select {
		case p := <-in:
			c.msgIn.Inc()
			c.bytesIn.Add(float64(len(p.Buf)))
			select {
			case c.packetCh <- p:
			case <-c.done:
				return
			}
		case <-c.done:
			return
		}
	}
}

func (c *countingTransport) forwardStreams() {
	defer c.wg.Done()
	in := c.inner.StreamCh()
	for {
		select {
		case conn := <-in:
			c.msgIn.Inc()
			select {
			case c.streamCh <- &countingConn{Conn: conn, read: c.bytesIn, written: c.bytesOut}:
			case <-c.done:
				conn.Close()
				return
			}
		case <-c.done:
			return
		}
	}
}

func (c *countingTransport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	return c.inner.FinalAdvertiseAddr(ip, port)
}

func (c *countingTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	c.msgOut.Inc()
	c.bytesOut.Add(float64(len(b)))
	return c.inner.WriteTo(b, addr)
}

func (c *countingTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	if c.aware == nil {
		return c.WriteTo(b, a.Addr)
	}
	c.msgOut.Inc()
	c.bytesOut.Add(float64(len(b)))
	return c.aware.WriteToAddress(b, a)
}

func (c *countingTransport) PacketCh() <-chan *memberlist.Packet { return c.packetCh }
func (c *countingTransport) StreamCh() <-chan net.Conn           { return c.streamCh }

func (c *countingTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	conn, err := c.inner.DialTimeout(addr, timeout)
	return c.counted(conn, err)
}

func (c *countingTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	if c.aware == nil {
		return c.DialTimeout(a.Addr, timeout)
	}
	conn, err := c.aware.DialAddressTimeout(a, timeout)
	return c.counted(conn, err)
}

func (c *countingTransport) counted(conn net.Conn, err error) (net.Conn, error) {
	if err != nil {
		return nil, err
	}
	c.msgOut.Inc()
	return &countingConn{Conn: conn, read: c.bytesIn, written: c.bytesOut}, nil
}

// Shutdown shuts the wrapped transport down, then stops forwarding.
func (c *countingTransport) Shutdown() error {
	err := c.inner.Shutdown()
	c.once.Do(func() { close(c.done) })
	c.wg.Wait()
	return err
}

type countingConn struct {
	net.Conn
	read, written prometheus.Counter
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.read.Add(float64(n))
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.written.Add(float64(n))
	return n, err
}
