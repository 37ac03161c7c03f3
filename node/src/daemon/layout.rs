//! The folders `up` is given, checked before anything is created in any of them, and held
//! against a second node: a mount inside the backing directory hangs the kernel and the daemon;
//! a state folder inside the tree would replicate this node's private key; two nodes on one
//! backing directory would each take the other's writes for local ones.

use super::DaemonError;
use rustix::fd::{AsRawFd, OwnedFd};
use rustix::fs::{flock, FlockOperation, Mode, OFlags};
use std::path::{Path, PathBuf};

/// The name of the lock file in the state folder.
const LOCK_FILE: &str = "lock";

/// The folders, made absolute.
pub struct Layout {
    pub state: PathBuf,
    pub backing: PathBuf,
    pub mount: PathBuf,
    /// Held while the node runs: one node per backing directory.
    backing_lock: OwnedFd,
}

/// Locks that keep a second node off this node's state folder and backing directory while they
/// are held.
pub struct Locks {
    _state: std::fs::File,
    _backing: OwnedFd,
}

/// Takes the lock on the backing directory (creating nothing), or says that a node holds it.
fn lock_backing(backing: &Path) -> Result<OwnedFd, DaemonError> {
    let fd = rustix::fs::open(
        backing,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| refuse(format!("the backing directory {}: {e}", backing.display())))?;
    if flock(&fd, FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(refuse(format!(
            "another rsyncfs-node serves the backing directory {}; \
             one node per backing directory",
            backing.display()
        )));
    }
    Ok(fd)
}

fn refuse(why: String) -> DaemonError {
    DaemonError::Layout(why)
}

