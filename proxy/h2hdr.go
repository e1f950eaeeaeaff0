package proxy

import (
	"errors"
	"strings"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2Headers decodes the header blocks an h2Conn reads (a HEADERS frame and
// its CONTINUATIONs) into one field slice, reused block after block. x/net's
// Framer.ReadMetaHeaders does the same work but allocates per block a
// MetaHeadersFrame, an emit closure with the state it captures, and a
// field slice grown by append: a third of the objects a gRPC call cost an
// agent. The checks are the Framer's:
//   - a field value that is not a valid header value, a regular name that
//     is not a lowercase token, a pseudo-header after a regular field, an
//     unknown or duplicate pseudo-header, request and response
//     pseudo-headers mixed: a stream error (PROTOCOL_ERROR);
//   - a list over the limit (a field's name, value and 32 bytes each; the
//     trailer field's names on a budget of their own): truncated, the
//     fields read so far kept, the HPACK state still in step;
//   - a fragment more than twice what is left of the budget, or any
//     fragment after an invalid field: the connection ends
//     (PROTOCOL_ERROR); an HPACK error ends it (COMPRESSION_ERROR).
//
// The fields are valid until the next block begins: whoever keeps one
// keeps its strings (immutable), never the slice.
type h2Headers struct {
	dec *hpack.Decoder
	max uint32

	// The block being read.
	stream     uint32
	end        bool // END_STREAM
	fields     []hpack.HeaderField
	remain     uint32
	trailers   uint32 // what is left of the trailer field's budget
	sawRegular bool
	truncated  bool
	invalid    error
}

var (
	errH2FieldValue     = errors.New("http2: invalid header field value")
	errH2FieldName      = errors.New("http2: invalid header field name")
	errH2PseudoAfter    = errors.New("http2: pseudo header field after regular")
	errH2PseudoUnknown  = errors.New("http2: invalid pseudo-header")
	errH2PseudoRepeated = errors.New("http2: duplicate pseudo-header")
	errH2PseudoMixed    = errors.New("http2: mix of request and response pseudo headers")
)

func newH2Headers(max uint32) *h2Headers {
	h := &h2Headers{dec: hpack.NewDecoder(4096, nil), max: max}
	h.dec.SetEmitFunc(h.emit)
	h.dec.SetMaxStringLength(int(max))
	return h
}

// begin starts a block with its HEADERS frame (of stream, END_STREAM set
// when end) and decodes its fragment.
func (h *h2Headers) begin(stream uint32, end bool, frag []byte) error {
	clear(h.fields) // no strings kept alive past their block
	h.stream, h.end, h.fields = stream, end, h.fields[:0]
	h.remain, h.trailers = h.max, h.max
	h.sawRegular, h.truncated, h.invalid = false, false, nil
	h.dec.SetEmitEnabled(true)
	return h.fragment(frag)
}

// fragment decodes the next piece of the block (the Framer has checked
// that a CONTINUATION follows its HEADERS on the same stream).
func (h *h2Headers) fragment(frag []byte) error {
	if int64(len(frag)) > 2*(int64(h.remain)+int64(h.trailers)) || h.invalid != nil {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	if _, err := h.dec.Write(frag); err != nil {
		return http2.ConnectionError(http2.ErrCodeCompression)
	}
	return nil
}

// finish ends the block: an error is a connection error, or a stream
// error for the block's stream (the fields are not to be used then).
func (h *h2Headers) finish() error {
	if err := h.dec.Close(); err != nil {
		return http2.ConnectionError(http2.ErrCodeCompression)
	}
	if h.invalid == nil {
		h.invalid = checkPseudos(h.fields)
	}
	if h.invalid != nil {
		return http2.StreamError{StreamID: h.stream, Code: http2.ErrCodeProtocol, Cause: h.invalid}
	}
	return nil
}

func (h *h2Headers) emit(f hpack.HeaderField) {
	if !httpguts.ValidHeaderFieldValue(f.Value) {
		h.invalid = errH2FieldValue
	}
	if strings.HasPrefix(f.Name, ":") {
		if h.sawRegular {
			h.invalid = errH2PseudoAfter
		}
	} else {
		h.sawRegular = true
		if !validFieldName(f.Name) {
			h.invalid = errH2FieldName
		}
	}
	if h.invalid != nil {
		h.dec.SetEmitEnabled(false)
		return
	}
	budget, size := &h.remain, f.Size()
	if f.Name == "trailer" {
		// Each name the field lists counts as a field of its own.
		n := uint32(strings.Count(f.Value, ",") + 1)
		budget, size = &h.trailers, uint32(len(f.Value))-n+1+n*hpack.HeaderField{}.Size()
	}
	if size > *budget {
		h.dec.SetEmitEnabled(false)
		h.truncated = true
		h.remain, h.trailers = 0, 0
		return
	}
	*budget -= size
	h.fields = append(h.fields, f)
}

// validFieldName is HTTP/2's rule for a regular field name: a token, in
// lowercase.
func validFieldName(name string) bool {
	if !httpguts.ValidHeaderFieldName(name) {
		return false
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; 'A' <= c && c <= 'Z' {
			return false
		}
	}
	return true
}

// checkPseudos checks a block's pseudo-headers (they come first): known,
// each once, of a request or of a response.
func checkPseudos(fields []hpack.HeaderField) error {
	var request, response bool
	for i, f := range fields {
		if !f.IsPseudo() {
			break
		}
		switch f.Name {
		case ":method", ":path", ":scheme", ":authority", ":protocol":
			request = true
		case ":status":
			response = true
		default:
			return errH2PseudoUnknown
		}
		for _, g := range fields[:i] {
			if g.Name == f.Name {
				return errH2PseudoRepeated
			}
		}
	}
	if request && response {
		return errH2PseudoMixed
	}
	return nil
}
