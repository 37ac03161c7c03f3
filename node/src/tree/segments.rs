//! A file's content hash built from its segments.
//!
//! A content is named by the BLAKE3 hash of its bytes. BLAKE3 is a tree of 1 KiB chunks, and a
//! [`SEGMENT`] (4,096 chunks, a power of two) starting at a multiple of its length is a whole
//! subtree of it: the subtree's chaining value (its *CV*) depends only on the segment's bytes and
//! index. So the whole file's hash can be had from its segments' CVs
//! ([`root`]) without reading the file again, segments can be hashed on several threads at
//! once ([`hash_file`]), and two files' segments can be compared by CV: the CVs of a content
//! are kept (by content hash, in [`CvCache`]) and a segment that did not change is never read
//! again to compare it, to check a fetch or to serve a peer.
//!
//! This uses `blake3::hazmat`; the tests check [`root`] against `blake3::hash` on the edges of
//! the tree (one segment, two, a power of two and one more, a short last segment).

use super::by_hash::ByHash;
use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};
use rsyncfs_conflict::Hash;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Bytes per segment: the unit of hashing, comparing and fetching a large file.
pub const SEGMENT: u64 = 4 << 20;
/// A segment's chaining value.
pub type Cv = [u8; 32];
/// Threads that hash one large file's segments at once.
const HASH_THREADS_MAX: usize = 4;
/// Files at least this large are hashed on more than one thread.
const PARALLEL_MIN: u64 = 4 * SEGMENT;
/// CVs kept in a [`CvCache`] (8 MiB of them: the segments of 1 TiB of content).
const CVS_KEPT_MAX: usize = 262_144;

pub fn count(size: u64) -> u64 {
    size.div_ceil(SEGMENT)
}

pub fn len(size: u64, i: u64) -> usize {
    (size - i * SEGMENT).min(SEGMENT) as usize
}

/// The CV of segment `i` of a file, from the segment's bytes.
pub fn cv(i: u64, data: &[u8]) -> Cv {
    let mut h = cv_hasher(i);
    h.update(data);
    cv_of(&h)
}

/// A hasher for segment `i`, to be fed its bytes in order and finished with [`cv_of`].
pub fn cv_hasher(i: u64) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(i * SEGMENT);
    h
}

/// The CV of the segment a [`cv_hasher`] was fed.
pub fn cv_of(h: &blake3::Hasher) -> Cv {
    h.finalize_non_root()
}

/// The hash of a content of more than one segment, from its segments' CVs in order.
pub fn root(cvs: &[Cv]) -> Hash {
    assert!(cvs.len() >= 2, "a content of one segment is hashed whole");
    let split = left_len(cvs.len());
    let (l, r) = cvs.split_at(split);
    *merge_subtrees_root(&merge(l), &merge(r), Mode::Hash).as_bytes()
}

/// The CV of the subtree over `cvs` (a whole left part, or the right edge of the tree).
fn merge(cvs: &[Cv]) -> Cv {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (l, r) = cvs.split_at(left_len(cvs.len()));
    merge_subtrees_non_root(&merge(l), &merge(r), Mode::Hash)
}

