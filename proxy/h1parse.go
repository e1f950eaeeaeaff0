package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strconv"
)

// The lean HTTP/1 path's message parser: heads are read whole into a
// reused buffer and parsed in place (fields are slices of it); framing and
// connection management are derived in one pass; anything that could make
// two parsers disagree on where a message ends is refused (RFC 9112 §6.3,
// §11.2): Content-Length with Transfer-Encoding, differing Content-Lengths,
// obs-fold, whitespace before a colon, bare CR, a Transfer-Encoding whose
// last coding is not chunked, malformed chunk sizes.

// Limits on a message head.
const (
	maxHeadSize   = 32 << 10 // bytes of request or response line plus fields; 431 beyond
	maxHeadFields = 256      // fields; 431 beyond
	maxChunkLine  = 4 << 10  // a chunk-size line with its extensions
)

// bodyKind is how a message's body is delimited.
type bodyKind uint8

const (
	bodyNone    bodyKind = iota // no body
	bodyLength                  // Content-Length bytes
	bodyChunked                 // chunked transfer coding (trailers may follow)
	bodyEOF                     // until the connection closes (responses only)
)

// hfield is one header field; name and value are slices of the head buffer.
type hfield struct {
	name, value []byte
}

// h1Head is a parsed request or response head. It is reused between
// messages on a connection: reset keeps its buffers.
type h1Head struct {
	buf    []byte   // the raw head, owned
	fields []hfield // slices of buf

	// Request line.
	method, target []byte
	// Status line.
	status int
	reason []byte

	minor int // HTTP/1.minor
	hosts int // Host fields

	body   bodyKind
	length int64 // bodyLength: the Content-Length

	hasLength bool // a Content-Length field (kept on bodiless responses)
	connClose bool // Connection: close, or HTTP/1.0 without keep-alive
	keepAlive bool // Connection: keep-alive
	upgrade   bool // Connection: upgrade with an Upgrade field
	expect100 bool // Expect: 100-continue
	// held: the body was sent from the read buffer and is still there,
	// so the request can be sent again (h1.go's exchange).
	held       bool
	teTrailers bool // TE: trailers
	connTokens [][]byte
	dstPort    []byte // Vmesh-Dst-Port
	origProto  []byte // L5d-Orig-Proto
}

func (h *h1Head) reset() {
	h.buf = h.buf[:0]
	h.fields = h.fields[:0]
	h.connTokens = h.connTokens[:0]
	h.method, h.target, h.reason, h.dstPort, h.origProto = nil, nil, nil, nil, nil
	h.status, h.minor, h.length, h.hosts = 0, 0, 0, 0
	h.body = bodyNone
	h.hasLength, h.connClose, h.keepAlive, h.upgrade, h.expect100, h.teTrailers = false, false, false, false, false, false
	h.held = false
}

// httpError is a message the proxy refuses: the status to answer with and
// the reason, a constant (the metric label).
type httpError struct {
	status int
	reason string
}

func (e *httpError) Error() string { return "http: " + e.reason }

// Rejection reasons (label "reason" of http_rejected_total).
var (
	errHeadTooLarge    = &httpError{431, "header_too_large"}
	errBadRequestLine  = &httpError{400, "bad_request_line"}
	errBadStatusLine   = &httpError{502, "bad_status_line"}
	errBadField        = &httpError{400, "bad_header"}
	errObsFold         = &httpError{400, "obs_fold"}
	errLengthChunked   = &httpError{400, "length_and_chunked"}
	errBadLength       = &httpError{400, "bad_content_length"}
	errDupLength       = &httpError{400, "duplicate_content_length"}
	errBadTE           = &httpError{400, "bad_transfer_encoding"}
	errUnsupportedTE   = &httpError{501, "unsupported_transfer_encoding"}
	errBadHost         = &httpError{400, "bad_host"}
	errBadChunk        = &httpError{400, "bad_chunk"}
	errUnsupportedVers = &httpError{505, "unsupported_version"}
)

