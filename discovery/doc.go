// Package discovery is the gossip cluster (hashicorp/memberlist) and the
// service catalog built on it: membership, encrypted gossip, catalog sync,
// health checks, failure detection, and the persistence of known peers so
// that a restarted host rejoins without its join list.
//
// # Use from node
//
//	keys, err := discovery.ReadKeyFile(cfg.Gossip.KeyFile) // if KeyFile != ""
//	d, err := discovery.New(discovery.Options{Config: cfg.Gossip, NodeName: ...,
//		AdvertiseAddr: ..., ProxyPort: ..., TrustDomain: ..., DB: db, Keys: keys,
//		Logger: log, Registerer: reg})
//	d.SetLocal(services)          // at start and on every reload
//	go d.Run(ctx)                 // <-d.Ready() once the gossip port is bound
//	...
//	d.SetKeys(keys)               // on reload, from the key file
//	d.Leave(timeout); d.Close()   // on SIGTERM; Close alone is a crash
//
// The proxy reads the catalog with Lookup (by destination address) and
// Endpoints (healthy instances of a service), both lock-free reads of an
// immutable snapshot, and learns of changes through Subscribe. The admin API
// serves Members and Catalog, whose types carry JSON tags.
//
// # How the catalog spreads
//
// Each host is the only writer of its NodeEntry; every change (SetLocal, a
// health check flipping) gives it a new, larger version (nanoseconds since
// the epoch, kept in bbolt so it never goes back). The entry is queued as a
// memberlist broadcast, and every host that receives a newer entry queues it
// again, so it spreads epidemically in a few gossip rounds. Entries too large
// for a gossip packet (over maxBroadcastSize) spread as a notice instead, and
// hosts pull the entry from its owner over TCP. The catalog version is also
// in the memberlist metadata, so a host that missed a broadcast notices the
// newer version and pulls it from the owner; push/pull (every
// PushPullInterval, scaled up by memberlist with the cluster's size)
// repairs the metadata. A join's push/pull carries every entry, so that a
// new host starts with the whole catalog; later ones carry only the
// sender's own entry.
//
// # Signed entries
//
// With a Signer and a CertVerifier (node wires the CA client and
// ca.NodeVerifier), each host signs its entry with its node SVID's key; the
// message carries the signature and the SHA-256 of the signing leaf, not
// the certificate. A receiver that does not know the certificate parks the
// entry and asks the owner, which answers with its certificate chain and its
// entry in one send; certificates also travel in join push/pulls. Receivers
// keep only entries signed by spiffe://TD/node/<that host> (chain verified
// to the mesh roots), and leave out services the node's certificate does not
// grant. A gossip-key holder can therefore neither forge nor empty another
// host's entry. An owner that sees a newer entry of its own than it
// published (an earlier run's) publishes above it. A renewed node SVID makes
// the host sign its entry again. Identities equal to the default for their
// name are left off the wire.
//
// The owner's broadcast goes out with memberlist's retransmit count; hosts
// that pass an entry on use fewer (relayRetransmitMult), and a host whose
// metadata showed a newer version for pullGrace without the broadcast
// arriving pulls the entry (at most maxPullsPerTick pulls per tick).
// Snapshot rebuilds are coalesced (rebuildGap) and patch the previous
// snapshot with the hosts recorded as changed, so that a change costs in
// proportion to that host's services; a rebuild from every entry runs at
// least every fullRebuildEvery.
//
// # Revocations and mesh addresses
//
// PublishRevocation spreads a revocation signed by the CA (verified through
// Options.Revocations) to every host: by gossip when it fits a packet, by a
// reliable send to each live member otherwise, and in every push/pull; node
// hands them to the CA and to the proxies' verifier. Every member address
// ever seen is kept in bbolt (bucket discovery/addrs): MemberAddr says the
// proxy must never send to it in clear, even after this host restarted.
//
// Peers keep the newest entry per host but show only those of hosts that
// memberlist holds alive: a host declared dead, or that left, disappears from
// Lookup, Endpoints and Catalog at once. A host that calls Leave first
// publishes an entry without services marked Leaving, which also lets peers
// tell "left" from "dead" (memberlist's events do not).
//
// Payloads are a compact binary encoding (codec.go) whose decoder checks every
// length before allocating; malformed or oversized payloads are refused and
// counted in gossip_rejected_total.
//
// # Health checks
//
// The owning host runs each service's check (TCP connect or HTTP GET with an
// expected status) against the service on its own advertised address,
// directly, never through the proxy; the first result sets the state, then
// HealthyThreshold passes or UnhealthyThreshold failures in a row change it.
//
// # Gossip encryption
//
// With keys, memberlist encrypts with the first key and accepts any installed
// one; incoming and outgoing verification stay on, so a host without a valid
// key cannot join. Rotation without downtime: InstallKey on every host, then
// UseKey on every host, then RemoveKey of the old one (SetKeys does the right
// steps from the key file's contents). Encryption cannot be switched on or
// off without a restart.
package discovery
