// Package mux carries many byte streams over one connection between two
// vmesh proxies, each stream exactly like a TCP connection: either
// direction ends on its own (END_STREAM is a FIN), a reset is a reset, and
// a stream whose reader stops stalls only itself.
//
// The wire format is HTTP/2's framing (golang.org/x/net/http2's Framer),
// without HTTP: the client opens a stream with a HEADERS frame whose block
// is opaque to this package (the proxy's transport header, not HPACK); the
// server answers with an empty HEADERS frame once it has reached the
// stream's destination (Stream.Accept), or resets the stream with a code.
// DATA carries the bytes, END_STREAM on DATA is the half-close, RST_STREAM
// the reset, WINDOW_UPDATE the per-stream flow control credit, PING the
// keep-alive, GOAWAY the end of a session. There is no connection-level
// window: each stream has its own (Config.StreamWindow), so one stalled
// stream can never hold back another's credit (the equal-window deadlock
// ztunnel hit cannot happen), and a session buffers at most MaxStreams ×
// StreamWindow, plus the unread data of streams that ended in both
// directions: as in HTTP/2, a stream counts against MaxStreams until
// each side has sent its END (or one reset it), not until its data is
// read.
//
// Writes from all streams share one buffered writer: a writer flushes only
// when no other writer is waiting, so frames ready at the same time leave
// together, with no writer goroutine to hand off to. One goroutine per
// session reads frames and hands DATA to its stream, which keeps it in
// pooled 16 KiB chunks until read: a chunk goes back to the pool as soon
// as it is drained, so an idle stream holds none and a busy one never
// grows, drops and regrows one large buffer (which cost 12× in bulk
// throughput, BenchmarkBulk). A stream whose bytes go to a socket
// (Stream.Sink, what a relay uses) is written by the read loop itself
// while the socket takes them, and otherwise by a goroutine that lives
// only while bytes are queued.
//
// A Wire beneath the session's TLS connection (the proxy puts one under
// every mux connection) batches the system calls: a flush's TLS records
// leave in one write, not one per 16 KiB record, and the DATA frames one
// read of the connection brings are written to each sink in one writev
// before the next read, not one write per frame. On loopback, where each
// write is also a packet through the receiver's TCP stack, this took a
// bulk stream's proxy CPU from 4.0 to 2.7 s per GB (iperf3, make bench).
package mux

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/vmesh/vmesh/internal/rawsock"
)

// Config tunes a session. Zero fields mean their defaults.
type Config struct {
	// StreamWindow is how many bytes a stream's sender may have in flight
	// unread by the receiver. Default 1 MiB.
	StreamWindow uint32
	// MaxStreams bounds the streams open at once on a session; a client
	// opens another session when one is full. Default 100.
	MaxStreams int
	// KeepAlive is how often an otherwise silent session sends a PING;
	// a session that has received nothing for 3 × KeepAlive is closed.
	// Default 15s; negative disables.
	KeepAlive time.Duration
	// MaxHeader bounds a stream's HEADERS block. Default 1 KiB.
	MaxHeader int
}

func (c Config) streamWindow() uint32 {
	if c.StreamWindow == 0 {
		return 1 << 20
	}
	return c.StreamWindow
}

func (c Config) maxStreams() int {
	if c.MaxStreams <= 0 {
		return 100
	}
	return c.MaxStreams
}

func (c Config) keepAlive() time.Duration {
	if c.KeepAlive == 0 {
		return 15 * time.Second
	}
	return c.KeepAlive
}

func (c Config) maxHeader() int {
	if c.MaxHeader <= 0 {
		return 1 << 10
	}
	return c.MaxHeader
}

// maxFrame is the largest DATA payload accepted (HTTP/2's default
// SETTINGS_MAX_FRAME_SIZE, which the reader enforces).
const maxFrame = 16 << 10

// recordFrame is the largest DATA payload written: with its 9-byte frame
// header it fills one TLS record (16 KiB of plaintext) exactly, so a write
// of BatchSize bytes leaves as four full records and no fifth record of
// 36 bytes of frame headers.
const recordFrame = 16<<10 - 9

// BatchSize is the most a relay should hand to one Stream.Write: four
// recordFrame frames, which fill the session's 64 KiB write buffer and
// four TLS records exactly.
const BatchSize = 4 * recordFrame

