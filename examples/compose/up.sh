#!/usr/bin/env bash
# up.sh: build what is missing and start the example hosts; returns once
# all are healthy (agents ready, tokens used), or fails with their logs.
#
#   VMESH_BIN=path    use this vmesh binary instead of building bin/vmesh
#   VMESH_MESH=off    start the apps without the agents (a baseline)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$here"

command -v docker >/dev/null || { say "docker is not installed"; exit 1; }
command -v docker-compose >/dev/null || { say "docker-compose (1.29, apt package docker-compose) is not installed"; exit 1; }

start=$SECONDS
./build-base.sh

# The vmesh binary: static, built on the host, copied into the build context.
bin=${VMESH_BIN:-}
if [ -z "$bin" ]; then
  say "building vmesh (make build)"
  make -s -C ../.. build
  bin=../../bin/vmesh
fi
if ! cmp -s "$bin" vmesh 2>/dev/null; then cp "$bin" vmesh; fi

say "building the image"
dc build -q 2>&1 | grep -v -e 'legacy builder is deprecated' -e 'BuildKit is currently disabled' \
  -e 'Install the buildx component' -e 'docs.docker.com/go/buildx' -e '^ *$' -e 'DEPRECATED' >&2 || true
docker image inspect vmesh-example:latest >/dev/null

say "starting ${services[*]}"
dc up -d --no-build 2>&1 | sed "s/^/  /" >&2 || true

deadline=$((SECONDS + ${VMESH_UP_WAIT:-120}))
while :; do
  states=() bad=
  for s in "${services[@]}"; do
    h=$(health "$s"); states+=("$s=$h")
    case "$h" in healthy | starting | running) ;; *) bad=1 ;; esac
  done
  ok=1
  for st in "${states[@]}"; do [ "${st#*=}" = healthy ] || ok=; done
  [ -n "$ok" ] && break
  if [ -n "$bad" ] || [ $SECONDS -ge $deadline ]; then
    say "not healthy: ${states[*]}"
    dc logs --no-color --tail=60 >&2 || true
    exit 1
  fi
  sleep 0.5
done
say "all healthy in $((SECONDS - start))s: ${states[*]}"
