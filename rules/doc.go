// Package rules is iptables as data: Build is a pure function from the
// host's configuration to the nat-table rule set that sends its TCP traffic
// through the proxy, and an applier installs, converges and removes that rule
// set (IPv4 and IPv6) on whichever backend, nft or legacy, the host uses. It
// never edits chains it does not own.
//
// # Rules
//
// Two chains in the nat table, every rule tagged "-m comment --comment
// vmesh/<name>":
//
//	-A VMESH_INBOUND  (PREROUTING -p tcp jumps here) traffic addressed to this
//	   host (-m addrtype --dst-type LOCAL) on a declared service port, or on
//	   any port with capture-all, is REDIRECTed to the inbound proxy; skip
//	   ports (22 by default), vmesh's own ports and loopback destinations
//	   (127.0.0.0/8, ::1: a neighbour can send to them through this host's
//	   MAC, and PREROUTING sees them before the kernel's martian check)
//	   never are.
//	-A VMESH_OUTPUT   (OUTPUT -p tcp jumps here) RETURN for the proxy's uid
//	   (and gid), -o lo, local destinations, skip ports and vmesh's own ports,
//	   excluded CIDRs; REDIRECT the rest to the outbound proxy.
//
// All exemptions live inside vmesh's chains: a RETURN in the built-in OUTPUT
// chain would skip Docker's embedded-DNS DNAT that follows it. Multiport
// lists are split at 15 ports. (*Ruleset).String prints the set the way
// iptables-save does, for `vmesh rules show` and golden tests.
//
// # Applying
//
// The Applier reads the nat table (iptables -S), plans the difference and
// changes only that: applying the same Ruleset twice makes no change at all,
// not even a flush. Within a chain new rules go in before the rules they
// replace are deleted, so a changed proxy uid or port never opens a window in
// which the proxy's own traffic loops. Only vmesh's chains (VMESH_*) and
// vmesh's rules in built-in chains (tagged vmesh/, or jumping to VMESH_*) are
// ever touched; iptables-restore is never used.
//
// # Use from node
//
//	st := cfg.Rules.State(rules.State{
//		InboundPort: 4143, OutboundPort: 4140,
//		OwnPorts:     []uint16{adminPort, caPort, gossipPort},
//		ServicePorts: declaredServicePorts,
//	}, uint32(os.Getuid()))
//	opts := cfg.Rules.ApplierOptions()
//	opts.Logger = log
//	a, err := rules.NewApplier(opts)          // runs nothing yet
//	err = a.Apply(ctx, rules.Build(st))       // on start and on each reload
//	diff, err := a.Installed(ctx, rules.Build(st)) // vmesh check: "" = current
//	err = a.Uninstall(ctx)                    // on stop when on_stop = "remove"
//	err = a.Cleanup(ctx)                      // ExecStopPost / --cleanup
//
// Apply converges from any state, stale vmesh rules of an earlier run
// included, so start needs no Cleanup first (which would drop redirection
// for a moment). Cleanup also sweeps both families whatever the IPv6 setting
// and the other backend (nft or legacy) if vmesh rules are found there.
//
// Errors wrap ErrNoIptables, ErrPermission, ErrOwnerMatch or ErrNoNAT when
// those are the cause; their text says what to install or grant.
package rules
