package proxy

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"strings"
	"testing"
)

func TestHeaderRoundTrip(t *testing.T) {
	for _, h := range []transportHeader{
		{Port: 1},
		{Port: 65535, Protocol: sessionHTTP1, Service: "web"},
		{Port: 6379, Protocol: sessionHTTP2, Service: strings.Repeat("s", 255)},
	} {
		b, err := appendHeader(nil, h)
		if err != nil {
			t.Fatal(err)
		}
		r := bytes.NewReader(append(b, "rest"...))
		got, err := readHeader(r)
		if err != nil || got != h {
			t.Fatalf("round trip %+v: got %+v, %v", h, got, err)
		}
		if rest, _ := io.ReadAll(r); string(rest) != "rest" {
			t.Fatalf("readHeader consumed bytes after the header: rest %q", rest)
		}
	}
	if _, err := appendHeader(nil, transportHeader{}); err == nil {
		t.Error("port 0 encoded")
	}
}

func TestHeaderDecodeErrors(t *testing.T) {
	for name, body := range map[string][]byte{
		"empty":          {},
		"no port":        {tagProtocol, 1, 0},
		"port 0":         {tagPort, 2, 0, 0},
		"short port":     {tagPort, 1, 80},
		"truncated":      {tagPort},
		"overlong field": {tagPort, 9, 0, 80},
		"bad protocol":   {tagPort, 2, 0, 80, tagProtocol, 1, 9},
		"repeated port":  {tagPort, 2, 0, 80, tagPort, 2, 0, 81},
	} {
		if h, err := decodeHeaderBody(body); err == nil {
			t.Errorf("%s: decoded %+v", name, h)
		}
	}
	// Unknown tags are skipped (forward compatibility).
	h, err := decodeHeaderBody([]byte{200, 3, 1, 2, 3, tagPort, 2, 0, 80})
	if err != nil || h.Port != 80 {
		t.Errorf("unknown tag: %+v, %v", h, err)
	}
}

func FuzzReadHeader(f *testing.F) {
	f.Add(must(appendHeader(nil, transportHeader{Port: 80, Protocol: sessionHTTP1, Service: "web"})))
	f.Add([]byte(headerPreface + "\x00\x00\x00\x04\x01\x02\x00\x50"))
	f.Add([]byte(headerPreface + "\xff\xff\xff\xff"))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := readHeader(bytes.NewReader(b))
		if err != nil {
			return
		}
		if h.Port == 0 || h.Protocol >= sessionMax {
			t.Fatalf("accepted invalid header %+v", h)
		}
		if len(b) > len(headerPreface)+4+maxHeaderBody {
			// Fine: readHeader stops at the header's end; the rest is data.
		}
		// What decodes re-encodes to something that decodes the same.
		if len(h.Service) <= 255 {
			b2, err := appendHeader(nil, h)
			if err != nil {
				t.Fatal(err)
			}
			h2, err := readHeader(bytes.NewReader(b2))
			if err != nil || h2 != h {
				t.Fatalf("re-encode: %+v -> %+v, %v", h, h2, err)
			}
		}
	})
}

func TestDetectProtocol(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want appProtocol
		more bool
	}{
		{"", protoOpaque, true},
		{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", protoHTTP2, false},
		{"PRI * HTTP/2.0", protoHTTP2, false},
		{"PRI * HT", protoOpaque, true},
		{"GET / HTTP/1.1\r\nHost: x\r\n\r\n", protoHTTP1, false},
		{"POST /a?b=c HTTP/1.0\n", protoHTTP1, false},
		{"M-SEARCH * HTTP/1.1\r\n", protoHTTP1, false},
		{"GET / HTTP/1.1", protoOpaque, true},
		{"GET /long/pa", protoOpaque, true},
		{"GE", protoOpaque, true},
		{"GET / HTTP/2.0\r\n", protoOpaque, false},
		{"GET  / HTTP/1.1\r\n", protoOpaque, false},
		{"GET / HTTP/1.1 x\r\n", protoOpaque, false},
		{"*2\r\n$4\r\nPING\r\n", protoOpaque, false},
		{"\x16\x03\x01\x02\x00", protoOpaque, false},
		{"SSH-2.0-OpenSSH_9.2\r\n", protoOpaque, false},
		{"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n", protoOpaque, false},
	} {
		p, more := detectProtocol([]byte(tc.in))
		if p != tc.want || more != tc.more {
			t.Errorf("detectProtocol(%q) = %v, more=%v; want %v, more=%v", tc.in, p, more, tc.want, tc.more)
		}
	}
}

