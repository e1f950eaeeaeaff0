package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"sort"
	"strings"

	"github.com/vmesh/vmesh/rules"
)

// Reload decides what a new configuration may change by comparing, for each
// long-lived part of the agent, the configuration that part is built from
// (builtFrom) in the running and the new file. A part built once (memberlist,
// the proxy's listeners and dialer, the CA and its client, the rules
// applier, the admin listeners, the log handler) cannot take a new value:
// any change there is refused by key, and the running configuration stays.
// Everything else is applied: services (certificates, catalog, proxy),
// [[route]] and [[split]] (the proxy's client policies),
// the iptables rule set, node.log_level, node.drain_timeout and
// rules.on_stop (read when they are used).
//
// New keys in a section join its part automatically: a part takes whole
// sections where it is built from a whole section, so nothing new becomes
// silently "reloadable".

// part is one long-lived part of the agent and the configuration keys (with
// their values) it was built from.
type part struct {
	name string
	keys map[string]any
}

// parts lists what each long-lived part of the agent is built from. The
// builders (buildCA, buildDiscovery, buildProxy, buildRules, startAPIs and
// cmd's logger) read these keys; keep them in step.
func parts(cfg Config, levelVar bool) []part {
	flat := flatten(cfg)
	pick := func(prefixes ...string) map[string]any {
		out := map[string]any{}
		for k, v := range flat {
			for _, p := range prefixes {
				if k == p || strings.HasPrefix(k, p+".") {
					out[k] = v
				}
			}
		}
		return out
	}
	node := pick("node.name", "node.data_dir", "node.log_format", "node.cpus")
	if !levelVar {
		node["node.log_level"] = cfg.Node.LogLevel
	}
	// The CA client reads its join token once, before the host joined: a
	// token removed or replaced afterwards changes nothing.
	caKeys := pick("ca")
	delete(caKeys, "ca.token")
	delete(caKeys, "ca.token_file")
	caKeys["proxy.client_identity"] = cfg.Proxy.ClientIdentity
	caKeys["node.name"] = cfg.NodeName()
	return []part{
		{"node", node},
		{"admin API and control socket", pick("admin")},
		{"certificate authority", caKeys},
		// Discovery is built with the proxy's inbound port (in its
		// metadata), the trust domain and the CA role.
		{"gossip", merge(pick("gossip", "ca.trust_domain", "ca.role"), map[string]any{
			"proxy.inbound_addr": cfg.Proxy.InboundAddr, "node.name": cfg.NodeName()})},
		// The proxy's dialer marks its connections with rules.proxy_mark.
		{"proxy", pick("proxy", "rules.proxy_mark", "ca.trust_domain")},
		{"rules applier", pick("rules.enabled", "rules.ipv6", "rules.backend")},
		// The DNS server's listeners, dialer (marked) and the capture rule.
		{"DNS server", pick("dns", "rules.proxy_mark")},
	}
}

func merge(a, b map[string]any) map[string]any {
	for k, v := range b {
		a[k] = v
	}
	return a
}

// restartNeeded returns the keys whose change the running agent cannot
// apply, sorted.
func restartNeeded(prev, next Config, levelVar bool) []string {
	p, n := parts(prev, levelVar), parts(next, levelVar)
	var out []string
	for i := range p {
		for k, v := range p[i].keys {
			if !reflect.DeepEqual(v, n[i].keys[k]) && !slices.Contains(out, k) {
				out = append(out, k)
			}
		}
	}
	sort.Strings(out)
	return out
}

// flatten maps every leaf key of cfg's sections ("proxy.detect_timeout") to
// its value. [[service]] tables are left out: services are reloadable.
func flatten(cfg Config) map[string]any {
	out := map[string]any{}
	v := reflect.ValueOf(cfg)
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		name := strings.Split(t.Field(i).Tag.Get("toml"), ",")[0]
		if name == "" || name == "service" || name == "route" || name == "split" {
			continue
		}
		flattenInto(out, name, v.Field(i))
	}
	return out
}

func flattenInto(out map[string]any, prefix string, v reflect.Value) {
	t := v.Type()
	if t.Kind() != reflect.Struct || t.PkgPath() == "net/netip" || t.PkgPath() == "time" {
		out[prefix] = v.Interface()
		return
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name := strings.Split(f.Tag.Get("toml"), ",")[0]
		if name == "" || name == "-" || !f.IsExported() {
			continue
		}
		flattenInto(out, prefix+"."+name, v.Field(i))
	}
}

// Reload re-reads the configuration file and applies what can change
// without a restart (see the comment at the top of this file). A bad file,
// or a change to something that cannot be reloaded, is refused by key and
// the running configuration stays.
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
	if keys := restartNeeded(prev, next, a.opts.LogLevel != nil); len(keys) > 0 {
		err := fmt.Errorf("these settings change only with a restart (systemctl restart vmesh): %s", strings.Join(keys, ", "))
		a.log.Error("reload refused; the running configuration stays", "err", err)
		return fmt.Errorf("reload refused, the running configuration stays: %w", err)
	}
	// The level first, so that the reload's own steps log at it.
	if a.opts.LogLevel != nil {
		a.opts.LogLevel.Set(ParseLevel(next.Node.LogLevel))
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
		a.prx.SetPolicies(servicePolicies(next))
	}
	if a.disc != nil {
		if err := a.disc.SetLocal(discoveryServices(next)); err != nil {
			return fmt.Errorf("reload: publishing services: %w", err)
		}
	}
	if a.rulesInstalled.Load() && next.Rules.Enabled {
		rs := rules.Build(next.RulesState(a.uid()))
		if err := a.applier.Apply(ctx, rs); err != nil {
			return fmt.Errorf("reload: iptables rules: %w", err)
		}
		a.rulesView.invalidate()
		a.ruleset = rs
	}
	a.cfg = next
	a.log.Info("configuration reloaded", "services", serviceNames(next), "log_level", next.Node.LogLevel)
	return nil
}

// ParseLevel turns node.log_level into a slog level (info when unknown).
func ParseLevel(level string) slog.Level {
	switch level {
	case "debug":
		return slog.LevelDebug
	case "warn":
		return slog.LevelWarn
	case "error":
		return slog.LevelError
	}
	return slog.LevelInfo
}
