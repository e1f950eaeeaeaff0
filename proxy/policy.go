package proxy

import (
	"fmt"
	"net/netip"
	"strings"
)

// LocalService is a service this host serves, as declared in its
// configuration. The inbound proxy relays only to declared service ports.
type LocalService struct {
	// Name is the service name (required); its SVID is spiffe://td/svc/Name.
	Name string
	// Port is the port the service listens on (required).
	Port uint16
	// Target is where the inbound proxy connects for this service, whatever
	// address the client's packets were sent to. Optional: the zero value
	// means 127.0.0.1:Port.
	Target netip.AddrPort
	// Protocol is "auto" (default: detect), "http1", "http2" (assumed, no
	// detection) or "opaque" (TCP, no detection). It only matters for
	// unmeshed clients arriving through the PREROUTING redirect; meshed
	// clients say what they send in the transport header.
	Protocol string
	// Policy authorizes clients. Optional: "" means Config.DefaultPolicy.
	Policy Policy
	// Allow lists the SPIFFE IDs allowed to connect. Optional: empty means
	// the policy alone decides. A pattern may use "*" for exactly one path
	// segment and end in "/**" for any number of further segments, e.g.
	// "spiffe://td/svc/*" or "spiffe://td/**". A non-empty list implies
	// authenticated clients only.
	Allow []string
}

// localService is a LocalService prepared for in-memory authorization.
type localService struct {
	LocalService
	target netip.AddrPort
	policy Policy
	allow  []idPattern
}

// services is an immutable snapshot of the local services by port.
type services struct {
	byPort map[uint16]*localService
}

// buildServices validates list and indexes it by port.
func buildServices(list []LocalService, def Policy) (*services, error) {
	s := &services{byPort: make(map[uint16]*localService, len(list))}
	for i, ls := range list {
		if ls.Name == "" {
			return nil, fmt.Errorf("service %d: empty name", i)
		}
		if ls.Port == 0 {
			return nil, fmt.Errorf("service %q: port 0", ls.Name)
		}
		if _, dup := s.byPort[ls.Port]; dup {
			return nil, fmt.Errorf("service %q: port %d declared twice", ls.Name, ls.Port)
		}
		switch ls.Protocol {
		case "", "auto", "http1", "http2", "opaque":
		default:
			return nil, fmt.Errorf("service %q: unknown protocol %q", ls.Name, ls.Protocol)
		}
		e := &localService{LocalService: ls, target: ls.Target, policy: ls.Policy}
		e.Allow = append([]string(nil), ls.Allow...)
		if !e.target.IsValid() {
			e.target = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), ls.Port)
		}
		if e.policy == "" {
			e.policy = def
		}
		if !e.policy.Valid() {
			return nil, fmt.Errorf("service %q: unknown policy %q", ls.Name, ls.Policy)
		}
		for _, a := range ls.Allow {
			p, err := parseIDPattern(a)
			if err != nil {
				return nil, fmt.Errorf("service %q: %w", ls.Name, err)
			}
			e.allow = append(e.allow, p)
		}
		s.byPort[ls.Port] = e
	}
	return s, nil
}

// authzDecision is the result of authorizing one client.
type authzDecision struct {
	allow  bool
	reason string // why denied (or why audit would have denied); bounded set
}

// Denial reasons, used as the metric label and in l5d-proxy-error.
const (
	reasonPolicyDeny      = "policy_deny"
	reasonUnauthenticated = "unauthenticated"
	reasonNotAllowed      = "identity_not_allowed"
)

// authorize decides whether a client with identity id (empty when the client
// presented no SVID) may reach s. It only reads memory.
func (s *localService) authorize(id string) authzDecision {
	d := s.evaluate(id)
	if s.policy == PolicyAudit && !d.allow {
		d.allow = true
	}
	return d
}

func (s *localService) evaluate(id string) authzDecision {
	switch s.policy {
	case PolicyDeny:
		return authzDecision{reason: reasonPolicyDeny}
	case PolicyAllUnauthenticated:
		if len(s.allow) == 0 {
			return authzDecision{allow: true}
		}
	}
	// all-authenticated, audit, or an allow list: an identity is required.
	if id == "" {
		return authzDecision{reason: reasonUnauthenticated}
	}
	if len(s.allow) == 0 {
		return authzDecision{allow: true}
	}
	for _, p := range s.allow {
		if p.match(id) {
			return authzDecision{allow: true}
		}
	}
	return authzDecision{reason: reasonNotAllowed}
}

// idPattern matches SPIFFE IDs segment by segment.
type idPattern struct {
	segs []string // "*" matches one segment
	rest bool     // trailing "**": any number (>= 0) of further segments
}

func parseIDPattern(s string) (idPattern, error) {
	if !strings.HasPrefix(s, "spiffe://") {
		return idPattern{}, fmt.Errorf("allow pattern %q: must start with spiffe://", s)
	}
	segs := strings.Split(strings.TrimPrefix(s, "spiffe://"), "/")
	var p idPattern
	for i, seg := range segs {
		switch {
		case seg == "**" && i == len(segs)-1 && i > 0:
			p.rest = true
			continue
		case seg == "":
			return idPattern{}, fmt.Errorf("allow pattern %q: empty segment", s)
		case seg != "*" && strings.Contains(seg, "*"):
			return idPattern{}, fmt.Errorf("allow pattern %q: '*' must be a whole segment, '**' only at the end", s)
		}
		p.segs = append(p.segs, seg)
	}
	return p, nil
}

func (p idPattern) match(id string) bool {
	rest, ok := strings.CutPrefix(id, "spiffe://")
	if !ok {
		return false
	}
	for i, seg := range p.segs {
		var cur string
		cur, rest, ok = strings.Cut(rest, "/")
		if cur == "" || (seg != "*" && seg != cur) {
			return false
		}
		if !ok && i < len(p.segs)-1 {
			return false
		}
		if !ok {
			rest = ""
			return true
		}
	}
	// All pattern segments matched and id has more segments.
	return p.rest && rest != ""
}
