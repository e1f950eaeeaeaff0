package proxy

import (
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"time"
)

// HTTP/2 write batching. x/net/http2 flushes after every frame it writes:
// a request's HEADERS, each DATA frame and END_STREAM, a response's
// HEADERS, DATA and trailers each become a write(2) (and, on the peer
// connection, a TLS record). batchConn hands writes to one writer
// goroutine per connection that sends everything queued meanwhile in one
// write, so the frames of one exchange, and those of concurrent streams,
// share a syscall and a TLS record.

// batchMax bounds what a connection queues: a Write beyond it waits for
// the writer, so back-pressure from the socket still reaches HTTP/2 flow
// control.
const batchMax = 256 << 10

// batchCloseWait bounds how long Close waits for queued bytes (a GOAWAY,
// a last response) to be written before closing the connection.
const batchCloseWait = time.Second

var errBatchClosed = errors.New("write on a closed connection")

// batchConn queues writes for its writer goroutine; reads pass through.
type batchConn struct {
	net.Conn
	mu      sync.Mutex
	space   sync.Cond // signalled when the writer took the queue
	buf     []byte    // queued bytes
	spare   []byte    // the writer's previous buffer, reused
	err     error     // the first write error, or errBatchClosed
	closing bool
	kick    chan struct{} // wakes the writer (capacity 1)
	done    chan struct{} // closed when the writer exits
	once    sync.Once
}

// newBatchConn wraps c; a *tls.Conn keeps its ConnectionState visible to
// the HTTP/2 server and transport.
func newBatchConn(c net.Conn) net.Conn {
	b := &batchConn{Conn: c, kick: make(chan struct{}, 1), done: make(chan struct{})}
	b.space.L = &b.mu
	go b.writer()
	if tc, ok := c.(*tls.Conn); ok {
		return &batchTLSConn{batchConn: b, tc: tc}
	}
	return b
}

type batchTLSConn struct {
	*batchConn
	tc *tls.Conn
}

func (c *batchTLSConn) ConnectionState() tls.ConnectionState { return c.tc.ConnectionState() }

func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	for b.err == nil && len(b.buf) >= batchMax {
		b.space.Wait()
	}
	if b.err != nil {
		err := b.err
		b.mu.Unlock()
		return 0, err
	}
	b.buf = append(b.buf, p...)
	b.mu.Unlock()
	select {
	case b.kick <- struct{}{}:
	default:
	}
	return len(p), nil
}

// writer writes what is queued until the connection closes or a write
// fails.
func (b *batchConn) writer() {
	defer close(b.done)
	for range b.kick {
		for {
			b.mu.Lock()
			out := b.buf
			if len(out) == 0 || b.err != nil {
				closing := b.closing
				b.mu.Unlock()
				if closing {
					return
				}
				break
			}
			b.buf = b.spare[:0]
			b.spare = nil
			b.space.Broadcast()
			b.mu.Unlock()
			_, err := b.Conn.Write(out)
			b.mu.Lock()
			if cap(out) <= batchMax {
				b.spare = out[:0]
			}
			if err != nil && b.err == nil {
				b.err = err
				b.space.Broadcast()
			}
			b.mu.Unlock()
		}
	}
}

// Close writes what is queued (waiting at most batchCloseWait) and closes
// the connection.
func (b *batchConn) Close() error {
	b.once.Do(func() {
		b.mu.Lock()
		b.closing = true
		b.mu.Unlock()
		select {
		case b.kick <- struct{}{}:
		default:
		}
		t := time.NewTimer(batchCloseWait)
		select {
		case <-b.done:
		case <-t.C:
		}
		t.Stop()
		b.mu.Lock()
		if b.err == nil {
			b.err = errBatchClosed
		}
		b.space.Broadcast()
		b.mu.Unlock()
	})
	err := b.Conn.Close()
	// The writer may be blocked in Write until the close above.
	<-b.done
	return err
}
