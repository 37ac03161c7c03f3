#!/usr/bin/env python3
"""rsyncfs against the tools people use today for the same job, on the same work, in one run.

Usage (as root, normally through bench/compare.sh, which installs the peers, builds rsyncfs and
runs this inside a network namespace of its own so that the loopback counters count only the
tools' traffic):

    bench/compare.py [--quick] [--json FILE] [--tools rsyncfs,rsync,lsyncd,unison,syncthing]

Each tool keeps two replicas, A and B, of a directory on this machine, talking over 127.0.0.1:
  rsyncfs    two `rsyncfs-node up` daemons, each with its own FUSE mount, joined by a token;
  rsync      one `rsync -a` run to an rsync daemon on 127.0.0.1, started after the writes end
             (it has no watcher: it shows what the same bytes cost when a person runs rsync);
  lsyncd     inotify on A, rsync to an rsync daemon serving B (`delay = 0`, one-way);
  unison     a socket server for B and a client with `-repeat watch` (unison-fsmonitor);
  syncthing  two instances with their own homes, no discovery, relays or announcements, one
             folder shared between them, the watcher on with its delay at the minimum (1 s).

The work, the same for every tool, one tool at a time:
  1. latency of a 4 KiB file, from close() on one replica to the right content readable on the
     other (p50 and p99; both directions for two-way tools);
  2. 10,000 files of 4 KiB in nested directories: seconds until all are on B;
  3. a 1 GiB file: seconds from close() until B has it; then a 1 MiB overwrite in its middle:
     seconds, and the bytes that crossed the loopback interface meanwhile;
  4. a race: one file written on both sides at once (0 ms apart) and 50 ms apart; what each side
     ends with;
  5. CPU seconds and peak RSS of each tool's processes (every process it started, and theirs)
     during workloads 2 and 3.
Then, for rsyncfs against rsync (the one peer these are defined for), through the scripts
beside this one, each run as a child:
  6. bench/firstsync.py: a node joining a member that holds 100,000 small files (1,000 with
     --quick) against `rsync -a` to an rsync daemon, one receiver and two at once; the member's
     restart over the unchanged tree; its resident memory per tracked file (full mode: in a
     fresh ext4 on a loop device, so that earlier deletions slow neither side);
  7. bench/wan.py (full mode only): 100 MiB and a 4 KiB write through a user-space relay with
     50 ms each way, 2 ms jitter and 1% loss, rsyncfs (BBR) against rsync over TCP.

Every process started here is stopped by its own pid (the process group it leads), and every
mount is unmounted, also on an interrupt. Prints one table (tools as columns) and writes JSON.
"""
import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from node import Node, join, write_big, file_digest  # noqa: E402

MIB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PORT_RSYNCD = 18730
PORT_UNISON = 18731
PORT_ST_GUI = (18384, 18385)
PORT_ST_SYNC = (22001, 22002)


class Failed(Exception):
    """A tool did not do what the workload needs (did not start, lost data, timed out)."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes, CPU and memory

def proc_table():
    """pid -> (ppid, cpu seconds incl. reaped children, rss bytes) for every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/statm") as f:
                rss = int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        # After the command: state ppid ... utime(14) stime(15) cutime(16) cstime(17).
        cpu = sum(int(x) for x in fields[11:15]) / TICK
        out[int(name)] = (int(fields[1]), cpu, rss)
    return out


def tree(table, roots):
    kids = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    seen, todo = set(), [r for r in roots if r in table]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(kids.get(p, []))
    return seen


class Usage:
    """CPU seconds and peak RSS of a set of process trees over a window.

    CPU is the sum over the live tree of user+system time including reaped children, read at the
    start and at the end: a descendant that exits during the window is counted through its
    parent's children times. Peak RSS is the largest sum of the tree's resident sets seen by a
    sampler every 100 ms. `extra_cpu` adds processes reaped by this script (a one-shot rsync)."""

    def __init__(self, roots):
        self.roots = list(roots)
        self.peak = 0
        self.extra_cpu = 0.0
        self._stop = threading.Event()
        t = proc_table()
        self.cpu0 = sum(t[p][1] for p in tree(t, self.roots))
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.1):
            t = proc_table()
            self.peak = max(self.peak, sum(t[p][2] for p in tree(t, self.roots)))

    def add_root(self, pid):
        self.roots.append(pid)

    def stop(self):
        self._stop.set()
        self._thread.join()
        t = proc_table()
        self.peak = max(self.peak, sum(t[p][2] for p in tree(t, self.roots)))
        base = [r for r in self.roots if r in t]
        cpu = sum(t[p][1] for p in tree(t, base)) - self.cpu0 + self.extra_cpu
        return {"cpu_s": round(cpu, 2), "peak_rss_mib": round(self.peak / MIB, 1)}


