//! The replication engine of one node, sans I/O.
//!
//! In the style of `quinn-proto`: the driver feeds [`Input`]s in with the current time
//! ([`Engine::handle`], [`Engine::handle_timeout`]) and carries [`Output`]s out
//! ([`Engine::poll_output`], [`Engine::poll_timeout`]). Time comes as a [`Now`]: a monotonic
//! clock for every timer and the wall clock for hybrid logical clock stamps only, so that a
//! wall clock stepped back or forward never stalls a resend or a retry. The engine never
//! touches a socket, a file or a clock; the only state it shares with the world is its
//! [`Store`], which it calls directly. The same engine runs in the daemon and, thousands of
//! times per second, in the simulator, and it makes every decision: what each message means in
//! each mode, when to fetch from whom, when to retry what, when to commit. A driver only does
//! I/O.
//!
//! The driver contract (docs/ARCHITECTURE.md has the table):
//! - **order**: `LocalChange` of a path in the order the filesystem changed, in order with the
//!   `ApplyDone` of applies to that path; applies of a path, and of the directories above it,
//!   carried out in the order they were asked for;
//! - **observe**: every [`Output::Observe`] answered with a `LocalChange` of what is there then,
//!   or with `ObserveFailed` when it cannot be read (asked again after a backoff);
//! - **apply**: `expect` checked (else [`ApplyError::Stale`]), a local writer refused
//!   ([`ApplyError::Busy`]), every local failure reported as [`ApplyError::Io`] with its
//!   [`IoKind`]; the engine retries them all, none is given up;
//! - **staged content**: what a `FetchDone(Ok(id))` staged belongs to the driver, which keeps it
//!   until an apply naming `Staged(id)` succeeds (consumed) or [`Output::Release`] names it; a
//!   refused apply leaves it; a staged content that is gone is [`ApplyError::StagedGone`];
//! - **links**: `PeerUp`/`PeerDown` in order; every decoded message passed on, in every mode;
//! - **commit**: on [`Output::Commit`], what the store's records rely on made durable first,
//!   then the store committed; a crash keeps a prefix of the store's writes.
//!
//! It holds both replicators of the design:
//! - the master replicator ([`replicate`](self)) ships the store's log to every connected peer in
//!   batches, skipping records the peer has anyway (it sent them, or it wrote them), with a window
//!   of unacknowledged batches and a resend on timeout;
//! - the slave replicator settles every received record against the local one with
//!   [`rsyncfs_conflict::settle`], and then ([`reconcile`](self)) makes the filesystem show the
//!   result: it keeps losing contents as conflict copies first, finds the winner's content (inline,
//!   already on disk under another name, or fetched from a peer) and asks the driver to apply it.
//!
//! Invariants kept here:
//! - A record is stored only once the filesystem shows it, and only after every content it no
//!   longer shows is kept by a conflict copy on this node. So a local write made on top of a
//!   stored record never silently replaces a content the user could not see.
//! - The progress stored for a peer never passes a record of that peer that is not yet stored
//!   ("holds"), so a crash at any point loses nothing a peer will not send again.
//! - Sequence numbers are reserved durably in blocks before use and never reused, so neither a
//!   dot nor a log position can name two different things, even across crashes.

mod reconcile;
mod replicate;
mod tally;

use crate::path::RelPath;
use crate::store::{Entry, Store};
use crate::wire::{Message, INLINE_BYTES_MAX};
use bytes::Bytes;
use rsyncfs_conflict::{Dot, Hash, Hlc, Meta, NodeId, Record, NTP64};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

pub use replicate::PeerStatus;

/// What time it is, as the driver's two clocks say. Timers (resends, retries, flushes, commits)
/// run on `mono_ns`, which never goes back (nanoseconds since any fixed point, such as the
/// process start); `wall_ns` (nanoseconds since the UNIX epoch) only stamps writes and moves the
/// hybrid logical clock, and may jump either way.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Now {
    pub mono_ns: u64,
    pub wall_ns: u64,
}

impl Now {
    pub fn new(mono_ns: u64, wall_ns: u64) -> Now {
        Now { mono_ns, wall_ns }
    }
}

/// Identifies one fetch or apply the engine asked for.
pub type OpId = u64;
/// Identifies content the driver fetched and holds, checked, until an apply uses it.
pub type StagedId = u64;

/// Races settled with a conflict copy that the engine remembers for status.
pub const RECENT_CONFLICTS_KEPT: usize = 20;

/// Upper bounds of the replication-latency histogram's buckets, in milliseconds; one more
/// bucket holds what is above them all.
pub const LATENCY_BOUNDS_MS: [f64; 13] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0,
];

/// Replication latencies counted into fixed buckets (for metrics: a histogram needs every
/// write since the start, where the recent ones kept for percentiles are a window).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencyHistogram {
    /// Writes per bucket: at most `LATENCY_BOUNDS_MS[i]` (and above the one before), the last
    /// above every bound.
    pub counts: [u64; LATENCY_BOUNDS_MS.len() + 1],
    pub sum_ms: f64,
    pub count: u64,
}

impl LatencyHistogram {
    pub fn observe(&mut self, ms: f64) {
        let i = LATENCY_BOUNDS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.counts[i] += 1;
        self.sum_ms += ms;
        self.count += 1;
    }
}

