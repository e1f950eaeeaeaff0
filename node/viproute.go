package node

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
)

// The VIP range needs a route so that connect() to a VIP gets as far as the
// OUTPUT redirect: on a host with no default route (or one whose default
// route would refuse class E addresses) it fails with ENETUNREACH before
// netfilter sees it. The route points the range at the loopback device; the
// redirect then hands every such connection to the outbound proxy. It is
// installed with the rules and removed with them.

// installVIPRoute adds (or replaces) the route for prefix.
func installVIPRoute(ctx context.Context, prefix netip.Prefix) error {
	return ipRoute(ctx, "replace", prefix)
}

// removeVIPRoute removes the route for prefix; a route already gone is fine.
func removeVIPRoute(ctx context.Context, prefix netip.Prefix) error {
	err := ipRoute(ctx, "del", prefix)
	if err != nil && (strings.Contains(err.Error(), "No such process") || strings.Contains(err.Error(), "Cannot find")) {
		return nil
	}
	return err
}

// ipRoute runs `ip route op prefix dev lo src <loopback>`. The source must
// be named: loopback's address has host scope, so the kernel would
// otherwise pick 0.0.0.0 and the proxy's answers would go nowhere.
func ipRoute(ctx context.Context, op string, prefix netip.Prefix) error {
	family, src := "-4", "127.0.0.1"
	if prefix.Addr().Is6() {
		family, src = "-6", "::1"
	}
	args := []string{family, "route", op, prefix.Masked().String(), "dev", "lo"}
	if op != "del" {
		args = append(args, "src", src)
	}
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// CleanupVIPRoute removes the VIP route a crashed agent left behind
// (`vmesh agent --cleanup`).
func CleanupVIPRoute(ctx context.Context, cfg Config) error {
	return removeVIPRoute(ctx, cfg.Proxy.VIPRange)
}
