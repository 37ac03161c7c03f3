//! One simulated run: N engines over in-memory filesystems, a simulated network and clocks, a
//! seeded workload and fault schedule, and the checks of every invariant.

use crate::check::{Checker, SendContext, Violation};
use crate::faults::{Character, Shape};
use crate::fs::{Node, SimFs};
use crate::{Options, Topology};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rsyncfs_conflict::{Meta, NodeId};
use rsyncfs_mesh::engine::{
    Action, Apply, ApplyError, Config, Engine, FetchError, Input, IoFailure, IoKind, Mode, Now,
    OpId, Output, Source, StagedId,
};
use rsyncfs_mesh::wire::{self, Message};
use rsyncfs_mesh::{MemStore, RelPath, Store};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::time::Duration;

const MS: u64 = 1_000_000;
/// 2026-11-26T00:00:00Z: where every node's clock starts, before its skew.
const EPOCH_NS: u64 = 1_795_651_200 * 1_000_000_000;
/// Files up to this size travel inline in the simulator; larger ones are fetched, so that both
/// paths run on every seed.
const SIM_INLINE_BYTES_MAX: u64 = 128;
/// Liveness: once every fault has stopped (links healed, nodes back, disks with space, clocks
/// left alone), every node must be done within this much simulated time, without a restart or a
/// reconnect: a path still pending then is a failed seed.
const LIVENESS_LIMIT_NS: u64 = 120_000 * MS;
/// Cost: store operations one engine call may make, at most. The engine reconciles at most
/// `reconciles_per_call_max` paths per call and never scans the store per path; this bound is
/// that budget with room for a batch, a window of pushes and the tally's walks up a deep tree.
const STORE_OPS_PER_CALL_MAX: u64 = 200_000;
/// Trace lines kept for a failure report, and the bytes of one line.
const TRACE_LINES_MAX: usize = 200_000;
const TRACE_LINE_BYTES_MAX: usize = 400;

/// The hot paths of the workload: few, so that races are common. Some directory names are also
/// written as files, so that file-against-directory races happen too.
const FILES: &[&str] = &["a", "b", "c.txt", "d/x", "d/y", "d/e/z", "f/w", "d", "f"];
const DIRS: &[&str] = &["d", "d/e", "f", "g"];
const MODES: &[u32] = &[0o644, 0o600, 0o755, 0o700];

#[derive(Debug)]
enum Event {
    UserOp {
        node: usize,
    },
    Close {
        node: usize,
        path: String,
        life: u64,
    },
    DirtyReport {
        node: usize,
        path: String,
        life: u64,
    },
    Deliver {
        from: usize,
        to: usize,
        epoch: u64,
        bytes: Vec<u8>,
    },
    FetchArrive {
        client: usize,
        /// The client's life when it asked: a fetch lost with its connection fails in the
        /// same life only.
        client_life: u64,
        server: usize,
        epoch: u64,
        op: OpId,
        hash: [u8; 32],
        hint: String,
    },
    FetchReply {
        client: usize,
        client_life: u64,
        server: usize,
        epoch: u64,
        op: OpId,
        found: Option<Bytes>,
    },
    ApplyExec {
        node: usize,
        life: u64,
        apply: Apply,
    },
    Timer {
        node: usize,
        life: u64,
    },
    Commit {
        node: usize,
        life: u64,
    },
    Cut {
        link: (usize, usize),
    },
    Heal {
        link: (usize, usize),
    },
    /// A new connection replaces the link's live one, as a real driver does when a peer dials
    /// again (it restarted, or dials crossed): what was in flight on the old one is lost, and
    /// only the sides in `restarts` see the link go down and up; the others carry their engine
    /// session over.
    Replace {
        link: (usize, usize),
        restarts: [bool; 2],
    },
    Crash {
        node: usize,
    },
    Restart {
        node: usize,
    },
    HealAll,
    DiskFull {
        node: usize,
        full: bool,
    },
    ClockStep {
        node: usize,
        step_ns: i64,
    },
    Shape(Shape),
    /// The driver answers an observation (late, in its I/O order).
    ObserveExec {
        node: usize,
        life: u64,
        path: RelPath,
    },
}

struct Scheduled {
    time: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.time, self.seq) == (other.time, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.time, self.seq).cmp(&(other.time, other.seq))
    }
}

struct SimNode {
    id: NodeId,
    engine: Option<Engine<MemStore>>,
    /// The store while the node is down.
    parked: Option<MemStore>,
    fs: SimFs,
    offset_ns: i64,
    drift_ppm: i64,
    /// Files a local process has open for writing, and whether it wrote since the last report.
    open: BTreeMap<String, bool>,
    staged: BTreeMap<StagedId, Bytes>,
    /// Staged contents the engine released: using one again breaks the driver contract.
    released: BTreeSet<StagedId>,
    next_staged: StagedId,
    /// Bumped at every crash and restart; events of an earlier life are ignored.
    life: u64,
    timer_at: Option<u64>,
    commit_at: Option<u64>,
    io_free_at: u64,
}

#[derive(Clone, Copy, Default)]
struct Link {
    cut: bool,
    up: bool,
    epoch: u64,
}

/// Per-seed network and fault character.
struct Weather {
    loss: f64,
    dup: f64,
    delay_max_ns: u64,
}

/// The result of one run.
pub struct Outcome {
    pub digest: [u8; 32],
    pub violations: Vec<Violation>,
    pub trace: Vec<String>,
    pub stats: RunStats,
    /// The seed's faults and shapes, in a few words.
    pub character: String,
}

#[derive(Default, Debug, Clone)]
pub struct RunStats {
    pub ops: u64,
    pub messages: u64,
    pub records_sent: u64,
    pub records_stored: u64,
    pub conflicts: u64,
    pub crashes: u64,
    pub cuts: u64,
    /// Connections replaced under a live link (see `Event::Replace`).
    pub replacements: u64,
    pub virtual_ms: u64,
    /// Paths in node 0's tree at the end, and how many of them are conflict copies.
    pub final_paths: u64,
    pub final_conflict_copies: u64,
    /// Contents the checker required to survive.
    pub contents_owed: u64,
    /// The most store operations one engine call made (the cost invariant's measure).
    pub store_ops_max: u64,
}

pub struct World {
    opts: Options,
    rng: ChaCha8Rng,
    time: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    nodes: Vec<SimNode>,
    links: BTreeMap<(usize, usize), Link>,
    weather: Weather,
    digest: blake3::Hasher,
    trace: Option<VecDeque<String>>,
    check: Checker,
    stats: RunStats,
    content_counter: u64,
    workload_end: u64,
    character: Character,
    /// The hot paths of this run: the usual ones, plus paths at the limits for some seeds.
    files: Vec<String>,
    dirs: Vec<String>,
    /// Set when every fault has stopped (HealAll).
    faults_over: bool,
    /// The most store operations one engine call made.
    store_ops_max: u64,
    /// A path whose record and pending target every node's trace shows as they change
    /// (`RSYNCFS_SIM_WATCH=path`, for debugging a seed).
    watch: Option<(RelPath, Vec<String>)>,
}

