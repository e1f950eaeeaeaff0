package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// echoMethod is the one gRPC method of the benchmark backend: a unary call
// that returns its request (a BytesValue). The service is declared by hand
// (no generated code): the harness measures calls, not schemas.
const echoMethod = "/vmesh.bench.Echo/Echo"

var echoService = grpc.ServiceDesc{
	ServiceName: "vmesh.bench.Echo",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Echo",
		Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			in := new(wrapperspb.BytesValue)
			if err := dec(in); err != nil {
				return nil, err
			}
			return in, nil
		},
	}},
}

// serveGRPC serves the echo method over h2c (gRPC without TLS: the mesh
// adds it between hosts).
func serveGRPC(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	return grpcServer().Serve(ln)
}

func grpcServer() *grpc.Server {
	srv := grpc.NewServer()
	srv.RegisterService(&echoService, struct{}{})
	return srv
}

// grpcLoop makes unary echo calls from workers goroutines over one client
// connection for d; each call has a 5 s deadline and
// must return what it sent.
func grpcLoop(addr string, workers int, d time.Duration, size int) (LoopResult, error) {
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return LoopResult{}, fmt.Errorf("making grpc client: %w", err)
	}
	defer cc.Close()
	payload := bytes.Repeat([]byte{'g'}, size)
	call := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		out := new(wrapperspb.BytesValue)
		if err := cc.Invoke(ctx, echoMethod, wrapperspb.Bytes(payload), out); err != nil {
			return err
		}
		if !bytes.Equal(out.GetValue(), payload) {
			return fmt.Errorf("echo returned %d bytes, not what was sent", len(out.GetValue()))
		}
		return nil
	}
	// One call first: the connection is up before the clock starts.
	if err := call(); err != nil {
		return LoopResult{}, fmt.Errorf("first call: %w", err)
	}
	return loop(workers, d, func() (func() error, func(), error) { return call, func() {}, nil })
}
