#!/usr/bin/env python3
"""First syncs of a big tree: a member holding N small files (default 100,000) and nodes that
join it with empty trees. Measures, in one run, the seconds until one receiver alone has every
file, then until two receivers that join at the same moment both have every file, and `rsync -a`
of the same tree between two local directories as the baseline.

Usage (as root): bench/firstsync.py [--files N] [--json FILE] [--bin PATH]
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
from node import Node, count_files, join, wait_until  # noqa: E402


def make_tree(root, files):
    for i in range(files):
        d = os.path.join(root, "tree", f"d{i // 1000:03}")
        if i % 1000 == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i:06}"), "w") as f:
            f.write(f"file {i}\n")


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
        wait_until(lambda: all(count_files(os.path.join(n.backing, "tree")) >= files for n in nodes),
                   3600, "the receivers")
        return time.perf_counter() - start
    finally:
        for n in nodes:
            n.stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--json")
    p.add_argument("--bin", default="target/release/rsyncfs-node")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="rsyncfs-firstsync.", dir="/var/tmp")
    member = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        # The member's tree is in its backing directory before it starts (it rescans it).
        backing = os.path.join(work, "m", "backing")
        make_tree(backing, a.files)
        member = Node(a.bin, work, "m")
        wait_until(lambda: member.status()["idle"], 600, "the member's rescan")
        one = receivers(a.bin, work, member, ["r1"], a.files)
        two = receivers(a.bin, work, member, ["r2", "r3"], a.files)
    finally:
        if member:
            member.stop()
    dst = os.path.join(work, "rsync-dst")
    os.sync()
    t = time.perf_counter()
    subprocess.run(["rsync", "-a", os.path.join(backing, "tree") + "/", dst + "/"], check=True)
    rsync_s = time.perf_counter() - t
    shutil.rmtree(work, ignore_errors=True)
    r = {"files": a.files, "one_receiver_s": one, "two_receivers_s": two, "rsync_local_s": rsync_s}
    print(f"{a.files} files: one receiver {one:.1f} s, two at once {two:.1f} s "
          f"({two / one:.2f} of one), rsync -a locally {rsync_s:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
