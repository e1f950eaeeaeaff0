package ca

import (
	"net/netip"
	"net/url"
	"regexp"
	"time"

	"github.com/vmesh/vmesh/internal/field"
)

// Role says whether a host holds the CA.
type Role string

const (
	// RoleClient hosts get certificates from a CA host.
	RoleClient Role = "client"
	// RoleServer hosts hold the intermediate and serve the CA API; they also
	// issue their own certificates.
	RoleServer Role = "server"
)

// Config is the [ca] section of the configuration.
type Config struct {
	// Role is "client" (default) or "server".
	Role Role `toml:"role"`
	// TrustDomain is the SPIFFE trust domain, e.g. "prod.example".
	// Default "vmesh.local". All hosts of a mesh must agree.
	TrustDomain string `toml:"trust_domain"`
	// URL is the CA API, e.g. "https://198.18.0.2:4192". Optional on a
	// client whose token carries it. On a server it is the URL written into
	// join tokens (ServerOptions.URL); default https://<advertise address>:<listen port>.
	URL string `toml:"url"`
	// Token is a one-time join token from `vmesh token create`, used on
	// first start only. TokenFile is read instead when set.
	Token     string `toml:"token"`
	TokenFile string `toml:"token_file"`
	// Dir holds the root certificate and, on a server, the intermediate
	// certificate and key made by `vmesh ca init`. Default <data_dir>/ca.
	Dir string `toml:"dir"`
	// ListenAddr is where a server serves the CA API. Default 0.0.0.0:4192.
	ListenAddr netip.AddrPort `toml:"listen_addr"`
	// CertLifetime is the lifetime of node and service SVIDs. Default 24h.
	CertLifetime time.Duration `toml:"cert_lifetime"`
	// RenewAfterExpiry is how long after its node certificate expired a
	// host may still renew it, proving its key by the TLS handshake (a CA
	// outage or a powered-off host outlasting the lifetime). Default 168h
	// (7 days); negative: never (the host then needs a new token).
	RenewAfterExpiry time.Duration `toml:"renew_after_expiry"`
}

// renewAfterExpiry resolves RenewAfterExpiry's default.
func (c *Config) renewAfterExpiry() time.Duration {
	switch {
	case c.RenewAfterExpiry < 0:
		return 0
	case c.RenewAfterExpiry == 0:
		return 7 * 24 * time.Hour
	}
	return c.RenewAfterExpiry
}

// DefaultConfig returns a fresh CA configuration with every default set.
func DefaultConfig() Config {
	return Config{
		Role:         RoleClient,
		TrustDomain:  "vmesh.local",
		ListenAddr:   netip.MustParseAddrPort("0.0.0.0:4192"),
		CertLifetime: 24 * time.Hour,
		// A week: a host powered off over a long weekend comes back alone.
		RenewAfterExpiry: 7 * 24 * time.Hour,
	}
}

var trustDomainRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9.\-_]*[a-z0-9])?$`)

// ValidTrustDomain reports whether td is a usable SPIFFE trust domain.
func ValidTrustDomain(td string) bool { return len(td) <= 255 && trustDomainRE.MatchString(td) }

// Validate checks c without changing it. Keys are relative to [ca].
func (c *Config) Validate() error {
	if c == nil {
		return nil
	}
	var errs field.List
	switch c.Role {
	case RoleClient, RoleServer:
	default:
		errs.Add("role", "must be \"client\" or \"server\", got %q", c.Role)
	}
	switch {
	case c.TrustDomain == "":
		errs.Add("trust_domain", "is required, e.g. \"prod.example\"")
	case !ValidTrustDomain(c.TrustDomain):
		errs.Add("trust_domain", "%q is not a valid SPIFFE trust domain (lower-case letters, digits, '.', '-', '_')", c.TrustDomain)
	}
	if c.URL != "" {
		if u, err := url.Parse(c.URL); err != nil || u.Scheme != "https" || u.Host == "" {
			errs.Add("url", "must be an https URL, e.g. \"https://198.18.0.2:4192\"")
		}
	}
	if c.Token != "" && c.TokenFile != "" {
		errs.Add("token", "set token or token_file, not both")
	}
	if c.Role == RoleServer && !c.ListenAddr.IsValid() {
		errs.Add("listen_addr", "must be an address with a port, e.g. 0.0.0.0:4192")
	}
	switch {
	case c.CertLifetime < 5*time.Minute:
		errs.Add("cert_lifetime", "must be at least 5m, got %s", c.CertLifetime)
	case c.CertLifetime > 30*24*time.Hour:
		errs.Add("cert_lifetime", "must be at most 720h, got %s", c.CertLifetime)
	}
	if c.RenewAfterExpiry > 90*24*time.Hour {
		errs.Add("renew_after_expiry", "must be at most 2160h (90 days), got %s", c.RenewAfterExpiry)
	}
	return errs.Err()
}
