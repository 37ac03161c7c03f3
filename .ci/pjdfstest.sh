#!/usr/bin/env bash
# POSIX conformance of the change logger's mount: the pjdfstest suite (its Rust port, from
# crates.io) run on a native directory and through `rsyncfs-node logger`, which must fail no
# test that the native directory passes. Needs root and /dev/fuse.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ] || ! [ -c /dev/fuse ]; then
  if [ "${CI:-}" = true ]; then
    echo "pjdfstest needs root and /dev/fuse, and CI=true: failing rather than skipping" >&2
    exit 1
  fi
  echo "SKIPPED: pjdfstest needs root and /dev/fuse"
  exit 0
fi
tools=target/tools
[ -x "$tools/bin/pjdfstest" ] || cargo install --quiet --locked --version 0.2.2 pjdfstest --root "$tools"
id tests >/dev/null 2>&1 || useradd -M -s /usr/sbin/nologin tests
cargo build --release --quiet --locked -p rsyncfs-node
work=$(mktemp -d /var/tmp/rsyncfs-pjd.XXXXXX)
# The suite switches to unprivileged users, who must reach the base paths (mktemp makes 0700).
chmod 755 "$work"
pid=
cleanup() {
  [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  mountpoint -q "$work/mnt" && umount -l "$work/mnt" || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
# pjdfstest 0.2.2 builds a PATH_MAX-long path from the base path's length and overflows for
# some lengths; equal-length base paths keep both runs on the same footing.
mkdir -p "$work"/{native,backing,mnt}
./target/release/rsyncfs-node logger --backing "$work/backing" --mount "$work/mnt" >/dev/null 2>"$work/logger.err" &
pid=$!
for _ in $(seq 100); do mountpoint -q "$work/mnt" && break; sleep 0.05; done
mountpoint -q "$work/mnt" || { cat "$work/logger.err"; exit 1; }
"$tools/bin/pjdfstest" -p "$work/native" > "$work/native.txt" 2>&1 || true
"$tools/bin/pjdfstest" -p "$work/mnt" > "$work/mnt.txt" 2>&1 || true
echo "native: $(grep '^Summary' "$work/native.txt")"
echo "mount:  $(grep '^Summary' "$work/mnt.txt")"
failed=$(grep -E '^[a-z_:]+ +FAILED' "$work/mnt.txt" | awk '{print $1}' | sort || true)
native_failed=$(grep -E '^[a-z_:]+ +FAILED' "$work/native.txt" | awk '{print $1}' | sort || true)
new=$(comm -23 <(echo "$failed") <(echo "$native_failed") | grep . || true)
if [ -n "$new" ]; then
  echo "pjdfstest: failed through the mount but not natively:"
  echo "$new"
  grep -A3 -F "$(echo "$new" | head -1)" "$work/mnt.txt" | head -20
  exit 1
fi
grep -q '^Summary' "$work/mnt.txt" || { tail -20 "$work/mnt.txt"; exit 1; }
echo "pjdfstest: nothing fails through the mount that passes natively"
