//! What one write produced (a [`Sibling`]) and the version of a path (a [`Record`]).

use crate::limits::{
    SIBLINGS_MAX, SYMLINK_TARGET_BYTES_MAX, VV_ENTRIES_MAX, XATTRS_BYTES_MAX, XATTRS_MAX,
    XATTR_NAME_BYTES_MAX,
};
use crate::{Dot, NodeId, VersionVector};
use serde::{Deserialize, Serialize};
use uhlc::Timestamp;

/// A BLAKE3 content hash.
pub type Hash = [u8; 32];

/// The mode a directory gets when it exists only because something inside it does.
pub const DIR_MODE_DEFAULT: u32 = 0o755;

/// What a path holds. Two contents are "the same" for conflict purposes when they are equal;
/// mode and mtime are attributes, not content.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum Content {
    /// The path was removed.
    Tombstone,
    Dir,
    File {
        size: u64,
        hash: Hash,
    },
    Symlink {
        target: String,
    },
}

/// The content of a path and its attributes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Meta {
    pub content: Content,
    /// Permission bits (`0o7777`); zero for tombstones and symlinks.
    pub mode: u32,
    /// Modification time of a file in nanoseconds since the UNIX epoch; zero for the other kinds
    /// (directory times change with every entry and are not replicated).
    pub mtime_ns: i64,
    /// Owner and group, where the writer knew them (a node runs as root and applies them).
    pub owner: Option<(u32, u32)>,
    /// Extended attributes of a file or directory, sorted by name, names unique.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    pub fn tombstone() -> Meta {
        Meta {
            content: Content::Tombstone,
            mode: 0,
            mtime_ns: 0,
            owner: None,
            xattrs: Vec::new(),
        }
    }

    pub fn dir(mode: u32) -> Meta {
        Meta {
            content: Content::Dir,
            mode: mode & 0o7777,
            mtime_ns: 0,
            owner: None,
            xattrs: Vec::new(),
        }
    }

    pub fn file(size: u64, hash: Hash, mode: u32, mtime_ns: i64) -> Meta {
        Meta {
            content: Content::File { size, hash },
            mode: mode & 0o7777,
            mtime_ns,
            owner: None,
            xattrs: Vec::new(),
        }
    }

    pub fn symlink(target: String) -> Meta {
        Meta {
            content: Content::Symlink { target },
            mode: 0,
            mtime_ns: 0,
            owner: None,
            xattrs: Vec::new(),
        }
    }

    /// The same, with an owner.
    pub fn with_owner(mut self, uid: u32, gid: u32) -> Meta {
        self.owner = Some((uid, gid));
        self
    }

    /// The same, with these extended attributes (sorted here).
    pub fn with_xattrs(mut self, mut xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Meta {
        xattrs.sort();
        xattrs.dedup_by(|a, b| a.0 == b.0);
        self.xattrs = xattrs;
        self
    }

    pub fn is_tombstone(&self) -> bool {
        matches!(self.content, Content::Tombstone)
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.content, Content::Dir)
    }

    /// Files and symlinks: what a conflict copy can preserve.
    pub fn has_data(&self) -> bool {
        matches!(self.content, Content::File { .. } | Content::Symlink { .. })
    }

    /// The file's content hash, if this is a file.
    pub fn file_hash(&self) -> Option<(Hash, u64)> {
        match self.content {
            Content::File { size, hash } => Some((hash, size)),
            _ => None,
        }
    }
}

/// One write that no later write has superseded: its dot, when it happened and what it made.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Sibling {
    pub dot: Dot,
    pub hlc: Timestamp,
    pub meta: Meta,
}

impl Sibling {
    /// The order in which concurrent siblings compete for the path: directories beat everything
    /// (a directory may hold writes of other nodes), then data beats removal (modify beats
    /// delete), then the later HLC timestamp, whose id is the origin; the dot breaks the last tie.
    pub(crate) fn rank(&self) -> (u8, Timestamp, Dot) {
        let class = match self.meta.content {
            Content::Tombstone => 0,
            Content::File { .. } | Content::Symlink { .. } => 1,
            Content::Dir => 2,
        };
        (class, self.hlc, self.dot)
    }
}

