// Package bench is vmesh's benchmark harness (issue 9): it measures vmesh
// against a direct connection and against HAProxy with mTLS, on test-bed
// hosts (network namespaces on a private bridge) with real iptables, and
// writes a table, a JSON file in bench/results and the results section of
// BENCHMARKS.md.
//
// The harness is TestBench, gated by VMESH_BENCH=1 so that `make test`
// skips it; `make bench` runs it. BENCHMARKS.md says what each scenario
// measures and how. The rest of the package is what the harness's numbers
// pass through (load-tool output parsers, the report, the peer proxy's
// configuration and certificates), tested by `make test`.
package bench
