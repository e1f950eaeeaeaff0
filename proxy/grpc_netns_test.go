package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/vmesh/vmesh/internal/testbed"
)

// TestGRPCNetns runs a real grpc-go server on B (plaintext h2c, as an app
// would) and a real grpc-go client on A dialing B's address with insecure
// credentials: A's iptables send it to A's proxy, which carries it over
// mTLS to B's proxy. It covers unary, server streaming, bidirectional
// streaming, error statuses with details, 1 MiB messages and a call denied
// by policy, and checks the proxies counted the calls as meshed requests.

// testEcho is a tiny gRPC service declared with a hand-written ServiceDesc
// (no protoc); its messages are wrapperspb.BytesValue, so grpc's default
// proto codec carries them.
type testEcho struct {
	// acks paces Count: the server sends message i+1 only after the client
	// acknowledged message i, so a proxy that buffered a stream's response
	// would stall the call instead of passing.
	acks chan struct{}
}

const testEchoService = "vmesh.test.Echo"

func (s *testEcho) desc() *grpc.ServiceDesc {
	return &grpc.ServiceDesc{
		ServiceName: testEchoService,
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{
			{MethodName: "Echo", Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
				in := new(wrapperspb.BytesValue)
				if err := dec(in); err != nil {
					return nil, err
				}
				return in, nil
			}},
			{MethodName: "Fail", Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
				in := new(wrapperspb.BytesValue)
				if err := dec(in); err != nil {
					return nil, err
				}
				st, err := status.New(codes.NotFound, "no such key: "+string(in.Value)).
					WithDetails(wrapperspb.String("detail for " + string(in.Value)))
				if err != nil {
					return nil, err
				}
				return nil, st.Err()
			}},
		},
		Streams: []grpc.StreamDesc{
			{StreamName: "Count", ServerStreams: true, Handler: func(_ any, ss grpc.ServerStream) error {
				in := new(wrapperspb.BytesValue)
				if err := ss.RecvMsg(in); err != nil {
					return err
				}
				for i := range int(in.Value[0]) {
					if i > 0 {
						select {
						case <-s.acks:
						case <-ss.Context().Done():
							return status.Error(codes.DeadlineExceeded, "no ack from the client")
						}
					}
					if err := ss.SendMsg(wrapperspb.Bytes(fmt.Appendf(nil, "msg %d", i))); err != nil {
						return err
					}
				}
				return nil
			}},
			{StreamName: "Chat", ServerStreams: true, ClientStreams: true, Handler: func(_ any, ss grpc.ServerStream) error {
				for {
					in := new(wrapperspb.BytesValue)
					if err := ss.RecvMsg(in); err == io.EOF {
						return nil
					} else if err != nil {
						return err
					}
					if err := ss.SendMsg(in); err != nil {
						return err
					}
				}
			}},
		},
	}
}

