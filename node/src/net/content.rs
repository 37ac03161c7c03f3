//! Moving one file's content between nodes, on a stream of its own.
//!
//! The receiver names the content (path hint, hash, size). When it has a local file that may
//! share data with it (the old version, say), it sends the BLAKE3 hash of each [`SEGMENT`] of
//! that basis. The sender then goes through its file segment by segment: a segment whose hash
//! matches the receiver's is not sent at all; for one that differs, the receiver sends an rsync
//! signature of its basis segment and the sender answers with a fast_rsync delta; a segment
//! beyond the basis is sent as it is. So a 1 MiB change in a 1 GiB file moves about 1 MiB, and
//! memory stays bounded by a few segments whatever the file's size.
//!
//! The receiver writes into a staging file in the state folder and checks the whole content
//! against its BLAKE3 hash before the engine may use it (MD4 signatures are not trusted).

use super::framing::{read_frame, write_frame, FrameError};
use crate::tree::Tree;
use rsyncfs_conflict::Hash;
use rsyncfs_mesh::engine::{Fetch, FetchError};
use rsyncfs_mesh::path::RelPath;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes per segment.
pub const SEGMENT: u64 = 4 << 20;
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

#[derive(Serialize, Deserialize, Debug)]
pub struct Request {
    pub path: RelPath,
    pub hash: Hash,
    pub size: u64,
    /// Size and segment hashes of the receiver's basis file.
    pub basis: Option<(u64, Vec<Hash>)>,
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

fn segments(size: u64) -> u64 {
    size.div_ceil(SEGMENT)
}

fn segment_len(size: u64, i: u64) -> usize {
    (size - i * SEGMENT).min(SEGMENT) as usize
}

fn read_segment(file: &mut File, size: u64, i: u64) -> std::io::Result<Vec<u8>> {
    let len = segment_len(size, i);
    let mut buf = vec![0u8; len];
    file.seek(SeekFrom::Start(i * SEGMENT))?;
    file.read_exact(&mut buf)?;
    Ok(buf)
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
    let Some(mut file) = file else {
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
    let mut sent = 0u64;
    for i in 0..segments(size) {
        let data = tokio::task::block_in_place(|| read_segment(&mut file, size, i)).map_err(io)?;
        let theirs = basis.1.get(i as usize).filter(|_| {
            // Only a full-length basis segment can be the same.
            segment_len(basis.0, i) == data.len()
        });
        if theirs.is_some_and(|h| blake3::hash(&data).as_bytes() == h) {
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
            send.write_all(&data).await.map_err(io)?;
            sent += data.len() as u64;
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

/// Fetches `f` into a staging file; returns its path. The content bytes that cross (literal
/// segments and deltas) are added to `received` as they arrive, also when the fetch fails.
pub async fn fetch(
    tree: &Tree,
    f: &Fetch,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    received: &AtomicU64,
) -> Result<PathBuf, FetchError> {
    // The basis: what an earlier fetch of this content left (its whole segments), else a
    // local file that may share segments with it.
    let mut basis_file: Option<(File, u64)> = None;
    let mut basis_hashes = None;
    if f.size >= DELTA_MIN {
        let partial = tokio::task::block_in_place(|| resume_basis(tree, &f.hash));
        if let Some((file, size, hashes)) = partial {
            tracing::info!(
                "resuming {}: {} of {} bytes are here from an earlier fetch",
                f.path,
                size,
                f.size
            );
            basis_hashes = Some((size, hashes));
            basis_file = Some((file, size));
        } else if let Some(p) = &f.basis {
            let prepared = tokio::task::block_in_place(|| prepare_basis(tree, p));
            if let Some((file, size, hashes)) = prepared {
                basis_hashes = Some((size, hashes));
                basis_file = Some((file, size));
            }
        }
    }
    let request = Request {
        path: f.path.clone(),
        hash: f.hash,
        size: f.size,
        basis: basis_hashes,
    };
    write_frame(send, &postcard::to_stdvec(&request).expect("encoding"))
        .await
        .map_err(|_| FetchError::Unreachable)?;
    let header = read_control(recv).await?;
    match postcard::from_bytes::<Header>(&header).map_err(|e| corrupt(e.to_string()))? {
        Header::NotFound => return Err(FetchError::NotFound),
        Header::Found => {}
    }
    let (mut out, staged) = tree
        .fetch_staging_file(&f.hash)
        .map_err(|e| local("making a staging file", e))?;
    let result = receive(f, &mut out, basis_file, send, recv, received).await;
    match result {
        Ok(()) => {
            tree.drop_partial(&f.hash);
            Ok(staged)
        }
        // What arrived is checked segment by segment against the sender's hashes when a
        // later fetch offers it as its basis, so it is kept, unless the sender lied.
        Err(e @ FetchError::Corrupt(_)) => {
            let _ = std::fs::remove_file(&staged);
            Err(e)
        }
        Err(e) => {
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

/// The whole segments of the partial copy of `hash`, as a basis.
fn resume_basis(tree: &Tree, hash: &Hash) -> Option<(File, u64, Vec<Hash>)> {
    let (mut file, len) = tree.partial(hash)?;
    let whole = (len / SEGMENT).min(SEGMENTS_MAX as u64);
    if whole == 0 {
        return None;
    }
    let size = whole * SEGMENT;
    let mut hashes = Vec::with_capacity(whole as usize);
    for i in 0..whole {
        let data = read_segment(&mut file, size, i).ok()?;
        hashes.push(*blake3::hash(&data).as_bytes());
    }
    Some((file, size, hashes))
}

fn prepare_basis(tree: &Tree, path: &RelPath) -> Option<(File, u64, Vec<Hash>)> {
    let meta = tree.observe(path).ok()??;
    let (hash, size) = meta.file_hash()?;
    let mut file = tree.open_content(path, &hash, size)?;
    if segments(size) as usize > SEGMENTS_MAX {
        return None;
    }
    let mut hashes = Vec::with_capacity(segments(size) as usize);
    for i in 0..segments(size) {
        let data = read_segment(&mut file, size, i).ok()?;
        hashes.push(*blake3::hash(&data).as_bytes());
    }
    Some((file, size, hashes))
}

async fn receive(
    f: &Fetch,
    out: &mut File,
    mut basis: Option<(File, u64)>,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    received: &AtomicU64,
) -> Result<(), FetchError> {
    let mut hasher = blake3::Hasher::new();
    for i in 0..segments(f.size) {
        let want = segment_len(f.size, i);
        let op = read_control(recv).await?;
        let op: Segment = postcard::from_bytes(&op).map_err(|e| corrupt(e.to_string()))?;
        let data = match op {
            Segment::Same => {
                let (file, size) = basis.as_mut().ok_or_else(|| corrupt("no basis".into()))?;
                tokio::task::block_in_place(|| read_segment(file, *size, i))
                    .map_err(|e| local("reading the basis", e))?
            }
            Segment::Literal(n) => {
                if n as usize != want {
                    return Err(corrupt("segment of the wrong length".into()));
                }
                let mut data = vec![0u8; want];
                recv.read_exact(&mut data)
                    .await
                    .map_err(|_| FetchError::Unreachable)?;
                received.fetch_add(want as u64, Ordering::Relaxed);
                data
            }
            Segment::NeedSignature => {
                let (file, size) = basis.as_mut().ok_or_else(|| corrupt("no basis".into()))?;
                if i >= segments(*size) {
                    return Err(corrupt("signature asked beyond the basis".into()));
                }
                let base = tokio::task::block_in_place(|| read_segment(file, *size, i))
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
                let Segment::Delta(n) =
                    postcard::from_bytes(&op).map_err(|e| corrupt(e.to_string()))?
                else {
                    return Err(corrupt("expected a delta".into()));
                };
                if n as usize > DATA_MAX {
                    return Err(corrupt("delta too large".into()));
                }
                let mut delta = vec![0u8; n as usize];
                recv.read_exact(&mut delta)
                    .await
                    .map_err(|_| FetchError::Unreachable)?;
                received.fetch_add(u64::from(n), Ordering::Relaxed);
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
        hasher.update(&data);
        tokio::task::block_in_place(|| out.write_all(&data))
            .map_err(|e| local("writing the staging file", e))?;
    }
    if hasher.finalize().as_bytes() != &f.hash {
        return Err(corrupt(format!(
            "content of {} does not match its hash",
            f.path
        )));
    }
    Ok(())
}
