//! Work that must finish, as a user meets it: an update held back by a local program that keeps
//! the file open, records at the size limits, trees thousands of levels deep. Real `up`
//! processes and mounts; needs /dev/fuse and root (elsewhere each test prints why it did not
//! run).

mod common;

use common::{joined_pair, wait_for, Node};
use rustix::fs::{AtFlags, Mode, OFlags};
use std::fs;
use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// A remote update to a file a local program holds open read-write (a database, an editor)
/// waits, and lands within seconds of the close: for a small file that travels inline and for
/// a large one that is fetched and staged.
#[test]
fn an_update_held_back_by_a_local_writer_lands_after_the_close() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let (a, b) = joined_pair(dir.path());
    let big_old = vec![1u8; 2 << 20];
    fs::write(a.m("small.db"), b"old\n").unwrap();
    fs::write(a.m("big.db"), &big_old).unwrap();
    wait_for("b to have both files", common::CONVERGE, || {
        fs::read(b.m("small.db")).is_ok_and(|d| d == b"old\n")
            && fs::read(b.m("big.db")).is_ok_and(|d| d == big_old)
    });

    // A program on b opens both for reading and writing and keeps them open.
    let mut held: Vec<fs::File> = ["small.db", "big.db"]
        .iter()
        .map(|p| {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(b.m(p))
                .unwrap()
        })
        .collect();
    let big_new: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    fs::write(a.m("small.db"), b"new from a\n").unwrap();
    fs::write(a.m("big.db"), &big_new).unwrap();
    wait_for("b to hold the updates back", common::CONVERGE, || {
        b.status()["pending_paths"].as_u64() == Some(2)
    });
    // Long enough for several refused applies and their retries.
    std::thread::sleep(Duration::from_secs(3));
    for f in &mut held {
        let mut first = [0u8; 3];
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut first).unwrap();
    }
    assert_eq!(fs::read(b.m("small.db")).unwrap(), b"old\n");
    assert_eq!(fs::read(b.m("big.db")).unwrap(), big_old);
    let closed = Instant::now();
    drop(held);
    wait_for(
        "the held-back updates to land",
        Duration::from_secs(10),
        || {
            fs::read(b.m("small.db")).is_ok_and(|d| d == b"new from a\n")
                && fs::read(b.m("big.db")).is_ok_and(|d| d == big_new)
        },
    );
    println!(
        "landed {:.0} ms after the close",
        closed.elapsed().as_secs_f64() * 1e3
    );
    wait_for("b to be idle", Duration::from_secs(10), || {
        b.status()["idle"] == true
    });
    // Nothing was left in the staging folder.
    let staged = fs::read_dir(b.b(".rsyncfs/tmp")).unwrap().count();
    assert_eq!(staged, 0, "staging files leaked");
}

/// 300 files with about 60 KiB of extended attributes each replicate, and both daemons stay up
/// (batches are cut by their encoded size). The nodes' folders are on tmpfs: ext4 without
/// `ea_inode` keeps at most a block of attributes per file.
#[test]
fn files_with_large_extended_attributes_replicate() {
    let Some(dir) = common::root_in("/dev/shm") else {
        return;
    };
    let (a, b) = joined_pair(dir.path());
    let value = vec![b'v'; 4000];
    for i in 0..300 {
        let p = a.m(&format!("f{i:03}"));
        fs::write(&p, format!("file {i}\n")).unwrap();
        for k in 0..15 {
            let name = std::ffi::CString::new(format!("user.k{k:02}")).unwrap();
            rustix::fs::setxattr(&p, name.as_c_str(), &value, rustix::fs::XattrFlags::empty())
                .unwrap();
        }
    }
    wait_for(
        "b to have every file and attribute",
        common::CONVERGE,
        || {
            (0..300).all(|i| {
                let p = b.m(&format!("f{i:03}"));
                common::xattrs(&p).len() == 15
            })
        },
    );
    let one = common::xattrs(&b.m("f123"));
    assert!(one.iter().all(|(_, v)| *v == value));
    assert!(a.status()["idle"] == true || a.status()["up_s"].as_u64().is_some());
    for n in [&a, &b] {
        assert!(
            !n.log_text().contains("panicked"),
            "{} panicked:\n{}",
            n.name,
            n.log_text()
        );
    }
}

