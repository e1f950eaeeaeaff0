package proxy

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// BenchmarkGRPCMesh measures one grpc-go unary call (a 64-byte echo),
// sequential, direct and through two proxies on loopback. cpu-us/op is
// the whole process's CPU per call (client, server and both proxies).
func BenchmarkGRPCMesh(b *testing.B) {
	for _, mode := range []string{"direct", "mesh"} {
		b.Run(mode, func(b *testing.B) {
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
			call := func() {
				out := new(wrapperspb.BytesValue)
				if err := cc.Invoke(context.Background(), "/"+testEchoService+"/Echo", in, out); err != nil {
					b.Fatal(err)
				}
				if len(out.Value) != 64 {
					b.Fatalf("echo returned %d bytes, want 64", len(out.Value))
				}
			}
			call()
			start := processUsage()
			b.ResetTimer()
			for range b.N {
				call()
			}
			b.StopTimer()
			end := processUsage()
			b.ReportMetric(float64((end.cpu-start.cpu).Microseconds())/float64(b.N), "cpu-us/op")
		})
	}
}
