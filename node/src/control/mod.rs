//! The control socket (`control.sock` in the state directory, for root only): the commands
//! `status`, `conflicts`, `invite`, `join`, `accept`, `rescan` and `chglog` talk to the running daemon
//! through it. One JSON request per connection, one line; the answer is one JSON line, except
//! for `chglog`, which streams changed paths until the reader goes away.
//!
//! This module is the protocol: [`Wire`] (what travels), [`Request`] and [`Response`] (what
//! the [`server`] hands the daemon and gets back), [`Status`] (what `status` answers, shared by
//! the daemon, the command line and the tests). It knows nothing of the daemon or the network.

pub mod client;
pub mod server;
pub mod web;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub const SOCKET: &str = "control.sock";
pub const CHGLOG_SUBSCRIBERS_MAX: usize = 16;

/// A request as it travels on the socket.
#[derive(Serialize, Deserialize, Debug)]
pub enum Wire {
    Status,
    Conflicts,
    Invite {
        addr: Option<String>,
    },
    Join {
        peer: Option<String>,
        token: Option<String>,
    },
    Accept {
        id: String,
    },
    Forget {
        id: String,
    },
    Leave,
    Revoke {
        token: Option<String>,
    },
    Versions {
        path: String,
    },
    Restore {
        path: String,
        version: Option<String>,
    },
    Chglog,
    Rescan,
}

/// What the daemon passes a `chglog` reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// A changed path, relative to the tree's root.
    Path(String),
    /// Paths were left out before this point: the reader's queue was full.
    Lost,
}

/// A request for the daemon, with where its changed paths go for `chglog`.
pub enum Request {
    Status,
    Conflicts,
    Invite {
        addr: Option<String>,
    },
    Join {
        peer: Option<String>,
        token: Option<String>,
    },
    Accept {
        id: String,
    },
    /// Forget a peer for good, and tell the others to (`rsyncfs-node forget`).
    Forget {
        id: String,
    },
    /// Leave the mesh (`rsyncfs-node leave`).
    Leave,
    /// Revoke an invitation (every one, with `None`).
    Revoke {
        token: Option<String>,
    },
    /// The kept versions of a path.
    Versions {
        path: String,
    },
    /// Write a kept version back through the mount.
    Restore {
        path: String,
        version: Option<String>,
    },
    Chglog {
        tx: mpsc::Sender<Changed>,
    },
    /// Look at every path of the backing directory again (changes made there directly).
    Rescan,
}

/// The daemon's answer.
pub enum Response {
    Ok(serde_json::Value),
    Err(String),
}

/// A request handed to the daemon, and where its answer goes.
pub type Call = (Request, oneshot::Sender<Response>);

/// The answer as it travels on the socket.
#[derive(Serialize, Deserialize)]
struct Answer {
    ok: Option<serde_json::Value>,
    error: Option<String>,
}

