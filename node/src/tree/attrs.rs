//! Attributes as the node sets and reads them on the backing tree: owner, extended attributes,
//! mode and modification time.

use rsyncfs_conflict::{Content, Meta};
use rsyncfs_mesh::path::RelPath;
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

/// Owner, extended attributes, mode and mtime of a finished file (its data is made durable by
/// [`Tree::make_durable`] before it is renamed into place). The owner and the mode are set only
/// where they differ: a file made by this process usually has both already, and each is a
/// system call and an inode update per file (a first sync makes many small files).
pub(super) fn finish_file(file: &File, meta: &Meta) -> std::io::Result<()> {
    let st = rustix::fs::fstat(file)?;
    let changed = set_owner_and_xattrs(file.as_fd(), meta, Some((st.st_uid, st.st_gid)))?;
    // A change of owner clears the set-id bits, and an ACL set or removed moves the group
    // bits: the mode read above is then no longer what the file has.
    if changed || st.st_mode & 0o7777 != meta.mode & 0o7777 {
        rustix::fs::fchmod(file, Mode::from_raw_mode(meta.mode & 0o7777))?;
    }
    let mtime = timespec(meta.mtime_ns);
    rustix::fs::futimens(
        file,
        &Timestamps {
            last_access: mtime,
            last_modification: mtime,
        },
    )?;
    Ok(())
}

pub(super) fn set_attrs_at(dir: BorrowedFd<'_>, name: &OsStr, meta: &Meta) -> std::io::Result<()> {
    if let Content::File { .. } | Content::Dir = meta.content {
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        set_owner_and_xattrs(fd.as_fd(), meta, None)?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode & 0o7777))?;
    }
    if let Content::File { .. } = meta.content {
        let mtime = timespec(meta.mtime_ns);
        rustix::fs::utimensat(
            dir,
            name,
            &Timestamps {
                last_access: mtime,
                last_modification: mtime,
            },
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    Ok(())
}

fn timespec(ns: i64) -> Timespec {
    Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

/// Extended attributes not replicated: security labels belong to each host's policy.
const XATTRS_SKIPPED: &[&[u8]] = &[b"security.selinux"];

/// The extended attributes of `name` in `dir` (a file or directory), sorted. What does not fit
/// the record's limits is left out with a warning.
pub(super) fn read_xattrs(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    path: &RelPath,
) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let fd = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    read_xattrs_of(fd.as_fd(), path)
}

/// The extended attributes of an open file or directory, sorted, within the record's limits
/// (see [`read_xattrs`]).
pub(super) fn read_xattrs_of(
    fd: BorrowedFd<'_>,
    path: &RelPath,
) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use rsyncfs_conflict::limits::{XATTRS_BYTES_MAX, XATTRS_MAX, XATTR_NAME_BYTES_MAX};
    let names = match xattr_names(fd) {
        Ok(names) => names,
        Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    let mut bytes = 0;
    if names.is_empty() {
        return Ok(out);
    }
    let mut value = vec![0u8; 64 * 1024];
    for attr in names.split(|&b| b == 0).filter(|a| !a.is_empty()) {
        if XATTRS_SKIPPED.contains(&attr) || attr.len() > XATTR_NAME_BYTES_MAX {
            continue;
        }
        let Ok(cname) = std::ffi::CString::new(attr) else {
            continue;
        };
        let len = match rustix::fs::fgetxattr(fd, cname.as_c_str(), &mut value[..]) {
            Ok(len) => len,
            Err(rustix::io::Errno::NODATA) => continue, // removed meanwhile
            Err(e) => return Err(e.into()),
        };
        if out.len() >= XATTRS_MAX || bytes + attr.len() + len > XATTRS_BYTES_MAX {
            tracing::warn!(
                "{path}: extended attribute {} left out: beyond the limits of {XATTRS_MAX} \
                 attributes and {XATTRS_BYTES_MAX} bytes",
                String::from_utf8_lossy(attr)
            );
            continue;
        }
        bytes += attr.len() + len;
        out.push((attr.to_vec(), value[..len].to_vec()));
    }
    out.sort();
    Ok(out)
}

/// The names of an open file's extended attributes, NUL-separated. Asked first into a small
/// buffer on the stack, so that a file with few or none (most files) costs no allocation of
/// the 64 KiB a list may take. (rustix answers a zero-length query with 0, not the length.)
fn xattr_names(fd: BorrowedFd<'_>) -> rustix::io::Result<Vec<u8>> {
    let mut small = [0u8; 1024];
    match rustix::fs::flistxattr(fd, &mut small[..]) {
        Ok(n) => return Ok(small[..n].to_vec()),
        Err(rustix::io::Errno::RANGE) => {}
        Err(e) => return Err(e),
    }
    let mut names = vec![0u8; XATTR_LIST_BYTES_MAX];
    let n = rustix::fs::flistxattr(fd, &mut names[..])?;
    names.truncate(n);
    Ok(names)
}

/// The longest list of attribute names Linux gives (`XATTR_LIST_MAX`).
const XATTR_LIST_BYTES_MAX: usize = 64 * 1024;

/// Gives an open file or directory the owner (when this process may) and exactly the extended
/// attributes of `meta`. `owner` is the owner it has, where known: then an equal one is not set
/// again. True when it changed the owner or an attribute.
fn set_owner_and_xattrs(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    owner: Option<(u32, u32)>,
) -> std::io::Result<bool> {
    let mut changed = false;
    if let Some((uid, gid)) = meta.owner {
        static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *ROOT.get_or_init(|| rustix::process::geteuid().is_root()) && owner != Some((uid, gid)) {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )?;
            changed = true;
        }
    }
    let names = match xattr_names(fd) {
        Ok(names) => names,
        Err(rustix::io::Errno::NOTSUP) if meta.xattrs.is_empty() => return Ok(changed),
        Err(e) => return Err(e.into()),
    };
    for attr in names.split(|&b| b == 0).filter(|a| !a.is_empty()) {
        if XATTRS_SKIPPED.contains(&attr) || meta.xattrs.iter().any(|(k, _)| k == attr) {
            continue;
        }
        if let Ok(cname) = std::ffi::CString::new(attr) {
            match rustix::fs::fremovexattr(fd, cname.as_c_str()) {
                Ok(()) => changed = true,
                Err(rustix::io::Errno::NODATA) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    for (k, v) in &meta.xattrs {
        let Ok(cname) = std::ffi::CString::new(k.clone()) else {
            continue;
        };
        rustix::fs::fsetxattr(fd, cname.as_c_str(), v, rustix::fs::XattrFlags::empty())?;
        changed = true;
    }
    Ok(changed)
}