/// Which directions a node replicates in.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    TwoWay,
    /// Ships local changes; peers' changes are not applied here.
    SendOnly,
    /// Applies peers' changes; local changes are not shipped (the mount refuses them).
    ReceiveOnly,
}

/// Rules a planted bug makes the engine break, to prove that the simulator's checker notices.
#[cfg(feature = "planted-bugs")]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PlantedBug {
    /// Never make conflict copies: the losing content of a conflict is dropped.
    LoseConflictCopy,
    /// Send records back to their author and to the peer they came from.
    Echo,
    /// Let staged content go when an apply is refused (Busy or Stale), though the path still
    /// counts on it.
    ForgetStaged,
    /// Never retry an apply that failed with an I/O error.
    GiveUpOnError,
}

/// The engine's limits and timings. Every queue and batch it keeps is bounded by one of these.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: NodeId,
    pub mode: Mode,
    /// Files up to this size travel inside their announcement.
    pub inline_bytes_max: u64,
    /// Records per batch (at most [`crate::wire::BATCH_RECORDS_MAX`]).
    pub batch_records_max: usize,
    /// Unacknowledged batches per peer.
    pub window_batches: usize,
    /// A batch not acknowledged after this long is sent again.
    pub resend_after: Duration,
    /// A range of skipped records is announced (so the peer's progress moves) after this long.
    pub idle_flush_after: Duration,
    /// Content fetches in flight at once.
    pub fetches_max: usize,
    /// Paths with pending work beyond which no new batch is taken: batches wait (a few per peer)
    /// until the work shrinks, and the sender is told to wait.
    pub pending_max: usize,
    /// Bytes of inline content kept while the paths that need it wait.
    pub cache_bytes_max: usize,
    /// First delay before an apply that failed is tried again; it doubles up to 64 times this.
    pub retry_after: Duration,
    /// How far ahead of local time a peer's clock may be before its timestamps stop moving ours.
    pub hlc_max_delta: Duration,
    /// Sequences reserved per durable reservation. Each reservation is a commit of its own
    /// (two `fdatasync`s in the daemon's store): at 1,024 a first sync of 100,000 files made
    /// about a hundred of them, as many as its group commits. A crash leaves the rest of the
    /// block unused, a gap in the log that costs nothing.
    pub seq_block: u64,
    /// Siblings a stored record may have (at most [`rsyncfs_conflict::limits::SIBLINGS_MAX`]);
    /// a record with more concurrent writes is folded ([`rsyncfs_conflict::fold`]) once its
    /// losing contents are kept as conflict copies.
    pub siblings_max: usize,
    /// A group commit is asked for ([`Output::Commit`]) this long after the first write it
    /// holds, or at once when this many writes wait.
    pub commit_after: Duration,
    pub commit_writes_max: usize,
    /// Group commits are at least this far apart (unless `commit_writes_max` writes wait):
    /// under a stream of writes (a first sync) each commit's syncs then serve many writes, and
    /// a write after a quiet spell is still committed `commit_after` later.
    pub commit_gap_min: Duration,
    /// Paths reconciled per call before the engine yields to the driver (and asks to be called
    /// again at once with [`Engine::poll_timeout`]), so that a signal or a status request never
    /// waits behind a large tree.
    pub reconciles_per_call_max: usize,
    #[cfg(feature = "planted-bugs")]
    pub planted_bug: Option<PlantedBug>,
}

impl Config {
    pub fn new(node: NodeId) -> Config {
        Config {
            node,
            mode: Mode::TwoWay,
            inline_bytes_max: INLINE_BYTES_MAX as u64,
            batch_records_max: crate::wire::BATCH_RECORDS_MAX,
            window_batches: 8,
            resend_after: Duration::from_secs(2),
            idle_flush_after: Duration::from_millis(100),
            fetches_max: 16,
            pending_max: 10_000,
            cache_bytes_max: 64 * 1024 * 1024,
            retry_after: Duration::from_millis(50),
            hlc_max_delta: Hlc::MAX_DELTA_DEFAULT,
            seq_block: 65_536,
            siblings_max: rsyncfs_conflict::limits::SIBLINGS_MAX,
            commit_after: Duration::from_millis(20),
            commit_writes_max: 20_000,
            commit_gap_min: Duration::from_millis(100),
            reconciles_per_call_max: 2_000,
            #[cfg(feature = "planted-bugs")]
            planted_bug: None,
        }
    }
}

/// Something the driver tells the engine.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// The local filesystem now holds `observed` at `path` (`None`: nothing). Sent by the change
    /// logger after a change, by a rescan, and in answer to [`Output::Observe`]. Events for one
    /// path must arrive in the order the filesystem changed, and in order with
    /// [`Input::ApplyDone`] of applies to that path.
    LocalChange {
        path: RelPath,
        observed: Option<Meta>,
    },
    /// What `path` holds could not be read (it kept changing while it was hashed, or the read
    /// failed): the engine asks again after a backoff.
    ObserveFailed {
        path: RelPath,
    },
    /// The last local writer of `path` closed it.
    WriterClosed {
        path: RelPath,
    },
    /// A connection to `peer` is up (and authenticated).
    PeerUp {
        peer: NodeId,
    },
    PeerDown {
        peer: NodeId,
    },
    /// A message from a connected peer, already decoded and checked by [`crate::wire::decode`].
    Received {
        from: NodeId,
        message: Message,
    },
    FetchDone {
        op: OpId,
        result: Result<StagedId, FetchError>,
    },
    ApplyDone {
        op: OpId,
        result: Result<(), ApplyError>,
    },
}

