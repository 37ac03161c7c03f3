//! The engine's [`Store`] on redb: one database file in the state directory.
//!
//! Tables: `entries` (path → postcard [`Entry`]), `log` (store sequence → path), `by_hash`
//! (content hash ‖ path → nothing, for "a local file with this content"), `progress` (peer →
//! sequence) and `counters` (the sequence reservation).
//!
//! Group commit: every write goes into one open write transaction, which [`RedbStore::commit`]
//! makes durable; the runtime commits on a short timer and before anything that must not run
//! ahead of the store (see docs/ARCHITECTURE.md, "Crashes"). Reads see the open transaction, so
//! the engine always reads its own writes. [`Store::reserve_seq`] commits at once, as the trait
//! asks. A failed commit is fatal to the daemon: the engine assumes its writes hold, so the
//! daemon stops, and the next start repairs from the last commit like after a crash.

use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use rsyncfs_conflict::{Hash, Meta, NodeId};
use rsyncfs_mesh::path::RelPath;
use rsyncfs_mesh::store::{Entry, Store};
use std::path::Path;

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const LOG: TableDefinition<u64, &str> = TableDefinition::new("log");
const BY_HASH: TableDefinition<&[u8], ()> = TableDefinition::new("by_hash");
const PROGRESS: TableDefinition<&[u8], u64> = TableDefinition::new("progress");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// The database's page cache: a fixed budget whatever the tree's size (redb's default is 1 GiB).
const CACHE_BYTES: usize = 64 << 20;
/// Entries kept decoded in memory (a path that has none counts as one too). The engine reads
/// a path's entry several times while it settles it; each read from redb opens the table,
/// walks the tree and decodes, about a third of the engine thread's time in a first sync.
const ENTRY_CACHE_MAX: usize = 16_384;
const RESERVED: &str = "seq_reserved";

