package ca

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"slices"
)

// oidGrant marks the extension of a node SVID that lists the services its
// join token granted (DER SEQUENCE OF strings). It lets every CA host that
// shares the intermediate issue that node's service SVIDs, not only the one
// that minted the token; renewal copies it. The OID is under the 2.25 (UUID)
// arc, which needs no registration.
var oidGrant = asn1.ObjectIdentifier{2, 25, 216144529, 778759349, 578044698, 379595010, 826}

func grantExtension(services []string) (pkix.Extension, error) {
	v, err := asn1.Marshal(slices.Clone(services))
	if err != nil {
		return pkix.Extension{}, fmt.Errorf("encoding service grant: %w", err)
	}
	return pkix.Extension{Id: oidGrant, Value: v}, nil
}

// certGrant returns the services granted in a node SVID, and whether it has
// the extension at all.
func certGrant(c *x509.Certificate) ([]string, bool, error) {
	for _, e := range c.Extensions {
		if !e.Id.Equal(oidGrant) {
			continue
		}
		var out []string
		rest, err := asn1.Unmarshal(e.Value, &out)
		if err != nil || len(rest) != 0 {
			return nil, true, fmt.Errorf("decoding service grant of %v: malformed", c.URIs)
		}
		return out, true, nil
	}
	return nil, false, nil
}
