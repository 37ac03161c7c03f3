//! The passthrough filesystem: every operation is done on the backing directory with the `*at`
//! system calls on the inodes' `O_PATH` descriptors, and every change is reported.

use crate::inodes::{Inodes, ROOT};
use crate::{Change, ChangeKind, STATE_DIR_NAME};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow,
};
use parking_lot::Mutex;
use rustix::fs::{AtFlags, Mode as FileMode, OFlags, Stat, CWD};
use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache entries and attributes. Every change through the mount is
/// seen by the kernel, and the node invalidates explicitly after it changes the backing
/// directory underneath; only a program writing to the backing directory directly, behind both,
/// would be seen late (the node's rescan finds such changes).
const TTL: Duration = Duration::from_secs(60);
/// Largest write request the kernel may send (ordinary FUSE I/O).
const MAX_WRITE: u32 = 1 << 20;

/// Whether the mount takes local writes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    ReadWrite,
    /// Every write through the mount fails with EROFS.
    ReceiveOnly,
}

/// Who a new entry belongs to: the calling process, as on a local filesystem. The daemon creates
/// as root and hands the entry over; in a set-group-ID directory the group stays the directory's,
/// as the backing filesystem set it.
#[derive(Copy, Clone)]
struct Owner {
    uid: u32,
    gid: u32,
    /// Permission bits to set again after the chown, which clears set-ID bits.
    mode: u32,
}

impl Owner {
    fn of(req: &Request, mode: u32) -> Owner {
        Owner {
            uid: req.uid(),
            gid: req.gid(),
            mode,
        }
    }

    fn give(self, dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
        // The daemon's own ids do not change while it runs: asked once, not per create.
        static OURS: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
        let (euid, egid) = *OURS.get_or_init(|| {
            (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            )
        });
        if self.uid == euid && self.gid == egid {
            return Ok(());
        }
        let dir_st = rustix::fs::statat(dir, c"", AtFlags::EMPTY_PATH)?;
        let gid = if dir_st.st_mode & libc::S_ISGID != 0 {
            None
        } else {
            Some(rustix::fs::Gid::from_raw(self.gid))
        };
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(self.uid)),
            gid,
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if self.mode & 0o6000 != 0 {
            rustix::fs::chmodat(
                dir,
                name,
                FileMode::from_raw_mode(self.mode),
                AtFlags::empty(),
            )?;
        }
        Ok(())
    }
}

/// ctime (seconds, nanoseconds) and size: moves with every write.
type Fingerprint = (i64, i64, u64);

fn fingerprint(st: &Stat) -> Fingerprint {
    (st.st_ctime, st.st_ctime_nsec as i64, st.st_size as u64)
}

/// An open directory.
struct DirHandle {
    ino: u64,
    /// Opened with FOPEN_CACHE_DIR: the kernel adds what this handle reads to its cache.
    cache: bool,
    /// Read at the handle's first readdir.
    listing: Option<Arc<Listing>>,
}

/// What the daemon knows of a directory's listing cache in the kernel (see [`Shared::listing`]).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Listed {
    /// Every listing served since the record was made had this fingerprint.
    before: Fingerprint,
    /// One of them was read, from the start, by the only caching handle then open: the
    /// kernel's cache holds that listing, or part of it, and nothing else.
    cached: bool,
}

/// A directory as read at a handle's first readdir.
struct Listing {
    /// The directory's fingerprint just before it was read.
    before: Fingerprint,
    /// (backing inode, kind, name); readdir offsets index them.
    entries: Vec<(u64, FileType, OsString)>,
}

/// Directories whose last listing is remembered (see [`Shared::listed`]); past this the record
/// starts again, which costs listings served from the kernel's cache, never a stale one.
const LISTED_MAX: usize = 65_536;
/// A directory changed less than this long before it was read is not trusted to show its next
/// change in its ctime: a filesystem with coarse timestamps could give that change the same one.
const LISTED_SETTLED: Duration = Duration::from_millis(50);

/// An open file.
struct Handle {
    file: File,
    id: u64,
    writable: bool,
    /// ctime and size when opened or last reported, to tell whether the file changed since.
    before: Mutex<Fingerprint>,
    opened: std::time::Instant,
    /// The file's size when this handle was opened (0 for a file it made or truncated).
    opened_size: u64,
    /// Keeps the kernel's passthrough mapping of the inode alive until release.
    _backing: Option<Arc<BackingId>>,
}

/// State shared by the filesystem's worker threads and the [`crate::Mounted`] handle.
pub(crate) struct Shared {
    root: PathBuf,
    inodes: Inodes,
    mode: Mode,
    passthrough: AtomicBool,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    /// The kernel maps one backing file per inode: every open of the inode shares it.
    backings: Mutex<HashMap<u64, std::sync::Weak<BackingId>>>,
    /// Open directory handles, with their entries once the kernel asked for them.
    dirs: Mutex<HashMap<u64, DirHandle>>,
    /// Directories listed since they last changed, and whether the kernel caches that listing:
    /// an opendir that finds the directory unchanged lets the kernel fill its cache
    /// (FOPEN_CACHE_DIR), or keep and serve it (FOPEN_KEEP_CACHE). See [`Shared::listing`].
    listed: Mutex<HashMap<u64, Listed>>,
    /// Backing directories read for the kernel, counted.
    dir_reads: AtomicU64,
    next_fh: AtomicU64,
    writers: Mutex<HashMap<u64, u32>>,
    /// An open handle of each inode that has one (the last opened): its descriptor answers
    /// getxattr directly, where the inode's own `O_PATH` descriptor needs a walk through /proc
    /// (the kernel asks for security.capability before the first write of every new file).
    open_files: Mutex<HashMap<u64, std::sync::Weak<Handle>>>,
    /// Inodes created or truncated through a handle still open for writing: reported when their
    /// last writer closes them (or by the periodic report of dirty files), not before, so that
    /// peers never see a half-made file.
    unreported: Mutex<std::collections::HashSet<u64>>,
    changes: SyncSender<Change>,
    overflowed: AtomicBool,
    /// Held shared by every operation that changes the tree through the mount, and exclusively
    /// by [`Shared::exclusive`]: the node's check-then-replace of a remote update cannot
    /// interleave with a local change.
    gate: parking_lot::RwLock<()>,
}

