package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"
)

// Dialer opens outgoing connections. *net.Dialer implements it.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Options are the proxy's dependencies.
type Options struct {
	// Catalog resolves outbound destinations. Required.
	Catalog Catalog
	// Identity supplies certificates and the trust bundle. Required.
	Identity Identity
	// VerifyPeer verifies peer certificate chains and returns the SPIFFE ID.
	// Optional: nil means VerifyPeerWithRoots(Identity.Roots,
	// Identity.TrustDomain()).
	VerifyPeer VerifyPeerFunc
	// Services are the local services at start; SetServices replaces them.
	// Optional.
	Services []LocalService
	// Dialer opens the proxy's own outgoing connections (to peer proxies,
	// local services and passthrough destinations). These must not be
	// redirected back to the proxy: iptables skips them by owner uid (or by
	// a mark the Dialer sets). Optional: nil means a net.Dialer.
	Dialer Dialer
	// Logger is the proxy's logger. Optional: nil discards.
	Logger *slog.Logger
	// Listen binds the proxy's listeners by name ("outbound",
	// "outbound6", "inbound"); nil binds them with net.Listen. The agent
	// passes listeners kept across a restart (systemd's fd store).
	Listen func(name, network, addr string) (net.Listener, error)
	// Registerer receives the proxy's metrics. Optional: nil registers
	// nothing (metrics are still counted).
	Registerer prometheus.Registerer
}

