package mux

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/http2"
)

// Stream is one stream of a session, used like a TCP connection: Read,
// Write, CloseWrite (a FIN: the peer reads EOF, this side still reads),
// Reset, Close. It implements net.Conn; deadlines apply to Read and Write.
type Stream struct {
	s      *Session
	id     uint32
	header []byte // server: the HEADERS block the client opened it with

	mu       sync.Mutex
	readable sync.Cond // data, EOF or reset arrived
	writable sync.Cond // credit or reset arrived

	chunks   []*[]byte // received, unread: chunks[head][off:], then the rest whole
	head     int
	off      int
	buffered int    // unread bytes in chunks
	eof      bool   // the peer half-closed
	recvLeft uint32 // bytes the peer may still send before more credit
	unacked  uint32 // bytes read and not yet credited back

	sendWin int64 // bytes this side may still send
	wclosed bool  // this side half-closed (or reset)

	reset *ResetError // set once: the stream is over
	// readKept: the reset came after the peer's half-close; what it sent
	// is still read, then EOF.
	readKept bool
	ack      bool // client: the server accepted the stream
	ackCh    chan struct{}
	closed   bool // removed from the session
	counted  bool // guarded by s.mu: counts against the session's MaxStreams
	endSent  bool // this side's END is written (or being written, under the write lock)

	rdl, wdl time.Time // deadlines
	timer    *time.Timer

	// Sink (instead of Read): where received bytes go, and the goroutine
	// that writes them, running only while there is something to write.
	sink      io.Writer
	sinkRaw   syscall.RawConn // the sink's socket, written directly when idle
	sinkDone  func(int64, error)
	sunk      int64 // bytes written to sink
	draining  bool  // the sink's goroutine is running
	queued    bool  // in the session's queue: the read loop writes it before its next read
	sinkEnded bool  // sinkDone was called

	onReset    func(*ResetError) // OnReset's
	onReadable func(inLoop bool) // OnReadable's, until it is called
}

var _ net.Conn = (*Stream)(nil)

func newStream(s *Session, id uint32, header []byte) *Stream {
	w := s.cfg.streamWindow()
	st := &Stream{s: s, id: id, header: header, recvLeft: w, sendWin: int64(w), ackCh: make(chan struct{})}
	st.readable.L = &st.mu
	st.writable.L = &st.mu
	return st
}

// Complete reports whether the peer has half-closed the stream after at
// most max bytes, so that everything it will send is buffered: reading it
// does not wait.
func (st *Stream) Complete(max int) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.eof && st.reset == nil && st.sink == nil && st.buffered <= max
}

// Session returns the session carrying the stream.
func (st *Stream) Session() *Session { return st.s }

// ID returns the stream's ID.
func (st *Stream) ID() uint32 { return st.id }

// Header returns the HEADERS block the client opened the stream with
// (server side; shared, do not modify).
func (st *Stream) Header() []byte { return st.header }

// Accept tells the client that the stream reached its destination (server
// side). The relay starts after it.
func (st *Stream) Accept() error {
	return st.s.write(func(fr *http2.Framer) error {
		return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: st.id, EndHeaders: true})
	})
}

// Accepted waits until the server accepted the stream (nil) or reset it
// (*ResetError), or until timeout.
func (st *Stream) Accepted(timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-st.ackCh:
	case <-t.C:
		return os.ErrDeadlineExceeded
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.ack {
		return nil
	}
	return st.reset
}

// accepted records the server's answer (nil: accepted).
func (st *Stream) accepted(err *ResetError) {
	st.mu.Lock()
	defer st.mu.Unlock()
	select {
	case <-st.ackCh:
		return
	default:
	}
	st.ack = err == nil
	close(st.ackCh)
}

