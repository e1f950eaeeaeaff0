package discovery

import (
	"encoding/binary"
	"errors"
	"maps"
	"net/netip"
	"slices"
	"time"
	"unicode/utf8"
)

// Wire format. Every gossip payload of this package starts with a format
// byte, then a message type byte; integers are unsigned varints, strings are
// a varint length then UTF-8 bytes. Decoding checks every count against the
// bytes left before allocating, so a hostile payload costs at most its own
// size, and a payload with trailing bytes is refused.
const (
	wireFormat = 1

	msgEntry   = 1 // a host's whole catalog entry
	msgNotice  = 2 // "host H is at version V" (entries too large to broadcast)
	msgRequest = 3 // "send your entry to host H" (reply: msgEntry, reliably)
	msgState   = 4 // push/pull: a list of encoded msgEntry, msgSigned or msgCert payloads
	msgSigned  = 5 // a msgEntry payload, its owner's signature and the signing certificate's ID
	msgCert    = 6 // a node SVID chain (leaf first, DER), the signer of msgSigned entries
	msgCertReq = 7 // "send your certificate with this ID to host H" (reply: msgCert, reliably)
	msgRevoke  = 8 // a revocation signed by the CA (opaque to this package)
)

// certID names a signing certificate: the SHA-256 of its leaf's DER.
type certID [32]byte

// Limits of what peers accept. An entry beyond them is refused and counted.
const (
	maxEntryBytes    = 64 << 10 // one encoded entry
	maxStateBytes    = 32 << 20 // one push/pull state
	maxStateEntries  = 1 << 16  // entries in one push/pull state
	maxString        = 512      // names, identities, label keys and values
	maxAddrs         = 16
	maxServices      = 512
	maxLabels        = 64
	maxBroadcastSize = 1024 // larger entries are announced by a notice and pulled
	maxSigBytes      = 256  // one signature
	maxChainCerts    = 4    // certificates in a msgCert chain
	maxCertBytes     = 8 << 10
)

var (
	errMalformed = errors.New("malformed")
	errOversized = errors.New("oversized")
)

// protocols in wire order.
var protocolCodes = []string{ProtocolAuto, ProtocolHTTP1, ProtocolHTTP2, ProtocolOpaque}

// healthCodes in wire order.
var healthCodes = []Health{HealthUnknown, HealthPassing, HealthFailing}

// message is one decoded payload.
type message struct {
	typ     byte
	entry   NodeEntry      // msgEntry
	node    string         // msgNotice: the host; msgRequest: who wants the entry
	addr    netip.AddrPort // msgRequest: its gossip address
	version uint64         // msgNotice
	entries [][]byte       // msgState: encoded payloads (sub-slices of the input)
	sentAt  int64          // msgState: the sender's clock (Unix ms) when it encoded it; 0 if absent
	payload []byte         // msgSigned: the signed msgEntry payload (sub-slice of the input)
	sig     []byte         // msgSigned (sub-slice of the input)
	cert    certID         // msgSigned: the signing certificate; msgCertReq: the one wanted
	chain   [][]byte       // msgCert: DER certificates, leaf first (sub-slices of the input)
	blob    []byte         // msgRevoke (sub-slice of the input)
}

func encodeRevocation(blob []byte) []byte {
	e := encoder{b: make([]byte, 0, len(blob)+8)}
	e.byte(wireFormat)
	e.byte(msgRevoke)
	e.bytes(blob)
	return e.b
}

// encodeSigned wraps an encoded msgEntry with its signature.
func encodeSigned(payload, sig []byte, id certID) []byte {
	e := encoder{b: make([]byte, 0, len(payload)+len(sig)+len(id)+8)}
	e.byte(wireFormat)
	e.byte(msgSigned)
	e.bytes(payload)
	e.bytes(sig)
	e.b = append(e.b, id[:]...)
	return e.b
}

func encodeCert(chain [][]byte) []byte {
	e := encoder{}
	e.byte(wireFormat)
	e.byte(msgCert)
	e.uint(uint64(len(chain)))
	for _, c := range chain {
		e.bytes(c)
	}
	return e.b
}

func encodeCertRequest(from string, id certID) []byte {
	e := encoder{}
	e.byte(wireFormat)
	e.byte(msgCertReq)
	e.string(from)
	e.b = append(e.b, id[:]...)
	return e.b
}

type encoder struct{ b []byte }

