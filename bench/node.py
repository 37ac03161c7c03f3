#!/usr/bin/env python3
"""Two rsyncfs nodes on 127.0.0.1, and the same work done by rsync between two local
directories as the baseline, in one run. Prints a table and writes JSON.

Usage (as root): bench/node.py [--quick] [--json FILE] [--bin PATH]

Measures:
  - propagation latency of a 4 KiB file, from close() on A's mount to the right content readable
    on B's mount (p50, p99, max over the trials);
  - a 1 GiB file: seconds from close() on A until B has it, and MB/s;
  - 10,000 files of 4 KiB in 100 directories: seconds until all are on B;
  - a 1 MiB overwrite in the middle of the 1 GiB file: seconds, and bytes B received (UDP);
  - peak RSS of each daemon while a 4 GiB file crosses.
The baseline is `rsync -a` (local, from one directory to another, the change with
`--inplace --no-whole-file`) doing the same copies, started after the write, so it shows what
the same machine does for the same bytes without a network or a mount.
"""
import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20


class Node:
    def __init__(self, binary, root, name, listen="127.0.0.1:0", netns=None, extra=()):
        """A node `up` on `listen`; with `netns`, inside that network namespace (through
        nsenter, so that its mount stays visible here)."""
        self.binary = binary
        self.name = name
        self.state = os.path.join(root, name, "state")
        self.backing = os.path.join(root, name, "backing")
        self.mnt = os.path.join(root, name, "mnt")
        for d in (self.state, self.backing, self.mnt):
            # A backing directory may hold a tree already (the node rescans it at start).
            os.makedirs(d, exist_ok=True)
        self.log = open(os.path.join(root, name + ".log"), "w")
        enter = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
        self.proc = subprocess.Popen(
            enter + [binary, "up", "--state", self.state, "--backing", self.backing, "--mount",
                     self.mnt, "--listen", listen, *extra],
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 30
        try:
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"{name} exited at start; see {self.log.name}")
                if os.path.ismount(self.mnt) and self.try_status() is not None:
                    break
                if time.time() > deadline:
                    raise SystemExit(f"{name} did not start")
                time.sleep(0.05)
        except BaseException:
            # Not started, or interrupted while starting: the caller has no Node to stop.
            self.stop()
            raise

    def cmd(self, *args):
        return subprocess.run([self.binary, args[0], "--state", self.state, *args[1:]],
                              capture_output=True, text=True)

    def try_status(self):
        out = self.cmd("status", "--json")
        return json.loads(out.stdout) if out.returncode == 0 else None

    def status(self):
        s = self.try_status()
        if s is None:
            raise SystemExit(f"status of {self.name} failed")
        return s

    def peak_rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", self.mnt])


def join(member, joiner):
    token = member.cmd("invite").stdout.strip()
    out = joiner.cmd("join", "--token", token)
    if out.returncode != 0:
        raise SystemExit("join failed: " + out.stderr)
    deadline = time.time() + 30
    while not any(p["connected"] for p in member.status()["peers"]):
        if time.time() > deadline:
            raise SystemExit("the nodes did not connect")
        time.sleep(0.05)


def wait_until(cond, timeout, what):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise SystemExit("timed out waiting for " + what)
        time.sleep(0.0002)


def file_digest(path):
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MIB)
            if not b:
                return h.hexdigest()
            h.update(b)