// receive appends data from a DATA frame (in the read loop: data is only
// valid until it returns) and records END_STREAM.
func (st *Stream) receive(data []byte, end bool) {
	st.mu.Lock()
	if st.reset != nil {
		st.mu.Unlock()
		return
	}
	if uint32(len(data)) > st.recvLeft {
		st.mu.Unlock()
		if st.finish(&ResetError{Code: CodeFlowControl}) {
			st.s.writeAsync(func(fr *http2.Framer) error { return fr.WriteRSTStream(st.id, http2.ErrCodeFlowControl) })
		}
		return
	}
	st.recvLeft -= uint32(len(data))
	if len(data) > 0 && st.sinkRaw != nil && !st.draining && !st.sinkEnded && (st.queued || st.s.moreRead()) {
		// More frames of this read follow: queue it, and the read loop
		// writes what the read brought for the stream in one write,
		// before its next read. (The last frame of a read, when nothing
		// is queued, is written at once below: no copy.)
		st.appendLocked(data)
		if end {
			st.eof = true
		}
		if !st.queued {
			st.queued = true
			st.s.queued = append(st.s.queued, st)
		}
		both := end && st.endSent
		st.mu.Unlock()
		if both {
			st.s.ended(st)
		}
		return
	}
	if len(data) > 0 && st.sinkRaw != nil && !st.draining && !st.sinkEnded && st.buffered == 0 {
		// Nothing queued and a socket to write to: try the write here,
		// without waiting, and hand to the sink's goroutine only what the
		// socket did not take. Most of the time that is nothing: no
		// hand-off, no goroutine, no copy.
		st.draining = true
		st.mu.Unlock()
		n := st.s.now.WriteOne(st.sinkRaw, data)
		st.mu.Lock()
		st.draining = false
		st.sunk += int64(n)
		data = data[n:]
		if credit := st.creditLocked(n); credit > 0 {
			st.s.writeAsync(func(fr *http2.Framer) error { return fr.WriteWindowUpdate(st.id, credit) })
		}
		if st.reset != nil {
			st.kickLocked() // report the reset that came meanwhile
			st.mu.Unlock()
			return
		}
	}
	st.appendLocked(data)
	if end {
		st.eof = true
	}
	st.readable.Broadcast()
	st.kickLocked()
	cb := st.onReadable
	if st.buffered > 0 || st.eof {
		st.onReadable = nil
	} else {
		cb = nil
	}
	both := end && st.endSent
	st.mu.Unlock()
	if both {
		st.s.ended(st)
	}
	if cb != nil {
		cb(true)
	}
}

// appendLocked queues data in the stream's chunks. Called with st.mu held.
func (st *Stream) appendLocked(data []byte) {
	st.buffered += len(data)
	for len(data) > 0 {
		var c *[]byte
		if k := len(st.chunks); k > 0 && len(*st.chunks[k-1]) < chunkSize {
			c = st.chunks[k-1]
		} else {
			c = chunkPool.Get().(*[]byte)
			*c = (*c)[:0]
			st.chunks = append(st.chunks, c)
		}
		m := copy((*c)[len(*c):chunkSize], data)
		*c = (*c)[:len(*c)+m]
		data = data[m:]
	}
}

// flushQueued writes what receive queued for the sink, in one write that
// does not wait for room (it runs in the session's read loop); what the
// socket does not take, and the end of the stream, are left to the sink's
// goroutine. The chunks are detached while written, as drain's are.
func (st *Stream) flushQueued() {
	s := st.s
	st.mu.Lock()
	st.queued = false
	if st.draining || st.sinkEnded || st.buffered == 0 {
		st.kickLocked()
		st.mu.Unlock()
		return
	}
	off := st.off
	bufs, owned, _ := st.detachLocked(s.iov[:0], s.owned[:0])
	st.draining = true
	st.mu.Unlock()

	n := s.now.Write(st.sinkRaw, bufs)

	st.mu.Lock()
	st.draining = false
	st.sunk += int64(n)
	left := n
	for k, c := range owned {
		if st.reset != nil {
			chunkPool.Put(c) // dropped meanwhile
			continue
		}
		if b := bufs[k]; left >= len(b) {
			left -= len(b)
			chunkPool.Put(c)
			continue
		}
		// Not written: back in the stream, in order (nothing was queued
		// meanwhile: receive runs in this same loop).
		if len(st.chunks) == 0 {
			st.off = left
			if k == 0 {
				st.off += off
			}
		}
		st.buffered += len(bufs[k]) - left
		left = 0
		st.chunks = append(st.chunks, c)
	}
	if credit := st.creditLocked(n); credit > 0 {
		s.writeAsync(func(fr *http2.Framer) error { return fr.WriteWindowUpdate(st.id, credit) })
	}
	st.kickLocked()
	st.mu.Unlock()
	clear(bufs)
	clear(owned)
	s.iov, s.owned = bufs[:0], owned[:0]
}

