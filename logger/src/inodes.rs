//! The inodes the kernel knows, counted by lookups, each with a file handle
//! (`name_to_handle_at`) from which a descriptor is made again when it is needed
//! (`open_by_handle_at`). Descriptors are kept in a bounded cache: the kernel may know millions
//! of inodes (a large tree, `find`, a tar), and the process may hold only tens of thousands of
//! descriptors (the hard limit here is about 20,000, which root cannot raise). An inode is kept
//! open for as long as a program has it open (its descriptor then works after an unlink) and
//! always where its filesystem gives no handles.
//!
//! A FUSE inode number is the backing inode number, so that `stat` through the mount shows the
//! backing filesystem's numbers, stable across renames and shared by hard links. The backing
//! root is inode 1 (FUSE's root). Inodes of another filesystem mounted inside the backing
//! directory get numbers with the top bit set, allocated in order, to keep them apart.

use parking_lot::Mutex;
use rustix::io::Errno;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

/// Descriptors of inodes that are not open kept at most (each one counts against the process's
/// limit; programs' open files and the node's own come on top).
pub const FDS_CACHED_MAX: usize = 4096;
/// The largest file handle a filesystem gives (the kernel's `MAX_HANDLE_SZ`).
const HANDLE_BYTES_MAX: usize = 128;

/// One inode the kernel knows, with a descriptor of it (`O_PATH`) held while this lives.
#[derive(Debug, Clone)]
pub(crate) struct Inode {
    fd: Arc<OwnedFd>,
}