// Reset codes (HTTP/2's, plus vmesh's own above 0xff).
const (
	CodeNoError      = uint32(http2.ErrCodeNo)
	CodeProtocol     = uint32(http2.ErrCodeProtocol)
	CodeFlowControl  = uint32(http2.ErrCodeFlowControl)
	CodeRefused      = uint32(http2.ErrCodeRefusedStream) // not opened: safe to retry elsewhere
	CodeCancel       = uint32(http2.ErrCodeCancel)        // the sender's side went away or reset
	CodeConnect      = uint32(http2.ErrCodeConnect)       // the destination could not be reached
	CodeDenied       = uint32(0x100)                      // authorization refused the stream
	CodeUnknownPort  = uint32(0x101)                      // no such destination
	CodeBadHeader    = uint32(0x102)                      // the HEADERS block did not parse
	CodeSessionEnded = uint32(0x1ff)                      // (local) the session closed under the stream
)

// ResetError is what Read, Write and Accepted return on a stream that was
// reset, by the peer (Remote) or here.
type ResetError struct {
	Code   uint32
	Remote bool
}

func (e *ResetError) Error() string {
	who := "locally"
	if e.Remote {
		who = "by peer"
	}
	return fmt.Sprintf("stream reset %s: %s", who, CodeString(e.Code))
}

// CodeString names a reset code.
func CodeString(code uint32) string {
	switch code {
	case CodeDenied:
		return "denied"
	case CodeUnknownPort:
		return "unknown port"
	case CodeBadHeader:
		return "bad header"
	case CodeSessionEnded:
		return "session ended"
	}
	return http2.ErrCode(code).String()
}

// ErrSessionClosed is returned by Open on a closed (or closing) session.
var ErrSessionClosed = errors.New("mux session closed")

// Session is one connection carrying streams.
type Session struct {
	conn       net.Conn
	client     bool
	cfg        Config
	accept     func(*Stream) // server: called in its own goroutine per stream
	inline     func(*Stream) bool
	inlineDone func()
	fresh      []*Stream     // the read loop's: streams opened in this read batch
	rd         *bufio.Reader // what the framer reads from
	// With a Wire beneath the connection: the read loop's streams whose
	// sinks have data queued, written before the wire's next read.
	wire   *Wire
	queued []*Stream
	iov    [][]byte          // flushQueued's scratch
	now    rawsock.NowWriter // the read loop's writes to sinks
	owned  []*[]byte         // flushQueued's scratch
	after  []func()          // AfterReads'

	wmu     sync.Mutex // serializes frame writes
	bw      *bufio.Writer
	fr      *http2.Framer
	waiting atomic.Int32 // writers queued on wmu: the last one flushes
	dhdr    [9]byte      // writeDataFrames' frame header (a local one escapes through bw: an allocation per frame)
	werr    error        // guarded by wmu: the first write error

	// The keep-alive's view of reads: readSince is set by the read loop
	// (a flag, not a clock read per frame), and the keep-alive loop turns
	// it into lastRead, unix nanos, at its tick.
	lastRead  atomic.Int64
	readSince atomic.Bool

	async   atomic.Int32 // writeAsync's writes waiting
	yield   atomic.Bool  // writeAsync started a write: the read loop lets it run
	flooded atomic.Bool  // writeAsync passed maxAsyncWrites: the session ends

	mu       sync.Mutex
	streams  map[uint32]*Stream
	open     int    // streams counting against MaxStreams (Stream.counted)
	nextID   uint32 // client: next stream ID to open
	lastPeer uint32 // server: highest stream ID the peer opened
	closed   bool
	goaway   bool // the peer sent GOAWAY: open no more streams
	err      error
	idleAt   time.Time // when the last stream ended (zero while streams are open)
	done     chan struct{}
}

// Client starts a session on conn, a connection this side dialed. It starts
// the session's read loop; Close ends it.
func Client(conn net.Conn, cfg Config) *Session {
	s := newSession(conn, true, cfg, nil)
	s.nextID = 1
	s.start()
	return s
}

