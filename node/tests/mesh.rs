//! Real nodes replicating through their mounts over QUIC on 127.0.0.1: every kind of change in
//! both directions, races, joins, restarts. Needs /dev/fuse and root; elsewhere each test prints
//! why it did not run.

mod common;

use common::{converge, join, joined_pair, set_mode, tree, wait_for, Item, Node};
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

fn root() -> Option<tempfile::TempDir> {
    common::root_in("/var/tmp")
}

fn has(t: &std::collections::BTreeMap<String, Item>, path: &str) -> bool {
    t.contains_key(path)
}

#[test]
fn every_kind_of_change_crosses_in_both_directions() {
    let Some(dir) = root() else { return };
    let (a, b) = joined_pair(dir.path());

    // New file, then edits from the other side.
    fs::write(a.m("notes.txt"), b"first\n").unwrap();
    converge(&[&a, &b], |t| has(t, "notes.txt"));
    assert_eq!(fs::read(b.m("notes.txt")).unwrap(), b"first\n");
    fs::write(b.m("notes.txt"), b"second version\n").unwrap();
    converge(&[&a, &b], |_| {
        fs::read(a.m("notes.txt")).unwrap() == b"second version\n"
    });
    fs::OpenOptions::new()
        .append(true)
        .open(a.m("notes.txt"))
        .unwrap()
        .write_all(b"appended\n")
        .unwrap();
    converge(&[&a, &b], |_| {
        fs::read(b.m("notes.txt")).unwrap() == b"second version\nappended\n"
    });
    fs::OpenOptions::new()
        .write(true)
        .open(b.m("notes.txt"))
        .unwrap()
        .set_len(6)
        .unwrap();
    converge(&[&a, &b], |_| {
        fs::read(a.m("notes.txt")).unwrap() == b"second"
    });

    // Rename and delete.
    fs::rename(a.m("notes.txt"), a.m("renamed.txt")).unwrap();
    converge(&[&a, &b], |t| has(t, "renamed.txt") && !has(t, "notes.txt"));
    fs::remove_file(b.m("renamed.txt")).unwrap();
    converge(&[&a, &b], |t| !has(t, "renamed.txt"));

    // Directories, made and renamed and removed, with files inside.
    fs::create_dir_all(a.m("src/deep/er")).unwrap();
    fs::write(a.m("src/deep/er/main.rs"), b"fn main() {}\n").unwrap();
    converge(&[&a, &b], |t| has(t, "src/deep/er/main.rs"));
    fs::rename(b.m("src/deep"), b.m("src/moved")).unwrap();
    converge(&[&a, &b], |t| {
        has(t, "src/moved/er/main.rs") && !has(t, "src/deep")
    });
    fs::remove_file(a.m("src/moved/er/main.rs")).unwrap();
    fs::remove_dir(a.m("src/moved/er")).unwrap();
    converge(&[&a, &b], |t| !has(t, "src/moved/er"));
    fs::create_dir(b.m("empty")).unwrap();
    converge(&[&a, &b], |t| has(t, "empty"));
    fs::remove_dir(a.m("empty")).unwrap();
    converge(&[&a, &b], |t| !has(t, "empty"));

    // Symlinks, modes, mtimes.
    std::os::unix::fs::symlink("src/moved", a.m("link")).unwrap();
    converge(&[&a, &b], |t| {
        t.get("link")
            == Some(&Item::Symlink {
                target: "src/moved".into(),
            })
    });
    fs::write(b.m("script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    converge(&[&a, &b], |t| has(t, "script.sh"));
    set_mode(&a.m("script.sh"), 0o750);
    converge(&[&a, &b], |t| {
        matches!(t.get("script.sh"), Some(Item::File { mode: 0o750, .. }))
    });
    set_mode(&b.m("src"), 0o700);
    converge(&[&a, &b], |t| {
        matches!(t.get("src"), Some(Item::Dir { mode: 0o700, .. }))
    });

    // Extended attributes and ownership.
    let flags = rustix::fs::XattrFlags::empty();
    rustix::fs::setxattr(a.m("script.sh"), "user.origin", b"made on a", flags).unwrap();
    rustix::fs::setxattr(b.m("src"), "user.kind", b"sources", flags).unwrap();
    std::os::unix::fs::chown(a.m("script.sh"), Some(1234), Some(5678)).unwrap();
    converge(&[&a, &b], |t| {
        matches!(t.get("script.sh"), Some(Item::File { owner: (1234, 5678), xattrs, .. })
            if xattrs == &vec![(b"user.origin".to_vec(), b"made on a".to_vec())])
            && matches!(t.get("src"), Some(Item::Dir { xattrs, .. }) if xattrs.len() == 1)
    });
    // A symlink's own owner.
    std::os::unix::fs::lchown(a.m("link"), Some(4321), Some(8765)).unwrap();
    wait_for("the symlink's owner on b", common::CONVERGE, || {
        fs::symlink_metadata(b.m("link")).is_ok_and(|m| (m.uid(), m.gid()) == (4321, 8765))
    });
    rustix::fs::removexattr(b.m("script.sh"), "user.origin").unwrap();
    converge(
        &[&a, &b],
        |t| matches!(t.get("script.sh"), Some(Item::File { xattrs, .. }) if xattrs.is_empty()),
    );
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    fs::File::options()
        .write(true)
        .open(a.m("script.sh"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    converge(&[&a, &b], |_| {
        fs::metadata(b.m("script.sh")).unwrap().modified().unwrap() == old
    });

    // A file too large to travel inline, each way.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(b.m("big.bin"), &big).unwrap();
    converge(&[&a, &b], |t| has(t, "big.bin"));
    assert_eq!(fs::read(a.m("big.bin")).unwrap(), big);
    let mut changed = big.clone();
    changed[1_500_000..1_500_100].fill(0);
    fs::write(a.m("big.bin"), &changed).unwrap();
    converge(&[&a, &b], |_| fs::read(b.m("big.bin")).unwrap() == changed);

    // Both backing directories hold what the mounts show.
    assert_eq!(tree(&a.backing), tree(&a.mnt));
    assert_eq!(tree(&b.backing), tree(&b.mnt));
    assert_eq!(a.status()["conflicts"], 0);
    wait_for("b to have nothing pending", Duration::from_secs(30), || {
        let s = b.status();
        s["pending_paths"] == 0 && s["pending_bytes"] == 0
    });
}

#[test]
fn concurrent_writes_converge_and_keep_both_contents() {
    let Some(dir) = root() else { return };
    let (a, b) = joined_pair(dir.path());
    // Each round, both sides open the file before either writes, so that neither write can see
    // the other (a node holds a remote update back while a local writer has the path open):
    // the writes are truly concurrent, and both must survive on both nodes.
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        fs::write(a.m("race.txt"), format!("base of round {round}\n")).unwrap();
        converge(&[&a, &b], |_| {
            fs::read(b.m("race.txt")).ok() == Some(format!("base of round {round}\n").into_bytes())
        });
        let mut fa = fs::OpenOptions::new()
            .write(true)
            .open(a.m("race.txt"))
            .unwrap();
        let mut fb = fs::OpenOptions::new()
            .write(true)
            .open(b.m("race.txt"))
            .unwrap();
        let wa = format!("round {round} from a\n");
        let wb = format!("round {round} from b, longer\n");
        let (wa2, wb2) = (wa.clone(), wb.clone());
        let ta = std::thread::spawn(move || {
            fa.set_len(0).unwrap();
            fa.write_all(wa2.as_bytes()).unwrap();
        });
        let tb = std::thread::spawn(move || {
            fb.set_len(0).unwrap();
            fb.write_all(wb2.as_bytes()).unwrap();
        });
        ta.join().unwrap();
        tb.join().unwrap();
        converge(&[&a, &b], |_| {
            let all = common::contents(&a.mnt);
            all.contains(&wa.clone().into_bytes()) && all.contains(&wb.clone().into_bytes())
        });
    }
    let t = tree(&a.mnt);
    let copies = t.keys().filter(|k| k.contains(".sync-conflict-")).count();
    assert!(copies >= ROUNDS, "{copies} conflict copies in {t:#?}");
    let listed = a.cmd(&["conflicts", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), copies);

    // Delete against edit: the edit wins on both (b holds the file open while a deletes it).
    fs::write(a.m("keep.txt"), b"v1").unwrap();
    converge(&[&a, &b], |t| has(t, "keep.txt"));
    let mut fb = fs::OpenOptions::new()
        .write(true)
        .open(b.m("keep.txt"))
        .unwrap();
    fs::remove_file(a.m("keep.txt")).unwrap();
    fb.set_len(0).unwrap();
    fb.write_all(b"v2 edited").unwrap();
    drop(fb);
    converge(&[&a, &b], |t| has(t, "keep.txt"));
    assert_eq!(fs::read(a.m("keep.txt")).unwrap(), b"v2 edited");
    // Writes at the same moment from both sides, without the guard: whatever the interleaving,
    // the replicas agree.
    for round in 0..10 {
        let (pa, pb) = (a.m("free.txt"), b.m("free.txt"));
        let ta = std::thread::spawn(move || fs::write(pa, format!("a{round}")).unwrap());
        let tb = std::thread::spawn(move || fs::write(pb, format!("b{round}")).unwrap());
        ta.join().unwrap();
        tb.join().unwrap();
    }
    converge(&[&a, &b], |t| has(t, "free.txt"));
}

#[test]
fn a_stopped_node_catches_up_both_ways() {
    let Some(dir) = root() else { return };
    let (a, mut b) = joined_pair(dir.path());
    fs::write(a.m("before.txt"), b"seen by both").unwrap();
    converge(&[&a, &b], |t| has(t, "before.txt"));

    b.stop();
    // Written while b is down: on a's mount, and on b's backing directory directly.
    fs::write(a.m("while-down-on-a.txt"), b"from a").unwrap();
    fs::remove_file(a.m("before.txt")).unwrap();
    fs::create_dir(b.b("made-offline")).unwrap();
    fs::write(b.b("made-offline/on-b.txt"), b"from b's backing directory").unwrap();
    b.restart();
    let t = converge(&[&a, &b], |t| {
        has(t, "while-down-on-a.txt") && has(t, "made-offline/on-b.txt") && !has(t, "before.txt")
    });
    assert!(!t.keys().any(|k| k.contains("sync-conflict")), "{t:#?}");
    assert_eq!(
        fs::read(a.m("made-offline/on-b.txt")).unwrap(),
        b"from b's backing directory"
    );
}

#[test]
fn three_nodes_joined_through_one_member() {
    let Some(dir) = root() else { return };
    let a = Node::start(dir.path(), "a");
    let b = Node::start(dir.path(), "b");
    let c = Node::start(dir.path(), "c");
    join(&a, &b);
    // c asks without a token, as users type it; a's operator accepts.
    let member = a.listen();
    let mut asking = std::process::Command::new(common::BIN)
        .args(["join", "--state"])
        .arg(&c.state)
        .args(["--peer", &member])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let c_id = c.id();
    wait_for(
        "the join request to show on a",
        Duration::from_secs(30),
        || {
            a.status()["pending_joins"]
                .as_array()
                .unwrap()
                .iter()
                .any(|j| j["id"] == c_id.as_str())
        },
    );
    // The hint `join` printed names c by its short id, which `accept` takes; too short a
    // prefix is refused.
    let mut hint = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(asking.stderr.take().unwrap()),
        &mut hint,
    )
    .unwrap();
    let short = hint
        .split("rsyncfs-node accept ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no accept hint: {hint}"));
    assert!(
        c_id.starts_with(short) && short.len() < c_id.len(),
        "{hint}"
    );
    assert!(hint.contains("--state"), "{hint}");
    let out = a.cmd(&["accept", &short[..3]]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 4"));
    let out = a.cmd(&["accept", short]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let joined = asking.wait().unwrap();
    assert!(joined.success());
    // c learns b from a, and b learns c.
    wait_for(
        "c to be connected to a and b",
        Duration::from_secs(30),
        || c.connected_peers() == 2 && b.connected_peers() == 2,
    );
    fs::write(a.m("from-a"), b"a").unwrap();
    fs::write(b.m("from-b"), b"b").unwrap();
    fs::write(c.m("from-c"), b"c").unwrap();
    converge(&[&a, &b, &c], |t| {
        has(t, "from-a") && has(t, "from-b") && has(t, "from-c")
    });
}

#[test]
fn a_line_converges_through_its_middle() {
    let Some(dir) = root() else { return };
    // a and c trust only b: they ignore the members b introduces, so they never become peers.
    let mut a = Node::prepare(dir.path(), "a", "two-way", &["--no-introductions"]);
    a.run();
    let b = Node::start(dir.path(), "b");
    let mut c = Node::prepare(dir.path(), "c", "two-way", &["--no-introductions"]);
    c.run();
    join(&b, &a);
    join(&b, &c);
    fs::write(a.m("from-a.txt"), b"a").unwrap();
    fs::write(c.m("from-c.txt"), b"c").unwrap();
    fs::create_dir(c.m("dir-c")).unwrap();
    converge(&[&a, &b, &c], |t| {
        has(t, "from-a.txt") && has(t, "from-c.txt") && has(t, "dir-c")
    });
    assert_eq!(
        a.status()["peers"].as_array().unwrap().len(),
        1,
        "a knows only b"
    );
    assert_eq!(
        c.status()["peers"].as_array().unwrap().len(),
        1,
        "c knows only b"
    );
    fs::remove_file(c.m("from-a.txt")).unwrap();
    converge(&[&a, &b, &c], |t| !has(t, "from-a.txt"));
}

/// BLAKE3 of a file, read in pieces.
fn file_hash(path: &std::path::Path) -> Option<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(fs::File::open(path).ok()?).ok()?;
    Some(hasher.finalize())
}

#[test]
fn a_one_mib_change_in_a_one_gib_file_moves_about_one_mib() {
    let Some(dir) = root() else { return };
    let (a, b) = joined_pair(dir.path());
    const GIB: usize = 1 << 30;
    const MIB: usize = 1 << 20;
    {
        let mut f = fs::File::create(a.m("huge.bin")).unwrap();
        let mut block = vec![0u8; 4 * MIB];
        let mut x = 0x9e3779b97f4a7c15u64;
        for _ in 0..GIB / block.len() {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
    }
    let want = file_hash(&a.m("huge.bin")).unwrap();
    wait_for("the 1 GiB file on b", Duration::from_secs(120), || {
        fs::metadata(b.m("huge.bin")).is_ok_and(|m| m.len() == GIB as u64)
            && file_hash(&b.m("huge.bin")) == Some(want)
    });
    // The link kept its large packets: a batch of packets larger than the kernel takes in one
    // GSO call is dropped by quinn-udp without a word, and quinn then took loopback for an MTU
    // black hole and sent 1,200-byte packets (half the throughput).
    let link = &a.status()["peers"][0];
    println!("a's link to b after 1 GiB: {link}");
    assert_eq!(link["black_holes"].as_u64(), Some(0), "{link}");
    assert!(link["mtu"].as_u64().unwrap() > 1452, "{link}");
    let before = b.status();
    let (rx0, fetched0) = (
        before["udp_rx_bytes"].as_u64().unwrap(),
        before["fetched_bytes"].as_u64().unwrap(),
    );
    // All of it crossed: while it was written (a preseed) or fetched after its close.
    let preseeded0 = before["preseeded_bytes"].as_u64().unwrap();
    assert!(fetched0 + preseeded0 >= GIB as u64, "{before}");

    // 1 MiB in the middle, written in place.
    let ino = fs::metadata(b.m("huge.bin")).unwrap().ino();
    {
        use std::io::{Seek, SeekFrom};
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(a.m("huge.bin"))
            .unwrap();
        f.seek(SeekFrom::Start((GIB / 2 + 12345) as u64)).unwrap();
        f.write_all(&vec![0xA5; MIB]).unwrap();
        // Held open a while: a file opened to change inside is not pushed whole meanwhile.
        std::thread::sleep(Duration::from_millis(400));
    }
    let want = file_hash(&a.m("huge.bin")).unwrap();
    wait_for("the change on b", Duration::from_secs(120), || {
        file_hash(&b.m("huge.bin")) == Some(want)
    });
    let after = b.status();
    let rx = after["udp_rx_bytes"].as_u64().unwrap() - rx0;
    let fetched = after["fetched_bytes"].as_u64().unwrap() - fetched0;
    println!("1 MiB change: {fetched} content bytes, {rx} UDP bytes received by b");
    assert_eq!(
        after["preseeded_bytes"], before["preseeded_bytes"],
        "the changed file was pushed while open"
    );
    // Where the filesystem would copy the unchanged gigabyte, b wrote the change in place
    // (under its journal) instead of making a new copy.
    if rsyncfs_node::tree::in_place::overwrites_in_place(fs::File::open(b.b("")).unwrap()) {
        let m = fs::metadata(b.m("huge.bin")).unwrap();
        assert_eq!(m.ino(), ino, "b's copy was updated in place");
        assert_eq!(m.mtime(), fs::metadata(a.m("huge.bin")).unwrap().mtime());
    } else {
        println!("b's filesystem clones ranges: the update is a new copy");
    }
    assert!(
        fetched < 3 * MIB as u64 / 2,
        "{fetched} content bytes crossed"
    );
    assert!(rx < 2 * MIB as u64, "{rx} UDP bytes crossed");
}

/// Pseudo-random bytes (xorshift), different for each `seed`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9e3779b97f4a7c15u64 ^ seed.wrapping_mul(0x2545F4914F6CDD1D);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn a_large_file_travels_while_it_is_written_and_what_its_writer_changed_after_is_fetched() {
    let Some(dir) = root() else { return };
    let (a, b) = joined_pair(dir.path());
    const MIB: usize = 1 << 20;
    const SEGMENT: usize = 4 * MIB;
    let preseeded = |n: &common::Node| n.status()["preseeded_bytes"].as_u64().unwrap();
    let fetched = |n: &common::Node| n.status()["fetched_bytes"].as_u64().unwrap();
    let (fetched0, preseeded0) = (fetched(&b), preseeded(&b));
    let mut f = fs::File::create(a.m("grow.bin")).unwrap();
    // Twelve segments, written slowly enough for the pusher to follow.
    for i in 0..12 {
        f.write_all(&noise(i, SEGMENT)).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    wait_for(
        "b to hold part of the file being written",
        Duration::from_secs(30),
        || preseeded(&b) - preseeded0 >= 8 * SEGMENT as u64,
    );
    // Nothing of it shows on b before the close: a preseed is no file of the tree.
    assert!(
        !b.m("grow.bin").exists(),
        "b shows a file still being written"
    );
    assert!(
        !b.b("grow.bin").exists(),
        "b's tree holds a file still being written"
    );
    // The writer goes back into segment 1 (pushed already), then writes a short last segment.
    {
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start((SEGMENT + 100) as u64)).unwrap();
        f.write_all(&noise(99, MIB)).unwrap();
        f.seek(SeekFrom::End(0)).unwrap();
        f.write_all(&noise(100, 2 * MIB + 17)).unwrap();
    }
    drop(f);
    let want = file_hash(&a.m("grow.bin")).unwrap();
    wait_for("the written file on b", Duration::from_secs(60), || {
        file_hash(&b.m("grow.bin")) == Some(want)
    });
    let (kept, after_close) = (preseeded(&b) - preseeded0, fetched(&b) - fetched0);
    println!("{kept} bytes came while the file was written, {after_close} after its close");
    assert!(a.status()["preseed_pushed_bytes"].as_u64().unwrap() >= kept);
    // After the close only the changed segment, the last ones and what the pusher had not
    // sent yet crossed, not the 50 MiB.
    assert!(
        after_close <= (12 * SEGMENT + 3 * MIB) as u64 - kept + 2 * SEGMENT as u64,
        "{after_close} bytes fetched after the close, {kept} before"
    );
    assert!(
        after_close >= MIB as u64,
        "the rewritten segment was fetched again"
    );
    // The preseed became b's copy: none is left in its state folder.
    let left: Vec<String> = fs::read_dir(b.b(".rsyncfs/tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("e-"))
        .collect();
    assert!(left.is_empty(), "preseeds left: {left:?}");
}

#[test]
fn the_demo_shows_a_write_crossing() {
    let Some(dir) = root() else { return };
    let out = std::process::Command::new(common::BIN)
        .args(["demo", "--once", "--nodes", "3", "--dir"])
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("arrived on node3"), "{text}");
    assert!(!common::is_mounted(&dir.path().join("demo/node1/mnt")));
}
