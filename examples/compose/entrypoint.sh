#!/bin/bash
# entrypoint of the example "VMs": does what systemd and an operator do on a
# real host, then supervises the agent and the app.
#
#   VMESH_ROLE=ca      makes the gossip key and the CA (`vmesh ca init`), starts
#                      redis and the agent, then mints one-time join tokens for
#                      the other hosts into /shared (VMESH_TOKENS).
#   VMESH_ROLE=web     waits for its token and the key, starts nginx and the agent.
#   VMESH_NODE=name    the host's node name, whose token it waits for (default:
#                      the role; web2 is a second "web" host).
#   VMESH_ROLE=client  waits for its token and the key, starts the agent.
#   VMESH_MESH=off     starts only the apps (to compare with and without vmesh).
#
# The agent runs as user vmesh with only CAP_NET_ADMIN (as vmesh.service does),
# so the rules exempt that uid and nothing else: curl and redis-cli run as root
# and are redirected. docker-init (init: true) is PID 1 and forwards SIGTERM
# here; the agent drains and removes its rules, and `vmesh agent --cleanup`
# runs after it as ExecStopPost= does.
#
#   entrypoint health  is the healthcheck: ready once the agent answers /ready
#                      (and, on the CA host, the tokens are written).
set -euo pipefail

role=${VMESH_ROLE:-}
node=${VMESH_NODE:-$role}
mesh=${VMESH_MESH:-on}
conf=/etc/vmesh/vmesh.toml
shared=/shared
ready_file=/run/vmesh-example.ready
wait_secs=${VMESH_WAIT_SECS:-120}
admin=http://127.0.0.1:4191

log() { echo "entrypoint[$node]: $*" >&2; }

if [ "${1:-}" = health ]; then
  [ -e "$ready_file" ] || exit 1
  [ "$mesh" = off ] && exit 0
  exec curl -fsS -o /dev/null --max-time 2 "$admin/ready"
fi

case "$role" in
  ca | web | client) ;;
  *) log "VMESH_ROLE must be ca, web or client"; exit 2 ;;
esac

# as_vmesh runs a command as user vmesh with CAP_NET_ADMIN as its only
# (ambient) capability, like the unit's User=vmesh + AmbientCapabilities=.
# A simple command (not a function) when started with &, so that $! is the
# agent's own PID (setpriv execs it) and SIGTERM reaches the agent.
as_vmesh_cmd=(setpriv --reuid=vmesh --regid=vmesh --init-groups
  --inh-caps=-all,+net_admin --ambient-caps=-all,+net_admin
  --bounding-set=-all,+net_admin --no-new-privs --)
as_vmesh() { "${as_vmesh_cmd[@]}" "$@"; }

# wait_for FILE: until FILE is non-empty, for at most wait_secs.
wait_for() {
  local end=$((SECONDS + wait_secs))
  until [ -s "$1" ]; do
    if [ $SECONDS -ge $end ]; then log "no $1 after ${wait_secs}s"; return 1; fi
    sleep 0.2
  done
}

# wait_ports PORT...: until something listens on each TCP port (the app is up
# before the agent health-checks it).
wait_ports() {
  local end=$((SECONDS + wait_secs)) p
  for p in "$@"; do
    until ss -Hltn "sport = :$p" | grep -q .; do
      if [ $SECONDS -ge $end ]; then log "nothing listens on port $p after ${wait_secs}s"; return 1; fi
      sleep 0.1
    done
  done
}

# wait_ready: until the agent answers /ready; fails early if it died.
wait_ready() {
  local end=$((SECONDS + wait_secs))
  until curl -fsS -o /dev/null --max-time 1 "$admin/ready" 2>/dev/null; do
    if ! kill -0 "$agent_pid" 2>/dev/null; then log "the agent exited before it was ready"; return 1; fi
    if [ $SECONDS -ge $end ]; then log "agent not ready after ${wait_secs}s"; return 1; fi
    sleep 0.2
  done
}

# install_secret SRC DST: root-owned, readable by the agent only.
install_secret() { install -o root -g vmesh -m 0640 "$1" "$2"; }

