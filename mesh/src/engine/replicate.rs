//! The replication protocol with each peer: the master side ships this node's log in batches,
//! the slave side takes the peer's batches in order and settles every record.
//!
//! Per connection and direction the sender keeps three positions in its own log: `acked` (the
//! receiver has applied everything up to here), `sent` (the end of the last batch sent) and
//! `scan` (how far it has looked; records the receiver has anyway are skipped without a
//! message, and the skipped range rides along with the next batch or an idle flush). A batch
//! covers `(after, upto]` with `after` equal to the previous batch's `upto`, so the receiver
//! sees a lost or reordered batch as a gap and asks for a resend with `Pull`; a lost tail is
//! resent when its acknowledgement does not come.

use super::{Engine, OpKind};
use crate::path::RelPath;
use crate::store::{Entry, Store};
use crate::wire::{self, Batch, Holds, Message, WireRecord, BATCH_BYTES_MAX};
use rsyncfs_conflict::{settle, Decision, NodeId};
use std::collections::{BTreeMap, VecDeque};

/// Ranges of skipped records scanned per push before yielding, so that a peer that already has
/// a huge log does not stall the engine in one call.
const SCANS_PER_PUSH_MAX: usize = 64;

/// How often a receiver that defers a peer's batches tells it so.
fn keepalive_ns(cfg: &super::Config) -> u64 {
    cfg.resend_after.as_nanos() as u64 / 4
}

/// Batches deferred per peer; more (resends) are dropped and come again.
fn deferred_max(cfg: &super::Config) -> usize {
    2 * cfg.window_batches
}

/// One connected peer.
#[derive(Debug)]
pub(super) struct Peer {
    // Master side (our log towards the peer).
    hello: bool,
    acked: u64,
    sent: u64,
    scan: u64,
    /// Unacknowledged batches: (upto, sent at).
    inflight: VecDeque<(u64, u64)>,
    /// When the last batch went out, for the idle flush of a skipped range.
    last_send_at: u64,
    /// Records up to this position go to the peer even if they came from it or it wrote them
    /// (it restarted and may have lost them).
    unskip_upto: u64,
    /// The wall clock when the link came up (ns), to tell live writes from caught-up ones.
    up_wall: u64,
    // Slave side (the peer's log towards us).
    /// The peer answered our Hello.
    welcomed: bool,
    hello_sent_at: u64,
    hello_fresh: bool,
    /// Our session with the peer, sent in our Hello.
    session: u64,
    /// The peer's session whose Hello we took.
    their_session: u64,
    /// The peer's log is applied up to here (in memory; the store has the safe value).
    recv: u64,
    /// Sequences of the peer's records that are folded into pending targets, with counts.
    holds: BTreeMap<u64, u32>,
    pull_sent_at: Option<u64>,
    /// Batches that arrived while too much work was pending here, in order, taken when the
    /// pending work shrinks. While any wait, the peer is told every so often that we are alive
    /// (an Ack of what we have), so that it does not resend them.
    deferred: VecDeque<Batch>,
    keepalive_sent_at: u64,
    /// Times the master side started again from an earlier position (a Pull or a resend).
    rewinds: u64,
    /// What the peer's tree held, as its last batch said.
    their_tree: Holds,
}

/// What status shows about one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub peer: NodeId,
    /// Our log positions the peer has acknowledged / we have sent / there are.
    pub acked: u64,
    pub sent: u64,
    /// The peer's log position we have applied.
    pub applied: u64,
    /// Paths whose records from this peer are not applied yet.
    pub held: usize,
    /// What the peer's tree held, as its last batch said (for progress: a first sync from it
    /// is done when this node holds as much).
    pub their_tree: Holds,
}

impl Peer {
    fn new(recv: u64, now: u64, session: u64) -> Peer {
        Peer {
            up_wall: 0,
            welcomed: false,
            hello_sent_at: now,
            hello_fresh: false,
            session,
            their_session: 0,
            hello: false,
            acked: 0,
            sent: 0,
            scan: 0,
            inflight: VecDeque::new(),
            last_send_at: 0,
            unskip_upto: 0,
            recv,
            holds: BTreeMap::new(),
            pull_sent_at: None,
            deferred: VecDeque::new(),
            keepalive_sent_at: 0,
            rewinds: 0,
            their_tree: Holds::default(),
        }
    }