// readHead reads one head (up to and including the empty line) from br into
// h.buf. Empty lines before a request line are skipped (RFC 9112 §2.2). A
// line may be longer than br's buffer; the head may not be longer than
// maxHeadSize. It returns io.EOF if br ends before any byte of a head.
func readHead(br *bufio.Reader, h *h1Head) error {
	h.reset()
	lineStart := 0
	for {
		frag, err := br.ReadSlice('\n')
		if len(h.buf)+len(frag) > maxHeadSize {
			return errHeadTooLarge
		}
		switch err {
		case nil:
		case bufio.ErrBufferFull:
			h.buf = append(h.buf, frag...)
			continue
		case io.EOF:
			if len(h.buf) == 0 && len(frag) == 0 {
				return io.EOF
			}
			return io.ErrUnexpectedEOF
		default:
			return err
		}
		h.buf = append(h.buf, frag...)
		line := h.buf[lineStart:]
		empty := len(line) == 1 || (len(line) == 2 && line[0] == '\r')
		switch {
		case empty && lineStart == 0:
			h.buf = h.buf[:0] // an empty line before the start line
		case empty:
			return nil
		default:
			lineStart = len(h.buf)
		}
	}
}

// lines splits b at LF, dropping one CR before each LF; a CR anywhere else
// is an error.
func nextLine(b []byte) (line, rest []byte, ok bool) {
	i := bytes.IndexByte(b, '\n')
	if i < 0 {
		return nil, nil, false
	}
	line, rest = b[:i], b[i+1:]
	if len(line) > 0 && line[len(line)-1] == '\r' {
		line = line[:len(line)-1]
	}
	return line, rest, bytes.IndexByte(line, '\r') < 0
}

// parseRequest parses h.buf as a request head and derives its framing.
func (h *h1Head) parseRequest() error {
	line, rest, ok := nextLine(h.buf)
	if !ok {
		return errBadRequestLine
	}
	sp := bytes.IndexByte(line, ' ')
	if sp <= 0 || sp > 32 {
		return errBadRequestLine
	}
	h.method = line[:sp]
	for _, c := range h.method {
		if !isTokenChar(c) {
			return errBadRequestLine
		}
	}
	line = line[sp+1:]
	sp = bytes.IndexByte(line, ' ')
	if sp <= 0 {
		return errBadRequestLine
	}
	h.target = line[:sp]
	for _, c := range h.target {
		if c <= ' ' || c == 0x7f {
			return errBadRequestLine
		}
	}
	switch string(line[sp+1:]) {
	case "HTTP/1.1":
		h.minor = 1
	case "HTTP/1.0":
		h.minor = 0
	default:
		if bytes.HasPrefix(line[sp+1:], []byte("HTTP/")) {
			return errUnsupportedVers
		}
		return errBadRequestLine
	}
	if err := h.parseFields(rest, true); err != nil {
		return err
	}
	if h.body == bodyChunked && h.minor == 0 {
		return errBadTE // HTTP/1.0 has no transfer codings: faulty framing
	}
	return nil
}

// parseResponse parses h.buf as a response head to a request with method
// reqMethod and derives its framing.
func (h *h1Head) parseResponse(head bool) error {
	line, rest, ok := nextLine(h.buf)
	if !ok || len(line) < 12 || line[8] != ' ' {
		return errBadStatusLine
	}
	switch string(line[:8]) {
	case "HTTP/1.1":
		h.minor = 1
	case "HTTP/1.0":
		h.minor = 0
	default:
		return errBadStatusLine
	}
	code := line[9:12]
	if code[0] < '1' || code[0] > '9' || code[1] < '0' || code[1] > '9' || code[2] < '0' || code[2] > '9' {
		return errBadStatusLine
	}
	h.status = int(code[0]-'0')*100 + int(code[1]-'0')*10 + int(code[2]-'0')
	if len(line) > 12 {
		if line[12] != ' ' {
			return errBadStatusLine
		}
		h.reason = line[13:]
	}
	if err := h.parseFields(rest, false); err != nil {
		if he, ok := err.(*httpError); ok && he.status < 500 {
			return &httpError{502, "bad_response_" + he.reason}
		}
		return err
	}
	switch {
	case head || h.status/100 == 1 || h.status == 204 || h.status == 304:
		h.body = bodyNone
	case h.body == bodyNone && !h.hasLength:
		h.body = bodyEOF
	}
	return nil
}

