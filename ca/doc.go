// Package ca is vmesh's embedded certificate authority, built on
// smallstep/certificates, and the certificate client every host runs: join
// tokens, node and workload X.509-SVIDs, renewal, the trust bundle, and the
// verification of peers' SPIFFE identities.
package ca