/// The filesystem fuser runs.
pub struct LoggerFs {
    shared: Arc<Shared>,
    /// Whether to ask the kernel for FUSE over io_uring in the handshake.
    uring: bool,
}

/// Answers getxattr and listxattr: with a size of zero the caller asks how big the value is.
fn reply_xattr(result: Result<(usize, Vec<u8>), Errno>, size: u32, reply: ReplyXattr) {
    match result {
        Ok((n, _)) if size == 0 => reply.size(n as u32),
        Ok((_, data)) => reply.data(&data),
        Err(e) => reply.error(e),
    }
}

/// Reads an extended attribute's value (or a list of names) into a buffer of the size the
/// caller asked for (zero: only the size is wanted).
fn read_xattr(
    size: u32,
    read: impl FnOnce(&mut [u8]) -> rustix::io::Result<usize>,
) -> Result<(usize, Vec<u8>), Errno> {
    let mut buf = vec![0u8; size as usize];
    let n = read(&mut buf[..]).map_err(errno)?;
    buf.truncate(n);
    Ok((n, buf))
}

fn errno(e: impl Into<std::io::Error>) -> Errno {
    Errno::from(e.into())
}

fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

fn stat_fd(fd: BorrowedFd<'_>) -> rustix::io::Result<Stat> {
    rustix::fs::statat(fd, c"", AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW)
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0) + Duration::from_nanos(nsec as u64)
    }
}

fn attr(id: u64, st: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec as i64),
        mtime: time(st.st_mtime, st.st_mtime_nsec as i64),
        ctime: time(st.st_ctime, st.st_ctime_nsec as i64),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

