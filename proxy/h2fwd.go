package proxy

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/vmesh/vmesh/internal/mux"
	"github.com/vmesh/vmesh/internal/rawsock"
)

// HTTP/2 forwarded frame by frame. An app's HTTP/2 connection (h2c with
// prior knowledge: gRPC) is served by an h2Conn in the server role: its one
// goroutine reads frames; each request stream becomes a mux stream of its
// own to the peer proxy (balanced per request), carrying the request's
// header block, body and trailers as messages (h2msg.go), and the
// response's back. The peer proxy authorizes each request and opens a
// stream for it on a pooled HTTP/2 connection to the local service (an
// h2Conn in the client role), frame by frame again. Nothing crosses
// net/http: no goroutine per frame write, no handler goroutine per
// request on the app's side, and a request's frames leave in one write.
//
// Per stream the bytes flow two ways:
//   - from the HTTP/2 connection to the mux stream (up): the connection's
//     read loop writes a message straight into the mux stream while its
//     window has room (TryWrite), else queues it for a goroutine that
//     lives only while the queue is not empty. The HTTP/2 peer gets
//     stream credit back once its bytes are in the mux stream, so what is
//     queued is bounded by the stream window advertised (h2fStreamWindow).
//   - from the mux stream to the HTTP/2 connection (toH2): one goroutine
//     per stream reads messages and writes frames, waiting for the HTTP/2
//     peer's windows.
// Frames ready together leave in one write: a writer flushes only when no
// other writer waits and it has no whole message left to write.

const (
	h2fStreamWindow  = 256 << 10
	h2fConnWindow    = 16 << 20 // credited as DATA arrives: streams buffer, not the connection
	h2fMaxStreams    = 250
	h2fMaxHeaderList = 64 << 10
	h2fLocalIdle     = 30 * time.Second
	h2fCreditBatch   = 32 << 10
	// h2fMaxFrame is the largest frame read: SETTINGS_MAX_FRAME_SIZE's
	// default, never raised (larger is a FRAME_SIZE_ERROR).
	h2fMaxFrame = 16 << 10
	// h2fMaxQueuedCtl bounds the control frames waiting, each in a
	// goroutine, for a writer blocked on the socket (ctl): a peer that
	// floods PINGs, SETTINGS or resets while it reads nothing ends its
	// connection with ENHANCE_YOUR_CALM (x/net's server allows 10,000).
	h2fMaxQueuedCtl = 1000
	// h2fUpRoom is the room a stream's first queued message leaves for
	// what follows it in the same read (a unary body, a response's body
	// and trailers): one allocation, not one per message.
	h2fUpRoom = 512
)

// h2Conn is one HTTP/2 connection the proxy terminates: an app's (server
// role) or one to a local service (client role).
type h2Conn struct {
	p      *Proxy
	nc     net.Conn
	server bool
	fr     *http2.Framer
	rd     *bufio.Reader
	hd     *h2Headers // the read loop's header blocks

	wmu     sync.Mutex // the write side: fr's writes, bw, cw, henc
	waiting atomic.Int32
	werr    error
	bw      *bufio.Writer
	cw      connWriter // what bw writes to
	henc    *hpack.Encoder
	hbuf    bytes.Buffer
	// A control frame waits in bw for a write to take it (ctl).
	flushArmed bool
	flushTimer *time.Timer
	ctlQueued  atomic.Int32 // control frames waiting for wmu in goroutines (ctl)
	// Responses written by a mux read loop wait in bw for its flush
	// (flushAfterReads, bound once in afterReadsFn: no allocation a call).
	afterReads   bool
	afterReadsFn func()

	mu          sync.Mutex
	sendCond    sync.Cond // connSend or a stream's sendWin grew, or the connection ended
	connSend    int64
	initSend    int64
	maxFrame    uint32
	peerStreams uint32 // the peer's SETTINGS_MAX_CONCURRENT_STREAMS
	streams     map[uint32]*h2Stream
	nextID      uint32 // client role
	lastPeer    uint32 // server role: the highest stream the app opened
	goaway      bool   // no new streams: the peer said so (client role), or we did (server role)
	closed      bool
	idleAt      time.Time

	// The read loop's own.
	connRecv    int64 // what the peer may still send on the connection
	connUnacked uint32
	scratch     []byte
	pending     []*h2Stream // streams with messages held until the buffered frames are read
	opens       []*h2Stream // server role: requests to open once the buffered frames are read

	route route   // server role: the app connection's route
	pool  *h2Pool // client role: the pool it belongs to
}

// h2Stream is one stream of an h2Conn, bridged to a mux stream.
type h2Stream struct {
	c  *h2Conn
	id uint32
	ex *h2Exchange

	// Guarded by c.mu.
	sendWin     int64
	recvWin     int64 // what the peer may still send on the stream
	recvUnacked uint32
	sentEnd     bool // END_STREAM (or a local answer) written to the HTTP/2 peer
	recvEnd     bool // END_STREAM read from the HTTP/2 peer
	reset       bool // over: reset either way
	removed     bool
	respStarted bool // server role: response HEADERS written to the app
	answered    bool // the proxy answered the request itself
	finalSeen   bool // a final (non-1xx) response head passed

	// The up direction, guarded by mu.
	mu       sync.Mutex
	ms       *mux.Stream
	upBuf    []byte
	upEnd    bool
	upCredit int
	upBusy   bool // a writer (TryWrite in the read loop, or upPump) owns ms's write side
	upClosed bool // the END went into ms, or the stream was reset

	queued bool // the read loop's: in c.pending
}

func newH2Conn(p *Proxy, nc net.Conn, server bool, rd io.Reader) *h2Conn {
	c := &h2Conn{
		p: p, nc: nc, server: server,
		connSend: 65535, initSend: 65535, maxFrame: 16384, peerStreams: 100,
		streams: make(map[uint32]*h2Stream), nextID: 1,
		connRecv: h2fConnWindow,
	}
	c.sendCond.L = &c.mu
	c.afterReadsFn = c.flushAfterReads
	c.cw.c, c.cw.nc = c, nc
	if sc, ok := nc.(syscall.Conn); ok {
		c.cw.rc, _ = sc.SyscallConn()
	}
	c.bw = bufio.NewWriterSize(&c.cw, 16<<10)
	c.rd = bufio.NewReaderSize(rd, h2fMaxFrame) // readFrame peeks at whole frames
	c.fr = http2.NewFramer(c.bw, c.rd)
	c.fr.SetMaxReadFrameSize(h2fMaxFrame)
	c.fr.MaxHeaderListSize = h2fMaxHeaderList
	c.hd = newH2Headers(h2fMaxHeaderList)
	c.fr.SetReuseFrames()
	c.henc = hpack.NewEncoder(&c.hbuf)
	return c
}

