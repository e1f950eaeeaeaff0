// Package bench is vmesh's benchmark harness (issues 9, 13 and 14): it
// measures vmesh against a direct connection and against HAProxy with mTLS,
// on test-bed hosts (network namespaces on a private bridge) with real
// iptables — HTTP/1.1 at a fixed and at the maximum rate, h2c, gRPC,
// WebSocket, opaque bulk and new connections, memory, and vmesh through a
// service VIP against vmesh through a host's address — and writes a table, a
// JSON file in bench/results and the results section of BENCHMARKS.md, each
// row with its issue's target judged.
//
// The harness is TestBench, gated by VMESH_BENCH=1 so that `make test`
// skips it; `make bench` runs it. BENCHMARKS.md says what each scenario
// measures and how. The rest of the package is what the harness's numbers
// pass through (load-tool and profile parsers, the report and its targets,
// the peer proxy's configuration and certificates), tested by `make test`.
package bench
