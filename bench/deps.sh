#!/usr/bin/env bash
# Installs the benchmark harness's load tools and peer proxy from Debian's
# packages when missing (fortio comes from the Go module proxy, installed by
# the harness itself). Needs root.
set -euo pipefail
pkgs=(iproute2 iptables util-linux nghttp2-client iperf3 redis-tools redis-server haproxy linux-perf)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's packages may start their daemons; the harness runs its own.
service redis-server stop >/dev/null 2>&1 || true
service haproxy stop >/dev/null 2>&1 || true