func FuzzDetectProtocol(f *testing.F) {
	for _, s := range []string{"GET / HTTP/1.1\r\n", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "*1\r\n$4\r\nPING\r\n", "\x16\x03\x01"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, more := detectProtocol(b)
		if more && p != protoOpaque {
			t.Fatalf("decided %v but asked for more", p)
		}
		if p == protoHTTP1 && bytes.IndexByte(b, '\n') < 0 {
			t.Fatalf("HTTP/1 without a complete request line: %q", b)
		}
		if p == protoHTTP2 && !bytes.HasPrefix(b, []byte("PRI * HTTP/2.0")) {
			t.Fatalf("HTTP/2 without the preface: %q", b)
		}
		// Deciding is stable: more bytes never change a decision.
		if !more {
			p2, more2 := detectProtocol(append(b[:len(b):len(b)], "xyz\r\n"...))
			if p2 != p || more2 {
				t.Fatalf("decision changed with more bytes: %v -> %v (%q)", p, p2, b)
			}
		}
	})
}

// TestDetectReads checks detect over a real connection: a request written in
// pieces is still HTTP/1; a silent client is opaque after the timeout; EOF
// before any byte is an error.
func TestDetectReads(t *testing.T) {
	pair := func() (net.Conn, net.Conn) {
		ln := listenLocal(t)
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(); s.Close() })
		return c, s
	}
	buf := make([]byte, copyBufSize)
	c, s := pair()
	go func() {
		c.Write([]byte("GET /x H"))
		c.Write([]byte("TTP/1.1\r\n"))
	}()
	p, peeked, err := detect(s, buf, 5e9)
	if err != nil || p != protoHTTP1 || string(peeked) != "GET /x HTTP/1.1\r\n" {
		t.Fatalf("split request: %v %q %v", p, peeked, err)
	}
	c, s = pair()
	p, peeked, err = detect(s, buf, 50e6)
	if err != nil || p != protoOpaque || len(peeked) != 0 {
		t.Fatalf("silent client: %v %q %v", p, peeked, err)
	}
	c.Close()
	if _, _, err = detect(s, buf, 5e9); err == nil {
		t.Fatal("EOF before any byte: no error")
	}
}

func TestIDPatterns(t *testing.T) {
	for _, tc := range []struct {
		pat, id string
		want    bool
	}{
		{"spiffe://td/svc/web", "spiffe://td/svc/web", true},
		{"spiffe://td/svc/web", "spiffe://td/svc/web2", false},
		{"spiffe://td/svc/*", "spiffe://td/svc/web", true},
		{"spiffe://td/svc/*", "spiffe://td/svc/web/x", false},
		{"spiffe://td/svc/*", "spiffe://td/node/a", false},
		{"spiffe://td/**", "spiffe://td/svc/web", true},
		{"spiffe://td/**", "spiffe://td/node/a/b/c", true},
		{"spiffe://td/**", "spiffe://other/svc/web", false},
		{"spiffe://*/svc/web", "spiffe://any/svc/web", true},
		{"spiffe://td/svc/*", "spiffe://td/svc/", false},
		{"spiffe://td/svc/web", "spiffe://td/svc", false},
	} {
		p, err := parseIDPattern(tc.pat)
		if err != nil {
			t.Fatal(err)
		}
		if got := p.match(tc.id); got != tc.want {
			t.Errorf("%s matches %s = %v, want %v", tc.pat, tc.id, got, tc.want)
		}
	}
	for _, bad := range []string{"td/svc/web", "spiffe://td//web", "spiffe://td/svc/w*", "spiffe://td/**/web", "spiffe://**"} {
		if _, err := parseIDPattern(bad); err == nil {
			t.Errorf("pattern %q accepted", bad)
		}
	}
}

func BenchmarkHeaderEncode(b *testing.B) {
	h := transportHeader{Port: 8080, Protocol: sessionHTTP1, Service: "checkout"}
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		buf, _ = appendHeader(buf[:0], h)
	}
}

