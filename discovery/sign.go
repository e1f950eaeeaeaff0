package discovery

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"time"
)

// Signer signs this host's catalog entry with its node SVID (ca.Client
// implements it). Safe for concurrent use; it never blocks.
type Signer interface {
	// SignEntry signs digest (a SHA-256) with the node SVID's key and
	// returns the signature and the SVID chain it verifies with (leaf
	// first, DER, not the root). It fails while the host has no node SVID.
	SignEntry(digest []byte) (sig []byte, chain [][]byte, err error)
	// NodeCert returns the current node SVID leaf (DER), nil before there
	// is one: a new one (renewal) makes Discovery sign its entry again.
	NodeCert() []byte
}

// CertVerifier checks the certificates that sign peers' catalog entries
// (ca.NodeVerifier implements it). Safe for concurrent use.
type CertVerifier interface {
	// VerifyNodeChain verifies a node SVID chain (leaf first, DER) against
	// the mesh roots as of now and says whose it is and what it grants.
	VerifyNodeChain(chain [][]byte) (NodeCert, error)
}

// NodeCert is a verified node SVID.
type NodeCert struct {
	// Node is the host's name (its SPIFFE ID is spiffe://TD/node/Node).
	Node string
	// Services the CA granted the host: its entry may declare no other.
	Services []string
	// Key is the leaf's public key (ECDSA or Ed25519).
	Key crypto.PublicKey
	// NotAfter is when the leaf expires.
	NotAfter time.Time
}

// Limits of the signature state.
const (
	maxCerts        = 2 * maxEntries // verified certificates kept
	maxPending      = 1024           // entries waiting for their certificate
	certPullBackoff = 2 * time.Second
	// certPullDelay is the least time an entry waits for its certificate
	// to come by gossip before this host asks the owner (up to twice it).
	certPullDelay = 500 * time.Millisecond
	// maxCertBroadcast bounds a certificate gossiped whole: what fits a
	// gossip packet with memberlist's framing.
	maxCertBroadcast = 1300
)

// heldCert is a verified signing certificate.
type heldCert struct {
	NodeCert
	raw []byte // its msgCert encoding, to answer requests and for joins
}

// pendingEntry is a signed entry whose certificate is not known yet.
type pendingEntry struct {
	msg         message
	raw         []byte
	rebroadcast bool
}

// Rejection reasons of signed catalog entries.
const (
	rejectUnsigned  = "unsigned"
	rejectSignature = "bad_signature"
	rejectCert      = "bad_certificate"
	rejectGrant     = "not_granted"
)

func idOf(leaf []byte) certID { return sha256.Sum256(leaf) }

// signLocked turns an encoded entry into what this host publishes: signed
// when it has a Signer and a node SVID, else as it is.
func (d *Discovery) signLocked(payload []byte) []byte {
	if d.signer == nil {
		return payload
	}
	digest := sha256.Sum256(payload)
	sig, chain, err := d.signer.SignEntry(digest[:])
	if err != nil || len(chain) == 0 {
		d.signedLeaf = nil
		d.log.Debug("catalog entry published unsigned: no node certificate yet", "err", err)
		return payload
	}
	id := idOf(chain[0])
	if id != d.selfCertID || d.selfCert == nil {
		d.selfCertID, d.selfCert = id, encodeCert(chain)
		// Gossip the new certificate along with the entry it signs, so
		// that peers need not each ask this host for it (at 500 hosts
		// joining at once that was 250,000 requests). A chain too large
		// for a gossip packet is pulled as before.
		if len(d.selfCert) <= maxCertBroadcast {
			d.queue.QueueBroadcast(&broadcast{node: d.name + "\x00cert", msg: d.selfCert})
		}
		// Known verified, so that this host can check entries of its own
		// that come back to it.
		if d.verifier != nil {
			if nc, err := d.verifier.VerifyNodeChain(chain); err == nil {
				d.certs[id] = &heldCert{NodeCert: nc, raw: d.selfCert}
			} else {
				d.log.Warn("this host's own node certificate does not verify: peers will refuse its catalog entry", "err", err)
			}
		}
	}
	d.signedLeaf = chain[0]
	return encodeSigned(payload, sig, id)
}