func (e *encoder) byte(v byte)     { e.b = append(e.b, v) }
func (e *encoder) uint(v uint64)   { e.b = binary.AppendUvarint(e.b, v) }
func (e *encoder) string(s string) { e.uint(uint64(len(s))); e.b = append(e.b, s...) }
func (e *encoder) bytes(p []byte)  { e.uint(uint64(len(p))); e.b = append(e.b, p...) }

func encodeEntry(n *NodeEntry) []byte {
	e := encoder{b: make([]byte, 0, 128)}
	e.byte(wireFormat)
	e.byte(msgEntry)
	e.uint(n.Version)
	e.string(n.Node)
	e.string(n.Identity)
	e.uint(uint64(n.ProxyPort))
	var nflags byte
	if n.Leaving {
		nflags |= 1
	}
	e.byte(nflags)
	e.uint(uint64(len(n.Addrs)))
	for _, a := range n.Addrs {
		e.bytes(a.AsSlice())
	}
	e.uint(uint64(len(n.Services)))
	for i := range n.Services {
		s := &n.Services[i]
		e.string(s.Name)
		e.uint(uint64(s.Port))
		e.byte(byte(indexOf(protocolCodes, s.Protocol)))
		var flags byte
		if s.Opaque {
			flags |= 1
		}
		e.byte(flags)
		e.byte(byte(indexOf(healthCodes, s.Health)))
		e.uint(uint64(s.Weight))
		e.string(s.Identity)
		e.uint(uint64(len(s.Labels)))
		for _, k := range slices.Sorted(maps.Keys(s.Labels)) {
			e.string(k)
			e.string(s.Labels[k])
		}
	}
	return e.b
}

func encodeNotice(node string, version uint64) []byte {
	e := encoder{}
	e.byte(wireFormat)
	e.byte(msgNotice)
	e.uint(version)
	e.string(node)
	return e.b
}

func encodeRequest(from string, addr netip.AddrPort) []byte {
	e := encoder{}
	e.byte(wireFormat)
	e.byte(msgRequest)
	e.string(from)
	e.bytes(addr.Addr().AsSlice())
	e.uint(uint64(addr.Port()))
	return e.b
}

// encodeState encodes a push/pull state. sentAt (the sender's clock, to
// measure clock skew between hosts) comes last, so that a state without it
// still decodes; the zero time leaves it out.
func encodeState(entries [][]byte, sentAt time.Time) []byte {
	n := 0
	for _, p := range entries {
		n += len(p) + binary.MaxVarintLen32
	}
	e := encoder{b: make([]byte, 0, n+16)}
	e.byte(wireFormat)
	e.byte(msgState)
	e.uint(uint64(len(entries)))
	for _, p := range entries {
		e.bytes(p)
	}
	if !sentAt.IsZero() {
		e.uint(uint64(sentAt.UnixMilli()))
	}
	return e.b
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(err error) {
	if d.err == nil {
		d.err = err
	}
	d.b = nil
}

func (d *decoder) byte() byte {
	if len(d.b) < 1 {
		d.fail(errMalformed)
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *decoder) uint(max uint64) uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail(errMalformed)
		return 0
	}
	d.b = d.b[n:]
	if v > max {
		d.fail(errOversized)
		return 0
	}
	return v
}

// count reads a count of items that take at least minSize bytes each.
func (d *decoder) count(max uint64, minSize int) int {
	n := d.uint(max)
	if n*uint64(minSize) > uint64(len(d.b)) {
		d.fail(errMalformed)
		return 0
	}
	return int(n)
}

func (d *decoder) raw(max uint64) []byte {
	n := d.uint(max)
	if d.err != nil {
		return nil
	}
	if n > uint64(len(d.b)) {
		d.fail(errMalformed)
		return nil
	}
	p := d.b[:n:n]
	d.b = d.b[n:]
	return p
}

// fixed reads n bytes.
func (d *decoder) fixed(n int) []byte {
	if len(d.b) < n {
		d.fail(errMalformed)
		return nil
	}
	p := d.b[:n:n]
	d.b = d.b[n:]
	return p
}

func (d *decoder) string() string {
	p := d.raw(maxString)
	if !utf8.Valid(p) {
		d.fail(errMalformed)
		return ""
	}
	return string(p) // copies: nothing decoded keeps the caller's buffer
}