// Proxy is the inbound and outbound proxy of one host.
type Proxy struct {
	cfg      Config
	opts     Options
	log      *slog.Logger
	errLog   *log.Logger
	m        *metrics
	dialer   Dialer
	routes   routeTable
	warns    *warnLimiter // refusals logged at warn, once per (reason, address) per minute
	sessions tls.ClientSessionCache
	svcs     atomic.Pointer[services]

	serverTLS  *tls.Config
	h1         *http.Server             // the base configuration of h2
	h2         *http2.Server            // serves h2 (from apps and from peer proxies)
	tlsConfigs clientConfigs            // client TLS configurations to peer proxies
	muxes      *muxPool                 // mux sessions to peer proxies (opaque streams)
	balancers  sync.Map                 // service name -> *svcBalancer (balance.go)
	policies   atomic.Pointer[policies] // client policies by service (clientpolicy.go)
	local      *localTransports

	// The lean HTTP/1 path (h1.go): keep-alive connections to peer proxies
	// and to local services, and the connections it serves.
	h1peers *upPool
	h1local *upPool
	h1conns sync.Map      // *h1Conn -> struct{}
	drain   atomic.Bool   // Shutdown began: HTTP/1 connections close after their response
	h1stop  chan struct{} // closed by Close: ends sweepSlowH1
	// The lean path's keep-alive connections to a peer are mTLS
	// connections of their own while fewer than h1MuxAt requests are
	// under way to peers (h1PeerBusy), and streams of internal/mux
	// sessions from then on: a stream costs a hand-off per response (the
	// session's read loop to the request's goroutine), ~35 % more CPU per
	// request at 1000 req/s, but many requests' writes go out in one
	// system call (flushH1), 15-25 % less CPU per request at 16-64
	// connections (BENCHMARKS.md). h1Mux (tests) takes streams always.
	// Peers always accept such streams.
	h1Mux      bool
	h1PeerBusy atomic.Int32

	// The frame-level HTTP/2 path (h2fwd.go): apps' connections, and
	// connections to local services.
	h2front sync.Map // *h2Conn -> struct{}
	h2local *h2Pool
	h2m     sync.Map // connLabels -> *h2Metrics

	// origDst returns a connection's original destination; a test seam.
	origDst func(*net.TCPConn) (netip.AddrPort, error)

	mu        sync.Mutex
	outLn     net.Listener
	outLn6    net.Listener // [::1] at the outbound port, when IPv6 loopback exists
	inLn      net.Listener
	conns     map[net.Conn]bool // tracked connections: true once handed off (handOff)
	draining  bool
	closed    bool
	connsDone chan struct{} // closed when conns becomes empty while draining
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// Bounds of the HTTP/2 server (see New).
const (
	h2MaxStreams   = 200
	h2StreamWindow = 4 << 20
	h2ConnWindow   = 4 * h2StreamWindow
)

// h1MuxAt: see Proxy.h1Mux.
const h1MuxAt = 4

// New checks cfg and opts and builds a proxy. It starts nothing.
func New(cfg Config, opts Options) (*Proxy, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("creating proxy: %w", err)
	}
	if opts.Catalog == nil {
		return nil, errors.New("creating proxy: Options.Catalog is required")
	}
	if opts.Identity == nil {
		return nil, errors.New("creating proxy: Options.Identity is required")
	}
	p := &Proxy{
		cfg:      cfg,
		opts:     opts,
		log:      opts.Logger,
		dialer:   opts.Dialer,
		routes:   newRouteTable(cfg),
		warns:    newWarnLimiter(time.Minute),
		sessions: tls.NewLRUClientSessionCache(1024),
		conns:    make(map[net.Conn]bool),
		origDst:  originalDst,
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	p.errLog = slog.NewLogLogger(p.log.Handler(), slog.LevelDebug)
	if p.dialer == nil {
		p.dialer = &net.Dialer{KeepAlive: 30 * time.Second}
	}
	if p.opts.VerifyPeer == nil {
		p.opts.VerifyPeer = VerifyPeerWithRoots(opts.Identity.Roots, opts.Identity.TrustDomain())
	}
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, fmt.Errorf("creating proxy: registering metrics: %w", err)
	}
	p.m = m
	if err := p.SetServices(opts.Services); err != nil {
		return nil, fmt.Errorf("creating proxy: %w", err)
	}
	p.serverTLS = p.serverTLSConfig()
	p.h1 = &http.Server{
		Handler:           http.HandlerFunc(p.serveRequest),
		ConnContext:       connContext,
		ReadHeaderTimeout: cfg.DetectTimeout,
		ErrorLog:          p.errLog,
	}
	// HTTP/2 between proxies (and from apps) is bounded like ztunnel's
	// server: h2MaxStreams concurrent streams a connection, h2StreamWindow
	// per stream and a connection window of 4x that (equal windows can
	// deadlock when one stream fills the shared window). A peer cannot make
	// the proxy buffer more than h2ConnWindow per connection.
	p.h2 = &http2.Server{MaxConcurrentStreams: h2MaxStreams, MaxUploadBufferPerStream: h2StreamWindow, MaxUploadBufferPerConnection: h2ConnWindow}
	if err := http2.ConfigureServer(p.h1, p.h2); err != nil {
		return nil, fmt.Errorf("creating proxy: %w", err)
	}
	p.muxes = newMuxPool(p)
	p.local = newLocalTransports(p)
	p.h1peers = newUpPool(h1PeerIdle, 256)
	p.h1local = newUpPool(h1LocalIdle, 256)
	p.h2local = newH2Pool(p)
	p.h1stop = make(chan struct{})
	return p, nil
}

// SetServices atomically replaces the local services. Connections already
// established keep the service they were authorized for. It is safe to call
// at any time, e.g. on reload.
func (p *Proxy) SetServices(list []LocalService) error {
	s, err := buildServices(list, p.cfg.DefaultPolicy)
	if err != nil {
		return fmt.Errorf("setting local services: %w", err)
	}
	p.svcs.Store(s)
	return nil
}

func (p *Proxy) localService(port uint16) (*localService, bool) {
	s, ok := p.svcs.Load().byPort[port]
	return s, ok
}

