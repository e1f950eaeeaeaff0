package bench

import (
	"fmt"
	"net/netip"
	"strings"
)

// Service is one backend the benchmarks load, on the server host.
type Service struct {
	Name string
	Port uint16
	// Opaque services are declared protocol="opaque" to vmesh.
	Opaque bool
}

// Services are the benchmark backends on the server host.
var Services = []Service{
	{Name: "http", Port: 8080}, // HTTP/1.1, h2c and WebSocket (/ws)
	{Name: "grpc", Port: 9003},
	{Name: "iperf", Port: 5201, Opaque: true},
	{Name: "redis", Port: 6379, Opaque: true},
	{Name: "echo", Port: 9001, Opaque: true},
	{Name: "hold", Port: 9002, Opaque: true},
}

// HAProxy's ports: the client-side proxy listens on loopback at
// HAProxyLocalOffset+port (the client dials that, as HAProxy has no
// transparent outbound capture here), and the server-side proxy terminates
// mTLS at HAProxyTLSOffset+port.
const (
	HAProxyLocalOffset = 10000
	HAProxyTLSOffset   = 20000
)

// HAProxyConfigs returns the configurations of the client-side and the
// server-side HAProxy: TCP mode, mTLS between them with certs (verified both
// ways), plain TCP to the backends on the server host's loopback.
// maxconn bounds each proxy's connections.
func HAProxyConfigs(server netip.Addr, certs PeerCerts, maxconn int) (client, srv string) {
	global := fmt.Sprintf(`global
    maxconn %d
    log stdout format raw local0 err
defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m
`, maxconn)
	var c, s strings.Builder
	c.WriteString(global)
	s.WriteString(global)
	for _, svc := range Services {
		fmt.Fprintf(&c, `frontend %[1]s_out
    bind 127.0.0.1:%[2]d
    default_backend %[1]s_tls
backend %[1]s_tls
    server s1 %[3]s ssl crt %[4]s ca-file %[5]s verify required verifyhost %[6]s sni str(%[6]s)
`, svc.Name, HAProxyLocalOffset+int(svc.Port), netip.AddrPortFrom(server, HAProxyTLSOffset+svc.Port),
			certs.Client, certs.CA, certs.ServerName)
		fmt.Fprintf(&s, `frontend %[1]s_in
    bind %[2]s ssl crt %[3]s ca-file %[4]s verify required
    default_backend %[1]s_local
backend %[1]s_local
    server s1 127.0.0.1:%[5]d
`, svc.Name, netip.AddrPortFrom(server, HAProxyTLSOffset+svc.Port), certs.Server, certs.CA, svc.Port)
	}
	return c.String(), s.String()
}