// Server starts a session on conn, a connection this side accepted. accept
// is called, in a new goroutine, for each stream the peer opens; it must
// end with Stream.Accept and a relay, or Stream.Reset. Serve blocks until
// the session ends and returns why.
func Server(conn net.Conn, cfg Config, accept func(*Stream)) *Session {
	s := newSession(conn, false, cfg, accept)
	return s
}

func newSession(conn net.Conn, client bool, cfg Config, accept func(*Stream)) *Session {
	s := &Session{
		conn:    conn,
		client:  client,
		cfg:     cfg,
		accept:  accept,
		streams: make(map[uint32]*Stream),
		done:    make(chan struct{}),
		idleAt:  time.Now(),
	}
	s.bw = bufio.NewWriterSize(conn, 64<<10)
	s.rd = bufio.NewReaderSize(conn, 32<<10)
	s.fr = http2.NewFramer(s.bw, s.rd)
	s.fr.SetMaxReadFrameSize(maxFrame)
	// One DATA frame object for every read: a frame's bytes are copied
	// (or written to a sink) before the next read, as they must be anyway
	// (they live in the framer's read buffer).
	s.fr.SetReuseFrames()
	s.lastRead.Store(time.Now().UnixNano())
	if s.wire = wireOf(conn); s.wire != nil {
		s.wire.start(s.flushSinks)
	}
	return s
}

// moreRead reports whether bytes already read from the wire wait to be
// framed: the frame in hand is not the read's last. TLS may hold a whole
// record the wire no longer sees; that frame is then written on its own.
// Read loop only.
func (s *Session) moreRead() bool {
	return s.wire != nil && (s.rd.Buffered() > 0 || s.wire.r < s.wire.w)
}

// flushSinks writes what the frames read since the last read of the wire
// queued for sinks, one write per stream, and runs what AfterReads
// deferred. It runs in the read loop, before a read that could wait.
func (s *Session) flushSinks() {
	for i, st := range s.queued {
		s.queued[i] = nil
		st.flushQueued()
	}
	s.queued = s.queued[:0]
	for i := 0; i < len(s.after); i++ { // f may defer more
		f := s.after[i]
		s.after[i] = nil
		f()
	}
	s.after = s.after[:0]
}

// AfterReads runs f in the read loop once the frames of the bytes read so
// far are handled, before the loop reads the connection again: what those
// frames' callbacks (OnReadable's, with inLoop) started, they finish
// together there, such as one flush for several responses to one app.
// Call it only from the read loop (f too may); f must not wait.
func (s *Session) AfterReads(f func()) {
	s.after = append(s.after, f)
}

func (s *Session) start() {
	go s.readLoop()
	if s.cfg.keepAlive() > 0 {
		go s.keepAliveLoop()
	}
}

// Serve runs a server session until it ends and returns why.
func (s *Session) Serve() error {
	if s.cfg.keepAlive() > 0 {
		go s.keepAliveLoop()
	}
	s.readLoop()
	<-s.done
	return s.err
}

// Done is closed when the session has ended.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err returns why the session ended, or nil while it runs.
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Load returns the streams open now and whether Open can take another.
func (s *Session) Load() (streams int, available bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.open
	return n, !s.closed && !s.goaway && n < s.cfg.maxStreams() && s.nextID < 1<<31-1
}

// IdleSince returns when the session's last stream ended, or the zero time
// while streams are open.
func (s *Session) IdleSince() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.idleAt
}

// Open opens a stream whose HEADERS block is header. The peer answers with
// Accept or a reset; Stream.Accepted waits for that. Writes may start at
// once (they wait for window credit like any write).
func (s *Session) Open(header []byte) (*Stream, error) {
	st, _, err := s.OpenWith(header, nil, false)
	return st, err
}