impl Shared {
    fn emit(&self, path: PathBuf, kind: ChangeKind) {
        if self.overflowed.load(Ordering::Relaxed) {
            let overflow = Change {
                path: PathBuf::new(),
                kind: ChangeKind::Overflow,
            };
            if self.changes.try_send(overflow).is_ok() {
                self.overflowed.store(false, Ordering::Relaxed);
            } else {
                return;
            }
        }
        match self.changes.try_send(Change { path, kind }) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => self.overflowed.store(true, Ordering::Relaxed),
        }
    }

    /// The path of an inode relative to the mount, from the kernel's own record of where its
    /// descriptor points. None for an unlinked inode.
    fn path_of(&self, id: u64) -> Option<PathBuf> {
        if id == ROOT {
            return Some(PathBuf::new());
        }
        let inode = self.inodes.get(id).ok()?;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", inode.fd().as_raw_fd())).ok()?;
        let rel = link.strip_prefix(&self.root).ok()?.to_path_buf();
        if rel.as_os_str().as_bytes().ends_with(b" (deleted)") {
            return None;
        }
        Some(rel)
    }

    fn child_path(&self, parent: u64, name: &OsStr) -> Option<PathBuf> {
        self.path_of(parent).map(|p| p.join(name))
    }

    fn hidden(&self, parent: u64, name: &OsStr) -> bool {
        parent == ROOT && name.as_bytes() == STATE_DIR_NAME.as_bytes()
    }

    /// Reports files that are open for writing and changed since their last report, so that a
    /// file a process keeps open (a log, a database) still replicates. Called periodically.
    pub(crate) fn report_dirty_open_files(&self) {
        let handles: Vec<Arc<Handle>> = self
            .handles
            .lock()
            .values()
            .filter(|h| h.writable && h.opened.elapsed() >= crate::HELD_OPEN_MIN)
            .cloned()
            .collect();
        let mut reported = std::collections::HashSet::new();
        for h in handles {
            let Ok(st) = stat_fd(h.file.as_fd()) else {
                continue;
            };
            let now = fingerprint(&st);
            let changed = {
                let mut before = h.before.lock();
                let changed = *before != now;
                *before = now;
                changed
            };
            if changed && reported.insert(h.id) {
                self.unreported.lock().remove(&h.id);
                if let Some(p) = self.path_of(h.id) {
                    self.emit(p, ChangeKind::Written);
                }
            }
        }
    }

    /// Files open for writing now (each once, at most `max`).
    pub(crate) fn being_written(&self, max: usize) -> Vec<crate::BeingWritten> {
        if self.writers.lock().is_empty() {
            return Vec::new();
        }
        let handles: Vec<Arc<Handle>> = self
            .handles
            .lock()
            .values()
            .filter(|h| h.writable)
            .cloned()
            .collect();
        let mut out: Vec<crate::BeingWritten> = Vec::new();
        for h in handles {
            if let Some(w) = out.iter_mut().find(|w| w.id == h.id) {
                w.size_at_open = w.size_at_open.min(h.opened_size);
                continue;
            }
            if out.len() >= max {
                continue;
            }
            let (Ok(st), Some(path)) = (stat_fd(h.file.as_fd()), self.path_of(h.id)) else {
                continue;
            };
            out.push(crate::BeingWritten {
                id: h.id,
                path,
                size: st.st_size as u64,
                size_at_open: h.opened_size,
            });
        }
        out
    }

    pub(crate) fn inode_descriptors(&self) -> usize {
        self.inodes.descriptors()
    }

    pub(crate) fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    pub(crate) fn is_open_for_writing(&self, path: &Path) -> bool {
        // Mostly no file is open for writing: then no lookup of the path is needed.
        if self.writers.lock().is_empty() {
            return false;
        }
        let Ok(st) = rustix::fs::statat(
            self.inodes.get(ROOT).expect("root").fd(),
            path,
            AtFlags::SYMLINK_NOFOLLOW,
        ) else {
            return false;
        };
        let Some(id) = self.inodes.id_of(st.st_dev, st.st_ino) else {
            return false;
        };
        self.writers.lock().get(&id).is_some_and(|&n| n > 0)
    }

    /// Runs `f` while no operation that changes the tree through the mount is in progress, and
    /// none starts.
    pub(crate) fn exclusive<R>(&self, f: impl FnOnce() -> R) -> R {
        let _gate = self.gate.write();
        f()
    }

    /// Closes the descriptors of inodes the kernel forgot.
    pub(crate) fn reap_forgotten(&self) {
        self.inodes.reap();
    }

    pub(crate) fn invalidate(&self, notifier: &fuser::Notifier, path: &Path) {
        let root = self.inodes.get(ROOT).expect("root");
        if let Ok(st) = rustix::fs::statat(root.fd(), path, AtFlags::SYMLINK_NOFOLLOW) {
            if let Some(id) = self.inodes.id_of(st.st_dev, st.st_ino) {
                let _ = notifier.inval_inode(INodeNo(id), 0, 0);
            }
        }
        let parent = path.parent().unwrap_or(Path::new(""));
        let parent_id = if parent.as_os_str().is_empty() {
            Some(ROOT)
        } else {
            rustix::fs::statat(root.fd(), parent, AtFlags::SYMLINK_NOFOLLOW)
                .ok()
                .and_then(|st| self.inodes.id_of(st.st_dev, st.st_ino))
        };
        if let (Some(parent_id), Some(name)) = (parent_id, path.file_name()) {
            let _ = notifier.inval_entry(INodeNo(parent_id), name);
        }
    }

    /// Looks `name` up in `parent` and makes it known to the kernel.
    fn lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        if self.hidden(parent, name) {
            return Err(Errno::ENOENT);
        }
        let dir = self.inodes.get(parent).map_err(errno)?;
        let fd = rustix::fs::openat(
            dir.fd(),
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            FileMode::empty(),
        )
        .map_err(errno)?;
        let st = stat_fd(fd.as_fd()).map_err(errno)?;
        let id = self.inodes.remember(fd, st.st_dev, st.st_ino);
        Ok(attr(id, &st))
    }

    fn writable(&self) -> Result<(), Errno> {
        match self.mode {
            Mode::ReadWrite => Ok(()),
            Mode::ReceiveOnly => Err(Errno::EROFS),
        }
    }

    fn new_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed) + 1;
        if handle.writable {
            *self.writers.lock().entry(handle.id).or_insert(0) += 1;
        }
        self.inodes.opened(handle.id);
        let handle = Arc::new(handle);
        self.open_files
            .lock()
            .insert(handle.id, Arc::downgrade(&handle));
        self.handles.lock().insert(fh, handle);
        fh
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// The listing of directory `ino` for its open handle `fh`, read at the handle's first
    /// readdir (at `offset`) and kept for the rest.
    ///
    /// The kernel appends every readdir reply that continues its cache to it, whichever caching
    /// handle it came from, so a directory's record ([`Shared::listed`]) stands only while every
    /// reply agrees with it: a reply from a listing with another fingerprint drops it, and so does
    /// a fresh listing that continues a cached part (offset > 0) unless it has the recorded
    /// fingerprint. Only a listing read from the start, once the directory has settled, makes a
    /// record, and it says the kernel caches it only when its handle was the one caching handle
    /// open (two caching readers of a directory that changed between them could interleave their
    /// replies in the cache).
    fn listing(&self, ino: u64, fh: u64, offset: u64) -> Result<Arc<Listing>, Errno> {
        let (cache, known) = match self.dirs.lock().get(&fh) {
            None => return Err(Errno::EBADF),
            Some(d) => (d.cache, d.listing.clone()),
        };
        let (listing, fresh) = match known {
            Some(listing) => (listing, false),
            None => (Arc::new(self.read_dir(ino)?), true),
        };
        let mut listed = self.listed.lock();
        let agrees = listed
            .get(&ino)
            .copied()
            .filter(|r| r.before == listing.before);
        if fresh && offset == 0 && settled(&listing.before) {
            let alone = || {
                let dirs = self.dirs.lock();
                dirs.values().filter(|d| d.ino == ino && d.cache).count() == 1
            };
            let cached = (cache && alone()) || agrees.is_some_and(|r| r.cached);
            if listed.len() >= LISTED_MAX {
                listed.clear();
            }
            listed.insert(
                ino,
                Listed {
                    before: listing.before,
                    cached,
                },
            );
        } else if agrees.is_none() {
            listed.remove(&ino);
        }
        drop(listed);
        if fresh {
            if let Some(d) = self.dirs.lock().get_mut(&fh) {
                d.listing = Some(Arc::clone(&listing));
            }
        }
        Ok(listing)
    }

    pub(crate) fn directory_reads(&self) -> u64 {
        self.dir_reads.load(Ordering::Relaxed)
    }

    /// Reads a backing directory whole, with its fingerprint just before.
    fn read_dir(&self, ino: u64) -> Result<Listing, Errno> {
        self.dir_reads.fetch_add(1, Ordering::Relaxed);
        let inode = self.inodes.get(ino).map_err(errno)?;
        let fd = rustix::fs::openat(
            inode.fd(),
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            FileMode::empty(),
        )
        .map_err(errno)?;
        let before = stat_fd(fd.as_fd()).map_err(errno)?;
        // One large buffer: a directory of 10,000 entries in a dozen system calls.
        let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); READDIR_BUFFER_BYTES];
        let mut dir = rustix::fs::RawDir::new(&fd, &mut buf);
        let mut entries = Vec::new();
        while let Some(entry) = dir.next() {
            let entry = entry.map_err(errno)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
            if ino == ROOT && name.as_bytes() == STATE_DIR_NAME.as_bytes() {
                continue;
            }
            let kind = match entry.file_type() {
                rustix::fs::FileType::Directory => FileType::Directory,
                rustix::fs::FileType::Symlink => FileType::Symlink,
                rustix::fs::FileType::Fifo => FileType::NamedPipe,
                rustix::fs::FileType::Socket => FileType::Socket,
                rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
                rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
                _ => FileType::RegularFile,
            };
            entries.push((entry.ino(), kind, name));
        }
        Ok(Listing {
            before: fingerprint(&before),
            entries,
        })
    }
}