fn link_key(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl World {
    pub fn new(opts: Options) -> World {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let n = opts.nodes;
        let character = if opts.faults {
            // The workload ends after about 2 ms per step.
            Character::draw(&mut rng, n, opts.topology, opts.steps * 2 * MS)
        } else {
            Character::calm(n)
        };
        let nodes = (0..n)
            .map(|i| {
                let id = NodeId::from_index(i as u64);
                let offset_ns = rng.random_range(-2_000i64..=2_000) * MS as i64;
                let drift_ppm = rng.random_range(-200i64..=200);
                let mut node = SimNode {
                    id,
                    engine: None,
                    parked: Some(MemStore::new()),
                    fs: SimFs::default(),
                    offset_ns,
                    drift_ppm,
                    open: BTreeMap::new(),
                    staged: BTreeMap::new(),
                    released: BTreeSet::new(),
                    next_staged: 1,
                    life: 0,
                    timer_at: None,
                    commit_at: None,
                    io_free_at: 0,
                };
                node.engine = Some(Engine::new(
                    engine_config(id, &opts, &character, i),
                    node.parked.take().expect("fresh"),
                ));
                node
            })
            .collect();
        let mut links = BTreeMap::new();
        for (a, b) in topology_edges(opts.topology, n) {
            links.insert(link_key(a, b), Link::default());
        }
        let weather = Weather {
            loss: [0.0, 0.01, 0.05][rng.random_range(0..3)],
            dup: [0.0, 0.01, 0.03][rng.random_range(0..3)],
            delay_max_ns: [MS, 5 * MS, 30 * MS][rng.random_range(0..3)],
        };
        let trace = opts.trace.then(VecDeque::new);
        let (mut files, mut dirs): (Vec<String>, Vec<String>) = (
            FILES.iter().map(|s| s.to_string()).collect(),
            DIRS.iter().map(|s| s.to_string()).collect(),
        );
        if character.long_paths {
            let (long_files, long_dirs) = long_paths();
            files.extend(long_files);
            dirs.extend(long_dirs);
        }
        World {
            character,
            files,
            dirs,
            faults_over: false,
            store_ops_max: 0,
            watch: std::env::var("RSYNCFS_SIM_WATCH")
                .ok()
                .and_then(|p| RelPath::new(p).ok())
                .map(|p| (p, vec![String::new(); n])),
            check: Checker::default(),
            opts,
            rng,
            time: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            links,
            weather,
            digest: blake3::Hasher::new(),
            trace,
            stats: RunStats::default(),
            content_counter: 0,
            workload_end: 0,
        }
    }

    fn schedule(&mut self, time: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            time,
            seq: self.seq,
            event,
        }));
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            if trace.len() == TRACE_LINES_MAX {
                trace.pop_front();
            }
            let t = self.time as f64 / MS as f64;
            let mut line = line();
            if line.len() > TRACE_LINE_BYTES_MAX {
                // Long paths (deep trees, names at the limit) would drown the trace.
                let mut cut = TRACE_LINE_BYTES_MAX;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
                line.push('…');
            }
            trace.push_back(format!("[{t:10.3} ms] {line}"));
        }
    }

    /// What node `n`'s clock says at simulation time `t`: skewed and drifting.
    fn node_time_at(&self, n: usize, t: u64) -> u64 {
        let node = &self.nodes[n];
        let t = t as i128;
        (EPOCH_NS as i128 + node.offset_ns as i128 + t + t * node.drift_ppm as i128 / 1_000_000)
            as u64
    }

    fn node_time(&self, n: usize) -> u64 {
        self.node_time_at(n, self.time)
    }

    /// Node `n`'s two clocks now: the monotonic one is the simulation's time (it never goes
    /// back), the wall clock is skewed, drifts and is stepped.
    fn node_now(&self, n: usize) -> Now {
        Now::new(self.time, self.node_time(n))
    }

    pub fn run(mut self) -> Outcome {
        self.schedule_workload();
        // A first sync: trees that are there before the nodes first meet.
        let bulk: Vec<Shape> = self
            .character
            .shapes
            .iter()
            .filter(|(_, s)| matches!(s, Shape::Bulk { .. }))
            .map(|(_, s)| s.clone())
            .collect();
        for shape in bulk {
            self.shape(shape);
        }
        for (a, b) in self.links.keys().copied().collect::<Vec<_>>() {
            self.link_up(a, b);
        }
        let limit = self.workload_end + LIVENESS_LIMIT_NS;
        while let Some(Reverse(next)) = self.queue.pop() {
            if next.time > limit {
                let busy: Vec<String> = (0..self.nodes.len())
                    .filter_map(|i| {
                        let e = self.nodes[i].engine.as_ref()?;
                        let paths = e.pending_paths();
                        (!e.is_idle()).then(|| {
                            format!("n{i}: {} pending, first {:?}", paths.len(), paths.first())
                        })
                    })
                    .collect();
                self.check.violate(
                    "liveness",
                    None,
                    format!(
                        "not done {} s after every fault stopped: {}",
                        LIVENESS_LIMIT_NS / 1_000_000_000,
                        busy.join("; ")
                    ),
                );
                break;
            }
            self.time = next.time;
            self.handle_event(next.event);
            if self.check.failed() && self.check.stop_early() {
                break;
            }
        }
        self.stats.virtual_ms = self.time / MS;
        self.finish()
    }

    fn schedule_workload(&mut self) {
        let mut t = MS;
        let n = self.opts.nodes;
        for _ in 0..self.opts.steps {
            t += self.rng.random_range(0..4 * MS);
            let node = self.rng.random_range(0..n);
            self.schedule(t, Event::UserOp { node });
        }
        self.workload_end = t;
        // Faults: partitions of single links and crashes of single nodes, all inside the
        // workload window; everything heals at its end.
        let links: Vec<_> = self.links.keys().copied().collect();
        let fault_rate = [0u64, 1, 3][self.rng.random_range(0..3)];
        let cuts = self.opts.steps * fault_rate / 100;
        for _ in 0..cuts {
            if links.is_empty() {
                break;
            }
            let link = links[self.rng.random_range(0..links.len())];
            let at = self.rng.random_range(MS..t.max(MS + 1));
            let dur = self.rng.random_range(10 * MS..2_000 * MS);
            self.schedule(at, Event::Cut { link });
            self.schedule((at + dur).min(t), Event::Heal { link });
        }
        // Connections replaced while up, as after crossing dials: one side, the other, or
        // neither starts a new session.
        for _ in 0..cuts {
            if links.is_empty() {
                break;
            }
            let link = links[self.rng.random_range(0..links.len())];
            let at = self.rng.random_range(MS..t.max(MS + 1));
            let restarts =
                [[false, false], [true, false], [false, true]][self.rng.random_range(0..3)];
            self.schedule(at, Event::Replace { link, restarts });
        }
        let crashes = self.opts.steps * fault_rate / 200;
        for _ in 0..crashes {
            let node = self.rng.random_range(0..n);
            let at = self.rng.random_range(MS..t.max(MS + 1));
            let dur = self.rng.random_range(MS..1_000 * MS);
            self.schedule(at, Event::Crash { node });
            self.schedule((at + dur).min(t), Event::Restart { node });
        }
        self.schedule(t + MS, Event::HealAll);
        for (node, from, until) in self.character.disk_full.clone() {
            self.schedule(from, Event::DiskFull { node, full: true });
            self.schedule(until, Event::DiskFull { node, full: false });
        }
        for (node, at, step_ns) in self.character.clock_steps.clone() {
            self.schedule(at, Event::ClockStep { node, step_ns });
        }
        for (at, shape) in self.character.shapes.clone() {
            if !matches!(shape, Shape::Bulk { .. }) {
                self.schedule(at, Event::Shape(shape));
            }
        }
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::UserOp { node } => {
                if self.nodes[node].engine.is_some() {
                    self.stats.ops += 1;
                    self.user_op(node);
                }
            }
            Event::Close { node, path, life } => {
                if self.nodes[node].life == life {
                    if let Some(dirty) = self.nodes[node].open.remove(&path) {
                        self.log(|| format!("n{node} user closes {path}"));
                        if dirty {
                            self.report_written(node, &path);
                        }
                        let p = RelPath::new(path).expect("workload paths are valid");
                        self.feed(node, Input::WriterClosed { path: p });
                    }
                }
            }
            Event::DirtyReport { node, path, life } => {
                let n = &mut self.nodes[node];
                if n.life == life {
                    if let Some(dirty) = n.open.get_mut(&path) {
                        if std::mem::take(dirty) {
                            self.report_written(node, &path);
                        }
                        self.schedule(self.time + 50 * MS, Event::DirtyReport { node, path, life });
                    }
                }
            }
            Event::Deliver {
                from,
                to,
                epoch,
                bytes,
            } => {
                if !self.on_connection(from, to, epoch) {
                    return;
                }
                match wire::decode(&bytes) {
                    Ok(message) => {
                        self.digest.update(&bytes);
                        self.log(|| format!("n{to} <- n{from} {}", describe(&message)));
                        let id = self.nodes[from].id;
                        self.feed(to, Input::Received { from: id, message });
                    }
                    Err(e) => self.check.violate(
                        "wire",
                        None,
                        format!("n{from} sent a message n{to} cannot decode: {e}"),
                    ),
                }
            }
            Event::FetchArrive {
                client,
                client_life,
                server,
                epoch,
                op,
                hash,
                hint,
            } => {
                if !self.on_connection(client, server, epoch) {
                    self.fetch_lost(client, client_life, op);
                    return;
                }
                let found = self.nodes[server].fs.find_content(&hash, &hint);
                let delay = self.delay();
                self.schedule(
                    self.time + delay,
                    Event::FetchReply {
                        client,
                        client_life,
                        server,
                        epoch,
                        op,
                        found,
                    },
                );
            }
            Event::FetchReply {
                client,
                client_life,
                server,
                epoch,
                op,
                found,
            } => {
                if !self.on_connection(client, server, epoch) {
                    self.fetch_lost(client, client_life, op);
                    return;
                }
                let result = match found {
                    // Staging needs space.
                    Some(_) if self.nodes[client].fs.full => Err(FetchError::Io(IoFailure::new(
                        IoKind::NoSpace,
                        "staging: no space left on device",
                    ))),
                    Some(bytes) => {
                        let n = &mut self.nodes[client];
                        let id = n.next_staged;
                        n.next_staged += 1;
                        n.staged.insert(id, bytes);
                        Ok(id)
                    }
                    None => Err(FetchError::NotFound),
                };
                self.log(|| format!("n{client} fetch {op} from n{server}: {result:?}"));
                self.feed(client, Input::FetchDone { op, result });
            }
            Event::ApplyExec { node, life, apply } => {
                if self.nodes[node].life != life {
                    return;
                }
                let staged_id = match &apply.action {
                    Action::Write {
                        source: Source::Staged(id),
                        ..
                    } => Some(*id),
                    _ => None,
                };
                if let Some(id) = staged_id {
                    if self.nodes[node].released.contains(&id) {
                        self.check.violate(
                            "driver contract",
                            Some(apply.path.to_string()),
                            format!(
                                "n{node}'s engine applied staged content {id} to {} after releasing it",
                                apply.path
                            ),
                        );
                    }
                }
                let fail = !self.faults_over
                    && self.character.apply_fail_rate > 0.0
                    && self.rng.random_bool(self.character.apply_fail_rate);
                let result = if fail {
                    let kind = [IoKind::Device, IoKind::Permission][self.rng.random_range(0..2)];
                    Err(ApplyError::Io(IoFailure::new(kind, "injected")))
                } else {
                    let n = &mut self.nodes[node];
                    let open: BTreeSet<String> = n.open.keys().cloned().collect();
                    n.fs.apply(&apply, &open, &n.staged)
                };
                if result.is_ok() {
                    if let Some(id) = staged_id {
                        // Renamed into place: consumed.
                        self.nodes[node].staged.remove(&id);
                    }
                }
                self.log(|| {
                    format!(
                        "n{node} apply {} {:?} -> {result:?}",
                        apply.path,
                        short_action(&apply.action)
                    )
                });
                self.digest.update(apply.path.as_str().as_bytes());
                self.feed(
                    node,
                    Input::ApplyDone {
                        op: apply.op,
                        result,
                    },
                );
            }
            Event::Timer { node, life } => {
                let n = &self.nodes[node];
                if n.life != life || n.timer_at != Some(self.time) {
                    return;
                }
                self.nodes[node].timer_at = None;
                let now = self.node_now(node);
                if let Some(engine) = self.nodes[node].engine.as_mut() {
                    let before = engine.store().ops();
                    engine.handle_timeout(now);
                    let ops = engine.store().ops() - before;
                    self.charge(node, ops);
                }
                self.drain(node);
            }
            Event::Commit { node, life } => {
                let n = &mut self.nodes[node];
                if n.life == life && n.commit_at == Some(self.time) {
                    n.commit_at = None;
                    if let Some(e) = n.engine.as_mut() {
                        e.store_mut().commit();
                    }
                }
            }
            Event::Cut { link } => {
                self.stats.cuts += 1;
                self.log(|| format!("cut n{}-n{}", link.0, link.1));
                self.links.get_mut(&link).expect("known").cut = true;
                self.refresh_link(link);
            }
            Event::Heal { link } => {
                self.log(|| format!("heal n{}-n{}", link.0, link.1));
                self.links.get_mut(&link).expect("known").cut = false;
                self.refresh_link(link);
            }
            Event::Replace { link, restarts } => {
                if self.links[&link].up && !self.faults_over {
                    self.stats.replacements += 1;
                    self.replace_connection(link, restarts);
                }
            }
            Event::Crash { node } => self.crash(node),
            Event::Restart { node } => self.restart(node),
            Event::DiskFull { node, full } => {
                if !self.faults_over {
                    self.log(|| {
                        format!("n{node} disk {}", if full { "full" } else { "has space" })
                    });
                    self.nodes[node].fs.full = full;
                }
            }
            Event::ClockStep { node, step_ns } => {
                if !self.faults_over {
                    self.log(|| format!("n{node} wall clock steps {} s", step_ns / 1_000_000_000));
                    self.nodes[node].offset_ns += step_ns;
                }
            }
            Event::Shape(shape) => {
                if !self.faults_over {
                    self.shape(shape);
                }
            }
            Event::ObserveExec { node, life, path } => {
                if self.nodes[node].life == life {
                    if !self.faults_over && self.rng.random_bool(0.1) {
                        // The file changed every time it was read (or the read failed).
                        self.log(|| format!("n{node} observe {path}: failed"));
                        self.feed(node, Input::ObserveFailed { path });
                        return;
                    }
                    let observed = self.nodes[node].fs.meta(path.as_str());
                    self.log(|| format!("n{node} observe {path}: {}", short_meta(&observed)));
                    self.feed(node, Input::LocalChange { path, observed });
                }
            }
            Event::HealAll => {
                self.log(|| "heal all, restart all, close all, disks with space".to_string());
                self.faults_over = true;
                for node in &mut self.nodes {
                    node.fs.full = false;
                }
                for node in 0..self.nodes.len() {
                    if self.nodes[node].engine.is_none() {
                        self.restart(node);
                    }
                }
                for link in self.links.keys().copied().collect::<Vec<_>>() {
                    self.links.get_mut(&link).expect("known").cut = false;
                    self.refresh_link(link);
                }
                for node in 0..self.nodes.len() {
                    let life = self.nodes[node].life;
                    for path in self.nodes[node].open.keys().cloned().collect::<Vec<_>>() {
                        self.schedule(self.time, Event::Close { node, path, life });
                    }
                }
            }
        }
    }

    // ---- Engines and their outputs ----

    fn feed(&mut self, n: usize, input: Input) {
        let now = self.node_now(n);
        let Some(engine) = self.nodes[n].engine.as_mut() else {
            return;
        };
        let before = engine.store().ops();
        engine.handle(now, input);
        let ops = engine.store().ops() - before;
        self.charge(n, ops);
        self.drain(n);
        self.watch(n);
    }

    /// Traces the watched path's record and target on node `n` when they changed.
    fn watch(&mut self, n: usize) {
        let Some((path, last)) = &self.watch else {
            return;
        };
        let Some(engine) = self.nodes[n].engine.as_ref() else {
            return;
        };
        let show = |r: Option<&rsyncfs_conflict::Record>| {
            r.map_or("-".to_string(), |r| {
                let vv: Vec<String> =
                    r.vv.iter()
                        .map(|d| {
                            format!(
                                "{}:{}",
                                d.node.short().chars().next().unwrap_or('?'),
                                d.counter
                            )
                        })
                        .collect();
                format!("vv[{}] [{}]", vv.join(" "), short_siblings(r))
            })
        };
        let entry = engine.store().get(path);
        let now = format!(
            "stored {} local {} target {}",
            show(entry.as_ref().and_then(|e| e.record.as_ref())),
            short_meta(&entry.and_then(|e| e.local)),
            show(engine.pending_target(path))
        );
        if last[n] != now {
            let line = format!("n{n} watch {path}: {now}");
            self.watch.as_mut().expect("checked").1[n] = now;
            self.log(|| line);
        }
    }

    /// The cost invariant: one engine call made `ops` store operations.
    fn charge(&mut self, n: usize, ops: u64) {
        self.store_ops_max = self.store_ops_max.max(ops);
        if ops > STORE_OPS_PER_CALL_MAX {
            self.check.violate(
                "cost",
                None,
                format!(
                    "one call of n{n}'s engine made {ops} store operations (budget {STORE_OPS_PER_CALL_MAX})"
                ),
            );
        }
    }

    fn drain(&mut self, n: usize) {
        let mut observe = Vec::new();
        loop {
            let Some(engine) = self.nodes[n].engine.as_mut() else {
                return;
            };
            let Some(output) = engine.poll_output() else {
                if observe.is_empty() {
                    break;
                }
                // Answer observations after the outputs before them, as a driver would: at once,
                // or (slow observations) a little later, when more may have changed.
                let delay_max = self.character.observe_delay_max_ns;
                for path in std::mem::take(&mut observe) {
                    if delay_max > 0 {
                        // What is read is what is there when it is read, and reported at once:
                        // any order with the node's other events is one a real driver may
                        // produce.
                        let at = self.time + self.rng.random_range(0..delay_max);
                        let life = self.nodes[n].life;
                        self.schedule(
                            at,
                            Event::ObserveExec {
                                node: n,
                                life,
                                path,
                            },
                        );
                        continue;
                    }
                    let observed = self.nodes[n].fs.meta(&path_str(&path));
                    self.log(|| format!("n{n} observe {path}: {}", short_meta(&observed)));
                    let now = self.node_now(n);
                    let engine = self.nodes[n].engine.as_mut().expect("checked");
                    engine.handle(now, Input::LocalChange { path, observed });
                }
                continue;
            };
            match output {
                Output::Send { to, message } => self.send(n, to, message),
                Output::Fetch(f) => {
                    let server = self.index_of(f.from);
                    let link = self.links[&link_key(n, server)];
                    if !link.up {
                        // The engine learns of the drop with PeerDown; fail the fetch now.
                        let now = self.node_now(n);
                        let engine = self.nodes[n].engine.as_mut().expect("checked");
                        engine.handle(
                            now,
                            Input::FetchDone {
                                op: f.op,
                                result: Err(FetchError::Unreachable),
                            },
                        );
                        continue;
                    }
                    self.log(|| format!("n{n} fetch {} {} from n{server}", f.op, f.path));
                    let delay = self.delay();
                    self.schedule(
                        self.time + delay,
                        Event::FetchArrive {
                            client: n,
                            client_life: self.nodes[n].life,
                            server,
                            epoch: link.epoch,
                            op: f.op,
                            hash: f.hash,
                            hint: f.path.to_string(),
                        },
                    );
                }
                Output::Apply(apply) => {
                    let io = self.rng.random_range(0..2 * MS);
                    let node = &mut self.nodes[n];
                    let at = node.io_free_at.max(self.time) + io;
                    node.io_free_at = at;
                    let life = node.life;
                    self.schedule(
                        at,
                        Event::ApplyExec {
                            node: n,
                            life,
                            apply,
                        },
                    );
                }
                Output::Observe { path } => observe.push(path),
                Output::Release { staged } => {
                    if self.nodes[n].staged.remove(&staged).is_none() {
                        self.check.violate(
                            "driver contract",
                            None,
                            format!(
                                "n{n}'s engine released staged content {staged} it does not hold"
                            ),
                        );
                    }
                    self.nodes[n].released.insert(staged);
                }
                Output::Commit => {
                    if self.nodes[n].commit_at.is_none() {
                        // The store's disk takes a few milliseconds; a crash before loses it.
                        let at = self.time + self.rng.random_range(MS..10 * MS);
                        self.nodes[n].commit_at = Some(at);
                        let life = self.nodes[n].life;
                        self.schedule(at, Event::Commit { node: n, life });
                    }
                }
            }
        }
        self.reschedule(n);
    }

    fn reschedule(&mut self, n: usize) {
        let Some(engine) = self.nodes[n].engine.as_ref() else {
            return;
        };
        if let Some(at) = engine.poll_timeout() {
            // The monotonic clock is the simulation's; an engine that yielded with work left
            // wants to go on at once, after what else is due now.
            let at = at.max(self.time);
            if self.nodes[n].timer_at.is_none_or(|t| at < t) {
                self.nodes[n].timer_at = Some(at);
                let life = self.nodes[n].life;
                self.schedule(at, Event::Timer { node: n, life });
            }
        }
    }

    fn index_of(&self, id: NodeId) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .expect("known node")
    }

    fn delay(&mut self) -> u64 {
        let max = self.weather.delay_max_ns;
        // Mostly quick, sometimes slow, so that messages overtake each other.
        if self.rng.random_bool(0.1) {
            self.rng.random_range(0..max * 4)
        } else {
            self.rng.random_range(MS / 20..max)
        }
    }

    fn send(&mut self, from: usize, to_id: NodeId, mut message: Message) {
        let to = self.index_of(to_id);
        let link = self.links[&link_key(from, to)];
        if !link.up {
            return;
        }
        if let Message::Batch(batch) = &mut message {
            let engine = self.nodes[from].engine.as_ref();
            let context = SendContext {
                from,
                to,
                to_id,
                epoch: link.epoch,
                session: engine.map_or(0, |e| e.session(&to_id)),
                rewinds: engine.map_or(0, |e| e.rewinds(&to_id)),
                unskip_upto: engine.map_or(0, |e| e.unskip_upto(&to_id)),
            };
            for r in &mut batch.records {
                self.check.record_sent(&context, r);
                if let Some((hash, size)) = r.record.winner().meta.file_hash() {
                    if size <= SIM_INLINE_BYTES_MAX {
                        if let Some(Node::File { data, hash: h, .. }) =
                            self.nodes[from].fs.get(r.path.as_str())
                        {
                            if *h == hash {
                                r.data = Some(data.clone());
                            }
                        }
                    }
                }
            }
            self.stats.records_sent += batch.records.len() as u64;
        }
        self.stats.messages += 1;
        let bytes = wire::encode(&message);
        if bytes.len() > wire::FRAME_BYTES_MAX {
            self.check.violate(
                "wire",
                None,
                format!("n{from} built a frame of {} bytes", bytes.len()),
            );
            return;
        }
        if self.rng.random_bool(self.weather.loss) {
            self.log(|| format!("n{from} -> n{to} lost {}", describe(&message)));
            return;
        }
        let copies = if self.rng.random_bool(self.weather.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.delay();
            self.schedule(
                self.time + delay,
                Event::Deliver {
                    from,
                    to,
                    epoch: link.epoch,
                    bytes: bytes.clone(),
                },
            );
        }
    }

    // ---- Links, crashes, restarts ----

    fn refresh_link(&mut self, key: (usize, usize)) {
        let (a, b) = key;
        let link = self.links[&key];
        let should = !link.cut && self.nodes[a].engine.is_some() && self.nodes[b].engine.is_some();
        if should && !link.up {
            self.link_up(a, b);
        } else if !should && link.up {
            self.link_down(a, b);
        }
    }

    fn link_up(&mut self, a: usize, b: usize) {
        let link = self.links.get_mut(&link_key(a, b)).expect("known");
        link.up = true;
        link.epoch += 1;
        self.log(|| format!("link n{a}-n{b} up"));
        let (ida, idb) = (self.nodes[a].id, self.nodes[b].id);
        self.feed(a, Input::PeerUp { peer: idb });
        self.feed(b, Input::PeerUp { peer: ida });
    }

    fn replace_connection(&mut self, (a, b): (usize, usize), restarts: [bool; 2]) {
        let link = self.links.get_mut(&link_key(a, b)).expect("known");
        link.epoch += 1;
        self.log(|| format!("link n{a}-n{b} replaced (restarts {restarts:?})"));
        for (me, other, restart) in [(a, b, restarts[0]), (b, a, restarts[1])] {
            if restart {
                let id = self.nodes[other].id;
                self.feed(me, Input::PeerDown { peer: id });
                self.feed(me, Input::PeerUp { peer: id });
            }
        }
    }

    /// A fetch whose connection is gone fails, as the driver's stream does (the engine ignores
    /// it if it already gave the fetch up at a PeerDown).
    fn fetch_lost(&mut self, client: usize, life: u64, op: OpId) {
        if self.nodes[client].life != life || self.nodes[client].engine.is_none() {
            return;
        }
        self.feed(
            client,
            Input::FetchDone {
                op,
                result: Err(FetchError::Unreachable),
            },
        );
    }

    fn link_down(&mut self, a: usize, b: usize) {
        let link = self.links.get_mut(&link_key(a, b)).expect("known");
        link.up = false;
        link.epoch += 1;
        self.log(|| format!("link n{a}-n{b} down"));
        for (me, other) in [(a, b), (b, a)] {
            if self.nodes[me].engine.is_none() {
                continue;
            }
            let id = self.nodes[other].id;
            self.feed(me, Input::PeerDown { peer: id });
        }
    }

    fn crash(&mut self, n: usize) {
        let Some(engine) = self.nodes[n].engine.take() else {
            return;
        };
        self.stats.crashes += 1;
        self.log(|| format!("n{n} crashes"));
        let mut store = engine.into_store();
        store.crash();
        let node = &mut self.nodes[n];
        node.parked = Some(store);
        node.life += 1;
        node.open.clear();
        node.staged.clear();
        node.released.clear();
        node.timer_at = None;
        node.commit_at = None;
        self.refresh_links_of(n);
    }

    /// True while connection `epoch` of the link between `a` and `b` is still up: what was sent
    /// on an earlier connection is lost with it.
    fn on_connection(&self, a: usize, b: usize, epoch: u64) -> bool {
        let link = self.links[&link_key(a, b)];
        link.up && link.epoch == epoch
    }

    /// Brings every link of node `n` up or down as its state and partitions say.
    fn refresh_links_of(&mut self, n: usize) {
        let links: Vec<_> = self
            .links
            .keys()
            .copied()
            .filter(|(a, b)| *a == n || *b == n)
            .collect();
        for link in links {
            self.refresh_link(link);
        }
    }

    fn restart(&mut self, n: usize) {
        if self.nodes[n].engine.is_some() {
            return;
        }
        self.log(|| format!("n{n} restarts"));
        let store = self.nodes[n]
            .parked
            .take()
            .expect("a down node has its store");
        let id = self.nodes[n].id;
        let cfg = engine_config(id, &self.opts, &self.character, n);
        self.nodes[n].engine = Some(Engine::new(cfg, store));
        self.nodes[n].life += 1;
        // The rescan: what is on disk now, then what the store knows that is gone.
        let present: Vec<(String, Meta)> = self.nodes[n]
            .fs
            .iter()
            .map(|(p, node)| (p.clone(), node.meta()))
            .collect();
        for (path, meta) in &present {
            let p = RelPath::new(path.clone()).expect("valid");
            self.feed(
                n,
                Input::LocalChange {
                    path: p,
                    observed: Some(meta.clone()),
                },
            );
        }
        let mut gone: Vec<RelPath> = self.nodes[n]
            .engine
            .as_ref()
            .expect("started")
            .store()
            .entries()
            .filter(|(p, e)| e.local.is_some() && self.nodes[n].fs.get(p.as_str()).is_none())
            .map(|(p, _)| p.clone())
            .collect();
        gone.reverse();
        for p in gone {
            self.feed(
                n,
                Input::LocalChange {
                    path: p,
                    observed: None,
                },
            );
        }
        self.refresh_links_of(n);
    }

    // ---- The workload ----

    fn new_content(&mut self, n: usize) -> Bytes {
        self.content_counter += 1;
        let len = if self.rng.random_bool(0.3) {
            self.rng.random_range(129..400)
        } else {
            self.rng.random_range(0..100)
        };
        let mut data = format!("<n{n}:{}>", self.content_counter).into_bytes();
        data.extend((0..len).map(|_| b'a' + self.rng.random_range(0..26u8)));
        Bytes::from(data)
    }

    /// Reports the current state of a path to the node's engine, as the change logger does.
    fn report(&mut self, n: usize, path: &str) {
        let observed = self.nodes[n].fs.meta(path);
        let p = RelPath::new(path.to_string()).expect("workload paths are valid");
        self.digest.update(path.as_bytes());
        self.log(|| format!("n{n} local {path}: {}", short_meta(&observed)));
        self.feed(n, Input::LocalChange { path: p, observed });
    }

    /// Reports a file whose content a user wrote: from now on that content is owed to every
    /// node (the engine has it; if it is lost, it was lost by replication).
    fn report_written(&mut self, n: usize, path: &str) {
        if let Some(Node::File { hash, .. }) = self.nodes[n].fs.get(path) {
            let hash = *hash;
            self.check.written(hash, n, path);
        }
        self.report(n, path);
    }

    /// A content a user replaced or removed is no longer owed to anyone: design.md's "unless a
    /// later write that had seen it replaced or removed it". (Copies of it elsewhere live on as
    /// their own files; the check simply no longer insists.)
    fn replaced(&mut self, old: Option<Node>) {
        if let Some(Node::File { hash, .. }) = old {
            self.check.replaced(hash);
        }
    }

    fn is_open_at_or_below(&self, n: usize, path: &str) -> bool {
        let prefix = format!("{path}/");
        self.nodes[n]
            .open
            .keys()
            .any(|p| p == path || p.starts_with(&prefix))
    }

    /// mkdir -p of the directories above `path`, each reported (from the nearest one there).
    fn make_parents(&mut self, n: usize, path: &str) -> bool {
        let mut missing: Vec<String> = Vec::new();
        let mut at = path;
        while let Some(i) = at.rfind('/') {
            at = &path[..i];
            match self.nodes[n].fs.get(at) {
                Some(Node::Dir { .. }) => break,
                Some(_) => return false,
                None => missing.push(at.to_string()),
            }
        }
        for dir in missing.into_iter().rev() {
            // The parent is checked; a full disk can still refuse.
            if self.nodes[n].fs.mkdir(&dir, 0o755).is_err() {
                return false;
            }
            self.report(n, &dir);
        }
        true
    }

    /// One random user operation on node `n`.
    fn user_op(&mut self, n: usize) {
        if self.character.modes[n] == Mode::ReceiveOnly {
            // The mount refuses every write with EROFS.
            return;
        }
        if self.character.xattr_rate > 0.0 && self.rng.random_bool(self.character.xattr_rate) {
            let path = if self.rng.random_bool(0.7) {
                self.files[self.rng.random_range(0..self.files.len())].clone()
            } else {
                self.dirs[self.rng.random_range(0..self.dirs.len())].clone()
            };
            self.set_xattrs(n, &path);
            return;
        }
        let pick = self.rng.random_range(0..100);
        let file = self.files[self.rng.random_range(0..self.files.len())].clone();
        let file = file.as_str();
        let dir = self.dirs[self.rng.random_range(0..self.dirs.len())].clone();
        let dir = dir.as_str();
        match pick {
            // Write a whole file, or keep writing into one a process holds open.
            0..=29 => {
                let open = self.nodes[n].open.keys().next().cloned();
                if let Some(path) = open.filter(|_| self.rng.random_bool(0.5)) {
                    let chunk = self.new_content(n);
                    self.write_open(n, &path, &chunk);
                } else {
                    let data = self.new_content(n);
                    let mode = MODES[self.rng.random_range(0..2)];
                    self.write(n, file, &data, mode);
                }
            }
            30..=39 => {
                let chunk = self.new_content(n);
                self.append(n, file, &chunk);
            }
            40..=44 => {
                let len = self.nodes[n].fs.read_file(file).map_or(0, |d| d.len());
                let keep = self.rng.random_range(0..=len);
                self.truncate(n, file, keep);
            }
            45..=54 => {
                self.remove(n, file);
            }
            55..=62 => {
                if self.rng.random_bool(0.7) {
                    let to = self.files[self.rng.random_range(0..self.files.len())].clone();
                    self.rename(n, file, &to);
                } else {
                    let to = self.dirs[self.rng.random_range(0..self.dirs.len())].clone();
                    self.rename(n, dir, &to);
                };
            }
            63..=68 => {
                let mode = MODES[self.rng.random_range(2..4)];
                self.mkdir(n, dir, mode);
            }
            69..=74 => {
                self.rmdir(n, dir);
            }
            75..=81 => {
                let path = if self.rng.random_bool(0.5) { file } else { dir };
                let mode = MODES[self.rng.random_range(0..MODES.len())];
                self.chmod(n, path, mode);
            }
            82..=86 => {
                let target = format!("target-{}", self.rng.random_range(0..3));
                self.symlink(n, file, &target);
            }
            // Open a file for writing and keep it open across other events.
            _ => {
                let data = self.new_content(n);
                if self.open(n, file, &data) {
                    let life = self.nodes[n].life;
                    let close_in = self.rng.random_range(MS..self.character.hold_max_ns);
                    let path = file.to_string();
                    self.schedule(
                        self.time + close_in,
                        Event::Close {
                            node: n,
                            path: path.clone(),
                            life,
                        },
                    );
                    self.schedule(
                        self.time + 50 * MS,
                        Event::DirtyReport {
                            node: n,
                            path,
                            life,
                        },
                    );
                }
            }
        }
    }

    // ---- What users do, each reported as the change logger would ----

    /// Writes a whole file (creating the directories above it); false if the filesystem refused.
    pub fn write(&mut self, n: usize, path: &str, data: &[u8], mode: u32) -> bool {
        if self.is_open_at_or_below(n, path) || !self.make_parents(n, path) {
            return false;
        }
        let now = self.node_time(n) as i64;
        let old = self.nodes[n].fs.get(path).cloned();
        if self.nodes[n]
            .fs
            .write(path, Bytes::copy_from_slice(data), mode, now)
            .is_err()
        {
            return false;
        }
        self.log(|| format!("n{n} user writes {path}"));
        self.replaced(old);
        self.report_written(n, path);
        true
    }

    pub fn append(&mut self, n: usize, path: &str, chunk: &[u8]) -> bool {
        let Some(old) = self.nodes[n].fs.read_file(path) else {
            return false;
        };
        let mut data = old.to_vec();
        data.extend_from_slice(chunk);
        self.write(n, path, &data, 0o644)
    }

    pub fn truncate(&mut self, n: usize, path: &str, keep: usize) -> bool {
        let Some(old) = self.nodes[n].fs.read_file(path) else {
            return false;
        };
        let keep = keep.min(old.len());
        self.write(n, path, &old[..keep], 0o644)
    }

    /// Removes a file or symlink.
    pub fn remove(&mut self, n: usize, path: &str) -> bool {
        if self.is_open_at_or_below(n, path) {
            return false;
        }
        let old = self.nodes[n].fs.get(path).cloned();
        if self.nodes[n].fs.unlink(path).is_err() {
            return false;
        }
        self.log(|| format!("n{n} user removes {path}"));
        self.replaced(old);
        self.report(n, path);
        true
    }

    /// rename(2), reporting the new names first so that receivers find the content under the
    /// old ones.
    pub fn rename(&mut self, n: usize, from: &str, to: &str) -> bool {
        if from == to
            || self.is_open_at_or_below(n, from)
            || self.is_open_at_or_below(n, to)
            || !self.make_parents(n, to)
        {
            return false;
        }
        let moved: Vec<String> = match self.nodes[n].fs.get(from) {
            Some(_) => std::iter::once(from.to_string())
                .chain(self.nodes[n].fs.below(from).map(|(p, _)| p.clone()))
                .collect(),
            None => return false,
        };
        // Paths the move would make too long to replicate: the users here do not make them
        // (a real node leaves them out with a warning).
        if moved
            .iter()
            .any(|p| RelPath::new(format!("{to}{}", &p[from.len()..])).is_err())
        {
            return false;
        }
        let old = self.nodes[n].fs.get(to).cloned();
        if self.nodes[n].fs.rename(from, to).is_err() {
            return false;
        }
        self.log(|| format!("n{n} user renames {from} -> {to}"));
        self.replaced(old);
        for p in &moved {
            let new = format!("{to}{}", &p[from.len()..]);
            self.report(n, &new);
        }
        for p in moved.iter().rev() {
            self.report(n, p);
        }
        true
    }

    pub fn mkdir(&mut self, n: usize, path: &str, mode: u32) -> bool {
        if !self.make_parents(n, path) || self.nodes[n].fs.mkdir(path, mode).is_err() {
            return false;
        }
        self.report(n, path);
        true
    }

    pub fn rmdir(&mut self, n: usize, path: &str) -> bool {
        if self.nodes[n].fs.rmdir(path).is_err() {
            return false;
        }
        self.report(n, path);
        true
    }

    pub fn chmod(&mut self, n: usize, path: &str, mode: u32) -> bool {
        if self.is_open_at_or_below(n, path) || self.nodes[n].fs.chmod(path, mode).is_err() {
            return false;
        }
        self.report(n, path);
        true
    }

    pub fn symlink(&mut self, n: usize, path: &str, target: &str) -> bool {
        if !self.make_parents(n, path) || self.nodes[n].fs.symlink(path, target).is_err() {
            return false;
        }
        self.report(n, path);
        true
    }

    /// A process opens `path` for writing, writes `data` and keeps it open. The create is
    /// reported at once, later content when the writer closes.
    pub fn open(&mut self, n: usize, path: &str, data: &[u8]) -> bool {
        if !self.write(n, path, data, 0o644) {
            return false;
        }
        self.log(|| format!("n{n} user keeps {path} open for writing"));
        self.nodes[n].open.insert(path.to_string(), false);
        true
    }

    /// The process holding `path` open appends to it; nothing is reported yet.
    pub fn write_open(&mut self, n: usize, path: &str, chunk: &[u8]) {
        let Some(old) = self.nodes[n].fs.get(path).cloned() else {
            return;
        };
        let mut data = self.nodes[n]
            .fs
            .read_file(path)
            .unwrap_or_default()
            .to_vec();
        data.extend_from_slice(chunk);
        let now = self.node_time(n) as i64;
        if self.nodes[n]
            .fs
            .write(path, Bytes::from(data), 0o644, now)
            .is_ok()
        {
            self.log(|| format!("n{n} user writes into open {path}"));
            self.nodes[n].open.insert(path.to_string(), true);
            self.replaced(Some(old));
        }
    }

    /// The process holding `path` open closes it.
    pub fn close(&mut self, n: usize, path: &str) {
        let life = self.nodes[n].life;
        self.handle_event(Event::Close {
            node: n,
            path: path.to_string(),
            life,
        });
    }

    /// Sets a random set of extended attributes on `path`, up to the limits of a record.
    pub fn set_xattrs(&mut self, n: usize, path: &str) -> bool {
        use rsyncfs_conflict::limits::{XATTRS_BYTES_MAX, XATTRS_MAX};
        let count = self.rng.random_range(1..=XATTRS_MAX);
        let per = XATTRS_BYTES_MAX / count;
        let value_len = self.rng.random_range(0..per.saturating_sub(12).max(1));
        let marker = self.rng.random_range(0..u32::MAX);
        let xattrs = (0..count)
            .map(|k| {
                let name = format!("user.k{k:03}").into_bytes();
                let mut value = marker.to_be_bytes().to_vec();
                value.resize(value_len.max(4), b'x');
                (name, value)
            })
            .collect();
        if self.is_open_at_or_below(n, path) || self.nodes[n].fs.set_xattrs(path, xattrs).is_err() {
            return false;
        }
        self.log(|| format!("n{n} user sets {count} xattrs on {path}"));
        self.report(n, path);
        true
    }

    /// A big one-off piece of work (see [`Shape`]), reported as the change logger would.
    pub fn shape(&mut self, shape: Shape) {
        match shape {
            Shape::Deep { node, depth } => {
                if self.character.modes[node] == Mode::ReceiveOnly {
                    return;
                }
                self.log(|| format!("n{node} makes a chain {depth} deep"));
                let mut path = String::from("deep");
                let mut made = 0;
                for _ in 0..depth {
                    if !self.mkdir(node, &path, 0o755) {
                        break;
                    }
                    made += 1;
                    if path.len() + 2 > rsyncfs_conflict::limits::DIR_BYTES_MAX {
                        break;
                    }
                    path.push_str("/k");
                }
                // Removed again, deepest first, a little later.
                let at = self.time + self.rng.random_range(MS..500 * MS);
                self.schedule(at, Event::Shape(Shape::Unchain { node, depth: made }));
            }
            Shape::Unchain { node, depth } => {
                self.log(|| format!("n{node} removes a chain {depth} deep"));
                let mut path = String::from("deep");
                for _ in 1..depth {
                    path.push_str("/k");
                }
                // What a user's `rm -r` does: bottom up; whatever the mesh put inside meanwhile
                // stays, and so do the directories above it.
                loop {
                    self.rmdir(node, &path);
                    match path.rfind('/') {
                        Some(i) => path.truncate(i),
                        None => break,
                    }
                }
            }
            Shape::Wide { node, files } => {
                if self.character.modes[node] == Mode::ReceiveOnly {
                    return;
                }
                self.log(|| format!("n{node} makes a directory of {files} files"));
                for i in 0..files {
                    let data = self.new_content(node);
                    if !self.write(node, &format!("wide/f{i:05}"), &data, 0o644) {
                        break;
                    }
                }
                // Half of them go again.
                for i in (0..files).step_by(2) {
                    self.remove(node, &format!("wide/f{i:05}"));
                }
            }
            Shape::Bulk { node, files } => {
                if self.character.modes[node] == Mode::ReceiveOnly {
                    // Its files are its own: a receive-only node ships nothing.
                    return;
                }
                self.log(|| format!("n{node} holds a tree of {files} files before the first sync"));
                for i in 0..files {
                    let data = self.new_content(node);
                    let path = format!("bulk/d{:02}/f{i:05}", i % 50);
                    self.write(node, &path, &data, 0o644);
                }
            }
        }
    }

    // ---- Scripted runs, for tests of particular stories ----

    /// A world without random workload or faults and with a network that neither loses nor
    /// duplicates, for tests that tell one story step by step.
    pub fn scripted(nodes: usize, topology: Topology) -> World {
        World::scripted_with(nodes, topology, Character::calm(nodes))
    }

    /// A scripted world whose nodes run with a character of the test's choosing (modes,
    /// a sibling limit, batch sizes); its faults are the test's to cause.
    pub fn scripted_with(nodes: usize, topology: Topology, character: Character) -> World {
        assert_eq!(character.modes.len(), nodes);
        let mut opts = Options::new(0, nodes);
        opts.topology = topology;
        opts.steps = 0;
        opts.faults = false;
        let mut world = World::new(opts);
        for i in 0..nodes {
            let id = world.nodes[i].id;
            let cfg = engine_config(id, &world.opts, &character, i);
            world.nodes[i].engine = Some(Engine::new(cfg, MemStore::new()));
        }
        world.character = character;
        world.weather = Weather {
            loss: 0.0,
            dup: 0.0,
            delay_max_ns: MS,
        };
        for (a, b) in world.links.keys().copied().collect::<Vec<_>>() {
            world.link_up(a, b);
        }
        world
    }

    /// Runs until nothing is left to happen, or ten simulated seconds passed (an apply waiting
    /// for a local writer to close retries for as long as the file stays open). True when
    /// the mesh went quiet.
    pub fn settle(&mut self) -> bool {
        let limit = self.time + 10_000 * MS;
        while let Some(Reverse(next)) = self.queue.pop() {
            if next.time > limit {
                self.queue.push(Reverse(next));
                return false;
            }
            self.time = next.time;
            self.handle_event(next.event);
        }
        true
    }

    /// The network's character from now on: the chance a message is lost or duplicated, and
    /// the longest usual delay.
    pub fn set_weather(&mut self, loss: f64, dup: f64, delay_max_ns: u64) {
        self.weather = Weather {
            loss,
            dup,
            delay_max_ns,
        };
    }

    /// Runs the end-of-run checks now (every node must be up).
    pub fn check(&mut self) -> Vec<Violation> {
        self.final_checks();
        self.check.take_violations()
    }

    /// Cuts the link between `a` and `b` until [`World::heal`].
    pub fn cut(&mut self, a: usize, b: usize) {
        self.handle_event(Event::Cut {
            link: link_key(a, b),
        });
    }

    pub fn heal(&mut self, a: usize, b: usize) {
        self.handle_event(Event::Heal {
            link: link_key(a, b),
        });
    }

    /// Fills node `n`'s disk (every new content, directory or attribute fails with ENOSPC),
    /// or gives it space again.
    pub fn set_disk_full(&mut self, n: usize, full: bool) {
        self.nodes[n].fs.full = full;
    }

    /// Steps node `n`'s wall clock by `step_ns` (its monotonic clock goes on as before).
    pub fn step_wall_clock(&mut self, n: usize, step_ns: i64) {
        self.nodes[n].offset_ns += step_ns;
    }

    /// Simulated time, in nanoseconds.
    pub fn time_ns(&self) -> u64 {
        self.time
    }

    /// Runs for `ns` of simulated time (or until nothing is left to happen).
    pub fn run_for(&mut self, ns: u64) {
        let limit = self.time + ns;
        while let Some(Reverse(next)) = self.queue.pop() {
            if next.time > limit {
                self.queue.push(Reverse(next));
                break;
            }
            self.time = next.time;
            self.handle_event(next.event);
        }
        self.time = self.time.max(limit);
    }

    /// The most store operations one engine call made so far (the cost invariant's measure).
    pub fn store_ops_max(&self) -> u64 {
        self.store_ops_max
    }

    pub fn crash_node(&mut self, n: usize) {
        self.crash(n);
    }

    pub fn restart_node(&mut self, n: usize) {
        self.restart(n);
    }

    /// Makes every store write so far durable (a group commit on each running node).
    pub fn commit_all(&mut self) {
        for node in &mut self.nodes {
            if let Some(e) = node.engine.as_mut() {
                e.store_mut().commit();
            }
        }
    }

    pub fn fs(&self, n: usize) -> &SimFs {
        &self.nodes[n].fs
    }

    pub fn engine(&self, n: usize) -> &Engine<MemStore> {
        self.nodes[n].engine.as_ref().expect("node is up")
    }

    pub fn stats(&self) -> &RunStats {
        &self.stats
    }

    // ---- The end ----

    fn finish(mut self) -> Outcome {
        if !self.check.failed() {
            self.final_checks();
        }
        for node in &self.nodes {
            for (p, n) in node.fs.iter() {
                self.digest.update(p.as_bytes());
                self.digest.update(format!("{:?}", n.meta()).as_bytes());
            }
        }
        for node in &self.nodes {
            if let Some(e) = &node.engine {
                let s = e.stats();
                self.stats.conflicts += s.conflicts;
            }
        }
        self.stats.records_stored = self.check.records_stored;
        self.stats.final_paths = self.nodes[0].fs.iter().count() as u64;
        self.stats.final_conflict_copies = self.nodes[0]
            .fs
            .iter()
            .filter(|(p, _)| p.contains(".sync-conflict-"))
            .count() as u64;
        self.stats.contents_owed = self.check.owed();
        self.stats.store_ops_max = self.store_ops_max;
        Outcome {
            character: self.character.describe(),
            digest: *self.digest.finalize().as_bytes(),
            violations: self.check.take_violations(),
            trace: self.trace.map(Vec::from).unwrap_or_default(),
            stats: self.stats,
        }
    }

    fn final_checks(&mut self) {
        for (i, node) in self.nodes.iter().enumerate() {
            let engine = node.engine.as_ref().expect("all nodes run at the end");
            if !engine.is_idle() {
                self.check.violate(
                    "liveness",
                    None,
                    format!(
                        "n{i} is not idle at the end, with nothing left to happen: {:?}",
                        engine.pending_paths()
                    ),
                );
            }
            for bug in engine.bugs() {
                self.check
                    .violate("engine invariant", None, format!("n{i}: {bug}"));
            }
            if let Err(e) = engine.check_tally() {
                self.check
                    .violate("store matches filesystem", None, format!("n{i}: {e}"));
            }
            if let Err(e) = engine.check_tree_counts() {
                self.check
                    .violate("engine invariant", None, format!("n{i}: tree counts {e}"));
            }
            // At the end, with every peer up, nothing waits for a peer that is down.
            if engine.is_idle() && !engine.is_idle_here() {
                self.check.violate(
                    "engine invariant",
                    None,
                    format!("n{i} is idle but not idle here"),
                );
            }
            // The engine's view of its own filesystem must be the filesystem.
            for (p, e) in engine.store().entries() {
                let actual = node.fs.meta(p.as_str());
                if e.local != actual {
                    self.check.violate(
                        "store matches filesystem",
                        Some(p.to_string()),
                        format!(
                            "n{i} store says {p} is {} but it is {}",
                            short_meta(&e.local),
                            short_meta(&actual)
                        ),
                    );
                }
            }
            for (p, _) in node.fs.iter() {
                if engine
                    .store()
                    .get(&RelPath::new(p.clone()).expect("valid"))
                    .is_none()
                {
                    self.check.violate(
                        "store matches filesystem",
                        Some(p.clone()),
                        format!("n{i} has {p} on disk but not in its store"),
                    );
                }
            }
            self.check.records_stored += engine.log_end();
        }
        // A send-only node applies nothing of its peers': the others must agree, and hold
        // every write, its writes included.
        let replicas: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.character.modes[i] != Mode::SendOnly)
            .collect();
        // A receive-only node keeps what the mesh never had (files made behind its mount's
        // back, or a conflict copy it made whose record a crash took before it was shipped):
        // it ships nothing of its own, so those are left out of the comparison.
        let own: Vec<SimFs> = replicas
            .iter()
            .map(|&i| {
                let node = &self.nodes[i];
                let mut fs = node.fs.clone();
                if self.character.modes[i] == Mode::ReceiveOnly {
                    let store = node.engine.as_ref().expect("running").store();
                    fs.retain(|p| {
                        RelPath::new(p.to_string())
                            .ok()
                            .and_then(|p| store.get(&p))
                            .is_some_and(|e| e.record.is_some())
                    });
                }
                fs
            })
            .collect();
        let trees: Vec<(usize, &SimFs)> = replicas.iter().copied().zip(own.iter()).collect();
        let stores: Vec<&MemStore> = replicas
            .iter()
            .map(|&i| self.nodes[i].engine.as_ref().expect("running").store())
            .collect();
        self.check.convergence(&trees, &stores);
        self.check.nothing_lost(&trees);
    }
}

