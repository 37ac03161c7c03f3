//! How versions of one path settle: the join of two records, the decision a replicator takes,
//! and the conflict copies that keep every losing write.

use crate::limits::{CONFLICT_TAG_BYTES_MAX, NAME_BYTES_MAX, PATH_BYTES_MAX};
use crate::version::{Record, Sibling};
use crate::Causality;
use std::time::{Duration, UNIX_EPOCH};

/// The least record that has seen everything `a` and `b` have seen.
///
/// A sibling survives unless the other side has seen its write (its dot is in the other's
/// vector) and no longer holds it, which means a later write replaced it there. This is the join
/// of a dotted version vector set: commutative, associative and idempotent, so replicas that
/// received the same records in any order and any number of times hold equal records.
pub fn join(a: &Record, b: &Record) -> Record {
    let keep = |s: &Sibling, other: &Record| {
        !other.vv.covers(&s.dot) || other.siblings.iter().any(|o| o.dot == s.dot)
    };
    let mut siblings: Vec<Sibling> = a
        .siblings
        .iter()
        .filter(|s| keep(s, b))
        .chain(b.siblings.iter().filter(|s| keep(s, a)))
        .cloned()
        .collect();
    siblings.sort();
    // One dot names one write; should two records disagree on what it wrote (only a lying peer
    // can make that happen), keep the larger so that the result does not depend on the order.
    siblings.dedup_by(|later, earlier| {
        if later.dot == earlier.dot {
            if *later > *earlier {
                std::mem::swap(later, earlier);
            }
            true
        } else {
            false
        }
    });
    let vv = a.vv.merge(&b.vv);
    let same = |r: &Record| r.vv == vv && r.siblings == siblings;
    let author = match (same(a), same(b)) {
        (true, true) => a.author.max(b.author),
        (true, false) => a.author,
        (false, true) => b.author,
        (false, false) => None,
    };
    Record {
        vv,
        siblings,
        author,
    }
}

/// Folds a record with too many siblings (more concurrent writers than a record may carry)
/// into one that has seen all of them and holds only the winner's content, as a write of its
/// own. Callers keep every losing content as a conflict copy first; then nothing is lost.
///
/// The fold's write is a pure function of the record: its dot is the first and only write of
/// a pseudo node named by a hash of the record's vector and siblings, and its time is the
/// winner's. So every node that folds the same record makes the same write, and their folds
/// merge instead of piling up as new siblings; folds of different records are concurrent
/// writes of one content, which merge without a conflict.
pub fn fold(record: &Record) -> Record {
    let winner = record.winner();
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"rsyncfs fold 1");
    for d in record.vv.iter() {
        hasher.update(&d.node.0);
        hasher.update(&d.counter.to_be_bytes());
    }
    for s in &record.siblings {
        hasher.update(&s.dot.node.0);
        hasher.update(&s.dot.counter.to_be_bytes());
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    id[0] |= 1; // never zero
    let node = crate::NodeId(id);
    let dot = crate::Dot { node, counter: 1 };
    let hlc = uhlc::Timestamp::new(*winner.hlc.get_time(), node.hlc_id());
    let mut vv = record.vv.clone();
    vv.add(dot);
    Record {
        vv,
        siblings: vec![Sibling {
            dot,
            hlc,
            meta: winner.meta.clone(),
        }],
        author: None,
    }
}

/// A conflict copy: a losing content kept at a name next to the path it lost at.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ConflictCopy {
    /// Path of the copy, in the same directory as the path.
    pub path: String,
    /// The write whose content the copy keeps.
    pub sibling: Sibling,
}

impl ConflictCopy {
    /// The record of the copy: a pure function of the losing write, so that every node that
    /// makes the copy makes the same record and the copies merge instead of multiplying.
    pub fn record(&self) -> Record {
        Record {
            vv: crate::VersionVector::from_dot(self.sibling.dot),
            siblings: vec![self.sibling.clone()],
            author: None,
        }
    }
}

