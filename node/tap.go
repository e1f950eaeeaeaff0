package node

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vmesh/vmesh/ca"
	"github.com/vmesh/vmesh/proxy"
)

// Tap and ping on the control socket (`vmesh tap`, `vmesh top`, `vmesh
// ping`): GET /v1/tap streams the proxy's tap as NDJSON, POST /v1/ping makes
// one mTLS round trip to each endpoint of a service or to a node's proxy.

// TapLine is one line of the /v1/tap stream: an event, or (Kind
// "dropped") the number of events dropped so far because the reader was
// slow.
type TapLine struct {
	proxy.TapEvent
	Dropped uint64 `json:"dropped,omitempty"`
}

// TapDropped is the Kind of a TapLine that counts drops.
const TapDropped = "dropped"

// tapQuery reads a TapFilter from the query: service, direction, identity,
// path (a prefix) and method.
func tapQuery(r *http.Request) (proxy.TapFilter, error) {
	q := r.URL.Query()
	f := proxy.TapFilter{
		Service: q.Get("service"), Direction: q.Get("direction"), Identity: q.Get("identity"),
		PathPrefix: q.Get("path"), Method: q.Get("method"),
	}
	if f.Direction != "" && f.Direction != "inbound" && f.Direction != "outbound" {
		return f, fmt.Errorf("direction must be inbound or outbound, got %q", f.Direction)
	}
	return f, nil
}

// serveTap streams the tap until the client goes away.
func (a *Agent) serveTap(w http.ResponseWriter, r *http.Request) {
	if a.phase.Load() < phaseProxy || a.prx == nil {
		writeError(w, http.StatusServiceUnavailable, errors.New("the proxy is not running yet"))
		return
	}
	f, err := tapQuery(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	sub := a.prx.Tap(f, 0)
	defer sub.Close()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	rc.Flush()
	enc := json.NewEncoder(w)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var reported uint64
	for {
		select {
		case <-r.Context().Done():
			return
		case ev, ok := <-sub.Events():
			if !ok {
				return
			}
			if enc.Encode(TapLine{TapEvent: ev}) != nil {
				return
			}
			// Write what is queued, then flush once.
			for n := len(sub.Events()); n > 0; n-- {
				if enc.Encode(TapLine{TapEvent: <-sub.Events()}) != nil {
					return
				}
			}
		case <-tick.C:
			if d := sub.Dropped(); d != reported {
				reported = d
				if enc.Encode(TapLine{TapEvent: proxy.TapEvent{Time: time.Now(), Kind: TapDropped}, Dropped: d}) != nil {
					return
				}
			}
		}
		if rc.Flush() != nil {
			return
		}
	}
}

// PingRequest names what to ping: a service (each of its endpoints) or a
// node (its proxy, which presents the node's identity).
type PingRequest struct {
	Target string `json:"target"`
}

// PingResult is one endpoint's ping.
type PingResult struct {
	Node      string  `json:"node"`
	Service   string  `json:"service,omitempty"`
	Addr      string  `json:"addr"`
	Identity  string  `json:"identity"`          // the identity the server presented (on success) or had to present
	ConnectMS float64 `json:"connect_ms"`        // connect and mTLS handshake
	RTTMS     float64 `json:"rtt_ms"`            // the echo's round trip
	Healthy   *bool   `json:"healthy,omitempty"` // a service endpoint: its health check
	Error     string  `json:"error,omitempty"`   // why it failed
}

// PingResponse lists every endpoint pinged.
type PingResponse struct {
	Target  string       `json:"target"`
	Kind    string       `json:"kind"` // "service" or "node"
	Results []PingResult `json:"results"`
}

func (a *Agent) ping(ctx context.Context, req PingRequest) (any, error) {
	if a.phase.Load() < phaseProxy || a.prx == nil {
		return nil, statusError{http.StatusServiceUnavailable, errors.New("the proxy is not running yet")}
	}
	if req.Target == "" {
		return nil, errors.New("ping: name a service or a node")
	}
	td := a.config().CA.TrustDomain
	resp := PingResponse{Target: req.Target}
	var eps []proxy.Endpoint
	if es := a.disc.Endpoints(req.Target); len(es) > 0 {
		resp.Kind = "service"
		for _, e := range es {
			eps = append(eps, proxy.Endpoint{Node: e.Node, Service: e.Service, ProxyAddr: e.Proxy, Identity: ca.ServiceID(td, e.Service), Healthy: e.Healthy})
		}
	} else {
		for _, m := range a.disc.Members() {
			if m.Name == req.Target && m.State == "alive" && m.ProxyPort != 0 {
				resp.Kind = "node"
				eps = append(eps, proxy.Endpoint{Node: m.Name, ProxyAddr: netip.AddrPortFrom(m.Addr.Addr(), m.ProxyPort), Identity: ca.NodeID(td, m.Name)})
			}
		}
	}
	if len(eps) == 0 {
		return nil, statusError{http.StatusNotFound, fmt.Errorf("ping: %q is neither a service with endpoints nor an alive node", req.Target)}
	}
	resp.Results = make([]PingResult, len(eps))
	var wg sync.WaitGroup
	for i, ep := range eps {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			pr := PingResult{Node: ep.Node, Service: ep.Service, Addr: ep.ProxyAddr.String(), Identity: ep.Identity}
			if resp.Kind == "service" {
				h := ep.Healthy
				pr.Healthy = &h
			}
			res, err := a.prx.Ping(ctx, ep)
			pr.ConnectMS = float64(res.Connect) / float64(time.Millisecond)
			pr.RTTMS = float64(res.RTT) / float64(time.Millisecond)
			if err != nil {
				pr.Error = err.Error()
			}
			resp.Results[i] = pr
		})
	}
	wg.Wait()
	slices.SortFunc(resp.Results, func(x, y PingResult) int { return strings.Compare(x.Node, y.Node) })
	return resp, nil
}

// Tap streams the agent's tap with filter f, calling fn for each line
// until ctx ends, fn returns an error or the agent closes the stream.
func (c *ControlClient) Tap(ctx context.Context, f proxy.TapFilter, fn func(TapLine) error) error {
	q := url.Values{}
	for k, v := range map[string]string{"service": f.Service, "direction": f.Direction, "identity": f.Identity, "path": f.PathPrefix, "method": f.Method} {
		if v != "" {
			q.Set(k, v)
		}
	}
	u := "http://vmesh/v1/tap?" + q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	hc := *c.hc
	hc.Timeout = 0 // a stream
	resp, err := hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("cannot reach the agent at %s (is it running, and are you root or the vmesh user?): %w", c.path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var ae apiError
		if json.NewDecoder(resp.Body).Decode(&ae) == nil && ae.Error != "" {
			return errors.New(ae.Error)
		}
		return fmt.Errorf("agent answered %s", resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var l TapLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return fmt.Errorf("decoding the tap stream: %w", err)
		}
		if err := fn(l); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return sc.Err()
}