/// What `status` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// This node's id, long and short.
    pub node: String,
    pub short: String,
    pub mode: String,
    pub listen: String,
    /// Where the metrics and the status page are served (`up --metrics`), if anywhere.
    #[serde(default)]
    pub metrics: Option<String>,
    pub up_s: u64,
    /// Nothing this node can do now: nothing pending here but what waits for peers that are
    /// down, nothing in flight, nothing unacknowledged by a connected peer, nothing left to
    /// observe.
    pub idle: bool,
    /// Why it is not idle, in words (empty when idle).
    #[serde(default)]
    pub busy_because: Vec<String>,
    /// Paths with work this node can do now, and the bytes of file content they wait for.
    pub pending_paths: usize,
    pub pending_bytes: u64,
    /// Paths whose content only peers that are down have, and its bytes.
    pub waiting_paths: usize,
    pub waiting_bytes: u64,
    /// Paths queued for observation (stat and hash).
    pub observing: usize,
    /// A scan of the whole tree in progress (at start, asked for, or periodic).
    pub scanning: Option<Scan>,
    /// What the tree holds: regular files, their bytes, other entries (directories,
    /// symlinks, ...).
    pub files: u64,
    pub bytes: u64,
    pub other_entries: u64,
    /// Paths whose work keeps failing, with why (a full disk, say), a few.
    pub failing: Vec<Failing>,
    pub peers: Vec<PeerStatus>,
    pub pending_joins: Vec<PendingJoinStatus>,
    /// Conflict copies in the tree (what `conflicts` lists).
    pub conflicts: u64,
    /// Races this node settled with a conflict copy since it started.
    pub conflicts_settled_here: u64,
    /// Peers' writes applied here that were made before the link was up (caught up after a
    /// join, a restart or a partition): not counted in `latency_ms`.
    pub caught_up: u64,
    pub local_writes: u64,
    pub applies: u64,
    pub records_sent: u64,
    pub records_received: u64,
    /// Content bytes received (literal segments and deltas) as they arrived, also of fetches
    /// that broke off.
    pub fetched_bytes: u64,
    pub served_bytes: u64,
    /// Bytes of peers' files kept here while their writers were still writing them (a
    /// preseed), and of this node's files pushed so.
    #[serde(default)]
    pub preseeded_bytes: u64,
    #[serde(default)]
    pub preseed_pushed_bytes: u64,
    pub frames_dropped: u64,
    pub udp_rx_bytes: u64,
    pub udp_tx_bytes: u64,
    pub latency_ms: Latency,
    /// The ignore patterns (`.rsyncfsignore` and the defaults), and what they kept here.
    #[serde(default)]
    pub ignore: IgnoreStatus,
    /// Every live peer's write applied since the start, by latency (for metrics).
    #[serde(default)]
    pub latency_histogram: Histogram,
    /// The last races settled here with a conflict copy, oldest first.
    #[serde(default)]
    pub recent_conflicts: Vec<RecentConflict>,
    /// Broken invariants the engine noticed (a bug: please report it).
    pub bugs: Vec<String>,
    /// The daemon's caches: what each holds now, and its fixed budget.
    #[serde(default)]
    pub caches: Vec<CacheStatus>,
}

/// Counts by bucket: `counts[i]` values at most `bounds_ms[i]` (and above the bound before);
/// the last count, one more than the bounds, those above every bound.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Histogram {
    pub bounds_ms: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum_ms: f64,
    pub count: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IgnoreStatus {
    /// Patterns from `.rsyncfsignore`, besides the defaults.
    pub patterns: usize,
    /// Its lines that are not patterns, with why.
    pub errors: Vec<String>,
    /// Local changes not shipped, and peers' records not applied, since the start.
    pub ignored_local: u64,
    pub ignored_remote: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecentConflict {
    pub path: String,
    /// When it was settled, wall clock, ms since the epoch.
    pub at_ms: u64,
}

/// One of the daemon's caches. Its budget is fixed whatever the tree's size; the memory a
/// node needs beyond these grows with the tree.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheStatus {
    pub name: String,
    /// What it holds now: the cached bytes, and for the maps of decoded values their slots
    /// (an estimate: what a decoded value holds on the heap is not counted).
    pub bytes: u64,
    pub budget_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scan {
    /// Paths the scan found (in the tree, and in the store only).
    pub paths: usize,
    /// Of those, still to be observed.
    pub left: usize,
    pub for_s: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failing {
    pub path: String,
    pub error: String,
    pub retries: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: String,
    pub addr: Option<String>,
    /// When a link to it was last up (now, while it is), ms since the epoch; none if never.
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
    pub connected: bool,
    pub connected_for_s: Option<u64>,
    pub rtt_ms: Option<f64>,
    /// The link's packet size, packets lost on it, and MTU black holes quinn saw on it.
    #[serde(default)]
    pub mtu: Option<u16>,
    #[serde(default)]
    pub lost_packets: Option<u64>,
    #[serde(default)]
    pub black_holes: Option<u64>,
    /// Our records the peer has not acknowledged yet.
    pub behind: Option<u64>,
    pub their_records_applied: Option<u64>,
    pub paths_pending_from_them: Option<usize>,
    /// Files and bytes the peer's tree held, as its last batch said.
    #[serde(default)]
    pub their_files: Option<u64>,
    #[serde(default)]
    pub their_bytes: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingJoinStatus {
    pub id: String,
    pub addr: String,
    pub waiting_s: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: usize,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

/// Bytes as a person reads them (`1.5 MiB`), for `status` and the status page.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