// parseFields parses the field lines of a head and derives framing and
// connection management.
func (h *h1Head) parseFields(b []byte, request bool) error {
	for {
		line, rest, ok := nextLine(b)
		if !ok {
			return errBadField
		}
		b = rest
		if len(line) == 0 {
			break
		}
		if line[0] == ' ' || line[0] == '\t' {
			return errObsFold
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			return errBadField
		}
		name := line[:colon]
		for _, c := range name {
			if !isTokenChar(c) {
				return errBadField // also whitespace before the colon
			}
		}
		value := trimOWS(line[colon+1:])
		for _, c := range value {
			if (c < ' ' && c != '\t') || c == 0x7f {
				return errBadField
			}
		}
		if len(h.fields) == maxHeadFields {
			return errHeadTooLarge
		}
		h.fields = append(h.fields, hfield{name, value})
		switch fieldID(name) {
		case fContentLength:
			n, ok := parseLength(value)
			if !ok {
				return errBadLength
			}
			if h.hasLength && n != h.length {
				return errDupLength
			}
			h.hasLength, h.length = true, n
		case fTransferEncoding:
			var last []byte
			for tok := range bytes.SplitSeq(value, []byte{','}) {
				tok = trimOWS(tok)
				if len(tok) == 0 {
					continue
				}
				if last != nil {
					// A coding before another one: only chunked is
					// supported, and chunked must be last and once.
					if asciiEqualFold(last, "chunked") {
						return errBadTE
					}
					return errUnsupportedTE
				}
				last = tok
			}
			if h.body == bodyChunked || last == nil {
				return errBadTE
			}
			if !asciiEqualFold(last, "chunked") {
				if request {
					return errBadTE
				}
				h.body = bodyEOF // RFC 9112 §6.3 item 4
				h.connClose = true
				continue
			}
			h.body = bodyChunked
		case fConnection:
			for tok := range bytes.SplitSeq(value, []byte{','}) {
				tok = trimOWS(tok)
				switch {
				case asciiEqualFold(tok, "close"):
					h.connClose = true
				case asciiEqualFold(tok, "keep-alive"):
					h.keepAlive = true
				case asciiEqualFold(tok, "upgrade"):
					h.upgrade = true
				case len(tok) > 0:
					h.connTokens = append(h.connTokens, tok)
				}
			}
		case fHost:
			h.hosts++
		case fExpect:
			h.expect100 = asciiEqualFold(value, "100-continue")
		case fTE:
			for tok := range bytes.SplitSeq(value, []byte{','}) {
				if asciiEqualFold(trimOWS(tok), "trailers") {
					h.teTrailers = true
				}
			}
		case fDstPort:
			h.dstPort = value
		case fOrigProto:
			h.origProto = value
		}
	}
	if h.upgrade && !h.hasField(fUpgrade) {
		h.upgrade = false
	}
	if h.body == bodyChunked && h.hasLength {
		if request {
			return errLengthChunked
		}
		h.connClose = true // RFC 9112 §6.3 item 3: chunked wins, then close
	}
	if h.body == bodyNone && h.hasLength && h.length > 0 {
		h.body = bodyLength
	}
	if h.minor == 0 && !h.keepAlive {
		h.connClose = true
	}
	return nil
}

func (h *h1Head) hasField(id fieldKind) bool {
	for _, f := range h.fields {
		if fieldID(f.name) == id {
			return true
		}
	}
	return false
}

// fieldKind names the fields the proxy interprets.
type fieldKind uint8

const (
	fOther fieldKind = iota
	fContentLength
	fTransferEncoding
	fConnection
	fKeepAlive
	fProxyConnection
	fTE
	fTrailer
	fUpgrade
	fHost
	fExpect
	fProxyAuthenticate
	fProxyAuthorization
	fDstPort
	fOrigProto
	fOpaque
)