// OpenWith opens a stream like Open and sends data after the HEADERS frame,
// half-closing the stream after it when end is set, in the same write (one
// system call for a small request and its stream). It sends data only when
// the whole of it fits the stream's window: sent says whether it did; if
// not, the caller writes it.
func (s *Session) OpenWith(header, data []byte, end bool) (st *Stream, sent bool, err error) {
	if !s.client {
		return nil, false, errors.New("mux: only a client session opens streams")
	}
	if len(header) > s.cfg.maxHeader() {
		return nil, false, fmt.Errorf("mux: header of %d bytes, limit %d", len(header), s.cfg.maxHeader())
	}
	// The ID is taken under the write lock: streams must appear on the
	// wire in the order of their IDs (a peer refuses a lower ID after a
	// higher one), and two streams opened at once would otherwise race.
	var openErr error
	err = s.write(func(fr *http2.Framer) error {
		s.mu.Lock()
		switch {
		case s.closed || s.goaway || s.nextID >= 1<<31-1:
			openErr = ErrSessionClosed
		case s.open >= s.cfg.maxStreams():
			openErr = errors.New("mux: session full")
		}
		if openErr != nil {
			s.mu.Unlock()
			return nil
		}
		id := s.nextID
		s.nextID += 2
		st = newStream(s, id, nil)
		s.streams[id] = st
		st.counted = true
		s.open++
		s.idleAt = time.Time{}
		s.mu.Unlock()
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: header, EndHeaders: true}); err != nil {
			return err
		}
		if int64(len(data)) > st.sendWin || (len(data) == 0 && !end) {
			return nil
		}
		// Under the stream's lock: the read loop reads both once the
		// peer answers (it cannot have yet: these frames are not sent).
		st.mu.Lock()
		st.sendWin -= int64(len(data))
		st.wclosed = end
		st.mu.Unlock()
		if end {
			st.endSending()
		}
		sent = true
		return s.writeDataFrames(id, data, end)
	})
	if openErr != nil {
		return nil, false, openErr
	}
	if err != nil {
		if st != nil {
			st.finish(&ResetError{Code: CodeSessionEnded})
		}
		return nil, false, err
	}
	if sent && end {
		st.maybeDone()
	}
	return st, sent, nil
}

// writeDataFrames writes b as DATA frames of at most recordFrame bytes,
// END_STREAM on the last when end. Called with wmu held (in a write's f).
// Each frame's header and payload go straight into the write buffer (the
// framer would copy the payload once more first).
func (s *Session) writeDataFrames(id uint32, b []byte, end bool) error {
	for {
		m := min(len(b), recordFrame)
		last := m == len(b)
		var flags byte
		if end && last {
			flags = byte(http2.FlagDataEndStream)
		}
		s.dhdr = [9]byte{byte(m >> 16), byte(m >> 8), byte(m), byte(http2.FrameData), flags,
			byte(id >> 24), byte(id >> 16), byte(id >> 8), byte(id)}
		s.bw.Write(s.dhdr[:])
		if _, err := s.bw.Write(b[:m]); err != nil {
			return err
		}
		if last {
			return nil
		}
		b = b[m:]
	}
}

// Close ends the session: every stream is reset (locally) and the
// connection closed. It can be called more than once.
func (s *Session) Close() error {
	s.closeWith(ErrSessionClosed)
	return nil
}

// GoAway tells the peer to open no more streams; open ones go on.
func (s *Session) GoAway() {
	s.write(func(fr *http2.Framer) error {
		s.mu.Lock()
		last := s.lastPeer
		s.mu.Unlock()
		return fr.WriteGoAway(last, http2.ErrCodeNo, nil)
	})
}

func (s *Session) closeWith(err error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.err = err
	streams := s.streams
	s.streams = map[uint32]*Stream{}
	for _, st := range streams {
		st.counted = false
	}
	s.open = 0
	s.mu.Unlock()
	s.conn.Close()
	for _, st := range streams {
		st.finish(&ResetError{Code: CodeSessionEnded})
	}
	close(s.done)
}

// write runs one frame write under the write lock and flushes when no other
// writer is waiting, so frames queued together go out together.
func (s *Session) write(f func(*http2.Framer) error) error {
	s.waiting.Add(1)
	s.wmu.Lock()
	last := s.waiting.Add(-1) == 0
	err := s.werr
	if err == nil {
		err = f(s.fr)
		if err == nil && last {
			err = s.flush()
		}
		if err != nil {
			s.werr = err
		}
	}
	s.wmu.Unlock()
	if err != nil {
		s.closeWith(fmt.Errorf("mux: writing: %w", err))
	}
	return err
}

// flush writes the buffered frames; with a wire, their TLS records leave
// in one system call. Called with wmu held.
func (s *Session) flush() error {
	err := s.bw.Flush()
	if s.wire != nil && err == nil {
		err = s.wire.flush()
	}
	return err
}