// OnReadable calls f once, on no lock, when the stream has something to
// read: data, EOF or a reset. A reader that would otherwise wait in Read
// starts then, and costs nothing (no goroutine parked, no wake-up) until
// the peer answers. inLoop says f runs in the session's read loop, with
// the data the loop just read (it may then use Session.AfterReads); it
// is false when f runs at once (the stream was readable already) or for
// the stream's end.
func (st *Stream) OnReadable(f func(inLoop bool)) {
	st.mu.Lock()
	if st.buffered > 0 || st.eof || st.reset != nil {
		st.mu.Unlock()
		f(false)
		return
	}
	st.onReadable = f
	st.mu.Unlock()
}

// Read reads what the peer sent; io.EOF after its half-close.
func (st *Stream) Read(b []byte) (int, error) {
	st.mu.Lock()
	for st.buffered == 0 && !st.eof && st.reset == nil {
		if st.expired(st.rdl) {
			st.mu.Unlock()
			return 0, os.ErrDeadlineExceeded
		}
		st.readable.Wait()
	}
	if st.buffered > 0 {
		n := st.take(b)
		credit := st.creditLocked(n)
		st.mu.Unlock()
		if credit > 0 {
			st.s.write(func(fr *http2.Framer) error { return fr.WriteWindowUpdate(st.id, credit) })
		}
		return n, nil
	}
	if st.reset != nil && !st.readKept {
		err := st.reset
		st.mu.Unlock()
		return 0, err
	}
	st.mu.Unlock()
	st.maybeDone()
	return 0, io.EOF
}

// Sink hands what the peer sends to w instead of to Read. When w is a
// socket (a syscall.Conn) and nothing is queued, the session's read loop
// writes each DATA frame to it at once, without waiting for room: no
// hand-off, no copy. What the socket does not take is queued in the chunks
// it arrived in and written by a goroutine that runs only while there is a
// queue, all of it in one write (a writev on a TCP connection); the read
// loop never blocks on a sink. An idle stream thus has no goroutine and no
// buffer waiting on it (a relay's reader would hold both). Bytes are
// credited back to the peer once written, as Read does.
//
// done is called once, from the sink's goroutine: with the bytes written
// and nil after the peer's half-close (everything before it written), or
// with the stream's *ResetError, or with w's write error (the caller then
// resets the stream: what arrives meanwhile waits unwritten). Read must
// not be used after Sink; deadlines do not apply to it.
func (st *Stream) Sink(w io.Writer, done func(n int64, err error)) {
	st.mu.Lock()
	st.sink, st.sinkDone = w, done
	if sc, ok := w.(syscall.Conn); ok {
		st.sinkRaw, _ = sc.SyscallConn()
	}
	st.kickLocked()
	st.mu.Unlock()
}

// kickLocked starts the sink's goroutine when it is not running and has
// something to do. Called with st.mu held.
func (st *Stream) kickLocked() {
	if st.sink == nil || st.draining || st.sinkEnded {
		return
	}
	if st.buffered == 0 && !st.eof && st.reset == nil {
		return
	}
	st.draining = true
	go st.drain()
}

