#!/usr/bin/env python3
"""rsyncfs and rsync over an emulated WAN link, in one run.

Usage (as root): bench/wan.py [--quick] [--delay-ms 50] [--jitter-ms 2] [--loss 0.01]
                              [--congestion bbr,cubic] [--json FILE] [--bin PATH]
       bench/wan.py relay NS_A NS_B --delay-ms D --jitter-ms J --loss P --seed S

Two network namespaces joined by a user-space relay (this machine kind has no netem): the relay
holds one TUN device in each namespace, and every IP packet from one side waits `delay` (plus a
uniform jitter of up to ±`jitter`, in order: packets are not reordered) and is dropped with
probability `loss` before it reaches the other side. Both directions, so a round trip is twice
the delay. UDP (QUIC) and TCP (rsync) cross the same relay, with the same MTU (1,500).

Measures, for rsyncfs with each congestion controller asked for and for rsync to an rsync daemon:
  - a 100 MiB file (20 MiB with --quick): seconds from close() on A until B has it, and MB/s;
  - a 4 KiB file: from close() on A's mount to the content readable on B's mount (p50, p99), next
    to the link's round trip; for rsync, one `rsync` run of the file (its connection setup
    included: what lsyncd-style tools pay per change).
"""
import argparse
import collections
import ctypes
import fcntl
import json
import os
import random
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import node  # noqa: E402  (bench/node.py: Node, join, wait_until, file_digest, write_big)

MIB = 1 << 20
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
TUN = "wan0"
ADDR_A, ADDR_B = "10.79.0.1", "10.79.0.2"
# Packets the relay holds per direction; more are dropped (a router's full queue), and counted.
QUEUE_PACKETS_MAX = 50_000
RSYNC_PORT = 8730


def setns(name):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tun():
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", TUN.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def relay(ns_a, ns_b, delay_ms, jitter_ms, loss, seed):
    """The relay process: never returns; stopped by its parent with SIGTERM."""
    setns(ns_a)
    fa = open_tun()
    setns(ns_b)
    fb = open_tun()
    rng = random.Random(seed)
    delay, jitter = delay_ms / 1e3, jitter_ms / 1e3
    other = {fa: fb, fb: fa}
    queues = {fa: collections.deque(), fb: collections.deque()}
    last_due = {fa: 0.0, fb: 0.0}
    counts = {"forwarded": 0, "lost": 0, "queue_full": 0, "write_failed": 0}
    stats_path = os.environ.get("WAN_RELAY_STATS")

    def stop(*_):
        if stats_path:
            with open(stats_path, "w") as f:
                json.dump(counts, f)
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        for out, q in queues.items():
            while q and q[0][0] <= now:
                _, packet = q.popleft()
                try:
                    os.write(out, packet)
                    counts["forwarded"] += 1
                except OSError:
                    counts["write_failed"] += 1
        waits = [q[0][0] - now for q in queues.values() if q]
        ready, _, _ = select.select([fa, fb], [], [], max(0.0, min(waits)) if waits else 0.5)
        for fd in ready:
            out = other[fd]
            for _ in range(256):
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if loss and rng.random() < loss:
                    counts["lost"] += 1
                    continue
                if len(queues[out]) >= QUEUE_PACKETS_MAX:
                    counts["queue_full"] += 1
                    continue
                due = time.monotonic() + delay + (rng.uniform(-jitter, jitter) if jitter else 0)
                due = max(due, last_due[out])
                last_due[out] = due
                queues[out].append((due, packet))


