//! Relative paths inside a replicated tree, checked before anything uses them.

use rsyncfs_conflict::limits::{DIR_BYTES_MAX, NAME_BYTES_MAX};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The folder inside the backing directory where a node keeps its store and temporary files.
/// It is never replicated and a path into it is refused.
pub const STATE_DIR_NAME: &str = ".rsyncfs";

pub use rsyncfs_conflict::limits::PATH_BYTES_MAX;

/// A path that cannot name anything inside a replicated tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path is {0} bytes, more than {PATH_BYTES_MAX}")]
    TooLong(usize),
    #[error("path is absolute")]
    Absolute,
    #[error("path has an empty, '.' or '..' component")]
    BadComponent,
    #[error("path component is longer than {NAME_BYTES_MAX} bytes")]
    NameTooLong,
    #[error("the directory part of the path is longer than {DIR_BYTES_MAX} bytes (no room for a conflict copy)")]
    DirTooLong,
    #[error("path holds a NUL byte")]
    Nul,
    #[error("path is inside the state folder {STATE_DIR_NAME}")]
    StateDir,
}

/// A normalised relative path: components separated by single `/`, none empty, `.` or `..`, no
/// NUL byte, within Linux's limits, with a directory part short enough for a conflict copy of it
/// to be a valid path too, and not inside the state folder. Ordered bytewise, so that
/// everything under `a` sorts between `a/` and `a0`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

impl RelPath {
    pub fn new(path: impl Into<String>) -> Result<RelPath, PathError> {
        let path = path.into();
        if path.is_empty() {
            return Err(PathError::Empty);
        }
        if path.len() > PATH_BYTES_MAX {
            return Err(PathError::TooLong(path.len()));
        }
        if path.starts_with('/') {
            return Err(PathError::Absolute);
        }
        if path.contains('\0') {
            return Err(PathError::Nul);
        }
        for component in path.split('/') {
            if component.is_empty() || component == "." || component == ".." {
                return Err(PathError::BadComponent);
            }
            if component.len() > NAME_BYTES_MAX {
                return Err(PathError::NameTooLong);
            }
        }
        if path.rfind('/').is_some_and(|i| i > DIR_BYTES_MAX) {
            return Err(PathError::DirTooLong);
        }
        if path.split('/').next() == Some(STATE_DIR_NAME) {
            return Err(PathError::StateDir);
        }
        Ok(RelPath(path))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The directory holding this path, if it is not at the top.
    pub fn parent(&self) -> Option<RelPath> {
        self.parent_str().map(|p| RelPath(p.to_string()))
    }

    /// [`RelPath::parent`], borrowed (nothing is copied).
    pub fn parent_str(&self) -> Option<&str> {
        self.0.rfind('/').map(|i| &self.0[..i])
    }

    /// Every directory above this path, nearest first (made one at a time: a caller that
    /// stops early pays only for what it took).
    pub fn ancestors(&self) -> impl Iterator<Item = RelPath> + '_ {
        let mut end = self.0.len();
        std::iter::from_fn(move || {
            let i = self.0[..end].rfind('/')?;
            end = i;
            Some(RelPath(self.0[..i].to_string()))
        })
    }