// drain writes buffered chunks to the sink until none are left, then ends
// (or reports the end of the stream). The chunks it writes are detached
// from the stream first: a reset meanwhile (drop) cannot hand them to
// another stream while they are being written.
func (st *Stream) drain() {
	var bufs net.Buffers
	var owned []*[]byte
	for {
		st.mu.Lock()
		if st.buffered == 0 {
			var err error
			switch {
			case st.reset != nil:
				err = st.reset
			case st.eof:
			default:
				st.draining = false
				st.mu.Unlock()
				return
			}
			st.sinkEnded = true
			done, n := st.sinkDone, st.sunk
			st.mu.Unlock()
			if err == nil {
				st.maybeDone()
			}
			done(n, err)
			return
		}
		var total int
		bufs, owned, total = st.detachLocked(bufs[:0], owned[:0])
		w := st.sink
		st.mu.Unlock()

		n, werr := bufs.WriteTo(w)
		for _, c := range owned {
			chunkPool.Put(c)
		}
		clear(owned)

		st.mu.Lock()
		st.sunk += n
		if werr == nil && n != int64(total) {
			werr = io.ErrShortWrite
		}
		if werr != nil {
			st.sinkEnded = true
			done, sunk := st.sinkDone, st.sunk
			st.mu.Unlock()
			done(sunk, werr)
			return
		}
		credit := st.creditLocked(int(n))
		st.mu.Unlock()
		if credit > 0 {
			st.s.write(func(fr *http2.Framer) error { return fr.WriteWindowUpdate(st.id, credit) })
		}
	}
}

// detachLocked takes the buffered chunks out of the stream, appending
// their unread bytes to bufs and the chunks to owned, and returns them
// with the byte count: a reset while they are written (drop) cannot hand
// them to another stream. Called with st.mu held.
func (st *Stream) detachLocked(bufs [][]byte, owned []*[]byte) ([][]byte, []*[]byte, int) {
	for i, c := range st.chunks[st.head:] {
		b := *c
		if i == 0 {
			b = b[st.off:]
		}
		bufs = append(bufs, b)
		owned = append(owned, c)
	}
	total := st.buffered
	clear(st.chunks)
	st.chunks, st.head, st.off, st.buffered = st.chunks[:0], 0, 0, 0
	return bufs, owned, total
}

// creditLocked records n bytes consumed (read or written to the sink) and
// returns the credit to send the peer now: none until a quarter of the
// window is owed. Called with st.mu held.
func (st *Stream) creditLocked(n int) uint32 {
	st.unacked += uint32(n)
	if st.unacked < st.s.cfg.streamWindow()/4 || st.eof || st.reset != nil {
		return 0
	}
	credit := st.unacked
	st.unacked = 0
	st.recvLeft += credit
	return credit
}

// chunkSize is the size of the pooled chunks a stream buffers received data
// in: a DATA frame's largest payload.
const chunkSize = maxFrame

// chunkPool holds *[]byte of capacity chunkSize. A stream holds chunks only
// while it has unread data: an idle stream holds none, and a busy one never
// grows (and drops) one large buffer.
var chunkPool = sync.Pool{New: func() any {
	b := make([]byte, 0, chunkSize)
	return &b
}}

// take copies buffered data into b, across chunks, and returns the drained
// chunks to the pool. Called with st.mu held.
func (st *Stream) take(b []byte) int {
	n := 0
	for n < len(b) && st.head < len(st.chunks) {
		c := st.chunks[st.head]
		m := copy(b[n:], (*c)[st.off:])
		n += m
		st.off += m
		if st.off == len(*c) {
			chunkPool.Put(c)
			st.chunks[st.head] = nil
			st.head++
			st.off = 0
		}
	}
	if st.head == len(st.chunks) {
		st.chunks, st.head = st.chunks[:0], 0
	}
	st.buffered -= n
	return n
}

// drop releases every buffered chunk. Called with st.mu held.
func (st *Stream) drop() {
	for _, c := range st.chunks[st.head:] {
		chunkPool.Put(c)
	}
	st.chunks, st.head, st.off, st.buffered = nil, 0, 0, 0
}

// MaxBatch returns BatchSize: a relay that reads at most that much before
// each Write makes every frame fill a TLS record.
func (st *Stream) MaxBatch() int { return BatchSize }

// Write sends b, waiting for window credit as needed.
func (st *Stream) Write(b []byte) (int, error) { return st.write(b, false) }

// WriteClose sends b like Write and half-closes the stream with b's last
// frame (END_STREAM on it: the peer sees b and EOF together).
func (st *Stream) WriteClose(b []byte) error {
	_, err := st.write(b, true)
	if err == nil {
		st.maybeDone()
	}
	return err
}

