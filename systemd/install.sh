#!/usr/bin/env bash
# install.sh: install (or remove) vmesh as a systemd service on this host.
#
#   sudo systemd/install.sh [--binary PATH] [--config FILE] [--start]
#   sudo systemd/install.sh --uninstall [--purge]
#
# Installs the binary to /usr/local/bin/vmesh, a system user and group
# "vmesh" (the uid the rules exempt), /etc/vmesh (root:vmesh 0750) with
# vmesh.toml (FILE, or `vmesh config default`; an existing one is never
# overwritten), /var/lib/vmesh (vmesh 0700) and the unit, then enables it. It
# starts it only with --start: a new host usually needs its join token and
# gossip key in /etc/vmesh first. Hosts whose iptables is the legacy backend
# get a drop-in with what iptables-legacy needs. Running it again changes
# only what differs.
#
# --uninstall stops and disables the service (its ExecStopPost removes the
# rules), removes the unit and the binary, and keeps config, state and user;
# --purge removes those too. --root DIR works on a tree at DIR instead of /
# (packaging, tests); systemctl is then run with --root and nothing started.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=/
binary=
config=
start=
uninstall=
purge=
legacy=auto

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --start) start=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    --iptables-legacy) legacy=yes; shift ;;
    --no-iptables-legacy) legacy=no; shift ;;
    -h | --help) usage 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; usage 2 >&2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
root=${root%/}
R=$root # prefix for paths; "" for /

bin_path=$R/usr/local/bin/vmesh
unit_path=$R/etc/systemd/system/vmesh.service
dropin_dir=$R/etc/systemd/system/vmesh.service.d
dropin_path=$dropin_dir/iptables-legacy.conf
tmpfiles_path=$R/etc/tmpfiles.d/vmesh-iptables-legacy.conf
etc_dir=$R/etc/vmesh
state_dir=$R/var/lib/vmesh

say() { echo "install.sh: $*"; }

# live: systemd runs this system (not --root, not a container without it).
live() { [ -z "$R" ] && [ -d /run/systemd/system ]; }
sysctl() {
  if [ -n "$R" ]; then systemctl --root="$R" "$@"
  elif live; then systemctl "$@"
  else return 0; fi
}
user_exists() { grep -q '^vmesh:' "$R/etc/passwd" 2>/dev/null; }
root_args=()
[ -n "$R" ] && root_args=(--root "$R")

# put SRC DST MODE [OWNER:GROUP]: install SRC at DST unless identical.
put() {
  if cmp -s "$1" "$2"; then
    return 1
  fi
  install -D -m "$3" ${4:+-o "${4%%:*}" -g "${4##*:}"} "$1" "$2"
  say "installed $2"
}

if [ -n "$uninstall" ]; then
  if live; then
    systemctl disable --now vmesh.service 2>/dev/null || true
  elif [ -n "$R" ]; then
    systemctl --root="$R" disable vmesh.service 2>/dev/null || true
  fi
  # The service's ExecStopPost removed the rules; a host where it never ran
  # under systemd may still hold some.
  [ -z "$R" ] && [ -x "$bin_path" ] && [ -e "$etc_dir/vmesh.toml" ] &&
    { "$bin_path" agent --cleanup --config "$etc_dir/vmesh.toml" || say "rule cleanup failed"; }
  rm -f "$unit_path" "$dropin_path" "$tmpfiles_path" "$bin_path"
  rmdir "$dropin_dir" 2>/dev/null || true
  live && systemctl daemon-reload
  say "removed the service and the binary"
  if [ -n "$purge" ]; then
    rm -rf "$etc_dir" "$state_dir"
    if user_exists; then userdel "${root_args[@]}" vmesh && say "removed user vmesh"; fi
    say "removed $etc_dir and $state_dir"
  else
    say "kept $etc_dir, $state_dir and user vmesh (--purge removes them)"
  fi
  exit 0
fi

# The binary: --binary, else the repository's bin/vmesh (make build).
binary=${binary:-$here/../bin/vmesh}
[ -x "$binary" ] || { echo "install.sh: no binary at $binary (make build, or --binary PATH)" >&2; exit 1; }

changed=
put "$binary" "$bin_path" 0755 && changed=1

if ! user_exists; then
  useradd "${root_args[@]}" --system --user-group --home-dir /var/lib/vmesh --no-create-home \
    --shell /usr/sbin/nologin --comment "vmesh agent" vmesh
  say "created user vmesh"
fi

# Numeric ids: under --root the names exist only in $R/etc.
uid=$(awk -F: '$1 == "vmesh" { print $3 }' "$R/etc/passwd")
gid=$(awk -F: '$1 == "vmesh" { print $3 }' "$R/etc/group")
install -d -m 0750 -o 0 -g "$gid" "$etc_dir"
install -d -m 0700 -o "$uid" -g "$gid" "$state_dir"

if [ -e "$etc_dir/vmesh.toml" ]; then
  say "kept $etc_dir/vmesh.toml"
else
  tmp=$(mktemp)
  if [ -n "$config" ]; then cp "$config" "$tmp"; else "$bin_path" config default >"$tmp"; fi
  install -m 0640 -o 0 -g "$gid" "$tmp" "$etc_dir/vmesh.toml"
  rm -f "$tmp"
  say "installed $etc_dir/vmesh.toml"
fi

put "$here/vmesh.service" "$unit_path" 0644 && changed=1

if [ "$legacy" = auto ]; then
  legacy=no
  if iptables --version 2>/dev/null | grep -q legacy; then legacy=yes; fi
fi
if [ "$legacy" = yes ]; then
  put "$here/iptables-legacy.conf" "$dropin_path" 0644 && changed=1
  tmp=$(mktemp)
  printf 'f /run/xtables.lock 0660 root vmesh -\n' >"$tmp"
  put "$tmp" "$tmpfiles_path" 0644 || true
  rm -f "$tmp"
  live && systemd-tmpfiles --create "$tmpfiles_path"
elif [ -e "$dropin_path" ]; then
  rm -f "$dropin_path" "$tmpfiles_path"
  rmdir "$dropin_dir" 2>/dev/null || true
  changed=1
fi

live && systemctl daemon-reload
sysctl enable vmesh.service >/dev/null 2>&1 || sysctl enable vmesh.service
if live; then
  if [ -n "$start" ]; then
    systemctl start vmesh.service && say "started vmesh.service"
  elif [ -n "$changed" ] && systemctl -q is-active vmesh.service; then
    systemctl restart vmesh.service && say "restarted vmesh.service (binary or unit changed)"
  else
    say "enabled vmesh.service; start it with: systemctl start vmesh"
  fi
elif [ -z "$R" ]; then
  say "systemd is not running here: the unit is installed but was not enabled live"
fi