fn engine_config(id: NodeId, opts: &Options, character: &Character, index: usize) -> Config {
    let mut cfg = Config::new(id);
    cfg.mode = character.modes[index];
    cfg.siblings_max = character.siblings_max;
    cfg.reconciles_per_call_max = 500;
    cfg.commit_after = Duration::from_millis(5);
    cfg.commit_gap_min = Duration::from_millis(15);
    cfg.inline_bytes_max = SIM_INLINE_BYTES_MAX;
    cfg.batch_records_max = character.batch_records_max;
    cfg.window_batches = 4;
    cfg.resend_after = Duration::from_millis(300);
    cfg.idle_flush_after = Duration::from_millis(20);
    cfg.fetches_max = 4;
    cfg.pending_max = 1000;
    cfg.retry_after = Duration::from_millis(5);
    cfg.seq_block = 64;
    #[cfg(feature = "planted-bugs")]
    {
        cfg.planted_bug = opts.planted_bug;
    }
    let _ = opts;
    cfg
}

/// Hot paths at the limits: a name of 255 bytes at the top, and a chain of directories with
/// names of 250 bytes whose directory part is close to the longest allowed, with files in it.
fn long_paths() -> (Vec<String>, Vec<String>) {
    use rsyncfs_conflict::limits::{DIR_BYTES_MAX, NAME_BYTES_MAX};
    let name = |c: char| c.to_string().repeat(250);
    let mut dir = String::new();
    let mut dirs = Vec::new();
    for c in "lmnopqrstuvwxyz".chars() {
        let next = if dir.is_empty() {
            name(c)
        } else {
            format!("{dir}/{}", name(c))
        };
        if next.len() > DIR_BYTES_MAX {
            break;
        }
        dir = next;
        dirs.push(dir.clone());
    }
    let room = rsyncfs_conflict::limits::PATH_BYTES_MAX - dir.len() - 1;
    let files = vec![
        "N".repeat(NAME_BYTES_MAX),
        format!("{}.txt", "E".repeat(NAME_BYTES_MAX - 4)),
        format!("{dir}/{}", "f".repeat(room.min(NAME_BYTES_MAX))),
        format!("{dir}/g.txt"),
    ];
    (files, dirs)
}

