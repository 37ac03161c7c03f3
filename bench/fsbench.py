#!/usr/bin/env python3
"""Runs the same file-system work on several directories and prints figures and ratios.

Usage: fsbench.py [--size-mib N] [--files N] NAME=DIR [NAME=DIR ...]
The first directory is the baseline (native); ratios are relative to it. Every figure is a
rate (higher is better) and the median of --repeat rounds. Run as root so that the page cache can be dropped before cold reads.
"""
import argparse
import json
import os
import random
import sys
import time

BLOCK = 1 << 20


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: reads may come from the cache; the report says so


def seq_write(d, size_mib):
    path = os.path.join(d, "big")
    buf = os.urandom(BLOCK)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(size_mib):
        os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    return size_mib * BLOCK / 1e6 / (time.perf_counter() - t)


def seq_read(d, size_mib):
    drop_caches()
    path = os.path.join(d, "big")
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    total = 0
    while True:
        b = os.read(fd, BLOCK)
        if not b:
            break
        total += len(b)
    os.close(fd)
    assert total == size_mib * BLOCK, total
    return total / 1e6 / (time.perf_counter() - t)


def random_reads(d, size_mib, count=20000):
    path = os.path.join(d, "big")
    rng = random.Random(7)
    offsets = [rng.randrange(0, size_mib * BLOCK // 4096) * 4096 for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    t = time.perf_counter()
    for off in offsets:
        os.pread(fd, 4096, off)
    os.close(fd)
    return count / (time.perf_counter() - t)


def create_files(d, n):
    sub = os.path.join(d, "many")
    os.mkdir(sub)
    data = b"x" * 4096
    t = time.perf_counter()
    for i in range(n):
        fd = os.open(os.path.join(sub, f"f{i:05}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
    return n / (time.perf_counter() - t)


def stat_files(d, n, cold=True):
    sub = os.path.join(d, "many")
    if cold:
        drop_caches()
    t = time.perf_counter()
    for i in range(n):
        os.stat(os.path.join(sub, f"f{i:05}"))
    return n / (time.perf_counter() - t)


def list_dir(d, n, cold=True):
    """One listing of 10,000 entries takes a few milliseconds and is at the mercy of the
    scheduler and, cold, of the disk: a cold figure is the median of five listings, each after
    its own cache drop; a warm one is ten listings in a row."""
    sub = os.path.join(d, "many")
    if cold:
        rates = []
        for _ in range(5):
            drop_caches()
            t = time.perf_counter()
            names = os.listdir(sub)
            rates.append(n / (time.perf_counter() - t))
            assert len(names) == n, len(names)
        return sorted(rates)[len(rates) // 2]
    times = 10
    t = time.perf_counter()
    for _ in range(times):
        names = os.listdir(sub)
        assert len(names) == n, len(names)
    return times * n / (time.perf_counter() - t)


def reset(d):
    """Removes what a round made, so that the next round starts alike."""
    sub = os.path.join(d, "many")
    if os.path.isdir(sub):
        for name in os.listdir(sub):
            os.unlink(os.path.join(sub, name))
        os.rmdir(sub)
    big = os.path.join(d, "big")
    if os.path.exists(big):
        os.unlink(big)


WORK = [
    ("sequential write 1 MiB blocks + fsync (MB/s)", lambda d, a: seq_write(d, a.size_mib)),
    ("sequential read 1 MiB blocks, cold (MB/s)", lambda d, a: seq_read(d, a.size_mib)),
    ("random 4 KiB reads, warm (reads/s)", lambda d, a: random_reads(d, a.size_mib)),
    ("create 4 KiB files (files/s)", lambda d, a: create_files(d, a.files)),
    ("stat files, cold (stats/s)", lambda d, a: stat_files(d, a.files)),
    ("stat files, warm (stats/s)", lambda d, a: stat_files(d, a.files, cold=False)),
    ("list a directory, cold (entries/s)", lambda d, a: list_dir(d, a.files)),
    ("list a directory, warm (entries/s)", lambda d, a: list_dir(d, a.files, cold=False)),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--files", type=int, default=10000)
    p.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians")
    p.add_argument("--json")
    p.add_argument("targets", nargs="+", help="NAME=DIR; the first is the baseline")
    a = p.parse_args()
    targets = [t.split("=", 1) for t in a.targets]
    samples = {name: {label: [] for label, _ in WORK} for name, _ in targets}
    # Rounds alternate the targets, so that slow phases of a shared machine hit all of them.
    # Within a round each target runs the whole sequence on its own, so that a "warm" figure
    # follows its own cold pass and not another target's cache drop.
    for _ in range(a.repeat):
        for name, d in targets:
            for label, fn in WORK:
                samples[name][label].append(fn(d, a))
            reset(d)
    results = {
        name: {label: sorted(v)[len(v) // 2] for label, v in by_label.items()}
        for name, by_label in samples.items()
    }
    names = [n for n, _ in targets]
    base = names[0]
    width = max(len(label) for label, _ in WORK)
    head = f"{'':{width}}  " + "  ".join(f"{n:>12}" for n in names)
    head += "  " + "  ".join(f"{n + '/' + base:>16}" for n in names[1:])
    print(head)
    for label, _ in WORK:
        row = f"{label:{width}}  " + "  ".join(f"{results[n][label]:12.1f}" for n in names)
        row += "  " + "  ".join(f"{results[n][label] / results[base][label]:16.2f}" for n in names[1:])
        print(row)
    if os.geteuid() != 0:
        print("note: not root, so caches were not dropped; cold figures are warm", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
