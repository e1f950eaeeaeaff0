package proxy

import (
	"fmt"
	"testing"
)

// Issue 16: client TLS configs cached per service name are bounded.
func TestClientConfigCacheBounded(t *testing.T) {
	a := startProxy(t, "a", newTestCA(t, "vmesh.test"), proxyOpts{})
	for i := range 3 * maxClientConfigs {
		svc := fmt.Sprintf("svc-%d", i)
		a.p.clientConfig(Endpoint{Service: svc, Identity: "spiffe://vmesh.test/svc/" + svc}, alpnMux)
	}
	n := 0
	a.p.tlsConfigs.configs.Range(func(_, _ any) bool { n++; return true })
	if n > maxClientConfigs {
		t.Errorf("%d client TLS configs cached after %d services, want at most %d", n, 3*maxClientConfigs, maxClientConfigs)
	}
	if n == 0 {
		t.Error("nothing cached")
	}
}