    /// The last component.
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().expect("paths are not empty")
    }

    /// A path below this one.
    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        RelPath::new(format!("{}/{}", self.0, name))
    }

    /// True when `self` is strictly below `dir`.
    pub fn is_under(&self, dir: &RelPath) -> bool {
        self.0.len() > dir.0.len()
            && self.0.starts_with(&dir.0)
            && self.0.as_bytes()[dir.0.len()] == b'/'
    }

    /// The first and the past-the-end key of everything strictly below this path, for ranges
    /// over maps ordered by path.
    pub fn under_bounds(&self) -> (RelPath, RelPath) {
        (
            RelPath(format!("{}/", self.0)),
            RelPath(format!("{}0", self.0)),
        )
    }

    /// The components, top first.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<RelPath, PathError> {
        RelPath::new(s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_normal_paths() {
        for p in ["a", "a/b", "a b/c.d", ".hidden/x", "..x", "x..", "é/ü"] {
            assert!(RelPath::new(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn refuses_hostile_paths() {
        assert_eq!(RelPath::new(""), Err(PathError::Empty));
        assert_eq!(RelPath::new("/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(RelPath::new("a/../../x"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new(".."), Err(PathError::BadComponent));
        assert_eq!(RelPath::new("a//b"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new("a/"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new("./a"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new("a\0b"), Err(PathError::Nul));
        assert_eq!(RelPath::new(".rsyncfs/store"), Err(PathError::StateDir));
        assert_eq!(RelPath::new(".rsyncfs"), Err(PathError::StateDir));
        assert!(RelPath::new("a/.rsyncfs").is_ok());
        assert_eq!(RelPath::new("x".repeat(256)), Err(PathError::NameTooLong));
        assert!(matches!(
            RelPath::new("a/".repeat(3000) + "a"),
            Err(PathError::TooLong(_))
        ));
        let deep = "a/".repeat(DIR_BYTES_MAX / 2 + 2) + "a";
        assert!(deep.len() <= PATH_BYTES_MAX);
        assert_eq!(RelPath::new(deep), Err(PathError::DirTooLong));
        // Decoding goes through the same checks.
        let bytes = postcard::to_stdvec(&"../x".to_string()).unwrap();
        assert!(postcard::from_bytes::<RelPath>(&bytes).is_err());
    }

    proptest::proptest! {
        /// A conflict copy of any valid path is a valid path in the same directory: the copy
        /// names of the conflict rules and the path rules compose.
        #[test]
        fn conflict_copies_of_valid_paths_are_valid(
            depth in 0usize..2100,
            dir_len in 1usize..=5,
            name in "[a-zé.]{1,255}",
            counter in 1u64..u64::MAX,
            secs in 0u64..u32::MAX as u64,
        ) {
            let mut path = String::new();
            while path.len() + dir_len < DIR_BYTES_MAX && depth > path.len() / (dir_len + 1) {
                path.push_str(&"d".repeat(dir_len));
                path.push('/');
            }
            let mut name = name;
            while name.len() > NAME_BYTES_MAX {
                name.pop();
            }
            if name == "." || name == ".." {
                name.push('x');
            }
            path.push_str(&name);
            let Ok(path) = RelPath::new(path) else {
                return Ok(()); // too long altogether; nothing to copy
            };
            let node = rsyncfs_conflict::NodeId::from_index(3);
            let sibling = rsyncfs_conflict::Sibling {
                dot: rsyncfs_conflict::Dot { node, counter },
                hlc: rsyncfs_conflict::Timestamp::new(rsyncfs_conflict::NTP64(secs << 32), node.hlc_id()),
                meta: rsyncfs_conflict::Meta::tombstone(),
            };
            let copy = rsyncfs_conflict::conflict_copy_name(path.as_str(), &sibling);
            let copy = RelPath::new(copy.clone());
            proptest::prop_assert!(copy.is_ok(), "{:?}", copy);
            let copy = copy.unwrap();
            proptest::prop_assert_eq!(copy.parent(), path.parent());
        }
    }

    #[test]
    fn structure() {
        let p = RelPath::new("a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        let anc: Vec<_> = p.ancestors().map(|a| a.0).collect();
        assert_eq!(anc, vec!["a/b", "a"]);
        assert_eq!(p.name(), "c");
        let a = RelPath::new("a").unwrap();
        assert!(p.is_under(&a));
        assert!(!a.is_under(&a));
        assert!(!RelPath::new("ab").unwrap().is_under(&a));
        let (lo, hi) = a.under_bounds();
        assert!(lo < p && p < hi);
        assert!(!(lo <= RelPath::new("a-b").unwrap() && RelPath::new("a-b").unwrap() < hi));
    }
}
