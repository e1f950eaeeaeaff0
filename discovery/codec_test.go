package discovery

import (
	"bytes"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func sampleEntry() NodeEntry {
	return NodeEntry{
		Node:      "web-1",
		Addrs:     []netip.Addr{netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("2001:db8::1")},
		ProxyPort: 4143,
		Identity:  "spiffe://prod.example/node/web-1",
		Version:   1764064000123456789,
		Services: []ServiceEntry{
			{Name: "web", Port: 8080, Protocol: ProtocolHTTP1, Health: HealthPassing, Weight: 100,
				Identity: "spiffe://prod.example/svc/web", Labels: map[string]string{"version": "v2", "zone": "a"}},
			{Name: "redis", Port: 6379, Protocol: ProtocolOpaque, Opaque: true, Health: HealthFailing, Weight: 1,
				Identity: "spiffe://prod.example/svc/redis"},
		},
	}
}

func TestCodecRoundTrip(t *testing.T) {
	e := sampleEntry()
	raw := encodeEntry(&e)
	m, err := decodeMessage(raw)
	if err != nil {
		t.Fatalf("decoding an entry: %v", err)
	}
	if diff := cmp.Diff(e, m.entry, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Errorf("entry changed in a round trip (-want +got):\n%s", diff)
	}
	if len(raw) > maxBroadcastSize {
		t.Errorf("a two-service entry takes %d bytes, more than a broadcast (%d)", len(raw), maxBroadcastSize)
	}
	t.Logf("two-service entry: %d bytes", len(raw))

	st, err := decodeMessage(encodeState([][]byte{raw, raw}, time.UnixMilli(1700000000123)))
	if err != nil || st.typ != msgState || len(st.entries) != 2 || !bytes.Equal(st.entries[1], raw) || st.sentAt != 1700000000123 {
		t.Errorf("state round trip: %v, %d entries, sent at %d", err, len(st.entries), st.sentAt)
	}
	// A state without the sender's clock (older agents) still decodes.
	if st, err := decodeMessage(encodeState([][]byte{raw}, time.Time{})); err != nil || st.sentAt != 0 || len(st.entries) != 1 {
		t.Errorf("state without a clock: %+v, %v", st, err)
	}
	n, err := decodeMessage(encodeNotice("web-1", 42))
	if err != nil || n.node != "web-1" || n.version != 42 {
		t.Errorf("notice round trip: %+v, %v", n, err)
	}
	r, err := decodeMessage(encodeRequest("db-2", netip.MustParseAddrPort("198.18.0.2:7946")))
	if err != nil || r.node != "db-2" || r.addr != netip.MustParseAddrPort("198.18.0.2:7946") {
		t.Errorf("request round trip: %+v, %v", r, err)
	}
	meta := nodeMeta{version: 7, proxyPort: 4143, addrs: e.Addrs, roles: []string{"ca"}, agent: "v1.2.3-4-gabcdef"}
	gm, err := decodeMeta(encodeMeta(meta))
	if err != nil || !cmp.Equal(gm, meta, cmp.AllowUnexported(nodeMeta{}), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })) {
		t.Errorf("meta round trip: %+v, %v", gm, err)
	}
}

func TestMetaFitsMemberlistLimit(t *testing.T) {
	roles := make([]string, 100)
	for i := range roles {
		roles[i] = strings.Repeat("r", 40)
	}
	b := encodeMeta(nodeMeta{version: 1<<64 - 1, proxyPort: 65535, addrs: sampleEntry().Addrs, roles: roles, agent: strings.Repeat("v", 40)})
	if len(b) > 512 {
		t.Fatalf("metadata is %d bytes, memberlist allows 512", len(b))
	}
	m, err := decodeMeta(b)
	if err != nil {
		t.Fatalf("decoding trimmed metadata: %v", err)
	}
	if m.agent != strings.Repeat("v", 40) {
		t.Errorf("the agent version was dropped for roles: %q", m.agent)
	}
	// Metadata without the agent version (older agents) still decodes.
	old := encodeMeta(nodeMeta{version: 1, proxyPort: 4143, roles: []string{"ca"}})
	if m, err := decodeMeta(old); err != nil || m.agent != "" || m.roles[0] != "ca" {
		t.Errorf("metadata without agent version: %+v, %v", m, err)
	}
}