// Listen binds the outbound and inbound listeners. node reports ready only
// after it returns nil.
func (p *Proxy) Listen() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return errors.New("listening: proxy closed")
	}
	if p.outLn != nil {
		return nil
	}
	listen := p.opts.Listen
	if listen == nil {
		listen = func(_, network, addr string) (net.Listener, error) { return net.Listen(network, addr) }
	}
	out, err := listen("outbound", "tcp", p.cfg.OutboundAddr.String())
	if err != nil {
		return fmt.Errorf("listening for outbound connections: %w", err)
	}
	in, err := listen("inbound", "tcp", p.cfg.InboundAddr.String())
	if err != nil {
		out.Close()
		return fmt.Errorf("listening for inbound connections: %w", err)
	}
	p.outLn, p.inLn = out, in
	// ip6tables redirects a host's IPv6 connections to [::1] at the same
	// port: listen there too, or they would be refused. A host without IPv6
	// loopback has no IPv6 connections to redirect.
	if p.cfg.OutboundAddr.Addr() == netip.AddrFrom4([4]byte{127, 0, 0, 1}) {
		if out6, err := listen("outbound6", "tcp6", netip.AddrPortFrom(netip.IPv6Loopback(), p.cfg.OutboundAddr.Port()).String()); err == nil {
			p.outLn6 = out6
		} else {
			p.log.Debug("no IPv6 outbound listener", "err", err)
		}
	}
	return nil
}

// OutboundAddr and InboundAddr return the bound listener addresses (useful
// when the configured port is 0 in tests). Valid after Listen.
func (p *Proxy) OutboundAddr() netip.AddrPort { return addrOf(p.outLn) }

// InboundAddr returns the inbound listener's address. Valid after Listen.
func (p *Proxy) InboundAddr() netip.AddrPort { return addrOf(p.inLn) }

func addrOf(ln net.Listener) netip.AddrPort {
	if ln == nil {
		return netip.AddrPort{}
	}
	ap, _ := netip.ParseAddrPort(ln.Addr().String())
	return ap
}

// Run is Listen (if not done yet) followed by Serve.
func (p *Proxy) Run(ctx context.Context) error {
	if err := p.Listen(); err != nil {
		return err
	}
	return p.Serve(ctx)
}

// Serve accepts connections until Shutdown or Close, or until ctx is done,
// which closes the proxy. Listen must have succeeded.
func (p *Proxy) Serve(ctx context.Context) error {
	p.mu.Lock()
	out, out6, in := p.outLn, p.outLn6, p.inLn
	p.mu.Unlock()
	if out == nil {
		return errors.New("serving: Listen has not succeeded")
	}
	stop := context.AfterFunc(ctx, func() { p.Close() })
	defer stop()
	errc := make(chan error, 3)
	loops := 2
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.sweepSlowH1(p.h1stop)
	}()
	go func() { errc <- p.acceptLoop(out, p.handleOutbound) }()
	go func() { errc <- p.acceptLoop(in, p.handleInbound) }()
	if out6 != nil {
		loops++
		go func() { errc <- p.acceptLoop(out6, p.handleOutbound) }()
	}
	var errs []error
	for range loops {
		if err := <-errc; err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, http.ErrServerClosed) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (p *Proxy) acceptLoop(ln net.Listener, handle func(*net.TCPConn)) error {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Anything else (EMFILE, ENFILE, ENOBUFS, a timeout) is
			// temporary: a listener that stopped accepting would leave
			// the rules sending the host's connections into a full
			// backlog.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			p.log.Warn("accepting connections", "addr", ln.Addr(), "err", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		tc := c.(*net.TCPConn)
		if !p.track(tc) {
			tc.Close()
			continue
		}
		go func() {
			handle(tc)
			p.handlerDone(tc)
		}()
	}
}

// track registers an accepted connection so shutdown can close it.
func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[c] = false
	p.wg.Add(1)
	return true
}

// handOff takes an accepted connection from its handler: a relay that
// outlives the handler's goroutine (relayStream) calls untrack itself when
// it ends.
func (p *Proxy) handOff(c net.Conn) {
	p.mu.Lock()
	if _, ok := p.conns[c]; ok {
		p.conns[c] = true
	}
	p.mu.Unlock()
}

// handlerDone untracks an accepted connection when its handler returns,
// unless the handler handed it off.
func (p *Proxy) handlerDone(c net.Conn) {
	p.mu.Lock()
	handedOff := p.conns[c]
	p.mu.Unlock()
	if !handedOff {
		p.untrack(c)
	}
}