impl Record {
    /// The contents of this record that the path itself does not show and that conflict copies
    /// must keep: every sibling with data other than the winner, one per distinct content and
    /// none equal to the winner's content. When `shadowed`, the path shows a directory whatever
    /// the winner is (something inside it lives), so the winner's own data needs a copy too.
    pub fn copies(&self, path: &str, shadowed: bool) -> Vec<ConflictCopy> {
        let winner = self.winner();
        let shown = if shadowed {
            None
        } else {
            Some(&winner.meta.content)
        };
        let mut losers: Vec<&Sibling> = self
            .siblings
            .iter()
            .filter(|s| s.meta.has_data() && Some(&s.meta.content) != shown)
            .collect();
        // Of equal contents keep the highest ranked, so the choice does not depend on order.
        losers.sort_by(|x, y| {
            x.meta
                .content
                .cmp(&y.meta.content)
                .then(y.rank().cmp(&x.rank()))
        });
        losers.dedup_by(|later, earlier| later.meta.content == earlier.meta.content);
        let mut copies: Vec<ConflictCopy> = losers
            .into_iter()
            .map(|s| ConflictCopy {
                path: conflict_copy_name(path, s),
                sibling: s.clone(),
            })
            .collect();
        copies.sort_by(|x, y| x.path.cmp(&y.path));
        copies
    }
}

/// What a replicator does with a record received for a path it holds `local` for.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Decision {
    /// Equal versions: nothing to do.
    AlreadyHave,
    /// The local version has seen the remote one and more.
    KeepLocal,
    /// The remote version has seen the local one and more.
    TakeRemote,
    /// Concurrent versions with the same content (or a removal that loses to a modification):
    /// the vectors merge, no content is lost, no copy is needed.
    Merge(Record),
    /// Concurrent versions that differ: the merged record's winner stays at the path and each
    /// copy keeps a losing content.
    Conflict {
        merged: Record,
        copies: Vec<ConflictCopy>,
    },
}

/// Settles a remote record against the local one (none: the path was never seen here).
pub fn settle(path: &str, local: Option<&Record>, remote: &Record) -> Decision {
    let Some(local) = local else {
        return Decision::TakeRemote;
    };
    let merged = join(local, remote);
    if merged == *local {
        return if local.vv.compare(&remote.vv) == Causality::Equal {
            Decision::AlreadyHave
        } else {
            Decision::KeepLocal
        };
    }
    if merged == *remote {
        return Decision::TakeRemote;
    }
    let copies = merged.copies(path, false);
    if copies.is_empty() {
        Decision::Merge(merged)
    } else {
        Decision::Conflict { merged, copies }
    }
}

/// Whether a name (one path component) is that of a conflict copy.
pub fn is_conflict_copy(name: &str) -> bool {
    name.contains(CONFLICT_MARK)
}

const CONFLICT_MARK: &str = ".sync-conflict-";

/// The name of the conflict copy of `sibling` at `path`, in Syncthing's well-known form with the
/// write's counter added so that two losing writes of one node in one second get two names:
/// `dir/report.sync-conflict-20261126-101500-ABCD123-42.txt`. The date and time are the losing
/// write's HLC time (UTC), the letters its origin's short id.
///
/// The copy is in the same directory and within both the name and the path limit: the stem is
/// shortened (at a character boundary), and the extension left out when even that is not
/// enough. For a path whose directory part is at most [`crate::limits::DIR_BYTES_MAX`] bytes
/// there is always room for the tag.
pub fn conflict_copy_name(path: &str, sibling: &Sibling) -> String {
    let (dir, name) = match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    };
    // A leading dot starts a hidden name, not an extension.
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let time = UNIX_EPOCH + Duration::from_secs(u64::from(sibling.hlc.get_time().as_secs()));
    let stamp: String = humantime::format_rfc3339_seconds(time)
        .to_string()
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .map(|c| if c == 'T' { '-' } else { c })
        .collect();
    let tag = format!(
        "{CONFLICT_MARK}{stamp}-{}-{}",
        sibling.dot.node.short(),
        sibling.dot.counter
    );
    debug_assert!(tag.len() <= CONFLICT_TAG_BYTES_MAX);
    let room = NAME_BYTES_MAX.min(PATH_BYTES_MAX.saturating_sub(dir.len()));
    let ext = if ext.len() + tag.len() <= room {
        ext
    } else {
        ""
    };
    let mut cut = stem.len().min(room.saturating_sub(tag.len() + ext.len()));
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{dir}{}{tag}{ext}", &stem[..cut])
}
