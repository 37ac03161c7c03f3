//! The node's own access to its backing directory: what a path holds ([`Tree::observe`]), the
//! engine's applies ([`Tree::apply`]), content for peers, and staging files for fetches.
//!
//! Every path is resolved below the backing root without following symlinks (`openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so that no path, whatever a peer sends and whatever
//! the tree holds, reaches outside the tree. Writes go to the backing directory directly (not
//! through the mount) and are not reported by the change logger.

mod attrs;
mod by_hash;
pub mod in_place;
pub mod preseed;
pub mod segments;
mod stamps;
pub mod versions;

use attrs::{finish_file, read_xattrs, set_attrs_at};
use in_place::{Journal, Patch, Record, PATCH};
use parking_lot::Mutex;
use rsyncfs_conflict::{Content, Hash, Meta, DIR_MODE_DEFAULT};
use rsyncfs_mesh::engine::{Action, Apply, ApplyError, IoFailure, IoKind, Source, StagedId};
use rsyncfs_mesh::path::RelPath;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The folder inside the backing directory for the node's temporary files.
pub const TMP_DIR: &str = "tmp";
/// Hashes remembered by file identity, so that a file is read once per change.
const HASH_CACHE_MAX: usize = 100_000;
/// The hash cache on disk, in the state folder inside the backing directory.
const STAMPS_FILE: &str = "stamps.redb";

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// What identifies one state of a file's content without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    fn of(st: &rustix::fs::Stat) -> Stamp {
        Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: mtime_ns(st),
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec as i64,
        }
    }
}

/// What was seen of a file in one stamp: its content's hash, and whether it had no extended
/// attributes (`false`: it had some, or that is not known).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seen {
    hash: Hash,
    bare: bool,
}

fn mtime_ns(st: &rustix::fs::Stat) -> i64 {
    st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64
}

/// The backing directory as the node sees it.
pub struct Tree {
    root: PathBuf,
    root_fd: OwnedFd,
    tmp_fd: OwnedFd,
    tmp_path: PathBuf,
    hashes: Mutex<HashMap<Stamp, Seen>>,
    /// The same, by path and on disk, for restarts (`None` if it could not be opened).
    stamps: Option<stamps::Stamps>,
    /// The segments' CVs of large contents seen here (read, fetched or written).
    cvs: Mutex<segments::CvCache>,
    /// Contents of small files by hash, as last read or written, for the batches that carry
    /// them (so that announcing a file just observed reads it no second time).
    small: Mutex<by_hash::ByHash<bytes::Bytes>>,
    next_tmp: AtomicU64,
    /// The backing filesystem refused `O_TMPFILE` once (see [`Tree::anonymous_file`]).
    no_tmpfile: std::sync::atomic::AtomicBool,
    /// Files read and hashed by observations.
    hashed: AtomicU64,
    /// Directories whose entries changed since the last [`Tree::sync_dirs`].
    touched: Mutex<HashSet<PathBuf>>,
    /// The journal of updates in place (one at a time); `None` where the filesystem shares
    /// blocks between copies (or the journal could not be opened), so that nothing is updated
    /// in place.
    journal: Option<Mutex<Journal>>,
    /// Patches staged by fetches, by staging file name, until applied or released.
    patches: Mutex<HashMap<std::ffi::OsString, Patch>>,
    /// Segments peers sent of files their writers still had open.
    preseeds: preseed::Preseeds,
    /// Where the files that applies replace or remove are kept (`up --keep-versions`).
    versions: Option<versions::Versions>,
}

/// The directory a worker last opened to observe a path in it, kept for the next observation
/// in the same directory ([`Tree::observe_in`]). A scan queues a directory's entries one
/// after the other, and resolving each one's parent from the root (an `openat2` and a
/// `close`) was about 30% of a worker's time in a restart. A worker keeps one only across
/// consecutive observations of one turn: its applies move and remove directories.
#[derive(Default)]
pub struct Parents {
    last: Option<(String, OwnedFd)>,
}

/// An apply's content, ready under a temporary name in the state folder (or, for a new
/// path, with no name in its directory).
pub struct Prepared {
    tmp: Option<std::ffi::OsString>,
    /// The temporary file, open, for making its data durable.
    file: Option<File>,
    /// The file was closed early ([`Prepared::close_file`]): only a `syncfs` makes it durable.
    closed: bool,
    /// `file` has no name yet: an `O_TMPFILE` in the directory of a path that holds nothing,
    /// linked there by the commit (see [`Tree::anonymous_file`]).
    anon: bool,
    /// The segments to write in place, when `tmp` is a patch.
    patch: Option<Patch>,
}

impl Prepared {
    /// Closes the temporary file before [`Tree::make_durable`], which then syncs the whole
    /// filesystem: a worker with many applies in one turn holds no descriptor for each.
    pub fn close_file(&mut self) {
        // An anonymous file is its descriptor until the commit links it.
        if !self.anon && self.file.take().is_some() {
            self.closed = true;
        }
    }
}

/// Files up to this size are kept in `Tree::small` when read (the inline limit).
const SMALL_BYTES_MAX: u64 = rsyncfs_mesh::wire::INLINE_BYTES_MAX as u64;
/// Bytes of small contents kept.
const SMALL_CACHE_BYTES_MAX: usize = 16 << 20;

/// What an apply needs from the mount over the tree.
pub trait Mount {
    /// True while a local process has `path` open for writing.
    fn busy(&self, path: &RelPath) -> bool;
    /// Runs `f` while no local change through the mount is in progress or can start.
    fn exclusive(&self, f: &mut dyn FnMut());
}

fn staged_source(apply: &Apply) -> Option<StagedId> {
    match &apply.action {
        Action::Write {
            source: Source::Staged(id),
            ..
        } => Some(*id),
        _ => None,
    }
}

/// Why a path cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}: the symlink target is not UTF-8; it is not replicated")]
    BadTarget(String),
    #[error("{0}: changed every time it was read (up to {OBSERVE_TRIES} times or {mib} MiB); its writer's close reports it", mib = OBSERVE_BYTES_MAX >> 20)]
    Changing(String),
}

impl ObserveError {
    pub fn failure(&self) -> IoFailure {
        match self {
            ObserveError::Io(path, e) => io_failure(path, e),
            other => IoFailure::new(IoKind::Other, other.to_string()),
        }
    }
}

/// Staging files of fetches start with this, then the content's hash.
const FETCHING: &str = "f-";
/// Partial copies of content kept for a fetch to resume from: this, then the content's hash.
const PARTIAL: &str = "p-";
/// Preseeds (see [`preseed`]) start with this; a start removes them.
const PRESEED: &str = "e-";
/// Partial copies kept at most (the newest); each is at most one file's size.
const PARTIALS_MAX: usize = 32;

fn hex(hash: &Hash) -> String {
    blake3::Hash::from(*hash).to_hex().to_string()
}