func TestGRPCNetns(t *testing.T) {
	bed := testbed.New(t, 2)
	A, B := bed.Hosts[0], bed.Hosts[1]
	const skip = "9999"
	installRedirects(t, A, skip)
	installRedirects(t, B, skip)

	// The real gRPC server on B, plaintext (the mesh adds mTLS), serving
	// the standard health service and testEcho on two ports.
	srv := grpc.NewServer(grpc.Creds(insecure.NewCredentials()))
	hs := health.NewServer()
	hs.SetServingStatus(testEchoService, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	echo := &testEcho{acks: make(chan struct{})}
	srv.RegisterService(echo.desc(), nil)
	for _, port := range []uint16{9090, 9091} {
		go srv.Serve(listenIn(t, B, port))
	}
	t.Cleanup(srv.Stop)

	ca := newTestCA(t, "vmesh.test")
	idA := "spiffe://vmesh.test/node/a"
	svcs := []LocalService{
		{Name: "grpc", Port: 9090},
		{Name: "grpc-private", Port: 9091, Allow: []string{"spiffe://vmesh.test/node/c"}},
	}
	cat := newTestCatalog()
	for _, s := range svcs {
		cat.add(Endpoint{
			Node: "b", Service: s.Name, Addr: netip.AddrPortFrom(B.Addr, s.Port), ProxyAddr: netip.AddrPortFrom(B.Addr, 4143),
			Identity: "spiffe://vmesh.test/svc/" + s.Name, Protocol: "auto", Healthy: true,
		})
	}
	pa := startNSProxy(t, A, ca, "a", cat, nil, nil)
	pb := startNSProxy(t, B, ca, "b", newTestCatalog(), svcs, nil)

	// The real gRPC client on A: its connection is made in A's namespace,
	// unmarked, so A's OUTPUT rules redirect it to A's proxy.
	appDial := nsDialer{h: A}
	dial := func(port uint16) *grpc.ClientConn {
		t.Helper()
		cc, err := grpc.NewClient(fmt.Sprintf("passthrough:///%s:%d", B.Addr, port),
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
				return appDial.DialContext(ctx, "tcp", addr)
			}))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		return cc
	}
	cc := dial(9090)
	callCtx := func(t *testing.T) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		t.Cleanup(cancel)
		return ctx
	}
	// Calls on the grpc service, by how they end at the proxies: with
	// grpc-status 0 at the end of the stream, or otherwise.
	var okCalls, failedCalls int

	t.Run("unary health check", func(t *testing.T) {
		okCalls++
		resp, err := healthpb.NewHealthClient(cc).Check(callCtx(t), &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health status %v, want SERVING", resp.GetStatus())
		}
	})
	t.Run("server streaming health watch", func(t *testing.T) {
		failedCalls++ // the client cancels the watch: the stream is reset
		ctx, cancel := context.WithCancel(callCtx(t))
		defer cancel()
		w, err := healthpb.NewHealthClient(cc).Watch(ctx, &healthpb.HealthCheckRequest{Service: testEchoService})
		if err != nil {
			t.Fatal(err)
		}
		// Each change is made only after the previous one arrived: the
		// updates cross the proxies while the stream stays open.
		for _, want := range []healthpb.HealthCheckResponse_ServingStatus{
			healthpb.HealthCheckResponse_SERVING,
			healthpb.HealthCheckResponse_NOT_SERVING,
			healthpb.HealthCheckResponse_SERVING,
		} {
			hs.SetServingStatus(testEchoService, want)
			resp, err := w.Recv()
			if err != nil {
				t.Fatal(err)
			}
			if resp.GetStatus() != want {
				t.Fatalf("watch got %v, want %v", resp.GetStatus(), want)
			}
		}
	})
	t.Run("server streaming paced by the client", func(t *testing.T) {
		okCalls++
		const n = 5
		s, err := cc.NewStream(callCtx(t), &grpc.StreamDesc{ServerStreams: true}, "/"+testEchoService+"/Count")
		if err != nil {
			t.Fatal(err)
		}
		if err := s.SendMsg(wrapperspb.Bytes([]byte{n})); err != nil {
			t.Fatal(err)
		}
		if err := s.CloseSend(); err != nil {
			t.Fatal(err)
		}
		for i := range n {
			got := new(wrapperspb.BytesValue)
			if err := s.RecvMsg(got); err != nil {
				t.Fatalf("message %d: %v", i, err)
			}
			if want := fmt.Sprintf("msg %d", i); string(got.Value) != want {
				t.Fatalf("message %d = %q, want %q", i, got.Value, want)
			}
			if i < n-1 {
				echo.acks <- struct{}{}
			}
		}
		if err := s.RecvMsg(new(wrapperspb.BytesValue)); err != io.EOF {
			t.Fatalf("end of stream: %v, want io.EOF (status OK)", err)
		}
	})
	t.Run("bidirectional ping-pong", func(t *testing.T) {
		okCalls++
		s, err := cc.NewStream(callCtx(t), &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, "/"+testEchoService+"/Chat")
		if err != nil {
			t.Fatal(err)
		}
		// Each ping waits for its pong: the request and the response
		// streams are both open and flowing through the proxies.
		for i := range 10 {
			ping := fmt.Appendf(nil, "ping %d", i)
			if err := s.SendMsg(wrapperspb.Bytes(ping)); err != nil {
				t.Fatal(err)
			}
			got := new(wrapperspb.BytesValue)
			if err := s.RecvMsg(got); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Value, ping) {
				t.Fatalf("pong %q, want %q", got.Value, ping)
			}
		}
		s.CloseSend()
		if err := s.RecvMsg(new(wrapperspb.BytesValue)); err != io.EOF {
			t.Fatalf("end of chat: %v, want io.EOF", err)
		}
	})
	t.Run("error status with details", func(t *testing.T) {
		failedCalls++
		// Percent-encoded in grpc-message; the details ride in the binary
		// grpc-status-details-bin trailer.
		key := "ключ/100%"
		err := cc.Invoke(callCtx(t), "/"+testEchoService+"/Fail", wrapperspb.Bytes([]byte(key)), new(wrapperspb.BytesValue))
		st, ok := status.FromError(err)
		if !ok || st.Code() != codes.NotFound {
			t.Fatalf("Fail: %v, want code NotFound", err)
		}
		if want := "no such key: " + key; st.Message() != want {
			t.Errorf("message %q, want %q", st.Message(), want)
		}
		if d := st.Details(); len(d) != 1 || d[0].(*wrapperspb.StringValue).GetValue() != "detail for "+key {
			t.Errorf("details %v, want the StringValue the server set", d)
		}
	})
	t.Run("1MiB messages, concurrent", func(t *testing.T) {
		const calls = 4
		okCalls += calls
		var wg sync.WaitGroup
		errs := make(chan error, calls)
		ctx := callCtx(t)
		for range calls {
			wg.Go(func() {
				msg := make([]byte, 1<<20)
				rand.Read(msg)
				got := new(wrapperspb.BytesValue)
				if err := cc.Invoke(ctx, "/"+testEchoService+"/Echo", wrapperspb.Bytes(msg), got); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got.Value, msg) {
					errs <- fmt.Errorf("echo of %d bytes came back as %d different bytes", len(msg), len(got.Value))
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
	t.Run("denied by policy", func(t *testing.T) {
		_, err := healthpb.NewHealthClient(dial(9091)).Check(callCtx(t), &healthpb.HealthCheckRequest{})
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("call to a service whose allow list excludes A: %v, want PermissionDenied", err)
		}
		t.Logf("denied call: %v", err)
		if got := metric(t, pb.reg, "inbound_http_authz_deny_total", map[string]string{"service": "grpc-private", "client_id": idA}); got != 1 {
			t.Errorf("inbound_http_authz_deny_total = %v, want 1", got)
		}
	})

	// Every call was one HTTP request between the proxies, over mTLS with
	// both identities known, classified by its grpc-status.
	out := map[string]string{"direction": "outbound", "service": "grpc", "server_id": "spiffe://vmesh.test/svc/grpc", "tls": "true"}
	in := map[string]string{"direction": "inbound", "service": "grpc", "client_id": idA, "tls": "true"}
	with := func(m map[string]string, kv ...string) map[string]string {
		r := map[string]string{}
		for k, v := range m {
			r[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			r[kv[i]] = kv[i+1]
		}
		return r
	}
	calls := float64(okCalls + failedCalls)
	for _, c := range []struct {
		p      *nsProxy
		name   string
		labels map[string]string
		want   float64
	}{
		{pa, "request_total", out, calls},
		{pb, "request_total", in, calls},
		{pa, "response_total", with(out, "status_code", "200", "classification", "success"), float64(okCalls)},
		{pa, "response_total", with(out, "status_code", "200", "classification", "failure"), float64(failedCalls)},
		{pb, "response_total", with(in, "status_code", "200", "classification", "success"), float64(okCalls)},
		{pb, "response_total", with(in, "status_code", "200", "classification", "failure"), float64(failedCalls)},
		{pa, "request_total", with(out, "service", "grpc-private", "server_id", "spiffe://vmesh.test/svc/grpc-private"), 1},
		{pa, "response_total", with(out, "service", "grpc-private", "server_id", "spiffe://vmesh.test/svc/grpc-private", "status_code", "403", "classification", "failure"), 1},
	} {
		// Responses are counted when their stream ends, which may be just
		// after the client saw it end.
		var got float64
		deadline := time.Now().Add(5 * time.Second)
		for {
			if got = metric(t, c.p.reg, c.name, c.labels); got == c.want || time.Now().After(deadline) {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		if got != c.want {
			who := "A"
			if c.p == pb {
				who = "B"
			}
			t.Errorf("%s %s%v = %v, want %v", who, c.name, c.labels, got, c.want)
		}
	}
	if got := metric(t, pb.reg, "request_total", map[string]string{"tls": "no_identity"}); got != 0 {
		t.Errorf("B counted %v requests without identity: the client did not go through A's proxy", got)
	}
}
