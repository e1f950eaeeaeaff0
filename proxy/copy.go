package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
)

// copyBufSize is the size of the relay buffers: large enough that one read
// fills four full 16 KiB TLS records.
const copyBufSize = 64 << 10

// bufPool holds *[]byte of copyBufSize, for relaying and detection.
var bufPool = sync.Pool{New: func() any {
	b := make([]byte, copyBufSize)
	return &b
}}

func getBuf() *[]byte  { return bufPool.Get().(*[]byte) }
func putBuf(b *[]byte) { bufPool.Put(b) }

// closeWriter and closeReader are the half-close capabilities of
// *net.TCPConn, *tls.Conn (CloseWrite only) and our wrappers.
type closeWriter interface{ CloseWrite() error }
type closeReader interface{ CloseRead() error }

// relayResult is what one direction of a relay moved.
type relayResult struct {
	n   int64
	err error
}

// relay copies between the client side conn a (the connection the proxy
// accepted) and the server side conn b in both directions until both are
// done, propagating half-closes, then closes both. It returns the bytes read
// from a (and written to b) and read from b (and written to a).
func relay(a, b net.Conn) (fromA, fromB int64, err error) {
	ch := make(chan relayResult, 2) // room for both: neither goroutine blocks
	go copyClientToServer(ch, b, a)
	r1 := copyServerToClient(b, a)
	r2 := <-ch
	a.Close()
	b.Close()
	return r2.n, r1.n, errors.Join(r1.err, r2.err)
}

// copyClientToServer copies the client's bytes to the server. It has its own
// name so stack dumps tell the directions apart.
func copyClientToServer(ch chan<- relayResult, dst, src net.Conn) {
	n, err := copyHalf(dst, src)
	ch <- relayResult{n, err}
}

// copyServerToClient copies the server's bytes to the client.
func copyServerToClient(server, client net.Conn) relayResult {
	n, err := copyHalf(client, server)
	return relayResult{n, err}
}

// copyHalf copies src to dst until EOF, then half-closes: CloseWrite on dst
// (the peer sees EOF) and CloseRead on src. On an error it closes both so
// the other direction ends too. Between two plain TCP connections io.Copy
// lets the kernel splice; otherwise a pooled 64 KiB buffer is used, with
// ReadFrom/WriteTo hidden so the buffer size is ours.
func copyHalf(dst, src net.Conn) (int64, error) {
	var n int64
	var err error
	_, dstTCP := dst.(*net.TCPConn)
	_, srcTCP := src.(*net.TCPConn)
	if dstTCP && srcTCP {
		n, err = io.Copy(dst, src)
	} else {
		bp := getBuf()
		n, err = io.CopyBuffer(writerOnly{dst}, readerOnly{src}, *bp)
		putBuf(bp)
	}
	if err != nil {
		dst.Close()
		src.Close()
		return n, err
	}
	if cw, ok := dst.(closeWriter); ok {
		cw.CloseWrite()
	} else {
		dst.Close()
	}
	if cr, ok := src.(closeReader); ok {
		cr.CloseRead()
	}
	return n, nil
}

type writerOnly struct{ io.Writer }
type readerOnly struct{ io.Reader }
