//! Which directories have something below them: something live in the version the node is
//! heading for (so the directory shows whatever its own record says), and something on the
//! node's disk (so it cannot be removed yet). Kept up to date with every change, so that
//! neither question scans the store: the cost of one change is a store read or two, plus one
//! step up per directory whose answer flips.
//!
//! For each kind, a path "has" it when it has it itself (its own heading record is live; its
//! own entry says the disk holds something) or some path below does. A directory's count is
//! the number of its direct children, explicit or implied by a deeper path, that have it; only
//! non-zero counts are kept, so memory grows with the directories that have something below.

use super::Engine;
use crate::path::RelPath;
use crate::store::{Entry, Store};
use rsyncfs_conflict::{Meta, Record};
use std::collections::{HashMap, HashSet};

/// The kept counts differ from a recount: which directories, and how.
#[derive(Debug, thiserror::Error)]
#[error("the tally of directories is off: {0}")]
pub struct TallyMismatch(pub String);

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Counts {
    live: u32,
    local: u32,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Kind {
    Live,
    Local,
}

const KINDS: [Kind; 2] = [Kind::Live, Kind::Local];

impl Counts {
    fn get(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Live => self.live,
            Kind::Local => self.local,
        }
    }

    fn get_mut(&mut self, kind: Kind) -> &mut u32 {
        match kind {
            Kind::Live => &mut self.live,
            Kind::Local => &mut self.local,
        }
    }
}

/// What a path has itself: (its heading record is live, the disk holds something there).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct Own {
    live: bool,
    local: bool,
}

impl Own {
    fn get(&self, kind: Kind) -> bool {
        match kind {
            Kind::Live => self.live,
            Kind::Local => self.local,
        }
    }
}

/// The counts of every directory, built from a store's entries (nothing is pending then), in
/// memory that grows with the directories, not with the files (a list of every path cost
/// 200 bytes a path at a node's start).
///
/// A path that has a kind itself counts for its parent as the store's walk meets it; every
/// directory with something below is remembered, and counts for its parent in turn unless it
/// has the kind itself (then its own visit counted it). What a path has itself is kept only
/// for the paths that can have something below (any but a file or a symlink); for the others
/// it is asked of the store again, which a consistent store never needs.
///
/// `also` sees every entry of that walk too (the engine counts its tree there: a second walk
/// of the store, each entry read and decoded again, cost as much as this one).
pub(super) fn build<S: Store>(
    store: &S,
    also: &mut dyn FnMut(&RelPath, &Entry),
) -> HashMap<RelPath, Counts> {
    let mut counts: HashMap<RelPath, Counts> = HashMap::new();
    let mut below: [HashSet<RelPath>; 2] = [HashSet::new(), HashSet::new()];
    let mut dirs_own: HashMap<RelPath, Own> = HashMap::new();
    // The store's walk meets a directory's children one after the other (in path order, only
    // the contents of its subdirectories come between), so what they add to their parent is
    // gathered in a run and added once the parent changes: a map update and a copy of the
    // parent's path per child was most of a restart's start over a big tree.
    let mut run: Option<(RelPath, Counts)> = None;
    let flush = |run: Option<(RelPath, Counts)>,
                 counts: &mut HashMap<RelPath, Counts>,
                 below: &mut [HashSet<RelPath>; 2]| {
        let Some((parent, add)) = run else {
            return;
        };
        for (i, kind) in KINDS.into_iter().enumerate() {
            if add.get(kind) > 0 {
                *counts.entry(parent.clone()).or_default().get_mut(kind) += add.get(kind);
                below[i].insert(parent.clone());
            }
        }
    };
    store.for_each(&mut |path, entry| {
        also(path, entry);
        let own = own_of(None, Some(entry));
        if !(own.live || own.local) {
            return;
        }
        let leaf = [
            entry.record.as_ref().map(|r| &r.winner().meta),
            entry.local.as_ref(),
        ]
        .into_iter()
        .flatten()
        .all(Meta::has_data);
        if !leaf {
            dirs_own.insert(path.clone(), own);
        }
        let Some(parent) = path.parent_str() else {
            return;
        };
        if run.as_ref().is_none_or(|(p, _)| p.as_str() != parent) {
            flush(run.take(), &mut counts, &mut below);
            run = Some((path.parent().expect("it has a parent"), Counts::default()));
        }
        let (_, add) = run.as_mut().expect("started above");
        for kind in KINDS {
            if own.get(kind) {
                *add.get_mut(kind) += 1;
            }
        }
    });
    flush(run.take(), &mut counts, &mut below);
    for (i, kind) in KINDS.into_iter().enumerate() {
        let mut todo: Vec<RelPath> = below[i].iter().cloned().collect();
        while let Some(dir) = todo.pop() {
            let own = match dirs_own.get(&dir) {
                Some(own) => *own,
                None => own_of(None, store.get(&dir).as_ref()),
            };
            if own.get(kind) {
                continue;
            }
            if let Some(parent) = dir.parent() {
                *counts.entry(parent.clone()).or_default().get_mut(kind) += 1;
                if below[i].insert(parent.clone()) {
                    todo.push(parent);
                }
            }
        }
    }
    counts
}