// start writes this side's preface: the client's magic, SETTINGS and the
// connection window.
func (c *h2Conn) start() error {
	return c.write(func(fr *http2.Framer) error {
		if !c.server {
			if _, err := c.bw.WriteString(http2.ClientPreface); err != nil {
				return err
			}
		}
		s := []http2.Setting{
			{ID: http2.SettingInitialWindowSize, Val: h2fStreamWindow},
			{ID: http2.SettingMaxHeaderListSize, Val: h2fMaxHeaderList},
		}
		if c.server {
			s = append(s, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: h2fMaxStreams})
		} else {
			s = append(s, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
		}
		if err := fr.WriteSettings(s...); err != nil {
			return err
		}
		return fr.WriteWindowUpdate(0, h2fConnWindow-65535)
	}, true)
}

// write runs f on the framer under the write lock and flushes when flush
// is set and no other writer waits (that one flushes).
func (c *h2Conn) write(f func(*http2.Framer) error, flush bool) error {
	c.waiting.Add(1)
	c.wmu.Lock()
	err := c.writeLocked(f, flush)
	c.wmu.Unlock()
	return err
}

func (c *h2Conn) writeLocked(f func(*http2.Framer) error, flush bool) error {
	last := c.waiting.Add(-1) == 0
	if c.werr != nil {
		return c.werr
	}
	err := f(c.fr)
	if err == nil && flush && last {
		err = c.flushLocked()
	}
	if err != nil {
		c.werr = err
		c.nc.Close() // the read loop ends the streams
	}
	return err
}

// flushLocked writes what is buffered, waiting for the socket unless the
// writer is in nowait mode; under wmu. A control frame's flush timer has
// nothing left to do: it is stopped (a timer that fires wakes the process
// for nothing).
func (c *h2Conn) flushLocked() error {
	if c.flushArmed {
		c.flushArmed = false
		c.flushTimer.Stop()
	}
	if err := c.bw.Flush(); err != nil || c.cw.nowait {
		return err
	}
	return c.cw.writeRest()
}

// connWriter is what an h2Conn's buffered writer writes to: the connection,
// waiting for room; or, while nowait is set (a writer that must not wait
// for this socket: the mux read loop), what the socket takes at once, the
// rest kept in order and written by a goroutine. Under wmu.
type connWriter struct {
	c      *h2Conn
	nc     net.Conn
	rc     syscall.RawConn // nil: no socket beneath, nowait is never set
	nowait bool
	rest   []byte // bytes the socket did not take in nowait, first out
	now    rawsock.NowWriter
}

func (w *connWriter) Write(p []byte) (int, error) {
	if w.nowait {
		n := len(p)
		if len(w.rest) == 0 {
			p = p[w.now.WriteOne(w.rc, p):]
			if len(p) == 0 {
				return n, nil
			}
			go w.c.flushRest()
		}
		w.rest = append(w.rest, p...)
		return n, nil
	}
	if err := w.writeRest(); err != nil {
		return 0, err
	}
	return w.nc.Write(p)
}

// writeRest writes what a nowait write left, waiting for room.
func (w *connWriter) writeRest() error {
	if len(w.rest) == 0 {
		return nil
	}
	_, err := w.nc.Write(w.rest)
	w.rest = nil
	return err
}

// flushAfterReads flushes, from a mux session's read loop once it handled
// what it read, the responses it wrote (respondInline): without waiting
// for the socket, nor for the write lock (a goroutine flushes when a
// writer holds it).
func (c *h2Conn) flushAfterReads() {
	if !c.wmu.TryLock() {
		go func() {
			c.wmu.Lock()
			c.flushAfterReadsLocked()
			c.wmu.Unlock()
		}()
		return
	}
	c.cw.nowait = true
	c.flushAfterReadsLocked()
	c.cw.nowait = false
	c.wmu.Unlock()
}

func (c *h2Conn) flushAfterReadsLocked() {
	c.afterReads = false
	if c.werr != nil || c.waiting.Load() > 0 {
		return // a writer waiting flushes
	}
	if err := c.flushLocked(); err != nil {
		c.werr = err
		c.nc.Close()
	}
}

// flushRest writes what a nowait flush left (a goroutine's).
func (c *h2Conn) flushRest() {
	c.wmu.Lock()
	if c.werr == nil {
		if err := c.flushLocked(); err != nil {
			c.werr = err
			c.nc.Close()
		}
	}
	c.wmu.Unlock()
}

// cork holds back the connection's flushes until uncork (writes that go
// out together).
func (c *h2Conn) cork() { c.waiting.Add(1) }

// uncork ends a cork and flushes what was held.
func (c *h2Conn) uncork() {
	if c.waiting.Add(-1) != 0 {
		return // a writer still to come flushes
	}
	c.write(func(*http2.Framer) error { return nil }, true)
}

// h2Ctl is a control frame the read loop answers with: a SETTINGS or PING
// ack, a WINDOW_UPDATE (val: the increment), an RST_STREAM (val: the
// code). A value, not a closure: the read loop writes one for nearly every
// call (a gRPC client pings after every DATA it sends), and a closure
// handed on escapes.
type h2Ctl struct {
	typ  http2.FrameType
	id   uint32
	val  uint32
	data [8]byte
}

func (f h2Ctl) write(fr *http2.Framer) error {
	switch f.typ {
	case http2.FrameSettings:
		return fr.WriteSettingsAck()
	case http2.FramePing:
		return fr.WritePing(true, f.data)
	case http2.FrameWindowUpdate:
		return fr.WriteWindowUpdate(f.id, f.val)
	case http2.FrameRSTStream:
		return fr.WriteRSTStream(f.id, http2.ErrCode(f.val))
	}
	return nil
}

