//! Shipping a large file while it is being written: a *preseed*.
//!
//! Every [`TICK`] the node asks the mount which files are open for writing. Of those at least
//! [`PRESEED_MIN`] large, the segments that are whole (below the file's size), new since the
//! file was opened (a file made or truncated by its writer, or what an append added: a large
//! file opened to change a few bytes inside is not sent whole) and not pushed yet go to each
//! connected peer on a stream of their own ([`push`]), one stream per file and
//! peer at a time, so the pace is the link's. A peer keeps them in a preseed
//! (`tree::preseed`); the fetch that follows the writer's close offers them as its basis and
//! only the segments that differ from the final content cross then. Which segments to push,
//! to whom and when is [`Plan`]'s choice, without I/O; a preseed never changes what a node's
//! engine knows or decides, only what a fetch finds already here.

use super::framing::{read_frame, write_frame, FrameError};
use crate::tree::segments::{self, SEGMENT};
use crate::tree::Tree;
use rsyncfs_conflict::NodeId;
use rsyncfs_mesh::path::RelPath;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

/// How often the files being written are looked at.
pub const TICK: Duration = Duration::from_millis(100);
/// Files smaller than this are not preseeded (their fetch after the close is short).
pub const PRESEED_MIN: u64 = 8 * SEGMENT;
/// Files being written that are followed at once.
pub const WRITING_MAX: usize = 16;
/// Segments in one push (64 MiB).
pub const PUSH_SEGMENTS_MAX: u64 = 16;
/// Pushes a node receives at once, from all its peers (each holds a segment's buffer); one
/// beyond is refused.
pub const RECEIVING_MAX: usize = 8;
/// Stream error code of a receiver that does not want (more of) a preseed.
pub const REFUSED: u32 = 1;

/// What a push stream starts with; `count` whole segments from `first` follow.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The sender's id of the file (stable while it is open, across renames).
    pub id: u64,
    pub path: RelPath,
    pub first: u64,
    pub count: u64,
}

/// One push to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub to: NodeId,
    pub header: Header,
}

/// A file being written, as the mount reports it.
#[derive(Debug, Clone)]
pub struct Writing {
    pub id: u64,
    pub path: RelPath,
    pub size: u64,
    /// Its size when it was opened: the segments below are not new.
    pub size_at_open: u64,
}

#[derive(Default)]
struct ToPeer {
    /// Segments below this were pushed.
    sent: u64,
    busy: bool,
    /// The peer stopped a push of this file: nothing more of it goes there.
    refused: bool,
}

/// Which segments of the files being written go to which peer.
#[derive(Default)]
pub struct Plan {
    files: HashMap<u64, HashMap<NodeId, ToPeer>>,
}

impl Plan {
    /// The pushes to start now, given the files being written and the peers connected.
    pub fn tick(&mut self, writing: &[Writing], peers: &[NodeId]) -> Vec<Push> {
        let writing: Vec<&Writing> = writing.iter().take(WRITING_MAX).collect();
        // A file closed (or shrunk below the size) is forgotten, and so are gone peers.
        self.files
            .retain(|id, _| writing.iter().any(|w| w.id == *id && w.size >= PRESEED_MIN));
        let mut pushes = Vec::new();
        for w in writing {
            if w.size < PRESEED_MIN {
                continue;
            }
            let whole = (w.size / SEGMENT).min(crate::tree::preseed::SEGMENTS_MAX);
            let to = self.files.entry(w.id).or_default();
            to.retain(|peer, _| peers.contains(peer));
            let new_from = w.size_at_open / SEGMENT;
            for peer in peers {
                let p = to.entry(*peer).or_insert_with(|| ToPeer {
                    sent: new_from,
                    ..ToPeer::default()
                });
                // Shrunk: what is beyond its size now will be written again.
                p.sent = p.sent.min(whole);
                if p.busy || p.refused || p.sent >= whole {
                    continue;
                }
                let count = (whole - p.sent).min(PUSH_SEGMENTS_MAX);
                pushes.push(Push {
                    to: *peer,
                    header: Header {
                        id: w.id,
                        path: w.path.clone(),
                        first: p.sent,
                        count,
                    },
                });
                p.sent += count;
                p.busy = true;
            }
        }
        pushes
    }

    /// A push ended: whole (`refused` false) or stopped by its receiver or a lost link.
    pub fn ended(&mut self, push: &Push, refused: bool) {
        if let Some(p) = self
            .files
            .get_mut(&push.header.id)
            .and_then(|to| to.get_mut(&push.to))
        {
            p.busy = false;
            p.refused |= refused;
        }
    }
}

/// Why a push ended early.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("the receiver does not want it")]
    Refused,
    #[error("{0}")]
    Lost(String),
}

