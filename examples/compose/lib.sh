# Shared by up.sh, smoke.sh and down.sh: the compose command and helpers.
# shellcheck shell=bash
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export COMPOSE_PROJECT_NAME=vmesh-example
services=(ca web web2 client)

dc() { docker-compose --project-directory "$here" -f "$here/docker-compose.yml" "$@"; }

# cid SERVICE: the container id of a service ("" when not created).
cid() { dc ps -q "$1" 2>/dev/null; }

# health SERVICE: starting, healthy, unhealthy, exited, or missing.
health() {
  local id; id=$(cid "$1")
  [ -n "$id" ] || { echo missing; return; }
  docker inspect -f '{{if eq .State.Status "running"}}{{if .State.Health}}{{.State.Health.Status}}{{else}}running{{end}}{{else}}{{.State.Status}}{{end}}' "$id" 2>/dev/null || echo missing
}

say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
