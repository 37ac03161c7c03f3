//! An in-memory filesystem, one per simulated node: what its users see through the mount and
//! what the driver changes underneath when it applies a peer's update.

use bytes::Bytes;
use rsyncfs_conflict::{Content, Hash, Meta, DIR_MODE_DEFAULT};
use rsyncfs_mesh::engine::{Action, Apply, ApplyError, IoFailure, IoKind, Source, StagedId};
use std::collections::{BTreeMap, BTreeSet};

/// Extended attributes of a file or directory, sorted by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File {
        data: Bytes,
        hash: Hash,
        mode: u32,
        mtime_ns: i64,
        xattrs: Xattrs,
    },
    Dir {
        mode: u32,
        xattrs: Xattrs,
    },
    Symlink {
        target: String,
    },
}

impl Node {
    pub fn file(data: Bytes, mode: u32, mtime_ns: i64) -> Node {
        let hash = *blake3::hash(&data).as_bytes();
        Node::File {
            data,
            hash,
            mode,
            mtime_ns,
            xattrs: Vec::new(),
        }
    }

    pub fn dir(mode: u32) -> Node {
        Node::Dir {
            mode,
            xattrs: Vec::new(),
        }
    }

    pub fn meta(&self) -> Meta {
        match self {
            Node::File {
                data,
                hash,
                mode,
                mtime_ns,
                xattrs,
            } => Meta::file(data.len() as u64, *hash, *mode, *mtime_ns).with_xattrs(xattrs.clone()),
            Node::Dir { mode, xattrs } => Meta::dir(*mode).with_xattrs(xattrs.clone()),
            Node::Symlink { target } => Meta::symlink(target.clone()),
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self, Node::Dir { .. })
    }
}

/// Why a user's operation failed, as errno would say.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Errno {
    NoEnt,
    Exist,
    NotDir,
    IsDir,
    NotEmpty,
    /// The disk is full.
    NoSpace,
}

/// A tree of files, directories and symlinks keyed by relative path. Parents sort before their
/// children, so iteration is a top-down walk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimFs {
    nodes: BTreeMap<String, Node>,
    /// While set, nothing new can be written (ENOSPC): file contents, directories, symlinks.
    pub full: bool,
}

fn parent(path: &str) -> Option<&str> {
    path.rfind('/').map(|i| &path[..i])
}

impl SimFs {
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    pub fn meta(&self, path: &str) -> Option<Meta> {
        self.nodes.get(path).map(Node::meta)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.nodes.iter()
    }