/// Empties the temporary folder of what an earlier run left, except the content of fetches
/// that broke off (or were staged and not yet applied): those become partial copies, the
/// newest [`PARTIALS_MAX`] of them kept.
fn keep_partials(tmp: &Path) -> std::io::Result<()> {
    let mut partials = Vec::new();
    for entry in std::fs::read_dir(tmp)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let hash = name
            .strip_prefix(FETCHING)
            .or_else(|| name.strip_prefix(PARTIAL))
            .and_then(|rest| rest.get(..64))
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        match hash {
            Some(hash) => {
                let kept = tmp.join(format!("{PARTIAL}{hash}"));
                let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
                if entry.path() != kept {
                    if len(&entry.path()) > len(&kept) {
                        std::fs::rename(entry.path(), &kept)?;
                    } else {
                        std::fs::remove_file(entry.path())?;
                    }
                }
                if !partials.contains(&kept) {
                    partials.push(kept);
                }
            }
            None => std::fs::remove_file(entry.path())?,
        }
    }
    let modified = |p: &PathBuf| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH)
    };
    partials.sort_by_key(|p| std::cmp::Reverse(modified(p)));
    for old in partials.iter().skip(PARTIALS_MAX) {
        let _ = std::fs::remove_file(old);
    }
    Ok(())
}

/// Times a file that changes while it is hashed is read again before the observation gives up.
const OBSERVE_TRIES: usize = 8;
/// ... or once this many bytes of it were read in vain. A large file that changes while it is
/// read is being written: reading it again at once would take a core from its writer for
/// nothing, when the writer's close (or the next report of a file held open) brings it back.
const OBSERVE_BYTES_MAX: u64 = 256 << 20;

