// Package proxy is vmesh's data path: the outbound listener that receives the
// host's redirected TCP connections and the inbound listener that peer proxies
// dial with mTLS. It owns original-destination lookup, protocol detection,
// the transport header between proxies, authorization and the golden
// metrics. It learns about the mesh and its certificates only through the
// small interfaces it declares (Catalog, Identity, VerifyPeerFunc), which
// node fills in.
//
// # Connections
//
// Every connection's route is decided once, as a value, by a pure function
// (route.go: routeTable.outbound, inboundRedirected, peer) of the original
// destination, what the catalog says it is or the local service at its
// port, the configuration and the detected protocol; one handler per route
// kind carries it out (serveRoute). Whether a port is opaque is decided
// there only (Config.IsOpaque: protocol "opaque", a port its host declared
// opaque, or Config.OpaquePorts).
//
// Outbound (127.0.0.1:4140): SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST for IPv6)
// gives the destination; a connection whose original destination is its own
// local address was not redirected and is closed. Catalog.Resolve decides:
//   - DestUnknown (never part of the mesh): plain TCP passthrough, spliced
//     by the kernel, counted with tls="no_identity"; or closed when
//     Config.OutboundUnknown is "deny".
//   - DestMeshHost (a mesh host's address with no meshed service at that
//     port, or whose entry is gone), or an endpoint without a proxy
//     address: refused, never passed through in clear; counted in
//     tcp_refused_total{reason="mesh_host"} and logged at warn once per
//     (reason, address) per minute.
//   - DestService (a service VIP): balanced (balance.go): HTTP picks an
//     endpoint per request, TCP per connection, with package balance; a
//     failed connect, a refused stream or a 502/503 from the peer for a
//     replayable request moves to another endpoint (balancer_retries_total).
//     A VIP of no service, or a port it does not serve, is refused.
//   - DestEndpoint on an opaque port: by default (Config.MultiplexOpaque)
//     one stream of internal/mux on a pooled mTLS connection to
//     Endpoint.ProxyAddr (ALPN "vmesh.mux/1", mux.go): HEADERS carries the
//     transport header (header.go: preface, u32 length, tag-length-value
//     fields, at most 1 KiB), the peer accepts the stream once it reached
//     the service or resets it (the app connection is then reset), END_STREAM
//     is a FIN in each direction on its own, a reset is a reset both ways.
//     Streams to a peer are spread over up to one session per core (a
//     session encrypts on one core at a time). Each side of a relay is one
//     goroutine, started fresh once the handler is done (its stack stays
//     small), that waits on the TCP socket holding no buffer; the stream's
//     bytes are written to the socket by the session's read loop (what one
//     read of the peer connection brought, in one writev), or by a
//     goroutine that lives only while the socket is full (mux.Stream.Sink).
//     A mux.Wire under each mux connection's TLS sends a flush's records
//     in one write.
//     Without multiplexing: a dedicated mTLS connection (ALPN
//     "vmesh.transport/v1"), the transport header, then the bytes. Both are
//     TCP connections in the metrics, never requests.
//   - DestEndpoint otherwise: one detection read (up to 1 KiB,
//     Config.DetectTimeout); anything but HTTP, or silence until the
//     timeout (a server that speaks first), goes opaque as above.
//
// HTTP/1 takes the lean path (h1.go): one goroutine per app connection
// reads a request (heads parsed in place, h1parse.go), takes a pooled
// HTTP/1.1 keep-alive mTLS connection to the peer proxy (ALPN
// "vmesh.h1/1"; one pool per (peer proxy, service, identity), idle ones
// closed after 90 s, at most 256 idle per key), writes the request with
// Vmesh-Dst-Port (and L5d-Orig-Proto for HTTP/1.0 clients), reads the
// response and writes it back; no other goroutine is involved unless a
// request body has not arrived whole (it is then copied alongside, so
// 100-continue and early responses work). Head and body go out in one
// write when both are ready; writes are flushed when the source has
// nothing more buffered. Pipelining, keep-alive (HTTP/1.0 keep-alive too),
// chunked bodies with trailers, 1xx, HEAD, bodies of any size with
// back-pressure are relayed as they are; hop-by-hop fields (and those
// Connection names) are dropped; bodies of unknown length are chunked on
// the hop between proxies and decoded for HTTP/1.0 clients. A request a
// second parser could read differently is refused before it is forwarded,
// counted in http_rejected_total{direction, reason} and answered with
// l5d-proxy-error and Connection: close: 400 for Content-Length with
// Transfer-Encoding, differing or malformed Content-Lengths, obs-fold,
// whitespace before a colon, a bare CR, a Transfer-Encoding not ending in
// (exactly one) chunked, chunked in HTTP/1.0, malformed chunks, a missing
// or repeated Host; 501 for other transfer codings; 431 for heads beyond
// 32 KiB or 256 fields; 405 for CONNECT. An Upgrade request (WebSocket)
// rides the same pooled connection; after a 101 the bytes flow as they are
// both ways (the connection leaves the pool), counted as a TCP connection.
// A pooled connection idle for a second is checked (a non-blocking peek)
// before use; one found closed under a request is replaced and the request
// sent again only if it is replayable (no body; GET, HEAD, OPTIONS, TRACE
// or an idempotency key). A client that goes away while its response takes
// more than a second is noticed (a read-ahead started by a sweeper) and
// its upstream connection closed, so the service sees the request
// canceled. Local services are reached over their own keep-alive pool
// (idle ones closed after 30 s).
// HTTP/2 from an app (prior knowledge: gRPC, h2c) is forwarded frame by
// frame (h2fwd.go, h2out.go), never through net/http: the app's connection
// is served by one goroutine reading frames (h2Conn, server role); each
// request becomes a stream of its own on a pooled "vmesh.mux/1" session to
// the peer proxy (transport header protocol h2stream, balanced per
// request), carrying the request's header block, body and trailers as
// messages (h2msg.go) and the response's back; the request's first frames
// leave with the stream's open in one write. The peer authorizes each
// request, checks its fields, and opens a stream for it on a pooled HTTP/2
// connection to the service (h2Conn, client role; idle ones closed after
// 30 s); a small request that is all there is handled in the mux read loop
// itself, and so is a small response that is all there once the read that
// brought its first bytes is handled: its frames are written to the app
// when its connection's write lock is free and its windows take the body,
// the responses of one read flushed together without waiting for the
// socket (what it does not take is written by a goroutine; the read loop
// never waits on an app). Flow control is end to end: a side gets stream credit back once
// its bytes are in the next hop (256 KiB stream windows, connection credit
// at once), so a stream whose reader stops holds back only itself. Frames
// that arrive together leave together (a response's head, body and
// trailers in one mux frame; a read batch's writes corked into one flush;
// PING and SETTINGS acks ride the next write, 1 ms at most). Requests HTTP/2
// forbids (connection-specific fields, TE other than trailers, a missing
// pseudo-header) are reset with PROTOCOL_ERROR; CONNECT gets 405. A
// service's RST_STREAM(NO_ERROR) after its whole response (it wants no more
// of the body) keeps the response. Resets pass through with their codes
// (REFUSED_STREAM stays retryable for gRPC). Shutdown sends GOAWAY and
// closes the connection once its streams are done.
// The sockets of these paths (app connections, the service pools, the
// connections between proxies beneath their TLS) are read and written with
// raw system calls (internal/rawsock): no entersyscall, and no futex
// wake-up of the runtime's sysmon thread by the first system call after
// every idle spell, which cost an agent 8-15 % of its CPU at low request
// rates.
// HTTP/2 that is not forwarded so (an unmeshed client's, redirected
// inbound; a peer's "h2" connection) is served by x/net/http2 with a
// batching writer goroutine per connection (h2conn.go): x/net/http2
// flushes after every frame, the writer sends all that was queued
// meanwhile in one write, at most 256 KiB queued per connection before
// writers wait. That server allows 200 concurrent streams, 4 MiB stream
// and 16 MiB connection windows.
// Config.RequestTimeout (off by default) bounds each outbound request to
// the end of its response: 504 with l5d-proxy-error, or a cut connection
// once the response began; a peer that cannot be reached or fails gets
// 502 with l5d-proxy-error.
//
// Every mTLS client handshake sends SNI = Endpoint.Service and fails unless
// the server's SPIFFE ID is exactly Endpoint.Identity. TLS 1.3 only, session
// tickets resumed through a shared LRU session cache, X25519MLKEM768 then
// X25519 (see curvePreferences), 16 KiB records from the first byte.
//
// Inbound (0.0.0.0:4143): a connection redirected from a service port is an
// unmeshed client, authorized with no identity (all-authenticated and allow
// lists refuse it). A declared service is always reached at its own
// LocalService.Target (default 127.0.0.1:port), never at an address taken
// from the packet; an undeclared port (capture_all_inbound) is reached at
// the address it was sent to, unless that is a loopback address (refused:
// reason "loopback_destination"). On a declared service port that is not
// opaque the protocol is detected as outbound ("http1" and "http2" skip
// detection and assume it): HTTP is then served per request like meshed
// HTTP (tls="no_identity" request metrics, 403 with l5d-proxy-error when
// denied, the connection stays open; HTTP/1 on the lean path with pooled
// keep-alive connections to the service); anything else is authorized
// once and relayed as TCP, closed when denied. A direct connection must
// complete mTLS with a valid SVID (VerifyPeer); by ALPN it then carries
// HTTP/1 requests ("vmesh.h1/1") or HTTP/2 requests ("h2"), each routed by
// its Vmesh-Dst-Port and authorized (403 with l5d-proxy-error when denied
// or the port is not a declared service, 502 when the service cannot be
// reached; a "vmesh.mux/1" stream whose transport header says http1
// carries them the same way, one saying h2stream carries one HTTP/2
// request), opaque streams (authorized as TCP; 403 when
// denied or the port is not declared, 502 when the service is
// unreachable), or one
// transport header whose port must be a declared LocalService, else the
// connection is closed: the inbound proxy is never a relay to arbitrary
// ports.
//
// Authorization is an in-memory lookup per LocalService: Policy (or
// Config.DefaultPolicy) plus Allow patterns ("*" one segment, trailing "**"
// any rest); audit allows, logs and counts what it would deny.
//
// # Metrics
//
// Linkerd's names: request_total, response_total (+status_code,
// classification; gRPC grpc-status counts, and a gRPC response without one
// is a failure), response_latency_ms (Linkerd
// buckets), tcp_open_total, tcp_close_total, tcp_open_connections,
// tcp_read_bytes_total / tcp_write_bytes_total (bytes read from / written to
// the accepted connection), with labels direction, service, client_id
// (inbound), server_id (outbound), tls; inbound_{http,tcp}_authz_allow_total
// and _deny_total (+reason); inbound_authz_audit_total{protocol="http"|"tcp",
// service, client_id, tls, reason} for what the audit policy let in but
// would otherwise deny (also counted in _allow_total);
// tcp_refused_total{direction, reason} for connections refused before
// authorization; http_rejected_total{direction, reason} for HTTP/1
// requests refused as malformed or ambiguous. Label values come from
// declared services, issued identities and constants, never from
// addresses.
//
// # Errors where the user looks
//
// Every failure a user notices is counted in proxy_errors_total{direction,
// reason} and logged on the host that saw it, once per (reason, peer) per
// minute (errlog.go; the same limiter as the refusals above): policy
// denials (denied, info, naming service and client), route refusals (the
// tcp_refused_total reasons), detection timeouts (detect_timeout: no byte
// from the client within Config.DetectTimeout, the sign of a server-first
// protocol on a port that is not opaque), connect failures (connect:
// passthrough, peer proxy, local service), bad_gateway, unavailable and
// request_timeout answers, and peer_refused on the CLIENT host when the
// peer proxy resets a mux stream or answers an HTTP/1 request with
// l5d-proxy-error (denied by its policy, no such port, the service down;
// logged once per peer and service a minute).
//
// # Tap and ping
//
// Proxy.Tap subscribes to a filtered live stream of TapEvents: each HTTP
// request when it ends (method, authority, path, status, latency, bytes,
// identities) and each TCP connection's open and close (bytes, duration).
// When nobody taps the cost is one atomic load per request or connection;
// each subscriber has a bounded queue that drops (and counts) when full.
// Proxy.Ping makes one mTLS round trip (ALPN "vmesh.ping/1": 16 bytes
// echoed) to a peer proxy that must present the expected identity; the
// inbound side answers only clients that completed mTLS with a valid SVID.
//
// # Use from node
//
//	p, err := proxy.New(cfg.Proxy, proxy.Options{
//		Catalog:    catalogAdapter,   // required: Resolve(netip.AddrPort) Destination, Endpoints(service)
//		Identity:   caClientAdapter,  // required: GetCertificate, GetClientCertificate, Roots, TrustDomain
//		VerifyPeer: ca.VerifyPeer,    // optional: default checks Roots() and the trust domain
//		Services:   localServices,    // optional: the declared services at start
//		Logger:     log.With("component", "proxy"),
//		Registerer: registry,
//		// Dialer: optional; the proxy's own sockets must escape the OUTPUT
//		// redirect (the rules exempt the proxy's uid).
//	})
//	err = p.Listen()              // binds both listeners; report ready after this
//	go p.Serve(ctx)               // returns when ctx is done (closes) or after Shutdown/Close
//	err = p.SetServices(updated)  // on reload: atomic swap, established connections stay
//	err = p.Shutdown(drainCtx)    // on SIGTERM: stop accepting, drain, then close the rest
//	p.Close()                     // idempotent; closes everything now
package proxy
