//! Moving one file's content between nodes, on a stream of its own.
//!
//! The receiver names the content (path hint, hash, size). When it has a local file that may
//! share data with it (the old version, say), it sends the CV of each [`SEGMENT`] of that
//! basis (see [`segments`]). The sender then goes through its file segment by segment: a segment
//! whose CV matches the receiver's is not sent at all; for one that differs, the receiver sends
//! an rsync signature of its basis segment and the sender answers with a fast_rsync delta; a
//! segment beyond the basis is sent as it is. So a 1 MiB change in a 1 GiB file moves about
//! 1 MiB, and memory stays bounded by a few segments whatever the file's size.
//!
//! Neither side reads a segment that did not change: both know their file's CVs from when they
//! hashed, fetched or wrote it, the sender compares CVs, and the receiver copies an unchanged
//! segment from its basis into the staging file inside the kernel (`copy_file_range`, which
//! shares the blocks where the filesystem can) and takes its CV from what it knows.
//!
//! The receiver writes into a staging file in the state folder and checks the whole content
//! against its BLAKE3 hash (the root of the segments' CVs) before the engine may use it (MD4
//! signatures are not trusted). Writeback of the staging file starts while it is received, so
//! that making it durable at the end waits for little.

use super::framing::{read_frame, write_frame, FrameError};
use crate::tree::segments::{self, Cv, SEGMENT};
use crate::tree::Tree;
use rsyncfs_conflict::Hash;
use rsyncfs_mesh::engine::{Fetch, FetchError};
use rsyncfs_mesh::path::RelPath;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// rsync block size inside a segment, and bytes of MD4 kept per block.
const BLOCK: u32 = 4096;
const STRONG: u32 = 8;
/// Most basis segments a request carries (files up to 512 GiB use a basis).
const SEGMENTS_MAX: usize = 131_072;
/// Largest request (path, hashes) and largest signature or delta frame.
pub const REQUEST_MAX: usize = SEGMENTS_MAX * 33 + 8192;
const DATA_MAX: usize = 3 * SEGMENT as usize;
/// A basis is only worth it for files at least this large.
pub const DELTA_MIN: u64 = 256 * 1024;
/// Bytes written to a staging file between two starts of its writeback.
const WRITEBACK_EVERY: u64 = 32 << 20;

#[derive(Serialize, Deserialize, Debug)]
pub struct Request {
    pub path: RelPath,
    pub hash: Hash,
    pub size: u64,
    /// Size and segment CVs of the receiver's basis file.
    pub basis: Option<(u64, Vec<Cv>)>,
}