    pub(super) fn up_wall(&self) -> u64 {
        self.up_wall
    }

    pub(super) fn is_idle(&self) -> bool {
        self.welcomed
            && self.inflight.is_empty()
            && self.sent == self.scan
            && self.holds.is_empty()
            && self.deferred.is_empty()
    }

    /// Our Hello to the peer, saying we have taken its session `taken`.
    fn hello(&self, taken: u64) -> Message {
        Message::Hello {
            progress: self.recv,
            fresh: self.hello_fresh,
            session: self.session,
            taken,
        }
    }

    /// Why [`Peer::is_idle`] is false, in words.
    pub(super) fn busy_reasons(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.welcomed {
            why.push("our Hello not answered".to_string());
        }
        if !self.inflight.is_empty() {
            why.push(format!(
                "{} batches unacknowledged (acked {}, sent {})",
                self.inflight.len(),
                self.acked,
                self.sent
            ));
        }
        if self.sent != self.scan {
            why.push(format!(
                "log scanned to {}, sent to {}",
                self.scan, self.sent
            ));
        }
        if !self.holds.is_empty() {
            why.push(format!("{} of its records not stored", self.holds.len()));
        }
        if !self.deferred.is_empty() {
            why.push(format!("{} of its batches deferred", self.deferred.len()));
        }
        why
    }

    /// The highest position of the peer's log that is safe to store as progress: everything up
    /// to it is stored here.
    fn safe(&self) -> u64 {
        match self.holds.keys().next() {
            Some(&first) => self.recv.min(first - 1),
            None => self.recv,
        }
    }

    pub(super) fn deadline(&self, cfg: &super::Config) -> Option<u64> {
        let resend = self
            .inflight
            .front()
            .map(|&(_, at)| at + cfg.resend_after.as_nanos() as u64);
        let flush = (self.hello && self.scan > self.sent && self.inflight.is_empty())
            .then(|| self.last_send_at + cfg.idle_flush_after.as_nanos() as u64);
        let pull = self
            .pull_sent_at
            .map(|at| at + cfg.resend_after.as_nanos() as u64);
        let hello =
            (!self.welcomed).then(|| self.hello_sent_at + cfg.resend_after.as_nanos() as u64);
        let keepalive =
            (!self.deferred.is_empty()).then(|| self.keepalive_sent_at + keepalive_ns(cfg));
        resend
            .into_iter()
            .chain(flush)
            .chain(pull)
            .chain(hello)
            .chain(keepalive)
            .min()
    }
}

impl<S: Store> Engine<S> {
    pub(super) fn on_peer_up(&mut self, peer: NodeId) {
        self.start_session(peer, None);
    }

    /// A new session with `peer`, and its Hello. `answering`: the peer's Hello (progress,
    /// fresh, session) that made us start over, taken before our Hello goes out, so that our
    /// Hello says we have its session and the peer does not start over again in turn.
    fn start_session(&mut self, peer: NodeId, answering: Option<(u64, bool, u64)>) {
        assert_ne!(peer, self.cfg.node, "a node does not connect to itself");
        let recv = self.store.progress(&peer);
        // Sessions come from the durable sequence, so that they grow across restarts whatever
        // the clocks do (a peer that missed the restart compares them).
        let session = self.next_seq();
        self.peers.insert(peer, Peer::new(recv, self.now, session));
        let fresh = self.greeted.insert(peer);
        let state = self.peers.get_mut(&peer).expect("inserted");
        state.hello_fresh = fresh;
        state.up_wall = self.wall;
        let mut taken = 0;
        if let Some((progress, fresh, their)) = answering {
            self.take_hello(peer, progress, fresh, their);
            taken = their;
        }
        let hello = self.peers[&peer].hello(taken);
        self.send(peer, hello);
    }

    pub(super) fn on_peer_down(&mut self, peer: NodeId) {
        let Some(state) = self.peers.remove(&peer) else {
            return;
        };
        // Progress falls back to what is stored; the peer sends the rest again next time, and
        // the records folded into pending targets are taken again then.
        self.store.set_progress(&peer, state.safe());
        for p in self.pending.values_mut() {
            p.holds.retain(|(n, _)| *n != peer);
            p.sources.retain(|n| *n != peer);
            p.tried.retain(|(n, _)| *n != peer);
        }
        // Fetches from the peer end here, whatever the driver reports of them later (a late
        // result is released).
        let lost: Vec<(super::OpId, RelPath)> = self
            .ops
            .iter()
            .filter(|(_, (_, kind))| matches!(kind, OpKind::Fetch { from, .. } if *from == peer))
            .map(|(op, (path, _))| (*op, path.clone()))
            .collect();
        for (op, path) in lost {
            self.ops.remove(&op);
            self.fetch_ended();
            if let Some(p) = self.pending.get_mut(&path) {
                p.op = None;
            }
            self.dirty.insert(path);
        }
    }

