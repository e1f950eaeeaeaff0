package node

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vmesh/vmesh/ca"
	"github.com/vmesh/vmesh/discovery"
)

// Status is the agent's view of itself, for `vmesh check` (GET /v1/status).
type Status struct {
	Node        string              `json:"node"`
	Identity    string              `json:"identity"`
	Ready       bool                `json:"ready"`
	NotReady    string              `json:"not_ready,omitempty"`
	UID         int                 `json:"uid"`
	Role        string              `json:"ca_role"`
	CAURL       string              `json:"ca_url,omitempty"`
	Identities  []ca.IdentityStatus `json:"identities"`
	Members     []discovery.Member  `json:"members"`
	Outbound    string              `json:"outbound"`
	Inbound     string              `json:"inbound"`
	Rules       RulesStatus         `json:"rules"`
	GossipKeyed bool                `json:"gossip_encrypted"`
	ConfigPath  string              `json:"config_path,omitempty"`

	// Version is the agent's version.
	Version string `json:"version,omitempty"`
	// Dev is set for `vmesh agent -dev` (no config file).
	Dev bool `json:"dev,omitempty"`
	// Admin and Socket are where the agent serves its admin API and its
	// control socket: the CLI finds the agent through them.
	Admin  string `json:"admin"`
	Socket string `json:"socket"`
	// Now is the agent's clock when it answered.
	Now time.Time `json:"now"`
	// Services are the declared services as this host sees them.
	Services []ServiceStatus `json:"services"`
	// CertFailures says why the latest certificate request failed, by
	// service ("" for the node certificate).
	CertFailures map[string]string `json:"cert_failures,omitempty"`
	// Gossip explains a lone or half-connected host.
	Gossip discovery.Diagnostics `json:"gossip"`
}

// ServiceStatus is one declared service of this host.
type ServiceStatus struct {
	Name string `json:"name"`
	Port uint16 `json:"port"`
	// Target is where the proxy and the health checks reach the app.
	Target string `json:"target"`
	// Health is the health check's verdict (passing, failing, unknown).
	Health string `json:"health"`
	// Certificate is "granted" when the host holds the service's SVID,
	// else "missing" (CertError then says why, if the CA answered).
	Certificate string `json:"certificate"`
	CertError   string `json:"cert_error,omitempty"`
	// Policy is the service's effective authorization policy.
	Policy string `json:"policy"`
	// InboundMTLS and InboundPlain count the inbound connections to the
	// service since the agent started, from meshed clients and in clear.
	InboundMTLS  uint64 `json:"inbound_mtls"`
	InboundPlain uint64 `json:"inbound_plaintext"`
}

// RulesStatus says whether the iptables rules are as the config wants.
type RulesStatus struct {
	Enabled bool `json:"enabled"`
	// Installed is set once the agent installed its rules (it waits for its
	// certificates first); Pending then says why not.
	Installed bool   `json:"installed"`
	Pending   string `json:"pending,omitempty"`
	Backend   string `json:"backend,omitempty"`
	Drift     string `json:"drift,omitempty"` // "" when installed and current
	Error     string `json:"error,omitempty"`
}

// views are the read-only JSON endpoints of the admin API.
func (a *Agent) views() map[string]http.HandlerFunc {
	views := map[string]http.HandlerFunc{
		"/v1/golden": func(w http.ResponseWriter, _ *http.Request) {
			g, err := golden(a.reg, time.Now())
			if err != nil {
				writeError(w, http.StatusInternalServerError, err)
				return
			}
			writeJSON(w, http.StatusOK, g)
		},
		"/v1/members": func(w http.ResponseWriter, _ *http.Request) {
			if a.disc == nil {
				writeError(w, http.StatusServiceUnavailable, errors.New("discovery is not running yet"))
				return
			}
			writeJSON(w, http.StatusOK, a.disc.Members())
		},
		"/v1/services": func(w http.ResponseWriter, _ *http.Request) {
			if a.disc == nil {
				writeError(w, http.StatusServiceUnavailable, errors.New("discovery is not running yet"))
				return
			}
			writeJSON(w, http.StatusOK, a.catalogWithVIPs())
		},
		"/v1/status": func(w http.ResponseWriter, r *http.Request) {
			// ?rules=false skips comparing the installed rules (it runs
			// iptables): the web page polls without it. The comparison is
			// cached (the admin port may face the network); ?rules=fresh,
			// honoured for loopback clients only (vmesh check), looks again.
			q := r.URL.Query().Get("rules")
			if q == "fresh" && fromLoopback(r) {
				a.rulesView.invalidate()
			}
			writeJSON(w, http.StatusOK, a.status(r.Context(), q != "false"))
		},
		// The running configuration (what the agent applies, which may
		// differ from the file until a reload), join token left out.
		"/v1/config": func(w http.ResponseWriter, _ *http.Request) {
			cfg := a.config()
			if cfg.CA.Token != "" {
				cfg.CA.Token = "(redacted)"
			}
			writeJSON(w, http.StatusOK, cfg)
		},
	}
	for path, h := range webHandlers() {
		views[path] = h
	}
	return views
}

