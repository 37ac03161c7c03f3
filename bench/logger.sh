#!/usr/bin/env bash
# The change logger against the same backing filesystem used natively (and bindfs, an ordinary
# FUSE passthrough, where it can be installed), in one run. Run as root.
#   bench/logger.sh            1 GiB file, 10,000 files, 3 rounds of the real programs (the
#                              figures in docs/BENCHMARKS.md)
#   bench/logger.sh --quick    64 MiB, 2,000 files, one round of the real programs
#   bench/logger.sh --pin CPU  daemon and benchmark on one CPU (shows the cost of cross-CPU
#                              wake-ups in each FUSE round trip); combines with --quick
# RSYNCFS_FUSE_URING=off in the environment measures the mount over /dev/fuse reads even where
# the kernel offers FUSE over io_uring (the first line printed says which transport is in use).
set -euo pipefail
cd "$(dirname "$0")/.."
size=1024 files=10000 rounds=3 pin=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) size=64 files=2000 rounds=1 ;;
    --pin) pin=(taskset -c "${2:?--pin needs a CPU number}"); shift ;;
    *) echo "usage: $0 [--quick] [--pin CPU]" >&2; exit 2 ;;
  esac
  shift
done

if ! command -v bindfs >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq bindfs) >/dev/null 2>&1 || echo "bindfs not installable: left out"
fi
cargo build --release --quiet -p rsyncfs-node
work=$(mktemp -d /var/tmp/rsyncfs-bench.XXXXXX)
pids=()
mounts=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  for m in "${mounts[@]}"; do mountpoint -q "$m" && umount -l "$m" || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
mkdir -p "$work"/{native,backing,mnt,bbacking,bmnt}

"${pin[@]}" ./target/release/rsyncfs-node logger --backing "$work/backing" --mount "$work/mnt" >/dev/null 2>"$work/logger.err" &
pids+=($!)
mounts+=("$work/mnt")
for _ in $(seq 100); do mountpoint -q "$work/mnt" && break; sleep 0.05; done
mountpoint -q "$work/mnt" || { cat "$work/logger.err"; exit 1; }
head -1 "$work/logger.err"
targets=("native=$work/native" "rsyncfs=$work/mnt")
if command -v bindfs >/dev/null && "${pin[@]}" bindfs "$work/bbacking" "$work/bmnt"; then
  mounts+=("$work/bmnt")
  targets+=("bindfs=$work/bmnt")
fi
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB, kernel $(uname -r), $(df -T "$work" | awk 'NR==2{print $2}') on $(df "$work" | awk 'NR==2{print $1}')"
"${pin[@]}" python3 bench/fsbench.py --size-mib "$size" --files "$files" "${targets[@]}"
# Real programs: tar x of /usr/include, git checkout between two commits of real trees
# (/usr/include, /usr/share/doc); fewer rounds in quick mode.
"${pin[@]}" python3 bench/programs.py --rounds "$rounds" "${targets[@]}"
