//! The FUSE change logger of rsyncfs: a passthrough filesystem over a backing directory that
//! reports every change.
//!
//! [`mount`] shows a backing directory at a mount point and returns a [`Mounted`] handle with
//! the stream of [`Change`]s ([`Mounted::changes`]), the open-writer query
//! ([`Mounted::is_open_for_writing`]), cache invalidation for updates made underneath the mount
//! ([`Mounted::invalidate`]) and [`Mounted::unmount`].
//!
//! The filesystem ([`fs::LoggerFs`]) keeps one `O_PATH` descriptor per inode the kernel knows
//! and does every operation with the `*at` system calls on them, so that inode numbers are the
//! backing filesystem's own and survive renames and hard links. Where the kernel offers FUSE
//! passthrough (Linux 6.9 and later), opened files are handed to the kernel and reads and
//! writes never reach this process; changes are detected at open, release and fsync instead.
//! The node's state folder ([`STATE_DIR_NAME`]) inside the backing directory is hidden.
//!
//! Status: the passthrough and the change stream are in progress (issue 3); see
//! docs/ARCHITECTURE.md for what is done.

mod fs;
mod inodes;

pub use fs::{LoggerFs, Mode};
pub use inodes::FDS_CACHED_MAX;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

/// The folder a node keeps inside its backing directory; invisible through the mount.
pub const STATE_DIR_NAME: &str = ".rsyncfs";
/// How a mount's source starts in the mount table (the backing directory follows).
pub const FS_NAME_PREFIX: &str = "rsyncfs:";

/// How often a file that stays open for writing and keeps changing is reported.
pub const DIRTY_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// A file open for writing is reported before its close only once it has been open this long
/// (a log, a database, a long copy): a file its writer closes sooner is reported once, whole.
pub const HELD_OPEN_MIN: std::time::Duration = std::time::Duration::from_secs(3);

/// Changes kept for a slow consumer before the logger reports an overflow instead.
pub const CHANGES_QUEUED_MAX: usize = 65_536;

/// What happened to a path (relative to the mount point).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// A file's content changed and its last writer closed it (or it stayed open and dirty).
    Written,
    /// A file, FIFO or socket was created.
    Created,
    /// A file, symlink or other non-directory was removed.
    Removed,
    /// The path was renamed away to `to`. For a directory, everything below it moved too and
    /// is not reported one by one.
    RenamedTo {
        to: PathBuf,
    },
    DirMade,
    DirRemoved,
    /// Mode, owner or times changed.
    Attr,
    Xattr,
    /// A hard link to an existing file was made at this path.
    Link,
    Symlink,
    /// Changes were lost because the consumer fell behind: rescan everything.
    Overflow,
}

/// A file open for writing, as [`Mounted::being_written`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BeingWritten {
    /// An id of the file, stable while it stays open (also across renames).
    pub id: u64,
    /// Relative to the mount point.
    pub path: PathBuf,
    pub size: u64,
    /// Its size when its writers opened it (the least of them): 0 for a file they made or
    /// truncated. What lies below was there before.
    pub size_at_open: u64,
}

/// One reported change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Relative to the mount point (empty for an overflow). A write to a file with several hard
    /// links is reported under one of its names.
    pub path: PathBuf,
    pub kind: ChangeKind,
}

/// Why a mount was refused.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("/dev/fuse is missing or not usable: {0}")]
    NoFuse(std::io::Error),
    #[error("backing directory {0}: {1}")]
    Backing(PathBuf, std::io::Error),
    #[error("mount point {0}: {1}")]
    MountPoint(PathBuf, String),
    #[error("the backing directory {backing} is inside the mount point {mount}")]
    BackingInsideMount { backing: PathBuf, mount: PathBuf },
    #[error("mounting failed: {0}")]
    Mount(std::io::Error),
}

/// How long a reader of the change stream keeps looking for the next change before it sleeps
/// until one comes, and how often it looks meanwhile. A sleeping reader must be woken by the
/// request that reports a change, a futex wake that costs that request 9-19 us here (the
/// other CPU is halted and has to be sent an interrupt: `bench/logger.sh`'s creates spent more
/// time waking the reader than making the file). A reader that looks every 200 us while changes
/// keep coming is never asleep then: a report costs a queue push, and a change waits at most
/// one look for its reader. An idle reader (no change for this long) sleeps at once.
pub const CHANGE_LINGER: std::time::Duration = std::time::Duration::from_millis(2);
/// See [`CHANGE_LINGER`].
pub const CHANGE_POLL: std::time::Duration = std::time::Duration::from_micros(200);

