// Package rules is iptables as data: Build is a pure function from the
// host's configuration to the nat-table rule set that sends its TCP traffic
// through the proxy, and an applier installs, converges and removes that rule
// set (IPv4 and IPv6) on whichever backend, nft or legacy, the host uses. It
// never edits chains it does not own.
package rules
