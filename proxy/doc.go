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
// Outbound (127.0.0.1:4140): SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST for IPv6)
// gives the destination; a connection whose original destination is its own
// local address was not redirected and is closed. Catalog.Lookup decides:
//   - unknown address (or an Endpoint without ProxyAddr): plain TCP
//     passthrough, spliced by the kernel, counted with tls="no_identity"; or
//     closed when Config.OutboundUnknown is "deny".
//   - meshed endpoint on an opaque port (Endpoint.Opaque, Protocol "opaque"
//     or Config.OpaquePorts): by default mTLS to Endpoint.ProxyAddr with
//     ALPN "vmesh.transport/v1", a transport header (header.go: preface, u32
//     length, tag-length-value fields, at most 1 KiB), then the bytes. With
//     Config.MultiplexOpaque: one HTTP/2 stream on the same pooled mTLS
//     connections as HTTP (below), no handshake per connection: a POST with
//     vmesh-opaque: 1 and vmesh-dst-port whose body is what the app sends
//     and whose response body (after a 200 sent at once, every write
//     flushed) is what the service sends (stream.go). The app's half-close
//     ends the request body; the service's EOF ends the response and the
//     stream (a service that half-closes and keeps reading loses later
//     bytes). Any other answer closes the app connection. These streams
//     are TCP connections in the metrics, never requests.
//   - otherwise one detection read (up to 1 KiB, Config.DetectTimeout):
//     HTTP/1 or HTTP/2 requests are proxied one by one over pooled,
//     multiplexed HTTP/2 (ALPN "h2") mTLS connections, one pool per (peer
//     proxy, service identity; unused for 5 minutes or beyond 4096 pools,
//     least recently used first, a pool is dropped with its idle
//     connections), with the original protocol in
//     l5d-orig-proto and the target port in vmesh-dst-port; anything else,
//     or silence until the timeout (a server that speaks first), goes opaque.
//     HTTP/1 Upgrade requests (WebSocket) take the transport connection:
//     mTLS with ALPN "vmesh.transport/v1", a transport header (header.go:
//     preface, u32 length, tag-length-value fields, at most 1 KiB) with
//     protocol http1, then raw bytes. Config.RequestTimeout (off
//     by default) bounds each request to the end of its response: 504 with
//     l5d-proxy-error, or a cut stream.
//
// Every mTLS client handshake sends SNI = Endpoint.Service and fails unless
// the server's SPIFFE ID is exactly Endpoint.Identity. TLS 1.3 only, session
// tickets resumed through a shared LRU session cache, X25519MLKEM768 then
// X25519 (see curvePreferences), 16 KiB records from the first byte.
//
// Inbound (0.0.0.0:4143): a connection redirected from a service port is an
// unmeshed client, authorized with no identity (all-authenticated and allow
// lists refuse it) and sent to its original destination. On a declared
// service port that is not opaque (LocalService.Protocol "opaque" or
// Config.OpaquePorts) the protocol is detected as outbound ("http1" and
// "http2" skip detection and assume it): HTTP is then served per request
// like meshed HTTP (tls="no_identity" request metrics, 403 with
// l5d-proxy-error when denied, the connection stays open); anything else,
// and any undeclared port, is authorized once and relayed as TCP, closed
// when denied. A direct connection must complete mTLS with a valid SVID
// (VerifyPeer); by ALPN it then carries HTTP/2 requests (each authorized,
// 403 with l5d-proxy-error when denied) and opaque streams (authorized as
// TCP; 403 when denied or the port is not declared, 502 when the service
// is unreachable), or one transport header whose port must be a declared
// LocalService, else the connection is closed: the inbound proxy is never a
// relay to arbitrary ports.
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
// would otherwise deny (also counted in _allow_total); tcp_refused_total{direction,reason} for
// connections refused before authorization. Label values come from declared
// services, issued identities and constants, never from addresses.
//
// # Use from node
//
//	p, err := proxy.New(cfg.Proxy, proxy.Options{
//		Catalog:    catalogAdapter,   // required: Lookup(netip.AddrPort) (Endpoint, bool)
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
