#!/usr/bin/env python3
"""First syncs of a big tree: a member holding N small files (default 100,000) and nodes that
join it with empty trees. Measures, in one run:
  - the member's first start over the tree (every file read and hashed) and a restart over the
    unchanged tree (stats only, from the hash cache on disk), each until `status` says idle;
  - the member's resident memory once idle, per tracked file, beyond an empty node's;
  - the seconds until one receiver alone has every file, then until two receivers that join at
    the same moment both have every file;
  - the baselines: `rsync -a` of the same tree to an rsync daemon on 127.0.0.1, one run alone,
    then two runs at once to two modules, and `rsync -a` between two local directories.

Usage (as root): bench/firstsync.py [--files N] [--member-only] [--fresh-fs GIB] [--json FILE]
                                    [--bin PATH]
(--member-only: the member's start, restart and memory, no receivers and no rsync: for 1,000,000
files, where the receivers would take many minutes.)

--fresh-fs GIB runs everything in a new ext4 (with a journal) on a loop device of that size.
Why: on an ext4 without a journal (this machine's root), the kernel skips each inode deleted in
the last minutes, one by one, when it allocates a new one (fs/ext4/ialloc.c, recently_deleted),
so whichever side creates its files first after a large deletion (an earlier run's clean-up)
pays for it: up to 40% of a receiver's worker time in one profile, while rsync, which runs
later, paid nothing. A fresh filesystem gives both sides the same start.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from node import Node, count_files, join  # noqa: E402


def make_tree(root, files):
    for i in range(files):
        d = os.path.join(root, "tree", f"d{i // 1000:03}")
        if i % 1000 == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i:06}"), "w") as f:
            f.write(f"file {i}\n")


def rss_kib(pid, field="VmRSS:"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def until_idle(node, timeout, what):
    """Seconds until `node` says it is idle, asked every 50 ms (each ask is a process)."""
    start = time.perf_counter()
    while not (node.try_status() or {}).get("idle"):
        if time.perf_counter() - start > timeout:
            raise SystemExit("timed out waiting for " + what)
        time.sleep(0.05)
    return time.perf_counter() - start


def rsync_daemon(work, modules):
    """An rsync daemon on 127.0.0.1 serving `modules` (name -> folder); returns it and its port."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = os.path.join(work, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write(f"port = {port}\naddress = 127.0.0.1\nuse chroot = no\n")
        for name, path in modules.items():
            os.makedirs(path, exist_ok=True)
            f.write(f"[{name}]\npath = {path}\nread only = no\nuid = root\ngid = root\n")
    d = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}"])
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return d, port
        except OSError:
            if time.time() > deadline or d.poll() is not None:
                d.kill()
                raise SystemExit("the rsync daemon did not start")
            time.sleep(0.05)


def rsync_runs(src, port, modules):
    """`rsync -a src/` to each module at once; the seconds until the last is done."""
    t = time.perf_counter()
    runs = [subprocess.Popen(["rsync", "-a", src + "/", f"rsync://127.0.0.1:{port}/{m}/"])
            for m in modules]
    for r in runs:
        if r.wait() != 0:
            raise SystemExit("rsync failed")
    return time.perf_counter() - t