// ctl writes a control frame from the read loop without flushing it: the
// next write takes it along (a gRPC client pings after every DATA it
// sends, and the response follows), or ctlDelay later a timer flushes it.
// The read loop never waits behind a writer that waits for the socket:
// then a goroutine writes it, and past h2fMaxQueuedCtl such goroutines the
// connection is closed and errH2CtlFlood returned (a peer that sends
// control frames and reads none of the answers would otherwise hold a
// goroutine per frame).
func (c *h2Conn) ctl(f h2Ctl) error {
	c.waiting.Add(1)
	if c.wmu.TryLock() {
		if c.writeLocked(f.write, false) == nil && !c.flushArmed {
			c.flushArmed = true
			if c.flushTimer == nil {
				c.flushTimer = time.AfterFunc(ctlDelay, c.flushLater)
			} else {
				c.flushTimer.Reset(ctlDelay)
			}
		}
		c.wmu.Unlock()
		return nil
	}
	c.waiting.Add(-1)
	if c.ctlQueued.Add(1) > h2fMaxQueuedCtl {
		c.ctlQueued.Add(-1)
		if c.nc.Close() == nil { // the blocked writer fails, the read loop ends
			c.p.log.Warn("closed an HTTP/2 connection whose peer sends control frames (PING, SETTINGS, RST_STREAM) and reads none of the answers", "peer", c.nc.RemoteAddr(), "queued", h2fMaxQueuedCtl)
		}
		return errH2CtlFlood
	}
	go func() {
		c.write(f.write, true)
		c.ctlQueued.Add(-1)
	}()
	return nil
}

// errH2CtlFlood ends a connection whose peer queued more than
// h2fMaxQueuedCtl control frames it does not read the answers to.
var errH2CtlFlood = fmt.Errorf("http2: more than %d control frames queued unread: %w", h2fMaxQueuedCtl, http2.ConnectionError(http2.ErrCodeEnhanceYourCalm))

// ctlDelay bounds how long a control frame waits for a write to take it.
const ctlDelay = time.Millisecond

func (c *h2Conn) flushLater() {
	c.wmu.Lock()
	c.flushArmed = false
	c.wmu.Unlock()
	c.flushNow()
}

// flushNow flushes what is written, corked or not.
func (c *h2Conn) flushNow() {
	c.wmu.Lock()
	if c.werr == nil && (c.bw.Buffered() > 0 || len(c.cw.rest) > 0) {
		if err := c.flushLocked(); err != nil {
			c.werr = err
			c.nc.Close()
		}
	}
	c.wmu.Unlock()
}

// serve reads frames until the connection ends, then ends its streams.
func (c *h2Conn) serve() error {
	err := c.readLoop()
	c.mu.Lock()
	c.closed = true
	streams := make([]*h2Stream, 0, len(c.streams))
	for _, s := range c.streams {
		streams = append(streams, s)
	}
	c.sendCond.Broadcast()
	c.mu.Unlock()
	for _, s := range streams {
		s.abort(mux.CodeCancel, false)
	}
	c.nc.Close()
	c.wmu.Lock()
	if c.flushTimer != nil {
		c.flushTimer.Stop()
	}
	c.wmu.Unlock()
	if c.pool != nil {
		c.pool.remove(c)
	}
	return err
}

func (c *h2Conn) readLoop() error {
	if c.server {
		var pre [len(http2.ClientPreface)]byte
		if _, err := io.ReadFull(c.rd, pre[:]); err != nil {
			return err
		}
		if string(pre[:]) != http2.ClientPreface {
			return errors.New("http2: bad client preface")
		}
	}
	for {
		// A stream error ends its stream only; the loop goes on to the
		// flush below all the same (the requests read with it must not
		// wait for more bytes).
		readFailed, err := c.readFrame()
		if err != nil {
			se, ok := streamErrorOf(err)
			if !ok {
				if readFailed {
					return err // nothing to tell a connection that cannot be read
				}
				code := http2.ErrCodeProtocol
				var ce http2.ConnectionError
				if errors.As(err, &ce) {
					code = http2.ErrCode(ce)
				} else if errors.Is(err, http2.ErrFrameTooLarge) {
					code = http2.ErrCodeFrameSize
				}
				c.goAway(code)
				return err
			}
			if err := c.streamError(se.StreamID, se.Code); err != nil {
				return err
			}
		}
		if c.rd.Buffered() == 0 && (len(c.pending) > 0 || len(c.opens) > 0) {
			c.flushPending()
		}
		if c.server && c.p.drain.Load() {
			c.drain()
		}
	}
}

// streamErrorOf reports whether err ends one stream only. The framer and
// h2Headers return the value itself; errors.As, which would cost the read
// loop an allocation a frame, is for wrapped ones.
func streamErrorOf(err error) (http2.StreamError, bool) {
	if se, ok := err.(http2.StreamError); ok {
		return se, true
	}
	var se http2.StreamError
	ok := errors.As(err, &se)
	return se, ok
}

// readFrame reads the next frame and handles it. The frames every call
// brings besides DATA — HEADERS, CONTINUATION, PING, WINDOW_UPDATE,
// RST_STREAM — are parsed here, in the read buffer (frameLean), with the
// Framer's checks: its parsers allocate an object for each. The Framer
// reads their headers (its size limit and frame order checks: a header
// block's CONTINUATIONs follow it on its stream, nothing else between)
// and the other frames (DATA's object is reused). readFailed: the
// connection could not be read.
func (c *h2Conn) readFrame() (readFailed bool, err error) {
	fh, err := c.fr.ReadFrameHeader()
	if err != nil {
		var ce http2.ConnectionError
		return !errors.As(err, &ce) && !errors.Is(err, http2.ErrFrameTooLarge), err
	}
	switch fh.Type {
	case http2.FrameHeaders, http2.FrameContinuation, http2.FramePing, http2.FrameWindowUpdate, http2.FrameRSTStream:
		// A frame is at most h2fMaxFrame, the read buffer's size.
		p, err := c.rd.Peek(int(fh.Length))
		if err != nil {
			return true, err
		}
		c.rd.Discard(len(p))
		return false, c.frameLean(fh, p)
	}
	f, err := c.fr.ReadFrameForHeader(fh)
	if err != nil {
		if _, ok := streamErrorOf(err); ok {
			return false, err
		}
		var ce http2.ConnectionError
		return !errors.As(err, &ce), err
	}
	return false, c.handle(f)
}