impl Tree {
    /// Opens the backing directory and makes its state folder (`.rsyncfs/tmp`), emptying the
    /// temporary folder of what an earlier run left.
    pub fn open(root: &Path) -> std::io::Result<Tree> {
        let root_fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let state = root.join(rsyncfs_logger::STATE_DIR_NAME);
        let tmp_path = state.join(TMP_DIR);
        std::fs::create_dir_all(&tmp_path)?;
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let tmp_fd = rustix::fs::open(
            &tmp_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let stamps = match stamps::Stamps::open(&state.join(STAMPS_FILE)) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("no hash cache on disk ({e}): a restart reads every file again");
                None
            }
        };
        let mut replay = None;
        let journal = match in_place::overwrites_in_place(&root_fd) {
            false => None,
            true => match Journal::open(&state) {
                Ok((journal, record)) => {
                    replay = record;
                    Some(Mutex::new(journal))
                }
                Err(e) => {
                    tracing::warn!(
                        "no journal for updates in place ({e}): large files are copied whole"
                    );
                    None
                }
            },
        };
        let tree = Tree {
            stamps,
            root: root.to_path_buf(),
            root_fd,
            tmp_fd,
            tmp_path,
            hashes: Mutex::new(HashMap::new()),
            cvs: Mutex::new(segments::CvCache::default()),
            small: Mutex::new(by_hash::ByHash::new(SMALL_CACHE_BYTES_MAX)),
            next_tmp: AtomicU64::new(0),
            no_tmpfile: std::sync::atomic::AtomicBool::new(false),
            hashed: AtomicU64::new(0),
            touched: Mutex::new(HashSet::new()),
            journal,
            patches: Mutex::new(HashMap::new()),
            preseeds: preseed::Preseeds::default(),
            versions: None,
        };
        // An update in place that a crash cut short is finished before anything reads the
        // tree, and before the temporary folder (which holds its patch) is emptied.
        if let Some(record) = replay {
            tree.replay(&record)?;
        }
        keep_partials(&tree.tmp_path)?;
        Ok(tree)
    }

    /// The same tree, keeping the files applies replace or remove under `policy`.
    pub fn with_versions(mut self, policy: versions::Policy) -> std::io::Result<Tree> {
        let state = self.root.join(rsyncfs_logger::STATE_DIR_NAME);
        self.versions = Some(versions::Versions::open(&state, policy)?);
        Ok(self)
    }

    /// The versions kept, where they are.
    pub fn versions(&self) -> Option<&versions::Versions> {
        self.versions.as_ref()
    }

    /// Does again the update in place of `record` (found in the journal at start), then
    /// clears the journal.
    fn replay(&self, record: &Record) -> std::io::Result<()> {
        let path = RelPath::new(record.path.clone()).map_err(std::io::Error::other)?;
        let redone = (|| -> std::io::Result<&str> {
            let (dir, name) = self.parent_of(&path)?;
            let target = match rustix::fs::openat(
                &dir,
                name,
                OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => File::from(fd),
                Err(rustix::io::Errno::NOENT) => return Ok("it is gone now; nothing to do"),
                Err(e) => return Err(e.into()),
            };
            let st = rustix::fs::fstat(&target)?;
            if st.st_dev != record.dev || st.st_ino != record.ino {
                return Ok("another file is there now; left as it is");
            }
            let staged = match rustix::fs::openat(
                &self.tmp_fd,
                record.staged.as_str(),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => File::from(fd),
                // Only a hand in the state folder removes it (its name was durable first).
                Err(rustix::io::Errno::NOENT) => {
                    tracing::error!(
                        "{}: its update in place was cut short and its staged segments are gone \
                         from the state folder: it may hold parts of two versions",
                        record.path
                    );
                    return Ok("not finished");
                }
                Err(e) => return Err(e.into()),
            };
            in_place::redo(&target, &staged, record)?;
            set_attrs_at(dir.as_fd(), name, &record.meta)?;
            target.sync_all()?;
            Ok("finished")
        })();
        match redone {
            Ok(outcome) => tracing::info!(
                "{}: an update in place was cut short by a stop; {outcome}",
                record.path
            ),
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{}: finishing its update in place: {e}", record.path),
                ))
            }
        }
        if let Some(j) = &self.journal {
            j.lock().clear()?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens the directory holding `path`, below the root, following no symlink.
    fn parent_of<'p>(&self, path: &'p RelPath) -> std::io::Result<(OwnedFd, &'p OsStr)> {
        let name = OsStr::new(path.name());
        let parent = match path.parent() {
            Some(p) => rustix::fs::openat2(
                &self.root_fd,
                p.as_str(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            )?,
            None => rustix::fs::openat(
                &self.root_fd,
                c".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?,
        };
        Ok((parent, name))
    }

    /// What `path` holds now: `None` when nothing is there, or something that is not
    /// replicated (a FIFO, a socket, a device) is.
    pub fn observe(&self, path: &RelPath) -> Result<Option<Meta>, ObserveError> {
        self.observe_in(&mut Parents::default(), path)
    }

    /// [`Tree::observe`], through the directory `parents` holds when it is `path`'s parent
    /// (else `path`'s parent is opened and kept there for the next observation). Something
    /// found missing forgets the directory: a directory removed or replaced since it was
    /// opened is looked up again for the next path.
    pub fn observe_in(
        &self,
        parents: &mut Parents,
        path: &RelPath,
    ) -> Result<Option<Meta>, ObserveError> {
        let io = |e: std::io::Error| ObserveError::Io(path.to_string(), e);
        let parent = path.parent_str().unwrap_or("");
        if !matches!(&parents.last, Some((p, _)) if p == parent) {
            parents.last = None;
            match self.parent_of(path) {
                Ok((dir, _)) => parents.last = Some((parent.to_string(), dir)),
                // A missing or non-directory parent (or a symlink above) means nothing is
                // here.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EXDEV)
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(io(e)),
            }
        }
        let (_, dir) = parents.last.as_ref().expect("opened above");
        let name = OsStr::new(path.name());
        let observed = self.observe_at(dir.as_fd(), name, path);
        if !matches!(observed, Ok(Some(_))) {
            parents.last = None;
        }
        observed
    }

    fn observe_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &RelPath,
    ) -> Result<Option<Meta>, ObserveError> {
        // A file written while it is read is read again, a bounded number of times.
        let mut spent = 0u64;
        for _ in 0..OBSERVE_TRIES {
            if let Some(observed) = self.try_observe_at(dir, name, path)? {
                return Ok(observed);
            }
            // What the try read, about: the file's size now.
            spent += rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_or(0, |st| st.st_size as u64);
            if spent >= OBSERVE_BYTES_MAX {
                break;
            }
        }
        Err(ObserveError::Changing(path.to_string()))
    }

    /// One observation; `None` when the file changed while it was hashed.
    fn try_observe_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &RelPath,
    ) -> Result<Option<Option<Meta>>, ObserveError> {
        let io = |e: std::io::Error| ObserveError::Io(path.to_string(), e);
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => {
                if let Some(s) = &self.stamps {
                    s.forget(path);
                }
                return Ok(Some(None));
            }
            Err(e) => return Err(io(e.into())),
        };
        let mode = st.st_mode & 0o7777;
        let attrs = |meta: Meta| -> Result<Meta, ObserveError> {
            let xattrs = read_xattrs(dir, name, path).map_err(io)?;
            Ok(meta.with_owner(st.st_uid, st.st_gid).with_xattrs(xattrs))
        };
        let meta = match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => Some(attrs(Meta::dir(mode))?),
            FileType::Symlink => {
                let target =
                    rustix::fs::readlinkat(dir, name, Vec::new()).map_err(|e| io(e.into()))?;
                let target = String::from_utf8(target.into_bytes())
                    .map_err(|_| ObserveError::BadTarget(path.to_string()))?;
                Some(Meta::symlink(target).with_owner(st.st_uid, st.st_gid))
            }
            FileType::RegularFile => {
                let stamp = Stamp::of(&st);
                let known = self.cached(&stamp).or_else(|| {
                    let seen = self.stamps.as_ref()?.get(path, &stamp)?;
                    self.remember(stamp, seen);
                    Some(seen)
                });
                // The file as opened to hash it: its attributes are read from it too.
                let mut opened: Option<File> = None;
                let hash = match known {
                    Some(seen) => seen.hash,
                    None => {
                        let fd = rustix::fs::openat(
                            dir,
                            name,
                            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .map_err(|e| io(e.into()))?;
                        let file = File::from(fd);
                        self.hashed.fetch_add(1, Ordering::Relaxed);
                        let (hash, after) = if stamp.size <= SMALL_BYTES_MAX {
                            let mut data = Vec::with_capacity(stamp.size as usize + 1);
                            (&file).read_to_end(&mut data).map_err(io)?;
                            let hash = *blake3::hash(&data).as_bytes();
                            let len = data.len();
                            self.small.lock().put(hash, bytes::Bytes::from(data), len);
                            (hash, rustix::fs::fstat(&file).map_err(|e| io(e.into()))?)
                        } else {
                            let started = std::time::Instant::now();
                            // A file being written is given up on within a few segments.
                            let changed = || {
                                rustix::fs::fstat(&file).map_or(true, |st| Stamp::of(&st) != stamp)
                            };
                            match segments::hash_file_unless(&file, stamp.size, &changed) {
                                Ok((hash, cvs)) => {
                                    tracing::debug!(
                                        "hashed {path}: {} bytes in {:?}",
                                        stamp.size,
                                        started.elapsed()
                                    );
                                    self.remember_cvs(hash, cvs.into());
                                    (hash, rustix::fs::fstat(&file).map_err(|e| io(e.into()))?)
                                }
                                // Shorter than it was a moment ago, or seen changing:
                                // written while we read.
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::UnexpectedEof
                                            | std::io::ErrorKind::Interrupted
                                    ) =>
                                {
                                    return Ok(None)
                                }
                                Err(e) => return Err(io(e)),
                            }
                        };
                        if Stamp::of(&after) != stamp {
                            // Written while we read: look again.
                            return Ok(None);
                        }
                        opened = Some(file);
                        hash
                    }
                };
                let meta = Meta::file(stamp.size, hash, mode, stamp.mtime_ns)
                    .with_owner(st.st_uid, st.st_gid);
                // A file seen without attributes in this stamp has none now: setting or
                // removing one moves the ctime. Not opened at all (in a restart's profile,
                // the open, list and close were a fifth of a worker's time).
                if known.is_some_and(|seen| seen.bare) {
                    return Ok(Some(Some(meta)));
                }
                let xattrs = match &opened {
                    Some(file) => attrs::read_xattrs_of(file.as_fd(), path),
                    None => read_xattrs(dir, name, path),
                }
                .map_err(io)?;
                let seen = Seen {
                    hash,
                    bare: xattrs.is_empty(),
                };
                if known != Some(seen) {
                    self.remember(stamp, seen);
                    if let Some(s) = &self.stamps {
                        s.put(path, stamp, seen);
                    }
                }
                Some(meta.with_xattrs(xattrs))
            }
            _ => None,
        };
        Ok(Some(meta))
    }

    /// The tree's caches: what each holds now, and its budget.
    pub fn caches(&self) -> Vec<crate::control::CacheStatus> {
        let cache = |name: &str, (bytes, budget): (usize, usize)| crate::control::CacheStatus {
            name: name.to_string(),
            bytes: bytes as u64,
            budget_bytes: budget as u64,
        };
        let slot = size_of::<(Stamp, Seen)>();
        let hashes = crate::store::map_bytes(self.hashes.lock().capacity(), slot);
        let mut caches = vec![
            cache(
                "hashes by stamp",
                (hashes, crate::store::map_bytes(HASH_CACHE_MAX, slot)),
            ),
            cache("large contents' CVs", self.cvs.lock().bytes()),
            cache("small contents", self.small.lock().weight()),
        ];
        if let Some(s) = &self.stamps {
            caches.push(cache("hash cache's database pages", s.cache_bytes()));
        }
        caches
    }

    fn cached(&self, stamp: &Stamp) -> Option<Seen> {
        self.hashes.lock().get(stamp).copied()
    }

    fn remember(&self, stamp: Stamp, seen: Seen) {
        let mut hashes = self.hashes.lock();
        if hashes.len() >= HASH_CACHE_MAX {
            hashes.clear();
        }
        hashes.insert(stamp, seen);
    }

    /// The segments' CVs of the content `hash`, if it has more than one segment and was hashed,
    /// fetched or written here lately.
    pub fn cvs(&self, hash: &Hash) -> Option<Arc<[segments::Cv]>> {
        self.cvs.lock().get(hash)
    }

    pub fn remember_cvs(&self, hash: Hash, cvs: Arc<[segments::Cv]>) {
        self.cvs.lock().put(hash, cvs);
    }

    /// Whether `file` is in the state in which it was last seen to hold content `hash` (its
    /// identity, size and times unchanged since).
    pub fn still_holds(&self, file: &File, hash: &Hash) -> bool {
        rustix::fs::fstat(file)
            .is_ok_and(|st| self.cached(&Stamp::of(&st)).map(|seen| seen.hash) == Some(*hash))
    }

    /// Opens the file at `path` for reading if it holds content `hash` of `size` bytes.
    pub fn open_content(&self, path: &RelPath, hash: &Hash, size: u64) -> Option<File> {
        let (dir, name) = self.parent_of(path).ok()?;
        let meta = self.observe_at(dir.as_fd(), name, path).ok()??;
        if meta.file_hash() != Some((*hash, size)) {
            return None;
        }
        let fd = rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        Some(File::from(fd))
    }

    /// The content of a small file, if `path` still holds content `hash` (checked on the bytes
    /// read).
    pub fn read_small(&self, path: &RelPath, hash: &Hash, size: u64) -> Option<bytes::Bytes> {
        if let Some(data) = self.small.lock().get(hash) {
            return Some(data);
        }
        let mut file = self.open_content(path, hash, size)?;
        let mut data = Vec::with_capacity(size as usize);
        Read::by_ref(&mut file)
            .take(size + 1)
            .read_to_end(&mut data)
            .ok()?;
        (data.len() as u64 == size && blake3::hash(&data).as_bytes() == hash)
            .then(|| bytes::Bytes::from(data))
    }

    /// For a write to a path that holds nothing and whose directory exists: a file with no
    /// name in that directory (`O_TMPFILE`), which the commit links at the path. Nothing shows
    /// in the tree before the link, a crash leaves nothing behind, and the inode is allocated
    /// near its directory: 40,000 small files took 6.9-10.8 s this way, against 15.8-21.1 s
    /// through the state folder and a rename (docs/BENCHMARKS.md, "First syncs again"). `None`
    /// where the filesystem or the path does not allow it: the state folder serves then.
    fn anonymous_file(&self, apply: &Apply) -> Option<File> {
        if apply.expect.is_some() || self.no_tmpfile.load(Ordering::Relaxed) {
            return None;
        }
        // Made with the permission bits it is to have, so that finishing it usually needs no
        // chmod (the umask may still take some away; the finish then sets them).
        let mode = match &apply.action {
            Action::Write { meta, .. } => Mode::from_raw_mode(meta.mode & 0o777),
            _ => Mode::from_raw_mode(0o600),
        };
        let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
        // The directory is named in the same call (one path resolution, no descriptor of it).
        let made = match apply.path.parent() {
            Some(dir) => rustix::fs::openat2(&self.root_fd, dir.as_str(), flags, mode, RESOLVE),
            None => rustix::fs::openat(&self.root_fd, c".", flags, mode),
        };
        match made {
            Ok(fd) => Some(File::from(fd)),
            Err(
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL,
            ) => {
                // The filesystem has no O_TMPFILE: not asked again.
                self.no_tmpfile.store(true, Ordering::Relaxed);
                None
            }
            Err(_) => None,
        }
    }

    /// Links the anonymous `file` (see [`Tree::anonymous_file`]) at `name` in `dir`.
    fn link_anonymous(file: &File, dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
        match rustix::fs::linkat(file, c"", dir, name, AtFlags::EMPTY_PATH) {
            // Linking by descriptor needs CAP_DAC_READ_SEARCH; through /proc it does not.
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM) => {
                let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    proc_path.as_str(),
                    dir,
                    name,
                    AtFlags::SYMLINK_FOLLOW,
                )
            }
            other => other,
        }
    }

    /// A new temporary file in the state folder (same filesystem as the tree), with its path.
    pub fn staging_file(&self) -> std::io::Result<(File, PathBuf)> {
        self.new_tmp("s")
    }

    /// A staging file for fetching the content `hash`: if the fetch breaks off (or this node
    /// crashes), what it holds is kept as that content's partial copy for the next fetch.
    pub fn fetch_staging_file(&self, hash: &Hash) -> std::io::Result<(File, PathBuf)> {
        self.new_tmp(&format!("{FETCHING}{}-", hex(hash)))
    }

    /// Whether a fetch into `basis` (the file at the fetched path, of `size` bytes) stages a
    /// patch to write in place (see [`in_place`]).
    pub fn updates_in_place(&self, basis: &File, size: u64) -> bool {
        self.journal.is_some()
            && size >= in_place::IN_PLACE_MIN
            && rustix::fs::fstat(basis).is_ok_and(|st| st.st_nlink == 1)
    }

    /// A staging file for a patch (dropped, not kept as a partial copy, if the fetch breaks
    /// off).
    pub fn patch_staging_file(&self) -> std::io::Result<(File, PathBuf)> {
        self.new_tmp(PATCH)
    }

    /// Keeps what the patch staged at `staged` is, for its apply. Patches whose staging files
    /// are gone are forgotten when the list is full; a patch not kept is dropped (false).
    pub fn remember_patch(&self, staged: &Path, patch: Patch) -> bool {
        let mut patches = self.patches.lock();
        if patches.len() >= in_place::PATCHES_MAX {
            patches.retain(|name, _| {
                rustix::fs::statat(&self.tmp_fd, name.as_os_str(), AtFlags::empty()).is_ok()
            });
        }
        if patches.len() >= in_place::PATCHES_MAX {
            return false;
        }
        let name = staged.file_name().expect("staging files have names");
        patches.insert(name.to_os_string(), patch);
        true
    }

    /// Removes a staged content the engine released.
    pub fn release_staged(&self, staged: &Path) {
        if let Some(name) = staged.file_name() {
            self.patches.lock().remove(name);
        }
        let _ = std::fs::remove_file(staged);
    }

    /// A new file in the temporary folder named `prefix`, this process's id and a counter.
    fn new_tmp(&self, prefix: &str) -> std::io::Result<(File, PathBuf)> {
        let name = format!(
            "{prefix}{}-{}",
            process_id(),
            self.next_tmp.fetch_add(1, Ordering::Relaxed)
        );
        let fd = rustix::fs::openat(
            &self.tmp_fd,
            name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        Ok((File::from(fd), self.tmp_path.join(name)))
    }

    /// The preseed of file `id` of peer `from`, now at `path` there (made if there is none).
    pub fn preseed(
        &self,
        from: rsyncfs_conflict::NodeId,
        id: u64,
        path: &RelPath,
    ) -> std::io::Result<Arc<parking_lot::Mutex<preseed::Preseed>>> {
        self.preseeds
            .entry(from, id, path, || self.new_tmp(PRESEED))
    }

    /// Takes over the preseed `from` sent of `path` (see [`preseed::Preseeds::take`]) as the
    /// staging file of a fetch of content `hash`.
    pub fn take_preseed(
        &self,
        from: &rsyncfs_conflict::NodeId,
        path: &RelPath,
        size: u64,
        hash: &Hash,
    ) -> Option<preseed::Taken> {
        let staged = self.tmp_path.join(format!(
            "{FETCHING}{}-{}-{}",
            hex(hash),
            process_id(),
            self.next_tmp.fetch_add(1, Ordering::Relaxed)
        ));
        self.preseeds.take(from, path, size, staged)
    }

    /// Removes preseeds left unused (see [`preseed::PRESEED_IDLE`]); how many are kept, and
    /// their bytes.
    pub fn sweep_preseeds(&self) -> (usize, u64) {
        self.preseeds.sweep();
        self.preseeds.held()
    }

    /// Opens the regular file at `path` for reading, whatever it holds.
    pub fn open_regular(&self, path: &RelPath) -> Option<File> {
        let (dir, name) = self.parent_of(path).ok()?;
        let fd = rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .ok()?;
        let file = File::from(fd);
        file.metadata().ok().filter(|m| m.is_file())?;
        Some(file)
    }

    /// The partial copy of the content `hash` an earlier fetch left, and its length.
    pub fn partial(&self, hash: &Hash) -> Option<(File, u64)> {
        let file = File::open(self.tmp_path.join(format!("{PARTIAL}{}", hex(hash)))).ok()?;
        let len = file.metadata().ok()?.len();
        Some((file, len))
    }

    /// Keeps the staging file of a fetch that broke off as the partial copy of `hash`, unless
    /// a longer one is kept already.
    pub fn keep_partial(&self, staged: &Path, hash: &Hash) {
        let kept = self.tmp_path.join(format!("{PARTIAL}{}", hex(hash)));
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        if len(staged) > 0 && len(staged) >= len(&kept) && std::fs::rename(staged, &kept).is_ok() {
            return;
        }
        let _ = std::fs::remove_file(staged);
    }

    /// Forgets the partial copy of `hash` (its content arrived whole).
    pub fn drop_partial(&self, hash: &Hash) {
        let _ = std::fs::remove_file(self.tmp_path.join(format!("{PARTIAL}{}", hex(hash))));
    }

    /// Makes the directories above `path` that are missing (a non-directory above it is a
    /// local change the engine has not seen: `Stale`); gives the parent, opened as
    /// [`Tree::parent_of`] opens it, when it was there already (the usual case: one lookup).
    fn make_parents(&self, path: &RelPath) -> Result<Option<OwnedFd>, ApplyError> {
        // The nearest directory above that exists: usually the parent, found with one lookup
        // (a walk from the top costs a path resolution per level, quadratic in deep trees).
        let mut missing: Vec<RelPath> = Vec::new();
        for dir in path.ancestors() {
            match rustix::fs::openat2(
                &self.root_fd,
                dir.as_str(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            ) {
                Ok(fd) if missing.is_empty() => return Ok(Some(fd)),
                Ok(_) => break,
                Err(rustix::io::Errno::NOENT) => missing.push(dir),
                // A file or a symlink above: a local change the engine has not seen.
                Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
                    return Err(ApplyError::Stale)
                }
                Err(e) => return Err(io_error(&dir, e.into())),
            }
        }
        for dir in missing.iter().rev() {
            let (parent, name) = self.parent_of(dir).map_err(|_| ApplyError::Stale)?;
            match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(DIR_MODE_DEFAULT)) {
                Ok(()) => self.touch(dir.parent()),
                Err(rustix::io::Errno::EXIST) => {
                    let st = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| io_error(dir, e.into()))?;
                    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                        return Err(ApplyError::Stale);
                    }
                }
                Err(e) => return Err(io_error(dir, e.into())),
            }
        }
        Ok(None)
    }

    fn touch(&self, dir: Option<RelPath>) {
        let path = match dir {
            Some(d) => self.root.join(d.as_str()),
            None => self.root.clone(),
        };
        self.touched.lock().insert(path);
    }

    /// Files read and hashed by observations since the tree was opened.
    pub fn hashed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// Commits the hash cache's gathered writes: durably with `durable`, as at a clean stop;
    /// otherwise at most once a second.
    pub fn flush_stamps(&self, durable: bool) {
        match &self.stamps {
            Some(s) if durable => s.flush(true),
            Some(s) => s.flush_if_due(),
            None => {}
        }
    }

    /// Makes the directory entries changed since the last call durable (before the store
    /// records what they show).
    pub fn sync_dirs(&self) -> std::io::Result<()> {
        let dirs = std::mem::take(&mut *self.touched.lock());
        for dir in dirs {
            match File::open(&dir) {
                Ok(f) => f.sync_all()?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Carries out one of the engine's applies: [`Tree::prepare`], [`Tree::make_durable`],
    /// [`Tree::commit`].
    pub fn apply(
        &self,
        apply: &Apply,
        staged: Option<&Path>,
        mount: &dyn Mount,
    ) -> Result<(), ApplyError> {
        let prepared = self.prepare(apply, staged)?;
        if let Err(e) = self.make_durable(&[&prepared]) {
            self.discard(apply, prepared);
            return Err(io_error(&apply.path, e));
        }
        self.commit(apply, prepared, mount)
    }

    /// The first step of an apply: new content made ready under a temporary name in the state
    /// folder (not yet durable). `staged` is the file of a [`Source::Staged`] content.
    pub fn prepare(&self, apply: &Apply, staged: Option<&Path>) -> Result<Prepared, ApplyError> {
        let path = &apply.path;
        let io = |e: std::io::Error| io_error(path, e);
        let mut file_out: Option<File> = None;
        let mut patch = None;
        let tmp: Option<std::ffi::OsString> = match &apply.action {
            Action::Write { meta, source } => {
                let Content::File { size, hash } = &meta.content else {
                    return Err(ApplyError::Io(IoFailure::new(
                        IoKind::Other,
                        format!("{path}: write of a non-file"),
                    )));
                };
                Some(match source {
                    Source::Staged(_) => {
                        let staged = staged.ok_or(ApplyError::StagedGone)?;
                        let name = staged.file_name().expect("staging files have names");
                        if name.as_bytes().starts_with(PATCH.as_bytes()) {
                            // Segments for the file in place; its attributes are set there.
                            let known = self.patches.lock().get(name).cloned();
                            patch = Some(known.ok_or(ApplyError::StagedGone)?);
                        }
                        let file = match File::options().read(true).write(true).open(staged) {
                            Ok(f) => f,
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                                return Err(ApplyError::StagedGone)
                            }
                            Err(e) => return Err(io(e)),
                        };
                        if patch.is_none() {
                            finish_file(&file, meta).map_err(io)?;
                        }
                        file_out = Some(file);
                        name.to_os_string()
                    }
                    Source::Inline(bytes) => {
                        if bytes.len() as u64 != *size || blake3::hash(bytes).as_bytes() != hash {
                            return Err(ApplyError::Io(IoFailure::new(
                                IoKind::Other,
                                format!("{path}: inline content does not match"),
                            )));
                        }
                        self.small.lock().put(*hash, bytes.clone(), bytes.len());
                        if let Some(mut file) = self.anonymous_file(apply) {
                            file.write_all(bytes)
                                .and_then(|_| finish_file(&file, meta))
                                .map_err(io)?;
                            return Ok(Prepared {
                                tmp: None,
                                file: Some(file),
                                closed: false,
                                anon: true,
                                patch: None,
                            });
                        }
                        let (mut file, tmp) = self.staging_file().map_err(io)?;
                        let written = file.write_all(bytes).and_then(|_| finish_file(&file, meta));
                        if let Err(e) = written {
                            let _ = std::fs::remove_file(&tmp);
                            return Err(io(e));
                        }
                        file_out = Some(file);
                        tmp.file_name().expect("named").to_os_string()
                    }
                    Source::Local(from) => {
                        let Some(src) = self.open_content(from, hash, *size) else {
                            return Err(ApplyError::Stale);
                        };
                        let (file, tmp) = self.staging_file().map_err(io)?;
                        let copied =
                            copy_all(&src, &file, *size).and_then(|_| finish_file(&file, meta));
                        if let Err(e) = copied {
                            let _ = std::fs::remove_file(&tmp);
                            return Err(io(e));
                        }
                        // The source may have been rewritten since its hash was checked: the
                        // copy is used only if it is the content asked for.
                        let copy = segments::hash_file(&File::open(&tmp).map_err(io)?, *size);
                        match copy {
                            Ok((h, cvs)) if h == *hash => self.remember_cvs(h, cvs.into()),
                            Ok(_) => {
                                let _ = std::fs::remove_file(&tmp);
                                return Err(ApplyError::Stale);
                            }
                            Err(e) => {
                                let _ = std::fs::remove_file(&tmp);
                                return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                                    ApplyError::Stale
                                } else {
                                    io(e)
                                });
                            }
                        }
                        file_out = Some(file);
                        tmp.file_name().expect("named").to_os_string()
                    }
                })
            }
            Action::Symlink { target, owner } => {
                let name = format!(
                    "l{}-{}",
                    process_id(),
                    self.next_tmp.fetch_add(1, Ordering::Relaxed)
                );
                rustix::fs::symlinkat(target.as_str(), &self.tmp_fd, name.as_str())
                    .map_err(|e| io(e.into()))?;
                // A symlink's own owner (lchown), as a root node gives files theirs.
                if let Some((uid, gid)) = *owner {
                    if rustix::process::geteuid().is_root() {
                        rustix::fs::chownat(
                            &self.tmp_fd,
                            name.as_str(),
                            Some(rustix::fs::Uid::from_raw(uid)),
                            Some(rustix::fs::Gid::from_raw(gid)),
                            AtFlags::SYMLINK_NOFOLLOW,
                        )
                        .map_err(|e| io(e.into()))?;
                    }
                }
                Some(name.into())
            }
            _ => None,
        };
        Ok(Prepared {
            tmp,
            file: file_out,
            closed: false,
            anon: false,
            patch,
        })
    }

    /// Makes prepared contents durable: each file's data for one or two, one `syncfs` of the
    /// backing filesystem for more (a group of small files costs one journal commit, not one
    /// each). A patch's name is made durable too: the journal of its update names it.
    pub fn make_durable(&self, prepared: &[&Prepared]) -> std::io::Result<()> {
        let files: Vec<&File> = prepared.iter().filter_map(|p| p.file.as_ref()).collect();
        if files.len() <= 2 && !prepared.iter().any(|p| p.closed) {
            for f in files {
                f.sync_data()?;
            }
            if prepared.iter().any(|p| p.patch.is_some()) {
                rustix::fs::fsync(&self.tmp_fd)?;
            }
            return Ok(());
        }
        rustix::fs::syncfs(&self.tmp_fd)?;
        Ok(())
    }

    /// Drops a prepared content that will not be used (a staged fetch stays: the engine
    /// releases it).
    pub fn discard(&self, apply: &Apply, prepared: Prepared) {
        if let (Some(tmp), None) = (&prepared.tmp, staged_source(apply)) {
            let _ = rustix::fs::unlinkat(&self.tmp_fd, tmp.as_os_str(), AtFlags::empty());
        }
    }

    /// The last step of an apply: inside `mount.exclusive` (no local change through the mount
    /// can run meanwhile), the path is checked against what the engine expects and replaced.
    pub fn commit(
        &self,
        apply: &Apply,
        prepared: Prepared,
        mount: &dyn Mount,
    ) -> Result<(), ApplyError> {
        let tmp = prepared.tmp;
        let patch = prepared.patch.as_ref();
        let anon = prepared.file.as_ref().filter(|_| prepared.anon);
        let mut result = Err(ApplyError::Stale);
        mount.exclusive(&mut || result = self.replace(apply, tmp.as_deref(), patch, anon, mount));
        if let (Ok(()), Some(_), Some(tmp)) = (&result, patch, &tmp) {
            // Written into place: the patch is used up.
            self.patches.lock().remove(tmp);
            let _ = rustix::fs::unlinkat(&self.tmp_fd, tmp.as_os_str(), AtFlags::empty());
        }
        if result.is_err() {
            if let (Some(tmp), None) = (&tmp, staged_source(apply)) {
                let _ = rustix::fs::unlinkat(&self.tmp_fd, tmp.as_os_str(), AtFlags::empty());
            }
        }
        result
    }

    /// The second half of [`Tree::apply`], inside the mount's exclusive section.
    fn replace(
        &self,
        apply: &Apply,
        tmp: Option<&OsStr>,
        patch: Option<&Patch>,
        anon: Option<&File>,
        mount: &dyn Mount,
    ) -> Result<(), ApplyError> {
        let path = &apply.path;
        if mount.busy(path) {
            return Err(ApplyError::Busy);
        }
        let (dir, name) = match self.make_parents(path)? {
            Some(dir) => (dir, OsStr::new(path.name())),
            None => self.parent_of(path).map_err(|_| ApplyError::Stale)?,
        };
        // An anonymous file is linked only where nothing is (the link fails with EEXIST,
        // which is Stale): what the path holds need not be read first.
        let now = if anon.is_some() {
            None
        } else {
            self.observe_at(dir.as_fd(), name, path)
                .map_err(|e| ApplyError::Io(e.failure()))?
        };
        if now != apply.expect {
            return Err(ApplyError::Stale);
        }
        let io = |e: std::io::Error| io_error(path, e);
        // A local file this apply replaces or removes is kept first, where versions are kept.
        let replaced = now
            .as_ref()
            .is_some_and(|m| matches!(m.content, Content::File { .. }));
        if let (Some(versions), true) = (&self.versions, replaced) {
            if !matches!(apply.action, Action::SetAttr { .. }) {
                let in_place = patch.is_some() && matches!(apply.action, Action::Write { .. });
                if let Err(e) = versions.keep(dir.as_fd(), name, path, in_place) {
                    tracing::warn!("{path}: the content this update replaces was not kept: {e}");
                }
            }
        }
        match &apply.action {
            Action::Write { meta, .. } => {
                match (patch, anon) {
                    // Made for a path that held nothing, as it still does (checked above).
                    (_, Some(file)) => match Self::link_anonymous(file, dir.as_fd(), name) {
                        Ok(()) => {}
                        Err(rustix::io::Errno::EXIST) => return Err(ApplyError::Stale),
                        Err(e) => return Err(io(e.into())),
                    },
                    (Some(patch), None) => self.patch_in_place(
                        dir.as_fd(),
                        name,
                        path,
                        tmp.expect("a patch is staged"),
                        patch,
                        meta,
                        now.as_ref(),
                    )?,
                    (None, None) => self
                        .replace_with(
                            dir.as_fd(),
                            name,
                            tmp.expect("a write has its content ready"),
                            now.as_ref(),
                        )
                        .map_err(io)?,
                }
                let placed = match anon {
                    // The same inode, without a lookup of the name.
                    Some(file) => rustix::fs::fstat(file),
                    None => rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW),
                };
                if let (Ok(st), Some((hash, _))) = (placed, meta.file_hash()) {
                    // Its attributes are not known as read here (a default ACL of the
                    // directory, say): the next observation reads them.
                    let seen = Seen { hash, bare: false };
                    self.remember(Stamp::of(&st), seen);
                    if let Some(s) = &self.stamps {
                        s.put(path, Stamp::of(&st), seen);
                    }
                }
            }
            Action::Symlink { .. } => {
                let tmp = tmp.expect("a symlink is ready");
                self.replace_with(dir.as_fd(), name, tmp, now.as_ref())
                    .map_err(io)?;
            }
            Action::SetAttr { meta } => {
                set_attrs_at(dir.as_fd(), name, meta).map_err(io)?;
            }
            Action::Mkdir { meta } => {
                let mode = Mode::from_raw_mode(meta.mode & 0o7777);
                match &now {
                    Some(m) if m.is_dir() => {}
                    Some(_) => {
                        rustix::fs::unlinkat(&dir, name, AtFlags::empty())
                            .map_err(|e| io(e.into()))?;
                        rustix::fs::mkdirat(&dir, name, mode).map_err(|e| io(e.into()))?;
                    }
                    None => {
                        rustix::fs::mkdirat(&dir, name, mode).map_err(|e| io(e.into()))?;
                    }
                }
                set_attrs_at(dir.as_fd(), name, meta).map_err(io)?;
            }
            Action::Remove => {
                if let Some(s) = &self.stamps {
                    s.forget(path);
                }
                let flags = if now.as_ref().is_some_and(Meta::is_dir) {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                match rustix::fs::unlinkat(&dir, name, flags) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST) => {
                        return Err(ApplyError::Stale)
                    }
                    Err(e) => return Err(io(e.into())),
                }
            }
        }
        self.touch(path.parent());
        Ok(())
    }

    /// Writes the segments of `patch` (staged as `tmp`) into the file `name` in `dir`, which
    /// holds `now`, under the journal (see [`in_place`]).
    #[allow(clippy::too_many_arguments)]
    fn patch_in_place(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &RelPath,
        tmp: &OsStr,
        patch: &Patch,
        meta: &Meta,
        now: Option<&Meta>,
    ) -> Result<(), ApplyError> {
        let io = |e: std::io::Error| io_error(path, e);
        // A patch of another content than the one here is of no use: the engine fetches again
        // (with what is here as the basis).
        let Some(journal) = &self.journal else {
            return Err(ApplyError::StagedGone);
        };
        if now.and_then(Meta::file_hash) != Some(patch.basis) {
            return Err(ApplyError::StagedGone);
        }
        let target = File::from(
            rustix::fs::openat(
                dir,
                name,
                OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io(e.into()))?,
        );
        let st = rustix::fs::fstat(&target).map_err(|e| io(e.into()))?;
        // A hard link elsewhere would change too (and a fetch now copies it whole).
        if st.st_nlink != 1 {
            return Err(ApplyError::StagedGone);
        }
        let staged = File::from(
            rustix::fs::openat(
                &self.tmp_fd,
                tmp,
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|_| ApplyError::StagedGone)?,
        );
        let record = Record {
            path: path.to_string(),
            dev: st.st_dev,
            ino: st.st_ino,
            staged: tmp.to_string_lossy().into_owned(),
            size: patch.size,
            segments: patch.segments.clone(),
            meta: meta.clone(),
        };
        let started = std::time::Instant::now();
        in_place::reserve(&target, &record).map_err(io)?;
        let mut journal = journal.lock();
        if let Err(e) = journal.write(&record) {
            // Nothing was written into the file; but a record that reached the disk would be
            // done at the next start, over whatever the file holds by then.
            if let Err(again) = journal.clear() {
                tracing::error!(
                    "{path}: the journal of updates in place cannot be written ({e}) or \
                     cleared ({again}): stopping, so that no record is done over a later write"
                );
                std::process::abort();
            }
            return Err(io(e));
        }
        let mut write = || -> std::io::Result<()> {
            in_place::redo(&target, &staged, &record)?;
            set_attrs_at(dir, name, meta)?;
            target.sync_all()?;
            journal.clear()
        };
        if let Err(e) = write() {
            // The file may hold parts of both versions now (or the journal, a record that must
            // not be done again over a later write), and nothing may see it so: once more,
            // then a stop, so that the next start finishes it from the journal.
            tracing::error!("{path}: updating in place: {e}; trying once more");
            if let Err(e) = write() {
                tracing::error!(
                    "{path}: updating in place failed twice ({e}): stopping, so that the next \
                     start finishes it from the journal before anything reads the file"
                );
                std::process::abort();
            }
        }
        tracing::debug!(
            "{path}: {} segments written in place in {:?}",
            record.segments.len(),
            started.elapsed()
        );
        Ok(())
    }

    /// Renames the temporary `tmp_name` over `name` in `dir`; an (empty) directory there is
    /// removed first.
    fn replace_with(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        tmp_name: &OsStr,
        now: Option<&Meta>,
    ) -> std::io::Result<()> {
        if now.is_some_and(Meta::is_dir) {
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
        }
        rustix::fs::renameat(&self.tmp_fd, tmp_name, dir, name)?;
        Ok(())
    }
}