class Lab:
    """Two namespaces and the relay between them; `close` removes everything, also on failure."""

    def __init__(self, work, delay_ms, jitter_ms, loss, seed):
        tag = f"{os.getpid()}"
        self.ns = (f"rsyncfs-wan-a-{tag}", f"rsyncfs-wan-b-{tag}")
        self.relay = None
        self.made = []
        self.stats_path = os.path.join(work, "relay-stats.json")
        try:
            for ns in self.ns:
                subprocess.run(["ip", "netns", "add", ns], check=True)
                self.made.append(ns)
                subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            env = dict(os.environ, WAN_RELAY_STATS=self.stats_path)
            self.relay = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "relay", *self.ns,
                 "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms), "--loss", str(loss),
                 "--seed", str(seed)], stdout=subprocess.PIPE, text=True, env=env)
            if self.relay.stdout.readline().strip() != "ready":
                raise SystemExit("the relay did not start")
            for ns, addr in zip(self.ns, (ADDR_A, ADDR_B)):
                subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", TUN], check=True)
                subprocess.run(["ip", "-n", ns, "link", "set", TUN, "mtu", "1500", "up"], check=True)
        except BaseException:
            self.close()
            raise

    def run_in(self, side, argv, **kw):
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.ns[side]}", *argv], **kw)

    def relay_counts(self):
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except OSError:
            return None

    def close(self):
        if self.relay is not None and self.relay.poll() is None:
            self.relay.terminate()
            try:
                self.relay.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait()
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns])
        self.made = []


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def rsyncfs_run(lab, work, binary, congestion, size, trials):
    root = os.path.join(work, f"rsyncfs-{congestion}")
    nodes = []
    try:
        a = node.Node(binary, root, "a", listen=f"{ADDR_A}:7431", netns=lab.ns[0],
                      extra=("--congestion", congestion))
        nodes.append(a)
        b = node.Node(binary, root, "b", listen=f"{ADDR_B}:7431", netns=lab.ns[1],
                      extra=("--congestion", congestion))
        nodes.append(b)
        node.join(a, b)
        time.sleep(1)
        rtt = [p["rtt_ms"] for p in a.status()["peers"] if p.get("rtt_ms") is not None]
        lat = node.latency(a, b, trials)
        big_a, big_b = os.path.join(a.mnt, "big.bin"), os.path.join(b.mnt, "big.bin")
        node.write_big(big_a, size)
        t = time.perf_counter()
        node.wait_until(lambda: os.path.exists(big_b) and os.path.getsize(big_b) == size, 3600,
                        "the big file")
        secs = time.perf_counter() - t
        if node.file_digest(big_a) != node.file_digest(big_b):
            raise SystemExit("the big file differs on b")
        return {"rtt_ms": rtt[0] if rtt else None, "latency_4k": lat,
                "big": {"bytes": size, "s": secs, "mb_s": size / 1e6 / secs}}
    finally:
        for n in nodes:
            n.stop()
        shutil.rmtree(root, ignore_errors=True)