impl Inode {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A file handle as `open_by_handle_at` takes it: `struct file_handle` and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Handle {
    words: Box<[u32]>,
}

impl Handle {
    /// The handle of the file `fd` is open on, or `None` where its filesystem gives none.
    fn of(fd: BorrowedFd<'_>) -> Option<Handle> {
        // `struct file_handle { unsigned int handle_bytes; int handle_type; unsigned char f_handle[]; }`
        let mut words = vec![0u32; 2 + HANDLE_BYTES_MAX / 4];
        words[0] = HANDLE_BYTES_MAX as u32;
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `words` is a `file_handle` with room for `handle_bytes` bytes after its
        // header, 4-byte aligned; the path is an empty NUL-terminated string; the kernel writes
        // only within those.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::name_to_handle_at(
                fd.as_raw_fd(),
                c"".as_ptr(),
                words.as_mut_ptr().cast::<libc::file_handle>(),
                &mut mount_id,
                libc::AT_EMPTY_PATH,
            )
        };
        if r != 0 {
            return None;
        }
        let len = 2 + (words[0] as usize).div_ceil(4);
        words.truncate(len);
        Some(Handle {
            words: words.into_boxed_slice(),
        })
    }

    /// A new `O_PATH` descriptor of the file, through any descriptor on its filesystem.
    fn open(&self, mount: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
        let mut words = self.words.to_vec();
        // SAFETY: `words` holds a `file_handle` the kernel gave, with its length; the kernel
        // only reads it. A descriptor it returns is new and ours.
        #[allow(unsafe_code)]
        let fd = unsafe {
            libc::open_by_handle_at(
                mount.as_raw_fd(),
                words.as_mut_ptr().cast::<libc::file_handle>(),
                libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            )
        };
        if fd < 0 {
            return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
        }
        // SAFETY: `fd` was just opened and nobody else owns it.
        #[allow(unsafe_code)]
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// A readable descriptor of the directory `fd` (`O_PATH`) is open on: `open_by_handle_at`
/// does not take `O_PATH` descriptors.
fn reopen_dir(fd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    rustix::fs::open(
        format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
}

#[derive(Debug)]
struct Entry {
    dev: u64,
    ino: u64,
    /// Tells this entry from an earlier one with the same number (inode numbers are reused).
    generation: u64,
    handle: Option<Handle>,
    /// The descriptor kept while the inode is open, or always where there is no handle.
    pinned: Option<Arc<OwnedFd>>,
    /// Open files of the inode.
    opens: u32,
}

#[derive(Debug)]
struct Table {
    by_id: HashMap<u64, Entry>,
    lookups: HashMap<u64, u64>,
    by_key: HashMap<(u64, u64), u64>,
    /// A descriptor on each filesystem seen, for `open_by_handle_at`.
    mounts: HashMap<u64, Arc<OwnedFd>>,
    next_foreign: u64,
    next_generation: u64,
}

/// The table, shared by the filesystem's worker threads.
#[derive(Debug)]
pub(crate) struct Inodes {
    table: Mutex<Table>,
    /// Descriptors of inodes that are not pinned, the least recently used dropped first. Locked
    /// after `table` when both are.
    cache: Mutex<lru::LruCache<u64, (u64, Arc<OwnedFd>)>>,
    /// Descriptors of inodes the kernel forgot, which a low-priority thread closes later:
    /// closing ten thousand descriptors after a cache drop would otherwise delay the lookups
    /// that follow.
    forgotten: Mutex<Vec<Arc<OwnedFd>>>,
    root_dev: u64,
    root_ino: u64,
}

/// Forgotten descriptors waiting to be closed, beyond which `forget` closes them itself.
pub(crate) const FORGOTTEN_MAX: usize = 65_536;

pub(crate) const ROOT: u64 = 1;
const FOREIGN: u64 = 1 << 63;

impl Inodes {
    pub fn new(root_fd: OwnedFd, dev: u64, ino: u64) -> Inodes {
        let mount = reopen_dir(root_fd.as_fd()).ok().map(Arc::new);
        let root_fd = Arc::new(root_fd);
        let mut table = Table {
            by_id: HashMap::new(),
            lookups: HashMap::new(),
            by_key: HashMap::new(),
            mounts: HashMap::new(),
            next_foreign: FOREIGN,
            next_generation: 1,
        };
        if let Some(mount) = mount {
            table.mounts.insert(dev, mount);
        }
        table.by_id.insert(
            ROOT,
            Entry {
                dev,
                ino,
                generation: 0,
                handle: None,
                pinned: Some(root_fd),
                opens: 0,
            },
        );
        table.lookups.insert(ROOT, u64::MAX / 2);
        table.by_key.insert((dev, ino), ROOT);
        Inodes {
            table: Mutex::new(table),
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(FDS_CACHED_MAX).expect("not zero"),
            )),
            forgotten: Mutex::new(Vec::new()),
            root_dev: dev,
            root_ino: ino,
        }
    }

    /// Whether the kernel holds a lookup of `id` (or it is the root).
    pub fn knows(&self, id: u64) -> bool {
        self.table.lock().by_id.contains_key(&id)
    }

    /// The inode numbered `id`, opened again from its handle if its descriptor was dropped.
    /// `ESTALE` if the kernel forgot it or it no longer exists.
    pub fn get(&self, id: u64) -> Result<Inode, Errno> {
        let (handle, mount, generation) = {
            let t = self.table.lock();
            let entry = t.by_id.get(&id).ok_or(Errno::STALE)?;
            let inode = |fd: &Arc<OwnedFd>| Inode { fd: Arc::clone(fd) };
            if let Some(fd) = &entry.pinned {
                return Ok(inode(fd));
            }
            if let Some((_, fd)) = self.cache.lock().get(&id) {
                return Ok(inode(fd));
            }
            let handle = entry.handle.clone().ok_or(Errno::STALE)?;
            let mount = Arc::clone(t.mounts.get(&entry.dev).ok_or(Errno::STALE)?);
            (handle, mount, entry.generation)
        };
        let fd = Arc::new(handle.open(mount.as_fd()).map_err(|e| match e {
            Errno::STALE | Errno::NOENT => Errno::STALE,
            e => e,
        })?);
        // Cached only if the entry is still the one opened (it may have been forgotten, and
        // its number given to another inode, meanwhile).
        let t = self.table.lock();
        if t.by_id.get(&id).is_some_and(|e| e.generation == generation) {
            let evicted = self.cache.lock().push(id, (generation, Arc::clone(&fd)));
            drop(t);
            drop(evicted);
        }
        Ok(Inode { fd })
    }

    /// Records one more kernel reference to the inode with backing identity `(dev, ino)`,
    /// opened as `fd` (dropped if the inode is known already), and returns its FUSE number.
    pub fn remember(&self, fd: OwnedFd, dev: u64, ino: u64) -> u64 {
        let handle = Handle::of(fd.as_fd());
        let mut t = self.table.lock();
        if let Some(&id) = t.by_key.get(&(dev, ino)) {
            *t.lookups.entry(id).or_insert(0) += 1;
            let generation = t.next_generation;
            let entry = t.by_id.get_mut(&id).expect("by_key and by_id agree");
            if entry.handle.is_some() && handle.is_some() && entry.handle != handle {
                // The inode number was given to a new inode (the old one was removed, and the
                // kernel had not forgotten it yet): the number now names the new one.
                entry.handle = handle;
                entry.generation = generation;
                let fd = Arc::new(fd);
                if entry.pinned.is_some() {
                    entry.pinned = Some(Arc::clone(&fd));
                }
                t.next_generation += 1;
                let mut cache = self.cache.lock();
                let stale = cache.pop(&id);
                let evicted = cache.push(id, (generation, fd));
                drop(cache);
                drop(t);
                drop((stale, evicted));
            }
            return id;
        }
        let id = if dev == self.root_dev && ino != self.root_ino && ino < FOREIGN && ino != ROOT {
            ino
        } else {
            t.next_foreign += 1;
            t.next_foreign
        };
        let fd = Arc::new(fd);
        if let std::collections::hash_map::Entry::Vacant(slot) = t.mounts.entry(dev) {
            // The first inode of a filesystem is the directory it is mounted on.
            if let Ok(dir) = reopen_dir(fd.as_fd()) {
                slot.insert(Arc::new(dir));
            }
        }
        let handle = handle.filter(|_| t.mounts.contains_key(&dev));
        let generation = t.next_generation;
        t.next_generation += 1;
        let pinned = match handle {
            Some(_) => {
                let evicted = self.cache.lock().push(id, (generation, fd));
                drop(evicted);
                None
            }
            None => Some(fd),
        };
        t.by_id.insert(
            id,
            Entry {
                dev,
                ino,
                generation,
                handle,
                pinned,
                opens: 0,
            },
        );
        t.lookups.insert(id, 1);
        t.by_key.insert((dev, ino), id);
        id
    }

    /// A program opened the inode: its descriptor is kept until `closed`, so that it still
    /// works once the inode has no name.
    pub fn opened(&self, id: u64) {
        let Ok(inode) = self.get(id) else {
            return;
        };
        let mut t = self.table.lock();
        if let Some(entry) = t.by_id.get_mut(&id) {
            entry.opens += 1;
            if entry.pinned.is_none() {
                entry.pinned = Some(Arc::clone(&inode.fd));
            }
        }
    }

    /// A program closed the inode (see `opened`).
    pub fn closed(&self, id: u64) {
        let mut t = self.table.lock();
        if let Some(entry) = t.by_id.get_mut(&id) {
            entry.opens = entry.opens.saturating_sub(1);
            if entry.opens == 0 && entry.handle.is_some() {
                entry.pinned = None;
            }
        }
    }

    /// The kernel dropped `n` references to each of `(id, n)`.
    pub fn forget<const N: usize>(&self, nodes: [(u64, u64); N]) {
        let mut gone = Vec::new();
        {
            let mut t = self.table.lock();
            let mut cache = self.cache.lock();
            for (id, n) in nodes {
                if id == ROOT {
                    continue;
                }
                let Some(count) = t.lookups.get_mut(&id) else {
                    continue;
                };
                *count = count.saturating_sub(n);
                if *count == 0 {
                    t.lookups.remove(&id);
                    if let Some(entry) = t.by_id.remove(&id) {
                        t.by_key.remove(&(entry.dev, entry.ino));
                        gone.extend(entry.pinned);
                    }
                    gone.extend(cache.pop(&id).map(|(_, fd)| fd));
                }
            }
        }
        let mut forgotten = self.forgotten.lock();
        if forgotten.len() + gone.len() <= FORGOTTEN_MAX {
            forgotten.append(&mut gone);
        }
        // Otherwise `gone` is dropped here, closing its descriptors on this thread.
    }

    /// Closes the descriptors of forgotten inodes; returns how many.
    pub fn reap(&self) -> usize {
        let gone = std::mem::take(&mut *self.forgotten.lock());
        gone.len()
    }

    /// The FUSE number the inode `(dev, ino)` would have, if the kernel knows it.
    pub fn id_of(&self, dev: u64, ino: u64) -> Option<u64> {
        self.table.lock().by_key.get(&(dev, ino)).copied()
    }

    /// Descriptors held: pinned ones (open inodes, the root, inodes without handles) and
    /// cached ones.
    pub fn descriptors(&self) -> usize {
        let t = self.table.lock();
        let pinned = t.by_id.values().filter(|e| e.pinned.is_some()).count();
        pinned + self.cache.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{Mode, OFlags};

    #[test]
    fn a_symlink_is_opened_again_from_its_handle() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("target", dir.path().join("s")).unwrap();
        let root =
            rustix::fs::open(dir.path(), OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let fd =
            rustix::fs::openat(&root, "s", OFlags::PATH | OFlags::NOFOLLOW, Mode::empty()).unwrap();
        let handle = Handle::of(fd.as_fd()).expect("a handle");
        let again = handle
            .open(reopen_dir(root.as_fd()).unwrap().as_fd())
            .unwrap();
        let target = rustix::fs::readlinkat(&again, c"", Vec::new()).unwrap();
        assert_eq!(target.as_bytes(), b"target");
    }
}