    /// Status of every connected peer.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|(peer, p)| PeerStatus {
                peer: *peer,
                acked: p.acked,
                sent: p.sent,
                applied: p.recv,
                held: p.holds.values().map(|&c| c as usize).sum(),
                their_tree: p.their_tree,
            })
            .collect()
    }

    /// Times the master side towards `peer` went back in its log on this connection; a record
    /// may reach a peer once per connection plus once per rewind, and never more.
    pub fn rewinds(&self, peer: &NodeId) -> u64 {
        self.peers.get(peer).map_or(0, |p| p.rewinds)
    }

    /// This node's session with `peer` (0 when not connected): the engine starts a new one at
    /// every link-up, and when the peer shows it started over without the link dropping here.
    pub fn session(&self, peer: &NodeId) -> u64 {
        self.peers.get(peer).map_or(0, |p| p.session)
    }

    /// Records of this node's log up to this position go to `peer` on this connection even if
    /// the peer wrote them or sent them (it restarted: see [`Message::Hello`]).
    pub fn unskip_upto(&self, peer: &NodeId) -> u64 {
        self.peers.get(peer).map_or(0, |p| p.unskip_upto)
    }

    /// The highest sequence this node has used.
    pub fn log_end(&self) -> u64 {
        self.next_seq - 1
    }

    pub(super) fn send(&mut self, to: NodeId, message: Message) {
        self.out.push_back(super::Output::Send { to, message });
    }

    pub(super) fn on_message(&mut self, from: NodeId, message: Message) {
        if !self.peers.contains_key(&from) {
            // A message racing a disconnect; the next connection starts over with Hello.
            return;
        }
        match message {
            Message::Hello {
                progress,
                fresh,
                session,
                taken,
            } => self.on_hello(from, progress, fresh, session, taken),
            Message::Welcome { session } => {
                let peer = self.peers.get_mut(&from).expect("checked above");
                if session == peer.session {
                    peer.welcomed = true;
                }
            }
            Message::Batch(batch) => self.on_batch(from, batch),
            Message::Ack { progress } => self.on_ack(from, progress),
            Message::Pull { after } => self.on_pull(from, after),
        }
    }

    fn on_hello(&mut self, from: NodeId, progress: u64, fresh: bool, session: u64, taken: u64) {
        let peer = self.peers.get(&from).expect("checked by caller");
        let (theirs, ours) = (peer.their_session, peer.session);
        if session < theirs {
            return; // from an earlier session, overtaken
        }
        if session > theirs {
            if peer.hello && taken == ours {
                // The peer started over after taking our current session (in answer to us, or
                // its new session took a Hello of ours still on the way): our session goes on,
                // and our log goes to it from what it says it has.
                self.send(from, Message::Welcome { session });
                let peer = self.peers.get_mut(&from).expect("checked by caller");
                peer.rewinds += 1;
                peer.inflight.clear();
                self.take_hello(from, progress, fresh, session);
                return;
            }
            if peer.hello {
                // The peer started over without us seeing the link drop: so do we, taking its
                // Hello first, so that ours tells it we have its new session.
                self.on_peer_down(from);
                self.start_session(from, Some((progress, fresh, session)));
                self.send(from, Message::Welcome { session });
                return;
            }
            // A new session of the peer may have begun after our Hello reached its previous
            // one: it gets our Hello again (a duplicate is harmless).
            let hello = peer.hello(session);
            self.send(from, hello);
        }
        self.send(from, Message::Welcome { session });
        if self.peers[&from].hello {
            return; // a duplicate, or sent again because our Welcome was lost
        }
        self.take_hello(from, progress, fresh, session);
    }

    /// Takes the peer's Hello of `session`: our log goes to it from `progress`.
    fn take_hello(&mut self, from: NodeId, progress: u64, fresh: bool, session: u64) {
        let peer = self.peers.get_mut(&from).expect("checked by caller");
        peer.their_session = session;
        // A peer cannot have applied more of our log than we have written; a peer that says so
        // restarts from zero rather than missing records.
        let progress = if progress > self.next_seq - 1 {
            0
        } else {
            progress
        };
        peer.hello = true;
        if fresh {
            peer.unskip_upto = self.next_seq - 1;
        }
        peer.acked = progress;
        peer.sent = progress;
        peer.scan = progress;
        peer.last_send_at = self.now;
    }

    fn on_ack(&mut self, from: NodeId, progress: u64) {
        let peer = self.peers.get_mut(&from).expect("checked by caller");
        if progress > peer.sent {
            return; // acknowledges something never sent: stale, from an earlier connection
        }
        peer.acked = peer.acked.max(progress);
        while peer
            .inflight
            .front()
            .is_some_and(|&(upto, _)| upto <= peer.acked)
        {
            peer.inflight.pop_front();
        }
        // The receiver is alive and takes batches in order: what is still in flight is waiting
        // there (it defers batches while busy), not lost; a lost one shows as a gap, which it
        // pulls, or as silence, which the resend timer covers.
        let now = self.now;
        for (_, at) in peer.inflight.iter_mut() {
            *at = now;
        }
    }

    fn on_pull(&mut self, from: NodeId, after: u64) {
        let peer = self.peers.get_mut(&from).expect("checked by caller");
        if after < peer.acked || after > peer.sent {
            return; // stale or impossible
        }
        peer.sent = after;
        peer.scan = after;
        peer.inflight.clear();
        peer.rewinds += 1;
        self.stats.resends += 1;
    }

    fn on_batch(&mut self, from: NodeId, batch: Batch) {
        let now = self.now;
        let busy = self.pending.len() >= self.cfg.pending_max;
        let deferred_max = deferred_max(&self.cfg);
        let peer = self.peers.get_mut(&from).expect("checked by caller");
        peer.their_tree = batch.holds;
        if busy || !peer.deferred.is_empty() {
            // Too much work waiting here: keep the batch (in order behind others) for when the
            // work shrinks, and tell the sender we are alive so that it does not resend.
            self.stats.batches_deferred += 1;
            if peer.deferred.len() < deferred_max {
                peer.deferred.push_back(batch);
            }
            if peer.keepalive_sent_at + keepalive_ns(&self.cfg) <= now {
                peer.keepalive_sent_at = now;
                let progress = peer.recv;
                self.send(from, Message::Ack { progress });
            }
            return;
        }
        self.take_batch(from, batch);
    }

    /// Takes deferred batches while the pending work is below its limit.
    pub(super) fn take_deferred(&mut self) {
        let waiting: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.deferred.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            while self.pending.len() < self.cfg.pending_max {
                let Some(batch) = self.peers.get_mut(&id).and_then(|p| p.deferred.pop_front())
                else {
                    break;
                };
                self.take_batch(id, batch);
            }
        }
    }

    fn take_batch(&mut self, from: NodeId, batch: Batch) {
        let now = self.now;
        let resend_ns = self.cfg.resend_after.as_nanos() as u64;
        let peer = self.peers.get_mut(&from).expect("checked by caller");
        if batch.upto <= peer.recv {
            let progress = peer.recv;
            self.send(from, Message::Ack { progress });
            return;
        }
        if batch.after > peer.recv {
            // A batch went missing or arrives out of order: ask for everything after what we
            // have, once per resend interval.
            if peer.pull_sent_at.is_none_or(|at| at + resend_ns <= now) {
                peer.pull_sent_at = Some(now);
                let after = peer.recv;
                self.send(from, Message::Pull { after });
            }
            return;
        }
        peer.pull_sent_at = None;
        let already = peer.recv;
        for record in batch.records {
            if record.seq > already {
                self.take_record(from, record);
            }
        }
        let peer = self.peers.get_mut(&from).expect("still connected");
        peer.recv = batch.upto;
        let safe = peer.safe();
        self.store.set_progress(&from, safe);
        self.send(
            from,
            Message::Ack {
                progress: batch.upto,
            },
        );
    }

    /// The slave replicator's decision for one received record.
    fn take_record(&mut self, from: NodeId, wire: WireRecord) {
        self.stats.records_received += 1;
        let WireRecord {
            seq,
            path,
            record,
            data,
        } = wire;
        if let Some(max) = record.siblings.iter().map(|s| s.hlc).max() {
            if self.hlc.update(&max, self.wall_ntp()).is_err() {
                self.stats.clock_skew_refusals += 1;
            }
        }
        if self.cfg.mode == super::Mode::SendOnly {
            return;
        }
        // An ignored path is not applied here, nor kept, nor passed on.
        if self.ignore.is_ignored(&path, record.winner().meta.is_dir()) {
            self.stats.ignored_remote += 1;
            return;
        }
        let rules = (path.as_str() == crate::ignore::FILE)
            .then(|| data.clone())
            .flatten();
        if let (Some(data), Some((hash, _))) = (data, record.winner().meta.file_hash()) {
            self.cache_put(hash, data);
        }
        let stored = self.store.get(&path).and_then(|e| e.record);
        let pending_target = self.pending.get(&path).and_then(|p| p.target.clone());
        let base = pending_target.as_ref().or(stored.as_ref());
        let decision = settle(path.as_str(), base, &record);
        let target = match decision {
            Decision::AlreadyHave | Decision::KeepLocal => None,
            Decision::TakeRemote => Some(record.clone()),
            Decision::Merge(merged) => Some(merged),
            Decision::Conflict { merged, .. } => {
                self.stats.conflicts += 1;
                self.note_conflict(&path);
                Some(merged)
            }
        };
        // New ignore rules that will land here hold from this record on, in the sender's
        // order: the records after it in this batch were shipped under them (the driver reads
        // the file again once it is in place, and looks at the tree again).
        if let (Some(text), Some(t)) = (&rules, &target) {
            if t.winner().meta.file_hash() == record.winner().meta.file_hash() {
                self.set_ignore(&String::from_utf8_lossy(text));
            }
        }
        // Until the stored record covers this one, the peer's progress must not pass it.
        let covered = stored
            .as_ref()
            .is_some_and(|s| rsyncfs_conflict::join(s, &record) == *s);
        if covered && target.is_none() {
            return;
        }
        let before = self.own(&path);
        let p = self.pending.entry(path.clone()).or_default();
        if let Some(target) = target {
            p.from = (target == record).then_some(from);
            p.target = Some(target);
        }
        self.retally(&path, before);
        let p = self.pending.get_mut(&path).expect("made above");
        if !p.sources.contains(&from) {
            p.sources.push(from);
        }
        // A new announcement: what that peer did not have before, it may have now.
        p.tried.retain(|(n, _)| *n != from);
        p.announcements += 1;
        if !covered {
            p.holds.push((from, seq));
            *self
                .peers
                .get_mut(&from)
                .expect("connected")
                .holds
                .entry(seq)
                .or_insert(0) += 1;
        }
        if !covered {
            // A peer's record: the target is no longer only this node's wish for a copy.
            self.unwish(&path);
        }
        self.dirty.insert(path);
    }

    /// Releases the holds of a path that is now stored (or given up) and stores the peers'
    /// progress that this frees.
    pub(super) fn release_holds(&mut self, holds: Vec<(NodeId, u64)>) {
        let mut touched = Vec::new();
        for (peer, seq) in holds {
            if let Some(state) = self.peers.get_mut(&peer) {
                if let Some(count) = state.holds.get_mut(&seq) {
                    *count -= 1;
                    if *count == 0 {
                        state.holds.remove(&seq);
                    }
                }
                touched.push(peer);
            }
        }
        touched.sort();
        touched.dedup();
        for peer in touched {
            let safe = self.peers[&peer].safe();
            self.store.set_progress(&peer, safe);
        }
    }

    pub(super) fn peers_mark_new_records(&mut self) {
        // Nothing to do: pushes look at the log at every flush.
    }

    /// Whether `entry` goes to `peer`: never back to the peer it came from, nor to the node
    /// that wrote it.
    fn should_send(&self, peer: NodeId, entry: &Entry) -> bool {
        #[cfg(feature = "planted-bugs")]
        if self.cfg.planted_bug == Some(super::PlantedBug::Echo) {
            return true;
        }
        // After a restart the peer may have lost records it wrote or sent us before it crashed
        // (group commit keeps only a prefix): this once, send it those too.
        if entry.seq <= self.peers[&peer].unskip_upto {
            return true;
        }
        let record = entry.record.as_ref().expect("log entries have records");
        entry.from != Some(peer) && record.author != Some(peer)
    }

    /// The master replicator: fills every peer's window with batches from the log.
    pub(super) fn peers_push(&mut self) {
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.push_to(peer, false);
        }
    }

    fn push_to(&mut self, to: NodeId, idle_flush: bool) {
        let inline_max = self.cfg.inline_bytes_max;
        let mut scans = 0;
        loop {
            let state = &self.peers[&to];
            if !state.hello || state.inflight.len() >= self.cfg.window_batches {
                return;
            }
            let (after, mut upto) = (state.sent, state.scan);
            let mut records = Vec::new();
            // Encoded bytes of the batch so far, inline contents included (the driver attaches
            // them): a batch is cut by what it will weigh on the wire, so that it always fits a
            // frame whatever its records carry (large extended attributes, long paths).
            let mut batch_bytes = 0usize;
            let mut exhausted = false;
            let mut full = false;
            while !full && records.len() < self.cfg.batch_records_max && scans < SCANS_PER_PUSH_MAX
            {
                scans += 1;
                let room = self.cfg.batch_records_max - records.len();
                let entries = self.store.after(upto, room);
                if entries.is_empty() {
                    exhausted = true;
                    break;
                }
                for (path, entry) in entries {
                    if !self.should_send(to, &entry) {
                        upto = entry.seq;
                        continue;
                    }
                    let seq = entry.seq;
                    let record = entry.record.expect("log entries have records");
                    let inline = record
                        .winner()
                        .meta
                        .file_hash()
                        .map(|(_, size)| size)
                        .filter(|size| *size <= inline_max);
                    let wire_record = WireRecord {
                        seq,
                        path,
                        record,
                        data: None,
                    };
                    let bytes = wire::record_bytes(&wire_record, inline);
                    if !records.is_empty() && batch_bytes + bytes > BATCH_BYTES_MAX {
                        // The next batch starts with this record.
                        full = true;
                        break;
                    }
                    upto = seq;
                    batch_bytes += bytes;
                    records.push(wire_record);
                }
            }
            let state = self.peers.get_mut(&to).expect("connected");
            state.scan = upto;
            let flush_skipped = idle_flush && upto > after && state.inflight.is_empty();
            if records.is_empty() && !flush_skipped {
                return;
            }
            if upto == after {
                return;
            }
            state.sent = upto;
            state.inflight.push_back((upto, self.now));
            state.last_send_at = self.now;
            self.stats.batches_sent += 1;
            self.stats.records_sent += records.len() as u64;
            self.send(
                to,
                Message::Batch(Batch {
                    after,
                    upto,
                    records,
                    holds: Holds {
                        files: self.counts.files,
                        bytes: self.counts.bytes,
                    },
                }),
            );
            if exhausted || scans >= SCANS_PER_PUSH_MAX {
                return;
            }
        }
    }

    pub(super) fn peers_on_timeout(&mut self) {
        let now = self.now;
        let resend_ns = self.cfg.resend_after.as_nanos() as u64;
        let flush_ns = self.cfg.idle_flush_after.as_nanos() as u64;
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for id in peers {
            let state = self.peers.get_mut(&id).expect("listed");
            if state
                .inflight
                .front()
                .is_some_and(|&(_, at)| at + resend_ns <= now)
            {
                // The batch or its acknowledgement was lost: start again from what is acked.
                state.sent = state.acked;
                state.scan = state.acked;
                state.inflight.clear();
                state.rewinds += 1;
                self.stats.resends += 1;
            }
            if state.pull_sent_at.is_some_and(|at| at + resend_ns <= now) {
                state.pull_sent_at = None;
            }
            if !state.deferred.is_empty()
                && state.keepalive_sent_at + keepalive_ns(&self.cfg) <= now
            {
                state.keepalive_sent_at = now;
                let progress = state.recv;
                self.send(id, Message::Ack { progress });
            }
            let state = self.peers.get_mut(&id).expect("listed");
            if !state.welcomed && state.hello_sent_at + resend_ns <= now {
                state.hello_sent_at = now;
                let hello = state.hello(state.their_session);
                self.send(id, hello);
            }
            let state = self.peers.get_mut(&id).expect("listed");
            let flush = state.hello
                && state.scan > state.sent
                && state.inflight.is_empty()
                && state.last_send_at + flush_ns <= now;
            self.push_to(id, flush);
        }
    }
}
