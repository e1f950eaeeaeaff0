package proxy

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"golang.org/x/net/http2/hpack"
)

// The messages of one HTTP/2 request between two proxies. A request
// forwarded frame by frame (h2fwd.go) travels on one mux stream of its own
// (transport header protocol sessionH2Stream): the client proxy writes the
// request's messages, the server proxy the response's. A message is a kind
// byte, a 3-byte big-endian length and the payload:
//
//	msgHeaders  a header block: the request's or a response's (1xx, then the final one)
//	msgData     body bytes
//	msgTrailers the trailers
//
// msgEnd on the kind is the sender's END_STREAM: nothing follows in that
// direction (the mux stream's half-close comes with it). Header blocks are
// plain, not HPACK: a field is uvarint(len(name)) name uvarint(len(value))
// value. Each proxy HPACK-encodes for its own HTTP/2 connection.
const (
	msgHeaders  = 1
	msgData     = 2
	msgTrailers = 3
	msgEnd      = 0x80

	msgHead = 4
	// msgMaxHeaders bounds a header block; msgMaxData a data message (a
	// sender writes at most one HTTP/2 frame's payload per message).
	msgMaxHeaders = h2fMaxHeaderList
	msgMaxData    = 64 << 10
)

var (
	errMsgKind  = errors.New("h2 stream: unknown message kind")
	errMsgLarge = errors.New("h2 stream: message too large")
	errMsgField = errors.New("h2 stream: malformed header block")
)

// appendMsgHead appends a message head for a payload of n bytes.
func appendMsgHead(b []byte, kind byte, n int) []byte {
	return append(b, kind, byte(n>>16), byte(n>>8), byte(n))
}

// appendFields appends fs as a plain header block.
func appendFields(b []byte, fs []hpack.HeaderField) []byte {
	for _, f := range fs {
		b = binary.AppendUvarint(b, uint64(len(f.Name)))
		b = append(b, f.Name...)
		b = binary.AppendUvarint(b, uint64(len(f.Value)))
		b = append(b, f.Value...)
	}
	return b
}

// parseFields decodes a plain header block into fs (reused).
func parseFields(b []byte, fs []hpack.HeaderField) ([]hpack.HeaderField, error) {
	fs = fs[:0]
	if fs == nil {
		fs = make([]hpack.HeaderField, 0, 16)
	}
	// One allocation for the block: every name and value is a substring.
	all := string(b)
	for off := 0; off < len(all); {
		var f hpack.HeaderField
		for i := 0; i < 2; i++ {
			n, k := binary.Uvarint(b[off:])
			if k <= 0 || n > uint64(len(b)-off-k) {
				return nil, errMsgField
			}
			s := all[off+k : off+k+int(n)]
			off += k + int(n)
			if i == 0 {
				f.Name = s
			} else {
				f.Value = s
			}
		}
		if f.Name == "" {
			return nil, errMsgField
		}
		fs = append(fs, f)
	}
	return fs, nil
}

// msgReader reads messages from a mux stream.
type msgReader struct {
	br  *bufio.Reader
	buf []byte // a message payload larger than br's buffer lands here
}

var msgReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 32<<10) }}

func newMsgReader(r io.Reader) *msgReader {
	br := msgReaders.Get().(*bufio.Reader)
	br.Reset(r)
	return &msgReader{br: br}
}

func (m *msgReader) release() {
	if m.br != nil {
		m.br.Reset(nil)
		msgReaders.Put(m.br)
		m.br = nil
	}
}

// next reads the next message; its payload is valid until the next call.
// io.EOF means the stream ended before another message.
func (m *msgReader) next() (kind byte, payload []byte, err error) {
	h, err := m.br.Peek(msgHead)
	if err != nil {
		if err == io.EOF && m.br.Buffered() > 0 {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	kind = h[0]
	n := int(h[1])<<16 | int(h[2])<<8 | int(h[3])
	switch kind &^ msgEnd {
	case msgHeaders, msgTrailers:
		if n > msgMaxHeaders {
			return 0, nil, errMsgLarge
		}
	case msgData:
		if n > msgMaxData {
			return 0, nil, errMsgLarge
		}
	default:
		return 0, nil, fmt.Errorf("%w %d", errMsgKind, kind)
	}
	m.br.Discard(msgHead)
	if n <= m.br.Size() {
		payload, err = m.br.Peek(n)
		if err == nil {
			m.br.Discard(n)
		}
	} else {
		if cap(m.buf) < n {
			m.buf = make([]byte, n)
		}
		payload = m.buf[:n]
		_, err = io.ReadFull(m.br, payload)
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return kind, payload, err
}

// fill reads what the stream holds into the reader's buffer: call it
// only when a read would not wait (the stream is complete).
func (m *msgReader) fill() {
	m.br.Peek(1)
}

// peekHead returns the kind and payload length of the next message; call
// it only when ready.
func (m *msgReader) peekHead() (kind byte, n int) {
	h, _ := m.br.Peek(msgHead)
	return h[0], int(h[1])<<16 | int(h[2])<<8 | int(h[3])
}

// ready reports whether a whole message is buffered: the caller may go on
// without flushing what it wrote.
func (m *msgReader) ready() bool {
	b := m.br.Buffered()
	if b < msgHead {
		return false
	}
	h, _ := m.br.Peek(msgHead)
	return b >= msgHead+(int(h[1])<<16|int(h[2])<<8|int(h[3]))
}