func TestDecodeRefuses(t *testing.T) {
	e := sampleEntry()
	good := encodeEntry(&e)
	huge := sampleEntry()
	huge.Services = nil
	for i := 0; i < 400; i++ {
		huge.Services = append(huge.Services, ServiceEntry{Name: strings.Repeat("s", 200), Port: 1, Identity: strings.Repeat("i", 200)})
	}
	cases := []struct {
		name string
		buf  []byte
		want error
	}{
		{"empty", nil, errMalformed},
		{"wrong format", append([]byte{9}, good[1:]...), errMalformed},
		{"unknown type", []byte{wireFormat, 99}, errMalformed},
		{"truncated", good[:len(good)-3], errMalformed},
		{"trailing bytes", append(bytes.Clone(good), 0), errMalformed},
		{"bad protocol", bytes.Replace(bytes.Clone(good), []byte{0x90, 0x3f, 1, 0}, []byte{0x90, 0x3f, 9, 0}, 1), errMalformed},
		{"service count beyond bytes", []byte{wireFormat, msgEntry, 1, 1, 'a', 0, 0, 0, 0, 0x80, 0x02}, errMalformed},
		{"too many services", []byte{wireFormat, msgEntry, 1, 1, 'a', 0, 0, 0, 0, 0xff, 0x7f}, errOversized},
		{"long string", append([]byte{wireFormat, msgNotice, 1, 0xff, 0x7f}, make([]byte, 0x3fff)...), errOversized},
		{"invalid utf8", []byte{wireFormat, msgNotice, 1, 2, 0xff, 0xfe}, errMalformed},
		{"request without address", []byte{wireFormat, msgRequest, 1, 'a', 0, 0}, errMalformed},
		{"entry too large", encodeEntry(&huge), errOversized},
		{"empty node", []byte{wireFormat, msgNotice, 1, 0}, errMalformed},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := decodeMessage(c.buf)
			if !errors.Is(err, c.want) {
				t.Errorf("decodeMessage = %v, want %v", err, c.want)
			}
		})
	}
}

func FuzzDecodeMessage(f *testing.F) {
	e := sampleEntry()
	raw := encodeEntry(&e)
	f.Add(raw)
	f.Add(encodeNotice("a", 1))
	f.Add(encodeRequest("b", netip.MustParseAddrPort("[2001:db8::1]:7946")))
	f.Add(encodeState([][]byte{raw}, time.Time{}))
	f.Add(encodeMeta(nodeMeta{version: 1, proxyPort: 4143, addrs: e.Addrs, roles: []string{"ca"}}))
	f.Fuzz(func(t *testing.T, buf []byte) {
		_, _ = decodeMeta(buf)
		m, err := decodeMessage(buf)
		if err != nil {
			return
		}
		switch m.typ {
		case msgEntry:
			// What was accepted encodes back to something that decodes to
			// the same entry.
			again, err := decodeMessage(encodeEntry(&m.entry))
			if err != nil {
				t.Fatalf("re-encoded entry refused: %v", err)
			}
			if !cmp.Equal(m.entry, again.entry, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })) {
				t.Fatalf("entry changed when re-encoded")
			}
		case msgState:
			for _, p := range m.entries {
				_, _ = decodeMessage(p)
			}
		}
	})
}

func TestKeys(t *testing.T) {
	k1, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	k2, _ := GenerateKey()
	keys, err := ParseKeys([]byte("# cluster keys\n" + k1 + "\n\n  " + k2 + "  \n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 || len(keys[0]) != 32 {
		t.Fatalf("ParseKeys = %d keys, first %d bytes; want 2 keys of 32", len(keys), len(keys[0]))
	}
	for _, bad := range []string{"", "# only a comment\n", "not base64!\n", "c2hvcnQ=\n", k1 + "\n" + k1 + "\n"} {
		if _, err := ParseKeys([]byte(bad)); err == nil {
			t.Errorf("ParseKeys(%q) accepted", bad)
		}
	}
}