/// Why the store failed. The daemon stops on any of these.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database: {0}")]
    Db(#[from] redb::Error),
    #[error("store entry for {0} does not decode: {1}")]
    Corrupt(String, postcard::Error),
    #[error("store holds an invalid path {0:?}")]
    BadPath(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The tables of the open write transaction, kept open from one group commit to the next:
/// opening a table for every read and write (a lookup in redb's table of tables, and a close
/// that writes its root back) was 12% of the engine thread's time in a first sync.
struct Tables<'txn> {
    entries: Table<'txn, &'static str, &'static [u8]>,
    log: Table<'txn, u64, &'static str>,
    by_hash: Table<'txn, &'static [u8], ()>,
    progress: Table<'txn, &'static [u8], u64>,
    counters: Table<'txn, &'static str, u64>,
}

self_cell::self_cell!(
    /// The open write transaction and its open tables.
    struct Open {
        owner: WriteTransaction,
        #[covariant]
        dependent: Tables,
    }
);

pub struct RedbStore {
    db: Database,
    open: Option<Open>,
    /// What the open transaction holds for recently read or written paths (`None`: no
    /// entry), kept equal to it by every write; emptied when full.
    cache: std::cell::RefCell<std::collections::HashMap<RelPath, Option<Entry>>>,
    /// Writes since the last commit.
    uncommitted: usize,
    /// The sequence reservation as the database holds it (asked twice for every record).
    reserved: u64,
    /// Where the database file is.
    path: std::path::PathBuf,
}

/// What a `HashMap` able to hold `capacity` items of `slot` bytes allocates (hashbrown: a
/// power of two of buckets, at most 7/8 of them full, a control byte each).
pub fn map_bytes(capacity: usize, slot: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    (capacity * 8).div_ceil(7).next_power_of_two() * (slot + 1)
}

impl RedbStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)?;
        let mut store = RedbStore {
            db,
            open: None,
            cache: Default::default(),
            uncommitted: 0,
            reserved: 0,
            path: path.to_path_buf(),
        };
        store.begin()?;
        store.reserved = store.try_reserved()?;
        Ok(store)
    }

    /// The database file.
    /// The store's caches: the database's pages, and the decoded entries (their slots: what
    /// an entry holds on the heap is not counted).
    pub fn caches(&self) -> [(&'static str, usize, usize); 2] {
        let slot = size_of::<(RelPath, Option<Entry>)>();
        [
            (
                "store's database pages",
                self.db.cache_stats().used_bytes(),
                CACHE_BYTES,
            ),
            (
                "store's decoded entries",
                map_bytes(self.cache.borrow().capacity(), slot),
                map_bytes(ENTRY_CACHE_MAX, slot),
            ),
        ]
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the next write transaction and its tables (made where missing).
    fn begin(&mut self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        self.open = Some(Open::try_new(txn, |txn| {
            Ok::<_, redb::TableError>(Tables {
                entries: txn.open_table(ENTRIES)?,
                log: txn.open_table(LOG)?,
                by_hash: txn.open_table(BY_HASH)?,
                progress: txn.open_table(PROGRESS)?,
                counters: txn.open_table(COUNTERS)?,
            })
        })?);
        Ok(())
    }

    fn tables(&self) -> &Tables<'_> {
        self.open
            .as_ref()
            .expect("a write transaction is always open")
            .borrow_dependent()
    }

    /// Runs `f` on the open tables, for writing.
    fn write<R>(&mut self, f: impl FnOnce(&mut Tables<'_>) -> R) -> R {
        self.open
            .as_mut()
            .expect("a write transaction is always open")
            .with_dependent_mut(|_, tables| f(tables))
    }

    /// Makes every write so far durable.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        if let Some(open) = self.open.take() {
            // The tables close (their roots written back) before the commit.
            open.into_owner().commit()?;
        }
        self.uncommitted = 0;
        self.begin()
    }

    /// Every entry, in path order (for status, conflicts and tests), read from the open
    /// transaction.
    pub fn entries(&self) -> Result<Vec<(RelPath, Entry)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tables().entries.iter()? {
            let (k, v) = item?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Paths strictly below `dir` (every path when `dir` is `None`) that have an entry.
    pub fn paths_under(&self, dir: Option<&RelPath>) -> Result<Vec<RelPath>, StoreError> {
        let mut out = Vec::new();
        self.each_path_under(dir, |k| {
            if let Ok(p) = RelPath::new(k.to_string()) {
                out.push(p);
            }
        })?;
        Ok(out)
    }

    /// Visits the paths below `dir` (the whole tree for `None`) that have an entry, in path
    /// order, without collecting them.
    pub fn each_path_under(
        &self,
        dir: Option<&RelPath>,
        mut visit: impl FnMut(&str),
    ) -> Result<(), StoreError> {
        let table = &self.tables().entries;
        match dir {
            Some(dir) => {
                let (lo, hi) = dir.under_bounds();
                for item in table.range(lo.as_str()..hi.as_str())? {
                    visit(item?.0.value());
                }
            }
            None => {
                for item in table.iter()? {
                    visit(item?.0.value());
                }
            }
        }
        Ok(())
    }

    fn try_get(&self, path: &RelPath) -> Result<Option<Entry>, StoreError> {
        if let Some(known) = self.cache.borrow().get(path) {
            return Ok(known.clone());
        }
        let value = self.tables().entries.get(path.as_str())?;
        let entry = value
            .map(|v| decode(path.as_str(), v.value()).map(|(_, e)| e))
            .transpose()?;
        // A path with no entry is remembered (a first sync reads new paths several times
        // before it writes them), and so is a directory's: the engine reads the directories
        // above a path for every path it settles (nine reads of directories from the database
        // per file of a first sync, before they were kept). Any other entry read is not: in a
        // scan each one is read once, and copying it into the cache, then dropping the cache
        // when full, was a sixth of the engine thread's time in a restart's profile. Writes
        // fill the cache.
        match &entry {
            None => self.remember(path, None),
            Some(e) if is_dir(e) => self.remember(path, entry.clone()),
            Some(_) => {}
        }
        Ok(entry)
    }

    fn remember(&self, path: &RelPath, entry: Option<Entry>) {
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= ENTRY_CACHE_MAX && !cache.contains_key(path) {
            cache.clear();
        }
        cache.insert(path.clone(), entry);
    }

    fn try_remove(&mut self, path: &RelPath) -> Result<(), StoreError> {
        // Forgotten first: if the write fails the daemon stops, and the cache with it.
        let known = self.cache.get_mut().remove(path);
        self.write(|t| {
            let old = match (known, t.entries.remove(path.as_str())?) {
                (_, None) => return Ok(()),
                // The cache holds what the database does: no need to decode it again.
                (Some(Some(old)), Some(_)) => old,
                (_, Some(bytes)) => decode(path.as_str(), bytes.value())?.1,
            };
            reindex(t, path, &old, None)
        })
    }

    /// One write of the entry (its old value comes back from the insert, or from the cache),
    /// and of the `log` and `by_hash` rows only where they change.
    fn try_put(&mut self, path: &RelPath, entry: &Entry) -> Result<(), StoreError> {
        if entry.record.is_some() {
            assert!(entry.seq > 0, "a record needs a log position");
        }
        let known = self.cache.get_mut().remove(path);
        let bytes = postcard::to_stdvec(entry).expect("encoding to memory cannot fail");
        self.write(|t| {
            let old = match (known, t.entries.insert(path.as_str(), bytes.as_slice())?) {
                (_, None) => Entry::default(),
                (Some(Some(old)), Some(_)) => old,
                (_, Some(bytes)) => decode(path.as_str(), bytes.value())?.1,
            };
            reindex(t, path, &old, Some(entry))
        })?;
        self.remember(path, Some(entry.clone()));
        Ok(())
    }

    fn try_after(&self, seq: u64, limit: usize) -> Result<Vec<(RelPath, Entry)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .tables()
            .log
            .range(seq.saturating_add(1)..)?
            .take(limit)
        {
            let (_, path) = item?;
            let path = RelPath::new(path.value().to_string())
                .map_err(|_| StoreError::BadPath(path.value().to_string()))?;
            if let Some(entry) = self.try_get(&path)? {
                out.push((path, entry));
            }
        }
        Ok(out)
    }

    fn try_for_each(&self, visit: &mut dyn FnMut(&RelPath, &Entry)) -> Result<(), StoreError> {
        for item in self.tables().entries.iter()? {
            let (k, v) = item?;
            let (path, entry) = decode(k.value(), v.value())?;
            visit(&path, &entry);
        }
        Ok(())
    }

    fn try_find_local(&self, hash: &Hash) -> Result<Option<RelPath>, StoreError> {
        let lo = hash.to_vec();
        let mut range = self.tables().by_hash.range(lo.as_slice()..)?;
        let Some(item) = range.next() else {
            return Ok(None);
        };
        let (k, _) = item?;
        let k = k.value();
        if k.len() <= 32 || &k[..32] != hash.as_slice() {
            return Ok(None);
        }
        Ok(std::str::from_utf8(&k[32..])
            .ok()
            .and_then(|p| RelPath::new(p.to_string()).ok()))
    }

    fn try_progress(&self, peer: &NodeId) -> Result<u64, StoreError> {
        let value = self.tables().progress.get(peer.0.as_slice())?;
        Ok(value.map_or(0, |v| v.value()))
    }

    fn try_set_progress(&mut self, peer: &NodeId, seq: u64) -> Result<(), StoreError> {
        self.write(|t| t.progress.insert(peer.0.as_slice(), seq).map(drop))?;
        Ok(())
    }

    fn try_reserved(&self) -> Result<u64, StoreError> {
        let value = self.tables().counters.get(RESERVED)?;
        Ok(value.map_or(0, |v| v.value()))
    }

    fn try_reserve(&mut self, upto: u64) -> Result<(), StoreError> {
        self.write(|t| t.counters.insert(RESERVED, upto).map(drop))?;
        self.commit()?;
        self.reserved = upto;
        Ok(())
    }
}

