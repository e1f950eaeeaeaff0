package node

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"time"

	"github.com/vmesh/vmesh/ca"
	"github.com/vmesh/vmesh/discovery"
	"github.com/vmesh/vmesh/rules"
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
}

// RulesStatus says whether the iptables rules are as the config wants.
type RulesStatus struct {
	Enabled bool   `json:"enabled"`
	Backend string `json:"backend,omitempty"`
	Drift   string `json:"drift,omitempty"` // "" when installed and current
	Error   string `json:"error,omitempty"`
}

// views are the read-only JSON endpoints of the admin API.
func (a *Agent) views() map[string]http.HandlerFunc {
	return map[string]http.HandlerFunc{
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
			writeJSON(w, http.StatusOK, a.disc.Catalog())
		},
		"/v1/status": func(w http.ResponseWriter, r *http.Request) {
			writeJSON(w, http.StatusOK, a.status(r.Context()))
		},
	}
}

func (a *Agent) status(ctx context.Context) Status {
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
	}
	if a.caClient != nil {
		st.Identity = a.caClient.NodeID()
		st.Identities = a.caClient.Status()
		st.CAURL = a.caClient.CAURL()
	}
	if a.disc != nil {
		st.Members = a.disc.Members()
	}
	if a.prx != nil {
		st.Outbound = a.prx.OutboundAddr().String()
		st.Inbound = a.prx.InboundAddr().String()
	}
	if a.applier != nil && cfg.Rules.Enabled {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		drift, err := a.applier.Installed(ctx, rules.Build(cfg.RulesState(a.uid())))
		st.Rules.Drift = drift
		st.Rules.Backend = a.applier.Backend()
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
	postJSON(mux, "/v1/keyring", a.keyring)
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

func (a *Agent) revoke(_ context.Context, req NodeRequest) (any, error) {
	if a.caServer == nil {
		return nil, errNotCA
	}
	if err := a.caServer.Revoke(req.Node); err != nil {
		return nil, err
	}
	a.log.Warn("node revoked", "revoked_node", req.Node)
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

// Reload re-reads the configuration file and applies what can change
// without a restart: services (catalog, certificates, authorization),
// policy, opaque and skip ports, and the rules. A bad file, or a change to
// something that cannot be reloaded, is refused and the running
// configuration stays.
func (a *Agent) Reload(ctx context.Context) error {
	if a.opts.ConfigPath == "" {
		return errors.New("reload: the agent was started without a config file")
	}
	if !a.everReady.Load() {
		return errors.New("reload refused: the agent is still starting; reload once it is ready")
	}
	a.opts.Notify("RELOADING=1")
	defer a.opts.Notify("READY=1")
	next, err := LoadConfig(a.opts.ConfigPath)
	if err != nil {
		a.log.Error("reload refused: the configuration is invalid; the running one stays", "err", err)
		return fmt.Errorf("reload refused, the running configuration stays: %w", err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	prev := a.cfg
	if err := reloadable(prev, next); err != nil {
		a.log.Error("reload refused; the running configuration stays", "err", err)
		return fmt.Errorf("reload refused, the running configuration stays: %w", err)
	}
	if a.caClient != nil {
		if err := a.caClient.SetServices(serviceNames(next)); err != nil {
			return fmt.Errorf("reload: requesting certificates: %w", err)
		}
	}
	if a.prx != nil {
		if err := a.prx.SetServices(proxyServices(next)); err != nil {
			return fmt.Errorf("reload: proxy services: %w", err)
		}
	}
	if a.disc != nil {
		if err := a.disc.SetLocal(discoveryServices(next)); err != nil {
			return fmt.Errorf("reload: publishing services: %w", err)
		}
	}
	if a.applier != nil && next.Rules.Enabled {
		rs := rules.Build(next.RulesState(a.uid()))
		if err := a.applier.Apply(ctx, rs); err != nil {
			return fmt.Errorf("reload: iptables rules: %w", err)
		}
		a.ruleset = rs
	}
	a.cfg = next
	a.log.Info("configuration reloaded", "services", serviceNames(next))
	return nil
}

// reloadable refuses changes that need a restart.
func reloadable(prev, next Config) error {
	var fixed []string
	check := func(name string, same bool) {
		if !same {
			fixed = append(fixed, name)
		}
	}
	check("node.name", prev.NodeName() == next.NodeName())
	check("node.data_dir", prev.Node.DataDir == next.Node.DataDir)
	check("admin", prev.Admin == next.Admin)
	check("proxy.outbound_addr", prev.Proxy.OutboundAddr == next.Proxy.OutboundAddr)
	check("proxy.inbound_addr", prev.Proxy.InboundAddr == next.Proxy.InboundAddr)
	check("proxy.detect_timeout", prev.Proxy.DetectTimeout == next.Proxy.DetectTimeout)
	check("proxy.connect_timeout", prev.Proxy.ConnectTimeout == next.Proxy.ConnectTimeout)
	check("proxy.opaque_ports", slices.Equal(prev.Proxy.OpaquePorts, next.Proxy.OpaquePorts))
	check("proxy.default_policy", prev.Proxy.DefaultPolicy == next.Proxy.DefaultPolicy)
	check("proxy.outbound_unknown", prev.Proxy.OutboundUnknown == next.Proxy.OutboundUnknown)
	check("proxy.request_timeout", prev.Proxy.RequestTimeout == next.Proxy.RequestTimeout)
	check("proxy.client_identity", prev.Proxy.ClientIdentity == next.Proxy.ClientIdentity)
	check("proxy.multiplex_opaque", prev.Proxy.MultiplexOpaque == next.Proxy.MultiplexOpaque)
	check("gossip.bind_addr", prev.Gossip.BindAddr == next.Gossip.BindAddr)
	check("gossip.advertise_addr", prev.Gossip.AdvertiseAddr == next.Gossip.AdvertiseAddr)
	check("ca.role", prev.CA.Role == next.CA.Role)
	check("ca.trust_domain", prev.CA.TrustDomain == next.CA.TrustDomain)
	check("ca.listen_addr", prev.CA.ListenAddr == next.CA.ListenAddr)
	check("rules.enabled", prev.Rules.Enabled == next.Rules.Enabled)
	if len(fixed) > 0 {
		return fmt.Errorf("these settings change only with a restart: %v", fixed)
	}
	return nil
}
