//! The content hash of each file as last seen, with the stamp it had then, kept on disk so that
//! a restart over an unchanged tree stats every file and reads none. With it, whether the file
//! had no extended attributes then: such a file is not opened at all (a change of attributes
//! moves the ctime, so the stamp tells that too).
//!
//! A cache, not a record: a lookup answers only when the file's stamp (device, inode, size,
//! mtime and ctime, which no program can set back) is the one stored. Writes are gathered and
//! committed without waiting for the disk, durably at most [`DURABLE_EVERY`] apart and at a
//! clean stop; a crash loses only what was committed since, and those files are read again. A
//! database that does not open is started anew.

use super::{Seen, Stamp};
use parking_lot::Mutex;
use redb::{Database, ReadOnlyTable, ReadableDatabase, TableDefinition};
use rsyncfs_mesh::path::RelPath;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("stamps");
/// Writes gathered before they are committed.
const PENDING_MAX: usize = 4096;
/// The database's own page cache.
const CACHE_BYTES: usize = 16 << 20;
/// Least time between two commits asked for by [`Stamps::flush_if_due`] (the engine thread's
/// group commits come every 20 ms while it is busy: a write transaction each would be work on
/// its hot path).
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Most time between two durable commits while there are writes.
const DURABLE_EVERY: Duration = Duration::from_secs(10);
/// A stamp's five numbers, a hash and a flag (no extended attributes). A value without the
/// flag (written before it existed) reads as "attributes not known".
const VALUE_LEN: usize = 5 * 8 + 32 + 1;

/// A path's stamp and what was seen in it to store, or `None` to forget the path.
type Gathered = (RelPath, Option<(Stamp, Seen)>);

/// The table as of one commit, for lookups.
type Snapshot = Arc<ReadOnlyTable<&'static str, &'static [u8]>>;

pub struct Stamps {
    db: Database,
    /// The table as of the last commit, shared by the workers' lookups until the next commit:
    /// a read transaction and an open table for every lookup were a good part of a worker's
    /// time in a restart, which looks every file up. A lookup in an older snapshot can only miss
    /// (a stored stamp never comes back: no program can set a ctime back), which costs a read.
    snapshot: parking_lot::RwLock<Option<Snapshot>>,
    /// Gathered writes: a path's stamp and hash, or its removal.
    pending: Mutex<Vec<Gathered>>,
    durable_at: Mutex<Instant>,
    flushed_at: Mutex<Instant>,
}

fn encode(stamp: &Stamp, seen: &Seen) -> [u8; VALUE_LEN] {
    let mut v = [0u8; VALUE_LEN];
    let nums = [
        stamp.dev,
        stamp.ino,
        stamp.size,
        stamp.mtime_ns as u64,
        stamp.ctime_ns as u64,
    ];
    for (i, n) in nums.iter().enumerate() {
        v[i * 8..i * 8 + 8].copy_from_slice(&n.to_le_bytes());
    }
    v[40..72].copy_from_slice(&seen.hash);
    v[72] = u8::from(seen.bare);
    v
}

fn decode(v: &[u8]) -> Option<(Stamp, Seen)> {
    if v.len() != VALUE_LEN && v.len() != VALUE_LEN - 1 {
        return None;
    }
    let n = |i: usize| u64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let stamp = Stamp {
        dev: n(0),
        ino: n(1),
        size: n(2),
        mtime_ns: n(3) as i64,
        ctime_ns: n(4) as i64,
    };
    let seen = Seen {
        hash: v[40..72].try_into().expect("32 bytes"),
        bare: v.get(72) == Some(&1),
    };
    Some((stamp, seen))
}

impl Stamps {
    pub fn open(path: &Path) -> Result<Stamps, redb::Error> {
        let open = || -> Result<Database, redb::Error> {
            let db = redb::Builder::new()
                .set_cache_size(CACHE_BYTES)
                .create(path)?;
            let txn = db.begin_write()?;
            txn.open_table(TABLE)?;
            txn.commit()?;
            Ok(db)
        };
        let db = match open() {
            Ok(db) => db,
            // Another process has it open: not ours to start anew.
            Err(e @ (redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch)) => {
                return Err(e)
            }
            Err(e) => {
                tracing::warn!(
                    "the hash cache {} did not open ({e}); starting it anew",
                    path.display()
                );
                let _ = std::fs::remove_file(path);
                open()?
            }
        };
        Ok(Stamps {
            db,
            snapshot: parking_lot::RwLock::new(None),
            pending: Mutex::new(Vec::new()),
            durable_at: Mutex::new(Instant::now()),
            flushed_at: Mutex::new(Instant::now()),
        })
    }

    /// The bytes in the database's page cache now, and its budget.
    pub fn cache_bytes(&self) -> (usize, usize) {
        (self.db.cache_stats().used_bytes(), CACHE_BYTES)
    }