/// `path` made absolute and free of `..` and symlinks, also when its last parts do not exist
/// yet (those are taken as written).
fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    use std::path::Component;
    let path = std::path::absolute(path)?;
    let mut out = PathBuf::from("/");
    let mut exists = true;
    for part in path.components() {
        match part {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                out.push(name);
                if exists {
                    match out.canonicalize() {
                        Ok(real) => out = real,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => exists = false,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The type and source of the filesystem mounted exactly at `path`, if one is.
fn mounted_at(path: &Path) -> Option<(String, String)> {
    mounts()
        .into_iter()
        .find(|(at, _)| at == path)
        .map(|(_, fs)| fs)
}

/// The type and source of the filesystem `path` (absolute, canonical) lives on, from the mount
/// table.
fn filesystem_of(path: &Path) -> Option<(String, String)> {
    mounts()
        .into_iter()
        .filter(|(at, _)| path.starts_with(at))
        .max_by_key(|(at, _)| at.as_os_str().len())
        .map(|(_, fs)| fs)
}

/// The mount table: each mount point with its filesystem's type and source.
fn mounts() -> Vec<(PathBuf, (String, String))> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // Each line: id parent major:minor root mount-point options ... - type source options.
    table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let at = PathBuf::from(unescape(fields.get(4)?));
            let dash = fields.iter().position(|f| *f == "-")?;
            let kind = fields.get(dash + 1)?.to_string();
            let source = unescape(fields.get(dash + 2)?);
            Some((at, (kind, source)))
        })
        .collect()
}

/// Mount table paths escape space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&digits, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&digits);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Checks the folders `up` was given, creating nothing. Every refusal says why and what to do.
pub fn check(state: &Path, backing: &Path, mount: &Path) -> Result<Layout, DaemonError> {
    let backing = backing.canonicalize().map_err(|e| {
        refuse(format!(
            "the backing directory {}: {e} (it must be an existing directory; \
             create it, or name another with --backing)",
            backing.display()
        ))
    })?;
    if !backing.is_dir() {
        return Err(refuse(format!(
            "the backing directory {} is not a directory",
            backing.display()
        )));
    }
    let backing_lock = lock_backing(&backing)?;
    rsyncfs_logger::clear_dead_mount(mount);
    // A mount of this backing directory left at the mount point is a run of this node that
    // was killed (no other node can hold the lock just taken): the kernel may still answer
    // from its caches there, so it is detached whether or not it looks alive.
    if let Ok(at) = std::path::absolute(mount) {
        let ours = format!("{}{}", rsyncfs_logger::FS_NAME_PREFIX, backing.display());
        if mounted_at(&at).is_some_and(|(_, source)| source == ours) {
            tracing::warn!("detaching the mount a killed run left at {}", at.display());
            rsyncfs_logger::detach(&at);
        }
    }
    let mount = mount.canonicalize().map_err(|e| {
        refuse(format!(
            "the mount point {}: {e} (it must be an existing, empty directory; \
             create it with mkdir, or name another with --mount)",
            mount.display()
        ))
    })?;
    let state = absolute(state)
        .map_err(|e| refuse(format!("the state folder {}: {e}", state.display())))?;
    let (b, m, s) = (backing.display(), mount.display(), state.display());
    if mount == backing {
        return Err(refuse(format!(
            "the mount point and the backing directory are both {b}: programs write through \
             the mount into the backing directory, so they must be two folders \
             (for example --backing /srv/data --mount /data)"
        )));
    }
    if mount.starts_with(&backing) {
        return Err(refuse(format!(
            "the mount point {m} is inside the backing directory {b}: the mount would serve \
             itself (and hang); put the mount point outside {b}"
        )));
    }
    if backing.starts_with(&mount) {
        return Err(refuse(format!(
            "the backing directory {b} is inside the mount point {m}: the mount would hide it; \
             put the backing directory outside {m}"
        )));
    }
    if state.starts_with(&backing) || state.starts_with(&mount) {
        return Err(refuse(format!(
            "the state folder {s} is inside the replicated tree ({b}, mounted at {m}): it holds \
             this node's private key, which would be sent to every peer; put it outside, \
             for example --state /var/lib/rsyncfs"
        )));
    }
    if backing.starts_with(&state) || mount.starts_with(&state) {
        return Err(refuse(format!(
            "the state folder {s} holds the tree ({b} or {m}); give the state its own folder"
        )));
    }
    for (what, path) in [("backing directory", &backing), ("mount point", &mount)] {
        let on_rsyncfs = filesystem_of(path).is_some_and(|(kind, source)| {
            kind.starts_with("fuse") && source.starts_with(rsyncfs_logger::FS_NAME_PREFIX)
        });
        if on_rsyncfs {
            return Err(refuse(format!(
                "the {what} {} is on another rsyncfs mount: a tree inside a replicated tree \
                 would be replicated twice; use a folder outside every rsyncfs mount",
                path.display()
            )));
        }
    }
    if !mount.is_dir() {
        return Err(refuse(format!("the mount point {m} is not a directory")));
    }
    let not_empty = std::fs::read_dir(&mount)
        .map_err(|e| refuse(format!("the mount point {m}: {e}")))?
        .next()
        .is_some();
    // A node that ran here before takes what was written to its bare mount point while it
    // was down into the tree (`rescue`), as writes to the tree; a first run refuses, since the
    // mount would hide what is there.
    let ran_before = state.join("store.redb").exists();
    if not_empty && !ran_before {
        return Err(refuse(format!(
            "the mount point {m} is not empty: the mount would hide what is there; \
             use an empty directory"
        )));
    }
    Ok(Layout {
        state,
        backing,
        mount,
        backing_lock,
    })
}

/// Takes the locks on the state folder (which must exist) and the backing directory, or says
/// which node holds them.
pub fn lock(layout: Layout) -> Result<(Layout, Locks), DaemonError> {
    let path = layout.state.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| refuse(format!("the lock {}: {e}", path.display())))?;
    if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(refuse(format!(
            "another rsyncfs-node (pid {}) is running with the state folder {}; stop it first",
            holder.trim(),
            layout.state.display()
        )));
    }
    {
        use std::io::{Seek, Write};
        file.set_len(0)
            .and_then(|()| file.seek(std::io::SeekFrom::Start(0)))
            .and_then(|_| write!(file, "{}", std::process::id()))
            .map_err(|e| refuse(format!("the lock {}: {e}", path.display())))?;
    }
    let backing = layout
        .backing_lock
        .try_clone()
        .map_err(|e| refuse(format!("the backing directory lock: {e}")))?;
    Ok((
        layout,
        Locks {
            _state: file,
            _backing: backing,
        },
    ))
}

