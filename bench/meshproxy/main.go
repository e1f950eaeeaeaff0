// Command meshproxy runs vmesh's data path alone, for the bench harness's
// "vmesh-proxy" column: the proxy package with a static catalog and
// certificates read from files (made by bench.WriteSVIDs), no gossip and no
// CA. The iptables rules come from `vmesh rules install`. It measures the
// proxy before the agent is wired, and separates data-path costs from the
// agent's.
//
//	meshproxy -td bench.local -root root.pem -node node-h1.pem \
//	  -peer 198.18.0.2 -remote http:8080:auto,redis:6379:opaque \
//	  -local echo:9001:opaque -svc-dir DIR -control /tmp/h1.sock
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmesh/vmesh/proxy"
)

func main() {
	td := flag.String("td", "bench.local", "trust domain")
	root := flag.String("root", "", "root certificate (PEM)")
	nodeCert := flag.String("node", "", "node SVID with key (PEM), the client certificate")
	svcDir := flag.String("svc-dir", "", "directory of svc-<name>.pem for the local services")
	peer := flag.String("peer", "", "address of the peer host whose services are remote")
	remote := flag.String("remote", "", "remote services name:port:protocol,...")
	local := flag.String("local", "", "local services name:port:protocol,...")
	control := flag.String("control", "", "unix socket serving /debug/pprof")
	mark := flag.Uint("mark", 0x4143, "SO_MARK on the proxy's own connections (the rules' proxy_mark), 0: none")
	flag.Parse()
	if err := run(*td, *root, *nodeCert, *svcDir, *peer, *remote, *local, *control, uint32(*mark)); err != nil {
		fmt.Fprintln(os.Stderr, "meshproxy:", err)
		os.Exit(1)
	}
}

type svc struct {
	name  string
	port  uint16
	proto string
}

func parseServices(s string) ([]svc, error) {
	var out []svc
	for _, f := range strings.Split(s, ",") {
		if f == "" {
			continue
		}
		p := strings.Split(f, ":")
		if len(p) != 3 {
			return nil, fmt.Errorf("service %q: want name:port:protocol", f)
		}
		port, err := strconv.ParseUint(p[1], 10, 16)
		if err != nil {
			return nil, fmt.Errorf("service %q: %w", f, err)
		}
		out = append(out, svc{p[0], uint16(port), p[2]})
	}
	return out, nil
}

// identity serves certificates read once from files.
type identity struct {
	td    string
	roots *x509.CertPool
	node  *tls.Certificate
	svcs  map[string]*tls.Certificate
}

func (i *identity) GetCertificate(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if c, ok := i.svcs[h.ServerName]; ok {
		return c, nil
	}
	return i.node, nil
}

func (i *identity) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return i.node, nil
}

func (i *identity) Roots() *x509.CertPool { return i.roots }
func (i *identity) TrustDomain() string   { return i.td }

// catalog is a fixed map of the peer's service addresses.
type catalog map[netip.AddrPort]proxy.Endpoint

func (c catalog) Resolve(a netip.AddrPort) proxy.Destination {
	if ep, ok := c[a]; ok {
		return proxy.Destination{Kind: proxy.DestEndpoint, Endpoint: ep, Service: ep.Service}
	}
	return proxy.Destination{}
}

func (c catalog) Endpoints(service string) ([]proxy.Endpoint, uint64) {
	var eps []proxy.Endpoint
	for _, ep := range c {
		if ep.Service == service {
			eps = append(eps, ep)
		}
	}
	return eps, 0
}

func run(td, root, nodeCert, svcDir, peer, remote, local, control string, mark uint32) error {
	pem, err := os.ReadFile(root)
	if err != nil {
		return fmt.Errorf("reading root: %w", err)
	}
	id := &identity{td: td, roots: x509.NewCertPool(), svcs: map[string]*tls.Certificate{}}
	if !id.roots.AppendCertsFromPEM(pem) {
		return errors.New("no certificate in root file")
	}
	nc, err := tls.LoadX509KeyPair(nodeCert, nodeCert)
	if err != nil {
		return fmt.Errorf("loading node certificate: %w", err)
	}
	id.node = &nc

	locals, err := parseServices(local)
	if err != nil {
		return err
	}
	var ls []proxy.LocalService
	for _, s := range locals {
		f := filepath.Join(svcDir, "svc-"+s.name+".pem")
		c, err := tls.LoadX509KeyPair(f, f)
		if err != nil {
			return fmt.Errorf("loading certificate of %s: %w", s.name, err)
		}
		id.svcs[s.name] = &c
		ls = append(ls, proxy.LocalService{Name: s.name, Port: s.port, Protocol: s.proto})
	}

	cat := catalog{}
	remotes, err := parseServices(remote)
	if err != nil {
		return err
	}
	if len(remotes) > 0 {
		pa, err := netip.ParseAddr(peer)
		if err != nil {
			return fmt.Errorf("parsing -peer: %w", err)
		}
		for _, s := range remotes {
			a := netip.AddrPortFrom(pa, s.port)
			cat[a] = proxy.Endpoint{
				Node: "peer", Service: s.name, Addr: a, ProxyAddr: netip.AddrPortFrom(pa, 4143),
				Identity: fmt.Sprintf("spiffe://%s/svc/%s", td, s.name), Protocol: s.proto,
				Opaque: s.proto == "opaque", Healthy: true,
			}
		}
	}

	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	p, err := proxy.New(proxy.DefaultConfig(), proxy.Options{
		Catalog: cat, Identity: id, Services: ls, Logger: log, Dialer: proxy.MarkDialer(mark, time.Second),
	})
	if err != nil {
		return err
	}
	if err := p.Listen(); err != nil {
		return err
	}
	if control != "" {
		os.Remove(control)
		ln, err := net.Listen("unix", control)
		if err != nil {
			return fmt.Errorf("listening on control socket: %w", err)
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		go http.Serve(ln, mux)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	fmt.Println("ready")
	return p.Serve(ctx)
}