// resignDue reports whether the node SVID changed since this host last
// signed its entry (it arrived, or was renewed).
func (d *Discovery) resignDue() bool {
	if d.signer == nil {
		return false
	}
	leaf := d.signer.NodeCert()
	d.mu.Lock()
	defer d.mu.Unlock()
	return leaf != nil && !bytes.Equal(leaf, d.signedLeaf)
}

// acceptEntry handles a catalog entry from the network (gossip, a pull
// reply, push/pull): unsigned entries go on only without a verifier;
// signed ones once their signature checks out, or when their certificate
// arrives.
func (d *Discovery) acceptEntry(msg message, raw []byte, rebroadcast bool) {
	d.expand(&msg.entry)
	if msg.typ == msgEntry {
		if d.verifier != nil {
			d.refuse(rejectUnsigned, msg.entry.Node, "")
			return
		}
		d.mergeEntry(msg, raw, rebroadcast)
		return
	}
	e := &msg.entry
	if d.verifier == nil {
		d.mergeEntry(msg, raw, rebroadcast)
		return
	}
	d.mu.Lock()
	held := d.version // this host's own
	if e.Node != d.name {
		held = 0
		if old := d.entries[e.Node]; old != nil {
			held = old.entry.Version
		}
	}
	if e.Version <= held {
		d.mu.Unlock()
		return // not newer: no need to verify
	}
	c := d.certs[msg.cert]
	if c != nil && !c.NotAfter.After(time.Now()) {
		delete(d.certs, msg.cert)
		c = nil
	}
	if c == nil {
		d.awaitCertLocked(msg, raw, rebroadcast)
		d.mu.Unlock()
		return
	}
	d.mu.Unlock()
	if reason, why := d.checkSigned(msg, &c.NodeCert); reason != "" {
		d.refuse(reason, e.Node, why)
		return
	}
	// Services the CA did not grant the host are left out (the rest of
	// its entry stands): a service declared before `vmesh node grant`
	// reaches its node certificate appears with the renewal that follows.
	if i := slices.IndexFunc(e.Services, func(s ServiceEntry) bool { return !slices.Contains(c.Services, s.Name) }); i >= 0 {
		kept := make([]ServiceEntry, 0, len(e.Services))
		for _, s := range e.Services {
			if slices.Contains(c.Services, s.Name) {
				kept = append(kept, s)
			} else {
				d.refuse(rejectGrant, e.Node, "service "+s.Name+" is not granted to it")
			}
		}
		msg.entry.Services = kept
	}
	d.mergeEntry(msg, raw, rebroadcast)
}

// checkSigned checks a signed entry against its (verified) certificate.
func (d *Discovery) checkSigned(msg message, c *NodeCert) (reason, why string) {
	e := &msg.entry
	if c.Node != e.Node {
		return rejectSignature, fmt.Sprintf("signed by node %s", c.Node)
	}
	if e.Identity != "spiffe://"+d.td+"/node/"+e.Node {
		return rejectSignature, fmt.Sprintf("identity %s", e.Identity)
	}
	digest := sha256.Sum256(msg.payload)
	ok := false
	switch k := c.Key.(type) {
	case *ecdsa.PublicKey:
		ok = ecdsa.VerifyASN1(k, digest[:], msg.sig)
	case ed25519.PublicKey:
		ok = ed25519.Verify(k, digest[:], msg.sig)
	}
	if !ok {
		return rejectSignature, "signature does not verify"
	}
	return "", ""
}

