#!/usr/bin/env bash
# Two rsyncfs nodes on 127.0.0.1 against local rsync, in one run (see bench/node.py). Run as root.
#   bench/node.sh            the figures in docs/BENCHMARKS.md
#   bench/node.sh --quick    smaller sizes, for a check
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v rsync >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq rsync) >/dev/null 2>&1 || echo "rsync not installable: baseline left out"
fi
cargo build --release --quiet -p rsyncfs-node
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB, kernel $(uname -r), $(df -T /var/tmp | awk 'NR==2{print $2}') on $(df /var/tmp | awk 'NR==2{print $1}')"
exec python3 bench/node.py "$@"