/// What kind of local failure an I/O error was: what status says, and how loudly.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IoKind {
    /// The backing filesystem is full (ENOSPC, EDQUOT).
    NoSpace,
    /// Permission denied (EACCES, EPERM).
    Permission,
    /// The backing filesystem is read-only (EROFS).
    ReadOnly,
    /// The device failed (EIO).
    Device,
    Other,
}

impl IoKind {
    pub fn name(self) -> &'static str {
        match self {
            IoKind::NoSpace => "no space left on the backing filesystem",
            IoKind::Permission => "permission denied",
            IoKind::ReadOnly => "the backing filesystem is read-only",
            IoKind::Device => "I/O error",
            IoKind::Other => "I/O failure",
        }
    }
}

/// A local I/O failure: its kind and what the driver knows of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoFailure {
    pub kind: IoKind,
    pub detail: String,
}

impl IoFailure {
    pub fn new(kind: IoKind, detail: impl Into<String>) -> IoFailure {
        IoFailure {
            kind,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for IoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.kind.name(), self.detail)
    }
}

/// Why a fetch failed, which decides what the engine does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchError {
    /// The peer holds no file with that content any more: that peer is not asked for it again
    /// until it announces the path anew.
    NotFound,
    /// The peer sent content that does not check out (a lying or broken peer): not asked again
    /// until it announces the path anew.
    Corrupt(String),
    /// The connection to the peer failed: asked again when it is back.
    Unreachable,
    /// Staging the content failed here (a full disk, say): the same peer is asked again after
    /// a backoff.
    Io(IoFailure),
}

/// Why an apply failed. Every one of them is retried: none gives up on a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyError {
    /// A local process has the path open for writing; the update waits (the open-writer guard)
    /// until the writer closes, with a slow retry in case the close is never reported.
    Busy,
    /// The path (or one above it) does not hold what the apply expected: a local change the
    /// engine has not seen yet. The engine observes it and tries again.
    Stale,
    /// The filesystem failed (a full disk, say). The engine tries again with a backoff and
    /// status shows the failure until an apply succeeds.
    Io(IoFailure),
    /// The staged content the apply names is not there (a driver lost it, or someone removed
    /// it from the state folder): the engine fetches it again.
    StagedGone,
}

/// Something the engine asks the driver to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Send a message to a connected peer. Records of batches carry no inline content; the
    /// driver attaches the content of every record whose winner is a file of at most
    /// [`Config::inline_bytes_max`] bytes, read from `path` if it still has that hash.
    Send {
        to: NodeId,
        message: Message,
    },
    Fetch(Fetch),
    Apply(Apply),
    /// Report what `path` holds now with an [`Input::LocalChange`], even if nothing changed.
    Observe {
        path: RelPath,
    },
    /// Fetched content the engine no longer needs.
    Release {
        staged: StagedId,
    },
    /// Make the store's writes durable now (after whatever the driver must make durable first,
    /// such as the directories its applies changed).
    Commit,
}

/// Get the content with `hash` from `from`, checked against the hash, and report
/// [`Input::FetchDone`]. `basis` is a local file at `path` that may share blocks with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Fetch {
    pub op: OpId,
    pub from: NodeId,
    pub path: RelPath,
    pub hash: Hash,
    pub size: u64,
    pub basis: Option<RelPath>,
}

/// Make `path` hold what `action` says, if it holds `expect` now (otherwise fail with
/// [`ApplyError::Stale`]; if a local writer has it open, with [`ApplyError::Busy`]). Missing
/// directories above it are made with mode [`rsyncfs_conflict::DIR_MODE_DEFAULT`]. The change goes
/// to the backing filesystem, not through the change logger, and is not reported back.
#[derive(Clone, Debug, PartialEq)]
pub struct Apply {
    pub op: OpId,
    pub path: RelPath,
    pub expect: Option<Meta>,
    pub action: Action,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Replace what is there with a file of this meta, atomically; a directory there is empty.
    Write { meta: Meta, source: Source },
    /// The content is already right: set mode and mtime only.
    SetAttr { meta: Meta },
    /// Make a directory (or set its attributes if one is there), replacing a file or symlink.
    Mkdir { meta: Meta },
    /// Replace what is there with a symlink (owned by `owner`, where known and the driver may).
    Symlink {
        target: String,
        owner: Option<(u32, u32)>,
    },
    /// Remove the file, symlink or empty directory.
    Remove,
}

/// Where the content of a write comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Inline(Bytes),
    Staged(StagedId),
    /// Copy it from another local file, which must still have the content's hash.
    Local(RelPath),
}