class Procs:
    """Processes a tool started: each leads its own process group, stopped by that id."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.procs = []

    def start(self, name, argv, env=None, cwd=None):
        logf = open(os.path.join(self.logdir, name + ".log"), "w")
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, cwd=cwd, start_new_session=True)
        p.logname = logf.name
        self.procs.append(p)
        return p

    def pids(self):
        return [p.pid for p in self.procs]

    def check(self):
        for p in self.procs:
            if p.poll() is not None:
                raise Failed(f"{p.args[0]} exited with {p.returncode}; see {p.logname}")

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            # Whatever is left of the group (helpers the tool started), by the group's id.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        self.procs = []


def loopback_bytes():
    """Bytes received on lo in this network namespace (every packet crosses it once)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])
    raise Failed("no loopback interface")


# ---------------------------------------------------------------- waiting and reading

def wait_until(cond, timeout, what, procs=None):
    """Polls cond: every 0.2 ms for 50 ms, then every 1 ms for a second, then every 10 ms."""
    start = time.perf_counter()
    n = 0
    while True:
        if cond():
            return time.perf_counter()
        waited = time.perf_counter() - start
        if waited > timeout:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
        n += 1
        if procs is not None and n % 100 == 0:
            procs.check()
        time.sleep(0.0002 if waited < 0.05 else 0.001 if waited < 1 else 0.01)


def read_or_none(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)


