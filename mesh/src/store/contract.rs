//! What every [`Store`] must do, as one suite that each implementation runs against itself:
//! [`MemStore`](super::MemStore) in this crate's tests, the daemon's redb store in its own. The
//! engine relies on every point here; a store that passes behaves, as far as the engine can
//! tell, like any other.

use super::{Entry, Store};
use crate::path::RelPath;
use rsyncfs_conflict::{Dot, Meta, NodeId, Record, Timestamp, NTP64};

/// A store under test, with what the suite needs beyond the trait: a group commit, and a crash
/// (everything since the last commit is lost, as when the process dies).
pub trait StoreUnderTest: Store + Sized {
    fn commit_now(&mut self);
    fn crash_and_reopen(self) -> Self;
}

fn path(p: &str) -> RelPath {
    RelPath::new(p).expect("valid test path")
}

fn node() -> NodeId {
    NodeId::from_index(0)
}

/// An entry with a record at log position `seq` whose local file has content `byte`.
fn entry(seq: u64, byte: u8) -> Entry {
    let meta = Meta::file(1, [byte; 32], 0o644, 0);
    Entry {
        record: Some(Record::write(
            None,
            Dot {
                node: node(),
                counter: seq,
            },
            Timestamp::new(NTP64(seq << 32), node().hlc_id()),
            meta.clone(),
        )),
        local: Some(meta),
        seq,
        from: None,
    }
}

/// Runs the whole suite on stores made by `fresh` (each call: a new, empty store).
pub fn check<S: StoreUnderTest>(fresh: &mut dyn FnMut() -> S) {
    reads_what_was_written(fresh());
    the_log_keeps_the_latest_entry_per_path(fresh());
    contents_are_found_by_hash(fresh());
    progress_and_reservations(fresh());
    a_crash_keeps_what_was_committed(fresh());
}

fn reads_what_was_written<S: StoreUnderTest>(mut s: S) {
    let (a, b) = (path("a"), path("a/b"));
    assert_eq!(s.get(&a), None);
    s.put(&a, entry(1, 1));
    assert_eq!(s.get(&a), Some(entry(1, 1)), "reads see uncommitted writes");
    // An entry without a record: a directory that exists for what is inside it.
    let implicit = Entry {
        record: None,
        local: Some(Meta::dir(0o755)),
        seq: 0,
        from: None,
    };
    s.put(&b, implicit.clone());
    assert_eq!(s.get(&b), Some(implicit));
    assert!(s.uncommitted() >= 2);
    s.commit_now();
    assert_eq!(s.uncommitted(), 0);
    let mut seen = Vec::new();
    s.for_each(&mut |p, _| seen.push(p.clone()));
    assert_eq!(
        seen,
        vec![a.clone(), b.clone()],
        "every entry, in path order"
    );
    s.remove(&a);
    assert_eq!(s.get(&a), None);
    assert!(s.after(0, 10).is_empty(), "a removed record leaves the log");
}

fn the_log_keeps_the_latest_entry_per_path<S: StoreUnderTest>(mut s: S) {
    let (a, b, c) = (path("a"), path("b"), path("c"));
    s.put(&a, entry(1, 1));
    s.put(&b, entry(2, 2));
    s.put(&c, entry(3, 3));
    s.put(&a, entry(4, 4));
    let log: Vec<(RelPath, u64)> = s
        .after(0, 10)
        .into_iter()
        .map(|(p, e)| (p, e.seq))
        .collect();
    assert_eq!(log, vec![(b.clone(), 2), (c.clone(), 3), (a.clone(), 4)]);
    assert_eq!(s.after(2, 10).len(), 2, "strictly after the position");
    assert_eq!(s.after(0, 1).len(), 1, "at most the limit");
    assert!(s.after(4, 10).is_empty());
}

fn contents_are_found_by_hash<S: StoreUnderTest>(mut s: S) {
    let (a, b) = (path("x/a"), path("x/b"));
    s.put(&a, entry(1, 7));
    assert_eq!(s.find_local(&[7; 32]), Some(a.clone()));
    assert_eq!(s.find_local(&[8; 32]), None);
    s.put(&b, entry(2, 7));
    s.remove(&a);
    assert_eq!(
        s.find_local(&[7; 32]),
        Some(b.clone()),
        "the other holder remains"
    );
    let mut changed = entry(3, 9);
    changed.local = Some(Meta::file(1, [9; 32], 0o644, 0));
    s.put(&b, changed);
    assert_eq!(
        s.find_local(&[7; 32]),
        None,
        "a replaced content is not found"
    );
    assert_eq!(s.find_local(&[9; 32]), Some(b));
}

fn progress_and_reservations<S: StoreUnderTest>(mut s: S) {
    let peer = NodeId::from_index(5);
    assert_eq!(s.progress(&peer), 0);
    s.set_progress(&peer, 42);
    assert_eq!(s.progress(&peer), 42);
    assert_eq!(s.seq_reserved(), 0);
    s.reserve_seq(1024);
    assert_eq!(s.seq_reserved(), 1024);
}

fn a_crash_keeps_what_was_committed<S: StoreUnderTest>(mut s: S) {
    let (a, b) = (path("a"), path("b"));
    let peer = NodeId::from_index(5);
    s.put(&a, entry(1, 1));
    s.set_progress(&peer, 7);
    s.commit_now();
    s.put(&a, entry(2, 2));
    s.put(&b, entry(3, 3));
    s.set_progress(&peer, 9);
    // A reservation is durable when it returns, committed or not.
    s.reserve_seq(2048);
    let s = s.crash_and_reopen();
    // The reservation committed what came before it too: a prefix survives either way.
    assert_eq!(s.seq_reserved(), 2048);
    let a_now = s.get(&a).expect("a survives");
    match a_now.seq {
        1 => {
            // Only the first commit survived.
            assert_eq!(s.get(&b), None);
            assert_eq!(s.progress(&peer), 7);
        }
        2 => {
            // Everything up to the reservation survived, in order.
            assert_eq!(s.get(&b).map(|e| e.seq), Some(3));
            assert_eq!(s.progress(&peer), 9);
        }
        other => panic!("a at an impossible position {other}"),
    }
    let log: Vec<u64> = s.after(0, 10).into_iter().map(|(_, e)| e.seq).collect();
    assert!(log.windows(2).all(|w| w[0] < w[1]), "{log:?}");
}