/// Counters for status and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub local_writes: u64,
    pub records_sent: u64,
    pub records_received: u64,
    pub batches_sent: u64,
    pub resends: u64,
    pub conflicts: u64,
    pub applies: u64,
    pub fetches: u64,
    pub clock_skew_refusals: u64,
    /// Batches kept for later because too much work was pending.
    pub batches_deferred: u64,
    /// Records folded because they had more siblings than allowed.
    pub folds: u64,
    /// Peers' writes applied here that were made before the link they came over was up
    /// (caught up after a join, a restart or a partition): not counted as latencies.
    pub caught_up: u64,
    /// Local changes and peers' records left alone because their paths are ignored
    /// (`.rsyncfsignore` and the defaults).
    pub ignored_local: u64,
    pub ignored_remote: u64,
}

/// What the tree holds, by the stored records: kept with every change, for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeCounts {
    /// Live regular files and their bytes.
    pub files: u64,
    pub bytes: u64,
    /// Live entries of other kinds (directories, symlinks, ...).
    pub others: u64,
    /// Live conflict copies (what `conflicts` lists).
    pub conflict_copies: u64,
}

impl TreeCounts {
    fn add(&mut self, path: &RelPath, record: Option<&Record>, sign: i64) {
        let Some(r) = record.filter(|r| r.is_live()) else {
            return;
        };
        let step = |v: &mut u64, by: u64| {
            *v = if sign > 0 {
                v.saturating_add(by)
            } else {
                v.saturating_sub(by)
            }
        };
        match r.winner().meta.file_hash() {
            Some((_, size)) => {
                step(&mut self.files, 1);
                step(&mut self.bytes, size);
            }
            None => step(&mut self.others, 1),
        }
        if rsyncfs_conflict::is_conflict_copy(path.name()) {
            step(&mut self.conflict_copies, 1);
        }
    }

    fn of<S: Store>(store: &S) -> TreeCounts {
        let mut counts = TreeCounts::default();
        store.for_each(&mut |path, entry| counts.add(path, entry.record.as_ref(), 1));
        counts
    }
}

/// Work pending here, split by whether it can go on now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingWork {
    /// Paths with work this node can do now, and the content bytes they still wait for.
    pub paths: usize,
    pub bytes: u64,
    /// Paths whose content only peers that are down have, and its bytes.
    pub waiting_paths: usize,
    pub waiting_bytes: u64,
}

/// Work in progress on one path.
#[derive(Clone, Debug, Default)]
struct Pending {
    /// The record the path is to hold, when it differs from the stored one.
    target: Option<Record>,
    /// The peer whose record `target` is, exactly.
    from: Option<NodeId>,
    /// Peers that announced records with the target's contents.
    sources: Vec<NodeId>,
    /// (source, content) pairs that failed: that peer no longer has that content.
    tried: BTreeSet<(NodeId, Hash)>,
    /// Counts announcements of this path; a fetch that fails after a newer announcement
    /// does not count against its source, which may have the content by now.
    announcements: u64,
    /// Peer records folded into `target` but not yet stored: (peer, sequence).
    holds: Vec<(NodeId, u64)>,
    op: Option<OpId>,
    staged: Option<(Hash, StagedId)>,
    /// An apply met a local writer; waiting for it to close.
    busy: bool,
    retry_at: Option<u64>,
    retries: u32,
    /// The last local I/O failure of this path's work, until the work is done (for status).
    failing: Option<IoFailure>,
    /// This target only exists to keep a losing content of that path as a conflict copy.
    wish_of: Option<RelPath>,
}

// One per operation in flight (a bounded few): boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
enum OpKind {
    Fetch {
        from: NodeId,
        hash: Hash,
        /// `Pending::announcements` when the fetch started.
        announcements: u64,
    },
    Apply {
        expect: Option<Meta>,
        want: Option<Meta>,
        target: Option<Record>,
        /// A local file the content is copied from.
        source: Option<RelPath>,
        /// The content is a staged fetch, which the apply consumes.
        staged: bool,
    },
}

/// The replication engine of one node.
pub struct Engine<S: Store> {
    cfg: Config,
    store: S,
    hlc: Hlc,
    /// The monotonic time of the last input (for timers).
    now: u64,
    /// The wall time of the last input (for HLC stamps only).
    wall: u64,
    next_seq: u64,
    peers: BTreeMap<NodeId, replicate::Peer>,
    /// Peers sent a Hello since this engine started.
    greeted: BTreeSet<NodeId>,
    pending: BTreeMap<RelPath, Pending>,
    dirty: BTreeSet<RelPath>,
    /// path -> conflict copies wished for it (pending targets with `wish_of` set to it).
    wishes: BTreeMap<RelPath, BTreeSet<RelPath>>,
    /// waiter -> paths it waits for, and the reverse.
    waits: BTreeMap<RelPath, BTreeSet<RelPath>>,
    waiters: BTreeMap<RelPath, BTreeSet<RelPath>>,
    ops: BTreeMap<OpId, (RelPath, OpKind)>,
    next_op: OpId,
    fetches: usize,
    fetch_queue: BTreeSet<RelPath>,
    retries: BTreeSet<(u64, RelPath)>,
    cache: BTreeMap<Hash, Bytes>,
    cache_bytes: usize,
    out: VecDeque<Output>,
    stats: Stats,
    /// The ignore patterns in force, and the rules file's text they came from.
    ignore: crate::ignore::IgnoreRules,
    ignore_text: String,
    /// Broken invariants the engine noticed (a bug here, or a driver breaking its contract),
    /// at most [`BUGS_KEPT`]: the simulator fails a seed on any, the daemon logs them.
    bugs: Vec<String>,
    /// Paths the driver was asked to observe and has not reported yet, with when.
    observing: BTreeMap<RelPath, u64>,
    /// Paths whose observation failed, with the failures so far, and when to ask again.
    reobserve: BTreeMap<RelPath, (u32, u64)>,
    reobserve_at: BTreeSet<(u64, RelPath)>,
    /// Directories with something live, or something on disk, below them (see [`tally`]).
    tally: std::collections::HashMap<RelPath, tally::Counts>,
    /// When the next group commit is due (monotonic), while uncommitted writes wait.
    commit_due: Option<u64>,
    /// When the last group commit was asked for (monotonic).
    committed_at: Option<u64>,
    /// Every live peer's write applied here since the start, by its latency.
    latency_histogram: LatencyHistogram,
    /// The last races settled here with a conflict copy: the path and when (wall clock, ms).
    recent_conflicts: VecDeque<(RelPath, u64)>,
    /// Replication latencies of recent peers' writes applied here (wall clock, from the
    /// write's HLC stamp to its apply), in milliseconds.
    latencies_ms: VecDeque<f64>,
    counts: TreeCounts,
}

