module github.com/vmesh/vmesh

go 1.26.0

require (
	github.com/BurntSushi/toml v1.6.0
	github.com/coreos/go-iptables v0.8.0
	github.com/google/go-cmp v0.7.0
	golang.org/x/sys v0.49.0
)
