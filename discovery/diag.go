package discovery

import (
	"log"
	"regexp"
	"strings"
	"sync"
	"time"
)

// Diagnostics are the facts about gossip that explain a host that is alone
// or half-connected, for `vmesh check`.
type Diagnostics struct {
	// DecryptFailures counts gossip packets and streams that no installed
	// key could decrypt (memberlist: "no installed keys could decrypt the
	// message"): another host uses a different gossip key.
	DecryptFailures uint64 `json:"decrypt_failures"`
	// LastDecryptFailure is when the latest one happened, and LastDecryptFrom
	// the address it came from.
	LastDecryptFailure time.Time `json:"last_decrypt_failure,omitzero"`
	LastDecryptFrom    string    `json:"last_decrypt_from,omitempty"`
	// JoinError is why the latest join attempt of a lone host failed; ""
	// once a join succeeded.
	JoinError string `json:"join_error,omitempty"`
}

// diag records Diagnostics; safe for concurrent use.
type diag struct {
	mu      sync.Mutex
	d       Diagnostics
	warned  time.Time // last decrypt-failure warning (at most one a minute)
	onCount func()    // counts the failure in the metrics
}

func (g *diag) get() Diagnostics {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.d
}

// setJoinError records why a join failed ("" when it succeeded), without
// the multierror wrapping ("1 error occurred: * ...").
func (g *diag) setJoinError(s string) {
	var parts []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); strings.HasPrefix(l, "* ") {
			parts = append(parts, strings.TrimPrefix(l, "* "))
		}
	}
	if len(parts) > 0 {
		s = strings.Join(parts, "; ")
	}
	g.mu.Lock()
	g.d.JoinError = s
	g.mu.Unlock()
}

// fromRE finds the peer in memberlist's log lines ("from=ADDR") and in
// join errors ("failed to join ADDR: ...").
var fromRE = regexp.MustCompile(`(?:from=|failed to join )([^\s:]+:\d+|\[[^\]]+\]:\d+|\S+)`)

// isDecryptFailure reports whether s says that no installed key could
// decrypt a peer's gossip.
func isDecryptFailure(s string) bool {
	return strings.Contains(strings.ToLower(s), "no installed keys could decrypt")
}

// noteDecryptFailure records one failure and says whether to warn now.
func (g *diag) noteDecryptFailure(line string, now time.Time) (from string, warn bool) {
	if m := fromRE.FindStringSubmatch(line); m != nil {
		from = m[1]
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.d.DecryptFailures++
	g.d.LastDecryptFailure = now
	g.d.LastDecryptFrom = from
	if g.onCount != nil {
		g.onCount()
	}
	if now.Sub(g.warned) >= time.Minute {
		g.warned = now
		return from, true
	}
	return from, false
}

// memberlistLog is the writer behind memberlist's logger: its lines go to
// the discovery logger at debug level, except that a decrypt failure (the
// sign of a gossip key mismatch, otherwise only visible as a host that is
// alone) is counted and warned about once a minute.
type memberlistLog struct{ d *Discovery }

func (w memberlistLog) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	if isDecryptFailure(line) {
		if from, warn := w.d.diag.noteDecryptFailure(line, time.Now()); warn {
			w.d.log.Warn("gossip from another host could not be decrypted with any installed key: the hosts use different gossip keys; copy the same gossip.key_file to every host",
				"from", from)
		}
	}
	w.d.log.Debug(line)
	return len(p), nil
}

func (d *Discovery) memberlistLogger() *log.Logger { return log.New(memberlistLog{d}, "", 0) }

// Diagnostics returns what explains gossip trouble (see Diagnostics).
func (d *Discovery) Diagnostics() Diagnostics { return d.diag.get() }

// noteClock records a member's clock as it stated it in a push/pull
// (sentAt) received at now.
func (d *Discovery) noteClock(name string, sentAt, now time.Time) {
	if name == d.name {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if m := d.members[name]; m != nil {
		m.clock, m.clockAt = sentAt.Sub(now), now
	}
}