/// Sends the segments `header` names of the file at its path on `stream`.
pub async fn push(
    tree: &Tree,
    header: &Header,
    stream: &mut quinn::SendStream,
) -> Result<u64, PushError> {
    let lost = |e: &dyn std::fmt::Display| PushError::Lost(e.to_string());
    let file = tokio::task::block_in_place(|| tree.open_regular(&header.path))
        .ok_or_else(|| PushError::Lost(format!("{} is gone", header.path)))?;
    write_frame(stream, &postcard::to_stdvec(header).expect("encoding"))
        .await
        .map_err(|e| lost(&e))?;
    let mut sent = 0;
    for i in header.first..header.first + header.count {
        // The file shrank (its writer truncated it): the rest is not whole any more.
        let data = tokio::task::block_in_place(|| {
            super::content::read_segment(&file, (i + 1) * SEGMENT, i)
        })
        .map_err(|e| lost(&e))?;
        match stream.write_chunk(data.into()).await {
            Ok(()) => sent += SEGMENT,
            Err(quinn::WriteError::Stopped(_)) => return Err(PushError::Refused),
            Err(e) => return Err(lost(&e)),
        }
    }
    stream.finish().map_err(|e| lost(&e))?;
    Ok(sent)
}

/// Receives one push from `from` into its preseed; returns the bytes kept. A push this node
/// does not want (`accept` false: it applies nothing, say), or that it cannot keep, is
/// stopped with [`REFUSED`].
pub async fn receive(
    tree: &Tree,
    from: NodeId,
    accept: bool,
    stream: &mut quinn::RecvStream,
    kept: &std::sync::atomic::AtomicU64,
) -> Result<(), FrameError> {
    let Some(frame) = read_frame(stream, super::SMALL_FRAME_MAX).await? else {
        return Ok(());
    };
    let header: Header = postcard::from_bytes(&frame)
        .map_err(|e| FrameError::Bad(format!("preseed header: {e}")))?;
    if header.count > PUSH_SEGMENTS_MAX
        || header.first.saturating_add(header.count) > crate::tree::preseed::SEGMENTS_MAX
    {
        return Err(FrameError::Bad("preseed push too large".into()));
    }
    let refuse = |stream: &mut quinn::RecvStream, why: &dyn std::fmt::Display| {
        tracing::debug!("preseed of {} from {}: {why}", header.path, from.short());
        let _ = stream.stop(quinn::VarInt::from_u32(REFUSED));
    };
    if !accept {
        refuse(stream, &"not wanted here");
        return Ok(());
    }
    let seed = match tokio::task::block_in_place(|| tree.preseed(from, header.id, &header.path)) {
        Ok(s) => s,
        Err(e) => {
            refuse(stream, &e);
            return Ok(());
        }
    };
    let mut buf: Vec<u8> = Vec::with_capacity(SEGMENT as usize);
    let mut since_writeback = 0u64;
    for i in header.first..header.first + header.count {
        buf.clear();
        while (buf.len() as u64) < SEGMENT {
            let room = SEGMENT as usize - buf.len();
            match stream.read_chunk(room, true).await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                // The sender stopped early (its file shrank, the link went): what came stays.
                Ok(None) | Err(_) => return Ok(()),
            }
        }
        let written = tokio::task::block_in_place(|| {
            let cv = segments::cv(i, &buf);
            let mut seed = seed.lock();
            seed.write(i, &buf, cv)?;
            since_writeback += SEGMENT;
            if since_writeback >= WRITEBACK_EVERY {
                since_writeback = 0;
                start_writeback(seed.file());
            }
            Ok::<_, crate::tree::preseed::PreseedError>(())
        });
        if let Err(e) = written {
            refuse(stream, &e);
            return Ok(());
        }
        kept.fetch_add(SEGMENT, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

/// Pushes that end and are not yet back in the plan, at most (a few per file and peer).
const ENDED_QUEUED_MAX: usize = 64;

/// The node's pusher: every [`TICK`], the files the mount says are being written go to the
/// connected peers as [`Plan`] says (when `send`: a node that ships nothing pushes nothing);
/// also removes the preseeds here that were left unused. Ends when the mount is gone.
pub async fn run(
    net: std::sync::Arc<super::Net>,
    mount: std::sync::Weak<rsyncfs_logger::Mounted>,
    tree: std::sync::Arc<Tree>,
    send: bool,
) {
    let mut plan = Plan::default();
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::channel::<(Push, bool)>(ENDED_QUEUED_MAX);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some((push, refused)) = ended_rx.recv() => plan.ended(&push, refused),
        }
        while let Ok((push, refused)) = ended_rx.try_recv() {
            plan.ended(&push, refused);
        }
        tree.sweep_preseeds();
        if !send {
            continue;
        }
        let writing = {
            let Some(mount) = mount.upgrade() else {
                break;
            };
            tokio::task::block_in_place(|| mount.being_written(WRITING_MAX))
        };
        let writing: Vec<Writing> = writing
            .into_iter()
            .filter_map(|w| {
                Some(Writing {
                    id: w.id,
                    path: crate::tree::rel_path(&w.path)?,
                    size: w.size,
                    size_at_open: w.size_at_open,
                })
            })
            .collect();
        let peers = net.connected();
        for push in plan.tick(&writing, &peers) {
            let (net, ended) = (std::sync::Arc::clone(&net), ended_tx.clone());
            tokio::spawn(async move {
                let result = net.push_preseed(&push).await;
                if let Err(e) = &result {
                    tracing::debug!(
                        "preseed of {} to {}: {e}",
                        push.header.path,
                        push.to.short()
                    );
                }
                let refused = matches!(result, Err(PushError::Refused));
                let _ = ended.send((push, refused)).await;
            });
        }
    }
}