func (a *Agent) status(ctx context.Context, withRules bool) Status {
	cfg := a.config()
	why := a.ready.why()
	st := Status{
		Node:        cfg.NodeName(),
		Ready:       why == "",
		NotReady:    why,
		UID:         os.Getuid(),
		Role:        string(cfg.CA.Role),
		GossipKeyed: cfg.Gossip.KeyFile != "",
		ConfigPath:  a.opts.ConfigPath,
		Rules:       RulesStatus{Enabled: cfg.Rules.Enabled},
		Version:     a.opts.Version,
		Dev:         a.opts.Dev,
		Admin:       cfg.Admin.Addr.String(),
		Socket:      cfg.Admin.Socket,
		Now:         time.Now(),
	}
	// The subsystems are set by Run's goroutine; phase orders these reads
	// after their writes.
	phase := a.phase.Load()
	held := map[string]bool{}
	if phase >= phaseCA {
		st.Identity = a.caClient.NodeID()
		st.Identities = a.caClient.Status()
		st.CAURL = a.caClient.CAURL()
		st.CertFailures = a.caClient.Failures()
		for _, id := range st.Identities {
			if id.Service != "" {
				held[id.Service] = true
			}
		}
	}
	health := map[string]string{}
	if phase >= phaseDiscovery {
		st.Members = a.disc.Members()
		st.Gossip = a.disc.Diagnostics()
		for _, e := range a.disc.Catalog() {
			if e.Node != st.Node {
				continue
			}
			for _, s := range e.Services {
				health[s.Name] = string(s.Health)
			}
		}
	}
	inbound := inboundConns(a.reg)
	for _, s := range cfg.Services {
		ss := ServiceStatus{Name: s.Name, Port: s.Port, Target: s.Target().String(), Health: health[s.Name], Certificate: "missing"}
		ss.Policy = string(cfg.Proxy.DefaultPolicy)
		if s.Policy != "" {
			ss.Policy = string(s.Policy)
		}
		ss.InboundMTLS, ss.InboundPlain = inbound[s.Name][0], inbound[s.Name][1]
		if ss.Health == "" {
			ss.Health = "unknown"
		}
		if held[s.Name] {
			ss.Certificate = "granted"
		}
		ss.CertError = st.CertFailures[s.Name]
		st.Services = append(st.Services, ss)
	}
	if phase >= phaseProxy {
		st.Outbound = a.prx.OutboundAddr().String()
		st.Inbound = a.prx.InboundAddr().String()
	}
	if cfg.Rules.Enabled && !a.rulesInstalled.Load() {
		st.Rules.Pending = "not installed yet: " + why
	}
	if a.rulesInstalled.Load() && cfg.Rules.Enabled {
		st.Rules.Installed = true
		st.Rules.Backend = a.applier.Backend()
	}
	if withRules && a.rulesInstalled.Load() && cfg.Rules.Enabled {
		drift, backend, err := a.rulesView.get(ctx)
		st.Rules.Drift = drift
		st.Rules.Backend = backend
		if err != nil {
			st.Rules.Error = err.Error()
		}
	}
	return st
}

// TokenRequest asks a CA host for a join token (POST /v1/token).
type TokenRequest struct {
	Node     string   `json:"node"`
	Services []string `json:"services"`
	TTL      string   `json:"ttl,omitempty"`
}

