//! Segments of a large file that a peer sent while its writer was still writing it (a
//! *preseed*), kept in the state folder for the fetch that follows the writer's close.
//!
//! A preseed is a hint and nothing more: the fetch offers the CVs of the segments it holds as
//! its basis, the sender answers "same" only for segments whose CV equals that of the content
//! it announced, and the fetched content is checked against its hash as any other. So a
//! preseed with stale or wrong bytes (a writer that went back, a peer that lies) costs bytes on
//! the link, never a wrong file. The fetch that uses a preseed takes its file over as its
//! staging file, so that the segments already here are neither copied nor written again.
//!
//! Limits: [`PRESEEDS_MAX`] files at once (a new one pushes out the least recently written);
//! one unused for [`PRESEED_IDLE`] is removed; none is written while the filesystem would be
//! left with less free space than [`FREE_MIN_BYTES`] or [`FREE_MIN_PERCENT`] (local programs
//! come first); a start empties the temporary folder of them.

use super::segments::{Cv, SEGMENT};
use parking_lot::Mutex;
use rsyncfs_conflict::NodeId;
use rsyncfs_mesh::path::RelPath;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Preseeds kept at once.
pub const PRESEEDS_MAX: usize = 4;
/// A preseed not written to for this long is removed.
pub const PRESEED_IDLE: Duration = Duration::from_secs(600);
/// Free space a preseed's write leaves on the filesystem, at least.
pub const FREE_MIN_BYTES: u64 = 1 << 30;
pub const FREE_MIN_PERCENT: u64 = 10;
/// Most segments one preseed holds (files up to 512 GiB, as a fetch's basis).
pub const SEGMENTS_MAX: u64 = 131_072;

/// Why a segment was not kept.
#[derive(Debug, thiserror::Error)]
pub enum PreseedError {
    #[error("the preseed was taken by its fetch or pushed out")]
    Closed,
    #[error("too little free space for a preseed")]
    Full,
    #[error("segment {0} is beyond what a preseed holds")]
    TooFar(u64),
    #[error("writing the preseed: {0}")]
    Io(#[from] std::io::Error),
}

/// One preseed: its file in the temporary folder and the CV of each segment written to it.
pub struct Preseed {
    from: NodeId,
    /// The sender's id of the file being written (stable across its renames).
    id: u64,
    /// The file's path at the sender, as last pushed.
    path: RelPath,
    file: File,
    name: PathBuf,
    cvs: Vec<Option<Cv>>,
    written: Instant,
    closed: bool,
}

impl Preseed {
    /// Writes segment `i` (a whole [`SEGMENT`] of bytes, whose CV is `cv`).
    pub fn write(&mut self, i: u64, data: &[u8], cv: Cv) -> Result<(), PreseedError> {
        if self.closed {
            return Err(PreseedError::Closed);
        }
        if i >= SEGMENTS_MAX {
            return Err(PreseedError::TooFar(i));
        }
        debug_assert_eq!(data.len() as u64, SEGMENT);
        let st = rustix::fs::fstatvfs(&self.file).map_err(std::io::Error::from)?;
        let block = st.f_frsize.max(1);
        let free = st.f_bavail.saturating_mul(block);
        let total = st.f_blocks.saturating_mul(block);
        let keep = FREE_MIN_BYTES.max(total / 100 * FREE_MIN_PERCENT);
        if free < keep.saturating_add(SEGMENT) {
            return Err(PreseedError::Full);
        }
        // Marked unknown first: a write that fails half way leaves no CV for what it left.
        if self.cvs.len() <= i as usize {
            self.cvs.resize(i as usize + 1, None);
        }
        self.cvs[i as usize] = None;
        self.file.write_all_at(data, i * SEGMENT)?;
        self.cvs[i as usize] = Some(cv);
        self.written = Instant::now();
        Ok(())
    }

    /// The file, to start its writeback.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// A preseed a fetch took over: its file (renamed to `staged`) and the CVs of its segments
/// from the first on, up to the first it does not hold.
pub struct Taken {
    pub file: File,
    pub staged: PathBuf,
    pub cvs: Vec<Cv>,
}

#[derive(Default)]
pub struct Preseeds {
    kept: Mutex<Vec<Arc<Mutex<Preseed>>>>,
}

impl Preseeds {
    /// The preseed of the file `id` of peer `from` (made with `make` if there is none), its
    /// path now `path`.
    pub fn entry(
        &self,
        from: NodeId,
        id: u64,
        path: &RelPath,
        make: impl FnOnce() -> std::io::Result<(File, PathBuf)>,
    ) -> std::io::Result<Arc<Mutex<Preseed>>> {
        let mut kept = self.kept.lock();
        if let Some(p) = kept.iter().find(|p| {
            let p = p.lock();
            p.from == from && p.id == id
        }) {
            p.lock().path = path.clone();
            return Ok(Arc::clone(p));
        }
        if kept.len() >= PRESEEDS_MAX {
            let oldest = (0..kept.len())
                .min_by_key(|&i| kept[i].lock().written)
                .expect("not empty");
            close(&kept.remove(oldest));
        }
        let (file, name) = make()?;
        let p = Arc::new(Mutex::new(Preseed {
            from,
            id,
            path: path.clone(),
            file,
            name,
            cvs: Vec::new(),
            written: Instant::now(),
            closed: false,
        }));
        kept.push(Arc::clone(&p));
        Ok(p)
    }