func BenchmarkHeaderDecode(b *testing.B) {
	enc := must(appendHeader(nil, transportHeader{Port: 8080, Protocol: sessionHTTP1, Service: "checkout"}))
	r := bytes.NewReader(enc)
	b.ReportAllocs()
	for b.Loop() {
		r.Reset(enc)
		if _, err := readHeader(r); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDetect(b *testing.B) {
	for name, in := range map[string]string{
		"http1":  "GET /api/v1/items?limit=10 HTTP/1.1\r\nHost: web\r\nUser-Agent: curl/8\r\n\r\n",
		"http2":  h2Preface,
		"opaque": "*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
	} {
		b.Run(name, func(b *testing.B) {
			in := []byte(in)
			b.ReportAllocs()
			for b.Loop() {
				detectProtocol(in)
			}
		})
	}
}

// BenchmarkHandshake measures one full mTLS handshake between proxies with
// each key exchange (both ends' CPU, on loopback).
func BenchmarkHandshake(b *testing.B) {
	ca := newTestCA(b, "vmesh.test")
	srv := ca.issue(b, "svc/web")
	cli := ca.issue(b, "node/a")
	for _, curve := range []tls.CurveID{tls.X25519, tls.X25519MLKEM768} {
		b.Run(curve.String(), func(b *testing.B) {
			scfg := &tls.Config{Certificates: []tls.Certificate{*srv}, ClientAuth: tls.RequireAnyClientCert, MinVersion: tls.VersionTLS13, CurvePreferences: []tls.CurveID{curve}}
			ccfg := &tls.Config{Certificates: []tls.Certificate{*cli}, InsecureSkipVerify: true, MinVersion: tls.VersionTLS13, CurvePreferences: []tls.CurveID{curve}}
			for b.Loop() {
				c1, c2 := net.Pipe()
				s := tls.Server(c1, scfg)
				c := tls.Client(c2, ccfg)
				errc := make(chan error, 1)
				go func() { errc <- s.Handshake() }()
				if err := c.Handshake(); err != nil {
					b.Fatal(err)
				}
				if err := <-errc; err != nil {
					b.Fatal(err)
				}
				c1.Close() // not the TLS conns: close_notify on a pipe would block
				c2.Close()
			}
		})
	}
}

// BenchmarkRelay measures the copy loop: TCP to TCP (splice) and TCP to TLS
// (pooled 64 KiB buffer), moving 64 MiB per iteration.
func BenchmarkRelay(b *testing.B) {
	const size = 64 << 20
	for _, mode := range []string{"tcp-splice", "tcp-to-tls"} {
		b.Run(mode, func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				benchRelayOnce(b, mode == "tcp-to-tls", size)
			}
		})
	}
}

func benchRelayOnce(b *testing.B, useTLS bool, size int64) {
	ca := newTestCA(b, "vmesh.test")
	cert := ca.issue(b, "svc/x")
	// sink <- (relay) <- client
	sinkLn := listenLocal(b)
	done := make(chan int64, 1)
	go func() {
		c, err := sinkLn.Accept()
		if err != nil {
			done <- 0
			return
		}
		if useTLS {
			c = tls.Server(c, &tls.Config{Certificates: []tls.Certificate{*cert}})
		}
		n, _ := io.Copy(io.Discard, c)
		c.Close()
		done <- n
	}()
	frontLn := listenLocal(b)
	go func() {
		in, err := frontLn.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", sinkLn.Addr().String())
		if err != nil {
			return
		}
		if useTLS {
			out = tls.Client(out, &tls.Config{InsecureSkipVerify: true})
		}
		relay(in, out)
	}()
	c, err := net.Dial("tcp", frontLn.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	bp := getBuf()
	var sent int64
	for sent < size {
		n, err := c.Write(*bp)
		if err != nil {
			b.Fatal(err)
		}
		sent += int64(n)
	}
	putBuf(bp)
	c.(*net.TCPConn).CloseWrite()
	if n := <-done; n != sent {
		b.Fatalf("sink got %d of %d bytes", n, sent)
	}
	c.Close()
}

// The relay buffer grows only when reads fill it: an idle or chatty
// connection keeps the smallest buffer, a bulk one reaches the largest.
func TestCopyGrowing(t *testing.T) {
	var reads []int
	src := &recordingReader{r: bytes.NewReader(make([]byte, 300<<10)), sizes: &reads}
	var dst bytes.Buffer
	n, err := copyGrowing(&dst, src)
	if err != nil || n != 300<<10 || dst.Len() != 300<<10 {
		t.Fatalf("copied %d (%d), %v", n, dst.Len(), err)
	}
	if reads[0] != bufSizes[0] || reads[1] != bufSizes[1] || reads[2] != bufSizes[2] || reads[len(reads)-2] != bufSizes[2] {
		t.Fatalf("buffer sizes offered to Read: %v", reads)
	}
	reads = reads[:0]
	small := &recordingReader{r: &chunkReader{chunk: 100, left: 5000}, sizes: &reads}
	if _, err := copyGrowing(io.Discard, small); err != nil {
		t.Fatal(err)
	}
	for _, r := range reads {
		if r != bufSizes[0] {
			t.Fatalf("small reads grew the buffer: %v", reads)
		}
	}
}

type recordingReader struct {
	r     io.Reader
	sizes *[]int
}

func (r *recordingReader) Read(p []byte) (int, error) {
	*r.sizes = append(*r.sizes, len(p))
	return r.r.Read(p)
}

// chunkReader returns at most chunk bytes a read, left bytes in all.
type chunkReader struct{ chunk, left int }

func (c *chunkReader) Read(p []byte) (int, error) {
	if c.left == 0 {
		return 0, io.EOF
	}
	n := min(c.chunk, c.left, len(p))
	c.left -= n
	return n, nil
}