/// Latencies kept for status.
const LATENCIES_KEPT: usize = 1024;
/// Broken invariants kept for the driver to report.
const BUGS_KEPT: usize = 16;

impl<S: Store> Engine<S> {
    /// Starts an engine over a store, which may hold the state of an earlier run.
    pub fn new(cfg: Config, mut store: S) -> Engine<S> {
        assert!(
            cfg.batch_records_max > 0 && cfg.batch_records_max <= crate::wire::BATCH_RECORDS_MAX
        );
        assert!(cfg.inline_bytes_max <= INLINE_BYTES_MAX as u64);
        assert!(cfg.window_batches > 0 && cfg.fetches_max > 0 && cfg.seq_block > 0);
        // Two folds of different records may meet as two siblings: they must not fold again.
        assert!(
            cfg.siblings_max >= 2 && cfg.siblings_max <= rsyncfs_conflict::limits::SIBLINGS_MAX
        );
        // Sequences up to the reservation may have been used before a crash: start past it.
        let next_seq = store.seq_reserved() + 1;
        store.reserve_seq(next_seq + cfg.seq_block);
        let hlc = Hlc::new(cfg.node, cfg.hlc_max_delta);
        let mut counts = TreeCounts::default();
        let tally = tally::build(&store, &mut |path, entry| {
            counts.add(path, entry.record.as_ref(), 1)
        });
        Engine {
            cfg,
            store,
            hlc,
            now: 0,
            wall: 0,
            next_seq,
            peers: BTreeMap::new(),
            greeted: BTreeSet::new(),
            pending: BTreeMap::new(),
            dirty: BTreeSet::new(),
            wishes: BTreeMap::new(),
            waits: BTreeMap::new(),
            waiters: BTreeMap::new(),
            ops: BTreeMap::new(),
            next_op: 1,
            fetches: 0,
            fetch_queue: BTreeSet::new(),
            retries: BTreeSet::new(),
            cache: BTreeMap::new(),
            cache_bytes: 0,
            out: VecDeque::new(),
            stats: Stats::default(),
            ignore: crate::ignore::IgnoreRules::default(),
            ignore_text: String::new(),
            bugs: Vec::new(),
            observing: BTreeMap::new(),
            reobserve: BTreeMap::new(),
            reobserve_at: BTreeSet::new(),
            tally,
            commit_due: None,
            committed_at: None,
            latencies_ms: VecDeque::new(),
            latency_histogram: LatencyHistogram::default(),
            recent_conflicts: VecDeque::new(),
            counts,
        }
    }

    /// What the tree holds, by the stored records.
    pub fn tree_counts(&self) -> TreeCounts {
        self.counts
    }

    /// Recounts [`Engine::tree_counts`] from the whole store (for tests and the simulator).
    pub fn check_tree_counts(&self) -> Result<(), String> {
        let fresh = TreeCounts::of(&self.store);
        if fresh == self.counts {
            Ok(())
        } else {
            Err(format!("kept {:?}, recounted {fresh:?}", self.counts))
        }
    }

