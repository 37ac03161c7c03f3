//! Versions of what peers replaced or removed (`up --keep-versions`): before an applied update
//! replaces or removes a local regular file, its content is kept in the node's state folder
//! inside the backing directory (hidden from the mount, never replicated), at most `max` per
//! path and for at most `days`. A hard link keeps it at no cost where the file is replaced by a
//! new one; an update in place copies it first. `rsyncfs-node versions PATH` lists them and
//! `restore` writes one back through the mount, as a local write.

use rsyncfs_mesh::path::RelPath;
use rustix::fs::{AtFlags, Mode, OFlags};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The folder, in the node's state folder inside the backing directory.
const DIR: &str = "versions";
/// The file in each path's folder that names the path (the folder is named by its hash).
const PATH_FILE: &str = "path";
/// Versions kept per path at most, whatever `--versions-max` says.
pub const VERSIONS_PER_PATH_MAX: usize = 1000;
/// How often every path's versions are pruned by age, also of paths no apply touches again.
const PRUNE_ALL_EVERY: Duration = Duration::from_secs(3600);

/// How long and how many versions a node keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub keep_for: Duration,
    pub max: usize,
}

/// One kept version of a path.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Version {
    /// What `restore --version` takes.
    pub id: String,
    /// When it was replaced or removed, ms since the epoch.
    pub at_ms: u64,
    pub size: u64,
}

pub struct Versions {
    dir: OwnedFd,
    path: PathBuf,
    policy: Policy,
    next: AtomicU64,
}

