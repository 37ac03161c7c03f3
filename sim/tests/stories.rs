//! Replication stories told step by step on a scripted simulated mesh: the real engines and
//! conflict rules, a network that neither loses nor duplicates, and explicit faults.

use rsyncfs_sim::world::World;
use rsyncfs_sim::Topology;

fn content(fs: &rsyncfs_sim::fs::SimFs, path: &str) -> Option<Vec<u8>> {
    fs.read_file(path).map(|b| b.to_vec())
}

/// Every file content on a node's tree.
fn contents(world: &World, n: usize) -> Vec<Vec<u8>> {
    world
        .fs(n)
        .iter()
        .filter_map(|(p, _)| content(world.fs(n), p))
        .collect()
}

fn assert_clean(world: &mut World) {
    let violations = world.check();
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn writes_cross_in_both_directions() {
    let mut w = World::scripted(2, Topology::Full);
    assert!(w.write(0, "small.txt", b"hello", 0o644));
    assert!(w.write(0, "dir/big.bin", &[7u8; 1000], 0o600));
    assert!(w.settle());
    assert!(w.write(1, "from-b", b"the other way", 0o644));
    assert!(w.mkdir(1, "empty", 0o700));
    assert!(w.symlink(1, "link", "small.txt"));
    assert!(w.settle());
    for n in 0..2 {
        assert_eq!(content(w.fs(n), "small.txt").unwrap(), b"hello");
        assert_eq!(content(w.fs(n), "dir/big.bin").unwrap(), vec![7u8; 1000]);
        assert_eq!(content(w.fs(n), "from-b").unwrap(), b"the other way");
        assert!(w.fs(n).get("empty").is_some_and(|e| e.is_dir()));
    }
    assert_eq!(w.fs(0).meta("dir/big.bin").unwrap().mode, 0o600);
    assert_clean(&mut w);
}

#[test]
fn a_line_converges_through_its_middle() {
    let mut w = World::scripted(3, Topology::Line);
    assert!(w.write(0, "from-a", b"a", 0o644));
    assert!(w.write(2, "from-c", &[3u8; 500], 0o644));
    assert!(w.settle());
    for n in 0..3 {
        assert_eq!(content(w.fs(n), "from-a").unwrap(), b"a");
        assert_eq!(content(w.fs(n), "from-c").unwrap(), vec![3u8; 500]);
    }
    assert_clean(&mut w);
}

#[test]
fn concurrent_writes_keep_both_contents_everywhere() {
    let mut w = World::scripted(2, Topology::Full);
    w.cut(0, 1);
    assert!(w.write(0, "report.txt", b"written on A", 0o644));
    assert!(w.write(1, "report.txt", b"written on B", 0o644));
    w.heal(0, 1);
    assert!(w.settle());
    assert_eq!(w.fs(0), w.fs(1));
    let all = contents(&w, 0);
    assert!(all.contains(&b"written on A".to_vec()));
    assert!(all.contains(&b"written on B".to_vec()));
    let copies: Vec<_> = w
        .fs(0)
        .iter()
        .filter(|(p, _)| p.starts_with("report.sync-conflict-") && p.ends_with(".txt"))
        .collect();
    assert_eq!(copies.len(), 1, "one conflict copy: {copies:?}");
    assert_clean(&mut w);
}

#[test]
fn delete_against_edit_keeps_the_edit() {
    let mut w = World::scripted(2, Topology::Full);
    assert!(w.write(0, "f", b"v1", 0o644));
    assert!(w.settle());
    w.cut(0, 1);
    assert!(w.remove(0, "f"));
    assert!(w.write(1, "f", b"v2 edited", 0o644));
    w.heal(0, 1);
    assert!(w.settle());
    for n in 0..2 {
        assert_eq!(content(w.fs(n), "f").unwrap(), b"v2 edited");
    }
    assert_clean(&mut w);
}

#[test]
fn create_inside_a_removed_directory_brings_it_back() {
    let mut w = World::scripted(2, Topology::Full);
    assert!(w.mkdir(0, "d", 0o700));
    assert!(w.settle());
    w.cut(0, 1);
    assert!(w.rmdir(0, "d"));
    assert!(w.write(1, "d/new", b"inside", 0o644));
    w.heal(0, 1);
    assert!(w.settle());
    for n in 0..2 {
        assert_eq!(content(w.fs(n), "d/new").unwrap(), b"inside");
    }
    assert_eq!(w.fs(0), w.fs(1));
    assert_clean(&mut w);
}

#[test]
fn file_against_directory_keeps_the_directory_and_copies_the_file() {
    let mut w = World::scripted(2, Topology::Full);
    w.cut(0, 1);
    assert!(w.write(0, "x/inner", b"in a directory", 0o644));
    assert!(w.write(1, "x", b"a file named x", 0o644));
    w.heal(0, 1);
    assert!(w.settle());
    for n in 0..2 {
        assert!(w.fs(n).get("x").is_some_and(|e| e.is_dir()));
        assert!(contents(&w, n).contains(&b"a file named x".to_vec()));
    }
    assert_eq!(w.fs(0), w.fs(1));
    assert_clean(&mut w);
}

#[test]
fn an_open_writer_holds_remote_updates_back() {
    let mut w = World::scripted(2, Topology::Full);
    assert!(w.open(1, "log", b"started on B;"));
    assert!(w.settle());
    // A writes over the file while B's process still has it open for writing.
    assert!(w.write(0, "log", b"replaced on A", 0o644));
    assert!(!w.settle(), "B's apply must wait while the file is open");
    assert_eq!(content(w.fs(1), "log").unwrap(), b"started on B;");
    w.write_open(1, "log", b" more from B");
    assert!(!w.settle());
    assert_eq!(
        content(w.fs(1), "log").unwrap(),
        b"started on B; more from B"
    );
    w.close(1, "log");
    assert!(w.settle());
    assert_eq!(w.fs(0), w.fs(1));
    let all = contents(&w, 0);
    assert!(all.contains(&b"replaced on A".to_vec()));
    assert!(all.contains(&b"started on B; more from B".to_vec()));
    assert_clean(&mut w);
}

#[test]
fn a_rename_moves_no_content_over_the_network() {
    let mut w = World::scripted(2, Topology::Full);
    let big = vec![42u8; 5000];
    assert!(w.write(0, "a/old-name", &big, 0o644));
    assert!(w.settle());
    let fetches = w.engine(1).stats().fetches;
    assert!(w.rename(0, "a", "b"));
    assert!(w.settle());
    assert_eq!(content(w.fs(1), "b/old-name").unwrap(), big);
    assert!(w.fs(1).get("a").is_none());
    assert_eq!(
        w.engine(1).stats().fetches,
        fetches,
        "the renamed file was fetched"
    );
    assert_clean(&mut w);
}

#[test]
fn a_reconnect_sends_only_what_changed() {
    let mut w = World::scripted(2, Topology::Full);
    for i in 0..30 {
        assert!(w.write(0, &format!("f{i}"), format!("file {i}").as_bytes(), 0o644));
    }
    assert!(w.settle());
    w.cut(0, 1);
    assert!(w.write(0, "f7", b"changed while apart", 0o644));
    let before = w.stats().records_sent;
    w.heal(0, 1);
    assert!(w.settle());
    let after = w.stats().records_sent;
    assert!(
        after - before <= 2,
        "{} records sent after the heal",
        after - before
    );
    assert_eq!(content(w.fs(1), "f7").unwrap(), b"changed while apart");
    assert_clean(&mut w);
}

#[test]
fn one_write_costs_a_bounded_number_of_records_and_none_go_back() {
    for nodes in [2usize, 3, 5] {
        let mut w = World::scripted(nodes, Topology::Full);
        w.settle();
        let before = w.stats().records_sent;
        assert!(w.write(0, "f", b"x", 0o644));
        w.settle();
        let sent = w.stats().records_sent - before;
        // The author sends to every peer; each peer forwards to the others it did not get it
        // from; nobody sends it back to its author (the checker fails the run if anyone does).
        let bound = ((nodes - 1) * (nodes - 1)) as u64;
        assert!(
            sent <= bound,
            "{nodes} nodes: {sent} records for one write, bound {bound}"
        );
        assert_clean(&mut w);
    }
}

#[test]
fn a_node_catches_up_after_a_crash_in_both_directions() {
    let mut w = World::scripted(2, Topology::Full);
    assert!(w.write(0, "before", b"seen by both", 0o644));
    assert!(w.settle());
    w.commit_all();
    w.crash_node(1);
    assert!(w.write(0, "while-down", b"written on A", 0o644));
    // Written on B's backing directory while its daemon is down: found by the rescan.
    assert!(w.write(1, "offline-edit", b"written on B while down", 0o644));
    w.restart_node(1);
    assert!(w.settle());
    for n in 0..2 {
        assert_eq!(content(w.fs(n), "while-down").unwrap(), b"written on A");
        assert_eq!(
            content(w.fs(n), "offline-edit").unwrap(),
            b"written on B while down"
        );
    }
    assert_clean(&mut w);
}

#[test]
fn a_crash_that_loses_uncommitted_records_loses_no_data() {
    let mut w = World::scripted(2, Topology::Full);
    assert!(w.write(0, "a", b"one", 0o644));
    assert!(w.settle());
    w.commit_all();
    // Written and shipped, but the store's group commit has not happened yet.
    assert!(w.write(0, "a", b"two", 0o644));
    assert!(w.write(0, "b", b"new", 0o644));
    assert!(w.settle());
    w.crash_node(0);
    w.restart_node(0);
    assert!(w.settle());
    for n in 0..2 {
        assert_eq!(content(w.fs(n), "a").unwrap(), b"two");
        assert_eq!(content(w.fs(n), "b").unwrap(), b"new");
    }
    assert_clean(&mut w);
}