impl Request {
    pub fn check(&self) -> Result<(), ServeError> {
        if let Some((size, hashes)) = &self.basis {
            if hashes.len() > SEGMENTS_MAX || hashes.len() as u64 != size.div_ceil(SEGMENT) {
                return Err(ServeError::Protocol(
                    "basis segments do not match the basis size".into(),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize, Debug)]
enum Header {
    NotFound,
    Found,
}

/// What the sender says about one segment, in order.
#[derive(Serialize, Deserialize, Debug)]
enum Segment {
    /// Same as the receiver's basis segment with this index.
    Same,
    /// Send the signature of your basis segment with this index.
    NeedSignature,
    /// A delta against that signature follows, of this many bytes.
    Delta(u32),
    /// The segment follows as it is, this many bytes.
    Literal(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The stream or the file failed (not the peer's fault).
    #[error("serving content: {0}")]
    Io(String),
    /// The peer broke the protocol.
    #[error("content request: {0}")]
    Protocol(String),
}

use segments::{count as segments, len as segment_len};

/// Reads segment `i` into a new buffer, without zeroing it first.
pub(super) fn read_segment(file: &File, size: u64, i: u64) -> std::io::Result<Vec<u8>> {
    let want = segment_len(size, i);
    let mut buf = Vec::with_capacity(want);
    while buf.len() < want {
        let at = i * SEGMENT + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The spare capacity may exceed the segment, and the file may have grown meanwhile.
    buf.truncate(want);
    Ok(buf)
}

/// The CVs of a file's segments, read and hashed.
fn cvs_by_reading(file: &File, size: u64) -> std::io::Result<Vec<Cv>> {
    if segments(size) >= 2 {
        return Ok(segments::hash_file(file, size)?.1);
    }
    (0..segments(size))
        .map(|i| Ok(segments::cv(i, &read_segment(file, size, i)?)))
        .collect()
}

fn io(e: impl std::fmt::Display) -> ServeError {
    ServeError::Io(e.to_string())
}

/// Answers one request on the sending side; returns the bytes of content (literal and delta)
/// sent.
pub async fn serve(
    tree: &Tree,
    request: Request,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<u64, ServeError> {
    let file = {
        let (path, hash, size) = (request.path.clone(), request.hash, request.size);
        tokio::task::block_in_place(|| tree.open_content(&path, &hash, size))
    };
    let Some(file) = file else {
        write_frame(
            send,
            &postcard::to_stdvec(&Header::NotFound).expect("encoding"),
        )
        .await
        .map_err(io)?;
        return Ok(0);
    };
    write_frame(
        send,
        &postcard::to_stdvec(&Header::Found).expect("encoding"),
    )
    .await
    .map_err(io)?;
    let size = request.size;
    let basis = request.basis.unwrap_or_default();
    // What this node knows of its content's segments: those equal to the basis's are not read.
    let ours = tree
        .cvs(&request.hash)
        .filter(|c| c.len() as u64 == segments(size));
    let mut sent = 0u64;
    for i in 0..segments(size) {
        let theirs = basis.1.get(i as usize).filter(|_| {
            // Only a segment of the same length can be the same.
            segment_len(basis.0, i) == segment_len(size, i)
        });
        if let (Some(theirs), Some(ours)) = (theirs, &ours) {
            if ours[i as usize] == *theirs {
                send_op(send, &Segment::Same).await?;
                continue;
            }
        }
        let data = tokio::task::block_in_place(|| read_segment(&file, size, i)).map_err(io)?;
        if ours.is_none() && theirs.is_some_and(|h| segments::cv(i, &data) == *h) {
            send_op(send, &Segment::Same).await?;
            continue;
        }
        if (i as usize) < basis.1.len() {
            send_op(send, &Segment::NeedSignature).await?;
            let signature = read_frame(recv, DATA_MAX)
                .await
                .map_err(|e| match e {
                    FrameError::Lost(e) => ServeError::Io(e),
                    FrameError::Bad(e) => ServeError::Protocol(e),
                })?
                .ok_or_else(|| ServeError::Protocol("no signature came".into()))?;
            let delta = tokio::task::block_in_place(|| make_delta(signature, &data))?;
            send_op(send, &Segment::Delta(delta.len() as u32)).await?;
            send.write_all(&delta).await.map_err(io)?;
            sent += delta.len() as u64;
        } else {
            send_op(send, &Segment::Literal(data.len() as u32)).await?;
            sent += data.len() as u64;
            // Handed over as it is: quinn keeps the buffer instead of copying it.
            send.write_chunk(data.into()).await.map_err(io)?;
        }
    }
    Ok(sent)
}

fn make_delta(signature: Vec<u8>, data: &[u8]) -> Result<Vec<u8>, ServeError> {
    // Check the header ourselves: the library asserts on what a peer could send.
    if signature.len() < 12 {
        return Err(ServeError::Protocol("short signature".into()));
    }
    let block = u32::from_be_bytes(signature[4..8].try_into().expect("4 bytes"));
    let strong = u32::from_be_bytes(signature[8..12].try_into().expect("4 bytes"));
    if block == 0 || block > 1 << 20 || strong == 0 || strong > 16 {
        return Err(ServeError::Protocol("bad signature parameters".into()));
    }
    let signature = fast_rsync::Signature::deserialize(signature)
        .map_err(|_| ServeError::Protocol("signature does not parse".into()))?;
    let mut delta = Vec::new();
    fast_rsync::diff(&signature.index(), data, &mut delta)
        .map_err(|e| ServeError::Protocol(format!("delta: {e}")))?;
    if delta.len() > DATA_MAX {
        return Err(ServeError::Protocol("delta too large".into()));
    }
    Ok(delta)
}

async fn send_op(send: &mut quinn::SendStream, op: &Segment) -> Result<(), ServeError> {
    write_frame(send, &postcard::to_stdvec(op).expect("encoding"))
        .await
        .map_err(io)
}

/// A local file the receiver builds on: its size, its segments' CVs, and, for a file of the
/// tree, the content it held when its CVs were taken (checked again after its segments were
/// copied, since a local program may write it meanwhile).
struct Basis {
    file: File,
    size: u64,
    cvs: Arc<[Cv]>,
    holds: Option<Hash>,
}

/// Fetches `f` into a staging file; returns its path. The content bytes that cross (literal
/// segments and deltas) are added to `received` as they arrive, also when the fetch fails. A
/// notification on `stop` ends it as if the sender were gone.
pub async fn fetch(
    tree: &Tree,
    f: &Fetch,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    received: &AtomicU64,
    stop: &tokio::sync::Notify,
) -> Result<PathBuf, FetchError> {
    // The basis: what an earlier fetch of this content left (its whole segments), else what
    // the sender pushed while its writer wrote the file (a preseed, taken over as the staging
    // file), else a local file that may share segments with it.
    let mut basis: Option<Basis> = None;
    let mut adopted: Option<(File, PathBuf)> = None;
    if f.size >= DELTA_MIN {
        basis = tokio::task::block_in_place(|| resume_basis(tree, &f.hash));
        let preseed = || {
            let t = tree.take_preseed(&f.from, &f.path, f.size, &f.hash)?;
            let cvs: Vec<Cv> = t.cvs.into_iter().take(SEGMENTS_MAX).collect();
            let file = t.file.try_clone().ok()?;
            Some((
                Basis {
                    file,
                    size: cvs.len() as u64 * SEGMENT,
                    cvs: cvs.into(),
                    holds: None,
                },
                (t.file, t.staged),
            ))
        };
        if let Some(b) = &basis {
            tracing::info!(
                "resuming {}: {} of {} bytes are here from an earlier fetch",
                f.path,
                b.size,
                f.size
            );
        } else if let Some((b, a)) = (f.size >= super::preseed::PRESEED_MIN)
            .then(|| tokio::task::block_in_place(preseed))
            .flatten()
        {
            tracing::debug!(
                "fetching {} onto its preseed: {} of {} bytes are here",
                f.path,
                b.size,
                f.size
            );
            basis = Some(b);
            adopted = Some(a);
        } else if let Some(p) = &f.basis {
            basis = tokio::task::block_in_place(|| prepare_basis(tree, p));
        }
    }
    let request = Request {
        path: f.path.clone(),
        hash: f.hash,
        size: f.size,
        basis: basis.as_ref().map(|b| (b.size, b.cvs.to_vec())),
    };
    let asked = async {
        write_frame(send, &postcard::to_stdvec(&request).expect("encoding"))
            .await
            .map_err(|_| FetchError::Unreachable)?;
        let header = read_control(recv).await?;
        match postcard::from_bytes::<Header>(&header).map_err(|e| corrupt(e.to_string()))? {
            Header::NotFound => Err(FetchError::NotFound),
            Header::Found => Ok(()),
        }
    };
    if let Err(e) = asked.await {
        // An adopted preseed is already this fetch's staging file: kept for the next fetch
        // of the content, as when the transfer breaks later (the sender killed right after
        // it was asked lost the preseed's segments, and the next fetch moved them again).
        if let Some((file, staged)) = adopted {
            drop(file);
            match e {
                FetchError::Corrupt(_) => {
                    let _ = std::fs::remove_file(&staged);
                }
                _ => tree.keep_partial(&staged, &f.hash),
            }
        }
        return Err(e);
    }
    // Where the file here is the basis and large, only the segments that differ are staged,
    // to be written into it in place (see `tree::in_place`).
    let patch_of = match &basis {
        Some(b @ Basis { holds: Some(h), .. })
            if tokio::task::block_in_place(|| tree.updates_in_place(&b.file, b.size)) =>
        {
            Some((*h, b.size))
        }
        _ => None,
    };
    let onto_preseed = adopted.is_some();
    let (out, staged) = match (adopted, patch_of) {
        (Some(a), _) => a,
        (None, Some(_)) => tree
            .patch_staging_file()
            .map_err(|e| local("making a staging file", e))?,
        (None, None) => tree
            .fetch_staging_file(&f.hash)
            .map_err(|e| local("making a staging file", e))?,
    };
    // Onto a preseed, a segment the basis holds is where it belongs already: like a patch's.
    // A newer fetch of this content stops this one: what arrived is then kept below, for the
    // newer one to resume from (see `fetching`).
    let mut result = tokio::select! {
        r = receive(
            tree,
            f,
            &out,
            basis,
            patch_of.is_some() || onto_preseed,
            send,
            recv,
            received,
        ) => r,
        () = stop.notified() => Err(FetchError::Unreachable),
    };
    if onto_preseed && result.is_ok() {
        // The preseed may hold segments beyond the content's end.
        if let Err(e) = out.set_len(f.size) {
            result = Err(local("cutting the preseed to the content's size", e));
        }
    }
    match (result, patch_of) {
        (Ok((cvs, patched)), patch_of) => {
            tree.drop_partial(&f.hash);
            tree.remember_cvs(f.hash, cvs.into());
            if let Some(basis) = patch_of {
                let patch = crate::tree::in_place::Patch {
                    basis,
                    size: f.size,
                    segments: patched,
                };
                if !tree.remember_patch(&staged, patch) {
                    let _ = std::fs::remove_file(&staged);
                    return Err(local(
                        "staging a patch",
                        std::io::Error::other("too many patches staged"),
                    ));
                }
            }
            Ok(staged)
        }
        // What arrived is checked segment by segment against the sender's CVs when a later
        // fetch offers it as its basis, so it is kept, unless the sender lied (or it is a
        // patch: its basis is still here).
        (Err(e @ FetchError::Corrupt(_)), _) | (Err(e), Some(_)) => {
            let _ = std::fs::remove_file(&staged);
            Err(e)
        }
        (Err(e), None) => {
            drop(out);
            tree.keep_partial(&staged, &f.hash);
            Err(e)
        }
    }
}

/// The peer sent something that does not check out.
fn corrupt(why: String) -> FetchError {
    FetchError::Corrupt(why)
}

/// Receiving failed here (the staging file, the basis).
fn local(what: &str, e: std::io::Error) -> FetchError {
    FetchError::Io(crate::tree::io_failure(what, &e))
}

/// One of the sender's small control frames (a header or a segment operation); a stream that
/// ends or fails here means the sender is gone.
async fn read_control(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, FetchError> {
    read_frame(recv, 64)
        .await
        .map_err(|_| FetchError::Unreachable)?
        .ok_or(FetchError::Unreachable)
}

/// The whole segments of the partial copy of `hash`, as a basis (read and hashed: nothing
/// else knows them).
fn resume_basis(tree: &Tree, hash: &Hash) -> Option<Basis> {
    let (file, len) = tree.partial(hash)?;
    let whole = (len / SEGMENT).min(SEGMENTS_MAX as u64);
    if whole == 0 {
        return None;
    }
    let size = whole * SEGMENT;
    let cvs = cvs_by_reading(&file, size).ok()?;
    Some(Basis {
        file,
        size,
        cvs: cvs.into(),
        holds: None,
    })
}

/// The file at `path` as a basis, with the CVs known for its content (read only when they are
/// not known).
fn prepare_basis(tree: &Tree, path: &RelPath) -> Option<Basis> {
    let meta = tree.observe(path).ok()??;
    let (hash, size) = meta.file_hash()?;
    if segments(size) as usize > SEGMENTS_MAX {
        return None;
    }
    let file = tree.open_content(path, &hash, size)?;
    let cvs = match tree.cvs(&hash).filter(|c| c.len() as u64 == segments(size)) {
        Some(cvs) => cvs,
        None => cvs_by_reading(&file, size).ok()?.into(),
    };
    Some(Basis {
        file,
        size,
        cvs,
        holds: Some(hash),
    })
}

/// Receives the segments into `out`; returns the content's segment CVs (empty for a content
/// of one segment or none) and the segments written. With `patch`, a segment the basis holds
/// is not copied: `out` holds the others, each at its offset.
#[allow(clippy::too_many_arguments)]
async fn receive(
    tree: &Tree,
    f: &Fetch,
    out: &File,
    mut basis: Option<Basis>,
    patch: bool,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    received: &AtomicU64,
) -> Result<(Vec<Cv>, Vec<u64>), FetchError> {
    let n = segments(f.size);
    let mut cvs: Vec<Cv> = Vec::with_capacity(n as usize);
    let mut written: Vec<u64> = Vec::new();
    // A content of one segment is checked on its bytes (its hash is not a merge of CVs).
    let mut whole: Option<Hash> = None;
    let mut copied = false;
    let mut writeback = Writeback::default();
    for i in 0..n {
        let want = segment_len(f.size, i);
        let op = read_control(recv).await?;
        let op: Segment = postcard::from_bytes(&op).map_err(|e| corrupt(e.to_string()))?;
        let data = match op {
            Segment::Same => {
                let b = basis.as_mut().ok_or_else(|| corrupt("no basis".into()))?;
                if i >= segments(b.size) || segment_len(b.size, i) != want {
                    return Err(corrupt("no such segment in the basis".into()));
                }
                if n >= 2 {
                    cvs.push(b.cvs[i as usize]);
                    copied = true;
                    if !patch {
                        tokio::task::block_in_place(|| {
                            segments::copy_range(&b.file, out, i * SEGMENT, want)
                        })
                        .map_err(|e| local("copying from the basis", e))?;
                        writeback.wrote(out, want as u64).await?;
                    }
                    continue;
                }
                tokio::task::block_in_place(|| read_segment(&b.file, b.size, i))
                    .map_err(|e| local("reading the basis", e))?
            }
            Segment::Literal(len) => {
                if len as usize != want {
                    return Err(corrupt("segment of the wrong length".into()));
                }
                let hash = receive_literal(recv, out, i, want, n >= 2, received).await?;
                match n {
                    1 => whole = Some(hash),
                    _ => cvs.push(hash),
                }
                written.push(i);
                writeback.wrote(out, want as u64).await?;
                continue;
            }
            Segment::NeedSignature => {
                let b = basis.as_mut().ok_or_else(|| corrupt("no basis".into()))?;
                if i >= segments(b.size) {
                    return Err(corrupt("signature asked beyond the basis".into()));
                }
                let base = tokio::task::block_in_place(|| read_segment(&b.file, b.size, i))
                    .map_err(|e| local("reading the basis", e))?;
                let signature = tokio::task::block_in_place(|| {
                    fast_rsync::Signature::calculate(
                        &base,
                        fast_rsync::SignatureOptions {
                            block_size: BLOCK,
                            crypto_hash_size: STRONG,
                        },
                    )
                });
                write_frame(send, signature.serialized())
                    .await
                    .map_err(|_| FetchError::Unreachable)?;
                let op = read_control(recv).await?;
                let Segment::Delta(len) =
                    postcard::from_bytes(&op).map_err(|e| corrupt(e.to_string()))?
                else {
                    return Err(corrupt("expected a delta".into()));
                };
                if len as usize > DATA_MAX {
                    return Err(corrupt("delta too large".into()));
                }
                let mut delta = vec![0u8; len as usize];
                recv.read_exact(&mut delta)
                    .await
                    .map_err(|_| FetchError::Unreachable)?;
                received.fetch_add(u64::from(len), Ordering::Relaxed);
                let mut data = Vec::with_capacity(want);
                fast_rsync::apply_limited(&base, &delta, &mut data, want)
                    .map_err(|e| corrupt(format!("delta does not apply: {e}")))?;
                data
            }
            Segment::Delta(_) => return Err(corrupt("delta without a signature".into())),
        };
        if data.len() != want {
            return Err(corrupt("segment of the wrong length".into()));
        }
        if n >= 2 {
            cvs.push(tokio::task::block_in_place(|| segments::cv(i, &data)));
        } else {
            whole = Some(*blake3::hash(&data).as_bytes());
        }
        tokio::task::block_in_place(|| out.write_all_at(&data, i * SEGMENT))
            .map_err(|e| local("writing the staging file", e))?;
        written.push(i);
        writeback.wrote(out, want as u64).await?;
    }
    let hash = match n {
        0 => *blake3::hash(&[]).as_bytes(),
        1 => whole.expect("one segment came"),
        _ => segments::root(&cvs),
    };
    if hash != f.hash {
        return Err(corrupt(format!(
            "content of {} does not match its hash",
            f.path
        )));
    }
    // The copied segments are the basis's only if nothing wrote to it meanwhile.
    if let Some(Basis {
        file,
        holds: Some(h),
        ..
    }) = &basis
    {
        if copied && !tree.still_holds(file, h) {
            return Err(FetchError::Io(rsyncfs_mesh::engine::IoFailure::new(
                rsyncfs_mesh::engine::IoKind::Other,
                format!("{}: the local basis changed while it was copied", f.path),
            )));
        }
    }
    writeback.finish().await?;
    Ok((cvs, written))
}

/// Bytes of a segment gathered before they are hashed and written in one call.
const WRITE_BATCH: usize = 1 << 20;

/// Receives segment `i` of `want` bytes as the stream's chunks come: they are gathered into
/// one buffer, reused, of [`WRITE_BATCH`] bytes, which is hashed and written to `out` in one
/// call when full. (A copy, but a cheap one: BLAKE3 hashes on all SIMD lanes only runs that
/// start at a multiple of its chunk, and the stream's chunks fall anywhere.) Returns the
/// segment's CV when the content has `several` segments, else the content's hash.
async fn receive_literal(
    recv: &mut quinn::RecvStream,
    out: &File,
    i: u64,
    want: usize,
    several: bool,
    received: &AtomicU64,
) -> Result<[u8; 32], FetchError> {
    let mut hasher = match several {
        true => segments::cv_hasher(i),
        false => blake3::Hasher::new(),
    };
    let (mut at, mut left) = (i * SEGMENT, want);
    let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH.min(want));
    while left > 0 {
        let room = (batch.capacity() - batch.len()).min(left);
        let chunk = recv
            .read_chunk(room, true)
            .await
            .map_err(|_| FetchError::Unreachable)?
            .ok_or(FetchError::Unreachable)?;
        left -= chunk.bytes.len();
        received.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
        batch.extend_from_slice(&chunk.bytes);
        if batch.len() == batch.capacity() || left == 0 {
            tokio::task::block_in_place(|| {
                hasher.update(&batch);
                out.write_all_at(&batch, at)
            })
            .map_err(|e| local("writing the staging file", e))?;
            at += batch.len() as u64;
            batch.clear();
        }
    }
    Ok(match several {
        true => segments::cv_of(&hasher),
        false => *hasher.finalize().as_bytes(),
    })
}

/// Starts the staging file's writeback every [`WRITEBACK_EVERY`] bytes (an `fdatasync` on
/// another thread, one at a time), so that making it durable at the end waits only for the
/// rest. Its errors (a full disk found at writeback, say) fail the fetch: the error is reported
/// once per open file, and the final sync would not see it again.
#[derive(Default)]
struct Writeback {
    since: u64,
    running: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Writeback {
    async fn wrote(&mut self, out: &File, bytes: u64) -> Result<(), FetchError> {
        self.since += bytes;
        if self.since < WRITEBACK_EVERY || self.running.as_ref().is_some_and(|r| !r.is_finished()) {
            return Ok(());
        }
        if let Some(done) = self.running.take() {
            Self::check(done.await.unwrap_or_else(|e| Err(std::io::Error::other(e))))?;
        }
        self.since = 0;
        let clone = out
            .try_clone()
            .map_err(|e| local("making the staging file durable", e))?;
        self.running = Some(tokio::task::spawn_blocking(move || clone.sync_data()));
        Ok(())
    }

    async fn finish(mut self) -> Result<(), FetchError> {
        match self.running.take() {
            Some(r) => Self::check(r.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))),
            None => Ok(()),
        }
    }

    fn check(r: std::io::Result<()>) -> Result<(), FetchError> {
        r.map_err(|e| local("making the staging file durable", e))
    }
}