// frameLean handles a frame readFrame parsed itself; p is its payload,
// valid until the next read.
func (c *h2Conn) frameLean(fh http2.FrameHeader, p []byte) error {
	id := fh.StreamID
	switch fh.Type {
	case http2.FrameHeaders:
		if id == 0 {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		pad := 0
		if fh.Flags.Has(http2.FlagHeadersPadded) {
			if len(p) < 1 {
				return http2.ConnectionError(http2.ErrCodeFrameSize)
			}
			pad, p = int(p[0]), p[1:]
		}
		if fh.Flags.Has(http2.FlagHeadersPriority) {
			if len(p) < 5 {
				return http2.ConnectionError(http2.ErrCodeFrameSize)
			}
			p = p[5:] // the dependency and weight: priorities are not used
		}
		if pad > len(p) {
			// RFC 9113 6.2: a connection error (the Framer makes it a
			// stream error, leaving HPACK out of step with the peer).
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if err := c.hd.begin(id, fh.Flags.Has(http2.FlagHeadersEndStream), p[:len(p)-pad]); err != nil ||
			!fh.Flags.Has(http2.FlagHeadersEndHeaders) {
			return err
		}
		return c.headers()
	case http2.FrameContinuation:
		if err := c.hd.fragment(p); err != nil || !fh.Flags.Has(http2.FlagContinuationEndHeaders) {
			return err
		}
		return c.headers()
	case http2.FramePing:
		if len(p) != 8 {
			return http2.ConnectionError(http2.ErrCodeFrameSize)
		}
		if id != 0 {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if !fh.Flags.Has(http2.FlagPingAck) {
			f := h2Ctl{typ: http2.FramePing}
			copy(f.data[:], p)
			return c.ctl(f)
		}
	case http2.FrameWindowUpdate:
		if len(p) != 4 {
			return http2.ConnectionError(http2.ErrCodeFrameSize)
		}
		inc := binary.BigEndian.Uint32(p) & 0x7fffffff
		if inc == 0 {
			if id == 0 {
				return http2.ConnectionError(http2.ErrCodeProtocol)
			}
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
		}
		return c.windowUpdate(id, inc)
	case http2.FrameRSTStream:
		if len(p) != 4 {
			return http2.ConnectionError(http2.ErrCodeFrameSize)
		}
		if id == 0 {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		c.rstStream(id, http2.ErrCode(binary.BigEndian.Uint32(p)))
	}
	return nil
}

// h2fMaxWindow is the largest flow-control window (RFC 9113 6.9.1).
const h2fMaxWindow = 1<<31 - 1

// windowUpdate takes a WINDOW_UPDATE: credit to send on the connection
// (id 0) or a stream. A window past 2^31-1 is a flow-control error.
func (c *h2Conn) windowUpdate(id, inc uint32) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if id == 0 {
		c.connSend += int64(inc)
		if c.connSend > h2fMaxWindow {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
	} else if s := c.streams[id]; s != nil {
		s.sendWin += int64(inc)
		if s.sendWin > h2fMaxWindow {
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeFlowControl}
		}
	}
	c.sendCond.Broadcast()
	return nil
}

// rstStream takes the peer's RST_STREAM.
func (c *h2Conn) rstStream(id uint32, code http2.ErrCode) {
	s := c.stream(id)
	if s == nil {
		return
	}
	c.mu.Lock()
	// The peer sent all it will and wants no more: a server that
	// answered before reading the whole request (NO_ERROR, RFC 9113
	// 8.1), or whose stream closed with its response and so refuses
	// the rest of the request (Go's server: STREAM_CLOSED), or any
	// code from a service after its whole response — which, whole,
	// still goes through. From an app (server role) only NO_ERROR: an
	// app that resets a request it has sent cancels it.
	done := s.recvEnd && (code == http2.ErrCodeNo || !c.server)
	if done {
		s.sentEnd = true
		c.sendCond.Broadcast()
	}
	c.mu.Unlock()
	if done {
		s.maybeDone()
		return
	}
	s.abort(uint32(code), true)
}

// handle handles a frame the Framer parsed.
func (c *h2Conn) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.DataFrame:
		return c.data(f)
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		if err := c.settings(f); err != nil {
			return err
		}
		return c.ctl(h2Ctl{typ: http2.FrameSettings})
	case *http2.GoAwayFrame:
		c.mu.Lock()
		c.goaway = true
		var gone []*h2Stream
		if !c.server {
			for sid, s := range c.streams {
				if sid > f.LastStreamID {
					gone = append(gone, s)
				}
			}
		}
		c.mu.Unlock()
		for _, s := range gone {
			s.abort(uint32(http2.ErrCodeRefusedStream), true)
		}
	case *http2.PushPromiseFrame:
		return errors.New("http2: push promise, push is disabled")
	}
	return nil
}

func (c *h2Conn) settings(f *http2.SettingsFrame) error {
	return f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			c.mu.Lock()
			delta := int64(s.Val) - c.initSend
			c.initSend = int64(s.Val)
			for _, st := range c.streams {
				st.sendWin += delta
			}
			c.sendCond.Broadcast()
			c.mu.Unlock()
		case http2.SettingMaxFrameSize:
			c.mu.Lock()
			c.maxFrame = s.Val
			c.mu.Unlock()
		case http2.SettingMaxConcurrentStreams:
			c.mu.Lock()
			c.peerStreams = s.Val
			c.mu.Unlock()
		case http2.SettingHeaderTableSize:
			c.wmu.Lock()
			c.henc.SetMaxDynamicTableSizeLimit(s.Val)
			c.wmu.Unlock()
		}
		return nil
	})
}

func (c *h2Conn) stream(id uint32) *h2Stream {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.streams[id]
}

// streamError resets one stream the peer got wrong (an error: the peer
// floods, see ctl).
func (c *h2Conn) streamError(id uint32, code http2.ErrCode) error {
	if s := c.stream(id); s != nil {
		s.abort(uint32(code), false)
		return nil
	}
	return c.ctl(h2Ctl{typ: http2.FrameRSTStream, id: id, val: uint32(code)})
}

