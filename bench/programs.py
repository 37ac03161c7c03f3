#!/usr/bin/env python3
"""Real programs on several directories: extracting a tar of a real tree and `git checkout`
between two distant commits of a real repository. Prints seconds (median of rounds) and each
target's speed relative to the first (native time / its time: 1.0 is native speed).

Usage: programs.py [--rounds N] [--tree DIR] [--repo DIR] NAME=DIR [NAME=DIR ...]
--tree: the tree to tar (default /usr/include). --repo: a repository whose first and last
commits are checked out; by default one made here of two real trees, commit 1 holding
/usr/include and commit 2 /usr/share/doc (no large repository with a long history is on this
machine, and this one's own commits differ in only a hundred files).
Rounds alternate the targets, so that slow phases of a shared machine hit all of them.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def run(*cmd, cwd=None):
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def out(*cmd, cwd=None):
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(path):
    """A repository of two commits of real trees: /usr/include, then /usr/share/doc."""
    os.mkdir(path)
    run("git", "init", "-q", path)
    for i, tree in enumerate(["/usr/include", "/usr/share/doc"]):
        for name in os.listdir(path):
            if name != ".git":
                shutil.rmtree(os.path.join(path, name))
        shutil.copytree(tree, os.path.join(path, "tree"), symlinks=True)
        run("git", "add", "-A", cwd=path)
        run("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-q",
            "-m", f"tree {i + 1}: {tree}", cwd=path)
    return path


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tree", default="/usr/include")
    p.add_argument("--repo")
    p.add_argument("targets", nargs="+", help="NAME=DIR; the first is the baseline")
    a = p.parse_args()
    if a.rounds < 1:
        sys.exit("--rounds must be at least 1")
    targets = [t.split("=", 1) for t in a.targets]
    for t in targets:
        if len(t) != 2 or not os.path.isdir(t[1]):
            sys.exit(f"not NAME=DIR with an existing DIR: {'='.join(t)}")
    work = tempfile.mkdtemp(prefix="rsyncfs-programs.", dir="/var/tmp")
    try:
        tarball = os.path.join(work, "tree.tar")
        run("tar", "-cf", tarball, "-C", os.path.dirname(a.tree.rstrip("/")) or "/", os.path.basename(a.tree.rstrip("/")))
        entries = int(out("sh", "-c", f"tar -tf {tarball} | wc -l"))
        bare = os.path.join(work, "repo.git")
        repo_src = a.repo or make_repo(os.path.join(work, "made"))
        run("git", "clone", "-q", "--bare", repo_src, bare)
        commits = out("git", "rev-list", "--reverse", "HEAD", cwd=bare).split()
        old, new = commits[0], commits[-1]
        changed = len(out("git", "diff", "--name-only", old, new, cwd=bare).splitlines())
        print(f"tar: {a.tree}, {entries} entries, {os.path.getsize(tarball) / 1e6:.0f} MB; "
              f"git: {len(commits)} commits, {old[:8]} <-> {new[:8]} changes {changed} files")
        samples = {name: {"tar x": [], "git checkout": []} for name, _ in targets}
        for _ in range(a.rounds):
            for name, d in targets:
                dest = os.path.join(d, "programs-tar")
                shutil.rmtree(dest, ignore_errors=True)
                os.mkdir(dest)
                samples[name]["tar x"].append(timed(lambda: run("tar", "-xf", tarball, "-C", dest)))
                shutil.rmtree(dest)
                repo = os.path.join(d, "programs-git")
                shutil.rmtree(repo, ignore_errors=True)
                run("git", "clone", "-q", "--no-checkout", bare, repo)
                run("git", "checkout", "-q", old, cwd=repo)
                # Both directions: new files made, then removed again.
                t = timed(lambda: run("git", "checkout", "-q", new, cwd=repo))
                t += timed(lambda: run("git", "checkout", "-q", old, cwd=repo))
                samples[name]["git checkout"].append(t)
                shutil.rmtree(repo)
        base = targets[0][0]
        med = {n: {k: sorted(v)[len(v) // 2] for k, v in s.items()} for n, s in samples.items()}
        names = [n for n, _ in targets]
        print(f"{'':24}" + "".join(f"{n + ' s':>14}" for n in names)
              + "".join(f"{n + '/' + base:>20}" for n in names[1:]))
        for k in ("tar x", "git checkout"):
            row = f"{k:24}" + "".join(f"{med[n][k]:14.3f}" for n in names)
            row += "".join(f"{med[base][k] / med[n][k]:20.2f}" for n in names[1:])
            print(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
