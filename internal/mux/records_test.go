package mux

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"math/big"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// countingConn counts the writes (system calls) made on a connection and
// their bytes.
type countingConn struct {
	net.Conn
	writes, bytes atomic.Int64
}

func (c *countingConn) Write(b []byte) (int, error) {
	c.writes.Add(1)
	c.bytes.Add(int64(len(b)))
	return c.Conn.Write(b)
}

// selfSigned returns a throwaway certificate for "peer".
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"peer"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// A relay's batch leaves as four full TLS records in one write (the
// Wire beneath TLS): the frames fill the records exactly and no fifth
// record carries the frame headers that spilled over.
func TestBatchFillsRecords(t *testing.T) {
	cert := selfSigned(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, DynamicRecordSizingDisabled: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		srv := Server(c, Config{}, func(st *Stream) {
			st.Accept()
			n, _ := io.Copy(io.Discard, st)
			got <- n
			st.CloseWrite()
		})
		srv.Serve()
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	cc := &countingConn{Conn: raw}
	tc := tls.Client(NewWire(cc), &tls.Config{InsecureSkipVerify: true, DynamicRecordSizingDisabled: true})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	cli := Client(tc, Config{KeepAlive: -1})
	defer cli.Close()
	st, err := cli.Open([]byte("bulk"))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Accepted(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	const batches = 8
	before, beforeBytes := cc.writes.Load(), cc.bytes.Load()
	chunk := make([]byte, st.MaxBatch())
	for range batches {
		if _, err := st.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	// TLS 1.3 adds 22 bytes a record: header, content type, tag.
	const record = 16<<10 + 22
	if w, n := cc.writes.Load()-before, cc.bytes.Load()-beforeBytes; w != batches || n != batches*4*record {
		t.Errorf("%d batches of %d bytes took %d writes of %d bytes; want %d of %d (one write of 4 full TLS records each)",
			batches, len(chunk), w, n, batches, batches*4*record)
	}
	st.CloseWrite()
	select {
	case n := <-got:
		if n != batches*int64(len(chunk)) {
			t.Errorf("peer read %d bytes, want %d", n, batches*len(chunk))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("peer did not read to EOF")
	}
}
