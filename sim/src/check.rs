//! The invariants a run must keep, checked during the run and after it.
//!
//! - **convergence**: once healed and quiet, every node's tree is the same (paths, kinds,
//!   contents, modes, file mtimes, symlink targets) and every store holds the same records;
//! - **nothing lost**: every content a user completed (closed) on any node is, at the end, in
//!   every node's tree (at its path, a new name, or a conflict copy), unless a user replaced or
//!   removed it on a node where it was then no longer held anywhere;
//! - **no echo**: a record never goes back to its author (except once to an author that
//!   restarted and may have lost it), and never crosses one engine session twice except when the
//!   sender rewinds (after a Pull or a resend timeout);
//! - **store matches filesystem**: each engine's idea of its own tree is the tree (and its
//!   tally of directories matches a recount);
//! - **liveness**: once every fault has stopped (links healed, nodes back, disks with space),
//!   every node is done within a bounded simulated time, with no restart and no reconnect; a
//!   path pending forever fails the seed;
//! - **cost**: one engine call makes a bounded number of store operations (no scan per path);
//! - **driver contract**: staged content is never used after the engine released it, nor
//!   released twice;
//! - **engine invariant**: what the engine checks of itself (a stored record never goes back
//!   on a write it had seen) held.
//!
//! Determinism (same seed, same digest) is checked by running twice.

use crate::fs::SimFs;
use rsyncfs_conflict::{Hash, NodeId};
use rsyncfs_mesh::wire::WireRecord;
use rsyncfs_mesh::MemStore;
use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Clone, Debug)]
pub struct Violation {
    pub invariant: &'static str,
    /// The path it concerns, to pick the relevant lines of a trace.
    pub path: Option<String>,
    pub detail: String,
}

/// One direction of one connection, as a record leaves on it.
#[derive(Clone, Copy)]
pub struct SendContext {
    pub from: usize,
    pub to: usize,
    pub to_id: NodeId,
    /// Which connection of the link this is.
    pub epoch: u64,
    /// The sender engine's session on it (a connection may carry more than one: the engine
    /// starts over when the peer did without the link dropping).
    pub session: u64,
    /// Times the sender went back in its log in this session.
    pub rewinds: u64,
    /// The sender sends records up to here even to their author (who restarted).
    pub unskip_upto: u64,
}

/// One engine session on one connection: (from, to, link epoch, sender's session).
type SessionKey = (usize, usize, u64, u64);

#[derive(Default)]
pub struct Checker {
    violations: Vec<Violation>,
    /// Contents owed to every node: content -> (node, path) where a user wrote it.
    alive: BTreeMap<Hash, (usize, String)>,
    /// Contents a user replaced; reporting one again (a process that keeps a file open reports
    /// the same content again at close) does not make it owed again.
    dead: BTreeSet<Hash>,
    sends: HashMap<SessionKey, HashMap<[u8; 32], u64>>,
    pub records_stored: u64,
}

/// Violations reported per run; the first few tell the story.
const VIOLATIONS_MAX: usize = 20;

impl Checker {
    pub fn violate(&mut self, invariant: &'static str, path: Option<String>, detail: String) {
        if self.violations.len() < VIOLATIONS_MAX {
            self.violations.push(Violation {
                invariant,
                path,
                detail,
            });
        }
    }

    pub fn failed(&self) -> bool {
        !self.violations.is_empty()
    }

    pub fn stop_early(&self) -> bool {
        true
    }

    pub fn take_violations(&mut self) -> Vec<Violation> {
        std::mem::take(&mut self.violations)
    }

    /// A user on `node` completed a write of this content at `path`.
    pub fn written(&mut self, hash: Hash, node: usize, path: &str) {
        if !self.dead.contains(&hash) {
            self.alive.insert(hash, (node, path.to_string()));
        }
    }

    /// Contents owed to every node at the end.
    pub fn owed(&self) -> u64 {
        self.alive.len() as u64
    }

    /// A user replaced or removed this content.
    pub fn replaced(&mut self, hash: Hash) {
        self.alive.remove(&hash);
        self.dead.insert(hash);
    }