// fieldID classifies a field name, case-insensitively, without allocating.
func fieldID(name []byte) fieldKind {
	switch len(name) {
	case 2:
		if asciiEqualFold(name, "te") {
			return fTE
		}
	case 4:
		if asciiEqualFold(name, "host") {
			return fHost
		}
	case 6:
		if asciiEqualFold(name, "expect") {
			return fExpect
		}
	case 7:
		if asciiEqualFold(name, "upgrade") {
			return fUpgrade
		}
		if asciiEqualFold(name, "trailer") {
			return fTrailer
		}
	case 10:
		if asciiEqualFold(name, "connection") {
			return fConnection
		}
		if asciiEqualFold(name, "keep-alive") {
			return fKeepAlive
		}
	case 12:
		if asciiEqualFold(name, "vmesh-opaque") {
			return fOpaque
		}
	case 14:
		if asciiEqualFold(name, "content-length") {
			return fContentLength
		}
		if asciiEqualFold(name, "vmesh-dst-port") {
			return fDstPort
		}
		if asciiEqualFold(name, "l5d-orig-proto") {
			return fOrigProto
		}
	case 16:
		if asciiEqualFold(name, "proxy-connection") {
			return fProxyConnection
		}
	case 17:
		if asciiEqualFold(name, "transfer-encoding") {
			return fTransferEncoding
		}
	case 18:
		if asciiEqualFold(name, "proxy-authenticate") {
			return fProxyAuthenticate
		}
	case 19:
		if asciiEqualFold(name, "proxy-authorization") {
			return fProxyAuthorization
		}
	}
	return fOther
}

// hopByHop reports whether a field is not forwarded as it is: hop-by-hop
// fields (RFC 9110 §7.6.1, as httputil.ReverseProxy), framing the proxy
// writes itself, and the proxies' own fields.
func (h *h1Head) hopByHop(f hfield) bool {
	switch fieldID(f.name) {
	case fOther, fHost, fExpect, fTrailer:
		for _, t := range h.connTokens {
			if bytes.EqualFold(t, f.name) {
				return true
			}
		}
		return false
	}
	return true
}

// field returns the value of the first field with the given kind.
func (h *h1Head) field(id fieldKind) []byte {
	for _, f := range h.fields {
		if fieldID(f.name) == id {
			return f.value
		}
	}
	return nil
}

// fieldFold returns the value of the first field named name (lower-case),
// or nil.
func (h *h1Head) fieldFold(name string) []byte {
	for _, f := range h.fields {
		if asciiEqualFold(f.name, name) {
			return f.value
		}
	}
	return nil
}

