#!/usr/bin/env bash
# down.sh: remove the example's containers, network and volume (tokens, key).
# The images stay (vmesh-example, vmesh-example-base): remove them with
# `docker rmi vmesh-example:latest vmesh-example-base:bookworm`.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$here"
dc down --volumes --remove-orphans --timeout 20 2>&1 | sed 's/^/  /' >&2
