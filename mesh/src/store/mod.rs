//! What a node keeps about its tree, behind a trait the engine calls: one [`Entry`] per path,
//! a log of entries by store sequence, the progress of each peer, and the reserved sequences.
//!
//! [`MemStore`] is the in-memory implementation the tests and the simulator use. It models group
//! commit: writes become durable only at [`MemStore::commit`], and [`MemStore::crash`] throws
//! away everything written since, as a process crash does to a store with unflushed commits.

pub mod contract;

use crate::path::RelPath;
use rsyncfs_conflict::{Hash, Meta, NodeId, Record};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What a node knows about one path.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// The replicated version of the path; `None` for a directory that exists here only because
    /// something inside it does.
    pub record: Option<Record>,
    /// What the node's own filesystem holds at the path, as the engine last made or saw it.
    pub local: Option<Meta>,
    /// Position of `record` in the store's log; zero when there is no record.
    pub seq: u64,
    /// The peer this exact record was taken from, which therefore has it already.
    pub from: Option<NodeId>,
}

/// The persistence the engine needs. Writes may be buffered and committed in groups, but they
/// must become durable in the order they were made (a crash keeps a prefix), except
/// [`Store::reserve_seq`], which is durable when it returns.
pub trait Store {
    fn get(&self, path: &RelPath) -> Option<Entry>;
    /// Stores the entry of a path; an entry with a record takes log position `entry.seq`, which
    /// must be larger than every position used before.
    fn put(&mut self, path: &RelPath, entry: Entry);
    /// Forgets a path entirely (an implicit directory that is gone).
    fn remove(&mut self, path: &RelPath);
    /// Entries with a record and a log position after `seq`, in log order, at most `limit`.
    fn after(&self, seq: u64, limit: usize) -> Vec<(RelPath, Entry)>;
    /// Visits every entry, in path order. Only for building in-memory indexes when the engine
    /// starts (and for checks): the engine never scans the store per path.
    fn for_each(&self, visit: &mut dyn FnMut(&RelPath, &Entry));
    /// A path whose local file has this content.
    fn find_local(&self, hash: &Hash) -> Option<RelPath>;
    /// The highest sequence of a peer's store that this node has applied.
    fn progress(&self, peer: &NodeId) -> u64;
    fn set_progress(&mut self, peer: &NodeId, seq: u64);
    /// The highest sequence reserved so far; every sequence the node used is at most this.
    fn seq_reserved(&self) -> u64;
    /// Reserves sequences up to `upto`, durably, before returning.
    fn reserve_seq(&mut self, upto: u64);
    /// Writes made since the last commit (the driver commits when the engine asks).
    fn uncommitted(&self) -> usize;
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    entries: BTreeMap<RelPath, Entry>,
    log: BTreeMap<u64, RelPath>,
    by_hash: HashMap<Hash, BTreeSet<RelPath>>,
    progress: BTreeMap<NodeId, u64>,
    reserved: u64,
}

impl State {
    fn put(&mut self, path: &RelPath, entry: Entry) {
        self.remove(path);
        if entry.record.is_some() {
            assert!(entry.seq > 0, "a record needs a log position");
            let previous = self.log.insert(entry.seq, path.clone());
            assert!(previous.is_none(), "log position {} used twice", entry.seq);
        }
        if let Some((hash, _)) = entry.local.as_ref().and_then(Meta::file_hash) {
            self.by_hash.entry(hash).or_default().insert(path.clone());
        }
        self.entries.insert(path.clone(), entry);
    }

