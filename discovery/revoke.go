package discovery

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
)

// RevocationVerifier checks revocations gossiped through the cluster
// (node wires ca.VerifyRevocation). Safe for concurrent use.
type RevocationVerifier interface {
	// VerifyRevocation checks blob's signature and returns what it revokes
	// (a key: revocations with the same key replace each other).
	VerifyRevocation(blob []byte) (key string, err error)
}

const (
	maxRevocations     = 4096
	maxRevocationBytes = 16 << 10
	rejectRevocation   = "bad_revocation"
)

// PublishRevocation verifies a revocation made on this host (a CA host's
// `vmesh node revoke`) and spreads it to every host: by gossip, and by a
// reliable send to each live member when it is too large for a gossip
// packet; push/pull hands every revocation to hosts that join later.
func (d *Discovery) PublishRevocation(blob []byte) error {
	if d.revVerifier == nil {
		return errors.New("publishing a revocation: no revocation verifier")
	}
	key, err := d.revVerifier.VerifyRevocation(blob)
	if err != nil {
		return fmt.Errorf("publishing a revocation: %w", err)
	}
	d.storeRevocation(key, blob, true)
	return nil
}

// Revocations returns every verified revocation known, in no order. Read it
// after Subscribe signals a change.
func (d *Discovery) Revocations() [][]byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([][]byte, 0, len(d.revocations))
	for _, b := range d.revocations {
		out = append(out, b)
	}
	return out
}

// acceptRevocation handles a revocation from the network.
func (d *Discovery) acceptRevocation(blob []byte, rebroadcast bool) {
	if d.revVerifier == nil {
		return
	}
	d.mu.Lock()
	for _, b := range d.revocations {
		if bytes.Equal(b, blob) {
			d.mu.Unlock()
			return // known: not verified again
		}
	}
	d.mu.Unlock()
	key, err := d.revVerifier.VerifyRevocation(blob)
	if err != nil {
		d.refuse(rejectRevocation, "", err.Error())
		return
	}
	d.storeRevocation(key, bytes.Clone(blob), rebroadcast)
}

func (d *Discovery) storeRevocation(key string, blob []byte, spread bool) {
	d.mu.Lock()
	if old, ok := d.revocations[key]; ok && bytes.Equal(old, blob) {
		d.mu.Unlock()
		return
	}
	if _, ok := d.revocations[key]; !ok && len(d.revocations) >= maxRevocations {
		d.mu.Unlock()
		d.metrics.rejected.WithLabelValues(rejectTooMany).Inc()
		return
	}
	d.revocations[key] = blob
	var members []string
	for name, m := range d.members {
		if m.state == StateAlive {
			members = append(members, name)
		}
	}
	d.mu.Unlock()
	d.log.Info("revocation received", "key", key)
	msg := encodeRevocation(blob)
	if spread {
		if len(msg) <= maxBroadcastSize {
			d.relay.QueueBroadcast(&broadcast{node: "revocation/" + key, msg: msg})
		} else {
			slices.Sort(members)
			for _, name := range members {
				d.enqueue(func() { d.sendTo(name, msg) })
			}
		}
	}
	d.notifySubscribers()
}

// revocationMsgsLocked returns every revocation as a message, for push/pull.
func (d *Discovery) revocationMsgsLocked() [][]byte {
	out := make([][]byte, 0, len(d.revocations))
	for _, b := range d.revocations {
		out = append(out, encodeRevocation(b))
	}
	return out
}