    /// Keeps only the paths `keep` says yes to (for comparisons).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.nodes.retain(|p, _| keep(p));
    }

    /// Paths strictly below `dir`.
    pub fn below<'a>(&'a self, dir: &str) -> impl Iterator<Item = (&'a String, &'a Node)> + 'a {
        let lo = format!("{dir}/");
        let hi = format!("{dir}0");
        self.nodes.range(lo..hi)
    }

    fn parent_ok(&self, path: &str) -> Result<(), Errno> {
        match parent(path) {
            None => Ok(()),
            Some(p) => match self.nodes.get(p) {
                Some(Node::Dir { .. }) => Ok(()),
                Some(_) => Err(Errno::NotDir),
                None => Err(Errno::NoEnt),
            },
        }
    }

    /// Contents of every file, for the "no write lost" check.
    pub fn contents(&self) -> BTreeSet<Hash> {
        self.nodes
            .values()
            .filter_map(|n| match n {
                Node::File { hash, .. } => Some(*hash),
                _ => None,
            })
            .collect()
    }

    pub fn find_content(&self, hash: &Hash, hint: &str) -> Option<Bytes> {
        if let Some(Node::File { data, hash: h, .. }) = self.nodes.get(hint) {
            if h == hash {
                return Some(data.clone());
            }
        }
        self.nodes.values().find_map(|n| match n {
            Node::File { data, hash: h, .. } if h == hash => Some(data.clone()),
            _ => None,
        })
    }

    // ---- What users do through the mount ----

    /// Creates or replaces a file (open with O_CREAT|O_TRUNC, write, close).
    pub fn write(
        &mut self,
        path: &str,
        data: Bytes,
        mode: u32,
        mtime_ns: i64,
    ) -> Result<(), Errno> {
        self.parent_ok(path)?;
        if self.full {
            return Err(Errno::NoSpace);
        }
        match self.nodes.get(path) {
            Some(Node::Dir { .. }) => return Err(Errno::IsDir),
            Some(Node::Symlink { .. }) => {
                // Writing through a symlink would follow it; users here replace it instead.
                self.nodes.remove(path);
            }
            _ => {}
        }
        let (mode, xattrs) = match self.nodes.get(path) {
            Some(Node::File { mode, xattrs, .. }) => (*mode, xattrs.clone()),
            _ => (mode, Vec::new()),
        };
        let mut node = Node::file(data, mode, mtime_ns);
        if let Node::File { xattrs: x, .. } = &mut node {
            *x = xattrs;
        }
        self.nodes.insert(path.to_string(), node);
        Ok(())
    }

    pub fn read_file(&self, path: &str) -> Option<Bytes> {
        match self.nodes.get(path) {
            Some(Node::File { data, .. }) => Some(data.clone()),
            _ => None,
        }
    }

    pub fn mkdir(&mut self, path: &str, mode: u32) -> Result<(), Errno> {
        self.parent_ok(path)?;
        if self.nodes.contains_key(path) {
            return Err(Errno::Exist);
        }
        if self.full {
            return Err(Errno::NoSpace);
        }
        self.nodes.insert(path.to_string(), Node::dir(mode));
        Ok(())
    }

    /// setxattr of a whole set (replacing what was there) on a file or directory.
    pub fn set_xattrs(&mut self, path: &str, new: Xattrs) -> Result<(), Errno> {
        if self.full {
            return Err(Errno::NoSpace);
        }
        match self.nodes.get_mut(path) {
            Some(Node::File { xattrs, .. }) | Some(Node::Dir { xattrs, .. }) => {
                *xattrs = Meta::tombstone().with_xattrs(new).xattrs;
                Ok(())
            }
            _ => Err(Errno::NoEnt),
        }
    }

    pub fn rmdir(&mut self, path: &str) -> Result<(), Errno> {
        match self.nodes.get(path) {
            Some(Node::Dir { .. }) => {}
            Some(_) => return Err(Errno::NotDir),
            None => return Err(Errno::NoEnt),
        }
        if self.below(path).next().is_some() {
            return Err(Errno::NotEmpty);
        }
        self.nodes.remove(path);
        Ok(())
    }

    pub fn unlink(&mut self, path: &str) -> Result<(), Errno> {
        match self.nodes.get(path) {
            Some(Node::Dir { .. }) => Err(Errno::IsDir),
            Some(_) => {
                self.nodes.remove(path);
                Ok(())
            }
            None => Err(Errno::NoEnt),
        }
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), Errno> {
        self.parent_ok(path)?;
        if self.nodes.contains_key(path) {
            return Err(Errno::Exist);
        }
        if self.full {
            return Err(Errno::NoSpace);
        }
        self.nodes.insert(
            path.to_string(),
            Node::Symlink {
                target: target.to_string(),
            },
        );
        Ok(())
    }

    pub fn chmod(&mut self, path: &str, new_mode: u32) -> Result<(), Errno> {
        match self.nodes.get_mut(path) {
            Some(Node::File { mode, .. }) | Some(Node::Dir { mode, .. }) => {
                *mode = new_mode;
                Ok(())
            }
            Some(Node::Symlink { .. }) => Err(Errno::NoEnt),
            None => Err(Errno::NoEnt),
        }
    }

    /// rename(2) without flags: a file or symlink may replace a file or symlink, a directory an
    /// empty directory; a directory cannot move into itself.
    pub fn rename(&mut self, from: &str, to: &str) -> Result<(), Errno> {
        let Some(src) = self.nodes.get(from) else {
            return Err(Errno::NoEnt);
        };
        if from == to {
            return Ok(());
        }
        self.parent_ok(to)?;
        if to.starts_with(&format!("{from}/")) {
            return Err(Errno::Exist);
        }
        let src_dir = src.is_dir();
        match self.nodes.get(to) {
            Some(Node::Dir { .. }) if !src_dir => return Err(Errno::IsDir),
            Some(Node::Dir { .. }) if self.below(to).next().is_some() => {
                return Err(Errno::NotEmpty)
            }
            Some(n) if src_dir && !n.is_dir() => return Err(Errno::NotDir),
            _ => {}
        }
        let moved: Vec<(String, Node)> = std::iter::once((from.to_string(), src.clone()))
            .chain(self.below(from).map(|(p, n)| (p.clone(), n.clone())))
            .collect();
        for (p, _) in &moved {
            self.nodes.remove(p);
        }
        self.nodes.remove(to);
        for (p, n) in moved {
            let new = format!("{to}{}", &p[from.len()..]);
            self.nodes.insert(new, n);
        }
        Ok(())
    }

    // ---- What the driver does for the engine ----

    /// Carries out an engine's apply against this tree, with the checks a real driver makes.
    pub fn apply(
        &mut self,
        apply: &Apply,
        open_for_write: &BTreeSet<String>,
        staged: &BTreeMap<StagedId, Bytes>,
    ) -> Result<(), ApplyError> {
        let path = apply.path.as_str();
        if open_for_write.contains(path) {
            return Err(ApplyError::Busy);
        }
        if self.meta(path) != apply.expect {
            return Err(ApplyError::Stale);
        }
        // The directories above that are missing, up to the nearest one there (which must be
        // a directory), as a real driver's mkdir -p finds them.
        let mut ups: Vec<&str> = Vec::new();
        let mut at = path;
        while let Some(up) = parent(at) {
            match self.nodes.get(up) {
                Some(n) if n.is_dir() => break,
                Some(_) => return Err(ApplyError::Stale),
                None => ups.push(up),
            }
            at = up;
        }
        let current_is_dir = self.nodes.get(path).is_some_and(Node::is_dir);
        let replaces = !matches!(apply.action, Action::SetAttr { .. } | Action::Mkdir { .. });
        if current_is_dir && replaces && self.below(path).next().is_some() {
            return Err(ApplyError::Stale);
        }
        // A full disk takes nothing new; a removal still works.
        if self.full && !matches!(apply.action, Action::Remove) {
            return Err(ApplyError::Io(IoFailure::new(
                IoKind::NoSpace,
                format!("{path}: no space left on device"),
            )));
        }
        // Everything checked; now change the tree.
        let new = match &apply.action {
            Action::Remove => {
                self.nodes.remove(path);
                return Ok(());
            }
            Action::SetAttr { meta } => {
                match (self.nodes.get_mut(path), &meta.content) {
                    (
                        Some(Node::File {
                            mode,
                            mtime_ns,
                            xattrs,
                            ..
                        }),
                        Content::File { .. },
                    ) => {
                        *mode = meta.mode;
                        *mtime_ns = meta.mtime_ns;
                        *xattrs = meta.xattrs.clone();
                    }
                    (Some(Node::Dir { mode, xattrs }), Content::Dir) => {
                        *mode = meta.mode;
                        *xattrs = meta.xattrs.clone();
                    }
                    _ => return Err(ApplyError::Stale),
                }
                return Ok(());
            }
            Action::Mkdir { meta } => Node::Dir {
                mode: meta.mode,
                xattrs: meta.xattrs.clone(),
            },
            Action::Symlink { target, .. } => Node::Symlink {
                target: target.clone(),
            },
            Action::Write { meta, source } => {
                let data = match source {
                    Source::Inline(b) => b.clone(),
                    Source::Staged(id) => match staged.get(id) {
                        Some(b) => b.clone(),
                        None => return Err(ApplyError::StagedGone),
                    },
                    Source::Local(q) => match (self.nodes.get(q.as_str()), meta.file_hash()) {
                        (Some(Node::File { data, hash, .. }), Some((want, _))) if *hash == want => {
                            data.clone()
                        }
                        _ => return Err(ApplyError::Stale),
                    },
                };
                let mut node = Node::file(data, meta.mode, meta.mtime_ns);
                if let Node::File { xattrs, .. } = &mut node {
                    *xattrs = meta.xattrs.clone();
                }
                assert_eq!(
                    node.meta(),
                    *meta,
                    "content of a write does not match its meta"
                );
                node
            }
        };
        for a in ups {
            self.nodes
                .entry(a.to_string())
                .or_insert(Node::dir(DIR_MODE_DEFAULT));
        }
        if let (Some(Node::Dir { .. }), Node::Dir { .. }) = (self.nodes.get(path), &new) {
            // Making a directory where one is: set its attributes, keep what is inside.
            self.nodes.insert(path.to_string(), new);
            return Ok(());
        }
        self.nodes.insert(path.to_string(), new);
        Ok(())
    }
}
