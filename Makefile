# vmesh build and test entry points. `make test` is what CI runs.
TAGS    := nobadger,nomysql,nopgx
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GO      ?= go
GOFLAGS_BUILD := -tags $(TAGS) -trimpath -ldflags "-s -w -X main.version=$(VERSION)"
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.7.0

.PHONY: build test check lint unit fuzz bench clean

build:
	CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -o bin/vmesh ./cmd/vmesh

# check: formatting, vet and a tidy go.mod; fast, no root needed.
check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet -tags $(TAGS) ./...
	@cp go.mod /tmp/vmesh-go.mod.bak; cp go.sum /tmp/vmesh-go.sum.bak; \
	 $(GO) mod tidy; \
	 if ! cmp -s go.mod /tmp/vmesh-go.mod.bak || ! cmp -s go.sum /tmp/vmesh-go.sum.bak; then \
	   diff -u /tmp/vmesh-go.mod.bak go.mod || true; \
	   cp /tmp/vmesh-go.mod.bak go.mod; cp /tmp/vmesh-go.sum.bak go.sum; \
	   echo "go mod tidy changes go.mod/go.sum: run it and commit"; exit 1; fi

lint: check
	$(GO) run $(STATICCHECK) -tags $(TAGS) ./...

# unit: every package's tests with the race detector; tests that need root
# and network namespaces run when root (and must, under CI=true). One package
# at a time (-p 1): the multi-host tests measure spreads and failure
# detection, which two race-instrumented packages on 2 cores skewed.
unit:
	$(GO) test -race -p 1 -tags $(TAGS) -timeout 20m ./...

# fuzz: each fuzz target for FUZZTIME executions (a count, not a duration:
# a duration races the fuzz coordinator's deadline and fails with a bare
# "context deadline exceeded", golang/go#75804) (their seed corpora also run as
# ordinary tests in unit). What comes from the network: gossip payloads, the
# transport header, protocol detection, CA requests and tokens, the grant
# extension, SPIFFE IDs, allow patterns, iptables -S output, the config.
# A target may name its own count (pkg:Fuzz:Nx) where one run is slow.
FUZZTIME ?= 10000x
FUZZ_TARGETS := ./discovery:FuzzDecodeMessage ./proxy:FuzzReadHeader ./proxy:FuzzDetectProtocol ./proxy:FuzzH1Request ./proxy:FuzzH2Messages \
	./proxy:FuzzAllowPattern ./ca:FuzzParseID ./ca:FuzzCertGrant ./ca:FuzzReadJoinInfo \
	./ca:FuzzSVIDRequest ./rules:FuzzParseRules ./node:FuzzParseConfig:1000x ./names:FuzzDNSQuery
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
	  pkg=$${t%%:*}; rest=$${t#*:}; fn=$${rest%%:*}; n=$${rest#$$fn}; n=$${n#:}; n=$${n:-$(FUZZTIME)}; echo "fuzz $$pkg $$fn ($$n)"; \
	  $(GO) test -tags $(TAGS) -run '^$$' -fuzz "^$$fn\$$" -fuzztime $$n $$pkg; \
	done

# test: what CI runs. The compose example and the systemd container test
# need root and a Docker engine.
test: lint unit fuzz compose-test systemd-test

# bench: the benchmark harness (bench/, ~16 minutes on 2 cores, as root):
# vmesh vs direct vs HAProxy on test-bed hosts (issues 13 and 14's rows:
# HTTP/1.1, h2c, gRPC, WebSocket, opaque bulk and new connections, system
# calls per request (perf), memory, VIP balancing; see BENCHMARKS.md);
# prints a table, writes
# bench/results/<date>.json and rewrites the results section of
# BENCHMARKS.md. Then the packages' go test -bench micro-benchmarks.
# BENCHFLAGS passes harness flags, e.g. BENCHFLAGS="-bench.rounds 1".
BENCHFLAGS ?=
bench:
	bash bench/deps.sh
	cd bench && VMESH_BENCH=1 $(GO) test -tags $(TAGS) -run '^TestBench$$' -v -timeout 45m . \
	  -args -bench.doc ../BENCHMARKS.md $(BENCHFLAGS)
	$(GO) test -tags $(TAGS) -run '^$$' -bench . -benchtime 2x ./...

clean:
	rm -rf bin

.PHONY: compose-test systemd-test
# systemd-test: vmesh.service under a real systemd (PID 1 of a container):
# start, sandbox, reload, SIGKILL, restart (rules and sockets kept), stop.
systemd-test:
	systemd/container-test.sh all

# compose-test: the four-host docker-compose example end to end (build, up,
# smoke, down; down runs whatever happens). Needs root, docker, docker-compose
# 1.29, debootstrap and tcpdump; see examples/compose/README.md.
compose-test:
	@cd examples/compose && trap './down.sh' EXIT && ./up.sh && ./smoke.sh
