#!/usr/bin/env bash
# build-base.sh: make the local Debian base image (no registry needed).
#
# debootstrap a minimal bookworm into a temporary directory and `docker
# import` it. The mirror comes from this machine's apt configuration at run
# time, so no host name is written into any file. Skips if the image exists.
#
#   build-base.sh [IMAGE]     (default: vmesh-example-base:bookworm)
set -euo pipefail

image=${1:-vmesh-example-base:bookworm}
suite=bookworm

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "build-base: $image exists, skipping"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "build-base: debootstrap needs root" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null; then
  echo "build-base: installing debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

# The mirror apt already uses for this suite (the line labelled by codename,
# not "stable", which may name another release).
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' 2>/dev/null |
  awk -v s="$suite" '$2 == s { print $1; exit }')
if [ -z "$mirror" ]; then
  echo "build-base: apt has no source for '$suite'; add one (e.g. to /etc/apt/sources.list) and retry" >&2
  exit 1
fi

root=$(mktemp -d /tmp/vmesh-base.XXXXXX)
trap 'rm -rf "$root"' EXIT

echo "build-base: debootstrap $suite from $mirror"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# Slim it and drop what came from the host.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/*
: >"$root/etc/resolv.conf"
: >"$root/etc/hostname"

tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "build-base: built $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%d MB", $1/1e6}'))"
