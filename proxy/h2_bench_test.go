package proxy

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// h2cApp serves HTTP/2 with prior knowledge (what gRPC servers speak): a
// small fixed body per request.
func h2cApp(t testing.TB) netip.AddrPort {
	ln := listenLocal(t)
	srv := &http2.Server{}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/plain")
		w.Write([]byte("ok"))
	})
	return serveConns(ln, func(c net.Conn) { srv.ServeConn(c, &http2.ServeConnOpts{Handler: h}) })
}

// BenchmarkH2Mesh measures one HTTP/2 (h2c) request through two proxies on
// loopback, sequentially (latency-bound, like a gRPC unary loop) and with
// 64 requests in flight on one client connection (h2load-like).
func BenchmarkH2Mesh(b *testing.B) {
	for _, par := range []int{1, 64} {
		b.Run("inflight="+strconv.Itoa(par), func(b *testing.B) {
			ap := h2cApp(b)
			a, _, _ := meshPair(b, []LocalService{{Name: "grpc", Port: 50051, Target: ap, Protocol: "http2"}}, proxyOpts{}, proxyOpts{})
			tr := &http2.Transport{
				AllowHTTP: true,
				DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
					return a.dialOut(b, appAddr(50051)), nil
				},
			}
			b.Cleanup(tr.CloseIdleConnections)
			cl := &http.Client{Transport: tr}
			do := func() {
				resp, err := cl.Get("http://grpc:50051/bench")
				if err != nil {
					b.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			do()
			start := processUsage()
			b.ResetTimer()
			if par == 1 {
				for range b.N {
					do()
				}
			} else {
				b.SetParallelism(par)
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						do()
					}
				})
			}
			b.StopTimer()
			end := processUsage()
			b.ReportMetric(float64((end.cpu-start.cpu).Microseconds())/float64(b.N), "cpu-us/op")
		})
	}
}

// TestH2ServerBounds checks what the HTTP/2 server between proxies offers
// a peer: at most h2MaxStreams concurrent streams, a stream window of
// h2StreamWindow and a connection window of 4x that (issue 16: it used to
// allow 1,000 streams and a 1 GiB window).
func TestH2ServerBounds(t *testing.T) {
	ca := newTestCA(t, "vmesh.test")
	b := startProxy(t, "b", ca, proxyOpts{services: []LocalService{{Name: "web", Port: 80, Target: appAddr(80)}}, certs: []string{"web"}})
	id := newTestIdentity(t, ca, "a")
	tc, err := tls.Dial("tcp", b.p.InboundAddr().String(), &tls.Config{
		ServerName: "web", NextProtos: []string{"h2"},
		GetClientCertificate: id.GetClientCertificate,
		// The SPIFFE SVID has no DNS name; who the server is does not
		// matter here.
		InsecureSkipVerify: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	if _, err := io.WriteString(tc, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(tc, tc)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	settings := map[http2.SettingID]uint32{}
	var connWindow uint32 = 65535
	tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	for gotSettings, gotUpdate := false, false; !gotSettings || !gotUpdate; {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading the server's first frames: %v (settings %v)", err, settings)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if f.IsAck() {
				continue
			}
			f.ForeachSetting(func(s http2.Setting) error { settings[s.ID] = s.Val; return nil })
			gotSettings = true
		case *http2.WindowUpdateFrame:
			if f.StreamID == 0 {
				connWindow += f.Increment
				gotUpdate = true
			}
		}
	}
	if got := settings[http2.SettingMaxConcurrentStreams]; got == 0 || got > 200 {
		t.Errorf("SETTINGS_MAX_CONCURRENT_STREAMS = %d, want 1..200", got)
	}
	sw := settings[http2.SettingInitialWindowSize]
	if sw == 0 || sw > 4<<20 {
		t.Errorf("SETTINGS_INITIAL_WINDOW_SIZE = %d, want at most 4 MiB", sw)
	}
	if connWindow > 16<<20 || connWindow < 4*sw {
		t.Errorf("connection window %d, want at least 4x the stream window (%d) and at most 16 MiB", connWindow, sw)
	}
}
