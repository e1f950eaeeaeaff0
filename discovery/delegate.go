package discovery

import (
	"bytes"
	"errors"
	"net/netip"
	"time"

	"github.com/hashicorp/memberlist"
)

// delegate connects Discovery to memberlist: it implements
// memberlist.Delegate (catalog payloads) and memberlist.EventDelegate
// (membership changes).
//
// Concurrency rules. Memberlist calls these methods from its own goroutines
// (packet handler, stream handlers, gossip and probe loops), concurrently,
// and the event methods with its node lock held. Therefore every method:
//   - is safe for concurrent use (state lives in Discovery under d.mu);
//   - never blocks: it holds d.mu only for map updates, decodes and encodes
//     in memory, and hands anything slow (network sends, bbolt writes,
//     metadata updates, snapshot rebuilds) to Discovery's goroutines with
//     non-blocking channel sends, dropping and counting when a queue is full;
//   - never calls into memberlist (it could deadlock on the node lock);
//   - copies any part of a buffer it keeps: memberlist reuses them.
type delegate struct{ d *Discovery }

var (
	_ memberlist.Delegate      = (*delegate)(nil)
	_ memberlist.EventDelegate = (*delegate)(nil)
)

// NodeMeta returns the metadata prepared by publishLocked (≤ 512 bytes).
func (g *delegate) NodeMeta(limit int) []byte {
	m := *g.d.meta.Load()
	if len(m) > limit {
		return nil
	}
	return m
}

// NotifyMsg handles a broadcast or a reliably sent catalog message.
func (g *delegate) NotifyMsg(buf []byte) {
	d := g.d
	msg, err := decodeMessage(buf)
	if err != nil {
		d.reject(err)
		return
	}
	switch msg.typ {
	case msgEntry, msgSigned:
		d.acceptEntry(msg, bytes.Clone(buf), true)
	case msgNotice:
		d.notice(msg.node, msg.version, true)
	case msgRequest:
		// Reply only to the requester's memberlist address, never to an
		// address named in the message (which would make this host dial
		// wherever a gossip-key holder points it). A requester not yet in
		// the member list asks again (anti-entropy).
		node := msg.node
		d.enqueue(func() { d.sendTo(node, d.selfState()) })
	case msgCert:
		d.acceptCert(msg.chain, true)
	case msgCertReq:
		node, id := msg.node, msg.cert
		d.mu.Lock()
		raw := d.certRawLocked(id)
		own := id == d.selfCertID
		d.mu.Unlock()
		switch {
		case own:
			// The requester wants this host's entry too (it saw it signed
			// with that certificate): both in one send.
			d.enqueue(func() { d.sendTo(node, d.selfState()) })
		case raw != nil:
			d.enqueue(func() { d.sendTo(node, raw) })
		}
	case msgState:
		// A pull reply: this host's certificate and entry.
		g.mergeState(msg)
	case msgRevoke:
		d.acceptRevocation(msg.blob, true)
	default:
		d.reject(errMalformed)
	}
}

// selfState is this host's reply to a pull: its signing certificate (when
// it signs) and its entry, in one message.
func (d *Discovery) selfState() []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.selfCert == nil {
		return encodeState([][]byte{d.selfRaw}, time.Time{})
	}
	return encodeState([][]byte{d.selfCert, d.selfRaw}, time.Time{})
}

// GetBroadcasts hands queued catalog messages to memberlist's gossip.
func (g *delegate) GetBroadcasts(overhead, limit int) [][]byte {
	d := g.d
	own := d.queue.GetBroadcasts(overhead, limit)
	for _, m := range own {
		limit -= overhead + len(m)
	}
	return append(own, d.relay.GetBroadcasts(overhead, limit)...)
}

