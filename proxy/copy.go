package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"

	"github.com/vmesh/vmesh/internal/rawsock"
)

// Relay buffers grow with the traffic, as Istio's ztunnel does: a
// connection starts with a small buffer and moves to the next size when a
// read fills the one it has. Idle connections (most of them, in a mesh)
// then cost a few KiB, while busy ones reach copyBufSize, large enough that
// one read fills four full 16 KiB TLS records.
var bufSizes = [...]int{2 << 10, 16 << 10, 64 << 10}

// copyBufSize is the largest relay buffer.
const copyBufSize = 64 << 10

// bufPools holds *[]byte of each of bufSizes.
var bufPools = [len(bufSizes)]*sync.Pool{newBufPool(bufSizes[0]), newBufPool(bufSizes[1]), newBufPool(bufSizes[2])}

func newBufPool(size int) *sync.Pool {
	return &sync.Pool{New: func() any {
		b := make([]byte, size)
		return &b
	}}
}

// peekPool holds the detectBufSize buffers that detection reads into; a
// detected HTTP connection keeps its buffer until its peeked bytes are
// replayed and the connection is done.
var peekPool = sync.Pool{New: func() any {
	b := make([]byte, detectBufSize)
	return &b
}}

func getBuf() *[]byte  { return peekPool.Get().(*[]byte) }
func putBuf(b *[]byte) { peekPool.Put(b) }

// copyGrowing copies src to dst until EOF or an error, in buffers that grow
// with the traffic (see bufSizes). Like io.Copy it returns the bytes written
// and treats EOF as success.
//
// A destination that says how much one write should carry (a mux stream:
// whole TLS records of frames) gets reads of at most that much, rounded
// down to whole records at the smaller buffer sizes.
func copyGrowing(dst io.Writer, src io.Reader) (written int64, err error) {
	rb := relayBuf{}
	if b, ok := dst.(interface{ MaxBatch() int }); ok {
		rb.batch = b.MaxBatch()
	}
	defer rb.put()
	if c, ok := src.(net.Conn); ok {
		if tc, ok := rawsock.TCP(c); ok {
			if rc, err := tc.SyscallConn(); err == nil {
				return copyRaw(dst, rc, &rb)
			}
		}
	}
	for {
		nr, rerr := src.Read(rb.get())
		if nr > 0 {
			nw, werr := rb.flush(dst, nr)
			written += int64(nw)
			if werr != nil {
				return written, werr
			}
		}
		if rerr == io.EOF {
			return written, nil
		}
		if rerr != nil {
			return written, rerr
		}
	}
}

// copyRaw is copyGrowing from a TCP socket, reading it through its
// syscall.RawConn so that a connection waiting for bytes holds no buffer:
// one is taken from the pool when the socket is readable and goes back
// when a read finds it empty (EAGAIN), before the goroutine parks. Most
// proxied connections are idle most of the time; each would otherwise park
// holding its buffer. The reads are the ones net.Conn.Read makes (the same
// poller, deadlines and EINTR handling), so nothing is read early or lost.
func copyRaw(dst io.Writer, rc syscall.RawConn, rb *relayBuf) (written int64, err error) {
	var nr int
	var rerr error
	read := func(fd uintptr) bool {
		n, errno := rawsock.Read(fd, rb.get()) // a raw system call, EINTR retried
		if errno == syscall.EAGAIN {
			rb.put()
			return false // park until readable, then call again
		}
		nr, rerr = n, nil
		if errno != 0 {
			nr, rerr = -1, errno
		}
		return true
	}
	for {
		if err := rc.Read(read); err != nil {
			return written, err
		}
		if rerr != nil {
			return written, &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", rerr)}
		}
		if nr <= 0 {
			return written, nil // EOF
		}
		nw, werr := rb.flush(dst, nr)
		written += int64(nw)
		if werr != nil {
			return written, werr
		}
	}
}

// relayBuf is a relay's pooled buffer: taken when needed, of the size the
// traffic has grown it to.
type relayBuf struct {
	level int     // index into bufSizes
	batch int     // the destination's MaxBatch, or 0
	bp    *[]byte // nil while not held
}

// get returns the buffer to read into, taking it from its pool if needed.
func (b *relayBuf) get() []byte {
	if b.bp == nil {
		b.bp = bufPools[b.level].Get().(*[]byte)
	}
	buf := *b.bp
	if b.batch > 0 {
		buf = buf[:batchLen(len(buf), b.batch)]
	}
	return buf
}

// put returns the buffer to its pool, if held.
func (b *relayBuf) put() {
	if b.bp != nil {
		bufPools[b.level].Put(b.bp)
		b.bp = nil
	}
}

// flush writes the first n bytes read into the buffer to dst (a short
// write is an error); a read that filled the buffer moves to the next
// size.
func (b *relayBuf) flush(dst io.Writer, n int) (int, error) {
	buf := b.get()
	nw, err := dst.Write(buf[:n])
	if err == nil && nw != n {
		err = io.ErrShortWrite
	}
	if err == nil && n == len(buf) && b.level < len(bufSizes)-1 {
		b.put()
		b.level++
	}
	return nw, err
}

// batchLen is how much of a buffer of size n to read into for a destination
// that takes batch bytes a write in frames of batch/4: all of it when
// smaller than a frame, else the most whole frames up to batch.
func batchLen(n, batch int) int {
	frame := batch / 4
	if n < frame {
		return n
	}
	return min(n, batch) / frame * frame
}

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
// lets the kernel splice; otherwise copyGrowing uses pooled buffers that
// grow with the traffic.
func copyHalf(dst, src net.Conn) (int64, error) {
	var n int64
	var err error
	dstTCP, dok := rawsock.TCP(dst)
	srcTCP, sok := rawsock.TCP(src)
	if dok && sok {
		n, err = io.Copy(dstTCP, srcTCP) // the kernel splices
	} else {
		n, err = copyGrowing(dst, src)
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