// goAway tells the peer the connection ends, with code.
func (c *h2Conn) goAway(code http2.ErrCode) {
	c.mu.Lock()
	last := c.lastPeer
	c.mu.Unlock()
	c.write(func(fr *http2.Framer) error { return fr.WriteGoAway(last, code, nil) }, true)
}

// drain (server role, Shutdown) tells the app to open no more streams and
// closes the connection once its streams are done.
func (c *h2Conn) drain() {
	c.mu.Lock()
	first := !c.goaway
	c.goaway = true
	idle := len(c.streams) == 0
	c.mu.Unlock()
	if first {
		c.goAway(http2.ErrCodeNo)
	}
	if idle {
		c.nc.Close()
	}
}

// data takes a DATA frame: connection credit at once (streams bound what
// is buffered), the bytes to the stream's mux stream.
func (c *h2Conn) data(f *http2.DataFrame) error {
	n := int64(f.Length)
	c.connRecv -= n
	if c.connRecv < 0 {
		return errors.New("http2: connection flow control window exceeded")
	}
	c.connUnacked += uint32(n)
	if c.connUnacked >= h2fConnWindow/2 {
		inc := c.connUnacked
		c.connUnacked = 0
		c.connRecv += int64(inc)
		if err := c.ctl(h2Ctl{typ: http2.FrameWindowUpdate, val: inc}); err != nil {
			return err
		}
	}
	s := c.stream(f.StreamID)
	if s == nil {
		if c.server && f.StreamID > c.lastPeer {
			return errors.New("http2: DATA on an idle stream")
		}
		return nil // a stream that ended here
	}
	c.mu.Lock()
	if s.recvEnd {
		c.mu.Unlock()
		return c.streamError(f.StreamID, http2.ErrCodeStreamClosed)
	}
	s.recvWin -= n
	if s.recvWin < 0 {
		c.mu.Unlock()
		s.abort(uint32(http2.ErrCodeFlowControl), false)
		return nil
	}
	end := f.StreamEnded()
	s.recvEnd = end
	c.mu.Unlock()
	data := f.Data()
	s.ex.bytes(!c.server, len(data))
	// Padding is credited at once; the data once it is in the mux stream.
	if pad := int(n) - len(data); pad > 0 {
		s.credit(pad)
	}
	if len(data) == 0 && !end {
		return nil
	}
	b := appendMsgHead(c.scratch[:0], msgData|endFlag(end), len(data))
	b = append(b, data...)
	c.scratch = b
	s.up(b, len(data), end)
	return nil
}

func endFlag(end bool) byte {
	if end {
		return msgEnd
	}
	return 0
}

// headers takes a header block read whole (c.hd).
func (c *h2Conn) headers() error {
	if err := c.hd.finish(); err != nil {
		return err
	}
	s := c.stream(c.hd.stream)
	if s == nil {
		if !c.server {
			return nil // a stream we reset
		}
		return c.newRequest(c.hd)
	}
	return s.headersFromH2(c.hd)
}

// newRequest (server role) takes the app's HEADERS opening a stream.
func (c *h2Conn) newRequest(f *h2Headers) error {
	id := f.stream
	if id%2 != 1 || id <= c.lastPeer {
		return errors.New("http2: bad stream ID " + strconv.FormatUint(uint64(id), 10))
	}
	c.mu.Lock()
	c.lastPeer = id
	refused := c.goaway || len(c.streams) >= h2fMaxStreams
	c.mu.Unlock()
	if refused {
		return c.ctl(h2Ctl{typ: http2.FrameRSTStream, id: id, val: uint32(http2.ErrCodeRefusedStream)})
	}
	if f.truncated {
		return c.ctl(h2Ctl{typ: http2.FrameRSTStream, id: id, val: uint32(http2.ErrCodeRefusedStream)})
	}
	ex, fields, ok := newExchange(f.fields)
	s := c.addStream(id, ex)
	end := f.end
	c.mu.Lock()
	s.recvEnd = end
	c.mu.Unlock()
	if !ok {
		s.abort(uint32(http2.ErrCodeProtocol), false)
		return nil
	}
	if ex.method == "CONNECT" {
		s.answer(405, "connect")
		return nil
	}
	size := msgHead
	for _, f := range fields {
		size += len(f.Name) + len(f.Value) + 2*binary.MaxVarintLen16
	}
	b := appendMsgHead(make([]byte, 0, size+h2fUpRoom), msgHeaders|endFlag(end), 0)
	b = appendFields(b, fields)
	setMsgLen(b)
	s.upBuf = b
	s.upEnd = end
	s.upBusy = true // the opener writes the request head with the stream's open
	// Opened once the frames read with it are handled: its body (and
	// other requests) go with it.
	c.opens = append(c.opens, s)
	return nil
}

// setMsgLen fills in the length of the one message in b.
func setMsgLen(b []byte) {
	n := len(b) - msgHead
	b[1], b[2], b[3] = byte(n>>16), byte(n>>8), byte(n)
}

func (c *h2Conn) addStream(id uint32, ex *h2Exchange) *h2Stream {
	s := &h2Stream{c: c, id: id, ex: ex, recvWin: h2fStreamWindow}
	c.mu.Lock()
	s.sendWin = c.initSend
	c.streams[id] = s
	c.idleAt = time.Time{}
	c.mu.Unlock()
	return s
}

// headersFromH2 takes a HEADERS frame on an open stream: trailers from the
// app (server role); a response head or trailers from the service.
func (s *h2Stream) headersFromH2(f *h2Headers) error {
	c := s.c
	end := f.end
	c.mu.Lock()
	if s.recvEnd {
		c.mu.Unlock()
		return c.streamError(f.stream, http2.ErrCodeStreamClosed)
	}
	kind := byte(msgTrailers)
	if !c.server && !s.finalSeen {
		kind = msgHeaders
	}
	if c.server && !end {
		c.mu.Unlock()
		s.abort(uint32(http2.ErrCodeProtocol), false) // trailers must end the stream
		return nil
	}
	s.recvEnd = end
	c.mu.Unlock()
	if f.truncated {
		s.abort(uint32(http2.ErrCodeInternal), false)
		return nil
	}
	if !c.server {
		if kind == msgHeaders {
			status, _ := strconv.Atoi(pseudo(f.fields, ":status"))
			if status >= 200 {
				c.mu.Lock()
				s.finalSeen = true
				c.mu.Unlock()
				s.ex.head(c.p, status, f.fields)
			}
		} else {
			s.ex.trailers(f.fields)
		}
	}
	b := appendMsgHead(c.scratch[:0], kind|endFlag(end), 0)
	b = appendFields(b, f.fields)
	setMsgLen(b)
	c.scratch = b
	s.up(b, 0, end)
	return nil
}

