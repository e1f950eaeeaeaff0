package mux

import (
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
)

// BenchmarkBulk moves bulk data one way over loopback TCP: through 1 and 4
// streams of one session, and through 1 and 4 plain connections (what the
// mux must not fall far behind). Each op is a 64 KiB write, as the proxy's
// relay makes.
func BenchmarkBulk(b *testing.B) {
	for _, n := range []int{1, 4} {
		b.Run(fmt.Sprintf("mux/streams=%d", n), func(b *testing.B) {
			cli := pair(b, Config{}, func(st *Stream) {
				st.Accept()
				io.Copy(io.Discard, st)
				st.CloseWrite()
			})
			conns := make([]io.ReadWriter, n)
			closeWrite := make([]func() error, n)
			for i := range n {
				st, err := cli.Open([]byte("bulk"))
				if err != nil {
					b.Fatal(err)
				}
				conns[i], closeWrite[i] = st, st.CloseWrite
			}
			bulk(b, conns, closeWrite)
		})
		b.Run(fmt.Sprintf("tcp/conns=%d", n), func(b *testing.B) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					go func() {
						io.Copy(io.Discard, c)
						c.(*net.TCPConn).CloseWrite()
					}()
				}
			}()
			conns := make([]io.ReadWriter, n)
			closeWrite := make([]func() error, n)
			for i := range n {
				c, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				conns[i], closeWrite[i] = c, c.(*net.TCPConn).CloseWrite
			}
			bulk(b, conns, closeWrite)
		})
	}
}

// bulk writes b.N 64 KiB chunks spread over conns, half-closes each and
// waits for the peer's EOF (everything was read).
func bulk(b *testing.B, conns []io.ReadWriter, closeWrite []func() error) {
	chunk := make([]byte, 64<<10)
	b.SetBytes(int64(len(chunk)))
	b.ResetTimer()
	var wg sync.WaitGroup
	for i, c := range conns {
		share := b.N / len(conns)
		if i < b.N%len(conns) {
			share++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range share {
				if _, err := c.Write(chunk); err != nil {
					b.Error(err)
					return
				}
			}
			closeWrite[i]()
			io.Copy(io.Discard, c)
		}()
	}
	wg.Wait()
}
