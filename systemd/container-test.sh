#!/usr/bin/env bash
# container-test.sh: run vmesh.service for real under systemd (PID 1 of a
# container on 198.18.11.0/24) as install.sh installs it, and check:
#   probe  the unit's user, capabilities, seccomp filter and NoNewPrivileges
#          let `vmesh rules install/uninstall` program iptables (a drop-in runs
#          them in place of the agent);
#   agent  Type=notify start (active only once READY), CapEff = CAP_NET_ADMIN
#          only, rules installed, /ready; reload keeps the PID; SIGKILL ->
#          restarted by Restart=on-failure with rules back; restart keeps the
#          rules and the listening sockets (fd store); stop -> no rules.
# Mount-namespace sandboxing is not applied inside a container (see
# systemd-analyze security in systemd_test.go for that).
#
#   systemd/container-test.sh [probe|agent|all]   (default all)
#   KEEP=1  leave the container (vmesh-sdtest) and its network for a look
#   VMESH_BIN=path  binary to install (default: make build)
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
name=vmesh-sdtest
net=vmesh-sdtest
image=vmesh-systemd-test:latest
failed=0

say() { echo "container-test: $*" >&2; }
ok() { echo "ok   - $*"; }
fail() { echo "FAIL - $*"; failed=$((failed + 1)); }
x() { docker exec "$name" "$@"; }
xi() { docker exec -i "$name" "$@"; }

cleanup() {
  docker rm -f "$name" >/dev/null 2>&1 || true
  docker network rm "$net" >/dev/null 2>&1 || true
}
[ -n "${KEEP:-}" ] || trap cleanup EXIT
cleanup

examples/compose/build-base.sh >&2
docker image inspect "$image" >/dev/null 2>&1 ||
  docker build --network host -q -t "$image" systemd/container >/dev/null
bin=${VMESH_BIN:-}
if [ -z "$bin" ]; then make -s build; bin=bin/vmesh; fi
bin=$(readlink -f "$bin")

docker network create --subnet 198.18.11.0/24 -o com.docker.network.driver.mtu=1400 "$net" >/dev/null
docker run -d --name "$name" --hostname vm1 --network "$net" --ip 198.18.11.2 --cap-add NET_ADMIN \
  --tmpfs /run --tmpfs /run/lock -v /sys/fs/cgroup:/sys/fs/cgroup:ro \
  -v "$PWD/systemd:/src/systemd:ro" -v "$bin:/src/vmesh:ro" "$image" >/dev/null
for _ in $(seq 100); do
  s=$(x systemctl is-system-running 2>/dev/null || true)
  case "$s" in running | degraded) break ;; esac
  sleep 0.1
done
x /src/systemd/install.sh --binary /src/vmesh >&2

vmesh_rules() { x iptables-save -t nat | grep -c 'vmesh/' || true; }
main_pid() { x systemctl show -p MainPID --value vmesh; }

if [ "$what" = probe ] || [ "$what" = all ]; then
  xi bash -c 'mkdir -p /run/systemd/system/vmesh.service.d && cat >/run/systemd/system/vmesh.service.d/probe.conf' <<'EOF'
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=
ExecStart=/usr/local/bin/vmesh rules install --config /etc/vmesh/vmesh.toml
ExecStopPost=
ExecStopPost=/usr/local/bin/vmesh rules uninstall --config /etc/vmesh/vmesh.toml
EOF
  x systemctl daemon-reload
  if x systemctl start vmesh && [ "$(vmesh_rules)" -gt 0 ]; then
    ok "probe: the unit's sandbox lets vmesh program iptables ($(vmesh_rules) rules)"
  else
    fail "probe: rules install under the unit"; x journalctl -u vmesh --no-pager | tail -20
  fi
  x systemctl stop vmesh || true
  if [ "$(vmesh_rules)" -eq 0 ]; then ok "probe: ExecStopPost removed the rules"; else fail "probe: rules left after stop"; fi
  x rm -rf /run/systemd/system/vmesh.service.d
  x systemctl daemon-reload
fi

if [ "$what" = agent ] || [ "$what" = all ]; then
  # A one-host mesh: this host holds the CA.
  xi bash -c 'cat >/etc/vmesh/vmesh.toml' <<'EOF'