/// The counts, from what every path has itself.
fn count(owns: Vec<(RelPath, Own)>) -> HashMap<RelPath, Counts> {
    let mut has: [HashSet<RelPath>; 2] = [HashSet::new(), HashSet::new()];
    for (path, own) in owns {
        for (i, kind) in KINDS.into_iter().enumerate() {
            // This path and every directory above it have it; stop where an earlier path
            // already said so.
            if own.get(kind) && has[i].insert(path.clone()) {
                for up in path.ancestors() {
                    if !has[i].insert(up) {
                        break;
                    }
                }
            }
        }
    }
    let mut counts: HashMap<RelPath, Counts> = HashMap::new();
    for (i, kind) in KINDS.into_iter().enumerate() {
        for path in &has[i] {
            if let Some(parent) = path.parent() {
                *counts.entry(parent).or_default().get_mut(kind) += 1;
            }
        }
    }
    counts
}

fn own_of(target: Option<&Record>, entry: Option<&Entry>) -> Own {
    let record = target.or(entry.and_then(|e| e.record.as_ref()));
    Own {
        live: record.is_some_and(Record::is_live),
        local: entry.is_some_and(|e| e.local.is_some()),
    }
}

impl<S: Store> Engine<S> {
    /// What `path` has itself, now.
    pub(super) fn own(&self, path: &RelPath) -> Own {
        let target = self.pending.get(path).and_then(|p| p.target.as_ref());
        let entry = self.store.get(path);
        own_of(target, entry.as_ref())
    }

    /// True when something strictly below `path` exists in the version the node is heading
    /// for: pending targets first, stored records for the rest.
    pub(super) fn live_below(&self, path: &RelPath) -> bool {
        self.tally.get(path).is_some_and(|c| c.live > 0)
    }

    /// True when the node's disk holds something strictly below `path`.
    pub(super) fn local_below(&self, path: &RelPath) -> bool {
        self.tally.get(path).is_some_and(|c| c.local > 0)
    }

    /// After a change to what `path` has itself (its entry, or its pending target), which
    /// before was `before`: moves the counts of the directories above where the answer flips.
    pub(super) fn retally(&mut self, path: &RelPath, before: Own) {
        let after = self.own(path);
        for kind in KINDS {
            if before.get(kind) == after.get(kind) {
                continue;
            }
            if self.tally.get(path).is_some_and(|c| c.get(kind) > 0) {
                continue; // it has it anyway, through what is below
            }
            self.propagate(path.parent(), kind, after.get(kind));
        }
    }

    /// A child of `at` started (`up`) or stopped having `kind`: count it, and go on up while
    /// directories flip.
    fn propagate(&mut self, mut at: Option<RelPath>, kind: Kind, up: bool) {
        while let Some(dir) = at {
            let counts = self.tally.entry(dir.clone()).or_default();
            let old = counts.get(kind);
            let count = counts.get_mut(kind);
            if up {
                *count += 1;
            } else {
                assert!(old > 0, "the tally of {dir} went below zero");
                *count -= 1;
            }
            if *counts == Counts::default() {
                self.tally.remove(&dir);
            }
            let flipped = if up { old == 0 } else { old == 1 };
            if !flipped {
                return;
            }
            // Whether something lives (or is on disk) below `dir` changed: what it shows, or
            // whether it can go, may change too.
            self.dirty.insert(dir.clone());
            if self.own(&dir).get(kind) {
                return;
            }
            at = dir.parent();
        }
    }

