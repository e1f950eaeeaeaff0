package proxy

import (
	"bytes"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Tap: a live stream of the requests and TCP connections through this
// host, for `vmesh tap` and `vmesh top`. It costs one atomic load per
// request or connection when nobody taps. Each subscriber has a bounded
// queue: when it is full, events are dropped for that subscriber (and
// counted), never waited for.

// TapEvent is one finished HTTP request or one TCP connection opened or
// closed.
type TapEvent struct {
	Time      time.Time `json:"time"`
	Kind      string    `json:"kind"`      // TapHTTP, TapTCPOpen or TapTCPClose
	Direction string    `json:"direction"` // "inbound" or "outbound"
	Service   string    `json:"service,omitempty"`
	ClientID  string    `json:"client_id,omitempty"` // inbound: the client's SPIFFE ID
	ServerID  string    `json:"server_id,omitempty"` // outbound: the server's SPIFFE ID
	TLS       bool      `json:"tls"`                 // mTLS on the mesh leg
	Method    string    `json:"method,omitempty"`
	Authority string    `json:"authority,omitempty"`
	Path      string    `json:"path,omitempty"`
	Status    int       `json:"status,omitempty"`     // HTTP status; 0 when the request got no response
	LatencyMS float64   `json:"latency_ms,omitempty"` // HTTP: to the response's end; TCP close: the connection's life
	BytesIn   int64     `json:"bytes_in,omitempty"`   // HTTP: request body; TCP: read from the client
	BytesOut  int64     `json:"bytes_out,omitempty"`  // HTTP: response body; TCP: written to the client
}

// Kinds of TapEvent.
const (
	TapHTTP     = "http"
	TapTCPOpen  = "tcp_open"
	TapTCPClose = "tcp_close"
)

// TapFilter selects events; the zero value selects all.
type TapFilter struct {
	Service    string // exact service name
	Direction  string // "inbound" or "outbound"
	Identity   string // client or server SPIFFE ID (a suffix matches: "svc/web")
	PathPrefix string // HTTP only: TCP events never match a path prefix
	Method     string // HTTP only, case-insensitive
}

// Match reports whether ev passes f.
func (f TapFilter) Match(ev *TapEvent) bool {
	if f.Service != "" && ev.Service != f.Service {
		return false
	}
	if f.Direction != "" && ev.Direction != f.Direction {
		return false
	}
	if f.Identity != "" && !idMatch(ev.ClientID, f.Identity) && !idMatch(ev.ServerID, f.Identity) {
		return false
	}
	if f.PathPrefix != "" && (ev.Kind != TapHTTP || !strings.HasPrefix(ev.Path, f.PathPrefix)) {
		return false
	}
	if f.Method != "" && (ev.Kind != TapHTTP || !strings.EqualFold(ev.Method, f.Method)) {
		return false
	}
	return true
}

func idMatch(id, want string) bool {
	return id != "" && (id == want || strings.HasSuffix(id, "/"+strings.TrimPrefix(want, "/")))
}

// TapSubscription receives the events of one tap. Close it when done.
type TapSubscription struct {
	hub     *tapHub
	filter  TapFilter
	ch      chan TapEvent
	dropped atomic.Uint64
	once    sync.Once
}

// Events are the subscription's events; the channel is closed by Close.
func (s *TapSubscription) Events() <-chan TapEvent { return s.ch }

// Dropped is the number of events dropped because the queue was full.
func (s *TapSubscription) Dropped() uint64 { return s.dropped.Load() }

// Close ends the subscription and closes Events.
func (s *TapSubscription) Close() {
	s.once.Do(func() {
		h := s.hub
		h.mu.Lock()
		delete(h.subs, s)
		h.n.Store(int32(len(h.subs)))
		close(s.ch)
		h.mu.Unlock()
	})
}

// DefaultTapQueue is the queue length of a subscription by default.
const DefaultTapQueue = 1024

// Tap subscribes to the events that pass f, with a queue of queue events
// (0: DefaultTapQueue).
func (p *Proxy) Tap(f TapFilter, queue int) *TapSubscription {
	if queue <= 0 {
		queue = DefaultTapQueue
	}
	h := &p.m.tap
	s := &TapSubscription{hub: h, filter: f, ch: make(chan TapEvent, queue)}
	h.mu.Lock()
	if h.subs == nil {
		h.subs = make(map[*TapSubscription]struct{})
	}
	h.subs[s] = struct{}{}
	h.n.Store(int32(len(h.subs)))
	h.mu.Unlock()
	return s
}

// tapHub fans events out to the subscriptions.
type tapHub struct {
	n    atomic.Int32 // len(subs): the hot path's only cost when nobody taps
	mu   sync.Mutex
	subs map[*TapSubscription]struct{}
}

func (h *tapHub) active() bool { return h.n.Load() > 0 }

func (h *tapHub) publish(ev *TapEvent) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs {
		if !s.filter.Match(ev) {
			continue
		}
		select {
		case s.ch <- *ev:
		default:
			s.dropped.Add(1)
		}
	}
}

