#!/usr/bin/env bash
# First syncs of a big tree to one receiver and to two at once, with local rsync as the baseline
# (see bench/firstsync.py). Run as root.
#   bench/firstsync.sh                 100,000 files
#   bench/firstsync.sh --files 20000   a quicker check
set -euo pipefail
cd "$(dirname "$0")/.."
command -v rsync >/dev/null || { apt-get update -qq && apt-get install -y -qq rsync >/dev/null; }
cargo build --release --quiet -p rsyncfs-node
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB, kernel $(uname -r), $(df -T /var/tmp | awk 'NR==2{print $2}') on $(df /var/tmp | awk 'NR==2{print $1}')"
exec python3 bench/firstsync.py "$@"