fn topology_edges(t: Topology, n: usize) -> Vec<(usize, usize)> {
    match t {
        Topology::Full => (0..n)
            .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
            .collect(),
        Topology::Line => (1..n).map(|b| (b - 1, b)).collect(),
        Topology::Ring => {
            let mut e: Vec<_> = (1..n).map(|b| (b - 1, b)).collect();
            if n > 2 {
                e.push((0, n - 1));
            }
            e
        }
        Topology::Star => (1..n).map(|b| (0, b)).collect(),
    }
}

fn path_str(p: &RelPath) -> String {
    p.as_str().to_string()
}

fn short_meta(m: &Option<Meta>) -> String {
    use rsyncfs_conflict::Content;
    match m {
        None => "absent".into(),
        Some(m) => match &m.content {
            Content::Tombstone => "tombstone".into(),
            Content::Dir => format!("dir {:o}", m.mode),
            Content::File { size, hash } => {
                format!("file {size}B #{:02x}{:02x} {:o}", hash[0], hash[1], m.mode)
            }
            Content::Symlink { target } => format!("symlink -> {target}"),
        },
    }
}

/// A record's siblings in a few words: `origin:counter=what`, the origin by its first letter.
fn short_siblings(r: &rsyncfs_conflict::Record) -> String {
    let sibs: Vec<String> = r
        .siblings
        .iter()
        .map(|s| {
            format!(
                "{}:{}={}",
                s.dot.node.short().chars().next().unwrap_or('?'),
                s.dot.counter,
                short_meta(&Some(s.meta.clone()))
            )
        })
        .collect();
    sibs.join(", ")
}

