#!/usr/bin/env bash
# stress-ng's filesystem class (every stressor once, 1 s each) on a native directory and through
# a running node's mount (one `rsyncfs-node up`, release build): fails if anything fails, errs
# or warns through the mount that does not natively, if the node logs running out of file
# descriptors, or if it stops answering `status` or reports a broken invariant. Needs root and
# /dev/fuse.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ] || ! [ -c /dev/fuse ]; then
  if [ "${CI:-}" = true ]; then
    echo "stress.sh needs root and /dev/fuse, and CI=true: failing rather than skipping" >&2
    exit 1
  fi
  echo "SKIPPED: stress.sh needs root and /dev/fuse"
  exit 0
fi
command -v stress-ng >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends stress-ng
}
cargo build --release --quiet --locked -p rsyncfs-node
bin=./target/release/rsyncfs-node
work=$(mktemp -d /var/tmp/rsyncfs-stress.XXXXXX)
pid=
cleanup() {
  [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  mountpoint -q "$work/mnt" && umount -l "$work/mnt" || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
mkdir -p "$work"/{native,state,backing,mnt}
"$bin" up --state "$work/state" --backing "$work/backing" --mount "$work/mnt" \
  --listen 127.0.0.1:0 >/dev/null 2>"$work/node.log" &
pid=$!
for _ in $(seq 200); do mountpoint -q "$work/mnt" && "$bin" status --state "$work/state" >/dev/null 2>&1 && break; sleep 0.05; done
mountpoint -q "$work/mnt" || { cat "$work/node.log"; exit 1; }
run() { (cd "$1" && stress-ng --class filesystem --seq 1 --timeout 1 >"$2" 2>&1 || true); }
run "$work/native" "$work/native.txt"
run "$work/mnt" "$work/mnt.txt"
# What went wrong in each run, without pids and numbers. "finished prematurely" is not trouble:
# stress-ng warns so when a stressor did all its work before its 1 s were up (dirdeep through the
# mount, where directories are created faster than natively, in one CI run); a stressor whose work
# failed says so in a fail or error line, which counts.
troubles() {
  grep -E 'stress-ng: (fail|error|warn):' "$1" | grep -v 'finished prematurely' |
    sed -E 's/\[[0-9]+\]//g; s/[0-9]+/N/g' | sort -u || true
}
new=$(comm -13 <(troubles "$work/native.txt") <(troubles "$work/mnt.txt"))
echo "native: $(tail -1 "$work/native.txt")"
echo "mount:  $(tail -1 "$work/mnt.txt")"
grep -h 'finished prematurely' "$work/native.txt" "$work/mnt.txt" | sed 's/^/noted (not counted): /' || true
status=0
if [ -n "$new" ]; then
  echo "stress-ng: went wrong through the mount but not natively:"
  echo "$new"
  status=1
fi
if grep -qiE 'EMFILE|too many open files' "$work/node.log"; then
  echo "the node ran out of file descriptors:"
  grep -iE 'EMFILE|too many open files' "$work/node.log" | head -5
  status=1
fi
if ! "$bin" status --state "$work/state" --json >"$work/status.json"; then
  echo "the node stopped answering status"; tail -20 "$work/node.log"; status=1
elif ! grep -q '"bugs":\[\]' "$work/status.json"; then
  echo "the node reports broken invariants:"; cat "$work/status.json"; status=1
fi
echo "descriptors held by the node afterwards: $(ls /proc/$pid/fd | wc -l)"
[ $status = 0 ] && echo "stress-ng: nothing goes wrong through the mount that does not natively"
exit $status
