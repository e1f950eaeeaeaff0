package proxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sync/errgroup"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// BenchmarkGRPCMesh measures one grpc-go unary call (a 64-byte echo),
// direct and through two proxies on loopback: sequential, and from 16
// callers on one client connection ("16"). cpu-us/op is the whole
// process's CPU per call (client, server and both proxies).
func BenchmarkGRPCMesh(b *testing.B) {
	for _, name := range []string{"direct", "mesh", "direct16", "mesh16"} {
		b.Run(name, func(b *testing.B) {
			mode, callers := name, 1
			if strings.HasSuffix(name, "16") {
				mode, callers = strings.TrimSuffix(name, "16"), 16
			}
			ln := listenLocal(b)
			srv := grpc.NewServer(grpc.Creds(insecure.NewCredentials()))
			srv.RegisterService((&testEcho{}).desc(), nil)
			go srv.Serve(ln)
			b.Cleanup(srv.Stop)
			target := addrPort(ln.Addr())
			dial := func(ctx context.Context, _ string) (net.Conn, error) {
				return net.Dial("tcp", target.String())
			}
			if mode == "mesh" {
				a, _, _ := meshPair(b, []LocalService{{Name: "grpc", Port: 50051, Target: target, Protocol: "http2"}}, proxyOpts{}, proxyOpts{})
				dial = func(ctx context.Context, _ string) (net.Conn, error) {
					return a.orig.dialFrom(ctx, a.p.OutboundAddr(), appAddr(50051))
				}
			}
			cc, err := grpc.NewClient("passthrough:///"+netip.AddrPortFrom(appAddr(50051).Addr(), 50051).String(),
				grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithContextDialer(dial))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { cc.Close() })
			in := wrapperspb.Bytes(make([]byte, 64))
			call := func() error {
				out := new(wrapperspb.BytesValue)
				if err := cc.Invoke(context.Background(), "/"+testEchoService+"/Echo", in, out); err != nil {
					return err
				}
				if len(out.Value) != 64 {
					return fmt.Errorf("echo returned %d bytes, want 64", len(out.Value))
				}
				return nil
			}
			if err := call(); err != nil {
				b.Fatal(err)
			}
			start := processUsage()
			b.ResetTimer()
			var next atomic.Int64
			var g errgroup.Group
			for range callers {
				g.Go(func() error {
					for next.Add(1) <= int64(b.N) {
						if err := call(); err != nil {
							return err
						}
					}
					return nil
				})
			}
			if err := g.Wait(); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			end := processUsage()
			b.ReportMetric(float64((end.cpu-start.cpu).Microseconds())/float64(b.N), "cpu-us/op")
		})
	}
}