/// The mount point's own directory, opened before anything is mounted on it.
pub fn bare(mount: &Path) -> Result<OwnedFd, DaemonError> {
    rustix::fs::open(
        mount,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| refuse(format!("the mount point {}: {e}", mount.display())))
}

/// Moves into the backing directory what programs wrote into the bare mount point (`bare`,
/// found empty by [`check`]) before the mount covered it: a program writing to the mount while
/// a killed node restarts can land there, and the mount would hide it. Directories that exist
/// in the tree already are merged into. What cannot be moved (another filesystem, a name taken)
/// is left there, and said loudly.
pub fn rescue(bare: &OwnedFd, backing: &Path) {
    let Ok(target) = rustix::fs::open(
        backing,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let mut budget = RESCUED_MAX;
    rescue_into(bare, &target, Path::new(""), 0, &mut budget);
}

fn rescue_into(from: &OwnedFd, to: &OwnedFd, at: &Path, depth: usize, budget: &mut usize) {
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", from.as_raw_fd())) else {
        return;
    };
    for entry in entries.flatten() {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let name = entry.file_name();
        let path = at.join(&name);
        match rustix::fs::renameat_with(from, &name, to, &name, rustix::fs::RenameFlags::NOREPLACE)
        {
            Ok(()) => tracing::warn!(
                "moved {}, written to the mount point before the mount covered it, into the tree",
                path.display()
            ),
            Err(rustix::io::Errno::EXIST) if depth < RESCUE_DEPTH_MAX => {
                let open = |dir: &OwnedFd| {
                    rustix::fs::openat(
                        dir,
                        &name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                };
                match (open(from), open(to)) {
                    (Ok(sub_from), Ok(sub_to)) => {
                        rescue_into(&sub_from, &sub_to, &path, depth + 1, budget);
                        let _ = rustix::fs::unlinkat(from, &name, rustix::fs::AtFlags::REMOVEDIR);
                    }
                    // Two non-directories: the one in the bare mount point was written while
                    // the node was down, after anything the tree holds there, so it replaces it
                    // (a writer killed between its create and its write left the tree's copy
                    // empty, and wrote again here).
                    (Err(_), Err(_)) => match rustix::fs::renameat(from, &name, to, &name) {
                        Ok(()) => tracing::warn!(
                            "{} was written again to the mount point before the mount covered \
                             it: that version replaces the tree's",
                            path.display()
                        ),
                        Err(e) => left_hidden(&path, &e.to_string()),
                    },
                    _ => left_hidden(&path, "a directory and a file have the name"),
                }
            }
            Err(e) => left_hidden(&path, &e.to_string()),
        }
    }
}

fn left_hidden(path: &Path, why: &str) {
    tracing::error!(
        "{} was written to the mount point before the mount covered it and could not be moved \
         into the tree ({why}); it is hidden under the mount: stop the node to get it",
        path.display()
    );
}

/// Directory levels [`rescue`] merges at most.
const RESCUE_DEPTH_MAX: usize = 64;
/// Entries moved by [`rescue`] at most.
const RESCUED_MAX: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_resolves_what_does_not_exist_yet() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        let made = absolute(&dir.path().join("a/b/../c")).unwrap();
        assert_eq!(made, real.join("a/c"));
    }

    #[test]
    fn mount_table_escapes_are_read() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
