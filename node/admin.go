package node

import (
	"net/http"
	"net/http/pprof"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// readiness is the agent's /ready state with the reason it is not ready.
type readiness struct {
	reason atomic.Pointer[string] // nil: ready
	// check, once set, is consulted when reason is nil: a reason the
	// running host stopped being ready (its certificates expired).
	check atomic.Pointer[func() string]
}

func (r *readiness) set(notReadyBecause string) {
	if notReadyBecause == "" {
		r.reason.Store(nil)
		return
	}
	r.reason.Store(&notReadyBecause)
}

// why returns "" when ready.
func (r *readiness) why() string {
	if p := r.reason.Load(); p != nil {
		return *p
	}
	if f := r.check.Load(); f != nil {
		return (*f)()
	}
	return ""
}

// adminMux serves the read-only admin API: /live, /ready, /metrics and the
// JSON views registered by the agent.
func adminMux(reg *prometheus.Registry, ready *readiness, views map[string]http.HandlerFunc) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /live", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("live\n"))
	})
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		if why := ready.why(); why != "" {
			http.Error(w, "not ready: "+why, http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	for path, h := range views {
		mux.HandleFunc("GET "+path, h)
	}
	return mux
}

// addPprof puts the profiler on mux (the control socket: profiles reveal
// memory contents and must not be reachable from the network).
func addPprof(mux *http.ServeMux) {
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
}