/// Whether an entry is a directory's: the disk holds one there, or its record shows one.
fn is_dir(entry: &Entry) -> bool {
    entry.local.as_ref().is_some_and(Meta::is_dir)
        || entry
            .record
            .as_ref()
            .is_some_and(|r| r.winner().meta.is_dir())
}

fn hash_key(hash: &Hash, path: &RelPath) -> Vec<u8> {
    let mut key = Vec::with_capacity(32 + path.as_str().len());
    key.extend_from_slice(hash);
    key.extend_from_slice(path.as_str().as_bytes());
    key
}

/// Moves the `log` and `by_hash` rows of `path` from what `old` says to what `new` says
/// (nothing, for a removal); a row both say is left as it is.
fn reindex(
    t: &mut Tables<'_>,
    path: &RelPath,
    old: &Entry,
    new: Option<&Entry>,
) -> Result<(), StoreError> {
    let seq = |e: &Entry| e.record.is_some().then_some(e.seq);
    let (old_seq, new_seq) = (seq(old), new.and_then(seq));
    if old_seq != new_seq {
        if let Some(s) = old_seq {
            t.log.remove(s)?;
        }
        if let Some(s) = new_seq {
            let previous = t.log.insert(s, path.as_str())?;
            assert!(previous.is_none(), "log position {s} used twice");
        }
    }
    let hash = |e: &Entry| e.local.as_ref().and_then(|m| m.file_hash()).map(|(h, _)| h);
    let (old_hash, new_hash) = (hash(old), new.and_then(hash));
    if old_hash != new_hash {
        if let Some(h) = old_hash {
            t.by_hash.remove(hash_key(&h, path).as_slice())?;
        }
        if let Some(h) = new_hash {
            t.by_hash.insert(hash_key(&h, path).as_slice(), ())?;
        }
    }
    Ok(())
}