# The directories systemd would make (StateDirectory=, RuntimeDirectory=).
install -d -o vmesh -g vmesh -m 0700 /var/lib/vmesh
install -d -o vmesh -g vmesh -m 0750 /run/vmesh
install -d -m 0755 "$shared"

pids=()
agent_pid=
stopping=

shutdown() {
  local code=${1:-0}
  [ -n "$stopping" ] && return
  stopping=1
  trap - TERM INT
  if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
    log "stopping the agent"
    kill -TERM "$agent_pid" 2>/dev/null || true
    wait "$agent_pid" 2>/dev/null || true
  fi
  if [ "$mesh" = on ]; then
    as_vmesh vmesh agent --cleanup --config "$conf" || log "rules cleanup failed"
  fi
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait || true
  rm -f "$ready_file"
  exit "$code"
}
trap 'shutdown 0' TERM INT

start_app() {
  case "$role" in
    ca)
      setpriv --reuid=redis --regid=redis --init-groups -- \
        redis-server --bind 0.0.0.0 --port 6379 --protected-mode no \
        --save '' --appendonly no --loglevel warning &
      pids+=($!)
      ;;
    web)
      nginx &
      pids+=($!)
      ;;
    client) ;;
  esac
}

start_agent() {
  "${as_vmesh_cmd[@]}" vmesh agent --config "$conf" &
  agent_pid=$!
  pids+=("$agent_pid")
}

# mint_tokens: one single-use join token per host named in VMESH_TOKENS
# ("web=web,web-admin client="), written atomically to /shared/NAME.token.
mint_tokens() {
  local entry name services tok
  for entry in ${VMESH_TOKENS:-}; do
    name=${entry%%=*}
    services=${entry#*=}
    tok=$(vmesh token create --node "$name" ${services:+--services "$services"} --ttl 15m)
    printf '%s\n' "$tok" >"$shared/.$name.token.tmp"
    chmod 0600 "$shared/.$name.token.tmp"
    mv "$shared/.$name.token.tmp" "$shared/$name.token"
    log "minted a join token for $name (services: ${services:-none})"
  done
}

if [ "$mesh" = on ]; then
  case "$role" in
    ca)
      rm -f "$shared"/*.token
      if [ ! -s "$shared/gossip.key" ]; then
        vmesh keygen >"$shared/.gossip.key.tmp"
        chmod 0644 "$shared/.gossip.key.tmp"
        mv "$shared/.gossip.key.tmp" "$shared/gossip.key"
        log "made a gossip key"
      fi
      install_secret "$shared/gossip.key" /etc/vmesh/gossip.key
      if [ ! -e /var/lib/vmesh/ca ]; then
        td=$(sed -n 's/^trust_domain *= *"\(.*\)"/\1/p' "$conf" | head -n1)
        as_vmesh vmesh ca init --trust-domain "$td" --dir /var/lib/vmesh/ca
      fi
      ;;
    *)
      log "waiting for $shared/$node.token and the gossip key"
      wait_for "$shared/gossip.key"
      wait_for "$shared/$node.token"
      install_secret "$shared/gossip.key" /etc/vmesh/gossip.key
      install_secret "$shared/$node.token" /etc/vmesh/token
      ;;
  esac
  # A leftover from a crashed run would redirect into a dead proxy.
  as_vmesh vmesh agent --cleanup --config "$conf" || true
fi

start_app
case "$role" in
  ca) wait_ports 6379 || shutdown 1 ;;
  web) wait_ports 80 8081 || shutdown 1 ;;
esac
if [ "$mesh" = on ]; then
  start_agent
  wait_ready || shutdown 1
  [ "$role" = ca ] && { mint_tokens || shutdown 1; }
fi
touch "$ready_file"
log "ready (mesh $mesh)"

# Supervise: when the agent or the app exits, stop the rest.
set +e
if [ ${#pids[@]} -eq 0 ]; then
  sleep infinity &
  pids+=($!)
fi
wait -n "${pids[@]}"
code=$?
[ -n "$stopping" ] && exit 0
log "a supervised process exited with $code"
shutdown 1
