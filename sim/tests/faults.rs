//! The bugs the daemon once had, told as stories on a scripted simulated mesh: each one fails
//! on the code that had the bug and passes now. The engines are the real ones; the faults are
//! the test's.

use rsyncfs_conflict::limits::{DIR_BYTES_MAX, NAME_BYTES_MAX};
use rsyncfs_mesh::Mode;
use rsyncfs_sim::faults::{Character, Shape};
use rsyncfs_sim::world::World;
use rsyncfs_sim::Topology;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;

fn content(w: &World, n: usize, path: &str) -> Option<Vec<u8>> {
    w.fs(n).read_file(path).map(|b| b.to_vec())
}

fn assert_clean(w: &mut World) {
    let violations = w.check();
    assert!(violations.is_empty(), "{violations:#?}");
}

/// Contents of `n`'s files.
fn contents(w: &World, n: usize) -> Vec<Vec<u8>> {
    w.fs(n)
        .iter()
        .filter_map(|(p, _)| content(w, n, p))
        .collect()
}

/// A fetched (large) update to a file a local program keeps open waits, keeps its staged
/// content, and lands at the close. The daemon once dropped the staged content at the first
/// refusal, so every retry failed and the update never landed.
#[test]
fn an_update_held_back_by_a_local_writer_lands_at_the_close() {
    let mut w = World::scripted(2, Topology::Full);
    assert!(w.open(1, "db", b"old"));
    assert!(w.settle());
    let new = vec![b'n'; 1000];
    assert!(w.write(0, "db", &new, 0o644));
    w.run_for(3 * SEC);
    assert_eq!(
        content(&w, 1, "db").unwrap(),
        b"old",
        "applied over an open file"
    );
    w.close(1, "db");
    assert!(w.settle());
    assert_eq!(content(&w, 1, "db").unwrap(), new);
    assert_clean(&mut w);
}

/// A send-only node's writes reach its peer, and none of the peer's are applied on it. The
/// daemon once dropped every message a send-only node received, its peer's Hello included, so
/// nothing was shipped at all.
#[test]
fn a_send_only_node_ships_and_applies_nothing() {
    let mut c = Character::calm(2);
    c.modes[1] = Mode::SendOnly;
    let mut w = World::scripted_with(2, Topology::Full, c);
    assert!(w.write(1, "from-s", b"shipped", 0o644));
    assert!(w.write(1, "big", &[9u8; 500], 0o644));
    assert!(w.settle());
    assert_eq!(content(&w, 0, "from-s").unwrap(), b"shipped");
    assert_eq!(content(&w, 0, "big").unwrap(), vec![9u8; 500]);
    assert!(w.write(0, "from-a", b"not for s", 0o644));
    assert!(w.settle());
    assert!(w.fs(1).get("from-a").is_none());
    assert_clean(&mut w);
}

/// A conflict on a path at the limits keeps both writes, and the copy's name fits. The daemon
/// once panicked making a copy of a path near 4,096 bytes.
#[test]
fn a_conflict_at_the_path_limit_keeps_both_writes() {
    let dir = "d/".repeat(DIR_BYTES_MAX / 2);
    let dir = dir.trim_end_matches('/');
    let path = format!(
        "{dir}/{}",
        "n".repeat(NAME_BYTES_MAX.min(4095 - dir.len() - 1))
    );
    let mut w = World::scripted(2, Topology::Full);
    w.cut(0, 1);
    assert!(w.write(0, &path, b"from zero", 0o644));
    assert!(w.write(1, &path, b"from one", 0o644));
    w.heal(0, 1);
    assert!(w.settle());
    for n in 0..2 {
        let all = contents(&w, n);
        assert!(all.contains(&b"from zero".to_vec()) && all.contains(&b"from one".to_vec()));
    }
    assert_clean(&mut w);
}

