// Package proxy is vmesh's data path: the outbound listener that receives the
// host's redirected TCP connections and the inbound listener that peer proxies
// dial with mTLS. It owns original-destination lookup, protocol detection,
// the transport header between proxies, authorization, load balancing and the
// golden metrics. It learns about the mesh and its certificates only through
// the small interfaces it declares, which node fills in.
package proxy
