// Package node is vmesh's composition root: it loads and validates the TOML
// configuration, opens the state database, builds and starts every other
// part in order, reloads on SIGHUP, drains on SIGTERM, serves the admin
// endpoints and tells systemd it is ready. It is the only package that
// imports all the others.
//
// The admin API (read-only, admin.addr) serves /metrics, /ready, /live, the
// JSON views the CLI reads (/v1/status — including where the agent's config
// file and control socket are, so that every command can find them —
// /v1/config, /v1/members, /v1/services, /v1/golden) and a live web page at
// /. The control socket (admin.socket, 0600) carries what changes state:
// token create and list, node grant and revoke, keyring, reload; and the
// operator's live views (tap.go): GET /v1/tap streams the proxy's tap as
// NDJSON (filters service, direction, identity, path, method; a "dropped"
// line when the reader was too slow) for `vmesh tap` and `vmesh top`, and
// POST /v1/ping makes one mTLS round trip to each endpoint of a service or
// to a node's proxy for `vmesh ping`.
//
// A reload applies what it can and refuses, by key, what a long-lived part
// was built from (see reload.go).
package node