def receivers(binary, work, member, names, files):
    """Starts fresh nodes, joins them to `member` at the same moment, and returns the seconds
    until every one of them has `files` files."""
    nodes = [Node(binary, work, n) for n in names]
    try:
        start = time.perf_counter()
        threads = [threading.Thread(target=join, args=(member, n)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Each receiver's status says how many files its tree holds (asked every 0.1 s: a walk
        # of 100,000 files as often took half a core from the nodes). The count is then
        # checked on disk, and the time is taken before that walk.
        def holds(n):
            return (n.try_status() or {}).get("files", 0) >= files
        while True:
            while not all(holds(n) for n in nodes):
                if time.perf_counter() - start > 3600:
                    raise SystemExit("timed out waiting for the receivers")
                time.sleep(0.1)
            took = time.perf_counter() - start
            if all(count_files(os.path.join(n.backing, "tree")) >= files for n in nodes):
                return took
            time.sleep(0.1)
    finally:
        for n in nodes:
            n.stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--member-only", action="store_true")
    p.add_argument("--fresh-fs", type=int, metavar="GIB",
                   help="run in a new ext4 with a journal on a loop device of this size")
    p.add_argument("--json")
    p.add_argument("--bin", default="target/release/rsyncfs-node")
    a = p.parse_args()
    a.bin = os.path.abspath(a.bin)
    top = tempfile.mkdtemp(prefix="rsyncfs-firstsync.", dir="/var/tmp")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    mounted = None
    try:
        work = top
        if a.fresh_fs:
            image = os.path.join(top, "fs.img")
            with open(image, "wb") as f:
                f.truncate(a.fresh_fs << 30)
            # An inode per 4 KiB: the trees are of small files.
            subprocess.run(["mkfs.ext4", "-q", "-F", "-i", "4096", image], check=True)
            work = os.path.join(top, "fs")
            os.makedirs(work)
            subprocess.run(["mount", "-o", "loop", image, work], check=True)
            mounted = work
        run(a, work)
    finally:
        if mounted and subprocess.run(["umount", mounted]).returncode != 0:
            # Still busy (a node's mount inside, after a failure): detached, so that the
            # clean-up below cannot reach into it.
            subprocess.run(["umount", "-l", mounted], check=False)
        shutil.rmtree(top, ignore_errors=True)


def run(a, work):
    member = None
    empty = None
    r = {"files": a.files, "fresh_fs": bool(a.fresh_fs)}
    try:
        # An empty node's memory, the base the member's is counted from.
        empty = Node(a.bin, work, "e")
        until_idle(empty, 60, "the empty node")
        time.sleep(1)
        empty_kib = rss_kib(empty.proc.pid)
        empty.stop()
        # The member's tree is in its backing directory before it starts (it scans it).
        backing = os.path.join(work, "m", "backing")
        make_tree(backing, a.files)
        os.sync()
        t = time.perf_counter()
        member = Node(a.bin, work, "m")
        until_idle(member, 3600, "the member's first scan")
        r["first_start_s"] = time.perf_counter() - t
        member.stop()
        t = time.perf_counter()
        member = Node(a.bin, work, "m")
        until_idle(member, 3600, "the member's restart")
        r["restart_s"] = time.perf_counter() - t
        time.sleep(1)
        member_kib = rss_kib(member.proc.pid)
        caches = (member.try_status() or {}).get("caches") or []
        r["empty_rss_kib"] = empty_kib
        r["member_rss_kib"] = member_kib
        r["rss_bytes_per_file"] = max(0, member_kib - empty_kib) * 1024 / a.files
        # What the caches hold counts against their fixed budget, not against the tree.
        r["caches"] = {c["name"]: [c["bytes"], c["budget_bytes"]] for c in caches}
        held = sum(c["bytes"] for c in caches)
        r["caches_held_bytes"] = held
        r["caches_budget_bytes"] = sum(c["budget_bytes"] for c in caches)
        r["rss_beyond_caches_bytes_per_file"] = (
            max(0, member_kib * 1024 - empty_kib * 1024 - held) / a.files)
        if not a.member_only:
            r["one_receiver_s"] = receivers(a.bin, work, member, ["r1"], a.files)
            r["two_receivers_s"] = receivers(a.bin, work, member, ["r2", "r3"], a.files)
        r["member_peak_rss_kib"] = rss_kib(member.proc.pid, "VmHWM:")
    finally:
        if member:
            member.stop()
        if empty:
            empty.stop()
    src = os.path.join(backing, "tree")
    if a.member_only:
        report(r, a)
        return
    os.sync()
    dsts = {m: os.path.join(work, "rsync-" + m) for m in ("one", "two_a", "two_b")}
    daemon, port = rsync_daemon(work, dsts)
    try:
        r["rsync_daemon_one_s"] = rsync_runs(src, port, ["one"])
        r["rsync_daemon_two_s"] = rsync_runs(src, port, ["two_a", "two_b"])
    finally:
        daemon.terminate()
        daemon.wait()
    t = time.perf_counter()
    subprocess.run(["rsync", "-a", src + "/", os.path.join(work, "rsync-local") + "/"], check=True)
    r["rsync_local_s"] = time.perf_counter() - t
    report(r, a)


def report(r, a):
    print(f"{a.files} files{' (in a fresh ext4 on a loop device)' if a.fresh_fs else ''}:")
    print(f"  member's first start {r['first_start_s']:.1f} s, restart {r['restart_s']:.1f} s; "
          f"RSS {r['member_rss_kib'] / 1024:.0f} MiB (empty node {r['empty_rss_kib'] / 1024:.0f} MiB): "
          f"{r['rss_bytes_per_file']:.0f} bytes per file; peak {r['member_peak_rss_kib'] / 1024:.0f} MiB")
    print(f"  caches hold {r['caches_held_bytes'] / 2**20:.1f} MiB of their fixed {r['caches_budget_bytes'] / 2**20:.1f} MiB; "
          f"beyond them {r['rss_beyond_caches_bytes_per_file']:.0f} bytes per file")
    for name, (held, budget) in r["caches"].items():
        print(f"    {name}: {held / 2**20:.1f} of {budget / 2**20:.1f} MiB")
    if a.member_only:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(r, f, indent=2)
        return
    print(f"  one receiver {r['one_receiver_s']:.1f} s, rsync daemon {r['rsync_daemon_one_s']:.1f} s "
          f"(ours / rsync {r['one_receiver_s'] / r['rsync_daemon_one_s']:.2f})")
    print(f"  two at once {r['two_receivers_s']:.1f} s, two rsync runs at once {r['rsync_daemon_two_s']:.1f} s "
          f"(ours / rsync {r['two_receivers_s'] / r['rsync_daemon_two_s']:.2f})")
    print(f"  rsync -a locally {r['rsync_local_s']:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
