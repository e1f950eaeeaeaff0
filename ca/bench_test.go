package ca

import (
	"context"
	"fmt"
	"testing"
)

// BenchmarkIssueServiceSVID measures service SVID issuance through the CA
// API: a new P-256 key and CSR, an mTLS connection with the node SVID over
// loopback, the grant check and smallstep's signing and bbolt write.
func BenchmarkIssueServiceSVID(b *testing.B) {
	ca := startCA(b, initDir(b), "")
	tok, err := ca.CreateToken("bench", []string{"web"}, 0)
	if err != nil {
		b.Fatal(err)
	}
	c := startClient(b, ClientOptions{NodeName: "bench", Services: []string{"web"}, DB: openDB(b, ""), Token: tok})
	waitReady(b, c.Client)
	c.stop()
	ctx := context.Background()
	b.ResetTimer()
	for b.Loop() {
		_, csr, err := newCSR(ServiceID(testTD, "web"))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.requestService(ctx, csr); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "certs/s")
}

// BenchmarkJoin measures a whole join: token creation, root fetch, sign.
func BenchmarkJoin(b *testing.B) {
	ca := startCA(b, initDir(b), "")
	ctx := context.Background()
	db := openDB(b, "")
	i := 0
	for b.Loop() {
		i++
		name := fmt.Sprintf("n%d", i)
		tok, err := ca.CreateToken(name, nil, 0)
		if err != nil {
			b.Fatal(err)
		}
		c, err := newTestClient(b, ClientOptions{NodeName: name, DB: db, Token: tok})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.step(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "joins/s")
}

// BenchmarkIssueLocal measures in-process issuance (a CA host's own SVIDs),
// without TLS: the cost of smallstep's signing path and its bbolt write.
func BenchmarkIssueLocal(b *testing.B) {
	ca := startCA(b, initDir(b), "")
	ctx := context.Background()
	for b.Loop() {
		_, csr, err := newCSR(ServiceID(testTD, "web"))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := ca.issueLocal(ctx, csr); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "certs/s")
}
