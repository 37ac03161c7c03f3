//! The pure rules of rsyncfs: who wrote what, in which causal order, and how concurrent writes
//! to one path settle. No I/O, no clock reads, no dependency on the other rsyncfs crates.
//!
//! The important types:
//!
//! - [`NodeId`]: a node's identity, a hash of its TLS public key.
//! - [`Hlc`]: a hybrid logical clock producing [`uhlc::Timestamp`]s; the caller passes the
//!   physical time in, so a simulator owns time.
//! - [`VersionVector`] and [`Dot`]: causality. Every write gets a unique dot `(node, counter)`.
//! - [`Sibling`]: one write's result (its dot, HLC timestamp and [`Meta`]: kind, size, hash,
//!   mode, mtime, symlink target).
//! - [`Record`]: the version of one path, a version vector plus the set of concurrent siblings
//!   that no write has superseded yet (a "dotted version vector set").
//!
//! [`join`] merges two records of one path. It is commutative, associative and idempotent, so
//! every replica that has seen the same writes holds the same record, whatever the order and the
//! number of deliveries. [`settle`] wraps it into the decision a replicator acts on, and
//! [`Record::winner`] and [`Record::copies`] turn a record into what the filesystem shows: the
//! winning sibling at the path and every other distinct content as a conflict copy whose name
//! ([`conflict_copy_name`]) and record ([`ConflictCopy::record`]) are pure functions of the
//! losing write, so that every host that makes the copy makes the same one.

mod hlc;
mod id;
mod settle;
mod version;
mod vv;

pub use hlc::{ClockSkew, Hlc};
pub use id::NodeId;
pub use settle::{
    conflict_copy_name, fold, is_conflict_copy, join, settle, ConflictCopy, Decision,
};
pub use version::{Content, Hash, Meta, Record, RecordError, Sibling, DIR_MODE_DEFAULT};
pub use vv::{Causality, Dot, VersionVector};

pub use uhlc::{Timestamp, NTP64};

/// Limits that bound what a record may hold; a peer sending more is misbehaving.
pub mod limits {
    /// Concurrent siblings one record may carry. A node's own writes are always causally ordered,
    /// so siblings never outnumber the nodes that wrote the path concurrently.
    pub const SIBLINGS_MAX: usize = 64;
    /// Entries of one version vector: nodes that ever wrote one path.
    pub const VV_ENTRIES_MAX: usize = 1024;
    /// Bytes of a symlink target (Linux PATH_MAX).
    pub const SYMLINK_TARGET_BYTES_MAX: usize = 4096;
    /// Bytes of one path component (Linux NAME_MAX).
    pub const NAME_BYTES_MAX: usize = 255;
    /// Bytes of one replicated path, relative to the tree's root: the longest path string a
    /// system call takes (Linux PATH_MAX, 4,096 with its NUL).
    pub const PATH_BYTES_MAX: usize = 4095;
    /// Bytes a conflict copy's name adds to the name it is a copy of, at most:
    /// `.sync-conflict-YYYYMMDD-HHMMSS-` (31), a short node id (7), `-` and a counter (up to
    /// 20 digits).
    pub const CONFLICT_TAG_BYTES_MAX: usize = 31 + 7 + 1 + 20;
    /// Bytes of the directory part of a replicated path: what leaves room, in the same
    /// directory, for a conflict copy whose name is its tag alone. A conflict copy of any path
    /// whose directory is within this limit is itself within every limit (the stem and the
    /// extension are shortened to fit), so the copy of a copy is too.
    pub const DIR_BYTES_MAX: usize = PATH_BYTES_MAX - 1 - CONFLICT_TAG_BYTES_MAX;

    /// Bytes of a postcard varint of a `u64` / `u32`, at most.
    const VARINT_U64: usize = 10;
    const VARINT_U32: usize = 5;
    /// Bytes of one [`crate::Sibling`]'s meta, encoded, at most: the content (a symlink's target
    /// is the largest), mode, mtime, owner and extended attributes with their length prefixes.
    const META_ENCODED_BYTES_MAX: usize = 1
        + (VARINT_U32 + SYMLINK_TARGET_BYTES_MAX)
        + VARINT_U32
        + VARINT_U64
        + (1 + 2 * VARINT_U32)
        + VARINT_U32
        + XATTRS_MAX * 2 * VARINT_U32
        + XATTRS_BYTES_MAX;
    /// Bytes of one sibling: its dot (id and counter), HLC timestamp (time and a length-prefixed
    /// id) and meta.
    const SIBLING_ENCODED_BYTES_MAX: usize =
        (16 + VARINT_U64) + (VARINT_U64 + 1 + 16) + META_ENCODED_BYTES_MAX;
    /// Bytes of a [`crate::Record`] that passes [`crate::Record::validate`], encoded with
    /// postcard, at most (a test builds the largest record and checks it).
    pub const RECORD_ENCODED_BYTES_MAX: usize = (VARINT_U32 + VV_ENTRIES_MAX * (16 + VARINT_U64))
        + (VARINT_U32 + SIBLINGS_MAX * SIBLING_ENCODED_BYTES_MAX)
        + (1 + 16);

    // The relations the limits above rely on, checked when the crate builds.
    const _: () = assert!(CONFLICT_TAG_BYTES_MAX < NAME_BYTES_MAX);
    const _: () = assert!(DIR_BYTES_MAX + 1 + CONFLICT_TAG_BYTES_MAX <= PATH_BYTES_MAX);
    const _: () = assert!(NAME_BYTES_MAX < DIR_BYTES_MAX);
    /// Extended attributes one version carries, and their bytes (names and values) in all.
    pub const XATTRS_MAX: usize = 64;
    pub const XATTRS_BYTES_MAX: usize = 64 * 1024;
    /// Bytes of an extended attribute's name (Linux XATTR_NAME_MAX).
    pub const XATTR_NAME_BYTES_MAX: usize = 255;
}