// tapLabels fills an event's identity fields from a metric label set
// (connLabels.values order).
func tapLabels(ev *TapEvent, v []string) {
	ev.Direction, ev.Service, ev.ClientID, ev.ServerID = v[0], v[1], v[2], v[3]
	ev.TLS = v[4] == tlsTrue
}

// tapTCP publishes a TCP connection's open or close.
func (t *tcpConnMetrics) tapTCP(kind string, read, written int64) {
	ev := TapEvent{Time: time.Now(), Kind: kind, BytesIn: read, BytesOut: written}
	tapLabels(&ev, t.l)
	if kind == TapTCPClose && !t.start.IsZero() {
		ev.LatencyMS = float64(ev.Time.Sub(t.start)) / float64(time.Millisecond)
	}
	t.m.tap.publish(&ev)
}

// tapH1 publishes the lean HTTP/1 path's current request, which ended
// with h.status (0: no response).
func (h *h1Conn) tapH1(start time.Time) {
	ev := TapEvent{Time: time.Now(), Kind: TapHTTP, Status: h.status, BytesOut: h.respBytes}
	if h.mc != nil {
		tapLabels(&ev, h.mc.labels)
	} else {
		ev.Direction, ev.ClientID, ev.ServerID = h.r.dir, h.clientID, h.r.ep.Identity
		ev.Service = h.r.ep.Service
		if h.r.svc != nil {
			ev.Service = h.r.svc.Name
		}
		ev.TLS = h.tlsLabel == tlsTrue
	}
	ev.LatencyMS = float64(ev.Time.Sub(start)) / float64(time.Millisecond)
	req := &h.req
	ev.Method, ev.Path = string(req.method), string(req.target)
	for _, f := range req.fields {
		if len(f.name) == 4 && bytes.EqualFold(f.name, []byte("host")) {
			ev.Authority = string(f.value)
			break
		}
	}
	if req.body == bodyLength {
		ev.BytesIn = req.length
	}
	h.p.m.tap.publish(&ev)
}

// tap publishes a request of the net/http path (HTTP/2) when its response
// body ends.
func (b *meteredBody) tap() {
	ev := TapEvent{Time: time.Now(), Kind: TapHTTP, Status: b.resp.StatusCode, BytesOut: b.n}
	tapLabels(&ev, b.labels)
	ev.LatencyMS = float64(ev.Time.Sub(b.start)) / float64(time.Millisecond)
	if r := b.resp.Request; r != nil {
		ev.Method, ev.Authority, ev.Path = r.Method, r.Host, r.URL.RequestURI()
		if r.ContentLength > 0 {
			ev.BytesIn = r.ContentLength
		}
	}
	b.p.m.tap.publish(&ev)
}
