//! Updating a large file in place, under a redo journal.
//!
//! A whole new copy of a 1 GiB file for a 1 MiB change costs a gigabyte of writes where the
//! filesystem cannot share blocks between files (ext4, tmpfs: `copy_file_range` copies there).
//! So on such filesystems, when the receiver's own file at the path is the basis of a large
//! fetch, the fetch stages only the segments that differ (a [`Patch`]: a sparse staging file
//! holding them at their own offsets), and the apply writes them into the file itself:
//!
//! 1. the staging file and its name are made durable (with the apply's other contents);
//! 2. inside the mount's exclusive section, once the path is found to hold the patch's basis,
//!    a [`Record`] naming the file (by path and identity), the staging file, the segments, the
//!    new size and attributes is written to the journal and synced;
//! 3. the segments are copied into the file, its size and attributes set, and it is synced;
//! 4. the journal is cleared and synced, still inside the section.
//!
//! A crash before step 2 ends leaves the file untouched; after it, the next start finds the
//! record and does step 3 again (it is idempotent) before anything else reads the tree. The
//! record is cleared before the section ends, so it is never replayed over a later local write.
//!
//! What differs from a rename: a program on this node that holds the file open sees the new
//! bytes (as it would see a local writer's), and a hard-linked file is never updated in place.
//! Filesystems that clone ranges (btrfs, XFS) keep the rename: their copy shares blocks.

use super::segments;
use rsyncfs_conflict::{Hash, Meta};
use rustix::fs::FallocateFlags;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Staging files of patches start with this (they are never kept as partial copies).
pub(super) const PATCH: &str = "d-";
/// Files at least this large are updated in place where the filesystem would copy them.
pub const IN_PLACE_MIN: u64 = 64 << 20;
/// The journal, in the state folder.
const JOURNAL_FILE: &str = "in-place.journal";
/// Largest record (a patch of every segment of a 512 GiB file, and its attributes, fit).
const RECORD_MAX: usize = 4 << 20;
/// Patches staged and not yet applied or released, at most.
pub(super) const PATCHES_MAX: usize = 256;

/// `statfs` types of filesystems that overwrite a file's blocks in place and copy (not share)
/// them in `copy_file_range`: ext2/3/4 and tmpfs.
const OVERWRITING: &[u64] = &[0xEF53, 0x0102_1994];

/// Whether files of the filesystem holding `fd` are updated in place.
pub fn overwrites_in_place(fd: impl std::os::fd::AsFd) -> bool {
    rustix::fs::fstatfs(fd).is_ok_and(|s| OVERWRITING.contains(&(s.f_type as u64)))
}

/// A fetched content staged as the segments in which it differs from its basis.
#[derive(Clone, Debug, PartialEq)]
pub struct Patch {
    /// The content the segments apply to, and its size.
    pub basis: (Hash, u64),
    /// The new content's size.
    pub size: u64,
    /// Indices of the segments staged (each at its own offset in the staging file).
    pub segments: Vec<u64>,
}

/// One update in place, as the journal holds it.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub(super) struct Record {
    /// The file, relative to the tree's root, and its identity.
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    /// The staging file's name in the temporary folder.
    pub staged: String,
    pub size: u64,
    pub segments: Vec<u64>,
    pub meta: Meta,
}

/// The journal file: empty, or one record (its length, its BLAKE3 hash, the record).
pub(super) struct Journal {
    file: File,
}

impl Journal {
    /// Opens (or makes) the journal in `state`; returns it and the record it holds, if any.
    pub fn open(state: &Path) -> std::io::Result<(Journal, Option<Record>)> {
        let path = state.join(JOURNAL_FILE);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        File::open(state)?.sync_all()?;
        let journal = Journal { file };
        let record = journal.read().unwrap_or_else(|why| {
            tracing::warn!("{}: {why}; ignored", path.display());
            None
        });
        Ok((journal, record))
    }

    pub(super) fn read(&self) -> Result<Option<Record>, String> {
        let mut head = [0u8; 36];
        match self.file.read_exact_at(&mut head, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.to_string()),
        }
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            return Ok(None);
        }
        if len > RECORD_MAX {
            return Err(format!("a record of {len} bytes"));
        }
        let mut body = vec![0u8; len];
        // A record cut short or torn was never synced whole: its update never began.
        if self.file.read_exact_at(&mut body, 36).is_err()
            || blake3::hash(&body).as_bytes() != &head[4..]
        {
            return Ok(None);
        }
        postcard::from_bytes(&body)
            .map(Some)
            .map_err(|e| format!("a record that does not decode ({e})"))
    }

    /// Writes `record` and makes it durable.
    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        let body = postcard::to_stdvec(record).expect("encoding");
        if body.len() > RECORD_MAX {
            return Err(std::io::Error::other(
                "update in place too large to journal",
            ));
        }
        let mut out = Vec::with_capacity(36 + body.len());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(blake3::hash(&body).as_bytes());
        out.extend_from_slice(&body);
        self.file.write_all_at(&out, 0)?;
        self.file.sync_data()
    }

    /// Marks the journal empty, durably.
    pub fn clear(&mut self) -> std::io::Result<()> {
        self.file.write_all_at(&[0u8; 4], 0)?;
        self.file.sync_data()
    }
}

/// Writes the staged segments of `record` into `target` and sets its size (step 3, but for
/// the attributes and the sync). Doing it twice gives what doing it once does.
pub(super) fn redo(target: &File, staged: &File, record: &Record) -> std::io::Result<()> {
    for (at, len) in ranges(record) {
        segments::copy_range(staged, target, at, len)?;
    }
    target.set_len(record.size)?;
    Ok(())
}

/// Makes room for the segments of `record` beyond what `target` has allocated, so that a full
/// disk fails the update before it writes anything (where the filesystem can say).
pub(super) fn reserve(target: &File, record: &Record) -> std::io::Result<()> {
    for (at, len) in ranges(record) {
        match rustix::fs::fallocate(target, FallocateFlags::KEEP_SIZE, at, len as u64) {
            Ok(()) => {}
            Err(rustix::io::Errno::OPNOTSUPP) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Offset and length of each segment of `record` (segments the new size leaves out are none).
fn ranges(record: &Record) -> impl Iterator<Item = (u64, usize)> + '_ {
    record
        .segments
        .iter()
        .filter(|&&i| i < segments::count(record.size))
        .map(|&i| (i * segments::SEGMENT, segments::len(record.size, i)))
}
