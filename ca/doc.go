// Package ca is vmesh's embedded certificate authority, built on
// smallstep/certificates, and the certificate client every host runs: join
// tokens, node and workload X.509-SVIDs, renewal, the trust bundle, and the
// verification of peers' SPIFFE identities.
//
// # CA hosts
//
// [Init] creates the root, the intermediate and the join-token key in a CA
// directory (`vmesh ca init`). A host holding that directory runs a [Server]:
// smallstep's authority (authority.NewEmbedded) on the CA's own bbolt file,
// serving over TLS:
//
//   - smallstep's routes under /1.0: roots, sign (join with a token), renew
//     and rekey (node SVIDs, mTLS with the current node SVID);
//   - POST /vmesh/1.0/svid: service SVIDs, mTLS with the caller's node SVID.
//
// Service SVIDs use vmesh's own endpoint rather than an X5C provisioner: the
// node proves itself by the TLS handshake it already makes, and the grant
// (which services that node's token allowed) and the revocation list are
// checked in one place before smallstep signs. Only node SVIDs renew through
// smallstep's routes; a service SVID is always re-requested, so a revoked node
// cannot keep its services alive.
//
// [Server.CreateToken] mints a single-use JWK token (sub =
// spiffe://TD/node/NAME, aud = the CA's sign URL, sha = the root fingerprint)
// and records the node's granted services in the CA database. The node SVID
// carries the grant in a non-critical extension, so every CA host sharing the
// intermediate can issue that node's service SVIDs; a token only works on the
// CA that minted it. [Server.Revoke] refuses the node's renewals and service
// SVIDs on that CA host and returns the revocation signed with the
// intermediate; node gossips it, every other CA host applies it
// ([Server.ApplyRevocation]) and every proxy's [Verifier] refuses the
// node's node SVID and the service SVIDs listed by serial ([Verifier.Revoke]).
//
// Node SVIDs renew through POST /vmesh/1.0/svid with the node's own ID: the
// CA applies the grant it records now (so `vmesh node grant` reaches the
// node SVID, which carries the grant peers check on its signed catalog
// entry), and accepts a node SVID that expired less than
// ca.renew_after_expiry ago (default 7 days): the TLS handshake proves the
// key, so a host recovers on its own after a CA outage or a long power-off.
// A host whose certificates expired is never ready ([Client.Expired]).
//
// # Every host
//
// A [Client] joins once with a token (pinning the root by fingerprint), or
// in-process from a local [Server] on a CA host, then keeps its node SVID and
// one SVID per declared service, renewed at about 2/3 of their lifetime with
// jitter, node first. Key and chains persist in the node's bbolt file (bucket
// "ca/identity"), so a restarted host keeps its identity without a token. TLS
// takes certificates through [Client.GetCertificate] and
// [Client.GetClientCertificate], so rotation needs no restart, and checks
// peers with [VerifySVID].
//
// SPIFFE IDs: spiffe://TD/node/NAME for hosts, spiffe://TD/svc/NAME for
// services, spiffe://TD/ca for the CA API's own certificate (clients accept
// the CA API only with that ID; VerifySVID refuses it as a peer).
package ca
