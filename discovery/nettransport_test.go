package discovery

import (
	"bytes"
	"io"
	"log"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"
)

// The gossip transport hands memberlist each packet as a buffer of exactly
// the packet's bytes (a copy: the read buffer is reused), from the
// sender's address; accepts streams; sends packets; and shuts down twice.
func TestNetTransport(t *testing.T) {
	tr, err := newNetTransport(netip.MustParseAddrPort("127.0.0.1:0"), log.New(io.Discard, "", 0))
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Shutdown()
	port := tr.GetAutoBindPort()
	self := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))

	peer, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	to := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}
	big := bytes.Repeat([]byte("g"), 1400)
	for _, msg := range [][]byte{big, []byte("ping")} {
		if _, err := peer.WriteTo(msg, to); err != nil {
			t.Fatal(err)
		}
	}
	var got [][]byte
	for range 2 {
		select {
		case p := <-tr.PacketCh():
			if p.From.String() != peer.LocalAddr().String() {
				t.Errorf("packet from %s, want %s", p.From, peer.LocalAddr())
			}
			if cap(p.Buf) > len(p.Buf)+8 {
				t.Errorf("packet of %d bytes handed over in a buffer of %d", len(p.Buf), cap(p.Buf))
			}
			got = append(got, p.Buf)
		case <-time.After(5 * time.Second):
			t.Fatal("no packet")
		}
	}
	if len(got) != 2 || !bytes.Equal(got[0], big) || string(got[1]) != "ping" {
		t.Errorf("packets %q..., want the 1400 bytes then %q (the first overwritten by the second?)", got, "ping")
	}

	if _, err := tr.WriteTo([]byte("ack"), peer.LocalAddr().String()); err != nil {
		t.Fatal(err)
	}
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 16)
	n, _, err := peer.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "ack" {
		t.Errorf("peer read %q, %v; want %q", buf[:n], err, "ack")
	}

	c, err := tr.DialTimeout(self, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case s := <-tr.StreamCh():
		if s.RemoteAddr().String() != c.LocalAddr().String() {
			t.Errorf("stream from %s, want %s", s.RemoteAddr(), c.LocalAddr())
		}
		s.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("no stream")
	}

	ip, p, err := tr.FinalAdvertiseAddr("", 0)
	if err != nil || !ip.Equal(net.IPv4(127, 0, 0, 1)) || p != port {
		t.Errorf("FinalAdvertiseAddr = %s, %d, %v; want 127.0.0.1, %d", ip, p, err, port)
	}

	// A packet nobody takes must not keep Shutdown waiting.
	peer.WriteTo([]byte("late"), to)
	time.Sleep(50 * time.Millisecond)
	if err := tr.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if err := tr.Shutdown(); err != nil {
		t.Fatal(err)
	}
}