// LocalState is this host's side of a push/pull. On a join it is the
// whole catalog (the entries of the hosts it holds alive, with their
// certificates), so that a joining host starts complete. Otherwise it is
// this host's own entry: memberlist's half of the exchange carries every
// member's metadata, which holds its catalog version, and anti-entropy
// pulls any entry held older than that from its owner. Sending every entry
// in every push/pull cost about 300 bytes per host per exchange (150 KB at
// 500 hosts) to repair what metadata already repairs.
func (g *delegate) LocalState(join bool) []byte {
	d := g.d
	d.mu.Lock()
	if !join {
		list := append([][]byte{d.selfRaw}, d.revocationMsgsLocked()...)
		d.mu.Unlock()
		return encodeState(list, time.Now())
	}
	list := make([][]byte, 0, len(d.entries)+1)
	var certs [][]byte
	if d.selfCert != nil {
		// A joining host knows no certificate yet: hand it those of the
		// entries it gets, so that it need not pull each from its owner.
		certs = append(certs, d.selfCert)
	}
	list = append(list, d.selfRaw)
	for name, pe := range d.entries {
		if m := d.members[name]; m != nil && m.state == StateAlive {
			list = append(list, pe.raw)
			if c := d.certs[pe.cert]; c != nil {
				certs = append(certs, c.raw)
			}
		}
	}
	list = append(list, d.revocationMsgsLocked()...)
	d.mu.Unlock()
	return encodeState(append(certs, list...), time.Now())
}

// MergeRemoteState merges a peer's side of a push/pull, keeping the newest
// entry of each host.
func (g *delegate) MergeRemoteState(buf []byte, join bool) {
	d := g.d
	if len(buf) == 0 {
		return
	}
	msg, err := decodeMessage(buf)
	if err == nil && msg.typ != msgState {
		err = errMalformed
	}
	if err != nil {
		d.reject(err)
		return
	}
	if msg.sentAt != 0 {
		// The sender's own entry comes first after the certificates
		// (LocalState). The clock offset is a diagnostic only.
		if node := firstEntryNode(msg.entries); node != "" {
			d.noteClock(node, time.UnixMilli(msg.sentAt), time.Now())
		}
	}
	g.mergeState(msg)
}

// mergeState merges the certificates and entries of a msgState message.
func (g *delegate) mergeState(msg message) {
	d := g.d
	for _, raw := range msg.entries {
		m, err := decodeMessage(raw)
		if err == nil && m.typ != msgEntry && m.typ != msgSigned && m.typ != msgCert && m.typ != msgRevoke {
			err = errMalformed
		}
		if err != nil {
			d.reject(err)
			continue
		}
		switch m.typ {
		case msgCert:
			d.acceptCert(m.chain, false)
			continue
		case msgRevoke:
			d.acceptRevocation(m.blob, false)
			continue
		}
		d.acceptEntry(m, bytes.Clone(raw), false)
	}
}

// NotifyJoin records a host that became alive.
func (g *delegate) NotifyJoin(n *memberlist.Node) { g.d.memberAlive(n) }

// NotifyUpdate records a host whose metadata changed.
func (g *delegate) NotifyUpdate(n *memberlist.Node) { g.d.memberAlive(n) }

// NotifyLeave records a host that died or left; its endpoints disappear.
func (g *delegate) NotifyLeave(n *memberlist.Node) {
	d := g.d
	if n.Name == d.name {
		return
	}
	// n.State is not maintained by memberlist: a host that left says so in
	// its last catalog entry (which may also arrive after this event).
	d.mu.Lock()
	m := d.members[n.Name]
	if m == nil {
		m = &member{}
		d.members[n.Name] = m
	}
	m.addr, m.state, m.since = nodeAddr(n), StateDead, time.Now()
	d.changed[n.Name] = struct{}{}
	d.noteAddrLocked(m.addr.Addr())
	if pe := d.entries[n.Name]; pe != nil && pe.entry.Leaving {
		d.markLeftLocked(n.Name)
	}
	state := m.state
	d.countAliveLocked()
	d.mu.Unlock()
	d.log.Info("host gone", "node", n.Name, "state", state)
	d.kick(d.dirty)
}