/// Segments in the left subtree of `n` segments: the largest power of two below `n`.
fn left_len(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The hash of `size` bytes of `file` and, for a content of more than one segment, its
/// segments' CVs (empty otherwise). Large files are read and hashed on several threads with
/// positional reads, each into a buffer of one segment.
pub fn hash_file(file: &File, size: u64) -> std::io::Result<(Hash, Vec<Cv>)> {
    hash_file_unless(file, size, &|| false)
}

/// Segments each hashing thread reads between two asks of `changed`.
const SEGMENTS_BETWEEN_CHECKS: usize = 8;

/// [`hash_file`], which gives up (an error of kind `Interrupted`) as soon as `changed` says the
/// file changed: asked by each thread every [`SEGMENTS_BETWEEN_CHECKS`] segments, so that a
/// file being written costs a few segments' reading, not a whole read of it.
pub fn hash_file_unless(
    file: &File,
    size: u64,
    changed: &(dyn Fn() -> bool + Sync),
) -> std::io::Result<(Hash, Vec<Cv>)> {
    let n = count(size);
    if n <= 1 {
        let mut data = vec![0u8; size as usize];
        file.read_exact_at(&mut data, 0)?;
        return Ok((*blake3::hash(&data).as_bytes(), Vec::new()));
    }
    let threads = if size >= PARALLEL_MIN {
        std::thread::available_parallelism()
            .map_or(1, |p| p.get())
            .clamp(1, HASH_THREADS_MAX)
    } else {
        1
    };
    let mut cvs = vec![[0u8; 32]; n as usize];
    let per = cvs.len().div_ceil(threads);
    let gave_up = std::sync::atomic::AtomicBool::new(false);
    let interrupted = || std::io::Error::new(std::io::ErrorKind::Interrupted, "changed while read");
    std::thread::scope(|s| {
        let jobs: Vec<_> = cvs
            .chunks_mut(per)
            .enumerate()
            .map(|(t, out)| {
                let gave_up = &gave_up;
                s.spawn(move || -> std::io::Result<()> {
                    let mut buf = vec![0u8; SEGMENT as usize];
                    for (k, slot) in out.iter_mut().enumerate() {
                        if k % SEGMENTS_BETWEEN_CHECKS == SEGMENTS_BETWEEN_CHECKS - 1 {
                            if gave_up.load(std::sync::atomic::Ordering::Relaxed) {
                                return Err(interrupted());
                            }
                            if changed() {
                                gave_up.store(true, std::sync::atomic::Ordering::Relaxed);
                                return Err(interrupted());
                            }
                        }
                        let i = (t * per + k) as u64;
                        let data = &mut buf[..len(size, i)];
                        file.read_exact_at(data, i * SEGMENT)?;
                        *slot = cv(i, data);
                    }
                    Ok(())
                })
            })
            .collect();
        jobs.into_iter()
            .try_for_each(|j| j.join().expect("a hashing thread panicked"))
    })?;
    Ok((root(&cvs), cvs))
}

/// The CVs of contents by hash, for contents of more than one segment, the oldest forgotten
/// first beyond [`CVS_KEPT_MAX`] CVs. A CV list depends only on the content, so an entry is
/// never stale: whether a file still holds that content is the caller's question.
pub struct CvCache(ByHash<Arc<[Cv]>>);

impl Default for CvCache {
    fn default() -> CvCache {
        CvCache(ByHash::new(CVS_KEPT_MAX))
    }
}

impl CvCache {
    pub fn put(&mut self, hash: Hash, cvs: Arc<[Cv]>) {
        if cvs.len() >= 2 {
            let n = cvs.len();
            self.0.put(hash, cvs, n);
        }
    }

    pub fn get(&self, hash: &Hash) -> Option<Arc<[Cv]>> {
        self.0.get(hash)
    }

    /// The bytes of the CVs kept now, and the most that may be kept.
    pub fn bytes(&self) -> (usize, usize) {
        let (n, max) = self.0.weight();
        (n * size_of::<Cv>(), max * size_of::<Cv>())
    }
}

/// Copies `len` bytes at `at` from `src` to the same place in `dst` inside the kernel (the
/// filesystem may share the blocks), or through a buffer where the kernel cannot.
pub fn copy_range(src: &File, dst: &File, at: u64, len: usize) -> std::io::Result<()> {
    let (mut from, mut to, mut left) = (at, at, len);
    while left > 0 {
        match rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), left) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => left -= n,
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::NOSYS,
            ) => {
                let mut buf = vec![0u8; left];
                src.read_exact_at(&mut buf, from)?;
                return dst.write_all_at(&buf, to);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn data(len: u64) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4099) as u8).collect()
    }

    fn cvs_of(d: &[u8]) -> Vec<Cv> {
        let size = d.len() as u64;
        (0..count(size))
            .map(|i| {
                let at = (i * SEGMENT) as usize;
                cv(i, &d[at..at + len(size, i)])
            })
            .collect()
    }

    #[test]
    fn the_root_of_the_segments_is_the_hash_of_the_whole() {
        let s = SEGMENT;
        for size in [
            s + 1,
            2 * s,
            2 * s + 1024,
            3 * s - 1,
            4 * s,
            5 * s + 17,
            8 * s + 1,
        ] {
            let d = data(size);
            assert_eq!(
                root(&cvs_of(&d)),
                *blake3::hash(&d).as_bytes(),
                "size {size}"
            );
        }
    }

    #[test]
    fn a_file_hashed_on_threads_gives_the_hash_of_its_bytes_and_its_segments() {
        for size in [0, 1000, SEGMENT, SEGMENT + 1, 4 * SEGMENT, 9 * SEGMENT + 5] {
            let d = data(size);
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&d).unwrap();
            let (hash, cvs) = hash_file(&f, size).unwrap();
            assert_eq!(hash, *blake3::hash(&d).as_bytes(), "size {size}");
            if size > SEGMENT {
                assert_eq!(cvs, cvs_of(&d), "size {size}");
            } else {
                assert!(cvs.is_empty());
            }
        }
    }

    #[test]
    fn hashing_gives_up_on_a_file_that_changes_within_a_few_segments() {
        let size = 64 * SEGMENT;
        let d = data(size);
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&d).unwrap();
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let changed = || asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 1;
        let e = hash_file_unless(&f, size, &changed).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted);
        // Each thread asks every few segments, and stops once one of them saw the change.
        let threads = std::thread::available_parallelism()
            .map_or(1, |p| p.get())
            .min(HASH_THREADS_MAX);
        assert!(asked.into_inner() <= 2 * threads, "asked too often");
        let unchanged = hash_file_unless(&f, size, &|| false).unwrap();
        assert_eq!(unchanged.0, *blake3::hash(&d).as_bytes());
    }

    #[test]
    fn a_segment_that_changed_changes_only_its_cv() {
        let mut d = data(3 * SEGMENT);
        let before = cvs_of(&d);
        d[(SEGMENT + 5) as usize] ^= 1;
        let after = cvs_of(&d);
        assert_eq!(before[0], after[0]);
        assert_ne!(before[1], after[1]);
        assert_eq!(before[2], after[2]);
        // The same bytes at another index are another CV: segments compare by position.
        let same = vec![0u8; SEGMENT as usize];
        assert_ne!(cv(0, &same), cv(1, &same));
    }

    #[test]
    fn the_cache_forgets_the_oldest_beyond_its_budget() {
        let mut c = CvCache::default();
        let big: Arc<[Cv]> = vec![[1u8; 32]; CVS_KEPT_MAX / 2].into();
        c.put([1; 32], big.clone());
        c.put([2; 32], big.clone());
        assert!(c.get(&[1; 32]).is_some());
        c.put([3; 32], vec![[3u8; 32]; 2].into());
        assert!(c.get(&[1; 32]).is_none());
        assert!(c.get(&[2; 32]).is_some() && c.get(&[3; 32]).is_some());
        c.put([4; 32], vec![[4u8; 32]; 1].into());
        assert!(c.get(&[4; 32]).is_none(), "one segment is hashed whole");
    }
}