// awaitCertLocked parks a signed entry until its certificate arrives and
// asks the entry's owner for it.
func (d *Discovery) awaitCertLocked(msg message, raw []byte, rebroadcast bool) {
	node := msg.entry.Node
	p := d.pending[node]
	switch {
	case p == nil && len(d.pending) >= maxPending:
		d.metrics.rejected.WithLabelValues(rejectTooMany).Inc()
		return
	case p == nil || p.msg.entry.Version < msg.entry.Version:
		p = &pendingEntry{msg: msg, raw: bytes.Clone(raw), rebroadcast: rebroadcast}
		d.pending[node] = p
	}
	// Ask again for the certificate of the entry waiting (a copy that
	// arrived before this host had the mesh roots was refused).
	msg = p.msg
	if t, ok := d.certPullAt[msg.cert]; ok && time.Since(t) < d.dur(certPullBackoff) {
		return
	}
	d.certPullAt[msg.cert] = time.Now()
	d.log.Debug("catalog entry waits for its signing certificate", "node", node, "version", msg.entry.Version)
	// The certificate usually follows by gossip (its owner broadcasts it
	// with its first entry): ask the owner only if it has not come after
	// a jittered moment, so that a cluster forming at once does not ask
	// every owner at once.
	id := msg.cert
	req := encodeCertRequest(d.name, id)
	time.AfterFunc(d.dur(certPullDelay)+rand.N(d.dur(certPullDelay)), func() {
		d.mu.Lock()
		p := d.pending[node]
		waiting := p != nil && p.msg.cert == id
		d.mu.Unlock()
		if waiting {
			d.enqueue(func() { d.sendTo(node, req) })
		}
	})
}

// acceptCert verifies a signing certificate and merges the entries that
// waited for it; one new to this host that came by gossip is passed on
// (relay), as entries are.
func (d *Discovery) acceptCert(chain [][]byte, relay bool) {
	if d.verifier == nil || len(chain) == 0 {
		return
	}
	id := idOf(chain[0])
	d.mu.Lock()
	_, known := d.certs[id]
	d.mu.Unlock()
	if !known {
		owned := make([][]byte, len(chain))
		for i, c := range chain {
			owned[i] = bytes.Clone(c)
		}
		nc, err := d.verifier.VerifyNodeChain(owned)
		if err != nil {
			d.refuse(rejectCert, "", err.Error())
			return
		}
		d.mu.Lock()
		if len(d.certs) >= maxCerts {
			d.pruneCertsLocked()
		}
		raw := encodeCert(owned)
		if len(d.certs) < maxCerts {
			d.certs[id] = &heldCert{NodeCert: nc, raw: raw}
		}
		delete(d.certPullAt, id)
		d.mu.Unlock()
		if relay && len(raw) <= maxCertBroadcast && nc.Node != d.name {
			d.relay.QueueBroadcast(&broadcast{node: nc.Node + "\x00cert", msg: raw})
		}
		d.log.Debug("signing certificate verified", "node", nc.Node, "services", nc.Services)
	}
	d.mu.Lock()
	var ready []*pendingEntry
	for node, p := range d.pending {
		if p.msg.cert == id {
			ready = append(ready, p)
			delete(d.pending, node)
		}
	}
	d.mu.Unlock()
	for _, p := range ready {
		d.acceptEntry(p.msg, p.raw, p.rebroadcast)
	}
}

// pruneCertsLocked forgets expired certificates and those no held entry
// was signed with.
func (d *Discovery) pruneCertsLocked() {
	used := map[certID]bool{}
	for _, pe := range d.entries {
		used[pe.cert] = true
	}
	now := time.Now()
	for id, c := range d.certs {
		if !used[id] || !c.NotAfter.After(now) {
			delete(d.certs, id)
		}
	}
	for id, t := range d.certPullAt {
		if now.Sub(t) > d.dur(certPullBackoff) {
			delete(d.certPullAt, id)
		}
	}
}

// certRaw returns the msgCert encoding of a held certificate (this host's
// own included), or nil.
func (d *Discovery) certRawLocked(id certID) []byte {
	if id == d.selfCertID && d.selfCert != nil {
		return d.selfCert
	}
	if c := d.certs[id]; c != nil {
		return c.raw
	}
	return nil
}

// refuse counts and logs a refused catalog payload: at warn level at most
// once a second (a forger must not flood the log), else at debug.
func (d *Discovery) refuse(reason, node, why string) {
	d.metrics.rejected.WithLabelValues(reason).Inc()
	now := time.Now().UnixNano()
	last := d.refusedLog.Load()
	level := slog.LevelDebug
	if now-last >= int64(time.Second) && d.refusedLog.CompareAndSwap(last, now) {
		level = slog.LevelWarn
	}
	d.log.Log(context.Background(), level, "gossip catalog entry refused", "reason", reason, "node", node, "why", why)
}