    /// Stores an entry (or forgets the path when it holds nothing) and keeps the counts.
    pub(super) fn put_entry(&mut self, path: &RelPath, entry: Entry) {
        let before = self.own(path);
        if let (Some(old), Some(new)) = (
            self.store.get(path).and_then(|e| e.record),
            entry.record.as_ref(),
        ) {
            // A path's stored record only ever learns more: one that forgets a write it had
            // seen would bring that write back, or lose what it replaced.
            if !old.vv.iter().all(|d| new.vv.covers(&d)) {
                self.note_bug(format!(
                    "the stored record of {path} would go back on writes it had seen"
                ));
            }
        }
        let old_record = self.store.get(path).and_then(|e| e.record);
        self.counts.add(path, old_record.as_ref(), -1);
        self.counts.add(path, entry.record.as_ref(), 1);
        if entry.record.is_none() && entry.local.is_none() {
            self.store.remove(path);
        } else {
            self.store.put(path, entry);
        }
        self.retally(path, before);
    }

    /// Checks the counts against a recount from scratch (for tests and the simulator: it reads
    /// the whole store).
    pub fn check_tally(&self) -> Result<(), TallyMismatch> {
        let mut paths: Vec<RelPath> = Vec::new();
        self.store.for_each(&mut |path, _| paths.push(path.clone()));
        paths.extend(self.pending.keys().cloned());
        paths.sort();
        paths.dedup();
        let owns = paths
            .into_iter()
            .map(|p| {
                let own = self.own(&p);
                (p, own)
            })
            .collect();
        let fresh = count(owns);
        if fresh == self.tally {
            return Ok(());
        }
        let wrong: Vec<String> = fresh
            .keys()
            .chain(self.tally.keys())
            .filter(|p| fresh.get(*p) != self.tally.get(*p))
            .take(5)
            .map(|p| {
                format!(
                    "{p}: kept {:?}, recounted {:?}",
                    self.tally.get(p),
                    fresh.get(p)
                )
            })
            .collect();
        Err(TallyMismatch(wrong.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use proptest::prelude::*;
    use rsyncfs_conflict::{Dot, NodeId, Timestamp, NTP64};

    /// What an entry holds, each side (record, local) of one of four kinds.
    fn meta(kind: u8) -> Option<Meta> {
        match kind {
            0 => None,
            1 => Some(Meta::file(1, [7; 32], 0o644, 0)),
            2 => Some(Meta::dir(0o755)),
            _ => Some(Meta::tombstone()),
        }
    }

    proptest! {
        /// The build at start, which keeps only directories, agrees with a recount of every
        /// path: on trees with names that sort between a folder and its contents ("a" <
        /// "a.b" < "a/b"), paths implied by deeper ones, tombstones, and files that have
        /// paths below them (which a consistent store never holds).
        #[test]
        fn the_build_agrees_with_a_recount_of_every_path(
            paths in proptest::collection::btree_map(
                proptest::collection::vec(prop_oneof![Just("a"), Just("a.b"), Just("b"), Just("c-d")], 1..5),
                (0u8..4, 0u8..4),
                0..40,
            )
        ) {
            let node = NodeId::from_index(0);
            let mut store = MemStore::new();
            let mut owns = Vec::new();
            for (seq, (names, (record, local))) in paths.into_iter().enumerate() {
                let path = RelPath::new(names.join("/")).unwrap();
                let seq = seq as u64 + 1;
                let entry = Entry {
                    record: meta(record).map(|m| {
                        Record::write(
                            None,
                            Dot { node, counter: seq },
                            Timestamp::new(NTP64(seq), node.hlc_id()),
                            m,
                        )
                    }),
                    local: meta(local).filter(|m| !m.is_tombstone()),
                    seq: if record > 0 { seq } else { 0 },
                    from: None,
                };
                owns.push((path.clone(), own_of(None, Some(&entry))));
                store.put(&path, entry);
            }
            prop_assert_eq!(build(&store, &mut |_, _| {}), count(owns));
        }
    }
}
