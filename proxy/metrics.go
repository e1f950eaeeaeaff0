package proxy

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// latencyBuckets are Linkerd's response_latency_ms buckets.
var latencyBuckets = []float64{
	1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
	1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000,
}

// Label values. Cardinality stays bounded: service names and identities come
// from the mesh (declared services, issued SVIDs), never from addresses;
// status codes are three digits; reasons are constants.
const (
	dirInbound  = "inbound"
	dirOutbound = "outbound"

	tlsTrue       = "true"
	tlsNoIdentity = "no_identity"
)

// connLabels are the labels every TCP and HTTP metric carries.
type connLabels struct {
	direction string
	service   string // target service; "" for an address the mesh does not know
	clientID  string // inbound: the client's SPIFFE ID, "" if none
	serverID  string // outbound: the server's SPIFFE ID, "" if not meshed
	tls       string // tlsTrue or tlsNoIdentity
}

func (l connLabels) values() []string {
	return []string{l.direction, l.service, l.clientID, l.serverID, l.tls}
}

var connLabelNames = []string{"direction", "service", "client_id", "server_id", "tls"}

type metrics struct {
	requests     *prometheus.CounterVec
	responses    *prometheus.CounterVec
	latency      *prometheus.HistogramVec
	tcpOpen      *prometheus.CounterVec
	tcpClose     *prometheus.CounterVec
	tcpOpenConns *prometheus.GaugeVec
	tcpRead      *prometheus.CounterVec
	tcpWrite     *prometheus.CounterVec
	httpAllow    *prometheus.CounterVec
	httpDeny     *prometheus.CounterVec
	tcpAllow     *prometheus.CounterVec
	tcpDeny      *prometheus.CounterVec
	audit        *prometheus.CounterVec
	refused      *prometheus.CounterVec
	rejected     *prometheus.CounterVec
	retries      *prometheus.CounterVec // balanced attempts moved to another endpoint
	// The retry budget and the balanced endpoints (balance.go).
	budgetExhausted  *prometheus.CounterVec
	endpointRequests *prometheus.CounterVec
	endpointLatency  *prometheus.HistogramVec
	errors           *prometheus.CounterVec // errlog.go
	tap              tapHub                 // tap.go
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	authzNames := []string{"service", "client_id", "tls"}
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "request_total", Help: "HTTP requests proxied.",
		}, connLabelNames),
		responses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "response_total", Help: "HTTP responses proxied, by status and success.",
		}, append(connLabelNames[:len(connLabelNames):len(connLabelNames)], "status_code", "classification")),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "response_latency_ms", Help: "Time from request to response headers, in milliseconds.",
			Buckets: latencyBuckets,
		}, connLabelNames),
		tcpOpen: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcp_open_total", Help: "TCP connections opened.",
		}, connLabelNames),
		tcpClose: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcp_close_total", Help: "TCP connections closed.",
		}, connLabelNames),
		tcpOpenConns: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tcp_open_connections", Help: "TCP connections currently open.",
		}, connLabelNames),
		tcpRead: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcp_read_bytes_total", Help: "Bytes read from the accepted connection.",
		}, connLabelNames),
		tcpWrite: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcp_write_bytes_total", Help: "Bytes written to the accepted connection.",
		}, connLabelNames),
		httpAllow: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "inbound_http_authz_allow_total", Help: "Inbound HTTP requests authorized.",
		}, authzNames),
		httpDeny: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "inbound_http_authz_deny_total", Help: "Inbound HTTP requests denied.",
		}, append(authzNames[:3:3], "reason")),
		tcpAllow: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "inbound_tcp_authz_allow_total", Help: "Inbound TCP connections authorized.",
		}, authzNames),
		tcpDeny: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "inbound_tcp_authz_deny_total", Help: "Inbound TCP connections denied.",
		}, append(authzNames[:3:3], "reason")),
		audit: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "inbound_authz_audit_total",
			Help: "Inbound HTTP requests and TCP connections allowed by the audit policy that would otherwise be denied.",
		}, []string{"protocol", "service", "client_id", "tls", "reason"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcp_refused_total", Help: "Connections refused before authorization (bad handshake, header, port, unknown destination).",
		}, []string{"direction", "reason"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "http_rejected_total", Help: "HTTP/1 requests refused as malformed or ambiguous (request smuggling shapes, oversized heads).",
		}, []string{"direction", "reason"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "balancer_retries_total", Help: "Connections (tcp) and requests (http) to a service VIP moved to another endpoint after the first failed before the app saw anything (or answered a status its route retries), by reason.",
		}, []string{"direction", "service", "protocol", "reason"}),
		budgetExhausted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "retry_budget_exhausted_total", Help: "Retries not made because the service's retry budget (20 % of requests plus 10/s) was spent.",
		}, []string{"service", "protocol"}),
		endpointRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "endpoint_requests_total", Help: "Requests (http) and connections (tcp) to a service VIP, by the endpoint (node) that took them, its traffic-split subset and the outcome.",
		}, []string{"service", "endpoint", "subset", "result"}),
		endpointLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "endpoint_response_latency_ms", Help: "Latency the balancer measured per endpoint of a service VIP (HTTP: to the response head), in milliseconds.",
			Buckets: latencyBuckets,
		}, []string{"service", "endpoint"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "proxy_errors_total", Help: "Failures a user would notice (denials, refusals, detection timeouts, connect failures, 502s, refusals by the peer), by reason.",
		}, []string{"direction", "reason"}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{
		m.requests, m.responses, m.latency, m.tcpOpen, m.tcpClose, m.tcpOpenConns,
		m.tcpRead, m.tcpWrite, m.httpAllow, m.httpDeny, m.tcpAllow, m.tcpDeny, m.audit, m.refused, m.rejected, m.retries, m.errors,
		m.budgetExhausted, m.endpointRequests, m.endpointLatency,
	} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Refusal reasons (label "reason" of tcp_refused_total).
const (
	refuseNotRedirected = "not_redirected"
	refuseHandshake     = "tls_handshake"
	refuseALPN          = "alpn"
	refuseHeader        = "bad_header"
	refuseUnknownPort   = "unknown_port"
	refuseUnknownDst    = "unknown_destination"
	refuseDial          = "connect"
	refusePeer          = "peer_refused" // the peer proxy reset the stream (denied, no such port, service down)
)

// tcpConnMetrics tracks one proxied TCP connection.
type tcpConnMetrics struct {
	m     *metrics
	l     []string
	start time.Time // set while tapped (tap.go)
}

func (m *metrics) openTCP(l connLabels) tcpConnMetrics {
	v := l.values()
	m.tcpOpen.WithLabelValues(v...).Inc()
	m.tcpOpenConns.WithLabelValues(v...).Inc()
	t := tcpConnMetrics{m: m, l: v}
	if m.tap.active() {
		t.start = time.Now()
		t.tapTCP(TapTCPOpen, 0, 0)
	}
	return t
}

func (t tcpConnMetrics) close(read, written int64) {
	if t.m.tap.active() {
		t.tapTCP(TapTCPClose, read, written)
	}
	t.m.tcpRead.WithLabelValues(t.l...).Add(float64(read))
	t.m.tcpWrite.WithLabelValues(t.l...).Add(float64(written))
	t.m.tcpClose.WithLabelValues(t.l...).Inc()
	t.m.tcpOpenConns.WithLabelValues(t.l...).Dec()
}

func statusLabel(code int) string {
	if code < 100 || code > 999 {
		return "0"
	}
	return strconv.Itoa(code)
}