func (st *Stream) write(b []byte, end bool) (int, error) {
	written := 0
	for len(b) > 0 || end {
		st.mu.Lock()
		for flushed := false; st.sendWin <= 0 && len(b) > 0 && st.reset == nil && !st.wclosed; {
			if st.expired(st.wdl) {
				st.mu.Unlock()
				return written, os.ErrDeadlineExceeded
			}
			if !flushed && st.s.waiting.Load() > 0 {
				// What this stream wrote before may wait in the
				// session's buffer for a corked writer's flush: the
				// peer must see it to grant credit.
				flushed = true
				st.mu.Unlock()
				st.s.flushNow()
				st.mu.Lock()
				continue
			}
			st.writable.Wait()
		}
		if st.reset != nil {
			err := st.reset
			st.mu.Unlock()
			return written, err
		}
		if st.wclosed {
			st.mu.Unlock()
			return written, io.ErrClosedPipe
		}
		// Take all the credit this write can use and send it as one
		// batch of frames with one flush (one system call for a 64 KiB
		// copy buffer instead of four).
		n := min(int64(len(b)), st.sendWin)
		last := end && n == int64(len(b))
		st.sendWin -= n
		if last {
			st.wclosed = true
			st.writable.Broadcast()
		}
		st.mu.Unlock()
		chunk := b[:n]
		if err := st.s.write(func(fr *http2.Framer) error {
			if last {
				st.endSending()
			}
			return st.s.writeDataFrames(st.id, chunk, last)
		}); err != nil {
			return written, err
		}
		written += int(n)
		b = b[n:]
		if last {
			break
		}
	}
	return written, nil
}

// SendWindow returns how many bytes a write may send now without waiting
// for the peer's credit.
func (st *Stream) SendWindow() int {
	st.mu.Lock()
	defer st.mu.Unlock()
	return int(max(0, st.sendWin))
}

// TryWrite sends b, and the half-close after it when end is set, only if
// the stream's window takes all of b now: it never waits. It reports
// whether it sent; false with a nil error means "no room now, use Write".
func (st *Stream) TryWrite(b []byte, end bool) (bool, error) {
	st.mu.Lock()
	switch {
	case st.reset != nil:
		err := st.reset
		st.mu.Unlock()
		return false, err
	case st.wclosed:
		st.mu.Unlock()
		return false, io.ErrClosedPipe
	case int64(len(b)) > st.sendWin:
		st.mu.Unlock()
		return false, nil
	}
	st.sendWin -= int64(len(b))
	st.wclosed = end
	st.mu.Unlock()
	err := st.s.write(func(fr *http2.Framer) error {
		if end {
			st.endSending()
		}
		return st.s.writeDataFrames(st.id, b, end)
	})
	if end {
		st.maybeDone()
	}
	return err == nil, err
}

// credit adds window the peer granted.
func (st *Stream) credit(n uint32) {
	st.mu.Lock()
	st.sendWin += int64(n)
	st.writable.Broadcast()
	st.mu.Unlock()
}

// CloseWrite half-closes: the peer reads EOF once it has read everything
// sent before; this side still reads.
func (st *Stream) CloseWrite() error {
	st.mu.Lock()
	if st.wclosed || st.reset != nil {
		st.mu.Unlock()
		return nil
	}
	st.wclosed = true
	st.writable.Broadcast()
	st.mu.Unlock()
	err := st.s.write(func(fr *http2.Framer) error {
		st.endSending()
		return fr.WriteData(st.id, true, nil)
	})
	st.maybeDone()
	return err
}

// endSending marks this side's END as written: the caller holds the
// session's write lock and writes the END next. When the peer's END came
// already the stream is over, and stops counting against the session's
// limit now (Session.ended).
func (st *Stream) endSending() {
	st.mu.Lock()
	st.endSent = true
	both := st.eof
	st.mu.Unlock()
	if both {
		st.s.ended(st)
	}
}

// CloseRead tells the stream this side will read no more. The peer is not
// told (a TCP shutdown(SHUT_RD) tells it nothing either); what it sends is
// dropped as credit allows.
func (st *Stream) CloseRead() error { return nil }