def rsync_run(lab, work, size, trials, tcp_cc):
    """rsync -a to an rsync daemon across the relay, over the namespaces' default TCP
    congestion control (`tcp_cc`; this machine kind does not let a namespace change it)."""
    if shutil.which("rsync") is None:
        return None
    root = os.path.join(work, f"rsync-{tcp_cc}")
    src, dst = os.path.join(root, "src"), os.path.join(root, "dst")
    os.makedirs(src)
    os.makedirs(dst)
    conf = os.path.join(root, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write(f"use chroot = no\n[dst]\npath = {dst}\nread only = no\nuid = root\ngid = root\n")
    daemon = subprocess.Popen(["nsenter", f"--net=/run/netns/{lab.ns[1]}", "rsync", "--daemon",
                               "--no-detach", f"--config={conf}", f"--address={ADDR_B}",
                               f"--port={RSYNC_PORT}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"rsync://{ADDR_B}:{RSYNC_PORT}/dst/"
    try:
        node.wait_until(lambda: lab.run_in(0, ["rsync", url], capture_output=True).returncode == 0,
                        30, "the rsync daemon")
        lat = []
        for i in range(trials):
            path = os.path.join(src, f"lat{i:04}")
            with open(path, "wb") as f:
                f.write(os.urandom(4096))
            t = time.perf_counter()
            lab.run_in(0, ["rsync", "-a", path, url], check=True)
            lat.append((time.perf_counter() - t) * 1e3)
        big = os.path.join(src, "big.bin")
        node.write_big(big, size)
        t = time.perf_counter()
        lab.run_in(0, ["rsync", "-a", big, url], check=True)
        secs = time.perf_counter() - t
        if node.file_digest(big) != node.file_digest(os.path.join(dst, "big.bin")):
            raise SystemExit("rsync's copy differs")
        return {"latency_4k": {"p50_ms": statistics.median(lat), "p99_ms": percentile(lat, 0.99),
                               "trials": trials},
                "big": {"bytes": size, "s": secs, "mb_s": size / 1e6 / secs}}
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(root, ignore_errors=True)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "relay":
        p = argparse.ArgumentParser(prog="wan.py relay")
        p.add_argument("ns_a")
        p.add_argument("ns_b")
        p.add_argument("--delay-ms", type=float, required=True)
        p.add_argument("--jitter-ms", type=float, default=0)
        p.add_argument("--loss", type=float, default=0)
        p.add_argument("--seed", type=int, default=1)
        a = p.parse_args(sys.argv[2:])
        relay(a.ns_a, a.ns_b, a.delay_ms, a.jitter_ms, a.loss, a.seed)
        return
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="20 MiB and 10 latency trials")
    p.add_argument("--delay-ms", type=float, default=50, help="each way")
    p.add_argument("--jitter-ms", type=float, default=2)
    p.add_argument("--loss", type=float, default=0.01, help="each way, per packet")
    p.add_argument("--congestion", default="bbr,cubic", help="rsyncfs controllers to measure")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--bin", default="target/release/rsyncfs-node")
    a = p.parse_args()
    if os.getuid() != 0:
        raise SystemExit("wan.py needs root (network namespaces, TUN devices, mounts)")
    size = (20 if a.quick else 100) * MIB
    trials = 10 if a.quick else 30
    work = tempfile.mkdtemp(prefix="rsyncfs-wan.", dir="/var/tmp")
    lab = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    results = {"link": {"delay_ms_each_way": a.delay_ms, "jitter_ms": a.jitter_ms,
                        "loss_each_way": a.loss, "mtu": 1500, "seed": a.seed}}
    try:
        lab = Lab(work, a.delay_ms, a.jitter_ms, a.loss, a.seed)
        for cc in a.congestion.split(","):
            print(f"rsyncfs, {cc} ...", flush=True)
            results[f"rsyncfs-{cc}"] = rsyncfs_run(lab, work, a.bin, cc, size, trials)
        tcp_cc = lab.run_in(0, ["cat", "/proc/sys/net/ipv4/tcp_congestion_control"],
                            capture_output=True, text=True, check=True).stdout.strip()
        print(f"rsync over TCP ({tcp_cc}, the namespaces' default) ...", flush=True)
        results[f"rsync-tcp-{tcp_cc}"] = rsync_run(lab, work, size, trials, tcp_cc)
    finally:
        if lab is not None:
            lab.close()
            results["relay"] = lab.relay_counts()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nlink: {a.delay_ms:g} ms each way, ±{a.jitter_ms:g} ms jitter, {a.loss:.1%} loss "
          f"each way, MTU 1500; relay: {results.get('relay')}")
    base = next((r for k, r in results.items() if k.startswith("rsync-tcp-") and r), None)
    print(f"{'':28} {f'{size // MIB} MiB (s)':>14} {'MB/s':>8} {'vs rsync':>9} "
          f"{'4 KiB p50 ms':>13} {'p99 ms':>8} {'rtt ms':>7}")
    for name, r in results.items():
        if not isinstance(r, dict) or "big" not in r:
            continue
        ratio = f"{base['big']['s'] / r['big']['s']:.2f}x" if base else ""
        rtt = f"{r['rtt_ms']:.0f}" if r.get("rtt_ms") else ""
        print(f"{name:28} {r['big']['s']:>14.1f} {r['big']['mb_s']:>8.2f} {ratio:>9} "
              f"{r['latency_4k']['p50_ms']:>13.1f} {r['latency_4k']['p99_ms']:>8.1f} {rtt:>7}")
    print("(vs rsync: rsync's seconds over these, the first rsync row; rsync's 4 KiB is one run"
          " of rsync per file, connection included)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