func asciiEqualFold(b []byte, lower string) bool {
	if len(b) != len(lower) {
		return false
	}
	for i := range len(b) {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}

func trimOWS(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}

// parseLength parses a Content-Length value: 1 to 18 digits.
func parseLength(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 18 {
		return 0, false
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

// errIncomplete means a body ended before its framing said it would.
var errIncomplete = errors.New("body ended early")

// bodyCopier relays one message body from src to dst, changing its framing
// if needed. It flushes dst whenever src has nothing buffered, before it
// blocks on a read: a streaming body keeps flowing, and a body that has
// arrived whole goes out with its head in one write.
type bodyCopier struct {
	dst *bufio.Writer
	src *bufio.Reader
	n   int64 // body bytes read from src (chunk data only)
	arr [32]byte
}

// copy relays a body of kind in (length bytes for bodyLength) and writes it
// chunked when chunked is set (and src is not already of known length),
// else as it is (chunked input is decoded; its trailers are dropped).
func (bc *bodyCopier) copy(in bodyKind, length int64, chunked bool) error {
	switch in {
	case bodyNone:
		return nil
	case bodyLength:
		return bc.copyN(length, false)
	case bodyChunked:
		return bc.copyChunked(chunked)
	case bodyEOF:
		return bc.copyEOF(chunked)
	}
	return nil
}

// fill makes sure src has buffered bytes, flushing dst before it blocks.
func (bc *bodyCopier) fill() error {
	if bc.src.Buffered() > 0 {
		return nil
	}
	if err := bc.dst.Flush(); err != nil {
		return err
	}
	_, err := bc.src.Peek(1)
	return err
}

// copyN copies n bytes, as chunk data when asChunk.
func (bc *bodyCopier) copyN(n int64, asChunk bool) error {
	for n > 0 {
		if err := bc.fill(); err != nil {
			if err == io.EOF {
				return errIncomplete
			}
			return err
		}
		b, _ := bc.src.Peek(int(min(int64(bc.src.Buffered()), n)))
		if asChunk {
			bc.writeChunkHeader(len(b))
		}
		if _, err := bc.dst.Write(b); err != nil {
			return err
		}
		if asChunk {
			bc.dst.WriteString("\r\n")
		}
		bc.src.Discard(len(b))
		n -= int64(len(b))
		bc.n += int64(len(b))
	}
	return nil
}

func (bc *bodyCopier) writeChunkHeader(n int) {
	b := strconv.AppendInt(bc.arr[:0], int64(n), 16)
	b = append(b, '\r', '\n')
	bc.dst.Write(b)
}

// copyEOF copies until src ends, chunked or as it is.
func (bc *bodyCopier) copyEOF(chunked bool) error {
	for {
		if err := bc.fill(); err != nil {
			if err == io.EOF {
				break
			}
			return err
		}
		if err := bc.copyN(int64(bc.src.Buffered()), chunked); err != nil {
			return err
		}
	}
	if chunked {
		bc.dst.WriteString("0\r\n\r\n")
	}
	return nil
}

// copyChunked decodes a chunked body; it re-encodes it (trailers included)
// when chunked, else writes the data only.
func (bc *bodyCopier) copyChunked(chunked bool) error {
	for {
		n, err := bc.readChunkSize()
		if err != nil {
			return err
		}
		if n == 0 {
			break
		}
		if chunked {
			bc.writeChunkHeader(int(n))
		}
		if err := bc.copyN(n, false); err != nil {
			return err
		}
		if err := bc.readCRLF(); err != nil {
			return err
		}
		if chunked {
			bc.dst.WriteString("\r\n")
		}
	}
	if chunked {
		bc.dst.WriteString("0\r\n")
	}
	// Trailer section: field lines, then an empty line.
	size := 0
	for {
		if err := bc.fill(); err != nil {
			return errIncomplete
		}
		line, err := bc.src.ReadSlice('\n')
		if err != nil {
			return errBadChunk
		}
		size += len(line)
		if size > maxHeadSize {
			return errHeadTooLarge
		}
		l, _, ok := nextLine(line)
		if !ok {
			return errBadChunk
		}
		if len(l) == 0 {
			if chunked {
				bc.dst.WriteString("\r\n")
			}
			return nil
		}
		if l[0] == ' ' || l[0] == '\t' {
			return errObsFold
		}
		colon := bytes.IndexByte(l, ':')
		if colon <= 0 {
			return errBadChunk
		}
		for _, c := range l[:colon] {
			if !isTokenChar(c) {
				return errBadChunk
			}
		}
		switch fieldID(l[:colon]) {
		case fContentLength, fTransferEncoding, fHost, fConnection, fTE, fTrailer:
			continue // framing and routing fields are not allowed in trailers
		}
		if chunked {
			bc.dst.Write(l)
			bc.dst.WriteString("\r\n")
		}
	}
}

// readChunkSize reads a chunk-size line: 1 to 15 hex digits, optional
// extensions after ';' (dropped), CRLF.
func (bc *bodyCopier) readChunkSize() (int64, error) {
	if err := bc.fill(); err != nil {
		return 0, errIncomplete
	}
	line, err := bc.src.ReadSlice('\n')
	if err != nil {
		if err == bufio.ErrBufferFull {
			return 0, errBadChunk
		}
		return 0, errIncomplete
	}
	if len(line) < 3 || line[len(line)-2] != '\r' || len(line) > maxChunkLine {
		return 0, errBadChunk
	}
	line = line[:len(line)-2]
	var n int64
	i := 0
	for ; i < len(line); i++ {
		c := line[i]
		var d byte
		switch {
		case '0' <= c && c <= '9':
			d = c - '0'
		case 'a' <= c && c <= 'f':
			d = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			d = c - 'A' + 10
		default:
			goto ext
		}
		if i == 15 {
			return 0, errBadChunk
		}
		n = n<<4 | int64(d)
	}
ext:
	if i == 0 {
		return 0, errBadChunk
	}
	rest := line[i:]
	if len(rest) > 0 {
		rest = trimOWS(rest)
		if len(rest) == 0 || rest[0] != ';' {
			return 0, errBadChunk
		}
		for _, c := range rest {
			if (c < ' ' && c != '\t') || c == 0x7f {
				return 0, errBadChunk
			}
		}
	}
	return n, nil
}

func (bc *bodyCopier) readCRLF() error {
	if err := bc.fill(); err != nil {
		return errIncomplete
	}
	b, err := bc.src.Peek(2)
	if err != nil {
		return errIncomplete
	}
	if b[0] != '\r' || b[1] != '\n' {
		return errBadChunk
	}
	bc.src.Discard(2)
	return nil
}