// flushNow flushes what is buffered, corked or not.
func (s *Session) flushNow() {
	s.wmu.Lock()
	err := s.werr
	if err == nil {
		if err = s.flush(); err != nil {
			s.werr = err
		}
	}
	s.wmu.Unlock()
	if err != nil {
		s.closeWith(fmt.Errorf("mux: writing: %w", err))
	}
}

// Cork holds back the flushes of writes until Uncork: a caller about to
// write on several streams (responses that arrived together) sends them
// in one system call.
func (s *Session) Cork() { s.waiting.Add(1) }

// Uncork ends a Cork and flushes what the writes meanwhile left.
func (s *Session) Uncork() {
	if s.waiting.Add(-1) != 0 {
		return // a writer still to come flushes
	}
	s.write(func(*http2.Framer) error { return nil })
}

// writeAsync writes a control frame without blocking the caller (the read
// loop must never wait on the connection's write side). Past
// maxAsyncWrites waiting at once (a peer that sends PINGs or opens
// streams it will not read the answers of) the session ends: a goroutine
// per frame would otherwise grow without bound.
func (s *Session) writeAsync(f func(*http2.Framer) error) {
	if s.async.Add(1) > maxAsyncWrites {
		s.async.Add(-1)
		if !s.flooded.Swap(true) {
			// Not here: the caller may hold a stream's lock, which
			// closing takes.
			go s.closeWith(errControlFlood)
		}
		return
	}
	go func() {
		s.write(f)
		s.async.Add(-1)
	}()
	s.yield.Store(true)
}

// maxAsyncWrites bounds the control frames waiting to be written (HTTP/2
// servers close a connection at a similar count: x/net's at 10,000 queued
// control frames).
const maxAsyncWrites = 1000

var errControlFlood = errors.New("mux: the peer sent more control frames than it read the answers of (over 1000 waiting)")

func (s *Session) readLoop() {
	for {
		f, err := s.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				s.resetStream(se.StreamID, uint32(se.Code))
				continue
			}
			if errors.Is(err, io.EOF) {
				err = io.EOF
			}
			s.closeWith(fmt.Errorf("mux: reading: %w", err))
			return
		}
		if !s.readSince.Load() {
			s.readSince.Store(true)
		}
		err = s.handle(f)
		if s.yield.Load() {
			// A credit or an ack is waiting to be written: let it go
			// now. On one core the read loop would otherwise keep the
			// core until its socket is empty, and the peer, out of
			// window, wait for the credit all that time.
			s.yield.Store(false)
			runtime.Gosched()
		}
		if err != nil {
			s.write(func(fr *http2.Framer) error { return fr.WriteGoAway(0, http2.ErrCodeProtocol, nil) })
			s.closeWith(err)
			return
		}
		if s.wire == nil && len(s.after) > 0 {
			s.flushSinks() // without a wire, each frame is a batch
		}
		if len(s.fresh) > 0 && (s.rd.Buffered() == 0 || len(s.fresh) >= maxFresh) {
			s.acceptFresh()
		}
	}
}

// maxFresh bounds the streams opened in one read batch that wait for it
// to end before they are accepted.
const maxFresh = 16

// SetInline gives a server session a handler tried in the read loop, once
// the frames read with a new stream are handled (its first bytes, often
// all of them, are there): it reports whether it handled the stream; if
// not, the stream goes to accept in a goroutine as usual. It must not
// wait. Call it before Serve.
// done, if set, runs after each batch of inline calls (to flush what they
// wrote).
func (s *Session) SetInline(f func(*Stream) bool, done func()) { s.inline, s.inlineDone = f, done }

func (s *Session) acceptFresh() {
	for i, st := range s.fresh {
		s.fresh[i] = nil
		if !s.inline(st) {
			go s.accept(st)
		}
	}
	s.fresh = s.fresh[:0]
	if s.inlineDone != nil {
		s.inlineDone()
	}
}

