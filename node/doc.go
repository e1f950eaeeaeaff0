// Package node is vmesh's composition root: it loads and validates the TOML
// configuration, opens the state database, builds and starts every other
// part in order, reloads on SIGHUP, drains on SIGTERM, serves the admin
// endpoints and tells systemd it is ready. It is the only package that
// imports all the others.
package node
