package proxy

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
)

// FuzzH1Request feeds arbitrary bytes to the request parser and the body
// copier, as a peer or an app could send them: they never panic, and a
// request they accept is forwarded as a message that parses the same way
// (same framing, same body) — no second reading of the same bytes.
func FuzzH1Request(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
		"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n0\r\nT: 1\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		"GET / HTTP/1.0\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\n\r\n",
		"\r\nGET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		br := bufio.NewReaderSize(bytes.NewReader(data), 4096)
		var h h1Head
		if err := readHead(br, &h); err != nil {
			return
		}
		if err := h.parseRequest(); err != nil {
			return
		}
		var fwd bytes.Buffer
		bw := bufio.NewWriter(&fwd)
		// The head as sendRequest writes it to a peer, framing rewritten.
		bw.Write(h.method)
		bw.WriteString(" ")
		bw.Write(h.target)
		bw.WriteString(" HTTP/1.1\r\n")
		for _, fl := range h.fields {
			if !h.hopByHop(fl) {
				writeField(bw, fl.name, fl.value)
			}
		}
		if h.hosts == 0 {
			bw.WriteString("Host: added\r\n")
		}
		switch h.body {
		case bodyLength:
			bw.WriteString("Content-Length: " + strconv.FormatInt(h.length, 10) + "\r\n")
		case bodyChunked:
			bw.WriteString("Transfer-Encoding: chunked\r\n")
		}
		bw.WriteString("\r\n")
		bc := bodyCopier{dst: bw, src: br}
		if err := bc.copy(h.body, h.length, h.body == bodyChunked); err != nil {
			return
		}
		bw.Flush()
		body1 := bc.n

		// The forwarded message parses with the same framing and body.
		br2 := bufio.NewReaderSize(bytes.NewReader(fwd.Bytes()), 4096)
		var h2 h1Head
		if err := readHead(br2, &h2); err != nil {
			t.Fatalf("forwarded head unreadable: %v\n%q", err, fwd.Bytes())
		}
		if err := h2.parseRequest(); err != nil {
			t.Fatalf("forwarded head refused: %v\n%q", err, fwd.Bytes())
		}
		if h2.body != h.body || h2.length != h.length || !bytes.Equal(h2.method, h.method) || !bytes.Equal(h2.target, h.target) {
			t.Fatalf("forwarded framing differs: %v/%d vs %v/%d", h2.body, h2.length, h.body, h.length)
		}
		bc2 := bodyCopier{dst: bufio.NewWriter(io.Discard), src: br2}
		if err := bc2.copy(h2.body, h2.length, false); err != nil {
			t.Fatalf("forwarded body refused: %v\n%q", err, fwd.Bytes())
		}
		if bc2.n != body1 {
			t.Fatalf("forwarded body has %d bytes, want %d", bc2.n, body1)
		}
		if rest, _ := io.ReadAll(br2); len(rest) != 0 {
			t.Fatalf("forwarded message has %d bytes after its end: %q", len(rest), rest)
		}
	})
}

func TestParseResponseFraming(t *testing.T) {
	for _, tc := range []struct {
		head   string
		isHead bool
		want   bodyKind
		close  bool
	}{
		{"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false, bodyLength, false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, bodyNone, false},
		{"HTTP/1.1 204 No Content\r\n\r\n", false, bodyNone, false},
		{"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", false, bodyNone, false},
		{"HTTP/1.1 200 OK\r\n\r\n", false, bodyEOF, false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false, bodyChunked, false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", false, bodyChunked, true},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false, bodyEOF, true},
		{"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false, bodyLength, true},
		{"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n", false, bodyLength, false},
	} {
		var h h1Head
		if err := readHead(bufio.NewReader(strings.NewReader(tc.head)), &h); err != nil {
			t.Fatal(err)
		}
		if err := h.parseResponse(tc.isHead); err != nil {
			t.Fatalf("%q: %v", tc.head, err)
		}
		if h.body != tc.want || h.connClose != tc.close {
			t.Errorf("%q (HEAD %v): body %v close %v, want %v %v", tc.head, tc.isHead, h.body, h.connClose, tc.want, tc.close)
		}
	}
	for _, bad := range []string{
		"HTTP/1.1 20 OK\r\n\r\n", "HTTP/2 200 OK\r\n\r\n", "HTTP/1.1 200 OK\r\nA: 1\r\n 2\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
	} {
		var h h1Head
		readHead(bufio.NewReader(strings.NewReader(bad)), &h)
		if err := h.parseResponse(false); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// BenchmarkParseRequest compares the lean parser with net/http's
// ReadRequest on a typical request head.
func BenchmarkParseRequest(b *testing.B) {
	head := "GET /api/v1/items?page=2 HTTP/1.1\r\nHost: web.vmesh:8080\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n" +
		"Accept: application/json\r\nAccept-Encoding: gzip, deflate\r\nAuthorization: Bearer abcdefghijklmnopqrstuvwxyz0123456789\r\n" +
		"X-Request-Id: 0f8fad5b-d9cb-469f-a165-70867728950e\r\nCookie: session=1234567890abcdef\r\n\r\n"
	r := strings.NewReader(head)
	br := bufio.NewReaderSize(r, 4096)
	b.Run("lean", func(b *testing.B) {
		var h h1Head
		b.ReportAllocs()
		for range b.N {
			r.Reset(head)
			br.Reset(r)
			if err := readHead(br, &h); err != nil {
				b.Fatal(err)
			}
			if err := h.parseRequest(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("net/http", func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			r.Reset(head)
			br.Reset(r)
			if _, err := http.ReadRequest(br); err != nil {
				b.Fatal(err)
			}
		}
	})
}