/// Whether a fingerprint's ctime lies at least [`LISTED_SETTLED`] in the past.
fn settled(f: &Fingerprint) -> bool {
    SystemTime::now()
        .duration_since(time(f.0, f.1))
        .is_ok_and(|age| age >= LISTED_SETTLED)
}

/// Bytes read from a backing directory per system call when a directory is read.
const READDIR_BUFFER_BYTES: usize = 256 * 1024;

/// Open flags the reopen through /proc must not see: the kernel resolved the path and handled
/// creation already, and O_NOFOLLOW would refuse the /proc magic link itself.
fn backing_flags(flags: i32) -> OFlags {
    let drop = libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW;
    OFlags::from_bits_retain((flags & !drop) as u32) | OFlags::CLOEXEC
}

impl LoggerFs {
    pub(crate) fn new(
        backing: &Path,
        mode: Mode,
        changes: SyncSender<Change>,
        uring: bool,
    ) -> std::io::Result<(LoggerFs, Arc<Shared>)> {
        let root_fd = rustix::fs::open(
            backing,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            FileMode::empty(),
        )?;
        let st = stat_fd(root_fd.as_fd())?;
        // The kernel applied the caller's umask already; ours must not apply it again.
        rustix::process::umask(FileMode::empty());
        let shared = Arc::new(Shared {
            root: backing.to_path_buf(),
            inodes: Inodes::new(root_fd, st.st_dev, st.st_ino),
            mode,
            passthrough: AtomicBool::new(false),
            handles: Mutex::new(HashMap::new()),
            backings: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            listed: Mutex::new(HashMap::new()),
            dir_reads: AtomicU64::new(0),
            next_fh: AtomicU64::new(0),
            writers: Mutex::new(HashMap::new()),
            open_files: Mutex::new(HashMap::new()),
            unreported: Mutex::new(std::collections::HashSet::new()),
            changes,
            overflowed: AtomicBool::new(false),
            gate: parking_lot::RwLock::new(()),
        });
        Ok((
            LoggerFs {
                shared: Arc::clone(&shared),
                uring,
            },
            shared,
        ))
    }

    fn inode(&self, id: INodeNo) -> Result<crate::inodes::Inode, Errno> {
        self.shared.inodes.get(id.0).map_err(errno)
    }

    fn entry_reply(&self, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self.shared.lookup(parent, name) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    /// Opens an inode's file as a real descriptor.
    fn reopen(&self, id: u64, flags: i32) -> Result<File, Errno> {
        let inode = self.shared.inodes.get(id).map_err(errno)?;
        let fd = rustix::fs::open(
            proc_path(inode.fd()).as_c_str(),
            backing_flags(flags),
            FileMode::empty(),
        )
        .map_err(errno)?;
        Ok(File::from(fd))
    }

    fn open_handle(&self, id: u64, file: File, flags: i32) -> Result<Handle, Errno> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let st = stat_fd(file.as_fd()).map_err(errno)?;
        Ok(Handle {
            file,
            id,
            writable,
            before: Mutex::new(fingerprint(&st)),
            opened: std::time::Instant::now(),
            opened_size: st.st_size as u64,
            _backing: None,
        })
    }
}