/// More concurrent writers on one path than a record may carry: every write is kept (one at
/// the name, the others as copies) and the replicas agree. `join` once made records with more
/// siblings than a peer accepts, refused on every resend.
#[test]
fn more_writers_on_one_path_than_a_record_carries() {
    let nodes = 6;
    let mut c = Character::calm(nodes);
    c.siblings_max = 2;
    let mut w = World::scripted_with(nodes, Topology::Full, c);
    for a in 0..nodes {
        for b in a + 1..nodes {
            w.cut(a, b);
        }
    }
    for n in 0..nodes {
        assert!(w.write(n, "hot", format!("writer {n}").as_bytes(), 0o644));
    }
    for a in 0..nodes {
        for b in a + 1..nodes {
            w.heal(a, b);
        }
    }
    assert!(w.settle());
    for n in 0..nodes {
        let all = contents(&w, n);
        for writer in 0..nodes {
            assert!(all.contains(&format!("writer {writer}").into_bytes()));
        }
    }
    let folds: u64 = (0..nodes).map(|n| w.engine(n).stats().folds).sum();
    assert!(
        folds > 0,
        "nothing folded: the story did not pass the limit"
    );
    assert_clean(&mut w);
}

/// A wall clock stepped five minutes back stalls no resend: timers run on the monotonic
/// clock. (On the wall clock, a lost batch waited for as long as the step.)
#[test]
fn a_wall_clock_stepped_back_stalls_nothing() {
    let mut w = World::scripted(2, Topology::Full);
    w.set_weather(0.3, 0.0, MS);
    w.step_wall_clock(0, -300 * SEC as i64);
    for i in 0..20 {
        assert!(w.write(0, &format!("f{i}"), format!("{i}").as_bytes(), 0o644));
    }
    w.run_for(30 * SEC);
    for i in 0..20 {
        assert_eq!(
            content(&w, 1, &format!("f{i}")).unwrap(),
            format!("{i}").into_bytes()
        );
    }
    w.set_weather(0.0, 0.0, MS);
    assert!(w.settle());
    assert_clean(&mut w);
}

/// A full disk holds updates back and says so; when space is back, everything lands without a
/// restart or a reconnect. The daemon once left empty files, logged nothing and never fetched
/// again after an ENOSPC.
#[test]
fn a_full_disk_holds_updates_back_until_space_is_back() {
    let mut w = World::scripted(2, Topology::Full);
    w.set_disk_full(1, true);
    for i in 0..10 {
        assert!(w.write(0, &format!("dir/small{i}"), b"s", 0o644));
        assert!(w.write(0, &format!("big{i}"), &vec![i as u8; 600], 0o644));
    }
    w.run_for(5 * SEC);
    assert!(w.fs(1).get("big0").is_none());
    assert!(
        !w.engine(1).failing(10).is_empty(),
        "the failures are not reported"
    );
    w.set_disk_full(1, false);
    w.run_for(10 * SEC);
    for i in 0..10 {
        assert_eq!(
            content(&w, 1, &format!("big{i}")).unwrap(),
            vec![i as u8; 600]
        );
    }
    assert!(w.engine(1).failing(10).is_empty());
    assert!(w.settle());
    assert_clean(&mut w);
}

/// A chain 1,500 levels deep, made and removed on one node, comes and goes on the other with a
/// bounded amount of store work per engine call. The engine once scanned the store below every
/// path, for minutes.
#[test]
fn a_chain_1500_levels_deep_comes_and_goes_cheaply() {
    let mut w = World::scripted(2, Topology::Full);
    w.shape(Shape::Deep {
        node: 0,
        depth: 1500,
    });
    assert!(w.settle());
    assert!(w.fs(1).get("deep").is_none() && w.fs(0).get("deep").is_none());
    assert_clean(&mut w);
    assert!(
        w.store_ops_max() < 20_000,
        "{} store operations in one engine call",
        w.store_ops_max()
    );
}

/// A first sync of thousands of files to every other node at once: all of them get everything.
#[test]
fn a_first_sync_to_several_receivers_at_once() {
    let mut w = World::scripted(4, Topology::Full);
    for other in 1..4 {
        w.cut(0, other);
    }
    w.shape(Shape::Bulk {
        node: 0,
        files: 3000,
    });
    for other in 1..4 {
        w.heal(0, other);
    }
    assert!(w.settle());
    for n in 1..4 {
        assert_eq!(
            w.fs(n)
                .iter()
                .filter(|(p, _)| p.starts_with("bulk/"))
                .count(),
            w.fs(0)
                .iter()
                .filter(|(p, _)| p.starts_with("bulk/"))
                .count()
        );
    }
    assert_clean(&mut w);
}
