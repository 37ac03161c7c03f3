#!/usr/bin/env bash
# rsyncfs against rsync, lsyncd, Unison and Syncthing on the same work, in one run (see
# bench/compare.py for what is measured). Run as root.
#   bench/compare.sh            the full run: the figures in docs/BENCHMARKS.md
#   bench/compare.sh --quick    smaller sizes and fewer trials, for a check (under 2 minutes
#                               once the peers are installed and rsyncfs is built)
# Other flags go to bench/compare.py (--json FILE, --tools LIST).
#
# It installs the peers that are missing from Debian's packages (and unison-fsmonitor, which
# Debian 12 does not ship, with cargo into target/bench-tools), then runs the comparison in a
# network namespace of its own: only its own tools talk there, so the loopback counters count
# their traffic and nothing else, and nothing can reach beyond 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "run as root: the benchmark mounts FUSE filesystems and makes a network namespace" >&2
  exit 2
fi

need=()
for tool in rsync lsyncd unison syncthing; do
  command -v "$tool" >/dev/null || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
tools=$PWD/target/bench-tools
if [ ! -x "$tools/bin/unison-fsmonitor" ]; then
  echo "installing unison-fsmonitor (for Unison's watch mode) into $tools"
  cargo install --quiet --locked unison-fsmonitor --root "$tools"
fi
cargo build --release --quiet --locked -p rsyncfs-node

# A run killed outright (SIGKILL, a lost session) cannot delete its namespace: delete those
# whose script is gone.
for stale in $(ip netns list 2>/dev/null | awk '/^rsyncfs-compare-[0-9]+/ {print $1}'); do
  kill -0 "${stale#rsyncfs-compare-}" 2>/dev/null || ip netns del "$stale" 2>/dev/null || true
done
ns=rsyncfs-compare-$$
enter=()
if ip netns add "$ns" 2>/dev/null; then
  trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
  ip netns exec "$ns" ip link set lo up
  enter=(nsenter --net="/run/netns/$ns")
else
  echo "no network namespace could be made: running on the machine's own loopback, whose byte counts include any other traffic on it"
fi
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB, kernel $(uname -r), $(df --output=fstype /var/tmp | tail -1) on $(df --output=source /var/tmp | tail -1)"
# Only the network namespace changes: the mounts stay in this one, where compare.py unmounts
# them. An interrupt or a TERM is passed on to it, so that it stops what it started.
PATH="$tools/bin:$PATH" "${enter[@]}" python3 bench/compare.py "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' INT TERM HUP
set +e
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break
done
exit "$rc"