func (d *Discovery) memberAlive(n *memberlist.Node) {
	if n.Name == d.name {
		d.mu.Lock()
		d.selfAddr = nodeAddr(n)
		d.mu.Unlock()
		return
	}
	meta, err := decodeMeta(n.Meta)
	if err != nil {
		d.reject(err)
	}
	addr := nodeAddr(n)
	d.mu.Lock()
	m := d.members[n.Name]
	if m == nil {
		m = &member{}
		d.members[n.Name] = m
	}
	wasAlive := m.state == StateAlive
	m.addr, m.state, m.meta = addr, StateAlive, meta
	d.changed[n.Name] = struct{}{}
	d.noteAddrLocked(addr.Addr())
	if !wasAlive {
		m.since = time.Now()
	}
	if p, ok := d.storedPeers[n.Name]; !ok || p.Addr != addr {
		d.dirtyPeers[n.Name] = &storedPeer{Addr: addr}
		d.kick(d.slow)
	}
	d.countAliveLocked()
	// A newer version is pulled by anti-entropy if its broadcast does not
	// arrive first.
	if pe := d.entries[n.Name]; pe == nil || pe.entry.Version < meta.version {
		if _, ok := d.newerSince[n.Name]; !ok {
			d.newerSince[n.Name] = time.Now()
		}
	}
	d.mu.Unlock()
	if !wasAlive {
		d.log.Info("host alive", "node", n.Name, "addr", addr)
	}
	d.kick(d.dirty)
}

// markLeftLocked records that a dead host had left gracefully: it is not
// reconnected to, and forgotten from the peers remembered for rejoining.
func (d *Discovery) markLeftLocked(name string) {
	d.members[name].state = StateLeft
	d.changed[name] = struct{}{}
	d.dirtyPeers[name] = nil
	d.kick(d.slow)
}

func (d *Discovery) countAliveLocked() {
	n := int64(1)
	for _, m := range d.members {
		if m.state == StateAlive {
			n++
		}
	}
	d.numAlive.Store(n)
}

// mergeEntry keeps an accepted entry if it is newer than what this host
// holds, and passes it on (when it came by broadcast) so that it spreads
// epidemically. An entry of this host newer than the one it published (an
// earlier run's, whose version this host lost) makes it publish above it.
func (d *Discovery) mergeEntry(msg message, raw []byte, rebroadcast bool) {
	e := msg.entry
	if e.Node == d.name {
		d.mu.Lock()
		if e.Version > d.version && !d.leaving {
			d.log.Info("a newer entry of this host is in the cluster: publishing above it", "version", e.Version)
			d.version = e.Version
			d.publishLocked()
			d.mu.Unlock()
			d.rebuild()
			return
		}
		d.mu.Unlock()
		return
	}
	// Versions are the writer's clock in nanoseconds. One far ahead of
	// ours would hide every later update of that host for good (the real
	// host could never publish a higher one): refuse it.
	if e.Version > uint64(time.Now().Add(maxClockSkew).UnixNano()) {
		d.metrics.rejected.WithLabelValues(rejectFuture).Inc()
		d.log.Warn("gossip entry refused: its version is in the future", "node", e.Node, "version", e.Version)
		return
	}
	d.mu.Lock()
	old := d.entries[e.Node]
	if old != nil && old.entry.Version >= e.Version {
		d.mu.Unlock()
		return
	}
	if old == nil && len(d.entries) >= maxEntries {
		d.mu.Unlock()
		d.metrics.rejected.WithLabelValues(rejectTooMany).Inc()
		return
	}
	d.entries[e.Node] = &peerEntry{entry: &e, raw: raw, at: time.Now(), cert: msg.cert}
	d.changed[e.Node] = struct{}{}
	for _, a := range e.Addrs {
		d.noteAddrLocked(a)
	}
	m := d.members[e.Node]
	visible := m != nil && m.state == StateAlive
	if e.Leaving && m != nil && m.state == StateDead {
		d.markLeftLocked(e.Node)
	}
	d.mu.Unlock()
	if rebroadcast {
		d.broadcast(e.Node, e.Version, raw, e.Leaving)
	}
	if visible {
		d.kick(d.dirty)
	}
}

// maxClockSkew is how far ahead of this host's clock an entry's version may be.
const maxClockSkew = 10 * time.Minute

// notice handles "host node is at version": pass it on and pull the entry
// if this host's copy is older.
func (d *Discovery) notice(node string, version uint64, rebroadcast bool) {
	if node == d.name {
		return
	}
	d.mu.Lock()
	newer := d.wantLocked(node, version)
	d.mu.Unlock()
	if newer && rebroadcast {
		d.relay.QueueBroadcast(&broadcast{node: node, msg: encodeNotice(node, version)})
	}
}