/// `mkdir -p` of a chain `depth` levels deep below `root`, one level at a time through
/// directory descriptors (the whole path is longer than a system call takes).
fn make_chain(root: &Path, depth: usize) {
    let mut fd: OwnedFd =
        rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
    for _ in 0..depth {
        rustix::fs::mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).unwrap();
        fd = rustix::fs::openat(&fd, "d", OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
    }
    let file = rustix::fs::openat(
        &fd,
        "leaf",
        OFlags::WRONLY | OFlags::CREATE,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    fs::File::from(file).write_all(b"at the bottom\n").unwrap();
}

/// How deep the chain of `d` below `root` goes (0 when there is none).
fn chain_depth(root: &Path) -> usize {
    let Ok(mut fd) = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()) else {
        return 0;
    };
    let mut depth = 0;
    while let Ok(next) =
        rustix::fs::openat(&fd, "d", OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
    {
        fd = next;
        depth += 1;
    }
    depth
}

/// Removes the chain bottom up (`rm -r`).
fn remove_chain(root: &Path) {
    let mut fds: Vec<OwnedFd> =
        vec![rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap()];
    while let Ok(next) = rustix::fs::openat(
        fds.last().unwrap(),
        "d",
        OFlags::PATH | OFlags::DIRECTORY,
        Mode::empty(),
    ) {
        fds.push(next);
    }
    rustix::fs::unlinkat(fds.last().unwrap(), "leaf", AtFlags::empty()).unwrap();
    while fds.len() > 1 {
        fds.pop();
        rustix::fs::unlinkat(fds.last().unwrap(), "d", AtFlags::REMOVEDIR).unwrap();
    }
}

/// A status call, timed: it must answer while the engine works.
fn timed_status(n: &Node) -> Duration {
    let started = Instant::now();
    let out = n.cmd(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status of {} failed: {}",
        n.name,
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

/// A tree 1,500 levels deep made and removed on one node is made and gone on the other within
/// seconds, and `status` answers throughout (the engine does a bounded amount of work per path
/// and yields).
#[test]
fn a_tree_1500_levels_deep_comes_and_goes() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let (a, b) = joined_pair(dir.path());
    let depth = 1500;
    let started = Instant::now();
    make_chain(&a.mnt, depth);
    let mut slowest = Duration::ZERO;
    wait_for(
        "b to have the whole chain",
        Duration::from_secs(120),
        || {
            slowest = slowest.max(timed_status(&b));
            chain_depth(&b.backing) == depth
        },
    );
    println!(
        "made: {depth} levels on b {:.1} s after a began",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    remove_chain(&a.mnt);
    wait_for(
        "the chain to be gone on b",
        Duration::from_secs(120),
        || {
            slowest = slowest.max(timed_status(&b));
            chain_depth(&b.backing) == 0
        },
    );
    println!(
        "removed: gone on b {:.1} s after a began; slowest status {:.0} ms",
        started.elapsed().as_secs_f64(),
        slowest.as_secs_f64() * 1e3
    );
    wait_for("both to be idle", Duration::from_secs(30), || {
        a.status()["idle"] == true && b.status()["idle"] == true
    });
    assert!(
        slowest < Duration::from_secs(5),
        "a status call waited {slowest:?} behind the engine"
    );
}

/// Files below `root` (not counting the state folder).
fn count_files(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name() == ".rsyncfs" {
                continue;
            }
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => n += 1,
                _ => {}
            }
        }
    }
    n
}

/// A member holding 100,000 small files, and two nodes joining it at once: both receive all
/// of them (each also hears the other's copies; neither may stall the other). The time is
/// printed; bench/firstsync.sh compares it with one receiver alone.
#[test]
fn a_first_sync_to_two_receivers_at_once_completes() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let files = 100_000;
    let mut a = Node::prepare(dir.path(), "a", "two-way", &[]);
    for i in 0..files {
        let d = a.b(&format!("tree/d{:03}", i / 1000));
        if i % 1000 == 0 {
            fs::create_dir_all(&d).unwrap();
        }
        fs::write(d.join(format!("f{i:06}")), format!("file {i}\n")).unwrap();
    }
    a.run();
    let b = Node::start(dir.path(), "b");
    let c = Node::start(dir.path(), "c");
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| common::join(&a, &b));
        s.spawn(|| common::join(&a, &c));
    });
    // Progress: a receiver's status says what the member holds, to compare with what it has.
    let member_files = |n: &Node| {
        n.status()["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["their_files"].as_u64())
            .max()
            .unwrap_or(0)
    };
    wait_for(
        "b's status to say how many files the member holds",
        Duration::from_secs(60),
        || member_files(&b) == files as u64,
    );
    wait_for(
        "both receivers to have every file",
        Duration::from_secs(600),
        || count_files(&b.backing) == files && count_files(&c.backing) == files,
    );
    println!(
        "{files} files on both receivers {:.1} s after the joins",
        started.elapsed().as_secs_f64()
    );
    for n in [&a, &b, &c] {
        common::wait_idle(n, common::CONVERGE);
    }
    for n in [&b, &c] {
        let s = n.status();
        assert_eq!(s["files"].as_u64(), Some(files as u64), "{s}");
        assert_eq!(member_files(n), files as u64, "{s}");
    }
}