// Reset ends the stream in both directions with code and tells the peer.
func (st *Stream) Reset(code uint32) error {
	if !st.finish(&ResetError{Code: code}) {
		return nil
	}
	return st.s.write(func(fr *http2.Framer) error { return fr.WriteRSTStream(st.id, http2.ErrCode(code)) })
}

// Close ends the stream: after both directions ended it only forgets the
// stream; before, it resets it (CANCEL), as closing a socket with unread
// data does.
func (st *Stream) Close() error {
	st.mu.Lock()
	clean := st.wclosed && st.eof && st.buffered == 0 && st.reset == nil
	st.mu.Unlock()
	if clean {
		st.finish(nil)
		return nil
	}
	return st.Reset(CodeCancel)
}

// maybeDone forgets the stream once both directions ended cleanly.
func (st *Stream) maybeDone() {
	st.mu.Lock()
	done := st.wclosed && st.eof && st.buffered == 0 && st.reset == nil && !st.closed
	st.mu.Unlock()
	if done {
		st.finish(nil)
	}
}

// finish ends the stream with err (nil: cleanly) and removes it from the
// session. It reports whether this call ended it.
func (st *Stream) finish(err *ResetError) bool {
	st.mu.Lock()
	if st.closed {
		st.mu.Unlock()
		return false
	}
	st.closed = true
	if err != nil {
		st.reset = err
		if err.Remote && st.eof && st.sink == nil {
			// The peer had sent all it would: what it sent stays
			// readable, then EOF (an HTTP/2 server's RST_STREAM after
			// its whole response, telling the client to stop sending).
			st.readKept = true
		} else {
			st.drop()
		}
	}
	st.wclosed = true
	st.readable.Broadcast()
	st.writable.Broadcast()
	st.kickLocked()
	if st.timer != nil {
		st.timer.Stop()
	}
	onReset, onReadable := st.onReset, st.onReadable
	st.onReadable = nil
	st.mu.Unlock()
	if onReadable != nil {
		onReadable(false)
	}
	if err != nil {
		st.accepted(err)
	}
	st.s.remove(st.id)
	if err != nil && onReset != nil {
		onReset(err)
	}
	return true
}

// OnReset calls f (once, on no lock) if the stream is reset, by either
// side or by its session's end; at once if it was already. A reader that
// stopped reading (its direction ended) learns of a reset this way.
func (st *Stream) OnReset(f func(*ResetError)) {
	st.mu.Lock()
	if st.closed {
		err := st.reset
		st.mu.Unlock()
		if err != nil {
			f(err)
		}
		return
	}
	st.onReset = f
	st.mu.Unlock()
}

// expired reports whether deadline d has passed; otherwise it arms a timer
// that wakes the waiters at d. Called with st.mu held.
func (st *Stream) expired(d time.Time) bool {
	if d.IsZero() {
		return false
	}
	left := time.Until(d)
	if left <= 0 {
		return true
	}
	if st.timer != nil {
		st.timer.Stop()
	}
	st.timer = time.AfterFunc(left, func() {
		st.mu.Lock()
		st.readable.Broadcast()
		st.writable.Broadcast()
		st.mu.Unlock()
	})
	return false
}

// LocalAddr returns the session connection's local address.
func (st *Stream) LocalAddr() net.Addr { return st.s.conn.LocalAddr() }

// RemoteAddr returns the session connection's remote address.
func (st *Stream) RemoteAddr() net.Addr { return st.s.conn.RemoteAddr() }

// SetDeadline sets both deadlines.
func (st *Stream) SetDeadline(t time.Time) error {
	st.SetReadDeadline(t)
	return st.SetWriteDeadline(t)
}

// SetReadDeadline bounds Read.
func (st *Stream) SetReadDeadline(t time.Time) error {
	st.mu.Lock()
	st.rdl = t
	st.readable.Broadcast()
	st.mu.Unlock()
	return nil
}

// SetWriteDeadline bounds Write's wait for credit.
func (st *Stream) SetWriteDeadline(t time.Time) error {
	st.mu.Lock()
	st.wdl = t
	st.writable.Broadcast()
	st.mu.Unlock()
	return nil
}