    pub fn node(&self) -> NodeId {
        self.cfg.node
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, for the driver's own bookkeeping (committing, say). Changing entries behind
    /// the engine's back breaks its invariants.
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    pub fn into_store(self) -> S {
        self.store
    }

    /// The bytes of small contents kept in memory now, and the most that may be kept.
    pub fn cache_bytes(&self) -> (usize, usize) {
        (self.cache_bytes, self.cfg.cache_bytes_max)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// True when the engine has nothing left to do until something new happens: no pending
    /// path, no operation in flight, no output waiting, nothing unacknowledged.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && self.ops.is_empty()
            && self.out.is_empty()
            && self.dirty.is_empty()
            && self.reobserve.is_empty()
            && self.peers.values().all(replicate::Peer::is_idle)
    }

    /// Invariants the engine found broken (see the field); empty in a correct run.
    pub fn bugs(&self) -> &[String] {
        &self.bugs
    }

    fn note_bug(&mut self, what: String) {
        debug_assert!(false, "{what}");
        if self.bugs.len() < BUGS_KEPT {
            self.bugs.push(what);
        }
    }

    /// The record `path` is heading for when it differs from the stored one (diagnostics).
    pub fn pending_target(&self, path: &RelPath) -> Option<&Record> {
        self.pending.get(path).and_then(|p| p.target.as_ref())
    }

    /// Paths that still have work pending, for diagnostics.
    pub fn pending_paths(&self) -> Vec<String> {
        self.pending
            .iter()
            .map(|(p, w)| {
                format!(
                    "{p} (op {:?}, busy {}, sources {}, tried {}, waits {:?})",
                    w.op,
                    w.busy,
                    w.sources.len(),
                    w.tried.len(),
                    self.waits.get(p)
                )
            })
            .collect()
    }

    /// Paths whose work keeps failing with a local I/O error (a full disk, say), at most
    /// `limit`, with the failure and how often it was retried: what status says loudly.
    pub fn failing(&self, limit: usize) -> Vec<(RelPath, IoFailure, u32)> {
        self.pending
            .iter()
            .filter_map(|(p, w)| w.failing.clone().map(|f| (p.clone(), f, w.retries)))
            .take(limit)
            .collect()
    }

    /// Paths with work pending and the bytes of file content they still wait for, apart from
    /// those whose content only peers that are down have (for status: what has yet to arrive
    /// or be applied here, and what waits for a peer to come back).
    pub fn pending_work(&self) -> PendingWork {
        let mut work = PendingWork::default();
        for p in self.pending.values() {
            let bytes = p
                .target
                .as_ref()
                .and_then(|t| t.winner().meta.file_hash())
                .map_or(0, |(_, size)| size);
            if self.waits_for_down_peers(p) {
                work.waiting_paths += 1;
                work.waiting_bytes += bytes;
            } else {
                work.paths += 1;
                work.bytes += bytes;
            }
        }
        work
    }

    /// Whether `p` needs content that no connected peer announced (and none is staged or in
    /// flight): only a peer that is down can give it (a peer that comes back announces it
    /// again).
    fn waits_for_down_peers(&self, p: &Pending) -> bool {
        p.op.is_none()
            && p.staged.is_none()
            && p.target.as_ref().is_some_and(|t| {
                t.winner()
                    .meta
                    .file_hash()
                    .is_some_and(|(_, size)| size > 0)
            })
            && !p.sources.iter().any(|s| self.peers.contains_key(s))
    }

    /// True when nothing can go on here until something new happens: what is pending waits
    /// for peers that are down, and no connected peer has anything unacknowledged. (Status's
    /// "idle"; [`Engine::is_idle`] also needs the waiting work done.)
    pub fn is_idle_here(&self) -> bool {
        self.pending.values().all(|p| self.waits_for_down_peers(p))
            && self.ops.is_empty()
            && self.out.is_empty()
            && self.dirty.is_empty()
            && self.reobserve.is_empty()
            && self.peers.values().all(replicate::Peer::is_idle)
    }

    /// Why [`Engine::is_idle_here`] is false, in words for status (empty when it is true).
    pub fn busy_reasons(&self) -> Vec<String> {
        let mut why = Vec::new();
        let here = self
            .pending
            .values()
            .filter(|p| !self.waits_for_down_peers(p))
            .count();
        for (n, what) in [
            (here, "paths pending"),
            (self.ops.len(), "operations running"),
            (self.out.len(), "outputs not taken"),
            (self.dirty.len(), "paths to settle"),
            (self.reobserve.len(), "paths to observe again"),
        ] {
            if n > 0 {
                why.push(format!("{n} {what}"));
            }
        }
        for (id, peer) in &self.peers {
            why.extend(
                peer.busy_reasons()
                    .into_iter()
                    .map(|r| format!("{}: {r}", id.short())),
            );
        }
        why
    }

    /// Feeds one input in at time `now`.
    pub fn handle(&mut self, now: Now, input: Input) {
        self.tick(now);
        match input {
            Input::LocalChange { path, observed } => self.on_local_change(path, observed),
            Input::ObserveFailed { path } => self.on_observe_failed(path),
            Input::WriterClosed { path } => self.on_writer_closed(&path),
            Input::PeerUp { peer } => self.on_peer_up(peer),
            Input::PeerDown { peer } => self.on_peer_down(peer),
            Input::Received { from, message } => self.on_message(from, message),
            Input::FetchDone { op, result } => self.on_fetch_done(op, result),
            Input::ApplyDone { op, result } => self.on_apply_done(op, result),
        }
        self.flush();
    }

    /// Lets timers fire at time `now`.
    pub fn handle_timeout(&mut self, now: Now) {
        self.tick(now);
        if self.commit_due.is_some_and(|at| at <= self.now) {
            self.commit_due = None;
            self.committed_at = Some(self.now);
            self.out.push_back(Output::Commit);
        }
        while let Some((at, _)) = self.reobserve_at.first() {
            if *at > self.now {
                break;
            }
            let (_, path) = self.reobserve_at.pop_first().expect("checked above");
            self.observing.remove(&path);
            self.observe(path);
        }
        while let Some((at, _)) = self.retries.first() {
            if *at > self.now {
                break;
            }
            let (_, path) = self.retries.pop_first().expect("checked above");
            if let Some(p) = self.pending.get_mut(&path) {
                p.retry_at = None;
                p.busy = false;
                // Sources that lacked the content then may have it now.
                p.tried.clear();
            }
            self.dirty.insert(path);
        }
        self.peers_on_timeout();
        self.flush();
    }

    fn tick(&mut self, now: Now) {
        self.now = self.now.max(now.mono_ns);
        self.wall = now.wall_ns;
    }

    /// When [`Engine::handle_timeout`] wants to be called next, on the monotonic clock: now,
    /// when a call left work undone.
    pub fn poll_timeout(&self) -> Option<u64> {
        if !self.dirty.is_empty() {
            return Some(self.now);
        }
        let retry = self.retries.first().map(|(at, _)| *at);
        let peers = self
            .peers
            .values()
            .filter_map(|p| p.deadline(&self.cfg))
            .min();
        let reobserve = self.reobserve_at.first().map(|(at, _)| *at);
        retry
            .into_iter()
            .chain(peers)
            .chain(self.commit_due)
            .chain(reobserve)
            .min()
    }

    /// Recent replication latencies of peers' writes applied here, in milliseconds (wall clocks:
    /// from the write's HLC stamp to its apply).
    pub fn latencies_ms(&self) -> &VecDeque<f64> {
        &self.latencies_ms
    }

    /// Takes the text of the tree's rules file (`.rsyncfsignore`; empty where there is none) as
    /// the ignore patterns from now on. Returns whether they changed: the driver then looks at
    /// the whole tree again, so that a path no longer ignored is shipped.
    pub fn set_ignore(&mut self, text: &str) -> bool {
        if text == self.ignore_text {
            return false;
        }
        self.ignore = crate::ignore::IgnoreRules::parse(text);
        self.ignore_text = text.to_string();
        true
    }

    /// The ignore patterns in force.
    pub fn ignore_rules(&self) -> &crate::ignore::IgnoreRules {
        &self.ignore
    }

    /// Every live peer's write applied here since the start, counted by its latency.
    pub fn latency_histogram(&self) -> &LatencyHistogram {
        &self.latency_histogram
    }

    /// The last races this node settled with a conflict copy (at most
    /// [`RECENT_CONFLICTS_KEPT`]), oldest first: the path and when, in wall-clock ms.
    pub fn recent_conflicts(&self) -> &VecDeque<(RelPath, u64)> {
        &self.recent_conflicts
    }

    fn note_conflict(&mut self, path: &RelPath) {
        if self.recent_conflicts.len() >= RECENT_CONFLICTS_KEPT {
            self.recent_conflicts.pop_front();
        }
        let ms = self.wall / 1_000_000;
        self.recent_conflicts.push_back((path.clone(), ms));
    }

    /// A peer's write, which came from `from`, now shows here: how long it took, by the wall
    /// clocks (which may disagree by their skew). Only writes made while the link to `from` was
    /// up count; older ones were caught up, and their age says nothing of the latency.
    fn note_latency(&mut self, record: &Record, from: Option<NodeId>) {
        let written = record.winner().hlc.get_time().to_duration();
        let live = from
            .and_then(|f| self.peers.get(&f))
            .is_some_and(|peer| written >= Duration::from_nanos(peer.up_wall()));
        if !live {
            self.stats.caught_up += 1;
            return;
        }
        let ms = Duration::from_nanos(self.wall)
            .saturating_sub(written)
            .as_secs_f64()
            * 1e3;
        if self.latencies_ms.len() >= LATENCIES_KEPT {
            self.latencies_ms.pop_front();
        }
        self.latencies_ms.push_back(ms);
        self.latency_histogram.observe(ms);
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.next_seq > self.store.seq_reserved() {
            let upto = self.store.seq_reserved() + self.cfg.seq_block;
            self.store.reserve_seq(upto);
        }
        assert!(seq <= self.store.seq_reserved());
        seq
    }

    /// The wall clock as the HLC takes it.
    fn wall_ntp(&self) -> NTP64 {
        NTP64::from(Duration::from_nanos(self.wall))
    }

    fn on_local_change(&mut self, path: RelPath, observed: Option<Meta>) {
        self.observing.remove(&path);
        if let Some((_, at)) = self.reobserve.remove(&path) {
            self.reobserve_at.remove(&(at, path.clone()));
        }
        let entry = self.store.get(&path).unwrap_or_default();
        if observed == entry.local {
            return;
        }
        // An ignored path's changes stay here, and the store keeps what it knew, so that once
        // the path is no longer ignored the next look at it ships what it holds then.
        let is_dir = observed
            .as_ref()
            .or(entry.local.as_ref())
            .is_some_and(Meta::is_dir);
        if self.ignore.is_ignored(&path, is_dir) {
            self.stats.ignored_local += 1;
            return;
        }
        if self.cfg.mode == Mode::ReceiveOnly {
            // The mount refuses writes; a change made behind its back (in the backing
            // directory) is not shipped, and stays until the mesh changes that path.
            self.put_local(&path, entry, observed);
            return;
        }
        // What the filesystem shows anyway (a directory that exists for what is inside it, or
        // the record's own state after a crash between apply and store) is not a write.
        let shown = reconcile::shown(entry.record.as_ref(), self.live_below(&path));
        if observed == shown {
            self.put_local(&path, entry, observed);
            return;
        }
        let seq = self.next_seq();
        let dot = Dot {
            node: self.cfg.node,
            counter: seq,
        };
        let hlc = self.hlc.new_timestamp(self.wall_ntp());
        let meta = observed.clone().unwrap_or_else(Meta::tombstone);
        let record = Record::write(entry.record.as_ref(), dot, hlc, meta);
        self.stats.local_writes += 1;
        let before = self.own(&path);
        if let Some(p) = self.pending.get_mut(&path) {
            if let Some(target) = &p.target {
                p.target = Some(rsyncfs_conflict::join(target, &record));
                p.from = None;
            }
            self.dirty.insert(path.clone());
        }
        self.unwish(&path);
        let new = Entry {
            record: Some(record),
            local: observed,
            seq,
            from: None,
        };
        self.counts.add(&path, entry.record.as_ref(), -1);
        self.counts.add(&path, new.record.as_ref(), 1);
        self.store.put(&path, new);
        self.retally(&path, before);
        self.after_local_state_change(&path);
        self.peers_mark_new_records();
    }

    /// An observation failed: ask again after a backoff that doubles with each failure. Until
    /// an observation succeeds the engine is not idle (status says so).
    fn on_observe_failed(&mut self, path: RelPath) {
        self.observing.remove(&path);
        let failures = self.reobserve.get(&path).map_or(0, |(n, _)| *n) + 1;
        let backoff = self.cfg.retry_after.as_nanos() as u64 * (1u64 << failures.min(6));
        let at = self.now + backoff;
        if let Some((_, old)) = self.reobserve.insert(path.clone(), (failures, at)) {
            self.reobserve_at.remove(&(old, path.clone()));
        }
        self.reobserve_at.insert((at, path));
    }

    /// Records what the filesystem holds at a path without a new write.
    fn put_local(&mut self, path: &RelPath, mut entry: Entry, local: Option<Meta>) {
        entry.local = local;
        self.put_entry(path, entry);
        self.after_local_state_change(path);
    }

    /// A path's local state changed: the directory above may now be empty or differently
    /// shadowed, and paths waiting for this one may go on.
    fn after_local_state_change(&mut self, path: &RelPath) {
        if let Some(parent) = path.parent() {
            self.dirty.insert(parent);
        }
        if self.pending.contains_key(path) {
            self.dirty.insert(path.clone());
        }
        self.wake_waiters(path);
    }

    fn on_writer_closed(&mut self, path: &RelPath) {
        if let Some(p) = self.pending.get_mut(path) {
            if p.busy {
                p.busy = false;
                if let Some(at) = p.retry_at.take() {
                    self.retries.remove(&(at, path.clone()));
                }
                self.dirty.insert(path.clone());
            }
        }
    }

    fn flush(&mut self) {
        let mut budget = self.cfg.reconciles_per_call_max;
        while budget > 0 && !self.dirty.is_empty() {
            // Paths that are to show something go first, so that a copy from a local file is
            // under way before that file's own removal is looked at (and waits for it): a
            // rename then moves no bytes.
            let take = budget.min(self.dirty.len());
            let mut round: Vec<RelPath> = Vec::with_capacity(take);
            while round.len() < take {
                round.push(self.dirty.pop_first().expect("counted"));
            }
            let (live, rest): (Vec<RelPath>, Vec<RelPath>) = round.into_iter().partition(|p| {
                self.pending
                    .get(p)
                    .and_then(|w| w.target.as_ref())
                    .is_some_and(Record::is_live)
            });
            for path in live.into_iter().chain(rest) {
                self.reconcile(&path);
                budget -= 1;
            }
        }
        self.take_deferred();
        self.peers_push();
        self.schedule_commit();
    }

    /// Asks for a group commit once writes wait: soon, or at once when many do.
    fn schedule_commit(&mut self) {
        let waiting = self.store.uncommitted();
        if waiting == 0 {
            self.commit_due = None;
        } else if waiting >= self.cfg.commit_writes_max {
            self.commit_due = None;
            if !matches!(self.out.back(), Some(Output::Commit)) {
                self.committed_at = Some(self.now);
                self.out.push_back(Output::Commit);
            }
        } else if self.commit_due.is_none() {
            let soon = self.now + self.cfg.commit_after.as_nanos() as u64;
            let apart = self
                .committed_at
                .map_or(0, |at| at + self.cfg.commit_gap_min.as_nanos() as u64);
            self.commit_due = Some(soon.max(apart));
        }
    }
}

#[cfg(test)]
mod histogram_tests {
    use super::*;

    #[test]
    fn a_latency_lands_in_the_first_bucket_that_holds_it() {
        let mut h = LatencyHistogram::default();
        for ms in [0.2, 1.0, 1.5, 9_999.0, 60_000.0] {
            h.observe(ms);
        }
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[LATENCY_BOUNDS_MS.len() - 1], 1);
        assert_eq!(h.counts[LATENCY_BOUNDS_MS.len()], 1);
        assert_eq!(h.count, 5);
        assert!((h.sum_ms - 70_001.7).abs() < 1e-6);
    }
}
