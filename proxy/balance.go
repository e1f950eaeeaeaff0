package proxy

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmesh/vmesh/balance"
	"github.com/vmesh/vmesh/internal/mux"
)

// A connection to a service VIP is a connection to the service: HTTP picks
// an endpoint per request, TCP per connection, from a balancer per service
// (package balance: power of two choices over peak-EWMA latency and load),
// refreshed whenever Catalog.Endpoints' generation changes. Only healthy
// endpoints of live hosts that can be reached through the mesh are picked.
// An attempt that fails before the app saw anything (connect error, the
// peer refused the stream) moves to another endpoint, up to
// balancedAttempts endpoints.

// balancedAttempts bounds the endpoints one connection or request tries.
const balancedAttempts = 3

// svcBalancer is one service's balancer and the endpoints it picks among.
type svcBalancer struct {
	b   *balance.Balancer
	mu  sync.Mutex // held while refreshing
	cur atomic.Pointer[balancedSet]
}

type balancedSet struct {
	gen uint64
	eps map[string]Endpoint // by balance key
}

func endpointKey(ep Endpoint) string { return ep.Node + "/" + ep.Service }

// balancerFor returns service's balancer, refreshed to the catalog's
// current endpoints.
func (p *Proxy) balancerFor(service string) *svcBalancer {
	v, ok := p.balancers.Load(service)
	if !ok {
		v, _ = p.balancers.LoadOrStore(service, &svcBalancer{b: balance.New(balance.Options{})})
	}
	sb := v.(*svcBalancer)
	eps, gen := p.opts.Catalog.Endpoints(service)
	if cur := sb.cur.Load(); cur != nil && cur.gen == gen {
		return sb
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if cur := sb.cur.Load(); cur != nil && cur.gen == gen {
		return sb
	}
	set := &balancedSet{gen: gen, eps: make(map[string]Endpoint, len(eps))}
	list := make([]balance.Endpoint, 0, len(eps))
	for _, ep := range eps {
		k := endpointKey(ep)
		set.eps[k] = ep
		list = append(list, balance.Endpoint{Key: k, Weight: ep.Weight, Healthy: ep.Healthy && ep.ProxyAddr.IsValid(), Local: ep.Local})
	}
	sb.b.Update(list)
	sb.cur.Store(set)
	return sb
}

// pickEndpoint picks an endpoint of service for one request or connection,
// skipping those tried already. The choice must be released.
func (p *Proxy) pickEndpoint(service string, tried []string) (Endpoint, *balance.Choice, bool) {
	sb := p.balancerFor(service)
	c, ok := sb.b.Pick(func(k string) bool {
		for _, t := range tried {
			if t == k {
				return true
			}
		}
		return false
	})
	if !ok {
		return Endpoint{}, nil, false
	}
	ep, ok := sb.cur.Load().eps[c.Key]
	if !ok {
		c.Release()
		return Endpoint{}, nil, false
	}
	return ep, c, true
}

// outboundBalancedOpaque carries an opaque connection to a service VIP:
// one endpoint per connection, the least loaded of two; a refused or
// failed stream moves to another endpoint before any byte of the app's
// is relayed.
func (p *Proxy) outboundBalancedOpaque(c net.Conn, r route, peeked []byte) {
	service := r.ep.Service
	var tried []string
	for range balancedAttempts {
		ep, choice, ok := p.pickEndpoint(service, tried)
		if !ok {
			break
		}
		tried = append(tried, choice.Key)
		dst := netip.AddrPortFrom(r.dst.Addr(), ep.Addr.Port())
		start := time.Now()
		if !p.cfg.MultiplexOpaque {
			up, err := p.dialTransport(context.Background(), ep, alpnTransport)
			if err != nil {
				choice.Observe(time.Since(start), err)
			}
			if err != nil {
				choice.Release()
				p.log.Info("connecting to peer proxy failed, trying another endpoint", "service", service, "peer", ep.ProxyAddr, "err", err)
				continue
			}
			p.relayDedicated(c, up, ep, dst, peeked)
			choice.Release()
			return
		}
		st, dialed, err := p.openMuxStream(ep, dst)
		if err != nil || !dialed {
			// A new session's handshake is the peer's cost once, not the
			// service's: only a stream on an open session is measured.
			choice.Observe(time.Since(start), err)
		}
		if err != nil {
			choice.Release()
			p.m.retries.WithLabelValues(dirOutbound, service, "tcp").Inc()
			p.log.Info("opening a stream failed, trying another endpoint", "service", service, "peer", ep.ProxyAddr, "err", err)
			continue
		}
		p.relayMux(c, st, ep, peeked)
		choice.Release()
		return
	}
	p.m.refused.WithLabelValues(dirOutbound, refuseNoEndpoint).Inc()
	p.reportError(slog.LevelWarn, dirOutbound, refuseNoEndpoint, addrKey(r.dst.Addr()), "no endpoint of the service took the connection", "service", service, "tried", tried)
	resetConn(c)
}

var _ = mux.CodeCancel