/// The stream of changes a mount reports, in the order they happened (bounded: past
/// [`CHANGES_QUEUED_MAX`] unread changes a [`ChangeKind::Overflow`] marks the loss).
pub struct ChangeStream {
    rx: Receiver<Change>,
    /// When the last change was received: the reader lingers only within [`CHANGE_LINGER`] of it.
    last: std::cell::Cell<Option<std::time::Instant>>,
}

impl ChangeStream {
    /// The next change, waiting at most `timeout` for it (see [`CHANGE_LINGER`]).
    pub fn recv_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> Result<Change, std::sync::mpsc::RecvTimeoutError> {
        use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
        let start = std::time::Instant::now();
        let deadline = start + timeout;
        let linger_until = self
            .last
            .get()
            .map_or(start, |t| (t + CHANGE_LINGER).min(deadline));
        let got = loop {
            match self.rx.try_recv() {
                Ok(c) => break Ok(c),
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            let now = std::time::Instant::now();
            if now >= linger_until {
                break self
                    .rx
                    .recv_timeout(deadline.saturating_duration_since(now));
            }
            std::thread::sleep(CHANGE_POLL.min(linger_until - now));
        };
        if got.is_ok() {
            self.last.set(Some(std::time::Instant::now()));
        }
        got
    }

    /// The next change, waiting as long as it takes; None once the mount is gone.
    pub fn recv(&self) -> Option<Change> {
        loop {
            match self.recv_timeout(std::time::Duration::from_secs(3600)) {
                Ok(c) => return Some(c),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// The changes reported so far, without waiting.
    pub fn try_iter(&self) -> std::sync::mpsc::TryIter<'_, Change> {
        self.rx.try_iter()
    }
}

impl Iterator for ChangeStream {
    type Item = Change;

    fn next(&mut self) -> Option<Change> {
        self.recv()
    }
}

/// A mounted logger.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    /// The flag that stops the housekeeping threads, and the threads.
    reporter: Option<(
        Arc<std::sync::atomic::AtomicBool>,
        Vec<std::thread::JoinHandle<()>>,
    )>,
    fs: Arc<fs::Shared>,
    changes: parking_lot::Mutex<Option<ChangeStream>>,
    mount_point: PathBuf,
}

impl Mounted {
    /// The stream of changes, in the order they happened.
    ///
    /// # Panics
    /// When the stream was taken with [`Mounted::take_changes`].
    pub fn changes(&self) -> parking_lot::MappedMutexGuard<'_, ChangeStream> {
        parking_lot::MutexGuard::map(self.changes.lock(), |c| {
            c.as_mut().expect("the change stream was taken")
        })
    }

    /// Takes the stream of changes, for a consumer on another thread.
    pub fn take_changes(&self) -> Option<ChangeStream> {
        self.changes.lock().take()
    }

    /// Runs `f` while no operation that changes the tree through the mount is in progress, and
    /// none can start: the node checks what a path holds and replaces it inside, so that no
    /// local change lands between the check and the replacement.
    pub fn exclusive<R>(&self, f: impl FnOnce() -> R) -> R {
        self.fs.exclusive(f)
    }

    /// True while a local process has `path` (relative) open for writing.
    pub fn is_open_for_writing(&self, path: &Path) -> bool {
        self.fs.is_open_for_writing(path)
    }

    /// Files open for writing now, each once and at most `max`.
    pub fn being_written(&self, max: usize) -> Vec<BeingWritten> {
        self.fs.being_written(max)
    }

    /// Whether the kernel's FUSE passthrough mode is in use.
    pub fn passthrough(&self) -> bool {
        self.fs.passthrough()
    }

    /// Whether requests come through FUSE over io_uring (a queue per CPU) rather than reads
    /// of `/dev/fuse`.
    pub fn io_uring(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.io_uring())
    }