/// Bytes of a preseed written between two starts of its writeback.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// Starts writing the file's dirty pages to disk without waiting for them, so that the sync
/// of the fetch that takes the preseed over finds little left to write.
fn start_writeback(file: &std::fs::File) {
    // SAFETY: sync_file_range reads no memory of ours; the descriptor is open for the call.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(file),
            0,
            0,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: u64, size: u64) -> Writing {
        Writing {
            id,
            path: RelPath::new(format!("f{id}")).unwrap(),
            size,
            size_at_open: 0,
        }
    }

    #[test]
    fn only_what_a_writer_added_goes_a_file_opened_to_change_inside_sends_nothing() {
        let a = NodeId([1; 16]);
        let mut plan = Plan::default();
        // A 1 GiB file opened to change a few bytes inside: nothing.
        let inside = Writing {
            size_at_open: 256 * SEGMENT,
            ..w(3, 256 * SEGMENT)
        };
        assert!(plan.tick(std::slice::from_ref(&inside), &[a]).is_empty());
        // Appended to: from the segment its old end was in.
        let appended = Writing {
            size: 256 * SEGMENT + 3 * SEGMENT + 9,
            size_at_open: 256 * SEGMENT - 5,
            ..w(4, 0)
        };
        let pushes = plan.tick(&[appended], &[a]);
        assert_eq!((pushes[0].header.first, pushes[0].header.count), (255, 4));
    }

    #[test]
    fn whole_segments_go_once_to_each_peer_one_push_at_a_time() {
        let (a, b) = (NodeId([1; 16]), NodeId([2; 16]));
        let mut plan = Plan::default();
        // Too small: nothing.
        assert!(plan.tick(&[w(1, PRESEED_MIN - 1)], &[a]).is_empty());
        // Ten whole segments and a part: ten to each peer.
        let pushes = plan.tick(&[w(1, 10 * SEGMENT + 5)], &[a, b]);
        assert_eq!(pushes.len(), 2);
        assert!(pushes
            .iter()
            .all(|p| p.header.first == 0 && p.header.count == 10));
        // While a push to a peer runs, no other starts there.
        assert!(plan.tick(&[w(1, 40 * SEGMENT)], &[a, b]).is_empty());
        plan.ended(&pushes[0], false);
        let next = plan.tick(&[w(1, 40 * SEGMENT)], &[a, b]);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].to, pushes[0].to);
        assert_eq!(
            (next[0].header.first, next[0].header.count),
            (10, PUSH_SEGMENTS_MAX)
        );
        // A peer that refused gets no more of the file.
        plan.ended(&pushes[1], true);
        plan.ended(&next[0], false);
        let later = plan.tick(&[w(1, 40 * SEGMENT)], &[a, b]);
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].to, pushes[0].to);
        assert_eq!(later[0].header.first, 10 + PUSH_SEGMENTS_MAX);
    }

    #[test]
    fn a_file_that_shrinks_or_closes_starts_again_and_peers_that_go_are_forgotten() {
        let a = NodeId([1; 16]);
        let mut plan = Plan::default();
        let first = plan.tick(&[w(7, 12 * SEGMENT)], &[a]);
        plan.ended(&first[0], false);
        // Truncated and written again to 9 segments: from segment 9 on once it grows.
        assert!(plan.tick(&[w(7, 9 * SEGMENT)], &[a]).is_empty());
        let again = plan.tick(&[w(7, 11 * SEGMENT)], &[a]);
        assert_eq!((again[0].header.first, again[0].header.count), (9, 2));
        plan.ended(&again[0], false);
        // Closed (not reported), then opened again: from the start.
        assert!(plan.tick(&[], &[a]).is_empty());
        let reopened = plan.tick(&[w(7, 11 * SEGMENT)], &[a]);
        assert_eq!(reopened[0].header.first, 0);
        // No peer: nothing, and a busy push to a gone peer does not hold the file back.
        assert!(plan.tick(&[w(7, 30 * SEGMENT)], &[]).is_empty());
        let back = plan.tick(&[w(7, 30 * SEGMENT)], &[a]);
        assert_eq!(back[0].header.first, 0);
    }

    #[test]
    fn at_most_so_many_files_are_followed() {
        let a = NodeId([1; 16]);
        let mut plan = Plan::default();
        let writing: Vec<Writing> = (0..WRITING_MAX as u64 + 5)
            .map(|i| w(i, PRESEED_MIN))
            .collect();
        assert_eq!(plan.tick(&writing, &[a]).len(), WRITING_MAX);
    }
}