// handle processes one frame; an error ends the session (a protocol error).
func (s *Session) handle(f http2.Frame) error {
	id := f.Header().StreamID
	switch f := f.(type) {
	case *http2.DataFrame:
		st := s.stream(id)
		if st == nil {
			// A stream that ended here (reset, or both sides done): the
			// peer had not seen that yet. Nothing to credit: windows are
			// per stream.
			return nil
		}
		st.receive(f.Data(), f.StreamEnded())
	case *http2.HeadersFrame:
		if s.client {
			if st := s.stream(id); st != nil {
				st.accepted(nil)
				if f.StreamEnded() {
					st.receive(nil, true)
				}
			}
			return nil
		}
		return s.incoming(id, f)
	case *http2.RSTStreamFrame:
		if st := s.stream(id); st != nil {
			st.finish(&ResetError{Code: uint32(f.ErrCode), Remote: true})
		}
	case *http2.WindowUpdateFrame:
		if id == 0 {
			return nil // no connection window
		}
		if st := s.stream(id); st != nil {
			st.credit(f.Increment)
		}
	case *http2.PingFrame:
		if !f.IsAck() {
			data := f.Data
			s.writeAsync(func(fr *http2.Framer) error { return fr.WritePing(true, data) })
		}
	case *http2.GoAwayFrame:
		s.mu.Lock()
		s.goaway = true
		s.mu.Unlock()
	}
	return nil
}

func (s *Session) incoming(id uint32, f *http2.HeadersFrame) error {
	s.mu.Lock()
	if id%2 != 1 || id <= s.lastPeer {
		s.mu.Unlock()
		return fmt.Errorf("mux: peer opened stream %d after %d", id, s.lastPeer)
	}
	s.lastPeer = id
	if s.closed || s.open >= s.cfg.maxStreams() || len(f.HeaderBlockFragment()) > s.cfg.maxHeader() {
		s.mu.Unlock()
		s.writeAsync(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, http2.ErrCodeRefusedStream) })
		return nil
	}
	st := newStream(s, id, append([]byte(nil), f.HeaderBlockFragment()...))
	s.streams[id] = st
	st.counted = true
	s.open++
	s.idleAt = time.Time{}
	s.mu.Unlock()
	if f.StreamEnded() {
		st.receive(nil, true)
	}
	if s.inline != nil {
		s.fresh = append(s.fresh, st)
		return nil
	}
	go s.accept(st)
	return nil
}

// ended stops st counting against MaxStreams: it ended in both
// directions (its data may still be unread). When this side's END is the
// last, ended runs under the write lock just before the END is written
// (Stream.endSending; the read loop frees the slot on the peer's END only
// once this side's is written or being written),
// as HTTP/2 closes a stream on sending it: a server frees the slot before
// its END can reach the client (which may open another stream the moment
// it reads it), and a client cannot write a HEADERS opened in the freed
// slot ahead of its END (the server would still count the stream, and
// refuse the new one).
func (s *Session) ended(st *Stream) {
	s.mu.Lock()
	if st.counted {
		st.counted = false
		s.open--
	}
	s.mu.Unlock()
}

func (s *Session) stream(id uint32) *Stream {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.streams[id]
}

func (s *Session) remove(id uint32) {
	s.mu.Lock()
	if st := s.streams[id]; st != nil && st.counted {
		st.counted = false
		s.open--
	}
	delete(s.streams, id)
	if len(s.streams) == 0 && s.idleAt.IsZero() {
		s.idleAt = time.Now()
	}
	s.mu.Unlock()
}

// resetStream resets a stream from the read loop (never waiting on writes).
func (s *Session) resetStream(id uint32, code uint32) {
	if st := s.stream(id); st != nil && !st.finish(&ResetError{Code: code}) {
		return
	}
	s.writeAsync(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, http2.ErrCode(code)) })
}

func (s *Session) keepAliveLoop() {
	every := s.cfg.keepAlive()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		now := time.Now()
		if s.readSince.Swap(false) {
			s.lastRead.Store(now.UnixNano())
		}
		silent := now.Sub(time.Unix(0, s.lastRead.Load()))
		if silent > 3*every {
			s.closeWith(fmt.Errorf("mux: peer silent for %v", silent.Round(time.Second)))
			return
		}
		if silent >= every {
			s.writeAsync(func(fr *http2.Framer) error { return fr.WritePing(false, [8]byte{'v', 'm', 'e', 's', 'h'}) })
		}
	}
}