fn decode(path: &str, bytes: &[u8]) -> Result<(RelPath, Entry), StoreError> {
    let entry: Entry =
        postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(path.to_string(), e))?;
    let path = RelPath::new(path.to_string()).map_err(|_| StoreError::BadPath(path.to_string()))?;
    Ok((path, entry))
}

/// The engine's calls cannot fail; a store that fails stops the daemon (see the module text).
fn fatal(e: StoreError) -> ! {
    tracing::error!("the store failed, stopping: {e}");
    eprintln!("rsyncfs-node: the store failed: {e}; stopping (the next start repairs)");
    std::process::exit(3)
}

impl Store for RedbStore {
    fn get(&self, path: &RelPath) -> Option<Entry> {
        self.try_get(path).unwrap_or_else(|e| fatal(e))
    }

    fn put(&mut self, path: &RelPath, entry: Entry) {
        self.uncommitted += 1;
        self.try_put(path, &entry).unwrap_or_else(|e| fatal(e))
    }

    fn remove(&mut self, path: &RelPath) {
        self.uncommitted += 1;
        self.try_remove(path).unwrap_or_else(|e| fatal(e));
        self.remember(path, None);
    }

    fn after(&self, seq: u64, limit: usize) -> Vec<(RelPath, Entry)> {
        self.try_after(seq, limit).unwrap_or_else(|e| fatal(e))
    }

    fn for_each(&self, visit: &mut dyn FnMut(&RelPath, &Entry)) {
        self.try_for_each(visit).unwrap_or_else(|e| fatal(e))
    }

    fn find_local(&self, hash: &Hash) -> Option<RelPath> {
        self.try_find_local(hash).unwrap_or_else(|e| fatal(e))
    }

    fn progress(&self, peer: &NodeId) -> u64 {
        self.try_progress(peer).unwrap_or_else(|e| fatal(e))
    }

    fn set_progress(&mut self, peer: &NodeId, seq: u64) {
        self.uncommitted += 1;
        self.try_set_progress(peer, seq)
            .unwrap_or_else(|e| fatal(e))
    }

    fn seq_reserved(&self) -> u64 {
        self.reserved
    }

    fn reserve_seq(&mut self, upto: u64) {
        self.try_reserve(upto).unwrap_or_else(|e| fatal(e))
    }

    fn uncommitted(&self) -> usize {
        self.uncommitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsyncfs_mesh::store::contract::{self, StoreUnderTest};

    impl StoreUnderTest for RedbStore {
        fn commit_now(&mut self) {
            self.commit().expect("commit");
        }

        /// The process dies: the open transaction is never committed.
        fn crash_and_reopen(self) -> RedbStore {
            let path = self.path.clone();
            drop(self);
            RedbStore::open(&path).expect("reopens")
        }
    }

    /// The decoded entries kept in memory always say what the database says: gets, puts and
    /// removes of files' and directories' entries over more paths than the cache holds,
    /// against a model, then after a reopen.
    #[test]
    fn the_entry_cache_agrees_with_the_database() {
        use rsyncfs_conflict::Meta;
        use std::collections::HashMap;
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
        let mut model: HashMap<RelPath, Entry> = HashMap::new();
        let paths: Vec<RelPath> = (0..ENTRY_CACHE_MAX + 4_000)
            .map(|i| RelPath::new(format!("d{}/f{i}", i % 7)).unwrap())
            .collect();
        let mut x = 0x2545f4914f6cdd1du64;
        for step in 0..3 * paths.len() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = &paths[(x % paths.len() as u64) as usize];
            match (x >> 32) % 4 {
                0 | 1 => {
                    // Directories' entries are kept when read, files' are not: both kinds.
                    let local = if (x >> 40) % 3 == 0 {
                        Meta::dir(0o755)
                    } else {
                        Meta::file(step as u64, [step as u8; 32], 0o644, 0)
                    };
                    let entry = Entry {
                        local: Some(local),
                        ..Entry::default()
                    };
                    store.put(p, entry.clone());
                    model.insert(p.clone(), entry);
                }
                2 => {
                    store.remove(p);
                    model.remove(p);
                }
                _ => assert_eq!(store.get(p), model.get(p).cloned(), "{p} at step {step}"),
            }
        }
        for p in &paths {
            assert_eq!(store.get(p), model.get(p).cloned(), "{p}");
        }
        store.commit().unwrap();
        let store = store.crash_and_reopen();
        for p in &paths {
            assert_eq!(store.get(p), model.get(p).cloned(), "{p} after a reopen");
        }
        assert_eq!(store.entries().unwrap().len(), model.len());
    }

    #[test]
    fn passes_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = 0;
        contract::check(&mut || {
            n += 1;
            RedbStore::open(&dir.path().join(format!("store{n}.redb"))).unwrap()
        });
    }
}