    /// What was stored for `path`, if its stamp then was `stamp`.
    pub fn get(&self, path: &RelPath, stamp: &Stamp) -> Option<Seen> {
        let table = self.snapshot()?;
        let v = table.get(path.as_str()).ok()??;
        let (was, seen) = decode(v.value())?;
        (was == *stamp).then_some(seen)
    }

    fn snapshot(&self) -> Option<Snapshot> {
        if let Some(table) = self.snapshot.read().as_ref() {
            return Some(Arc::clone(table));
        }
        let table = Arc::new(self.db.begin_read().ok()?.open_table(TABLE).ok()?);
        *self.snapshot.write() = Some(Arc::clone(&table));
        Some(table)
    }

    pub fn put(&self, path: &RelPath, stamp: Stamp, seen: Seen) {
        self.gather(path.clone(), Some((stamp, seen)));
    }

    pub fn forget(&self, path: &RelPath) {
        self.gather(path.clone(), None);
    }

    fn gather(&self, path: RelPath, what: Option<(Stamp, Seen)>) {
        let full = {
            let mut pending = self.pending.lock();
            pending.push((path, what));
            pending.len() >= PENDING_MAX
        };
        if full {
            self.flush(false);
        }
    }

    /// Commits what was gathered if the last commit is [`FLUSH_EVERY`] old.
    pub fn flush_if_due(&self) {
        if self.flushed_at.lock().elapsed() >= FLUSH_EVERY {
            self.flush(false);
        }
    }

    /// Commits what was gathered; with `durable` (or when the last durable commit is
    /// [`DURABLE_EVERY`] old), so that it survives a crash. A failure is logged and costs only
    /// reading those files again after a restart.
    pub fn flush(&self, durable: bool) {
        let pending = std::mem::take(&mut *self.pending.lock());
        if pending.is_empty() && !durable {
            return;
        }
        *self.flushed_at.lock() = Instant::now();
        let durable = {
            let mut at = self.durable_at.lock();
            let due = durable || at.elapsed() >= DURABLE_EVERY;
            if due {
                *at = Instant::now();
            }
            due
        };
        let write = || -> Result<(), redb::Error> {
            let mut txn = self.db.begin_write()?;
            if !durable {
                txn.set_durability(redb::Durability::None)?;
            }
            {
                let mut table = txn.open_table(TABLE)?;
                for (path, what) in &pending {
                    match what {
                        Some((stamp, seen)) => {
                            table.insert(path.as_str(), encode(stamp, seen).as_slice())?;
                        }
                        None => {
                            table.remove(path.as_str())?;
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(())
        };
        let written = write();
        // Lookups see this commit from now on (and redb may reuse what the old snapshot held).
        *self.snapshot.write() = None;
        if let Err(e) = written {
            tracing::warn!(
                "the hash cache was not written ({e}): those files are read again after a restart"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_hash_answers_only_for_the_same_stamp_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stamps.redb");
        let p = RelPath::new("a/b").unwrap();
        let stamp = Stamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: -4,
            ctime_ns: 5,
        };
        let seen = Seen {
            hash: [7; 32],
            bare: true,
        };
        {
            let s = Stamps::open(&path).unwrap();
            s.put(&p, stamp, seen);
            assert_eq!(s.get(&p, &stamp), None, "gathered, not yet committed");
            s.flush(true);
            assert_eq!(s.get(&p, &stamp), Some(seen));
        }
        let s = Stamps::open(&path).unwrap();
        assert_eq!(s.get(&p, &stamp), Some(seen));
        let touched = Stamp {
            ctime_ns: 6,
            ..stamp
        };
        assert_eq!(s.get(&p, &touched), None);
        s.forget(&p);
        s.flush(true);
        assert_eq!(s.get(&p, &stamp), None);
    }

    #[test]
    fn a_value_written_before_the_attribute_flag_reads_as_attributes_not_known() {
        let stamp = Stamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: 5,
        };
        let seen = Seen {
            hash: [9; 32],
            bare: true,
        };
        let v = encode(&stamp, &seen);
        assert_eq!(decode(&v), Some((stamp, seen)));
        let old = decode(&v[..VALUE_LEN - 1]).unwrap();
        assert_eq!(old.0, stamp);
        assert_eq!(old.1.hash, [9; 32]);
        assert!(!old.1.bare);
        assert_eq!(decode(&v[..40]), None);
    }

    #[test]
    fn a_database_that_does_not_open_is_started_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stamps.redb");
        std::fs::write(
            &path,
            b"not a database at all, but long enough to look like one",
        )
        .unwrap();
        let s = Stamps::open(&path).unwrap();
        let p = RelPath::new("x").unwrap();
        assert_eq!(
            s.get(
                &p,
                &Stamp {
                    dev: 0,
                    ino: 0,
                    size: 0,
                    mtime_ns: 0,
                    ctime_ns: 0
                }
            ),
            None
        );
    }
}
