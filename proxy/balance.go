package proxy

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"slices"
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

// svcBalancer is one service's balancer, its retry budget and the
// endpoints it picks among.
type svcBalancer struct {
	b      *balance.Balancer
	budget *balance.Budget
	mu     sync.Mutex // held while refreshing
	cur    atomic.Pointer[balancedSet]
}

// balancedSet is the service's endpoints for one catalog generation and
// one client policy.
type balancedSet struct {
	gen    uint64
	pol    *ServicePolicy
	eps    map[string]Endpoint // by balance key
	subset map[string]int      // balance key -> index of its subset in pol.Split, -1: none
	live   []bool              // pol.Split[i] has a healthy endpoint
}

func endpointKey(ep Endpoint) string { return ep.Node + "/" + ep.Service }

// balancerFor returns service's balancer and its endpoints, refreshed to
// the catalog's current endpoints and the current policy.
func (p *Proxy) balancerFor(service string) (*svcBalancer, *balancedSet) {
	v, ok := p.balancers.Load(service)
	if !ok {
		v, _ = p.balancers.LoadOrStore(service, &svcBalancer{b: balance.New(balance.Options{}), budget: balance.NewBudget(balance.BudgetOptions{})})
	}
	sb := v.(*svcBalancer)
	eps, gen := p.opts.Catalog.Endpoints(service)
	pol := p.policy(service)
	if cur := sb.cur.Load(); cur != nil && cur.gen == gen && cur.pol == pol {
		return sb, cur
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if cur := sb.cur.Load(); cur != nil && cur.gen == gen && cur.pol == pol {
		return sb, cur
	}
	set := &balancedSet{gen: gen, pol: pol, eps: make(map[string]Endpoint, len(eps)), subset: make(map[string]int, len(eps))}
	if pol != nil {
		set.live = make([]bool, len(pol.Split))
	}
	list := make([]balance.Endpoint, 0, len(eps))
	for _, ep := range eps {
		k := endpointKey(ep)
		set.eps[k] = ep
		healthy := ep.Healthy && ep.ProxyAddr.IsValid()
		set.subset[k] = -1
		if pol != nil {
			for i, sub := range pol.Split {
				if inSubset(ep.Labels, sub.Labels) {
					set.subset[k] = i
					set.live[i] = set.live[i] || healthy
					break
				}
			}
		}
		list = append(list, balance.Endpoint{Key: k, Weight: ep.Weight, Healthy: healthy, Local: ep.Local})
	}
	sb.b.Update(list)
	sb.cur.Store(set)
	return sb, set
}

// pickEndpoint picks an endpoint of service for one request or connection,
// skipping those tried already: within a subset drawn by the split's
// weights when the service has one, else among all. The choice must be
// released.
func (p *Proxy) pickEndpoint(service string, tried []string) (Endpoint, *balance.Choice, bool) {
	sb, set := p.balancerFor(service)
	sub := set.pol.pickSubset(set)
	if len(tried) == 0 {
		sb.budget.Request()
	}
	c, ok := sb.b.Pick(func(k string) bool {
		if sub >= 0 && set.subset[k] != sub {
			return true
		}
		for _, t := range tried {
			if t == k {
				return true
			}
		}
		return false
	})
	if !ok && sub >= 0 {
		// The drawn subset's endpoints were all tried: any other may take
		// the retry.
		c, ok = sb.b.Pick(func(k string) bool { return slices.Contains(tried, k) })
	}
	if !ok {
		return Endpoint{}, nil, false
	}
	ep, ok := set.eps[c.Key]
	if !ok {
		c.Release()
		return Endpoint{}, nil, false
	}
	return ep, c, true
}

// mayRetry spends one retry of service's budget; false (counted) when the
// budget is spent.
func (p *Proxy) mayRetry(service, proto string) bool {
	sb, _ := p.balancerFor(service)
	if sb.budget.Retry() {
		return true
	}
	p.m.budgetExhausted.WithLabelValues(service, proto).Inc()
	return false
}

// endpointDone records one request or connection to a balanced endpoint:
// its latency and outcome in the balancer and the per-endpoint metrics.
func (p *Proxy) endpointDone(service string, c *balance.Choice, latency time.Duration, err error) {
	c.Observe(latency, err)
	_, set := p.balancerFor(service)
	ep := set.eps[c.Key]
	result := "success"
	if err != nil {
		result = "failure"
	}
	p.m.endpointRequests.WithLabelValues(service, ep.Node, set.pol.subsetName(set.subset[c.Key]), result).Inc()
	if err == nil {
		p.m.endpointLatency.WithLabelValues(service, ep.Node).Observe(float64(latency) / float64(time.Millisecond))
	}
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
				p.endpointDone(service, choice, time.Since(start), err)
				choice.Release()
				p.log.Info("connecting to peer proxy failed, trying another endpoint", "service", service, "peer", ep.ProxyAddr, "err", err)
				if !p.mayRetry(service, "tcp") {
					break
				}
				p.m.retries.WithLabelValues(dirOutbound, service, "tcp", "connect").Inc()
				continue
			}
			p.endpointDone(service, choice, time.Since(start), nil)
			p.relayDedicated(c, up, ep, dst, peeked)
			choice.Release()
			return
		}
		st, dialed, err := p.openMuxStream(ep, dst)
		if err != nil || !dialed {
			// A new session's handshake is the peer's cost once, not the
			// service's: only a stream on an open session is measured.
			p.endpointDone(service, choice, time.Since(start), err)
		}
		if err != nil {
			choice.Release()
			p.log.Info("opening a stream failed, trying another endpoint", "service", service, "peer", ep.ProxyAddr, "err", err)
			if !p.mayRetry(service, "tcp") {
				break
			}
			p.m.retries.WithLabelValues(dirOutbound, service, "tcp", "connect").Inc()
			continue
		}
		p.relayMux(c, st, ep, peeked, choice.Release)
		return
	}
	p.m.refused.WithLabelValues(dirOutbound, refuseNoEndpoint).Inc()
	p.reportError(slog.LevelWarn, dirOutbound, refuseNoEndpoint, addrKey(r.dst.Addr()), "no endpoint of the service took the connection", "service", service, "tried", tried)
	resetConn(c)
}

var _ = mux.CodeCancel