    /// How the mount talks to the kernel, for the daemon's first line: passthrough of file
    /// I/O or not, and the transport of the remaining requests.
    pub fn transport(&self) -> &'static str {
        match (self.passthrough(), self.io_uring()) {
            (true, true) => "kernel FUSE passthrough, requests over io_uring",
            (true, false) => "kernel FUSE passthrough, requests over /dev/fuse",
            (false, true) => "ordinary FUSE I/O over io_uring (no passthrough in this kernel)",
            (false, false) => "ordinary FUSE I/O (no passthrough in this kernel)",
        }
    }

    /// Descriptors the logger holds for inodes the kernel knows (at most
    /// [`FDS_CACHED_MAX`] beyond those open files, the root and inodes without file handles
    /// need).
    pub fn inode_descriptors(&self) -> usize {
        self.fs.inode_descriptors()
    }

    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// How many times the daemon has read a backing directory for the kernel; a listing the
    /// kernel serves from its cache reads none.
    pub fn directory_reads(&self) -> u64 {
        self.fs.directory_reads()
    }

    /// Drops the kernel's cached entry, attributes and data for `path` (relative), after the
    /// node changed it in the backing directory.
    pub fn invalidate(&self, path: &Path) {
        if let Some(session) = &self.session {
            self.fs.invalidate(&session.notifier(), path);
        }
    }

    /// Unmounts and waits for the filesystem's threads to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.stop_reporter();
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Mounted {
    fn stop_reporter(&mut self) {
        if let Some((stop, threads)) = self.reporter.take() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for thread in threads {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.stop_reporter();
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// Why this process cannot mount the logger here, if it cannot: not root, or no usable
/// `/dev/fuse`. (Tests print it when they skip.)
pub fn why_no_fuse() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not running as root".into());
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/fuse is not usable: {e}")),
    }
}

/// For tests that need FUSE mounts: true when they can run here. Otherwise it prints
/// `SKIPPED: <why>` and returns false, except under `CI=true`, where a FUSE test that cannot run
/// fails (CI runs as root with /dev/fuse; a skip there would hide a broken machine).
pub fn fuse_tests_can_run() -> bool {
    let Some(why) = why_no_fuse() else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true, and this FUSE test cannot run: {why}");
    }
    println!("SKIPPED: this test needs FUSE mounts: {why}");
    false
}

/// Ring workers (threads, each with one ring entry) per CPU queue with FUSE over io_uring: a
/// worker busy on a slow request holds only its own entry, so this many requests of one CPU can
/// be in progress at once before the next waits.
pub const URING_WORKERS_PER_CPU: usize = 4;

/// The environment variable that turns FUSE over io_uring off (`RSYNCFS_FUSE_URING=off`): the
/// mount then reads requests from `/dev/fuse` even where the kernel offers the rings.
pub const URING_ENV: &str = "RSYNCFS_FUSE_URING";

/// How the mount receives the kernel's requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// FUSE over io_uring where the kernel offers it (unless [`URING_ENV`] turns it off),
    /// else reads of `/dev/fuse`.
    Auto,
    /// Reads of `/dev/fuse` only.
    DevFuse,
}

impl Transport {
    fn wants_uring(self) -> bool {
        self == Transport::Auto && !uring_turned_off()
    }
}

/// Whether [`URING_ENV`] turns FUSE over io_uring off in this process (`off`, `0`, `no`,
/// `false`).
pub fn uring_turned_off() -> bool {
    std::env::var(URING_ENV).is_ok_and(|v| matches!(v.as_str(), "off" | "0" | "no" | "false"))
}

/// Whether this kernel offers FUSE over io_uring now: `Some(true)` when the `fuse` module's
/// `enable_uring` parameter is on, `Some(false)` when it is off, `None` when the kernel has no
/// such parameter (before Linux 6.14, or built without it).
pub fn kernel_offers_uring() -> Option<bool> {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .ok()
        .map(|v| v.trim() == "Y")
}

/// Mounts `backing` at `mount_point`, which must be an empty directory.
pub fn mount(backing: &Path, mount_point: &Path, mode: Mode) -> Result<Mounted, MountError> {
    mount_with(backing, mount_point, mode, false)
}

/// Mounts `backing` at `mount_point`; with `allow_not_empty`, also over a directory that is
/// not empty (for a caller that checked it and takes care of what may arrive there).
pub fn mount_with(
    backing: &Path,
    mount_point: &Path,
    mode: Mode,
    allow_not_empty: bool,
) -> Result<Mounted, MountError> {
    mount_over(backing, mount_point, mode, allow_not_empty, Transport::Auto)
}