/// A record a peer sent that breaks the rules records keep.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record has no sibling")]
    NoSibling,
    #[error("record has {0} siblings, more than {SIBLINGS_MAX}")]
    TooManySiblings(usize),
    #[error("version vector has {0} entries, more than {VV_ENTRIES_MAX}")]
    VectorTooLong(usize),
    #[error("version vector is not canonical (unsorted, duplicate or zero entries)")]
    VectorNotCanonical,
    #[error("siblings are not sorted by dot, or two come from one node")]
    SiblingsUnordered,
    #[error("a sibling's dot is not covered by the record's version vector")]
    DotNotCovered,
    #[error("a sibling's timestamp was not made by the node of its dot")]
    ForeignTimestamp,
    #[error("symlink target is empty, too long or holds a NUL byte")]
    BadSymlink,
    #[error("mode has bits outside 0o7777")]
    BadMode,
    #[error("extended attributes are unsorted, too many, too large or badly named")]
    BadXattrs,
}

/// The version of one path: everything the replica has seen of the path's writes (`vv`) and the
/// writes among them that nothing has superseded (`siblings`, usually one).
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Record {
    pub vv: VersionVector,
    /// Sorted by dot; at most one per node, since a node's own writes are causally ordered.
    pub siblings: Vec<Sibling>,
    /// The node whose local write made exactly this record, if it was not made by merging
    /// concurrent records. Replicators never send a record back to its author.
    pub author: Option<NodeId>,
}

impl Record {
    /// The record of a new local write at `dot`, made on top of what the replica had (`base`).
    pub fn write(base: Option<&Record>, dot: Dot, hlc: Timestamp, meta: Meta) -> Record {
        let mut vv = base.map(|r| r.vv.clone()).unwrap_or_default();
        assert!(
            !vv.covers(&dot),
            "a new write's dot must be new to its path"
        );
        vv.add(dot);
        Record {
            vv,
            siblings: vec![Sibling { dot, hlc, meta }],
            author: Some(dot.node),
        }
    }

    /// The sibling the path shows.
    pub fn winner(&self) -> &Sibling {
        self.siblings
            .iter()
            .max_by_key(|s| s.rank())
            .expect("records have at least one sibling")
    }

    /// True when the path exists in this version (the winner is not a tombstone).
    pub fn is_live(&self) -> bool {
        !self.winner().meta.is_tombstone()
    }

    /// Checks the rules every record keeps; records from peers must pass before use.
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.vv.len() > VV_ENTRIES_MAX {
            return Err(RecordError::VectorTooLong(self.vv.len()));
        }
        if !self.vv.is_canonical() {
            return Err(RecordError::VectorNotCanonical);
        }
        if self.siblings.is_empty() {
            return Err(RecordError::NoSibling);
        }
        if self.siblings.len() > SIBLINGS_MAX {
            return Err(RecordError::TooManySiblings(self.siblings.len()));
        }
        if !self
            .siblings
            .windows(2)
            .all(|w| w[0].dot.node < w[1].dot.node)
        {
            return Err(RecordError::SiblingsUnordered);
        }
        for s in &self.siblings {
            if s.dot.counter == 0 || !self.vv.covers(&s.dot) {
                return Err(RecordError::DotNotCovered);
            }
            if *s.hlc.get_id() != s.dot.node.hlc_id() {
                return Err(RecordError::ForeignTimestamp);
            }
            if s.meta.mode & !0o7777 != 0 {
                return Err(RecordError::BadMode);
            }
            let x = &s.meta.xattrs;
            let bytes: usize = x.iter().map(|(n, v)| n.len() + v.len()).sum();
            let names_ok = x
                .iter()
                .all(|(n, _)| !n.is_empty() && n.len() <= XATTR_NAME_BYTES_MAX && !n.contains(&0));
            if x.len() > XATTRS_MAX
                || bytes > XATTRS_BYTES_MAX
                || !names_ok
                || !x.windows(2).all(|w| w[0].0 < w[1].0)
            {
                return Err(RecordError::BadXattrs);
            }
            if let Content::Symlink { target } = &s.meta.content {
                if target.is_empty()
                    || target.len() > SYMLINK_TARGET_BYTES_MAX
                    || target.contains('\0')
                {
                    return Err(RecordError::BadSymlink);
                }
            }
        }
        Ok(())
    }
}
