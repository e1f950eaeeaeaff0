// Package discovery is the gossip cluster (hashicorp/memberlist) and the
// service catalog built on it: membership, encrypted gossip, catalog sync,
// health checks, failure detection, and the persistence of known peers so
// that a restarted host rejoins without its join list.
package discovery