// up hands a message from the HTTP/2 peer to the mux stream (read loop
// only). While more frames are already buffered the message waits, so a
// response's head, body and trailers leave in one mux frame; then kick
// writes it at once if the window has room, else upPump does. credit is
// the DATA bytes in it, credited back to the peer once they are in the mux
// stream.
func (s *h2Stream) up(msg []byte, credit int, end bool) {
	s.mu.Lock()
	if s.upClosed {
		s.mu.Unlock()
		return
	}
	if s.upBuf == nil {
		s.upBuf = make([]byte, 0, len(msg)+h2fUpRoom)
	}
	s.upBuf = append(s.upBuf, msg...)
	s.upCredit += credit
	s.upEnd = s.upEnd || end
	s.mu.Unlock()
	c := s.c
	if c.rd.Buffered() > 0 {
		if !s.queued {
			s.queued = true
			c.pending = append(c.pending, s)
		}
		return
	}
	s.kick()
}

// flushPending opens the requests read (server role) and writes the
// messages held while frames were buffered (read loop only), with the mux
// sessions' flushes held until all are written: one system call for
// them.
func (c *h2Conn) flushPending() {
	var arr [4]*mux.Session
	corked := arr[:0]
	cork := func(ms *mux.Session) {
		for _, x := range corked {
			if x == ms {
				return
			}
		}
		ms.Cork()
		corked = append(corked, ms)
	}
	for i, s := range c.opens {
		s.open(cork)
		c.opens[i] = nil
	}
	c.opens = c.opens[:0]
	for i, s := range c.pending {
		s.queued = false
		s.mu.Lock()
		ms := s.ms
		s.mu.Unlock()
		if ms != nil {
			cork(ms.Session())
		}
		s.kick()
		c.pending[i] = nil
	}
	c.pending = c.pending[:0]
	for _, ms := range corked {
		ms.Uncork()
	}
}

// kick writes the queued messages into the mux stream without waiting
// (read loop only: nobody else appends meanwhile), or starts upPump when
// the window is short.
func (s *h2Stream) kick() {
	s.mu.Lock()
	if s.upClosed || s.ms == nil || s.upBusy || (len(s.upBuf) == 0 && !s.upEnd) {
		s.mu.Unlock()
		return
	}
	s.upBusy = true
	buf, end, credit, ms := s.upBuf, s.upEnd, s.upCredit, s.ms
	s.mu.Unlock()
	ok, err := ms.TryWrite(buf, end)
	s.mu.Lock()
	switch {
	case err != nil:
		s.upClosed, s.upBusy = true, false
		s.mu.Unlock()
		s.abort(mux.CodeCancel, false)
		return
	case !ok:
		s.mu.Unlock()
		go s.upPump()
		return
	}
	s.upBuf, s.upCredit, s.upEnd = s.upBuf[:0], 0, false
	s.upBusy, s.upClosed = false, end
	s.mu.Unlock()
	s.credit(credit)
	if end {
		s.maybeDone()
	}
}

// upPump writes the queued messages into the mux stream, waiting for its
// window, and ends when the queue is empty.
func (s *h2Stream) upPump() {
	var spare []byte
	for {
		s.mu.Lock()
		if s.upClosed || (len(s.upBuf) == 0 && !s.upEnd) {
			s.upBusy = false
			s.mu.Unlock()
			return
		}
		buf, end, credit := s.upBuf, s.upEnd, s.upCredit
		s.upBuf, s.upCredit, s.upEnd = spare[:0], 0, false
		s.upClosed = end
		ms := s.ms
		s.mu.Unlock()
		var err error
		if end {
			err = ms.WriteClose(buf) // the END message and the FIN in one frame
		} else {
			_, err = ms.Write(buf)
		}
		if err != nil {
			s.mu.Lock()
			s.upClosed, s.upBusy = true, false
			s.mu.Unlock()
			s.abort(mux.CodeCancel, false)
			return
		}
		s.credit(credit)
		spare = buf
		if end {
			s.mu.Lock()
			s.upBusy = false
			s.mu.Unlock()
			s.maybeDone()
			return
		}
	}
}

// credit gives the HTTP/2 peer back n bytes of stream window, in batches.
func (s *h2Stream) credit(n int) {
	if n <= 0 {
		return
	}
	c := s.c
	c.mu.Lock()
	if s.recvEnd || s.reset {
		c.mu.Unlock()
		return
	}
	s.recvUnacked += uint32(n)
	inc := uint32(0)
	if s.recvUnacked >= h2fCreditBatch {
		inc = s.recvUnacked
		s.recvUnacked = 0
		s.recvWin += int64(inc)
	}
	c.mu.Unlock()
	if inc > 0 {
		c.ctl(h2Ctl{typ: http2.FrameWindowUpdate, id: s.id, val: inc}) // a flood closes the connection
	}
}

// attach gives the stream its mux stream (the request head and whatever
// was queued already went with the open when sentEnd) and starts the
// queue's writer if more came meanwhile. false: the stream was reset
// meanwhile (ms is reset too).
func (s *h2Stream) attach(ms *mux.Stream, sentEnd bool) bool {
	c := s.c
	s.mu.Lock()
	s.ms = ms
	if sentEnd {
		s.upClosed = true
	}
	c.mu.Lock()
	reset := s.reset
	c.mu.Unlock()
	start := !reset && !s.upClosed && (len(s.upBuf) > 0 || s.upEnd)
	s.upBusy = start
	s.mu.Unlock()
	if reset {
		ms.Reset(mux.CodeCancel)
		return false
	}
	if start {
		go s.upPump()
	}
	if sentEnd {
		s.maybeDone()
	}
	return true
}