def work_files(root):
    """Relative path -> size of every regular file, leaving out the tools' own state and
    temporary files, whose names start with a dot (.rsyncfs, .stfolder, rsync's, Syncthing's and
    Unison's temporary files)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for n in filenames:
            if n.startswith("."):
                continue
            p = os.path.join(dirpath, n)
            try:
                out[os.path.relpath(p, root)] = os.lstat(p).st_size
            except OSError:
                pass
    return out


# ---------------------------------------------------------------- the tools

class Tool:
    name = ""
    two_way = True
    continuous = True  # False: nothing moves until run_once()
    # Seconds to leave the tool alone before a race, once the base file has arrived (a watcher
    # delay or an archive update still running would blur which writes were concurrent).
    quiet_before_race = 0.2

    def __init__(self, work):
        self.work = os.path.join(work, self.name)
        self.a = os.path.join(self.work, "a")
        self.b = os.path.join(self.work, "b")
        os.makedirs(self.a)
        os.makedirs(self.b)
        os.makedirs(os.path.join(self.work, "logs"))
        self.procs = Procs(os.path.join(self.work, "logs"))

    # Where to read B's files when counting many of them (rsyncfs: the backing directory, so
    # that polling does not load B's mount); contents are checked through self.b afterwards.
    @property
    def b_count(self):
        return self.b

    def start(self):
        raise NotImplementedError

    def run_once(self, usage=None):
        pass

    def stop(self):
        self.procs.stop()

    def pids(self):
        return self.procs.pids()

    def ready(self, timeout):
        """Both directions carry a file before the work starts (initial scans are done)."""
        sides = [(self.a, self.b)] + ([(self.b, self.a)] if self.two_way else [])
        for i, (src, dst) in enumerate(sides):
            name = f"ready-probe-{i}"
            data = os.urandom(64)
            write_file(os.path.join(src, name), data)
            self.run_once()
            wait_until(lambda: read_or_none(os.path.join(dst, name)) == data, timeout,
                       f"{self.name} to carry a first file", self.procs)
        for i in range(len(sides)):
            os.unlink(os.path.join(sides[i][0], f"ready-probe-{i}"))
        self.run_once()
        wait_until(lambda: not any(n.startswith("ready-probe") for n in os.listdir(self.a) + os.listdir(self.b)),
                   timeout, f"{self.name} to carry a removal", self.procs)


class Rsyncfs(Tool):
    name = "rsyncfs"

    def __init__(self, work, binary):
        super().__init__(work)
        self.binary = binary
        self.nodes = []

    def start(self):
        root = os.path.join(self.work, "nodes")
        os.makedirs(root)
        self.nodes.append(Node(self.binary, root, "a"))
        self.nodes.append(Node(self.binary, root, "b"))
        join(self.nodes[0], self.nodes[1])
        self.a, self.b = self.nodes[0].mnt, self.nodes[1].mnt

    @property
    def b_count(self):
        return self.nodes[1].backing

    def pids(self):
        return [n.proc.pid for n in self.nodes]

    def stop(self):
        for n in self.nodes:
            n.stop()
        self.nodes = []


def rsync_daemon(tool, path):
    conf = os.path.join(tool.work, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write(f"port = {PORT_RSYNCD}\naddress = 127.0.0.1\nuse chroot = no\npid file = {tool.work}/rsyncd.pid\n"
                f"[b]\npath = {path}\nread only = no\nuid = root\ngid = root\n")
    p = tool.procs.start("rsyncd", ["rsync", "--daemon", "--no-detach", f"--config={conf}"])
    wait_until(lambda: subprocess.run(["rsync", f"rsync://127.0.0.1:{PORT_RSYNCD}/"], capture_output=True).returncode == 0,
               20, "the rsync daemon", tool.procs)
    return p


class RsyncOnce(Tool):
    """rsync run by hand after the writes: A to an rsync daemon serving B."""
    name = "rsync"
    two_way = False
    continuous = False

    def start(self):
        rsync_daemon(self, self.b)
        self.last_stats = ""

    def run_once(self, usage=None):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        p = subprocess.Popen(["rsync", "-a", "--delete", "--stats", self.a + "/", f"rsync://127.0.0.1:{PORT_RSYNCD}/b/"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if usage is not None:
            usage.add_root(p.pid)
        out, err = p.communicate()
        if p.returncode != 0:
            raise Failed("rsync failed: " + err.strip())
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if usage is not None:
            usage.extra_cpu += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        self.last_stats = out


class Lsyncd(Tool):
    name = "lsyncd"
    two_way = False

    def start(self):
        rsync_daemon(self, self.b)
        conf = os.path.join(self.work, "lsyncd.conf.lua")
        with open(conf, "w") as f:
            f.write("settings { nodaemon = true, insist = true, logfile = \"%s/logs/lsyncd-own.log\" }\n"
                    "sync { default.rsync, source = \"%s/\", target = \"rsync://127.0.0.1:%d/b/\", delay = 0,\n"
                    "       rsync = { archive = true, whole_file = false } }\n"
                    % (self.work, self.a, PORT_RSYNCD))
        self.procs.start("lsyncd", ["lsyncd", conf])


class Unison(Tool):
    name = "unison"
    quiet_before_race = 1.5

    def start(self):
        if shutil.which("unison-fsmonitor") is None:
            raise Failed("unison-fsmonitor is not on PATH (bench/compare.sh installs it with cargo)")
        env = {}
        for side in ("server", "client"):
            home = os.path.join(self.work, "home-" + side)
            os.makedirs(home)
            env[side] = dict(os.environ, HOME=home, UNISON=home)
        self.procs.start("unison-server", ["unison", "-socket", str(PORT_UNISON), "-listen", "127.0.0.1"], env=env["server"])
        time.sleep(0.3)
        self.procs.start("unison-client", [
            "unison", self.a, f"socket://127.0.0.1:{PORT_UNISON}/{self.b}",
            "-batch", "-auto", "-repeat", "watch", "-times", "-ui", "text", "-confirmbigdel=false",
            "-logfile", os.path.join(self.work, "logs", "unison-own.log")], env=env["client"])


def st_request(gui_port, apikey, path, body=None, method=None):
    req = urllib.request.Request(f"http://127.0.0.1:{gui_port}{path}", method=method,
                                 headers={"X-API-Key": apikey, "Content-Type": "application/json"},
                                 data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=5) as r:
        data = r.read()
    return json.loads(data) if data else None


class Syncthing(Tool):
    name = "syncthing"
    quiet_before_race = 1.5

    def start(self):
        homes = [os.path.join(self.work, h) for h in ("home-a", "home-b")]
        ids, keys = [], []
        env = dict(os.environ, STNODEFAULTFOLDER="1", STNOUPGRADE="1", STNORESTART="1")
        for home in homes:
            out = subprocess.run(["syncthing", "generate", "--home", home, "--no-default-folder", "--skip-port-probing"],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise Failed("syncthing generate: " + out.stderr.strip())
            ids.append(ET.parse(os.path.join(home, "config.xml")).getroot().find("device").get("id"))
        for i, home in enumerate(homes):
            path = os.path.join(home, "config.xml")
            tree_ = ET.parse(path)
            cfg = tree_.getroot()
            cfg.find("gui").find("address").text = f"127.0.0.1:{PORT_ST_GUI[i]}"
            keys.append(cfg.find("gui").find("apikey").text)
            opts = cfg.find("options")
            for key, value in {
                "listenAddress": f"tcp://127.0.0.1:{PORT_ST_SYNC[i]}", "globalAnnounceEnabled": "false",
                "localAnnounceEnabled": "false", "relaysEnabled": "false", "natEnabled": "false",
                "urAccepted": "-1", "autoUpgradeIntervalH": "0", "crashReportingEnabled": "false",
                "startBrowser": "false", "stunServer": "", "setLowPriority": "false",
            }.items():
                el = opts.find(key)
                if el is None:
                    el = ET.SubElement(opts, key)
                el.text = value
            tree_.write(path)
        self.gui_keys = keys
        self.ids = ids
        for i, home in enumerate(homes):
            self.procs.start(f"syncthing-{'ab'[i]}", ["syncthing", "serve", "--home", home, "--no-browser",
                                                     "--no-restart", "--no-upgrade"], env=env)

        def connected():
            self.procs.check()
            try:
                c = st_request(PORT_ST_GUI[0], keys[0], "/rest/system/connections")
                return c["connections"].get(ids[1], {}).get("connected", False)
            except OSError:
                return False
        # The peer and the folder through the REST API, from the instance's own defaults (an
        # element left out of config.xml is zero, not its default: maxConflicts 0 would turn
        # conflict copies off).
        for i in range(2):
            def api_up():
                self.procs.check()
                try:
                    return st_request(PORT_ST_GUI[i], keys[i], "/rest/system/ping") is not None
                except OSError:
                    return False
            wait_until(api_up, 60, "Syncthing's REST API", self.procs)
            other = 1 - i
            dev = st_request(PORT_ST_GUI[i], keys[i], "/rest/config/defaults/device")
            dev.update(deviceID=ids[other], name="peer", addresses=[f"tcp://127.0.0.1:{PORT_ST_SYNC[other]}"])
            st_request(PORT_ST_GUI[i], keys[i], "/rest/config/devices", dev, "POST")
            folder_path = self.a if i == 0 else self.b
            os.makedirs(os.path.join(folder_path, ".stfolder"), exist_ok=True)
            folder = st_request(PORT_ST_GUI[i], keys[i], "/rest/config/defaults/folder")
            folder.update(id="bench", label="bench", path=folder_path, type="sendreceive", rescanIntervalS=3600,
                          fsWatcherEnabled=True, fsWatcherDelayS=1,
                          devices=[{"deviceID": d, "introducedBy": "", "encryptionPassword": ""} for d in ids])
            st_request(PORT_ST_GUI[i], keys[i], "/rest/config/folders", folder, "POST")
        wait_until(connected, 60, "the two Syncthing instances to connect", self.procs)

    def bytes_total(self):
        c = st_request(PORT_ST_GUI[1], self.gui_keys[1], "/rest/system/connections")
        return c["total"]["inBytesTotal"] + c["total"]["outBytesTotal"]


# ---------------------------------------------------------------- the workloads

def latency(tool, src, dst, trials, tag, idle):
    """With idle > 0, each write follows `idle` seconds without writes: an isolated change, after
    any pacing a tool keeps between two rounds has run out (Unison over a socket waits about 2 s
    after a round). With idle 0 each write follows the previous arrival at once: back to back,
    as when a program saves a file again and again."""
    out = []
    for i in range(trials):
        time.sleep(idle)
        data = os.urandom(4096)
        name = f"lat-{tag}-{i:03}"
        write_file(os.path.join(src, name), data)
        t = time.perf_counter()
        tool.run_once()
        done = wait_until(lambda: read_or_none(os.path.join(dst, name)) == data, 120,
                          f"{tool.name}: a 4 KiB file {tag}", tool.procs)
        out.append((done - t) * 1e3)
    out.sort()
    return {"p50_ms": round(statistics.median(out), 2), "p99_ms": round(out[min(len(out) - 1, int(len(out) * 0.99))], 2),
            "max_ms": round(out[-1], 2), "trials": trials}


def small_files(tool, n, timeout):
    """n files of 4 KiB under many/dNN/eNN/ (100 files a directory, 10 directories a level)."""
    contents = {}
    usage = Usage(tool.pids())
    t0 = time.perf_counter()
    last = None
    for i in range(n):
        rel = os.path.join("many", f"d{i // 1000:02}", f"e{(i // 100) % 10}", f"f{i:05}")
        if i % 100 == 0:
            os.makedirs(os.path.join(tool.a, os.path.dirname(rel)), exist_ok=True)
        data = os.urandom(4096)
        write_file(os.path.join(tool.a, rel), data)
        contents[rel] = hashlib.blake2b(data).digest()
        last = rel
    written = time.perf_counter()
    tool.run_once(usage)
    wait_until(lambda: os.path.exists(os.path.join(tool.b_count, last)), timeout,
               f"{tool.name}: the last small file", tool.procs)
    root = os.path.join(tool.b_count, "many")

    def all_there():
        files = work_files(root)
        return len(files) >= n and all(s == 4096 for s in files.values())
    while not all_there():
        if time.perf_counter() - written > timeout:
            raise Failed(f"{tool.name}: the small files did not all arrive in {timeout} s")
        tool.procs.check()
        time.sleep(0.05)
    done = time.perf_counter()
    use = usage.stop()
    bad = [rel for rel, h in contents.items()
           if hashlib.blake2b(read_or_none(os.path.join(tool.b, "many", os.path.relpath(rel, "many"))) or b"").digest() != h]
    if bad:
        raise Failed(f"{tool.name}: {len(bad)} small files differ on B, first {bad[0]}")
    return {"files": n, "write_s": round(written - t0, 3), "from_first_write_s": round(done - t0, 3),
            "after_last_close_s": round(done - written, 3), **use}


def stat_key(path):
    try:
        st = os.stat(path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        return None


def big_and_change(tool, size, timeout):
    usage = Usage(tool.pids())
    src, dst = os.path.join(tool.a, "big.bin"), os.path.join(tool.b, "big.bin")
    t0 = time.perf_counter()
    write_big(src, size)
    written = time.perf_counter()
    want = file_digest(src)
    tool.run_once(usage)
    seen = None
    while True:
        def changed_and_full():
            k = stat_key(dst)
            return k is not None and k != seen and k[2] == size
        done = wait_until(changed_and_full, timeout, f"{tool.name}: the big file", tool.procs)
        seen = stat_key(dst)
        if file_digest(dst) == want:
            break
    big = {"bytes": size, "write_s": round(written - t0, 3), "s": round(done - written, 3),
           "mb_s": round(size / 1e6 / (done - written), 1)}

    # 1 MiB overwritten in the middle of the file.
    time.sleep(1)  # let the tool settle (Syncthing's watcher, Unison's archive update)
    patch = os.urandom(MIB)
    off = size // 2 + 12345
    lo0 = loopback_bytes()
    st0 = tool.bytes_total() if hasattr(tool, "bytes_total") else None
    before = stat_key(dst)
    with open(src, "r+b") as f:
        f.seek(off)
        f.write(patch)
    t = time.perf_counter()
    tool.run_once(usage)

    def patched():
        if stat_key(dst) == before:
            return False
        try:
            with open(dst, "rb") as f:
                f.seek(off)
                return f.read(MIB) == patch
        except OSError:
            return False
    done = wait_until(patched, timeout, f"{tool.name}: the 1 MiB change", tool.procs)
    time.sleep(0.5)  # the last acknowledgements
    lo1 = loopback_bytes()
    change = {"s": round(done - t, 3), "loopback_bytes": lo1 - lo0}
    if st0 is not None:
        change["own_counter_bytes"] = tool.bytes_total() - st0
    if isinstance(tool, RsyncOnce):
        for line in tool.last_stats.splitlines():
            if line.startswith("Total bytes sent:") or line.startswith("Total bytes received:"):
                change["own_counter_bytes"] = change.get("own_counter_bytes", 0) + int(line.split(":")[1].replace(",", ""))
    use = usage.stop()
    if file_digest(dst) != file_digest(src):
        raise Failed(f"{tool.name}: the changed big file differs on B")
    os.unlink(src)
    tool.run_once()
    wait_until(lambda: not os.path.exists(dst), timeout, f"{tool.name}: the big file's removal", tool.procs)
    return big, change, use


def race_snapshot(tool, r):
    snap = []
    for side in (tool.a, tool.b):
        files = {}
        for n in os.listdir(side):
            if n.startswith(f"race{r}"):
                data = read_or_none(os.path.join(side, n))
                if data is not None:
                    files[n] = data
        snap.append(files)
    return snap


def race(tool, r, gap_s, settle_s, timeout):
    """The same file written on both sides, gap_s apart (0: at once, from two threads)."""
    name = f"race{r}.txt"
    base = f"base {r}\n".encode() * 100
    write_file(os.path.join(tool.a, name), base)
    tool.run_once()
    wait_until(lambda: read_or_none(os.path.join(tool.b, name)) == base, timeout,
               f"{tool.name}: the race's base file", tool.procs)
    time.sleep(tool.quiet_before_race)
    ca, cb = f"written on A {r}\n".encode() * 100, f"written on B {r}\n".encode() * 120
    seen_by_b = []
    go = threading.Barrier(2)

    def writer(side, data, delay, probe):
        go.wait()
        if delay:
            time.sleep(delay)
        if probe:
            # Did A's write reach B before B wrote? Then B overwrote it knowingly.
            seen_by_b.append(read_or_none(os.path.join(side, name)) == ca)
        write_file(os.path.join(side, name), data)
    ths = [threading.Thread(target=writer, args=(tool.a, ca, 0, False)),
           threading.Thread(target=writer, args=(tool.b, cb, gap_s, True))]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    t0 = time.perf_counter()
    tool.run_once()
    last, stable_since = None, time.perf_counter()
    while True:
        snap = race_snapshot(tool, r)
        now = time.perf_counter()
        agree = snap[0] == snap[1]
        both = all(ca in s.values() and cb in s.values() for s in snap)
        if agree and both:
            break
        if snap != last:
            last, stable_since = snap, now
        elif now - stable_since >= settle_s:
            break
        if now - t0 > timeout:
            break
        time.sleep(0.1)
    outcome = race_outcome(snap, name, ca, cb, base, bool(seen_by_b and seen_by_b[0]))
    outcome.update(gap_ms=round(gap_s * 1e3), settled_s=round(time.perf_counter() - t0, 2))
    return outcome


def race_outcome(snap, name, ca, cb, base, b_saw_a):
    """What a race left: snap holds, for side A and side B, every file of the race (name ->
    content). A write is lost when no side holds its content, one-sided when only one does;
    ideal is no write lost or one-sided, and the two sides equal. When B had A's content before
    it wrote, B's write is a later overwrite and A's content is not owed to anyone."""
    def who(data):
        return "A" if data == ca else "B" if data == cb else "base" if data == base else "gone" if data is None else "other"
    sides = {}
    for label, s in zip("AB", snap):
        sides[label] = {"at_the_name": who(s.get(name)), "has_A": ca in s.values(), "has_B": cb in s.values(),
                        "files": sorted(s)}
    lost, partial = [], []
    for w, data in (("A", ca), ("B", cb)):
        if w == "A" and b_saw_a:
            continue
        held = sum(1 for s in snap if data in s.values())
        if held == 0:
            lost.append(w)
        elif held < len(snap):
            partial.append(w)
    agree = snap[0] == snap[1]
    outcome = {"b_had_a_when_writing": b_saw_a, "sides": sides, "replicas_agree": agree, "writes_lost": lost,
               "writes_on_one_side_only": partial, "ideal": agree and not lost and not partial}
    outcome["summary"] = race_summary(outcome)
    return outcome


def race_summary(o):
    a, b = o["sides"]["A"], o["sides"]["B"]
    if o["ideal"]:
        if o["b_had_a_when_writing"]:
            return f"B overwrote A's arrived write; {a['at_the_name']} on both"
        return f"both kept on both ({a['at_the_name']} at the name)"
    parts = [f"A:{a['at_the_name']}{'+A' if a['has_A'] and a['at_the_name'] != 'A' else ''}"
             f"{'+B' if a['has_B'] and a['at_the_name'] != 'B' else ''}",
             f"B:{b['at_the_name']}{'+A' if b['has_A'] and b['at_the_name'] != 'A' else ''}"
             f"{'+B' if b['has_B'] and b['at_the_name'] != 'B' else ''}"]
    if o["writes_lost"]:
        parts.append("lost " + ",".join(o["writes_lost"]))
    if o["writes_on_one_side_only"]:
        parts.append("one side only " + ",".join(o["writes_on_one_side_only"]))
    if not o["replicas_agree"]:
        parts.append("differ")
    return " ".join(parts)


# ---------------------------------------------------------------- one tool, every workload

def run_tool(tool, cfg):
    res = {}
    t_start = time.perf_counter()
    log(f"== {tool.name}")
    tool.start()
    tool.ready(cfg["timeout"])
    res["ready_s"] = round(time.perf_counter() - t_start, 2)
    if tool.continuous:
        log(f"   latency of isolated writes, {cfg['trials']} trials a direction")
        res["latency_ab"] = latency(tool, tool.a, tool.b, cfg["trials"], "ab", cfg["idle"])
        if tool.two_way:
            res["latency_ba"] = latency(tool, tool.b, tool.a, cfg["trials"], "ba", cfg["idle"])
        log(f"   latency back to back, {cfg['trials_b2b']} trials")
        res["latency_b2b"] = latency(tool, tool.a, tool.b, cfg["trials_b2b"], "b2b", 0)
    log(f"   {cfg['files']} small files")
    res["small_files"] = small_files(tool, cfg["files"], cfg["timeout"])
    log(f"   {cfg['size'] // MIB} MiB file and a 1 MiB change")
    res["big_file"], res["change_1m"], res["big_usage"] = big_and_change(tool, cfg["size"], cfg["timeout"])
    if tool.continuous:
        res["races"] = []
        for i in range(cfg["races"]):
            for gap in (0.0, 0.05):
                res["races"].append(race(tool, len(res["races"]), gap, cfg["settle"], cfg["timeout"]))
        log("   races: " + "; ".join(f"{o['gap_ms']} ms: {o['summary']}" for o in res["races"]))
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    return res


# ---------------------------------------------------------------- the table

LOWER, HIGHER = "lower", "higher"


def rows_of(results, cfg):
    n, size = cfg["files"], cfg["size"] // MIB

    def g(*keys):
        def f(r):
            for k in keys:
                if r is None or k not in r:
                    return None
                r = r[k]
            return r
        return f
    return [
        ("4 KiB A->B isolated, p50 ms", g("latency_ab", "p50_ms"), LOWER),
        ("4 KiB A->B isolated, p99 ms", g("latency_ab", "p99_ms"), LOWER),
        ("4 KiB B->A isolated, p50 ms", g("latency_ba", "p50_ms"), LOWER),
        ("4 KiB B->A isolated, p99 ms", g("latency_ba", "p99_ms"), LOWER),
        ("4 KiB A->B back to back, p50 ms", g("latency_b2b", "p50_ms"), LOWER),
        ("4 KiB A->B back to back, p99 ms", g("latency_b2b", "p99_ms"), LOWER),
        (f"{n:,} x 4 KiB, s from first write", g("small_files", "from_first_write_s"), LOWER),
        (f"{n:,} x 4 KiB, s after last close", g("small_files", "after_last_close_s"), LOWER),
        (f"{n:,} x 4 KiB, CPU s", g("small_files", "cpu_s"), LOWER),
        (f"{n:,} x 4 KiB, peak RSS MiB", g("small_files", "peak_rss_mib"), LOWER),
        (f"{size} MiB file, s after close", g("big_file", "s"), LOWER),
        (f"{size} MiB file, MB/s", g("big_file", "mb_s"), HIGHER),
        ("1 MiB change, s", g("change_1m", "s"), LOWER),
        ("1 MiB change, loopback bytes", g("change_1m", "loopback_bytes"), LOWER),
        (f"{size} MiB + change, CPU s", g("big_usage", "cpu_s"), LOWER),
        (f"{size} MiB + change, peak RSS MiB", g("big_usage", "peak_rss_mib"), LOWER),
    ]


def race_rows(results):
    """Per race gap: what each tool ended with in its first round, how many rounds were ideal (no
    write lost, replicas identical), and which tools were ideal in every round."""
    gaps = sorted({o["gap_ms"] for r in results.values() if r and "races" in r for o in r["races"]})
    rows = []
    for gap in gaps:
        cells, ideal = {}, []
        for tool, r in results.items():
            if not r or "races" not in r:
                continue
            rounds = [o for o in r["races"] if o["gap_ms"] == gap]
            ok = sum(1 for o in rounds if o["ideal"])
            cells[tool] = f"{ok}/{len(rounds)} ideal: {rounds[0]['summary']}"
            if ok == len(rounds):
                ideal.append(tool)
        note = "rsyncfs only (leads)" if ideal == ["rsyncfs"] else ("ideal: " + ", ".join(ideal) if ideal else "none ideal")
        rows.append((f"race, {gap} ms apart", cells, note))
    return rows


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if v < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


# ---------------------------------------------------------------- the workloads of other scripts

HERE = os.path.dirname(os.path.abspath(__file__))


def run_child(argv, timeout, what):
    """Runs one of the benchmark scripts beside this one; on an interrupt or a timeout it is
    asked to stop (TERM: it stops what it started) and waited for."""
    log(f"== {what}: {' '.join(argv)}")
    p = subprocess.Popen(argv)
    try:
        rc = p.wait(timeout=timeout)
    except BaseException:
        p.terminate()
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        raise
    if rc != 0:
        raise Failed(f"{what} exited with {rc}")


def extras(cfg, binary, work):
    """Workloads 6 and 7; returns their JSON by name, and the errors by name."""
    out, errors = {}, {}
    # In full mode the first syncs run in a fresh ext4 (see bench/firstsync.py, --fresh-fs):
    # on this machine's ext4 without a journal, earlier workloads' deletions slowed whichever
    # side created its files first.
    fresh = ["--fresh-fs", str(cfg["first_sync_fresh_fs_gib"])] if cfg.get("first_sync_fresh_fs_gib") else []
    jobs = [("first_sync", [sys.executable, os.path.join(HERE, "firstsync.py"),
                            "--files", str(cfg["first_sync_files"]), "--bin", binary] + fresh, 3600)]
    if cfg["wan"]:
        jobs.append(("wan", [sys.executable, os.path.join(HERE, "wan.py"), "--congestion", "bbr",
                             "--bin", binary], 3600))
    for name, argv, timeout in jobs:
        path = os.path.join(work, name + ".json")
        try:
            run_child(argv + ["--json", path], timeout, name.replace("_", " "))
            with open(path) as f:
                out[name] = json.load(f)
        except (Failed, OSError, ValueError, subprocess.TimeoutExpired) as e:
            errors[name] = str(e)
    return out, errors


def extra_rows(x):
    """(label, {tool: value}, better, note) of workloads 6 and 7, rsyncfs against rsync."""
    rows = []
    fs = x.get("first_sync")
    if fs:
        n = fs["files"]
        rows += [
            (f"first sync of {n:,} files, one joining, s",
             {"rsyncfs": fs.get("one_receiver_s"), "rsync": fs.get("rsync_daemon_one_s")}, LOWER,
             "rsync: `rsync -a` to a daemon"),
            (f"first sync of {n:,} files, two joining at once, s",
             {"rsyncfs": fs.get("two_receivers_s"), "rsync": fs.get("rsync_daemon_two_s")}, LOWER,
             "rsync: two runs at once"),
            (f"restart over {n:,} unchanged files, s", {"rsyncfs": fs.get("restart_s")}, LOWER,
             "until idle"),
            ("RSS per tracked file, bytes", {"rsyncfs": fs.get("rss_bytes_per_file")}, LOWER,
             "beyond an empty node's, caches included"),
            ("RSS per tracked file beyond the caches, bytes",
             {"rsyncfs": fs.get("rss_beyond_caches_bytes_per_file")}, LOWER,
             f"target 200; caches' budget {(fs.get('caches_budget_bytes') or 0) / 2**20:.0f} MiB"),
        ]
    wan = x.get("wan")
    if wan:
        ours = wan.get("rsyncfs-bbr") or {}
        theirs = next((r for k, r in wan.items() if k.startswith("rsync-tcp-") and r), {})
        link = wan.get("link", {})
        where = (f"{link.get('delay_ms_each_way', '?'):g} ms each way, {link.get('loss_each_way', 0):.0%} loss"
                 if link else "")
        size = ours.get("big", {}).get("bytes") or theirs.get("big", {}).get("bytes") or 0
        g = lambda r, *ks: r.get(ks[0], {}).get(ks[1]) if r else None  # noqa: E731
        rows += [
            (f"WAN ({where}): {size // MIB} MiB, s", {"rsyncfs": g(ours, "big", "s"), "rsync": g(theirs, "big", "s")},
             LOWER, "rsync over TCP through the same relay"),
            ("WAN: 4 KiB, p50 ms", {"rsyncfs": g(ours, "latency_4k", "p50_ms"),
                                    "rsync": g(theirs, "latency_4k", "p50_ms")}, LOWER,
             f"round trip {ours.get('rtt_ms') or 0:.0f} ms; rsync: one run per file"),
            ("WAN: 4 KiB, p99 ms", {"rsyncfs": g(ours, "latency_4k", "p99_ms"),
                                    "rsync": g(theirs, "latency_4k", "p99_ms")}, LOWER, ""),
        ]
    return rows


def table(results, cfg, more=None):
    tools = list(results)
    peers = [t for t in tools if t != "rsyncfs"]
    lines = []
    header = f"| measure | {' | '.join(tools)} | rsyncfs / best peer |"
    lines.append(header)
    lines.append("|" + "---|" * (len(tools) + 2))
    for label, get, better in rows_of(results, cfg):
        vals = {t: get(results[t]) for t in tools}
        ours = vals.get("rsyncfs")
        theirs = [vals[t] for t in peers if isinstance(vals[t], (int, float)) and vals[t] > 0]
        ratio = ""
        if isinstance(ours, (int, float)) and theirs:
            best = min(theirs) if better == LOWER else max(theirs)
            lead = ours <= best if better == LOWER else ours >= best
            ratio = f"{ours / best:.3g}" + (" (leads)" if lead else " (**behind**)")
        lines.append(f"| {label} | " + " | ".join(fmt(vals[t]) for t in tools) + f" | {ratio} |")
    for label, cells, note in race_rows(results):
        lines.append(f"| {label} | " + " | ".join(cells.get(t, "-") for t in tools) + f" | {note} |")
    for label, vals, better, note in extra_rows(more or {}):
        ours, theirs = vals.get("rsyncfs"), vals.get("rsync")
        ratio = note
        if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs > 0:
            lead = ours <= theirs if better == LOWER else ours >= theirs
            ratio = f"{ours / theirs:.3g}" + (" (leads)" if lead else " (**behind**)") + (f"; {note}" if note else "")
        lines.append(f"| {label} | " + " | ".join(fmt(vals.get(t)) for t in tools) + f" | {ratio} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="16 MiB, 300 files, 2 isolated trials a direction and 3 back to back, one race round")
    p.add_argument("--json", default="target/bench-compare.json")
    p.add_argument("--bin", default="target/release/rsyncfs-node")
    p.add_argument("--tools", default="rsyncfs,rsync,lsyncd,unison,syncthing")
    p.add_argument("--no-extras", action="store_true",
                   help="leave out workloads 6 and 7 (first syncs, the WAN relay)")
    a = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (FUSE mounts, an rsync daemon as root)")
    cfg = {"quick": a.quick, "size": (16 if a.quick else 1024) * MIB, "files": 300 if a.quick else 10000,
           "trials": 2 if a.quick else 50, "trials_b2b": 3 if a.quick else 50, "idle": 2.5, "races": 1 if a.quick else 3, "settle": 3 if a.quick else 6,
           "timeout": 120 if a.quick else 900,
           "first_sync_files": 1000 if a.quick else 100_000,
           "first_sync_fresh_fs_gib": None if a.quick else 16, "wan": not a.quick}
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    known = {"rsyncfs", "rsync", "lsyncd", "unison", "syncthing"}
    if set(tools) - known:
        raise SystemExit(f"unknown tools {sorted(set(tools) - known)}; known: {sorted(known)}")
    work = tempfile.mkdtemp(prefix="rsyncfs-compare.", dir="/var/tmp")
    current = []

    def on_signal(signum, _):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    results, errors, more = {}, {}, {}
    t_all = time.perf_counter()
    try:
        for name in tools:
            if name != "rsyncfs" and shutil.which(name) is None:
                errors[name] = f"{name} is not installed (bench/compare.sh installs it)"
                results[name] = None
                continue
            tool = {"rsyncfs": lambda: Rsyncfs(work, a.bin), "rsync": lambda: RsyncOnce(work),
                    "lsyncd": lambda: Lsyncd(work), "unison": lambda: Unison(work),
                    "syncthing": lambda: Syncthing(work)}[name]()
            current.append(tool)
            try:
                results[name] = run_tool(tool, cfg)
            except Failed as e:
                errors[name] = str(e)
                results[name] = None
                log(f"   FAILED: {e}")
                for f in sorted(os.listdir(os.path.join(tool.work, "logs"))):
                    with open(os.path.join(tool.work, "logs", f), errors="replace") as fh:
                        tail = fh.read()[-2000:]
                    log(f"   --- {f} (end)\n{tail}")
            finally:
                tool.stop()
                current.remove(tool)
                shutil.rmtree(tool.work, ignore_errors=True)
        if {"rsyncfs", "rsync"} <= set(tools) and not a.no_extras:
            more, more_errors = extras(cfg, a.bin, work)
            errors.update(more_errors)
    finally:
        for tool in current:
            tool.stop()
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t_all

    machine = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
               "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
               "kernel": platform.release(),
               "filesystem": subprocess.run(["df", "--output=fstype", "/var/tmp"], capture_output=True, text=True).stdout.split()[-1],
               "versions": versions()}
    print()
    print(f"rsyncfs and its peers, {'quick' if a.quick else 'full'} mode, {elapsed:.0f} s; {machine}")
    print(table(results, cfg, more))
    for name, e in errors.items():
        print(f"{name}: FAILED: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"machine": machine, "config": cfg, "results": results, "extras": more, "errors": errors}, f, indent=2)
    print(f"JSON: {a.json}")
    if errors:
        sys.exit(1)


def versions():
    out = {}
    for name, argv in (("rsync", ["rsync", "--version"]), ("lsyncd", ["lsyncd", "--version"]),
                       ("unison", ["unison", "-version"]), ("syncthing", ["syncthing", "--version"])):
        try:
            out[name] = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            out[name] = None
    return out


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        raise SystemExit(f"interrupted ({e}); every process and mount started here was stopped")