// TokenResponse carries the token.
type TokenResponse struct {
	Token string `json:"token"`
}

// NodeRequest names a node (POST /v1/revoke).
type NodeRequest struct {
	Node string `json:"node"`
}

// KeyRequest changes the gossip keyring (POST /v1/keyring).
type KeyRequest struct {
	Op  string `json:"op"` // install, use, remove, list
	Key string `json:"key,omitempty"`
}

// KeyResponse lists the keys in use (base64), primary first.
type KeyResponse struct {
	Keys []string `json:"keys"`
}

// ReloadResponse says what a reload did.
type ReloadResponse struct {
	Reloaded bool `json:"reloaded"`
}

// controlMux serves the control socket.
func (a *Agent) controlMux() *http.ServeMux {
	mux := http.NewServeMux()
	postJSON(mux, "/v1/token", a.createToken)
	postJSON(mux, "/v1/revoke", a.revoke)
	postJSON(mux, "/v1/grant", a.grant)
	postJSON(mux, "/v1/keyring", a.keyring)
	postJSON(mux, "/v1/ping", a.ping)         // tap.go
	mux.HandleFunc("GET /v1/tap", a.serveTap) // tap.go
	mux.HandleFunc("GET /v1/tokens", func(w http.ResponseWriter, _ *http.Request) {
		if a.phase.Load() < phaseCA || a.caServer == nil {
			writeError(w, errNotCA.code, errNotCA.err)
			return
		}
		nodes, err := a.caServer.Nodes()
		if err != nil {
			writeError(w, http.StatusInternalServerError, err)
			return
		}
		writeJSON(w, http.StatusOK, nodes)
	})
	mux.HandleFunc("POST /v1/reload", func(w http.ResponseWriter, r *http.Request) {
		if err := a.Reload(r.Context()); err != nil {
			writeError(w, http.StatusBadRequest, err)
			return
		}
		writeJSON(w, http.StatusOK, ReloadResponse{Reloaded: true})
	})
	addPprof(mux)
	return mux
}

// statusError is an error answered with a given HTTP status.
type statusError struct {
	code int
	err  error
}

func (e statusError) Error() string { return e.err.Error() }

// postJSON serves POST path: it decodes the request body into a Req, calls
// fn and writes its answer as JSON; an error is answered with its
// statusError code, else 400.
func postJSON[Req any](mux *http.ServeMux, path string, fn func(context.Context, Req) (any, error)) {
	mux.HandleFunc("POST "+path, func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if err := readJSON(r, &req); err != nil {
			writeError(w, http.StatusBadRequest, err)
			return
		}
		out, err := fn(r.Context(), req)
		if err != nil {
			code := http.StatusBadRequest
			var se statusError
			if errors.As(err, &se) {
				code = se.code
			}
			writeError(w, code, err)
			return
		}
		writeJSON(w, http.StatusOK, out)
	})
}

var errNotCA = statusError{http.StatusConflict, errors.New("this host does not hold the CA (ca.role is not \"server\")")}

func (a *Agent) createToken(_ context.Context, req TokenRequest) (any, error) {
	if a.caServer == nil {
		return nil, errNotCA
	}
	ttl := 15 * time.Minute
	if req.TTL != "" {
		d, err := time.ParseDuration(req.TTL)
		if err != nil || d <= 0 || d > 24*time.Hour {
			return nil, fmt.Errorf("ttl must be a duration between 1s and 24h, got %q", req.TTL)
		}
		ttl = d
	}
	if !ValidName(req.Node) {
		return nil, fmt.Errorf("node %q is not a valid name", req.Node)
	}
	for _, s := range req.Services {
		if !ValidName(s) {
			return nil, fmt.Errorf("service %q is not a valid name", s)
		}
	}
	tok, err := a.caServer.CreateToken(req.Node, req.Services, ttl)
	if err != nil {
		return nil, statusError{http.StatusInternalServerError, err}
	}
	a.log.Info("join token created", "for_node", req.Node, "services", req.Services, "ttl", ttl)
	return TokenResponse{Token: tok}, nil
}

