package discovery

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics of one Discovery. Gauges are read from the current state when
// scraped, so they can never drift from it.
type metrics struct {
	messages *prometheus.CounterVec // dir: in, out
	bytes    *prometheus.CounterVec // dir: in, out
	rejected *prometheus.CounterVec // reason
	decrypt  prometheus.Counter

	membersDesc  *prometheus.Desc
	entriesDesc  *prometheus.Desc
	servicesDesc *prometheus.Desc
	d            *Discovery
}

// Rejection reasons (gossip_rejected_total{reason}).
const (
	rejectMalformed = "malformed"
	rejectOversized = "oversized"
	rejectTooMany   = "too_many_entries"
	rejectQueueFull = "queue_full"
	rejectFuture    = "version_from_the_future"
)

func newMetrics(d *Discovery) *metrics {
	m := &metrics{
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gossip_messages_total",
			Help: "Gossip packets and streams sent (dir=out) and received (dir=in).",
		}, []string{"dir"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gossip_bytes_total",
			Help: "Gossip bytes sent (dir=out) and received (dir=in), UDP and TCP.",
		}, []string{"dir"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gossip_rejected_total",
			Help: "Catalog payloads refused, by reason.",
		}, []string{"reason"}),
		decrypt: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "gossip_decrypt_failures_total",
			Help: "Gossip packets and streams no installed key could decrypt: another host uses a different gossip key.",
		}),
		membersDesc:  prometheus.NewDesc("gossip_members", "Gossip members by state (alive, suspect, dead, left).", []string{"state"}, nil),
		entriesDesc:  prometheus.NewDesc("catalog_entries", "Hosts in the catalog (this one included).", nil, nil),
		servicesDesc: prometheus.NewDesc("catalog_services", "Service instances in the catalog.", nil, nil),
		d:            d,
	}
	for _, dir := range []string{"in", "out"} {
		m.messages.WithLabelValues(dir)
		m.bytes.WithLabelValues(dir)
	}
	for _, r := range []string{rejectMalformed, rejectOversized, rejectTooMany, rejectQueueFull} {
		m.rejected.WithLabelValues(r)
	}
	return m
}

func (m *metrics) register(r prometheus.Registerer) error {
	if r == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{m.messages, m.bytes, m.rejected, m.decrypt, m} {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// Describe implements prometheus.Collector for the gauges.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- m.membersDesc
	ch <- m.entriesDesc
	ch <- m.servicesDesc
}

// Collect implements prometheus.Collector for the gauges.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	counts := map[string]int{StateAlive: 0, StateSuspect: 0, StateDead: 0, StateLeft: 0}
	for _, mb := range m.d.Members() {
		counts[mb.State]++
	}
	for state, n := range counts {
		ch <- prometheus.MustNewConstMetric(m.membersDesc, prometheus.GaugeValue, float64(n), state)
	}
	s := m.d.snap.Load()
	ch <- prometheus.MustNewConstMetric(m.entriesDesc, prometheus.GaugeValue, float64(len(s.views)))
	ch <- prometheus.MustNewConstMetric(m.servicesDesc, prometheus.GaugeValue, float64(s.services))
}