    /// A record leaves on a connection.
    pub fn record_sent(&mut self, link: &SendContext, r: &WireRecord) {
        let SendContext {
            from,
            to,
            epoch,
            rewinds,
            ..
        } = *link;
        let author_may_have_lost_it = r.seq <= link.unskip_upto;
        if r.record.author == Some(link.to_id) && !author_may_have_lost_it {
            self.violate(
                "no echo",
                Some(r.path.to_string()),
                format!(
                    "n{from} sent the record of {} back to its author n{to}",
                    r.path
                ),
            );
        }
        let mut key = blake3::Hasher::new();
        key.update(r.path.as_str().as_bytes());
        key.update(&postcard::to_stdvec(&r.record).expect("encodes"));
        let key = *key.finalize().as_bytes();
        let count = self
            .sends
            .entry((from, to, epoch, link.session))
            .or_default()
            .entry(key)
            .or_insert(0);
        *count += 1;
        if *count > 1 + rewinds {
            let count = *count;
            self.violate(
                "no echo",
                Some(r.path.to_string()),
                format!(
                    "n{from} sent the same record of {} to n{to} {count} times in one session with {rewinds} rewinds",
                    r.path
                ),
            );
        }
    }

    /// The replicas (node index, tree) must hold the same trees and records.
    pub fn convergence(&mut self, replicas: &[(usize, &SimFs)], stores: &[&MemStore]) {
        let (n0, t0) = replicas[0];
        for (k, &(i, ti)) in replicas.iter().enumerate().skip(1) {
            if ti != t0 {
                let mut paths: BTreeSet<&String> = t0.iter().map(|(p, _)| p).collect();
                paths.extend(ti.iter().map(|(p, _)| p));
                let differ: Vec<String> = paths
                    .into_iter()
                    .filter(|p| t0.get(p) != ti.get(p))
                    .take(5)
                    .map(|p| {
                        format!(
                            "{p}: n{n0} {:?} / n{i} {:?}",
                            t0.meta(p).map(|m| m.content),
                            ti.meta(p).map(|m| m.content)
                        )
                    })
                    .collect();
                let path = differ
                    .first()
                    .map(|d| d.split(':').next().unwrap_or("").to_string());
                self.violate(
                    "convergence",
                    path,
                    format!("trees of n{n0} and n{i} differ: {}", differ.join("; ")),
                );
                return;
            }
            let a: Vec<_> = stores[0].records().collect();
            let b: Vec<_> = stores[k].records().collect();
            if a != b {
                let first = a.iter().zip(b.iter()).find(|(x, y)| x != y);
                let path = first.map(|(x, _)| x.0.to_string());
                let show = |r: &rsyncfs_conflict::Record| {
                    let sibs: Vec<String> = r
                        .siblings
                        .iter()
                        .map(|s| format!("{}:{}", s.dot.node.short(), s.dot.counter))
                        .collect();
                    let vv: Vec<String> =
                        r.vv.iter()
                            .map(|d| format!("{}:{}", d.node.short(), d.counter))
                            .collect();
                    format!(
                        "vv [{}] siblings [{}] author {:?}",
                        vv.join(" "),
                        sibs.join(" "),
                        r.author.map(|a| a.short())
                    )
                };
                let detail = match first {
                    Some((x, y)) => format!("{} {} / {} {}", x.0, show(x.1), y.0, show(y.1)),
                    None => "one has more records".to_string(),
                };
                self.violate(
                    "convergence",
                    path,
                    format!(
                        "stores of n{n0} and n{i} differ ({} and {} records): {detail}",
                        a.len(),
                        b.len()
                    ),
                );
                return;
            }
        }
    }

    /// Every content owed is held by every one of the replicas (node index, tree).
    pub fn nothing_lost(&mut self, replicas: &[(usize, &SimFs)]) {
        let held: Vec<(usize, BTreeSet<Hash>)> =
            replicas.iter().map(|(i, t)| (*i, t.contents())).collect();
        for (hash, (node, path)) in self.alive.clone() {
            for (i, contents) in &held {
                if !contents.contains(&hash) {
                    self.violate(
                        "nothing lost",
                        Some(path.clone()),
                        format!(
                            "a write completed on n{node} at {path} (content #{:02x}{:02x}) is missing from n{i}",
                            hash[0], hash[1]
                        ),
                    );
                    return;
                }
            }
        }
    }
}