impl Versions {
    pub fn open(state: &Path, policy: Policy) -> std::io::Result<Versions> {
        let path = state.join(DIR);
        std::fs::create_dir_all(&path)?;
        let dir = rustix::fs::open(
            &path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let versions = Versions {
            dir,
            path,
            policy: Policy {
                keep_for: policy.keep_for,
                max: policy.max.clamp(1, VERSIONS_PER_PATH_MAX),
            },
            next: AtomicU64::new(0),
        };
        // Versions age out also where their path is never replaced again: a thread of its own
        // prunes them all now and then every hour.
        let pruner = Versions {
            dir: versions.dir.try_clone()?,
            path: versions.path.clone(),
            policy: versions.policy,
            next: AtomicU64::new(0),
        };
        std::thread::Builder::new()
            .name("rsyncfs-versions".into())
            .spawn(move || loop {
                if let Err(e) = pruner.prune_all() {
                    tracing::warn!("pruning kept versions in {}: {e}", pruner.path.display());
                }
                std::thread::sleep(PRUNE_ALL_EVERY);
            })?;
        Ok(versions)
    }

    /// Prunes every path's versions, and removes the folders left empty. Returns how many
    /// versions it removed.
    pub fn prune_all(&self) -> std::io::Result<usize> {
        let now_ms = now_ms();
        let mut removed = 0;
        let dup = open_dir(self.dir.as_fd(), ".")?;
        let folders: Vec<String> = rustix::fs::Dir::read_from(&dup)?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        for folder in folders {
            let fd = open_dir(self.dir.as_fd(), folder.as_str())?;
            let (dropped, left) = self.prune(fd.as_fd(), now_ms)?;
            removed += dropped;
            if left == 0 {
                let _ = rustix::fs::unlinkat(&fd, PATH_FILE, AtFlags::empty());
                let _ = rustix::fs::unlinkat(&self.dir, folder.as_str(), AtFlags::REMOVEDIR);
            }
        }
        Ok(removed)
    }

    fn folder(path: &RelPath) -> String {
        let hash = blake3::hash(path.as_str().as_bytes());
        data_encoding::HEXLOWER.encode(&hash.as_bytes()[..16])
    }

    /// Keeps what `name` in `dir` (the file at `path`) holds now: a hard link to it, or with
    /// `copy` (the file is about to be changed in place) a copy. Then drops what is beyond the
    /// policy.
    pub fn keep(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &RelPath,
        copy: bool,
    ) -> std::io::Result<()> {
        // The hourly prune may remove the path's folder, left empty, just as it is used here:
        // then once more.
        match self.keep_once(dir, name, path, copy) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.keep_once(dir, name, path, copy)
            }
            other => other,
        }
    }

    fn keep_once(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &RelPath,
        copy: bool,
    ) -> std::io::Result<()> {
        let folder = Self::folder(path);
        match rustix::fs::mkdirat(&self.dir, folder.as_str(), Mode::from_raw_mode(0o700)) {
            Ok(()) => {
                let named = self.path.join(&folder).join(PATH_FILE);
                std::fs::write(named, path.as_str())?;
            }
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let folder_fd = open_dir(self.dir.as_fd(), folder.as_str())?;
        let now_ms = now_ms();
        let id = format!(
            "{now_ms:013}-{:010}",
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let linked = !copy
            && rustix::fs::linkat(dir, name, &folder_fd, id.as_str(), AtFlags::empty()).is_ok();
        if !linked {
            let from = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let to = rustix::fs::openat(
                &folder_fd,
                id.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            // copy_file_range underneath: shared blocks where the filesystem can.
            std::io::copy(&mut File::from(from), &mut File::from(to))?;
        }
        self.prune(folder_fd.as_fd(), now_ms).map(|_| ())
    }

    /// Drops the versions of one path's folder beyond the policy (the oldest first). Returns
    /// how many it dropped and how many are left.
    fn prune(&self, folder: BorrowedFd<'_>, now_ms: u64) -> std::io::Result<(usize, usize)> {
        let mut ids = ids_in(folder)?;
        ids.sort();
        let keep_ms = self.policy.keep_for.as_millis() as u64;
        let beyond = ids.len().saturating_sub(self.policy.max);
        let mut dropped = 0;
        for (i, id) in ids.iter().enumerate() {
            let old = at_ms(id).is_some_and(|at| at + keep_ms < now_ms);
            if i < beyond || old {
                rustix::fs::unlinkat(folder, id.as_str(), AtFlags::empty())?;
                dropped += 1;
            }
        }
        Ok((dropped, ids.len() - dropped))
    }

    /// The versions kept of `path`, newest first.
    pub fn list(&self, path: &RelPath) -> std::io::Result<Vec<Version>> {
        let folder = match open_dir(self.dir.as_fd(), Self::folder(path).as_str()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let now_ms = now_ms();
        self.prune(folder.as_fd(), now_ms)?;
        let mut out = Vec::new();
        for id in ids_in(folder.as_fd())? {
            let st = rustix::fs::statat(&folder, id.as_str(), AtFlags::SYMLINK_NOFOLLOW)?;
            out.push(Version {
                at_ms: at_ms(&id).unwrap_or(0),
                size: st.st_size as u64,
                id,
            });
        }
        out.sort_by(|a, b| b.id.cmp(&a.id));
        Ok(out)
    }

    /// The content of version `id` of `path` (the newest, without one).
    pub fn open_version(&self, path: &RelPath, id: Option<&str>) -> std::io::Result<File> {
        let id = match id {
            Some(id) => id.to_string(),
            None => self
                .list(path)?
                .into_iter()
                .next()
                .map(|v| v.id)
                .ok_or_else(|| std::io::Error::other(format!("no version of {path} is kept")))?,
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
            return Err(std::io::Error::other(format!("{id} is not a version id")));
        }
        let name = Path::new(&Self::folder(path)).join(&id);
        let fd = rustix::fs::openat(
            &self.dir,
            &name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::NOENT => {
                std::io::Error::other(format!("no version {id} of {path} is kept"))
            }
            e => e.into(),
        })?;
        Ok(File::from(fd))
    }
}

/// A directory under `at`, opened to work in.
fn open_dir(at: BorrowedFd<'_>, name: &str) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        at,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The version ids in a path's folder.
fn ids_in(folder: BorrowedFd<'_>) -> std::io::Result<Vec<String>> {
    let dup = open_dir(folder, ".")?;
    let mut ids = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dup)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if at_ms(&name).is_some() {
            ids.push(name);
        }
    }
    Ok(ids)
}

fn at_ms(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_past_their_time_go_also_where_nothing_replaces_the_path_again() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy {
            keep_for: Duration::from_secs(3600),
            max: 5,
        };
        let v = Versions::open(dir.path(), policy).unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let tree_fd =
            rustix::fs::open(&tree, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let (old, fresh) = (
            RelPath::new("old.txt").unwrap(),
            RelPath::new("d/new.txt").unwrap(),
        );
        for (path, name) in [(&old, "old.txt"), (&fresh, "new.txt")] {
            std::fs::write(tree.join(name), path.as_str()).unwrap();
            v.keep(tree_fd.as_fd(), OsStr::new(name), path, false)
                .unwrap();
        }
        assert_eq!(v.list(&old).unwrap().len(), 1);
        // Make old.txt's version two hours old, as if it had been kept then.
        let folder = v.path.join(Versions::folder(&old));
        let id = v.list(&old).unwrap()[0].id.clone();
        let aged = (at_ms(&id).unwrap() - 2 * 3600 * 1000).to_string() + "-0";
        std::fs::rename(folder.join(&id), folder.join(&aged)).unwrap();
        assert_eq!(v.prune_all().unwrap(), 1);
        assert!(!folder.exists(), "an empty folder goes too");
        assert_eq!(v.list(&fresh).unwrap().len(), 1);
        let mut content = String::new();
        std::io::Read::read_to_string(&mut v.open_version(&fresh, None).unwrap(), &mut content)
            .unwrap();
        assert_eq!(content, "d/new.txt");
        assert!(v.open_version(&fresh, Some("../x")).is_err());
    }
}