// toH2 reads the mux stream's messages and writes them as frames: the
// response (server role) or the request's body and trailers (client role).
// It reports whether it ended with the END message; otherwise the stream
// is over.
func (s *h2Stream) toH2(mr *msgReader) (ended bool) {
	c := s.c
	var fields []hpack.HeaderField
	for {
		kind, payload, err := mr.next()
		if err != nil {
			var re *mux.ResetError
			switch {
			case err == io.EOF:
				// The peer proxy ended without END (it should not): end
				// the stream as if it had.
				if !s.writeData(nil, true, true, false) {
					return false
				}
				s.ex.finish(c.p, true)
				s.maybeDone()
				return true
			case errors.As(err, &re):
				s.peerReset(re.Code)
			default:
				s.abort(mux.CodeCancel, false)
			}
			return false
		}
		end := kind&msgEnd != 0
		flush := end || !mr.ready()
		switch kind &^ msgEnd {
		case msgHeaders, msgTrailers:
			if fields, err = parseFields(payload, fields); err != nil {
				s.abort(uint32(http2.ErrCodeProtocol), false)
				return false
			}
			trailers := kind&^msgEnd == msgTrailers
			if c.server {
				if trailers {
					s.ex.trailers(fields)
				} else if status, _ := strconv.Atoi(pseudo(fields, ":status")); status >= 200 {
					s.ex.head(c.p, status, fields)
				}
			}
			if !s.writeHeaders(fields, end, flush, false) {
				return false
			}
		case msgData:
			s.ex.bytes(c.server, len(payload))
			if !s.writeData(payload, end, flush, false) {
				return false
			}
		}
		if end {
			if c.server {
				s.ex.finish(c.p, true)
			}
			s.maybeDone()
			return true
		}
	}
}

// toH2Now writes a response's messages (server role) as toH2 does, from a
// loop that must not wait (the mux read loop): under wmu, the connection writer in
// nowait mode, the messages already read into mr. It stops before a
// message that is not all buffered or whose body the app's windows do
// not take now: more reports that toH2 goes on from there. abort is a
// code to reset the stream with (a malformed message) once wmu is
// released; err a write error.
func (s *h2Stream) toH2Now(mr *msgReader) (ended, more bool, abort uint32, err error) {
	c := s.c
	var fields []hpack.HeaderField
	for mr.ready() {
		kind, n := mr.peekHead()
		end := kind&msgEnd != 0
		if kind&^msgEnd == msgData {
			if n > msgMaxData {
				return false, false, mux.CodeCancel, nil // as toH2
			}
			c.mu.Lock()
			if s.reset || c.closed || s.sentEnd || s.answered {
				c.mu.Unlock()
				return false, false, 0, nil
			}
			if int64(n) > c.connSend || int64(n) > s.sendWin {
				c.mu.Unlock()
				return false, true, 0, nil
			}
			c.connSend -= int64(n)
			s.sendWin -= int64(n)
			s.sentEnd = end
			maxFrame := int(c.maxFrame)
			c.mu.Unlock()
			_, payload, _ := mr.next() // buffered: cannot fail
			s.ex.bytes(c.server, n)
			for {
				k := min(len(payload), maxFrame)
				last := k == len(payload)
				if err := c.fr.WriteData(s.id, last && end, payload[:k]); err != nil {
					return false, false, 0, err
				}
				if last {
					break
				}
				payload = payload[k:]
			}
		} else {
			_, payload, err := mr.next()
			if err != nil {
				return false, false, mux.CodeCancel, nil // as toH2
			}
			if fields, err = parseFields(payload, fields); err != nil {
				return false, false, uint32(http2.ErrCodeProtocol), nil
			}
			if kind&^msgEnd == msgTrailers {
				s.ex.trailers(fields)
			} else if status, _ := strconv.Atoi(pseudo(fields, ":status")); status >= 200 {
				s.ex.head(c.p, status, fields)
			}
			ok, err := s.headersLocked(fields, end, false)
			if !ok || err != nil {
				return false, false, 0, err
			}
		}
		if end {
			return true, false, 0, nil
		}
	}
	return false, true, 0, nil
}

// peerReset ends a stream the peer proxy reset: before the response began
// the app gets a 502 saying so; after, a reset.
func (s *h2Stream) peerReset(code uint32) {
	c := s.c
	if c.server {
		c.mu.Lock()
		started := s.respStarted || s.reset
		c.mu.Unlock()
		if !started {
			why := "proxying failed"
			switch code {
			case mux.CodeUnknownPort:
				s.answer(403, "unknown target port")
				return
			case mux.CodeDenied:
				s.answer(403, "unauthorized")
				return
			case uint32(http2.ErrCodeRefusedStream):
				// The service refused it before any work: the app may
				// retry it (gRPC does); pass the reset on.
			default:
				c.p.reportError(slog.LevelWarn, dirOutbound, errBadGateway, s.ex.service+" "+s.ex.serverID, "proxying request failed", "service", s.ex.service, "err", (&mux.ResetError{Code: code, Remote: true}).Error())
				s.answer(502, why)
				return
			}
		}
	}
	if code > uint32(http2.ErrCodeHTTP11Required) {
		code = uint32(http2.ErrCodeInternal)
	}
	s.abort(code, false)
}

// pseudo returns the value of a pseudo-header field.
func pseudo(fs []hpack.HeaderField, name string) string {
	for _, f := range fs {
		if f.Name == name {
			return f.Value
		}
		if len(f.Name) == 0 || f.Name[0] != ':' {
			break
		}
	}
	return ""
}

// writeHeaders HPACK-encodes fields onto the stream; false if the stream
// is over. local: the proxy's own answer, written only before any
// response; a stream answered so takes nothing else.
func (s *h2Stream) writeHeaders(fields []hpack.HeaderField, end, flush, local bool) bool {
	ok := true
	err := s.c.write(func(*http2.Framer) error {
		var err error
		ok, err = s.headersLocked(fields, end, local)
		return err
	}, flush)
	return ok && err == nil
}