// GrantRequest replaces the services a node may get (POST /v1/grant).
type GrantRequest struct {
	Node     string   `json:"node"`
	Services []string `json:"services"`
}

func (a *Agent) grant(_ context.Context, req GrantRequest) (any, error) {
	if a.caServer == nil {
		return nil, errNotCA
	}
	if err := a.caServer.Grant(req.Node, req.Services); err != nil {
		return nil, err
	}
	return struct{}{}, nil
}

func (a *Agent) revoke(_ context.Context, req NodeRequest) (any, error) {
	if a.caServer == nil {
		return nil, errNotCA
	}
	known := false
	if a.phase.Load() >= phaseDiscovery {
		for _, m := range a.disc.Members() {
			known = known || m.Name == req.Node
		}
	}
	rev, err := a.caServer.Revoke(req.Node, known)
	if err != nil {
		if errors.Is(err, ca.ErrUnknownNode) {
			return nil, statusError{http.StatusNotFound, err}
		}
		return nil, err
	}
	a.log.Warn("node revoked", "revoked_node", req.Node)
	// Every CA host and every proxy learns of it by gossip.
	if a.phase.Load() >= phaseDiscovery {
		if err := a.disc.PublishRevocation(rev); err != nil {
			a.log.Error("spreading the revocation", "revoked_node", req.Node, "err", err)
		}
	}
	return struct{}{}, nil
}

func (a *Agent) keyring(_ context.Context, req KeyRequest) (any, error) {
	if a.disc == nil {
		return nil, statusError{http.StatusServiceUnavailable, errors.New("discovery is not running yet")}
	}
	if req.Op != "list" {
		keys, err := discovery.ParseKeys([]byte(req.Key))
		if err == nil && len(keys) != 1 {
			err = errors.New("give exactly one key")
		}
		if err != nil {
			return nil, err
		}
		switch req.Op {
		case "install":
			err = a.disc.InstallKey(keys[0])
		case "use":
			err = a.disc.UseKey(keys[0])
		case "remove":
			err = a.disc.RemoveKey(keys[0])
		default:
			err = fmt.Errorf("unknown op %q (install, use, remove, list)", req.Op)
		}
		if err != nil {
			return nil, err
		}
	}
	return KeyResponse{Keys: a.disc.Keys()}, nil
}

// inboundConns counts the inbound connections opened per service, with mTLS
// ([0]) and in clear ([1]), from the proxy's tcp_open_total.
func inboundConns(g prometheus.Gatherer) map[string][2]uint64 {
	out := map[string][2]uint64{}
	if g == nil {
		return out
	}
	mfs, err := g.Gather()
	if err != nil {
		return out
	}
	for _, mf := range mfs {
		if mf.GetName() != "tcp_open_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			var dir, svc, tls string
			for _, lp := range m.GetLabel() {
				switch lp.GetName() {
				case "direction":
					dir = lp.GetValue()
				case "service":
					svc = lp.GetValue()
				case "tls":
					tls = lp.GetValue()
				}
			}
			if dir != "inbound" || svc == "" {
				continue
			}
			c := out[svc]
			if tls == "true" {
				c[0] += uint64(m.GetCounter().GetValue())
			} else {
				c[1] += uint64(m.GetCounter().GetValue())
			}
			out[svc] = c
		}
	}
	return out
}

// fromLoopback reports whether r came from this host's loopback.
func fromLoopback(r *http.Request) bool {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	return err == nil && ap.Addr().Unmap().IsLoopback()
}

// catalogWithVIPs returns the catalog with each service's VIP filled in
// (copies: the catalog's entries are shared).
func (a *Agent) catalogWithVIPs() []discovery.NodeEntry {
	entries := a.disc.Catalog()
	cfg := a.config()
	out := make([]discovery.NodeEntry, len(entries))
	for i, e := range entries {
		e.Services = slices.Clone(e.Services)
		for j := range e.Services {
			if vip, ok := a.cat.VIP(e.Services[j].Name); ok {
				e.Services[j].VIP = vip.String()
				if cfg.DNS.Enabled {
					e.Services[j].DNSName = e.Services[j].Name + "." + cfg.DNS.Domain
				}
			}
		}
		out[i] = e
	}
	return out
}
