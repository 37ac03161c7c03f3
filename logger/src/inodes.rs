//! The inodes the kernel knows: one `O_PATH` descriptor each, counted by lookups.
//!
//! A FUSE inode number is the backing inode number, so that `stat` through the mount shows the
//! backing filesystem's numbers, stable across renames and shared by hard links. The backing
//! root is inode 1 (FUSE's root). Inodes of another filesystem mounted inside the backing
//! directory get numbers with the top bit set, allocated in order, to keep them apart.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

/// One inode the kernel knows.
#[derive(Debug)]
pub(crate) struct Inode {
    pub fd: OwnedFd,
    pub dev: u64,
    pub ino: u64,
}

impl Inode {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[derive(Debug, Default)]
struct Table {
    by_id: HashMap<u64, Arc<Inode>>,
    lookups: HashMap<u64, u64>,
    by_key: HashMap<(u64, u64), u64>,
    next_foreign: u64,
}

/// The table, shared by the filesystem's worker threads.
#[derive(Debug)]
pub(crate) struct Inodes {
    table: Mutex<Table>,
    /// Inodes the kernel forgot, whose descriptors a low-priority thread closes later: closing
    /// ten thousand descriptors after a cache drop would otherwise delay the lookups that follow.
    forgotten: Mutex<Vec<Arc<Inode>>>,
    root_dev: u64,
    root_ino: u64,
}

/// Forgotten inodes waiting to be closed, beyond which `forget` closes them itself.
pub(crate) const FORGOTTEN_MAX: usize = 65_536;

pub(crate) const ROOT: u64 = 1;
const FOREIGN: u64 = 1 << 63;

impl Inodes {
    pub fn new(root_fd: OwnedFd, dev: u64, ino: u64) -> Inodes {
        let mut table = Table {
            next_foreign: FOREIGN,
            ..Table::default()
        };
        let root = Arc::new(Inode {
            fd: root_fd,
            dev,
            ino,
        });
        table.by_id.insert(ROOT, root);
        table.lookups.insert(ROOT, u64::MAX / 2);
        table.by_key.insert((dev, ino), ROOT);
        Inodes {
            table: Mutex::new(table),
            forgotten: Mutex::new(Vec::new()),
            root_dev: dev,
            root_ino: ino,
        }
    }

    pub fn get(&self, id: u64) -> Option<Arc<Inode>> {
        self.table.lock().by_id.get(&id).cloned()
    }

    /// Records one more kernel reference to the inode with backing identity `(dev, ino)`,
    /// opened as `fd` (dropped if the inode is known already), and returns its FUSE number.
    pub fn remember(&self, fd: OwnedFd, dev: u64, ino: u64) -> u64 {
        let mut t = self.table.lock();
        if let Some(&id) = t.by_key.get(&(dev, ino)) {
            *t.lookups.entry(id).or_insert(0) += 1;
            return id;
        }
        let id = if dev == self.root_dev && ino != self.root_ino && ino < FOREIGN && ino != ROOT {
            ino
        } else {
            t.next_foreign += 1;
            t.next_foreign
        };
        t.by_id.insert(id, Arc::new(Inode { fd, dev, ino }));
        t.lookups.insert(id, 1);
        t.by_key.insert((dev, ino), id);
        id
    }

    /// The kernel dropped `n` references to each of `(id, n)`.
    pub fn forget<const N: usize>(&self, nodes: [(u64, u64); N]) {
        let mut gone = Vec::new();
        {
            let mut t = self.table.lock();
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
                    if let Some(inode) = t.by_id.remove(&id) {
                        t.by_key.remove(&(inode.dev, inode.ino));
                        gone.push(inode);
                    }
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
}