/// This process's id, in the names of its temporary files (asked of the kernel once).
fn process_id() -> u32 {
    static ID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ID.get_or_init(std::process::id)
}

fn io_error(path: &RelPath, e: std::io::Error) -> ApplyError {
    ApplyError::Io(io_failure(path.as_str(), &e))
}

/// A local I/O error as the engine classifies it.
pub fn io_failure(what: &str, e: &std::io::Error) -> IoFailure {
    let kind = match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => IoKind::NoSpace,
        Some(libc::EACCES | libc::EPERM) => IoKind::Permission,
        Some(libc::EROFS) => IoKind::ReadOnly,
        Some(libc::EIO) => IoKind::Device,
        _ => IoKind::Other,
    };
    IoFailure::new(kind, format!("{what}: {e}"))
}

/// Copies `size` bytes (the kernel may share blocks where the filesystem can).
fn copy_all(src: &File, dst: &File, size: u64) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < size {
        let n = rustix::fs::copy_file_range(src, None, dst, None, (size - done) as usize)?;
        if n == 0 {
            return Err(std::io::Error::other("source file shrank while copying"));
        }
        done += n as u64;
    }
    Ok(())
}

/// A relative path from the tree as the engine names it; `None` for names that are not UTF-8
/// or not allowed (they are not replicated).
pub fn rel_path(path: &Path) -> Option<RelPath> {
    let s = std::str::from_utf8(path.as_os_str().as_bytes()).ok()?;
    RelPath::new(s.to_string()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_large_file_observed_keeps_its_cvs_and_a_write_to_it_is_seen_by_its_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        let size = 2 * segments::SEGMENT + 5;
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("big"), &data).unwrap();
        let path = RelPath::new("big").unwrap();
        let meta = tree.observe(&path).unwrap().unwrap();
        let (hash, _) = meta.file_hash().unwrap();
        assert_eq!(hash, *blake3::hash(&data).as_bytes());
        let cvs = tree
            .cvs(&hash)
            .expect("the CVs of a file of three segments are kept");
        assert_eq!(cvs.len(), 3);
        assert_eq!(segments::root(&cvs), hash);

        let file = tree.open_content(&path, &hash, size).unwrap();
        assert!(tree.still_holds(&file, &hash));
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("big"))
            .unwrap()
            .write_all_at(b"x", 7)
            .unwrap();
        assert!(
            !tree.still_holds(&file, &hash),
            "a write in place changes the stamp"
        );
    }

    /// Attributes are seen whether their names fit the first, small list buffer or not.
    #[test]
    fn an_observation_sees_every_extended_attribute() {
        let dir = tempfile::tempdir().unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        for (file, count) in [("few", 3usize), ("many", 40)] {
            let p = dir.path().join(file);
            std::fs::write(&p, "x").unwrap();
            for k in 0..count {
                let name = format!("user.{}{k:03}", "n".repeat(36));
                let name = std::ffi::CString::new(name).unwrap();
                rustix::fs::setxattr(&p, name.as_c_str(), b"v", rustix::fs::XattrFlags::empty())
                    .unwrap();
            }
            let meta = tree.observe(&RelPath::new(file).unwrap()).unwrap().unwrap();
            assert_eq!(meta.xattrs.len(), count, "{file}");
        }
    }

    #[test]
    fn a_reopened_tree_reads_no_unchanged_file_and_rereads_a_changed_one() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<RelPath> = (0..20)
            .map(|i| RelPath::new(format!("f{i}")).unwrap())
            .collect();
        for (i, p) in paths.iter().enumerate() {
            std::fs::write(dir.path().join(p.as_str()), format!("content {i}")).unwrap();
        }
        let before: Vec<_> = {
            let tree = Tree::open(dir.path()).unwrap();
            let metas = paths.iter().map(|p| tree.observe(p).unwrap()).collect();
            assert_eq!(tree.hashed(), 20);
            tree.flush_stamps(true);
            metas
        };
        std::fs::write(dir.path().join("f3"), "changed").unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        let after: Vec<_> = paths.iter().map(|p| tree.observe(p).unwrap()).collect();
        assert_eq!(tree.hashed(), 1, "only the changed file is read again");
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            assert_eq!(b == a, i != 3, "f{i}");
        }
        assert_eq!(
            after[3].as_ref().unwrap().file_hash().unwrap().0,
            *blake3::hash(b"changed").as_bytes()
        );
    }

    /// A crash after the journal's record was synced, with the file half written: the next
    /// open finishes the update before anything reads the tree, and clears the record.
    #[test]
    fn an_update_in_place_cut_short_is_finished_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        if tree.journal.is_none() {
            println!("this filesystem shares blocks between copies: nothing is updated in place");
            return;
        }
        let seg = segments::SEGMENT as usize;
        let old: Vec<u8> = (0..3 * seg + 77).map(|i| (i % 253) as u8).collect();
        let mut new = old.clone();
        new[seg + 1..seg + 9000].fill(1);
        new[2 * seg + 3..].fill(2);
        new.extend_from_slice(&[3u8; 5000]);
        let target = dir.path().join("big");
        std::fs::write(&target, &old).unwrap();
        let (staged, staged_path) = tree.patch_staging_file().unwrap();
        for i in [1usize, 2, 3] {
            staged
                .write_all_at(
                    &new[i * seg..((i + 1) * seg).min(new.len())],
                    (i * seg) as u64,
                )
                .unwrap();
        }
        let st = rustix::fs::stat(&target).unwrap();
        let meta = Meta::file(
            new.len() as u64,
            *blake3::hash(&new).as_bytes(),
            0o600,
            1_600_000_000_000_000_007,
        );
        let record = Record {
            path: "big".into(),
            dev: st.st_dev,
            ino: st.st_ino,
            staged: staged_path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            size: new.len() as u64,
            segments: vec![1, 2, 3],
            meta: meta.clone(),
        };
        tree.journal
            .as_ref()
            .unwrap()
            .lock()
            .write(&record)
            .unwrap();
        // Half of segment 1 written, then the crash.
        let f = File::options().write(true).open(&target).unwrap();
        f.write_all_at(&new[seg..seg + seg / 2], seg as u64)
            .unwrap();
        drop((f, tree));

        let tree = Tree::open(dir.path()).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), new);
        let mut seen = tree
            .observe(&RelPath::new("big").unwrap())
            .unwrap()
            .unwrap();
        seen.owner = None;
        assert_eq!(seen, meta);
        assert!(
            !staged_path.exists(),
            "the patch is gone with the temporary folder"
        );
        assert_eq!(tree.journal.as_ref().unwrap().lock().read(), Ok(None));
        drop(tree);
        // Cleared: a later write is not undone at the next open.
        std::fs::write(&target, b"later").unwrap();
        let _tree = Tree::open(dir.path()).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"later");
    }

    /// A record cut short or torn by a crash (its update never began) is ignored.
    #[test]
    fn a_torn_journal_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let (mut journal, none) = Journal::open(&state).unwrap();
        assert!(none.is_none());
        let record = Record {
            path: "x".into(),
            dev: 1,
            ino: 2,
            staged: "d-1-2".into(),
            size: 3,
            segments: vec![0],
            meta: Meta::file(3, [0; 32], 0o644, 0),
        };
        journal.write(&record).unwrap();
        drop(journal);
        let (journal, read) = Journal::open(&state).unwrap();
        assert_eq!(read.as_ref(), Some(&record));
        drop(journal);
        let path = state.join("in-place.journal");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(Journal::open(&state).unwrap().1.is_none(), "a torn record");
        bytes.truncate(40);
        std::fs::write(&path, &bytes).unwrap();
        assert!(
            Journal::open(&state).unwrap().1.is_none(),
            "a record cut short"
        );
    }
}