    fn remove(&mut self, path: &RelPath) {
        if let Some(old) = self.entries.remove(path) {
            if old.record.is_some() {
                self.log.remove(&old.seq);
            }
            if let Some((hash, _)) = old.local.as_ref().and_then(Meta::file_hash) {
                if let Some(set) = self.by_hash.get_mut(&hash) {
                    set.remove(path);
                    if set.is_empty() {
                        self.by_hash.remove(&hash);
                    }
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Put(RelPath, Entry),
    Remove(RelPath),
    Progress(NodeId, u64),
}

/// An in-memory store with explicit group commits.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    live: State,
    durable: State,
    uncommitted: Vec<Op>,
    /// Operations the engine asked for (entries read, written or visited), for the
    /// simulator's cost invariant.
    ops: std::cell::Cell<u64>,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// Makes every write so far durable.
    pub fn commit(&mut self) {
        for op in self.uncommitted.drain(..) {
            match op {
                Op::Put(path, entry) => self.durable.put(&path, entry),
                Op::Remove(path) => self.durable.remove(&path),
                Op::Progress(peer, seq) => {
                    self.durable.progress.insert(peer, seq);
                }
            }
        }
        debug_assert_eq!(self.durable, self.live);
    }

    /// Forgets every write since the last commit, as a crash would.
    pub fn crash(&mut self) {
        self.uncommitted.clear();
        self.live = self.durable.clone();
    }

    /// Every path's record, for comparing replicas.
    pub fn records(&self) -> impl Iterator<Item = (&RelPath, &Record)> {
        self.live
            .entries
            .iter()
            .filter_map(|(p, e)| e.record.as_ref().map(|r| (p, r)))
    }

    /// Every entry.
    pub fn entries(&self) -> impl Iterator<Item = (&RelPath, &Entry)> {
        self.live.entries.iter()
    }

    /// Operations made through the [`Store`] trait so far: one per entry read, written or
    /// visited.
    pub fn ops(&self) -> u64 {
        self.ops.get()
    }

    fn charge(&self, n: usize) {
        self.ops.set(self.ops.get() + n as u64);
    }
}

impl Store for MemStore {
    fn get(&self, path: &RelPath) -> Option<Entry> {
        self.charge(1);
        self.live.entries.get(path).cloned()
    }

    fn put(&mut self, path: &RelPath, entry: Entry) {
        self.charge(1);
        self.uncommitted.push(Op::Put(path.clone(), entry.clone()));
        self.live.put(path, entry);
    }

    fn remove(&mut self, path: &RelPath) {
        self.charge(1);
        self.uncommitted.push(Op::Remove(path.clone()));
        self.live.remove(path);
    }

    fn after(&self, seq: u64, limit: usize) -> Vec<(RelPath, Entry)> {
        let out: Vec<(RelPath, Entry)> = self
            .live
            .log
            .range(seq + 1..)
            .take(limit)
            .map(|(_, p)| (p.clone(), self.live.entries[p].clone()))
            .collect();
        self.charge(out.len() + 1);
        out
    }

    fn for_each(&self, visit: &mut dyn FnMut(&RelPath, &Entry)) {
        self.charge(self.live.entries.len());
        for (p, e) in &self.live.entries {
            visit(p, e);
        }
    }

    fn find_local(&self, hash: &Hash) -> Option<RelPath> {
        self.charge(1);
        self.live
            .by_hash
            .get(hash)
            .and_then(|set| set.iter().next().cloned())
    }

    fn progress(&self, peer: &NodeId) -> u64 {
        self.live.progress.get(peer).copied().unwrap_or(0)
    }

    fn set_progress(&mut self, peer: &NodeId, seq: u64) {
        if self.live.progress.get(peer) != Some(&seq) {
            self.uncommitted.push(Op::Progress(*peer, seq));
            self.live.progress.insert(*peer, seq);
        }
    }

    fn seq_reserved(&self) -> u64 {
        self.live.reserved
    }

    fn reserve_seq(&mut self, upto: u64) {
        assert!(upto >= self.live.reserved);
        self.live.reserved = upto;
        self.durable.reserved = upto;
    }

    fn uncommitted(&self) -> usize {
        self.uncommitted.len()
    }
}

impl contract::StoreUnderTest for MemStore {
    fn commit_now(&mut self) {
        self.commit();
    }

    fn crash_and_reopen(mut self) -> MemStore {
        self.crash();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_the_store_contract() {
        contract::check(&mut MemStore::new);
    }
    use rsyncfs_conflict::{Dot, Timestamp, NTP64};

    fn entry(seq: u64, byte: u8) -> Entry {
        let node = NodeId::from_index(0);
        let meta = Meta::file(1, [byte; 32], 0o644, 0);
        Entry {
            record: Some(Record::write(
                None,
                Dot { node, counter: seq },
                Timestamp::new(NTP64(seq), node.hlc_id()),
                meta.clone(),
            )),
            local: Some(meta),
            seq,
            from: None,
        }
    }

    #[test]
    fn log_keeps_latest_per_path() {
        let mut s = MemStore::new();
        let a = RelPath::new("a").unwrap();
        let b = RelPath::new("a/b").unwrap();
        s.put(&a, entry(1, 1));
        s.put(&b, entry(2, 2));
        s.put(&a, entry(3, 3));
        let after: Vec<_> = s
            .after(0, 10)
            .into_iter()
            .map(|(p, e)| (p, e.seq))
            .collect();
        assert_eq!(after, vec![(b.clone(), 2), (a.clone(), 3)]);
        assert_eq!(s.after(2, 10).len(), 1);
        assert_eq!(s.find_local(&[3; 32]), Some(a.clone()));
        assert_eq!(s.find_local(&[1; 32]), None);
        let mut seen = Vec::new();
        s.for_each(&mut |p, _| seen.push(p.clone()));
        assert_eq!(seen, vec![a.clone(), b.clone()]);
    }

    #[test]
    fn crash_keeps_the_committed_prefix_and_reservations() {
        let mut s = MemStore::new();
        let a = RelPath::new("a").unwrap();
        s.put(&a, entry(1, 1));
        s.set_progress(&NodeId::from_index(5), 7);
        s.commit();
        s.put(&a, entry(2, 2));
        s.reserve_seq(100);
        s.set_progress(&NodeId::from_index(5), 9);
        s.crash();
        assert_eq!(s.get(&a).unwrap().seq, 1);
        assert_eq!(s.progress(&NodeId::from_index(5)), 7);
        assert_eq!(s.seq_reserved(), 100);
        assert_eq!(s.find_local(&[1; 32]), Some(a));
    }
}