// wantLocked reports whether version is newer than the entry held for
// node, and if so asks node for its entry (once per version, again after
// pullBackoff if it has not come).
func (d *Discovery) wantLocked(node string, version uint64) bool {
	if pe := d.entries[node]; pe != nil && pe.entry.Version >= version {
		return false
	}
	if version == 0 {
		return false
	}
	if p, ok := d.pullAt[node]; ok && version <= p.version && time.Since(p.at) < d.dur(pullBackoff) {
		return true // already asked for this version
	}
	d.pullAt[node] = pull{at: time.Now(), version: version}
	req := encodeRequest(d.name, d.selfAddr)
	d.enqueue(func() {
		// The entry often arrives meanwhile (a joining host learns of its
		// peers just before their entries); ask only if still needed.
		d.mu.Lock()
		pe := d.entries[node]
		d.mu.Unlock()
		if pe == nil || pe.entry.Version < version {
			d.sendTo(node, req)
		}
	})
	return true
}

func (d *Discovery) reject(err error) {
	reason := rejectMalformed
	if errors.Is(err, errOversized) {
		reason = rejectOversized
	}
	d.metrics.rejected.WithLabelValues(reason).Inc()
	d.log.Debug("refused a gossip payload", "reason", reason)
}

// nodeMeta is what a host puts in its memberlist metadata.
type nodeMeta struct {
	version   uint64
	proxyPort uint16
	addrs     []netip.Addr
	roles     []string
	agent     string // the agent's version, at most maxAgentVersion bytes
}

// maxAgentVersion bounds the agent version in the metadata.
const maxAgentVersion = 40

// encodeMeta encodes m, dropping roles that would not fit in memberlist's
// 512 bytes.
func encodeMeta(m nodeMeta) []byte {
	e := encoder{}
	e.byte(wireFormat)
	e.uint(m.version)
	e.uint(uint64(m.proxyPort))
	addrs := m.addrs[:min(len(m.addrs), 8)]
	e.uint(uint64(len(addrs)))
	for _, a := range addrs {
		e.bytes(a.AsSlice())
	}
	var roles []string
	agent := m.agent
	if len(agent) > maxAgentVersion {
		agent = ""
	}
	size := len(e.b) + 1 + len(agent) + 2 // the agent version goes first in the budget
	for _, r := range m.roles {
		if size+len(r)+2 > memberlist.MetaMaxSize || len(r) > 64 {
			break
		}
		size += len(r) + 2
		roles = append(roles, r)
	}
	e.uint(uint64(len(roles)))
	for _, r := range roles {
		e.string(r)
	}
	// The agent version comes last: decoders stop before it when it is
	// absent (metadata from agents that did not send it).
	if agent != "" {
		e.string(agent)
	}
	return e.b
}

func decodeMeta(buf []byte) (nodeMeta, error) {
	var m nodeMeta
	if len(buf) == 0 {
		return m, nil // a host that does not run vmesh's discovery
	}
	if len(buf) > memberlist.MetaMaxSize {
		return m, errOversized
	}
	d := decoder{b: buf}
	if d.byte() != wireFormat {
		return nodeMeta{}, errMalformed
	}
	m.version = d.uint(1<<64 - 1)
	m.proxyPort = uint16(d.uint(65535))
	na := d.count(maxAddrs, 2)
	for range na {
		a, ok := netip.AddrFromSlice(d.raw(16))
		if !ok {
			d.fail(errMalformed)
			break
		}
		m.addrs = append(m.addrs, a)
	}
	nr := d.count(64, 1)
	for range nr {
		m.roles = append(m.roles, d.string())
	}
	if d.err == nil && len(d.b) != 0 {
		m.agent = d.string()
		if len(m.agent) > maxAgentVersion {
			d.fail(errMalformed)
		}
	}
	if d.err == nil && len(d.b) != 0 {
		d.err = errMalformed
	}
	if d.err != nil {
		return nodeMeta{}, d.err
	}
	return m, nil
}

// firstEntryNode returns the host of the first catalog entry among a push/
// pull state's messages, signed or not, or "".
func firstEntryNode(entries [][]byte) string {
	for _, raw := range entries {
		m, err := decodeMessage(raw)
		if err != nil {
			return ""
		}
		switch m.typ {
		case msgCert:
			continue
		case msgSigned:
			if m, err = decodeMessage(m.payload); err != nil || m.typ != msgEntry {
				return ""
			}
			return m.entry.Node
		case msgEntry:
			return m.entry.Node
		}
		return ""
	}
	return ""
}