[node]
name = "vm1"
drain_timeout = "1s"
[gossip]
advertise_addr = "198.18.11.2"
insecure = true
[ca]
role = "server"
trust_domain = "sdtest.example"
[[service]]
name = "web"
port = 8080
EOF
  x setpriv --reuid=vmesh --regid=vmesh --init-groups -- \
    vmesh ca init --trust-domain sdtest.example --dir /var/lib/vmesh/ca >/dev/null
  # Type=notify: start returns once READY=1 came (or fails).
  if x timeout 60 systemctl start vmesh && [ "$(x systemctl is-active vmesh)" = active ]; then
    ok "agent: started (Type=notify)"
  else
    fail "agent: start"; x journalctl -u vmesh --no-pager | tail -30
  fi
  pid=$(main_pid)
  cap=$(x awk '/^CapEff/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
  user=$(x ps -o user= -p "$pid" 2>/dev/null || true)
  if [ "$cap" = 0000000000001000 ] && [ "$user" = vmesh ]; then ok "agent: runs as vmesh with CAP_NET_ADMIN only"
  else fail "agent: user '$user', CapEff '$cap' (want vmesh, 0000000000001000)"; fi
  if [ "$(vmesh_rules)" -gt 0 ]; then ok "agent: rules installed"; else fail "agent: no rules"; fi
  if x curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:4191/ready; then ok "agent: /ready"; else fail "agent: /ready"; fi

  x systemctl reload vmesh || true
  end=$((SECONDS + 10))
  until x journalctl -u vmesh --no-pager | grep -q 'configuration reloaded' || [ $SECONDS -ge $end ]; do sleep 0.2; done
  if [ "$(x systemctl is-active vmesh)" = active ] && [ "$(main_pid)" = "$pid" ] &&
    x journalctl -u vmesh --no-pager | grep -q 'configuration reloaded'; then ok "agent: reload re-read the config, same PID $pid"
  else fail "agent: reload (active: $(x systemctl is-active vmesh), PID $pid -> $(main_pid))"; fi

  x kill -KILL "$pid" || true
  end=$((SECONDS + 30)) np=
  while [ $SECONDS -lt $end ]; do
    np=$(main_pid)
    [ "$np" != 0 ] && [ "$np" != "$pid" ] && [ "$(x systemctl is-active vmesh)" = active ] && break
    sleep 0.2
  done
  if [ "$np" != 0 ] && [ "$np" != "$pid" ] && [ "$(vmesh_rules)" -gt 0 ]; then ok "agent: restarted after SIGKILL (PID $np), rules back"
  else fail "agent: no restart after SIGKILL"; x journalctl -u vmesh --no-pager | tail -20; fi

  # systemctl restart: the rules never leave the nat table and the kept
  # admin socket answers throughout (connections queue while the agent
  # restarts); the next agent says it took the kept sockets.
  n=$(vmesh_rules)
  x bash -c 'for i in $(seq 60); do iptables-save -t nat | grep -c vmesh/ || true; sleep 0.05; done' >/tmp/sdtest-rules &
  x bash -c 'for i in $(seq 40); do curl -s -o /dev/null -w "%{http_code}\n" --max-time 10 http://127.0.0.1:4191/live; sleep 0.05; done' >/tmp/sdtest-live &
  sleep 0.3
  x timeout 60 systemctl restart vmesh
  wait
  if [ "$(sort -u /tmp/sdtest-rules)" = "$n" ] && [ "$(sort -u /tmp/sdtest-live)" = 200 ] &&
    x journalctl -u vmesh --no-pager | grep -c 'listening on a socket kept across the restart' >/dev/null; then
    ok "agent: restart kept the rules ($n) and the sockets (admin answered 40 of 40)"
  else fail "agent: restart: rule counts $(sort -u /tmp/sdtest-rules | tr '\n' ' '), /live $(sort /tmp/sdtest-live | uniq -c | tr '\n' ' ')"; fi

  x timeout 60 systemctl stop vmesh || true
  if [ "$(vmesh_rules)" -eq 0 ]; then ok "agent: stop removed every rule"; else fail "agent: rules left after stop"; fi
fi

echo "container-test: $failed failed"
[ "$failed" -eq 0 ]