// decodeMessage decodes one payload. Decoded strings are copies, but the
// entries of a msgState message are sub-slices of buf.
func decodeMessage(buf []byte) (message, error) {
	var m message
	if len(buf) > maxStateBytes {
		return m, errOversized
	}
	d := decoder{b: buf}
	if d.byte() != wireFormat {
		return m, errMalformed
	}
	m.typ = d.byte()
	switch m.typ {
	case msgEntry:
		if len(buf) > maxEntryBytes {
			return m, errOversized
		}
		m.entry = d.entry()
	case msgNotice:
		m.version = d.uint(1<<64 - 1)
		m.node = d.string()
	case msgRequest:
		m.node = d.string()
		a, ok := netip.AddrFromSlice(d.raw(16))
		m.addr = netip.AddrPortFrom(a, uint16(d.uint(65535)))
		if !ok || m.addr.Port() == 0 {
			d.fail(errMalformed)
		}
	case msgSigned:
		if len(buf) > maxEntryBytes+maxSigBytes+64 {
			return m, errOversized
		}
		m.payload = d.raw(maxEntryBytes)
		m.sig = d.raw(maxSigBytes)
		copy(m.cert[:], d.fixed(len(m.cert)))
		if d.err == nil {
			inner, err := decodeMessage(m.payload)
			switch {
			case err != nil:
				d.fail(err)
			case inner.typ != msgEntry:
				d.fail(errMalformed)
			default:
				m.entry = inner.entry
			}
		}
		if len(m.sig) == 0 {
			d.fail(errMalformed)
		}
	case msgCert:
		n := d.count(maxChainCerts, 1)
		for range n {
			m.chain = append(m.chain, d.raw(maxCertBytes))
		}
		if n == 0 {
			d.fail(errMalformed)
		}
	case msgRevoke:
		m.blob = d.raw(maxRevocationBytes)
		if len(m.blob) == 0 {
			d.fail(errMalformed)
		}
	case msgCertReq:
		m.node = d.string()
		copy(m.cert[:], d.fixed(len(m.cert)))
	case msgState:
		n := d.count(maxStateEntries, 1)
		m.entries = make([][]byte, 0, n)
		for range n {
			m.entries = append(m.entries, d.raw(maxEntryBytes))
		}
		if d.err == nil && len(d.b) != 0 {
			m.sentAt = int64(d.uint(1<<63 - 1))
		}
	default:
		return m, errMalformed
	}
	if d.err == nil && len(d.b) != 0 {
		d.err = errMalformed
	}
	if d.err == nil && (m.typ == msgNotice || m.typ == msgRequest || m.typ == msgCertReq) && m.node == "" {
		d.err = errMalformed
	}
	return m, d.err
}

func (d *decoder) entry() NodeEntry {
	var n NodeEntry
	n.Version = d.uint(1<<64 - 1)
	n.Node = d.string()
	n.Identity = d.string()
	n.ProxyPort = uint16(d.uint(65535))
	n.Leaving = d.byte()&1 != 0
	na := d.count(maxAddrs, 2)
	for range na {
		p := d.raw(16)
		a, ok := netip.AddrFromSlice(p)
		if !ok {
			d.fail(errMalformed)
			break
		}
		n.Addrs = append(n.Addrs, a)
	}
	ns := d.count(maxServices, 8)
	if ns > 0 {
		n.Services = make([]ServiceEntry, 0, ns)
	}
	for i := 0; i < ns && d.err == nil; i++ {
		var s ServiceEntry
		s.Name = d.string()
		s.Port = uint16(d.uint(65535))
		s.Protocol = codeAt(d, protocolCodes)
		flags := d.byte()
		s.Opaque = flags&1 != 0
		s.Health = codeAt(d, healthCodes)
		s.Weight = int(d.uint(65535))
		s.Identity = d.string()
		nl := d.count(maxLabels, 2)
		if nl > 0 {
			s.Labels = make(map[string]string, nl)
		}
		for range nl {
			k := d.string()
			s.Labels[k] = d.string()
		}
		if s.Name == "" || s.Port == 0 {
			d.fail(errMalformed)
		}
		n.Services = append(n.Services, s)
	}
	if n.Node == "" || n.Version == 0 {
		d.fail(errMalformed)
	}
	return n
}

func codeAt[T comparable](d *decoder, codes []T) T {
	c := d.byte()
	if int(c) >= len(codes) {
		d.fail(errMalformed)
		var zero T
		return zero
	}
	return codes[c]
}

func indexOf[T comparable](s []T, v T) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return 0
}
