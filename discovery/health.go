package discovery

import (
	"context"
	"net/netip"
	"time"

	"github.com/vmesh/vmesh/internal/field"
)

// HealthCheck describes how the owning host checks one of its services.
// The zero value of each field means its default.
type HealthCheck struct {
	// Type is "tcp" (connect to the service port, the default) or "http"
	// (GET Path, expecting ExpectStatus).
	Type string `toml:"type"`
	// Path is the HTTP path for "http" checks. Default "/".
	Path string `toml:"path"`
	// ExpectStatus is the HTTP status a healthy service answers. Default 200.
	ExpectStatus int `toml:"expect_status"`
	// Interval between checks. Default 10s.
	Interval time.Duration `toml:"interval"`
	// Timeout of one check. Default 2s; must be below Interval.
	Timeout time.Duration `toml:"timeout"`
	// HealthyThreshold is how many passes in a row make a failing service
	// healthy again. Default 1.
	HealthyThreshold int `toml:"healthy_threshold"`
	// UnhealthyThreshold is how many failures in a row make a service
	// unhealthy. Default 3.
	UnhealthyThreshold int `toml:"unhealthy_threshold"`
}

// CheckType returns the check type, resolving the default.
func (h *HealthCheck) CheckType() string {
	if h.Type == "" {
		return "tcp"
	}
	return h.Type
}

// CheckPath returns the HTTP path, resolving the default.
func (h *HealthCheck) CheckPath() string {
	if h.Path == "" {
		return "/"
	}
	return h.Path
}

// Status returns the expected HTTP status, resolving the default.
func (h *HealthCheck) Status() int {
	if h.ExpectStatus == 0 {
		return 200
	}
	return h.ExpectStatus
}

// Every returns the check interval, resolving the default.
func (h *HealthCheck) Every() time.Duration {
	if h.Interval == 0 {
		return 10 * time.Second
	}
	return h.Interval
}

// CheckTimeout returns the timeout of one check, resolving the default.
func (h *HealthCheck) CheckTimeout() time.Duration {
	if h.Timeout == 0 {
		return 2 * time.Second
	}
	return h.Timeout
}

// Rise returns the healthy threshold, resolving the default.
func (h *HealthCheck) Rise() int {
	if h.HealthyThreshold == 0 {
		return 1
	}
	return h.HealthyThreshold
}

// Fall returns the unhealthy threshold, resolving the default.
func (h *HealthCheck) Fall() int {
	if h.UnhealthyThreshold == 0 {
		return 3
	}
	return h.UnhealthyThreshold
}

// Validate checks h without changing it. Keys are relative to the check.
func (h *HealthCheck) Validate() error {
	if h == nil {
		return nil
	}
	var errs field.List
	switch h.Type {
	case "", "tcp", "http":
	default:
		errs.Add("type", "must be \"tcp\" or \"http\", got %q", h.Type)
	}
	if h.Path != "" && h.Path[0] != '/' {
		errs.Add("path", "must start with '/', got %q", h.Path)
	}
	if h.ExpectStatus != 0 && (h.ExpectStatus < 100 || h.ExpectStatus > 599) {
		errs.Add("expect_status", "must be an HTTP status (100-599), got %d", h.ExpectStatus)
	}
	if h.Interval < 0 {
		errs.Add("interval", "must be positive, got %s", h.Interval)
	}
	if h.Timeout < 0 {
		errs.Add("timeout", "must be positive, got %s", h.Timeout)
	}
	if h.CheckTimeout() >= h.Every() {
		errs.Add("timeout", "must be shorter than interval (%s%s), got %s%s", h.Every(), defaultNote(h.Interval == 0),
			h.CheckTimeout(), defaultNote(h.Timeout == 0))
	}
	if h.HealthyThreshold < 0 {
		errs.Add("healthy_threshold", "must be at least 1, got %d", h.HealthyThreshold)
	}
	if h.UnhealthyThreshold < 0 {
		errs.Add("unhealthy_threshold", "must be at least 1, got %d", h.UnhealthyThreshold)
	}
	return errs.Err()
}

// reconcileChecksLocked starts a checker for every local service that has
// none, once Run has started. Checkers of services that changed or went away
// were stopped by SetLocal.
func (d *Discovery) reconcileChecksLocked() {
	if d.runCtx == nil {
		return
	}
	for i := range d.local {
		s := &d.local[i]
		if s.running {
			continue
		}
		d.checkGen++
		ctx, cancel := context.WithCancel(d.runCtx)
		s.gen, s.stop, s.running = d.checkGen, cancel, true
		d.wg.Add(1)
		go d.runCheck(ctx, s.Service, s.gen)
	}
}

// runCheck checks one local service until ctx is done. The first result
// sets the state; after that it takes Rise passes in a row to become passing
// and Fall failures in a row to become failing. The service is dialled
// directly at its CheckAddr, else Options.CheckAddr (default: the advertised
// address), never
// through the proxy.
func (d *Discovery) runCheck(ctx context.Context, svc Service, gen uint64) {
	defer d.wg.Done()
	hc := svc.Health
	at := svc.CheckAddr
	if !at.IsValid() {
		at = d.checkAddr()
	}
	addr := netip.AddrPortFrom(at, svc.Port)
	state := HealthUnknown
	passes, fails := 0, 0
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := d.probe(ctx, &hc, addr)
		if ctx.Err() != nil {
			return
		}
		next := state
		if err == nil {
			passes, fails = passes+1, 0
			if state == HealthUnknown || passes >= hc.Rise() {
				next = HealthPassing
			}
		} else {
			passes, fails = 0, fails+1
			if state == HealthUnknown || fails >= hc.Fall() {
				next = HealthFailing
			}
		}
		if next != state {
			state = next
			d.log.Info("service health changed", "service", svc.Name, "addr", addr, "health", state, "err", err)
			d.setHealth(svc.Name, gen, state)
		}
		t.Reset(hc.Every())
	}
}

func (d *Discovery) checkAddr() netip.Addr {
	if d.checkAt.IsValid() {
		return d.checkAt
	}
	if d.advertise.IsUnspecified() {
		if d.advertise.Is6() {
			return netip.IPv6Loopback()
		}
		return netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	return d.advertise
}

// setHealth records a check result of the checker generation gen, and
// publishes the entry if the state changed.
func (d *Discovery) setHealth(name string, gen uint64, h Health) {
	d.mu.Lock()
	changed := false
	for i := range d.local {
		s := &d.local[i]
		if s.Name == name && s.gen == gen && s.health != h {
			s.health = h
			changed = true
		}
	}
	if changed {
		d.publishLocked()
	}
	d.mu.Unlock()
	if changed {
		d.rebuild()
	}
}

func defaultNote(isDefault bool) string {
	if isDefault {
		return ", the default"
	}
	return ""
}