// headersLocked is writeHeaders under wmu, without the flush.
func (s *h2Stream) headersLocked(fields []hpack.HeaderField, end, local bool) (bool, error) {
	c := s.c
	c.mu.Lock()
	ok := !s.reset && !s.sentEnd && !c.closed && !s.answered && (!local || !s.respStarted)
	if ok {
		s.respStarted = true
		s.answered = local
		s.sentEnd = end
	}
	maxFrame := int(c.maxFrame)
	c.mu.Unlock()
	if !ok {
		return false, nil
	}
	return true, c.writeBlockLocked(s.id, fields, end, maxFrame)
}

// writeBlockLocked encodes a header block and writes it as HEADERS and
// CONTINUATION frames; under wmu.
func (c *h2Conn) writeBlockLocked(id uint32, fields []hpack.HeaderField, end bool, maxFrame int) error {
	c.hbuf.Reset()
	for _, f := range fields {
		if err := c.henc.WriteField(f); err != nil {
			return err
		}
	}
	block := c.hbuf.Bytes()
	first := true
	for {
		n := min(len(block), maxFrame)
		last := n == len(block)
		var err error
		if first {
			err = c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block[:n], EndStream: end, EndHeaders: last})
		} else {
			err = c.fr.WriteContinuation(id, last, block[:n])
		}
		if err != nil || last {
			return err
		}
		block, first = block[n:], false
	}
}

// writeData writes b as DATA frames within the peer's windows, END_STREAM
// on the last when end; false if the stream is over.
func (s *h2Stream) writeData(b []byte, end, flush, local bool) bool {
	c := s.c
	for {
		c.mu.Lock()
		for len(b) > 0 && (c.connSend <= 0 || s.sendWin <= 0) && !s.reset && !c.closed {
			c.mu.Unlock()
			// Frames written without a flush (corked, or left for the
			// next write) wait for nobody: the window may be theirs.
			c.flushNow()
			c.mu.Lock()
			if len(b) > 0 && (c.connSend <= 0 || s.sendWin <= 0) && !s.reset && !c.closed {
				c.sendCond.Wait()
			}
		}
		if s.reset || c.closed || s.sentEnd || s.answered != local {
			c.mu.Unlock()
			return false
		}
		n := min(int64(len(b)), c.connSend, s.sendWin, int64(c.maxFrame))
		c.connSend -= n
		s.sendWin -= n
		last := int(n) == len(b)
		if last && end {
			s.sentEnd = true
		}
		c.mu.Unlock()
		chunk := b[:n]
		if err := c.write(func(fr *http2.Framer) error {
			return fr.WriteData(s.id, last && end, chunk)
		}, flush || !last); err != nil {
			return false
		}
		if last {
			return true
		}
		b = b[n:]
	}
}

// answer ends the stream with a response of the proxy's own (server role,
// before any response byte): code, l5d-proxy-error saying why, a short
// body. What the peer proxy sends for the stream afterwards is dropped.
func (s *h2Stream) answer(code int, why string) {
	c := s.c
	fields, body := proxyAnswer(code, why)
	s.ex.mu.Lock()
	s.ex.status = code
	s.ex.mu.Unlock()
	if s.writeHeaders(fields, false, false, true) {
		s.writeData([]byte(body), true, true, true)
	}
	s.ex.finish(c.p, false)
	s.mu.Lock()
	s.upClosed = true
	ms := s.ms
	s.mu.Unlock()
	if ms != nil {
		ms.Reset(mux.CodeCancel)
	}
	c.mu.Lock()
	recvEnd := s.recvEnd
	c.mu.Unlock()
	if !recvEnd {
		// The app may still be sending the body: it goes nowhere.
		s.abort(uint32(http2.ErrCodeNo), false)
		return
	}
	s.remove()
}

// proxyAnswer is the head and body of a response of the proxy's own: code,
// l5d-proxy-error saying why, a short text.
func proxyAnswer(code int, why string) ([]hpack.HeaderField, string) {
	body := "vmesh: " + why + "\n"
	return []hpack.HeaderField{
		{Name: ":status", Value: strconv.Itoa(code)},
		{Name: "content-type", Value: "text/plain; charset=utf-8"},
		{Name: "l5d-proxy-error", Value: why},
		{Name: "content-length", Value: strconv.Itoa(len(body))},
	}, body
}

// abort resets the stream both ways with code (HTTP/2 and mux codes agree
// below 0x100); remote says the HTTP/2 peer reset it (nothing to send).
func (s *h2Stream) abort(code uint32, remote bool) {
	c := s.c
	c.write(func(fr *http2.Framer) error {
		c.mu.Lock()
		if s.reset || s.removed {
			c.mu.Unlock()
			remote = true
			return nil
		}
		s.reset = true
		closed := c.closed
		c.sendCond.Broadcast()
		c.mu.Unlock()
		if remote || closed {
			return nil
		}
		h2code := http2.ErrCode(code)
		if code > uint32(http2.ErrCodeHTTP11Required) {
			h2code = http2.ErrCodeInternal
		}
		return fr.WriteRSTStream(s.id, h2code)
	}, true)
	s.mu.Lock()
	s.upClosed = true
	ms := s.ms
	s.mu.Unlock()
	if ms != nil {
		if code == uint32(http2.ErrCodeNo) {
			code = mux.CodeCancel
		}
		ms.Reset(code)
	}
	s.ex.finish(c.p, false)
	s.remove()
}

// maybeDone forgets the stream once both directions ended.
func (s *h2Stream) maybeDone() {
	c := s.c
	c.mu.Lock()
	done := s.sentEnd && s.recvEnd
	c.mu.Unlock()
	if !done {
		return
	}
	s.mu.Lock()
	done = s.upClosed && !s.upBusy && len(s.upBuf) == 0
	ms := s.ms
	s.mu.Unlock()
	if done {
		if ms != nil {
			ms.Close()
		}
		s.ex.finish(c.p, true)
		s.remove()
	}
}

func (s *h2Stream) remove() {
	c := s.c
	c.mu.Lock()
	if s.removed {
		c.mu.Unlock()
		return
	}
	s.removed = true
	delete(c.streams, s.id)
	empty := len(c.streams) == 0
	if empty {
		c.idleAt = time.Now()
	}
	drained := empty && c.server && c.goaway
	c.mu.Unlock()
	if drained {
		c.nc.Close()
	}
}
