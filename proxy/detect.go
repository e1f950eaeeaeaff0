package proxy

import (
	"bytes"
	"errors"
	"net"
	"os"
	"time"
)

// detectBufSize bounds how much protocol detection reads, as in Linkerd.
const detectBufSize = 1024

// h2Preface is the start of the HTTP/2 client connection preface; its first
// 14 bytes decide HTTP/2.
const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// appProtocol is what protocol detection found.
type appProtocol uint8

const (
	protoOpaque appProtocol = iota
	protoHTTP1
	protoHTTP2
)

func (p appProtocol) String() string {
	switch p {
	case protoHTTP1:
		return "http1"
	case protoHTTP2:
		return "http2"
	}
	return "opaque"
}

// detectProtocol classifies the first bytes of a client's stream. It returns
// more=true when b is too short to decide but is still a valid prefix of an
// HTTP/1 request line or of the HTTP/2 preface; the caller may then read more
// (within the same deadline and buffer).
func detectProtocol(b []byte) (p appProtocol, more bool) {
	if len(b) == 0 {
		return protoOpaque, true
	}
	// HTTP/2 prior knowledge.
	n := min(len(b), 14)
	if string(b[:n]) == h2Preface[:n] {
		if n == 14 {
			return protoHTTP2, false
		}
		return protoOpaque, true
	}
	return detectHTTP1(b)
}

// detectHTTP1 checks for an HTTP/1 request line:
// method SP request-target SP "HTTP/1." DIGIT (CR)LF.
func detectHTTP1(b []byte) (appProtocol, bool) {
	line := b
	complete := false
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		line, complete = b[:i], true
		line = bytes.TrimSuffix(line, []byte{'\r'})
	}
	// Method: 1..20 token characters.
	i := 0
	for i < len(line) && isTokenChar(line[i]) {
		i++
	}
	if i == len(line) && !complete {
		return protoOpaque, i <= 20
	}
	if i == 0 || i > 20 || i == len(line) || line[i] != ' ' {
		return protoOpaque, false
	}
	rest := line[i+1:]
	// Request target: visible ASCII, no spaces, 1..(rest of the buffer).
	j := 0
	for j < len(rest) && rest[j] > ' ' && rest[j] < 0x7f {
		j++
	}
	if j == len(rest) && !complete {
		return protoOpaque, true
	}
	if j == 0 || j == len(rest) || rest[j] != ' ' {
		return protoOpaque, false
	}
	version := rest[j+1:]
	const v = "HTTP/1.x"
	if !complete {
		if len(version) > len(v) || !versionPrefix(version) {
			return protoOpaque, false
		}
		return protoOpaque, true
	}
	if len(version) != len(v) || !versionPrefix(version) {
		return protoOpaque, false
	}
	return protoHTTP1, false
}

// versionPrefix reports whether v is a prefix of "HTTP/1.0" or "HTTP/1.1".
func versionPrefix(v []byte) bool {
	const p = "HTTP/1."
	for k, c := range v {
		switch {
		case k < len(p):
			if c != p[k] {
				return false
			}
		case k == len(p):
			if c != '0' && c != '1' {
				return false
			}
		default:
			return false
		}
	}
	return true
}

func isTokenChar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return c < 0x80 && bytes.IndexByte([]byte("!#$%&'*+-.^_`|~"), c) >= 0
}

// detect reads from c until the protocol is known, detectBufSize bytes are
// buffered or timeout passes, and returns the protocol and the bytes read
// (to be replayed). A timeout with no bytes (a server that speaks first) is
// opaque with no error; EOF before any byte returns an error.
func detect(c net.Conn, buf []byte, timeout time.Duration) (appProtocol, []byte, error) {
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return protoOpaque, nil, err
	}
	defer c.SetReadDeadline(time.Time{})
	buf = buf[:detectBufSize]
	n := 0
	for {
		m, err := c.Read(buf[n:])
		n += m
		p, more := detectProtocol(buf[:n])
		if !more || n == len(buf) {
			return p, buf[:n], nil
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return protoOpaque, buf[:n], nil
			}
			if n > 0 {
				return protoOpaque, buf[:n], nil
			}
			return protoOpaque, nil, err
		}
	}
}