impl LoggerFs {
    /// The inode's passthrough backing, shared by all its open files. The backing file is
    /// opened read-write where it can be, so that a later writer can use it too; the kernel
    /// checks each open's own mode.
    fn backing_for(
        &self,
        id: u64,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> std::io::Result<Arc<BackingId>> {
        let mut backings = self.shared.backings.lock();
        if let Some(b) = backings.get(&id).and_then(std::sync::Weak::upgrade) {
            return Ok(b);
        }
        let file = self
            .reopen(id, libc::O_RDWR)
            .or_else(|_| self.reopen(id, libc::O_RDONLY))
            .map_err(|e| std::io::Error::from_raw_os_error(i32::from(e)))?;
        let backing = Arc::new(register(file.as_fd())?);
        backings.retain(|_, w| w.strong_count() > 0);
        backings.insert(id, Arc::downgrade(&backing));
        Ok(backing)
    }

    /// Like [`LoggerFs::backing_for`], but a freshly created file's own read-write descriptor
    /// becomes the backing when the inode has none yet, saving a reopen.
    fn backing_for_new(
        &self,
        id: u64,
        own: Option<BorrowedFd<'_>>,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> std::io::Result<Arc<BackingId>> {
        let Some(fd) = own else {
            return self.backing_for(id, register);
        };
        let mut backings = self.shared.backings.lock();
        if let Some(b) = backings.get(&id).and_then(std::sync::Weak::upgrade) {
            return Ok(b);
        }
        let backing = Arc::new(register(fd)?);
        backings.retain(|_, w| w.strong_count() > 0);
        backings.insert(id, Arc::downgrade(&backing));
        Ok(backing)
    }

    /// Whether the inode is a symlink: its extended attributes are not reachable through the
    /// descriptor's /proc path, which would follow it.
    fn is_symlink(&self, inode: &crate::inodes::Inode) -> bool {
        stat_fd(inode.fd()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
    }
}

impl Filesystem for LoggerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let _ = config.add_capabilities(
            InitFlags::FUSE_BIG_WRITES
                | InitFlags::FUSE_ASYNC_READ
                | InitFlags::FUSE_PARALLEL_DIROPS
                | InitFlags::FUSE_MAX_PAGES
                | InitFlags::FUSE_CACHE_SYMLINKS
                // O_TRUNC arrives with the open instead of as a separate setattr.
                | InitFlags::FUSE_ATOMIC_O_TRUNC,
        );
        // The backing filesystem clears set-id bits and capabilities itself on write, truncate
        // and chown; without this the kernel asks for security.capability before every write.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        let passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.shared
            .passthrough
            .store(passthrough, Ordering::Relaxed);
        if self.uring {
            // Requests served on the CPU that made them (Linux 6.14+, where the `fuse` module's
            // `enable_uring` is on); fuser falls back to /dev/fuse reads when it cannot set up
            // the rings.
            let _ = config.add_capabilities(InitFlags::FUSE_OVER_IO_URING);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry_reply(parent.0, name, reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.shared.inodes.forget([(ino.0, nlookup)]);
        // A directory the kernel forgot took its listing cache with it.
        let mut listed = self.shared.listed.lock();
        if listed.contains_key(&ino.0) && !self.shared.inodes.knows(ino.0) {
            listed.remove(&ino.0);
        }
    }

    // fuser's batch_forget (the default calls forget for each node) cannot be overridden: its
    // argument type is private to fuser 0.18.

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inode(ino).and_then(|i| stat_fd(i.fd()).map_err(errno)) {
            Ok(st) => reply.attr(&TTL, &attr(ino.0, &st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _gate = self.shared.gate.read();
        let result = (|| -> Result<Stat, Errno> {
            self.shared.writable()?;
            let inode = self.inode(ino)?;
            let path = proc_path(inode.fd());
            if let Some(mode) = mode {
                rustix::fs::chmodat(
                    CWD,
                    path.as_c_str(),
                    FileMode::from_raw_mode(mode),
                    AtFlags::empty(),
                )
                .map_err(errno)?;
            }
            if uid.is_some() || gid.is_some() {
                rustix::fs::chownat(
                    inode.fd(),
                    c"",
                    uid.map(rustix::fs::Uid::from_raw),
                    gid.map(rustix::fs::Gid::from_raw),
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(errno)?;
            }
            if let Some(size) = size {
                match fh.map(|fh| self.shared.handle(fh)) {
                    Some(Ok(h)) => h.file.set_len(size).map_err(errno)?,
                    _ => {
                        let f = self.reopen(ino.0, libc::O_WRONLY)?;
                        f.set_len(size).map_err(errno)?;
                    }
                }
            }
            if atime.is_some() || mtime.is_some() {
                let spec = |t: Option<TimeOrNow>| match t {
                    None => rustix::fs::Timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    Some(TimeOrNow::Now) => rustix::fs::Timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    },
                    Some(TimeOrNow::SpecificTime(t)) => {
                        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                        rustix::fs::Timespec {
                            tv_sec: d.as_secs() as i64,
                            tv_nsec: d.subsec_nanos() as i64,
                        }
                    }
                };
                let times = rustix::fs::Timestamps {
                    last_access: spec(atime),
                    last_modification: spec(mtime),
                };
                rustix::fs::utimensat(CWD, path.as_c_str(), &times, AtFlags::empty())
                    .map_err(errno)?;
            }
            stat_fd(inode.fd()).map_err(errno)
        })();
        match result {
            Ok(st) => {
                let open_for_writing = self
                    .shared
                    .writers
                    .lock()
                    .get(&ino.0)
                    .is_some_and(|&n| n > 0);
                if size.is_some() && open_for_writing {
                    // A truncate by a writer (O_TRUNC by hand): reported at its close.
                    self.shared.unreported.lock().insert(ino.0);
                } else if let Some(p) = self.shared.path_of(ino.0) {
                    let kind = if size.is_some() {
                        ChangeKind::Written
                    } else {
                        ChangeKind::Attr
                    };
                    self.shared.emit(p, kind);
                }
                reply.attr(&TTL, &attr(ino.0, &st));
            }
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .inode(ino)
            .and_then(|i| rustix::fs::readlinkat(i.fd(), c"", Vec::new()).map_err(errno))
        {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _gate = self.shared.gate.read();
        let owner = Owner::of(req, mode & !umask & 0o7777);
        self.make_entry(
            parent,
            name,
            ChangeKind::Created,
            Some(owner),
            reply,
            |dir| {
                let kind = rustix::fs::FileType::from_raw_mode(mode);
                let perm = FileMode::from_raw_mode(mode & !umask & 0o7777);
                rustix::fs::mknodat(dir, name, kind, perm, rdev as u64)
            },
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _gate = self.shared.gate.read();
        let owner = Owner::of(req, mode & !umask & 0o7777);
        self.make_entry(
            parent,
            name,
            ChangeKind::DirMade,
            Some(owner),
            reply,
            |dir| rustix::fs::mkdirat(dir, name, FileMode::from_raw_mode(mode & !umask & 0o7777)),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _gate = self.shared.gate.read();
        self.remove(parent, name, AtFlags::empty(), ChangeKind::Removed, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _gate = self.shared.gate.read();
        self.remove(
            parent,
            name,
            AtFlags::REMOVEDIR,
            ChangeKind::DirRemoved,
            reply,
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _gate = self.shared.gate.read();
        let owner = Owner::of(req, 0);
        self.make_entry(
            parent,
            link_name,
            ChangeKind::Symlink,
            Some(owner),
            reply,
            |dir| rustix::fs::symlinkat(target, dir, link_name),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _gate = self.shared.gate.read();
        let from = self.shared.child_path(parent.0, name);
        let to = self.shared.child_path(newparent.0, newname);
        let result = (|| {
            self.shared.writable()?;
            if self.shared.hidden(parent.0, name) || self.shared.hidden(newparent.0, newname) {
                return Err(Errno::EACCES);
            }
            let a = self.inode(parent)?;
            let b = self.inode(newparent)?;
            let flags = rustix::fs::RenameFlags::from_bits_retain(flags.bits());
            rustix::fs::renameat_with(a.fd(), name, b.fd(), newname, flags).map_err(errno)
        })();
        match result {
            Ok(()) => {
                if let (Some(from), Some(to)) = (from, to) {
                    if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                        self.shared
                            .emit(to.clone(), ChangeKind::RenamedTo { to: from.clone() });
                    }
                    self.shared.emit(from, ChangeKind::RenamedTo { to });
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _gate = self.shared.gate.read();
        let inode = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        self.make_entry(newparent, newname, ChangeKind::Link, None, reply, |dir| {
            rustix::fs::linkat(inode.fd(), c"", dir, newname, AtFlags::EMPTY_PATH)
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writes = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let _gate = writes.then(|| self.shared.gate.read());
        let flags = flags.0;
        let wants_write = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if wants_write {
            if let Err(e) = self.shared.writable() {
                reply.error(e);
                return;
            }
        }
        let mut handle = match self
            .reopen(ino.0, flags)
            .and_then(|f| self.open_handle(ino.0, f, flags))
        {
            Ok(h) => h,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        if flags & libc::O_TRUNC != 0 {
            if handle.writable {
                self.shared.unreported.lock().insert(ino.0);
            } else if let Some(p) = self.shared.path_of(ino.0) {
                self.shared.emit(p, ChangeKind::Written);
            }
        }
        if self.shared.passthrough() {
            match self.backing_for(ino.0, |f| reply.open_backing(f)) {
                Ok(backing) => {
                    handle._backing = Some(Arc::clone(&backing));
                    let fh = self.shared.new_handle(handle);
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing);
                    return;
                }
                Err(_) => self.shared.passthrough.store(false, Ordering::Relaxed),
            }
        }
        let fh = self.shared.new_handle(handle);
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let result = self.shared.handle(fh).and_then(|h| {
            let mut buf = vec![0u8; size as usize];
            let mut filled = 0;
            while filled < buf.len() {
                match h.file.read_at(&mut buf[filled..], offset + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno(e)),
                }
            }
            buf.truncate(filled);
            Ok(buf)
        });
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let _gate = self.shared.gate.read();
        let result = self.shared.handle(fh).and_then(|h| {
            if flags.0 & libc::O_APPEND != 0 {
                use std::io::Write;
                (&h.file).write_all(data).map_err(errno)?;
            } else {
                h.file.write_all_at(data, offset).map_err(errno)?;
            }
            Ok(data.len() as u32)
        });
        match result {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do at flush: writes are not buffered here and file locks are the kernel's
        // own. ENOSYS tells the kernel so, and it stops sending flush on every close.
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No device-specific requests on these files: ENOTTY, as a local filesystem answers
        // them (every Python `open()` asks TCGETS to learn whether the file is a terminal; the
        // default answer logged a warning each time).
        reply.error(Errno::ENOTTY);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = self.shared.handles.lock().remove(&fh.0);
        if let Some(h) = &handle {
            self.shared.inodes.closed(h.id);
            let mut open_files = self.shared.open_files.lock();
            if open_files
                .get(&h.id)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(h)))
            {
                open_files.remove(&h.id);
            }
        }
        if let Some(h) = handle {
            if h.writable {
                let last = {
                    let mut writers = self.shared.writers.lock();
                    let n = writers.entry(h.id).or_insert(1);
                    *n -= 1;
                    let last = *n == 0;
                    if last {
                        writers.remove(&h.id);
                    }
                    last
                };
                let changed = stat_fd(h.file.as_fd())
                    .map(|st| fingerprint(&st) != *h.before.lock())
                    .unwrap_or(true);
                let unreported = last && self.shared.unreported.lock().remove(&h.id);
                if last && (changed || unreported) {
                    if let Some(p) = self.shared.path_of(h.id) {
                        self.shared.emit(p, ChangeKind::Written);
                    }
                }
            }
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.shared.handle(fh).and_then(|h| {
            if datasync {
                h.file.sync_data().map_err(errno)
            } else {
                h.file.sync_all().map_err(errno)
            }
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The entries are read at the first readdir: when the kernel's cache still holds the
        // listing it sends none, and the open costs one fstat.
        let result = self.inode(ino).and_then(|inode| {
            let now = fingerprint(&stat_fd(inode.fd()).map_err(errno)?);
            let record = self.shared.listed.lock().get(&ino.0).copied();
            let unchanged = record.filter(|r| r.before == now);
            let fh = self.shared.next_fh.fetch_add(1, Ordering::Relaxed) + 1;
            let cache = unchanged.is_some();
            let handle = DirHandle {
                ino: ino.0,
                cache,
                listing: None,
            };
            self.shared.dirs.lock().insert(fh, handle);
            Ok((fh, cache, unchanged.is_some_and(|r| r.cached)))
        });
        match result {
            // A directory listed once is read as before; listed again unchanged (its ctime moves
            // with every change, made through the mount, by the node underneath or by anyone
            // else), the kernel caches the listing as it reads it, and from then on serves it
            // from that cache while the directory stays so. Filling the cache made a listing of
            // 10,000 entries about a quarter slower, which a directory listed once need not pay.
            Ok((fh, cache, keep)) => {
                let mut flags = FopenFlags::empty();
                if cache {
                    flags |= FopenFlags::FOPEN_CACHE_DIR;
                }
                if keep {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                reply.opened(FileHandle(fh), flags)
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listing = match self.shared.listing(ino.0, fh.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (i, (ino, kind, name)) in listing.entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// Not asked for at init (see docs/ARCHITECTURE.md: a cold listing was twice as slow with
    /// readdirplus here, and `ls -l` gained little); kept correct for kernels that send it.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let listing = match self.shared.listing(ino.0, fh.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (i, (_, _, name)) in listing.entries.iter().enumerate().skip(offset as usize) {
            let dot = name.as_bytes() == b"." || name.as_bytes() == b"..";
            // The kernel does not link "." and "..": they take no lookup reference.
            let attr = if dot {
                match self.inode(ino).and_then(|d| stat_fd(d.fd()).map_err(errno)) {
                    Ok(st) => attr(ino.0, &st),
                    Err(e) => {
                        reply.error(e);
                        return;
                    }
                }
            } else {
                match self.shared.lookup(ino.0, name) {
                    Ok(a) => a,
                    // Gone since opendir: leave it out, as a fresh readdir would.
                    Err(_) => continue,
                }
            };
            if reply.add(attr.ino, (i + 1) as u64, name, &TTL, &attr, Generation(0)) {
                if !dot {
                    // Not sent: give back the reference the lookup took.
                    self.shared.inodes.forget([(attr.ino.0, 1)]);
                }
                break;
            }
        }
        reply.ok();
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _gate = self.shared.gate.read();
        let result = (|| {
            self.shared.writable()?;
            let (src, dst) = (self.shared.handle(fh_in)?, self.shared.handle(fh_out)?);
            let (mut off_in, mut off_out) = (offset_in, offset_out);
            let len = usize::try_from(len)
                .unwrap_or(usize::MAX)
                .min(u32::MAX as usize);
            rustix::fs::copy_file_range(
                &src.file,
                Some(&mut off_in),
                &dst.file,
                Some(&mut off_out),
                len,
            )
            .map_err(errno)
        })();
        match result {
            Ok(n) => {
                let _ = ino_out;
                reply.written(n as u32)
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.shared.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.reopen(ino.0, libc::O_RDONLY | libc::O_DIRECTORY) {
            Ok(f) => match f.sync_all() {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            },
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let root = self.shared.inodes.get(ROOT).expect("root");
        let path = proc_path(root.fd());
        match rustix::fs::statvfs(path.as_c_str()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _gate = self.shared.gate.read();
        let result = (|| {
            self.shared.writable()?;
            let inode = self.inode(ino)?;
            if self.is_symlink(&inode) {
                return Err(Errno::EPERM);
            }
            let flags = rustix::fs::XattrFlags::from_bits_retain(flags as u32);
            rustix::fs::setxattr(proc_path(inode.fd()).as_c_str(), name, value, flags)
                .map_err(errno)
        })();
        self.reply_changed(ino, ChangeKind::Xattr, result, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let open = self
            .shared
            .open_files
            .lock()
            .get(&ino.0)
            .and_then(std::sync::Weak::upgrade);
        if let Some(h) = open {
            // A handle is a regular file's own descriptor: no symlink.
            let result = read_xattr(size, |buf| rustix::fs::fgetxattr(&h.file, name, buf));
            reply_xattr(result, size, reply);
            return;
        }
        let result = self.inode(ino).and_then(|inode| {
            if self.is_symlink(&inode) {
                return Err(Errno::NO_XATTR);
            }
            let path = proc_path(inode.fd());
            read_xattr(size, |buf| rustix::fs::getxattr(path.as_c_str(), name, buf))
        });
        reply_xattr(result, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let result = self.inode(ino).and_then(|inode| {
            if self.is_symlink(&inode) {
                return Ok((0, Vec::new()));
            }
            let path = proc_path(inode.fd());
            read_xattr(size, |buf| rustix::fs::listxattr(path.as_c_str(), buf))
        });
        reply_xattr(result, size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _gate = self.shared.gate.read();
        let result = (|| {
            self.shared.writable()?;
            let inode = self.inode(ino)?;
            if self.is_symlink(&inode) {
                return Err(Errno::NO_XATTR);
            }
            rustix::fs::removexattr(proc_path(inode.fd()).as_c_str(), name).map_err(errno)
        })();
        self.reply_changed(ino, ChangeKind::Xattr, result, reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let result = self.inode(ino).and_then(|inode| {
            let access = rustix::fs::Access::from_bits_retain(mask.bits() as u32);
            rustix::fs::accessat(
                CWD,
                proc_path(inode.fd()).as_c_str(),
                access,
                AtFlags::empty(),
            )
            .map_err(errno)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _gate = self.shared.gate.read();
        let result = (|| {
            self.shared.writable()?;
            if self.shared.hidden(parent.0, name) {
                return Err(Errno::EACCES);
            }
            let dir = self.inode(parent)?;
            // Read-write even for a write-only create, so that the same descriptor can be the
            // inode's passthrough backing for later readers too (the kernel checks each open's
            // own mode).
            let access = if flags & libc::O_APPEND == 0 {
                (flags & !libc::O_ACCMODE) | libc::O_RDWR
            } else {
                flags
            };
            let oflags = OFlags::from_bits_retain((access & !libc::O_NOCTTY) as u32)
                | OFlags::CREATE
                | OFlags::CLOEXEC;
            let fd: OwnedFd = rustix::fs::openat(
                dir.fd(),
                name,
                oflags,
                FileMode::from_raw_mode(mode & !umask & 0o7777),
            )
            .map_err(errno)?;
            Owner::of(req, mode & !umask & 0o7777)
                .give(dir.fd(), name)
                .map_err(errno)?;
            let attr = self.shared.lookup(parent.0, name)?;
            let handle = self.open_handle(attr.ino.0, File::from(fd), flags | libc::O_WRONLY)?;
            Ok((attr, handle))
        })();
        let (attr, mut handle) = match result {
            Ok(x) => x,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        handle.writable = true;
        // Reported when the writer closes it: announced now, peers would show it empty.
        self.shared.unreported.lock().insert(attr.ino.0);
        if self.shared.passthrough() {
            let own = (flags & libc::O_APPEND == 0).then(|| handle.file.as_fd());
            match self.backing_for_new(attr.ino.0, own, |f| reply.open_backing(f)) {
                Ok(backing) => {
                    handle._backing = Some(Arc::clone(&backing));
                    let fh = self.shared.new_handle(handle);
                    reply.created_passthrough(
                        &TTL,
                        &attr,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                        &backing,
                    );
                    return;
                }
                Err(_) => self.shared.passthrough.store(false, Ordering::Relaxed),
            }
        }
        let fh = self.shared.new_handle(handle);
        reply.created(
            &TTL,
            &attr,
            Generation(0),
            FileHandle(fh),
            FopenFlags::empty(),
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _gate = self.shared.gate.read();
        let result = self.shared.handle(fh).and_then(|h| {
            rustix::fs::fallocate(
                &h.file,
                rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
                offset,
                length,
            )
            .map_err(errno)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        let result = self.shared.handle(fh).and_then(|h| {
            let pos = match whence {
                libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset as u64),
                libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset as u64),
                libc::SEEK_SET => rustix::fs::SeekFrom::Start(offset as u64),
                libc::SEEK_END => rustix::fs::SeekFrom::End(offset),
                _ => rustix::fs::SeekFrom::Current(offset),
            };
            rustix::fs::seek(&h.file, pos).map_err(errno)
        });
        match result {
            Ok(off) => reply.offset(off as i64),
            Err(e) => reply.error(e),
        }
    }
}

impl LoggerFs {
    /// Answers an operation that changed an inode in place, reporting the change if it worked.
    fn reply_changed(
        &self,
        ino: INodeNo,
        kind: ChangeKind,
        result: Result<(), Errno>,
        reply: ReplyEmpty,
    ) {
        match result {
            Ok(()) => {
                if let Some(p) = self.shared.path_of(ino.0) {
                    self.shared.emit(p, kind);
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    /// Makes the new entry `name` in `parent` with `make` (given the directory's descriptor),
    /// reports it as `kind` and answers with the entry.
    fn make_entry(
        &self,
        parent: INodeNo,
        name: &OsStr,
        kind: ChangeKind,
        owner: Option<Owner>,
        reply: ReplyEntry,
        make: impl FnOnce(BorrowedFd<'_>) -> rustix::io::Result<()>,
    ) {
        let result = (|| {
            self.shared.writable()?;
            if self.shared.hidden(parent.0, name) {
                return Err(Errno::EACCES);
            }
            let dir = self.inode(parent)?;
            make(dir.fd()).map_err(errno)?;
            if let Some(owner) = owner {
                owner.give(dir.fd(), name).map_err(errno)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            reply.error(e);
            return;
        }
        if let Some(p) = self.shared.child_path(parent.0, name) {
            self.shared.emit(p, kind);
        }
        self.entry_reply(parent.0, name, reply);
    }

    fn remove(
        &self,
        parent: INodeNo,
        name: &OsStr,
        flags: AtFlags,
        kind: ChangeKind,
        reply: ReplyEmpty,
    ) {
        let path = self.shared.child_path(parent.0, name);
        let result = (|| {
            self.shared.writable()?;
            if self.shared.hidden(parent.0, name) {
                return Err(Errno::ENOENT);
            }
            let dir = self.inode(parent)?;
            rustix::fs::unlinkat(dir.fd(), name, flags).map_err(errno)
        })();
        match result {
            Ok(()) => {
                if let Some(p) = path {
                    self.shared.emit(p, kind);
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }
}