def write_big(path, size):
    block = os.urandom(4 * MIB)
    with open(path, "wb") as f:
        for i in range(size // len(block)):
            f.write(block[:8] + i.to_bytes(8, "little") + block[16:])


def latency(a, b, trials):
    out = []
    for i in range(trials):
        data = os.urandom(4096)
        name = f"lat{i:04}"
        with open(os.path.join(a.mnt, name), "wb") as f:
            f.write(data)
        t = time.perf_counter()
        target = os.path.join(b.mnt, name)

        def arrived():
            try:
                with open(target, "rb") as f:
                    return f.read() == data
            except OSError:
                return False
        wait_until(arrived, 30, "a 4 KiB file")
        out.append((time.perf_counter() - t) * 1e3)
    out.sort()
    return {"p50_ms": statistics.median(out), "p99_ms": out[min(len(out) - 1, int(len(out) * 0.99))],
            "max_ms": out[-1], "trials": trials}


def count_files(root):
    n = 0
    for _, _, files in os.walk(root):
        n += len(files)
    return n


def rsync_baseline(work, src_files, size_big):
    """rsync -a of the same data between two local directories."""
    if shutil.which("rsync") is None:
        return None
    src, dst = os.path.join(work, "rsrc"), os.path.join(work, "rdst")
    os.makedirs(src)
    os.makedirs(dst)
    for i in range(src_files):
        d = os.path.join(src, f"d{i // 100:03}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:05}"), "wb") as f:
            f.write(os.urandom(4096))
    os.sync()
    t = time.perf_counter()
    subprocess.run(["rsync", "-a", src + "/", dst + "/"], check=True)
    small = time.perf_counter() - t
    shutil.rmtree(src)
    shutil.rmtree(dst)
    os.makedirs(src)
    os.makedirs(dst)
    big = os.path.join(src, "big")
    write_big(big, size_big)
    os.sync()
    t = time.perf_counter()
    subprocess.run(["rsync", "-a", src + "/", dst + "/"], check=True)
    big_s = time.perf_counter() - t
    with open(big, "r+b") as f:
        f.seek(size_big // 2 + 12345)
        f.write(b"\xa5" * MIB)
    t = time.perf_counter()
    out = subprocess.run(["rsync", "-a", "-I", "--inplace", "--no-whole-file", "--stats", src + "/", dst + "/"],
                         check=True, capture_output=True, text=True)
    change_s = time.perf_counter() - t
    sent = 0
    for line in out.stdout.splitlines():
        if line.startswith("Total bytes sent:"):
            sent = int(line.split(":")[1].strip().replace(",", ""))
    shutil.rmtree(src)
    shutil.rmtree(dst)
    return {"small_files_s": small, "big_s": big_s, "big_mb_s": size_big / 1e6 / big_s,
            "change_s": change_s, "change_bytes": sent}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="64 MiB, 1,000 files, 50 trials, 256 MiB for RSS")
    p.add_argument("--json")
    p.add_argument("--bin", default="target/release/rsyncfs-node")
    p.add_argument("--congestion", help="the nodes' --congestion (default: up's own)")
    a = p.parse_args()
    extra = ("--congestion", a.congestion) if a.congestion else ()
    size_big = (64 if a.quick else 1024) * MIB
    n_files = 1000 if a.quick else 10000
    trials = 50 if a.quick else 200
    size_rss = (256 if a.quick else 4096) * MIB
    work = tempfile.mkdtemp(prefix="rsyncfs-node-bench.", dir="/var/tmp")
    nodes = []

    def cleanup(*_):
        for n in nodes:
            n.stop()
        shutil.rmtree(work, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(1)))
    results = {}
    try:
        na = Node(a.bin, work, "a", extra=extra)
        nodes.append(na)
        nb = Node(a.bin, work, "b", extra=extra)
        nodes.append(nb)
        join(na, nb)

        results["latency_4k"] = latency(na, nb, trials)

        # 10,000 small files in 100 directories.
        t = time.perf_counter()
        for i in range(n_files):
            d = os.path.join(na.mnt, "many", f"d{i // 100:03}")
            if i % 100 == 0:
                os.makedirs(d)
            with open(os.path.join(d, f"f{i:05}"), "wb") as f:
                f.write(os.urandom(4096))
        written = time.perf_counter()
        wait_until(lambda: count_files(os.path.join(nb.backing, "many")) >= n_files, 600, "the small files")
        done = time.perf_counter()
        results["small_files"] = {"files": n_files, "write_s": written - t,
                                  "after_last_close_s": done - written, "from_first_write_s": done - t}

        # The big file.
        big_a, big_b = os.path.join(na.mnt, "big.bin"), os.path.join(nb.mnt, "big.bin")
        write_big(big_a, size_big)
        t = time.perf_counter()
        wait_until(lambda: os.path.exists(big_b) and os.path.getsize(big_b) == size_big, 600, "the big file")
        secs = time.perf_counter() - t
        assert file_digest(big_a) == file_digest(big_b), "the big file differs on b"
        results["big_file"] = {"bytes": size_big, "s": secs, "mb_s": size_big / 1e6 / secs}

        # 1 MiB in its middle. B's copy is updated in place (ext4, tmpfs) or replaced by a
        # new file, and gets A's modification time last either way: that is the signal.
        before = nb.status()
        with open(big_a, "r+b") as f:
            f.seek(size_big // 2 + 12345)
            f.write(b"\xa5" * MIB)
        t = time.perf_counter()
        mtime = os.stat(big_a).st_mtime_ns
        wait_until(lambda: os.stat(big_b).st_mtime_ns == mtime, 600, "the change")
        secs = time.perf_counter() - t
        assert file_digest(big_b) == file_digest(big_a), "the change differs on b"
        after = nb.status()
        results["change_1m"] = {"s": secs,
                                "udp_bytes_received": after["udp_rx_bytes"] - before["udp_rx_bytes"],
                                "content_bytes": after["fetched_bytes"] - before["fetched_bytes"]}
        os.unlink(big_a)

        # Peak RSS while a large file crosses.
        rss_a = os.path.join(na.mnt, "rss.bin")
        write_big(rss_a, size_rss)
        wait_until(lambda: os.path.exists(os.path.join(nb.mnt, "rss.bin"))
                   and os.path.getsize(os.path.join(nb.mnt, "rss.bin")) == size_rss, 1200, "the RSS file")
        results["peak_rss_mib"] = {"file_bytes": size_rss, "a": na.peak_rss_kib() / 1024,
                                   "b": nb.peak_rss_kib() / 1024}
        os.unlink(rss_a)
        results["status_b"] = {k: nb.status()[k] for k in ("latency_ms", "conflicts", "frames_dropped")}
    finally:
        for n in nodes:
            n.stop()
    results["rsync_baseline"] = rsync_baseline(work, n_files, size_big)
    shutil.rmtree(work, ignore_errors=True)

    r, base = results, results["rsync_baseline"]
    rows = [
        ("4 KiB latency p50 (ms)", r["latency_4k"]["p50_ms"], None),
        ("4 KiB latency p99 (ms)", r["latency_4k"]["p99_ms"], None),
        ("4 KiB latency max (ms)", r["latency_4k"]["max_ms"], None),
        (f"{n_files} files of 4 KiB, s after the last close", r["small_files"]["after_last_close_s"],
         base and base["small_files_s"]),
        (f"{n_files} files of 4 KiB, s from the first write", r["small_files"]["from_first_write_s"], None),
        (f"{size_big // MIB} MiB file, s", r["big_file"]["s"], base and base["big_s"]),
        (f"{size_big // MIB} MiB file, MB/s", r["big_file"]["mb_s"], base and base["big_mb_s"]),
        ("1 MiB change, s", r["change_1m"]["s"], base and base["change_s"]),
        ("1 MiB change, bytes on the wire", r["change_1m"]["udp_bytes_received"], base and base["change_bytes"]),
        (f"peak RSS during {size_rss // MIB} MiB (MiB, a / b)",
         f'{r["peak_rss_mib"]["a"]:.0f} / {r["peak_rss_mib"]["b"]:.0f}', None),
    ]
    print(f"{'':52} {'rsyncfs':>14} {'rsync (local)':>14} {'ratio':>8}")
    for label, ours, theirs in rows:
        o = ours if isinstance(ours, str) else f"{ours:,.1f}"
        t = "" if theirs is None else f"{theirs:,.1f}"
        ratio = ""
        if theirs and not isinstance(ours, str) and ours:
            ratio = f"{ours / theirs:.2f}"
        print(f"{label:52} {o:>14} {t:>14} {ratio:>8}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
