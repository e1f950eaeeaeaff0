package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The transport header is what a client proxy sends first on an opaque
// transport connection (ALPN alpnTransport) to a peer's inbound listener,
// after the mTLS handshake and before any application byte:
//
//	preface   "vmesh.transport/v1\r\n\r\n" (22 bytes, names the version)
//	length    u32 big-endian, length of body, at most maxHeaderBody
//	body      a sequence of fields: tag u8, len u8, value (len bytes)
//
// Fields: tagPort (2 bytes, big-endian, 1..65535, required), tagProtocol
// (1 byte, sessionProtocol), tagService (the target service name, UTF-8,
// informational only: the port decides). Unknown tags are skipped so a newer
// client can add fields; a repeated known tag is an error. The server reads
// the header under the detect timeout and never more than
// len(headerPreface)+4+maxHeaderBody bytes.
const (
	headerPreface = "vmesh.transport/v1\r\n\r\n"
	maxHeaderBody = 1024

	tagPort     = 1
	tagProtocol = 2
	tagService  = 3
)

// sessionProtocol says what the bytes after the transport header are.
type sessionProtocol uint8

const (
	sessionOpaque   sessionProtocol = iota // raw TCP bytes
	sessionHTTP1                           // an HTTP/1 connection (e.g. an Upgrade request)
	sessionHTTP2                           // an HTTP/2 connection
	sessionH2Stream                        // one HTTP/2 request, as messages (h2msg.go); mux streams only
	sessionMax                             // first invalid value
)

func (p sessionProtocol) String() string {
	switch p {
	case sessionOpaque:
		return "opaque"
	case sessionHTTP1:
		return "http1"
	case sessionHTTP2:
		return "http2"
	case sessionH2Stream:
		return "h2stream"
	}
	return fmt.Sprintf("protocol(%d)", uint8(p))
}

// transportHeader is the decoded transport header.
type transportHeader struct {
	Port     uint16
	Protocol sessionProtocol
	Service  string
}

var (
	errHeaderPreface  = errors.New("bad transport header preface")
	errHeaderTooLarge = errors.New("transport header too large")
	errHeaderMalfomed = errors.New("malformed transport header")
)

// appendHeader appends the wire form of h to b.
func appendHeader(b []byte, h transportHeader) ([]byte, error) {
	if h.Port == 0 {
		return b, fmt.Errorf("encoding transport header: port 0")
	}
	if len(h.Service) > 255 {
		return b, fmt.Errorf("encoding transport header: service name longer than 255 bytes")
	}
	body := 4 + 3
	if h.Service != "" {
		body += 2 + len(h.Service)
	}
	b = append(b, headerPreface...)
	b = binary.BigEndian.AppendUint32(b, uint32(body))
	b = append(b, tagPort, 2, byte(h.Port>>8), byte(h.Port))
	b = append(b, tagProtocol, 1, byte(h.Protocol))
	if h.Service != "" {
		b = append(b, tagService, byte(len(h.Service)))
		b = append(b, h.Service...)
	}
	return b, nil
}

// readHeader reads one transport header from r. It reads exactly the
// header's bytes and nothing after them, so r may be the connection itself.
func readHeader(r io.Reader) (transportHeader, error) {
	var pre [len(headerPreface) + 4]byte
	if _, err := io.ReadFull(r, pre[:]); err != nil {
		return transportHeader{}, fmt.Errorf("reading transport header: %w", err)
	}
	if string(pre[:len(headerPreface)]) != headerPreface {
		return transportHeader{}, errHeaderPreface
	}
	n := binary.BigEndian.Uint32(pre[len(headerPreface):])
	if n > maxHeaderBody {
		return transportHeader{}, fmt.Errorf("%w: %d bytes", errHeaderTooLarge, n)
	}
	body := make([]byte, n) // n is small and bounded
	if _, err := io.ReadFull(r, body); err != nil {
		return transportHeader{}, fmt.Errorf("reading transport header body: %w", err)
	}
	return decodeHeaderBody(body)
}

// decodeHeaderBody decodes the fields of a transport header body.
func decodeHeaderBody(body []byte) (transportHeader, error) {
	var h transportHeader
	var seen uint8
	for len(body) > 0 {
		if len(body) < 2 {
			return h, fmt.Errorf("%w: truncated field", errHeaderMalfomed)
		}
		tag, n := body[0], int(body[1])
		if len(body) < 2+n {
			return h, fmt.Errorf("%w: field %d longer than body", errHeaderMalfomed, tag)
		}
		v := body[2 : 2+n]
		body = body[2+n:]
		if tag >= tagPort && tag <= tagService {
			if seen&(1<<tag) != 0 {
				return h, fmt.Errorf("%w: repeated field %d", errHeaderMalfomed, tag)
			}
			seen |= 1 << tag
		}
		switch tag {
		case tagPort:
			if n != 2 {
				return h, fmt.Errorf("%w: port field of %d bytes", errHeaderMalfomed, n)
			}
			h.Port = binary.BigEndian.Uint16(v)
		case tagProtocol:
			if n != 1 || sessionProtocol(v[0]) >= sessionMax {
				return h, fmt.Errorf("%w: bad protocol field", errHeaderMalfomed)
			}
			h.Protocol = sessionProtocol(v[0])
		case tagService:
			h.Service = string(v)
		}
	}
	if h.Port == 0 {
		return h, fmt.Errorf("%w: no port", errHeaderMalfomed)
	}
	return h, nil
}