func (p *Proxy) untrack(c net.Conn) {
	c.Close()
	p.mu.Lock()
	if _, ok := p.conns[c]; !ok {
		p.mu.Unlock()
		return
	}
	delete(p.conns, c)
	if p.draining && len(p.conns) == 0 && p.connsDone != nil {
		close(p.connsDone)
		p.connsDone = nil
	}
	p.mu.Unlock()
	p.wg.Done()
}

// Shutdown stops accepting, lets established connections finish until ctx
// is done, then closes what is left. HTTP connections are told to go away
// (GOAWAY, Connection: close) as soon as their current requests finish.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.draining = true
	p.closeListenersLocked()
	done := make(chan struct{})
	if len(p.conns) == 0 {
		close(done)
	} else {
		p.connsDone = done
	}
	p.mu.Unlock()
	// Graceful HTTP: idle HTTP/1 connections close, h2 connections get GOAWAY.
	// http.Server.Shutdown only tracks the HTTP/1 conns it accepted itself.
	go p.h1.Shutdown(ctx)
	p.muxes.closeIdle()
	p.drain.Store(true)
	p.closeIdleH1()
	p.drainH2()
	p.h2local.closeIdle()
	p.h1peers.closeIdle()
	p.h1local.closeIdle()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = fmt.Errorf("shutting down proxy: %w", ctx.Err())
	}
	p.Close()
	return err
}

func (p *Proxy) closeListenersLocked() {
	if p.outLn != nil {
		p.outLn.Close()
	}
	if p.outLn6 != nil {
		p.outLn6.Close()
	}
	if p.inLn != nil {
		p.inLn.Close()
	}
}

// Close stops the listeners and closes every connection at once, then waits
// for their goroutines. It is idempotent.
func (p *Proxy) Close() error {
	p.closeOnce.Do(func() {
		p.mu.Lock()
		p.closed = true
		p.closeListenersLocked()
		conns := make([]net.Conn, 0, len(p.conns))
		for c := range p.conns {
			conns = append(conns, c)
		}
		p.mu.Unlock()
		p.h1.Close()
		for _, c := range conns {
			c.Close()
		}
		p.muxes.close()
		p.local.close()
		p.h1peers.close()
		p.h1local.close()
		p.h2local.close()
		close(p.h1stop)
	})
	p.wg.Wait()
	return nil
}

// dial opens a TCP connection with the connect timeout.
func (p *Proxy) dial(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	defer cancel()
	return p.dialer.DialContext(ctx, "tcp", addr.String())
}

// peekedConn replays bytes read during detection before reading from Conn.
// done is closed when the connection is closed, so the handler that pushed
// it to the HTTP/1 server can wait for the server to finish with it.
type peekedConn struct {
	net.Conn
	peeked []byte
	buf    *[]byte // pooled buffer holding peeked; returned on Close
	info   *connInfo
	once   sync.Once
	done   chan struct{}
}

func (c *peekedConn) Read(b []byte) (int, error) {
	if len(c.peeked) > 0 {
		n := copy(b, c.peeked)
		c.peeked = c.peeked[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

func (c *peekedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.done) })
	return err
}

// CloseWrite half-closes the underlying connection.
func (c *peekedConn) CloseWrite() error {
	if cw, ok := c.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return nil
}

// connInfo is what the proxy knows about an accepted connection; HTTP
// handlers find it in the request context.
type connInfo struct {
	route    route  // the connection's route
	clientID string // from a peer proxy: the verified client identity
}

type connInfoKey struct{}

func connContext(ctx context.Context, c net.Conn) context.Context {
	if pc, ok := c.(*peekedConn); ok {
		return context.WithValue(ctx, connInfoKey{}, pc.info)
	}
	return ctx
}

func infoFrom(ctx context.Context) *connInfo {
	ci, _ := ctx.Value(connInfoKey{}).(*connInfo)
	return ci
}

// writeAll writes b to w; used to replay peeked bytes.
func writeAll(w io.Writer, b []byte) error {
	_, err := w.Write(b)
	return err
}