    /// Takes the preseed `from` sent for `path` (or, if none has that path, the one it sent
    /// whose whole segments come closest to `size` and within a segment of it: the writer
    /// renamed its file, say) and renames its file to `staged`.
    pub fn take(&self, from: &NodeId, path: &RelPath, size: u64, staged: PathBuf) -> Option<Taken> {
        let mut kept = self.kept.lock();
        let at = kept
            .iter()
            .position(|p| {
                let p = p.lock();
                p.from == *from && p.path == *path
            })
            .or_else(|| {
                (0..kept.len())
                    .filter(|&i| {
                        let p = kept[i].lock();
                        p.from == *from && (p.cvs.len() as u64 * SEGMENT).abs_diff(size) <= SEGMENT
                    })
                    .min_by_key(|&i| (kept[i].lock().cvs.len() as u64 * SEGMENT).abs_diff(size))
            })?;
        let p = kept.remove(at);
        drop(kept);
        let mut p = p.lock();
        p.closed = true;
        let cvs: Vec<Cv> = p.cvs.iter().map_while(|c| *c).collect();
        if cvs.is_empty() || std::fs::rename(&p.name, &staged).is_err() {
            let _ = std::fs::remove_file(&p.name);
            return None;
        }
        let file = p.file.try_clone().ok()?;
        Some(Taken { file, staged, cvs })
    }

    /// Removes preseeds not written to for [`PRESEED_IDLE`].
    pub fn sweep(&self) {
        self.kept.lock().retain(|p| {
            let idle = p.lock().written.elapsed() >= PRESEED_IDLE;
            if idle {
                close(p);
            }
            !idle
        });
    }

    /// Preseeds kept, and the bytes of segments they hold.
    pub fn held(&self) -> (usize, u64) {
        let kept = self.kept.lock();
        let segments: usize = kept
            .iter()
            .map(|p| p.lock().cvs.iter().flatten().count())
            .sum();
        (kept.len(), segments as u64 * SEGMENT)
    }
}

fn close(p: &Mutex<Preseed>) {
    let mut p = p.lock();
    p.closed = true;
    let _ = std::fs::remove_file(&p.name);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId([n; 16])
    }

    fn path(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn a_preseed_is_taken_by_path_or_by_size_and_holds_the_cvs_up_to_its_first_gap() {
        let dir = tempfile::tempdir().unwrap();
        let seeds = Preseeds::default();
        let mut n = 0;
        let mut make = || {
            n += 1;
            let name = dir.path().join(format!("e-{n}"));
            Ok((
                File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&name)?,
                name,
            ))
        };
        let data = vec![7u8; SEGMENT as usize];
        let p = seeds.entry(node(1), 10, &path("a.bin"), &mut make).unwrap();
        for i in [0, 1, 3] {
            p.lock().write(i, &data, [i as u8; 32]).unwrap();
        }
        // The same file of the same peer, renamed: the same preseed.
        let again = seeds.entry(node(1), 10, &path("b.bin"), &mut make).unwrap();
        assert!(Arc::ptr_eq(&p, &again));
        assert_eq!(seeds.held(), (1, 3 * SEGMENT));

        // Another peer's preseed of that path is not it.
        assert!(seeds
            .take(&node(2), &path("b.bin"), 4 * SEGMENT, dir.path().join("x"))
            .is_none());
        let taken = seeds
            .take(
                &node(1),
                &path("b.bin"),
                9 * SEGMENT,
                dir.path().join("f-1"),
            )
            .unwrap();
        assert_eq!(taken.cvs, vec![[0u8; 32], [1u8; 32]]);
        assert!(dir.path().join("f-1").exists());
        assert_eq!(seeds.held(), (0, 0));
        // Its writer is told it is gone.
        assert!(matches!(
            p.lock().write(4, &data, [4; 32]),
            Err(PreseedError::Closed)
        ));

        // By size, when no path matches: within a segment only.
        let q = seeds
            .entry(node(1), 11, &path("tmp.part"), &mut make)
            .unwrap();
        q.lock().write(0, &data, [0; 32]).unwrap();
        q.lock().write(1, &data, [1; 32]).unwrap();
        assert!(seeds
            .take(
                &node(1),
                &path("final"),
                4 * SEGMENT,
                dir.path().join("f-2")
            )
            .is_none());
        let taken = seeds
            .take(
                &node(1),
                &path("final"),
                2 * SEGMENT + 5,
                dir.path().join("f-3"),
            )
            .unwrap();
        assert_eq!(taken.cvs.len(), 2);
    }

    #[test]
    fn preseeds_are_bounded_and_the_least_recently_written_goes_first() {
        let dir = tempfile::tempdir().unwrap();
        let seeds = Preseeds::default();
        let mut n = 0;
        let mut make = || {
            n += 1;
            let name = dir.path().join(format!("e-{n}"));
            Ok((
                File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&name)?,
                name,
            ))
        };
        let data = vec![1u8; SEGMENT as usize];
        let mut all = Vec::new();
        for id in 0..PRESEEDS_MAX as u64 {
            let p = seeds
                .entry(node(1), id, &path(&format!("f{id}")), &mut make)
                .unwrap();
            p.lock().write(0, &data, [0; 32]).unwrap();
            all.push(p);
            std::thread::sleep(Duration::from_millis(2));
        }
        // The first is written again: the second is now the oldest.
        all[0].lock().write(1, &data, [1; 32]).unwrap();
        let _new = seeds.entry(node(1), 99, &path("new"), &mut make).unwrap();
        assert_eq!(seeds.held().0, PRESEEDS_MAX);
        assert!(matches!(
            all[1].lock().write(1, &data, [1; 32]),
            Err(PreseedError::Closed)
        ));
        assert!(!dir.path().join("e-2").exists());
        assert!(all[0].lock().write(2, &data, [2; 32]).is_ok());
        assert!(matches!(
            all[0].lock().write(SEGMENTS_MAX, &data, [2; 32]),
            Err(PreseedError::TooFar(_))
        ));
    }
}