/// As [`mount_with`], with the transport of the kernel's requests chosen.
pub fn mount_over(
    backing: &Path,
    mount_point: &Path,
    mode: Mode,
    allow_not_empty: bool,
    transport: Transport,
) -> Result<Mounted, MountError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(MountError::NoFuse)?;
    let backing = backing
        .canonicalize()
        .map_err(|e| MountError::Backing(backing.to_path_buf(), e))?;
    if !backing.is_dir() {
        return Err(MountError::Backing(
            backing,
            std::io::Error::from(std::io::ErrorKind::NotADirectory),
        ));
    }
    clear_dead_mount(mount_point);
    let mount_abs = mount_point
        .canonicalize()
        .map_err(|e| MountError::MountPoint(mount_point.to_path_buf(), e.to_string()))?;
    if !mount_abs.is_dir() {
        return Err(MountError::MountPoint(mount_abs, "not a directory".into()));
    }
    let not_empty = std::fs::read_dir(&mount_abs)
        .map_err(|e| MountError::MountPoint(mount_abs.clone(), e.to_string()))?
        .next()
        .is_some();
    if not_empty && !allow_not_empty {
        return Err(MountError::MountPoint(mount_abs, "is not empty".into()));
    }
    if backing.starts_with(&mount_abs) {
        return Err(MountError::BackingInsideMount {
            backing,
            mount: mount_abs,
        });
    }
    raise_open_file_limit();
    let (tx, rx): (SyncSender<Change>, Receiver<Change>) =
        std::sync::mpsc::sync_channel(CHANGES_QUEUED_MAX);
    let (filesystem, shared) = LoggerFs::new(&backing, mode, tx, transport.wants_uring())
        .map_err(|e| MountError::Backing(backing.clone(), e))?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("{FS_NAME_PREFIX}{}", backing.display())),
        fuser::MountOption::Subtype("rsyncfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Suid,
        fuser::MountOption::Dev,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(4);
    config.clone_fd = true;
    config.uring_workers_per_cpu = Some(URING_WORKERS_PER_CPU);
    let session = fuser::Session::new(filesystem, &mount_abs, &config)
        .and_then(fuser::Session::spawn)
        .map_err(MountError::Mount)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reporter = {
        let (stop, shared) = (Arc::clone(&stop), Arc::clone(&shared));
        std::thread::Builder::new()
            .name("rsyncfs-dirty".into())
            .spawn(move || {
                // Sleep in short steps so that unmounting does not wait a whole interval.
                let step = std::time::Duration::from_millis(50);
                let mut waited = std::time::Duration::ZERO;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(step);
                    waited += step;
                    if waited >= DIRTY_REPORT_INTERVAL {
                        waited = std::time::Duration::ZERO;
                        shared.report_dirty_open_files();
                    }
                }
            })
            .map_err(MountError::Mount)?
    };
    let reaper = {
        let (stop, shared) = (Arc::clone(&stop), Arc::clone(&shared));
        std::thread::Builder::new()
            .name("rsyncfs-reaper".into())
            .spawn(move || {
                // Closing the descriptors of forgotten inodes is nobody's critical path: it runs
                // at the lowest priority, so that it yields to the requests that follow a cache drop.
                let _ = rustix::process::setpriority_process(None, 19);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    shared.reap_forgotten();
                }
                shared.reap_forgotten();
            })
            .map_err(MountError::Mount)?
    };
    Ok(Mounted {
        session: Some(session),
        reporter: Some((stop, vec![reporter, reaper])),
        fs: shared,
        changes: parking_lot::Mutex::new(Some(ChangeStream {
            rx,
            last: std::cell::Cell::new(None),
        })),
        mount_point: mount_abs,
    })
}

/// A logger killed with SIGKILL leaves a dead mount ("Transport endpoint is not connected")
/// behind; a plain detach clears it so that the mount point can be used again.
/// Detaches whatever is mounted at `mount_point` (lazily: programs inside keep what they
/// hold).
pub fn detach(mount_point: &Path) {
    if let Ok(path) = std::ffi::CString::new(mount_point.as_os_str().as_encoded_bytes()) {
        // SAFETY: a valid NUL-terminated path; umount2 only reads it.
        #[allow(unsafe_code)]
        unsafe {
            libc::umount2(path.as_ptr(), libc::MNT_DETACH);
        }
    }
}

pub fn clear_dead_mount(mount_point: &Path) {
    if let Err(e) = std::fs::metadata(mount_point) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            if let Ok(path) = std::ffi::CString::new(mount_point.as_os_str().as_encoded_bytes()) {
                // SAFETY: a valid NUL-terminated path; umount2 only reads it.
                #[allow(unsafe_code)]
                unsafe {
                    libc::umount2(path.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
    }
}

/// The logger holds a descriptor for every inode the kernel caches, which soon passes the usual
/// soft limit of 1,024: raise it as far as the system allows (root may go up to fs.nr_open).
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let system_max = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let hard = match (limit.maximum, system_max) {
        (Some(h), Some(m)) => Some(h.max(m)),
        (h, _) => h,
    };
    let raised = Rlimit {
        current: hard,
        maximum: hard,
    };
    if setrlimit(Resource::Nofile, raised).is_err() {
        // Not allowed to raise the hard limit: take the soft one up to it.
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}