fn short_action(a: &rsyncfs_mesh::engine::Action) -> String {
    use rsyncfs_mesh::engine::{Action, Source};
    match a {
        Action::Write { meta, source } => {
            let src = match source {
                Source::Inline(_) => "inline".to_string(),
                Source::Staged(id) => format!("staged {id}"),
                Source::Local(q) => format!("copy of {q}"),
            };
            format!("write {} from {src}", short_meta(&Some(meta.clone())))
        }
        Action::SetAttr { meta } => format!("setattr {}", short_meta(&Some(meta.clone()))),
        Action::Mkdir { meta } => format!("mkdir {:o}", meta.mode),
        Action::Symlink { target, .. } => format!("symlink -> {target}"),
        Action::Remove => "remove".into(),
    }
}

fn describe(m: &Message) -> String {
    match m {
        Message::Hello {
            progress,
            fresh,
            session,
            taken,
        } => {
            format!(
                "Hello({progress}{}, session {session}, taken {taken})",
                if *fresh { ", fresh" } else { "" }
            )
        }
        Message::Welcome { session } => format!("Welcome(session {session})"),
        Message::Ack { progress } => format!("Ack({progress})"),
        Message::Pull { after } => format!("Pull({after})"),
        Message::Batch(b) => {
            let recs: Vec<String> = b
                .records
                .iter()
                .map(|r| format!("{}@{} [{}]", r.path, r.seq, short_siblings(&r.record)))
                .collect();
            format!("Batch({}..{}: {})", b.after, b.upto, recs.join("; "))
        }
    }
}
