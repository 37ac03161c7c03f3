use super::workers::{walk, Job, Workers};
use super::{describe, mode_name, DaemonError, Event};
use crate::control::{self, Request, Response, Status};
use crate::net::{Net, NetEvent};
use crate::store::RedbStore;
use crate::tree::Tree;
use bytes::Bytes;
use rsyncfs_conflict::NodeId;
use rsyncfs_mesh::engine::{
    ApplyError, Engine, FetchError, Input, Mode, Now, Output, Source, StagedId,
};
use rsyncfs_mesh::path::RelPath;
use rsyncfs_mesh::wire;
use rsyncfs_mesh::wire::Message;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// Paths whose failures status lists.
const FAILING_SHOWN_MAX: usize = 10;

/// Events the engine thread takes before it carries outputs out.
const EVENTS_PER_TURN_MAX: usize = 512;

/// A scan's observations queued to the workers at once; the rest wait in the scan, so that
/// the queues hold no second copy of a big tree's paths.
const SCAN_QUEUED_MAX: usize = 16_384;

/// The engine thread's state.
pub(super) struct Core {
    pub(super) engine: Engine<RedbStore>,
    pub(super) tree: Arc<Tree>,
    pub(super) net: Arc<Net>,
    pub(super) workers: Workers,
    /// Fetched contents, staged in the state folder, that the engine may still use: each stays
    /// until the engine releases it or an apply consumes it (the driver contract in
    /// `rsyncfs_mesh::engine`).
    pub(super) staged: HashMap<StagedId, PathBuf>,
    pub(super) next_staged: StagedId,
    /// The path of each apply in flight, and the staged content it consumes if it succeeds.
    pub(super) applies: HashMap<rsyncfs_mesh::engine::OpId, (RelPath, Option<StagedId>)>,
    pub(super) events: mpsc::Sender<Event>,
    /// Where the monotonic clock the engine's timers run on starts.
    pub(super) epoch: Instant,
    pub(super) mode: Mode,
    pub(super) listen: SocketAddr,
    /// Where metrics and the status page are served, if anywhere.
    pub(super) metrics: Option<SocketAddr>,
    pub(super) started: Instant,
    /// Subscribers to the changed-path stream (`chglog`).
    pub(super) chglog: Vec<ChglogReader>,
    /// Where the tree is mounted (a restore writes there, as a local write).
    pub(super) mount: std::path::PathBuf,
    /// The ignore rules' text the tree was last looked at under.
    pub(super) ignore_loaded: String,
    /// The path last passed to them (one change often comes as several events).
    pub(super) chglog_last: Option<RelPath>,
    pub(super) rt: tokio::runtime::Handle,
    /// The scan of the whole tree last started.
    pub(super) scan: Option<Scanning>,
    /// How often the tree is scanned for changes made in the backing directory directly.
    pub(super) scan_every: Option<Duration>,
    /// Paths whose apply failed, logged once until one succeeds.
    pub(super) failed: HashSet<RelPath>,
}

/// A scan of the whole tree: the paths it found and when it started.
pub(super) struct Scanning {
    pub(super) paths: usize,
    pub(super) started: Instant,
    /// The memory it took handed back (see [`Core::trim_after_scan`]).
    pub(super) trimmed: bool,
    /// Its paths not yet queued to the workers (see [`SCAN_QUEUED_MAX`]).
    pub(super) unqueued: VecDeque<RelPath>,
}

impl Core {
    pub(super) async fn run(
        &mut self,
        mut events: mpsc::Receiver<Event>,
    ) -> Result<(), DaemonError> {
        self.rescan();
        self.dispatch()?;
        loop {
            let next_scan = self
                .scan_every
                .zip(self.scan.as_ref())
                .map(|(every, scan)| scan.started + every);
            if next_scan.is_some_and(|at| at <= Instant::now()) && self.observing() == 0 {
                tracing::info!("periodic scan of the backing directory");
                self.rescan();
                self.dispatch()?;
            }
            let deadline = self
                .engine
                .poll_timeout()
                .map(|at| self.instant(at))
                .into_iter()
                .chain(next_scan)
                .min();
            let event = match deadline {
                Some(at) => tokio::time::timeout_at(at.into(), events.recv()).await.ok(),
                None => Some(events.recv().await),
            };
            let mut taken = 0;
            let mut next = event.flatten();
            while let Some(ev) = next.take() {
                if matches!(ev, Event::Stop) {
                    self.commit()?;
                    self.tree.flush_stamps(true);
                    return Ok(());
                }
                self.on_event(ev);
                self.dispatch()?;
                taken += 1;
                if taken < EVENTS_PER_TURN_MAX {
                    next = events.try_recv().ok();
                }
            }
            let now = self.now();
            self.engine.handle_timeout(now);
            self.dispatch()?;
            self.feed_scan();
            self.trim_after_scan();
        }
    }

    /// Paths queued for observation, a scan's not yet queued included.
    fn observing(&self) -> usize {
        self.workers.queued_observations() + self.scan.as_ref().map_or(0, |s| s.unqueued.len())
    }

    /// Queues the scan's next paths as the workers take them.
    fn feed_scan(&mut self) {
        let Some(scan) = self.scan.as_mut() else {
            return;
        };
        let room = SCAN_QUEUED_MAX.saturating_sub(self.workers.scan_queued());
        for p in scan.unqueued.drain(..room.min(scan.unqueued.len())) {
            self.workers.observe(p);
        }
        if scan.unqueued.is_empty() && scan.unqueued.capacity() > 0 {
            scan.unqueued = VecDeque::new();
        }
    }

    /// Once a scan's observations are done, hands the memory its queues of paths took back
    /// to the system. The allocator keeps freed memory for reuse, and a scan of 1,000,000
    /// paths frees about as much as the node then holds.
    fn trim_after_scan(&mut self) {
        let Some(scan) = self.scan.as_mut().filter(|s| !s.trimmed) else {
            return;
        };
        if !scan.unqueued.is_empty() || self.workers.queued_observations() > 0 {
            return;
        }
        scan.trimmed = true;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim takes the allocator's own locks; it only returns free pages.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// The engine's two clocks: monotonic time since the daemon started, and the wall clock.
    fn now(&self) -> Now {
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Now::new(self.epoch.elapsed().as_nanos() as u64, wall)
    }

    /// The instant of a monotonic engine time.
    fn instant(&self, mono_ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(mono_ns)
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Input(input) => {
                match &input {
                    Input::Received { from, message } => {
                        tracing::debug!("received from {}: {}", from.short(), describe(message));
                    }
                    Input::PeerUp { peer } => tracing::debug!("peer {} up", peer.short()),
                    Input::PeerDown { peer } => tracing::debug!("peer {} down", peer.short()),
                    _ => {}
                }
                if let Input::ApplyDone { op, result } = &input {
                    let (path, staged) = self.applies.remove(op).unzip();
                    match result {
                        Ok(()) => {
                            if let Some(path) = &path {
                                if self.failed.remove(path) {
                                    tracing::info!("{path}: applied after earlier failures");
                                }
                            }
                            // A staged content was renamed into place.
                            if let Some(id) = staged.flatten() {
                                self.staged.remove(&id);
                            }
                            if let Some(path) = &path {
                                self.chglog_send(path);
                            }
                        }
                        Err(ApplyError::Io(failure)) => {
                            // Once per path (status lists what keeps failing); retried with a
                            // backoff by the engine.
                            match &path {
                                Some(p) if self.failed.insert(p.clone()) => tracing::warn!(
                                    "{p}: could not apply, will retry until it works: {failure}"
                                ),
                                Some(_) => {}
                                None => tracing::warn!("apply {op} failed, will retry: {failure}"),
                            }
                        }
                        Err(e) => tracing::debug!("apply {op}: {e:?}"),
                    }
                }
                if let Input::LocalChange { path, observed } = &input {
                    tracing::debug!("local {path}: {observed:?}");
                    self.chglog_send(path);
                }
                let now = self.now();
                self.engine.handle(now, input);
            }
            Event::Gone(dir) => {
                let below = self
                    .engine
                    .store()
                    .paths_under(Some(&dir))
                    .unwrap_or_default();
                // Deepest first, so that a directory is seen gone after its contents (as the
                // filesystem changed); all of them share the directory's worker, which keeps
                // this order.
                for p in below.into_iter().rev().chain(std::iter::once(dir)) {
                    self.workers.observe(p);
                }
            }
            Event::Fetched {
                path,
                staged,
                input,
            } => {
                if let Some((id, staged)) = staged {
                    self.staged.insert(id, staged);
                }
                // Once per path (status lists what keeps failing); the engine retries.
                if let Input::FetchDone {
                    result: Err(FetchError::Io(failure)),
                    ..
                } = &input
                {
                    if self.failed.insert(path.clone()) {
                        tracing::warn!(
                            "{path}: could not receive, will retry until it works: {failure}"
                        );
                    }
                }
                let now = self.now();
                self.engine.handle(now, input);
            }
            Event::Inputs(inputs) => {
                for input in inputs {
                    self.on_event(Event::Input(input));
                }
            }
            Event::Rescan => self.rescan(),
            Event::Net(NetEvent::Dial(id)) => self.net.dial_new(id),
            Event::Net(NetEvent::Engine(input)) => self.on_event(Event::Input(input)),
            Event::Control((request, reply)) => self.control(request, reply),
            Event::Stop => {}
        }
    }

    /// The rules file changed (here or by a peer): new patterns take effect at once, and the
    /// whole tree is looked at again, so that what is no longer ignored is shipped.
    fn reload_ignore(&mut self) {
        let text = read_ignore_file(self.tree.root());
        // The engine may hold these rules already (it takes a peer's as it takes the record);
        // what this node has not looked at the tree under yet is what counts here.
        self.engine.set_ignore(&text);
        if text != self.ignore_loaded {
            self.ignore_loaded = text;
            let rules = self.engine.ignore_rules();
            tracing::info!(
                "{}: {} patterns besides the defaults; looking at the whole tree again",
                rsyncfs_mesh::ignore::FILE,
                rules.patterns
            );
            for e in &rules.errors {
                tracing::warn!("{}: {e}", rsyncfs_mesh::ignore::FILE);
            }
            self.rescan();
        }
    }

    /// Observes every path of the tree and every path the store knows.
    fn rescan(&mut self) {
        let started = Instant::now();
        let mut paths = Vec::new();
        walk(self.tree.root(), None, &mut paths);
        let walked = started.elapsed();
        let gone = self.gone(&paths);
        tracing::info!(
            "rescan: {} paths in the tree, {} gone (walked in {:.2} s, merged with the store in {:.2} s)",
            paths.len(),
            gone.len(),
            walked.as_secs_f64(),
            (started.elapsed() - walked).as_secs_f64()
        );
        let mut unqueued = VecDeque::from(paths);
        // Deepest first, as the filesystem lost them.
        unqueued.extend(gone.into_iter().rev());
        self.scan = Some(Scanning {
            paths: unqueued.len(),
            started,
            trimmed: false,
            unqueued,
        });
        self.feed_scan();
    }

    /// The paths the store knows that are not among `found`, in path order: a merge of the
    /// two in order, so that neither list is copied into a set.
    fn gone(&self, found: &[RelPath]) -> Vec<RelPath> {
        let mut sorted: Vec<&str> = found.iter().map(|p| p.as_str()).collect();
        sorted.sort_unstable();
        let mut at = 0;
        let mut gone = Vec::new();
        let visited = self.engine.store().each_path_under(None, |known| {
            while sorted.get(at).is_some_and(|f| *f < known) {
                at += 1;
            }
            if sorted.get(at) != Some(&known) {
                if let Ok(p) = RelPath::new(known.to_string()) {
                    gone.push(p);
                }
            }
        });
        if let Err(e) = visited {
            tracing::warn!("rescan: the store's paths could not be read ({e}); none is seen gone");
        }
        gone
    }

    /// Carries the engine's outputs out.
    fn dispatch(&mut self) -> Result<(), DaemonError> {
        while let Some(out) = self.engine.poll_output() {
            match out {
                Output::Send { to, message } => self.send(to, message),
                Output::Fetch(f) => {
                    let (net, events) = (Arc::clone(&self.net), self.events.clone());
                    let staged_id = self.next_staged;
                    self.next_staged += 1;
                    self.rt.spawn(async move {
                        let (result, staged) = match net.fetch(&f).await {
                            Ok(path) => (Ok(staged_id), Some((staged_id, path))),
                            Err(e) => {
                                tracing::debug!(
                                    "fetch of {} from {}: {e:?}",
                                    f.path,
                                    f.from.short()
                                );
                                (Err(e), None)
                            }
                        };
                        let input = Input::FetchDone { op: f.op, result };
                        let _ = events
                            .send(Event::Fetched {
                                path: f.path.clone(),
                                staged,
                                input,
                            })
                            .await;
                    });
                }
                Output::Apply(apply) => {
                    tracing::debug!(
                        "apply {} {}: {:?} (expecting {:?})",
                        apply.op,
                        apply.path,
                        apply.action,
                        apply.expect
                    );
                    // The staged file stays ours until the apply consumes it or the engine
                    // releases it: a refused apply (a local writer, a full disk) is retried
                    // with the same content.
                    let staged_id = match &apply.action {
                        rsyncfs_mesh::engine::Action::Write {
                            source: Source::Staged(id),
                            ..
                        } => Some(*id),
                        _ => None,
                    };
                    let staged = staged_id.and_then(|id| self.staged.get(&id).cloned());
                    self.applies
                        .insert(apply.op, (apply.path.clone(), staged_id));
                    let path = apply.path.clone();
                    self.workers
                        .send(&path, Job::Apply(Box::new(apply), staged));
                }
                Output::Observe { path } => self.workers.observe(path),
                Output::Release { staged } => {
                    if let Some(path) = self.staged.remove(&staged) {
                        self.tree.release_staged(&path);
                    }
                }
                Output::Commit => self.commit()?,
            }
        }
        Ok(())
    }

    /// Sends a message, with the content of small files attached to a batch's records.
    fn send(&mut self, to: NodeId, mut message: Message) {
        if let Message::Batch(batch) = &mut message {
            let inline_max = self.engine.config().inline_bytes_max;
            for r in &mut batch.records {
                if let Some((hash, size)) = r.record.winner().meta.file_hash() {
                    if size <= inline_max {
                        r.data = self.tree.read_small(&r.path, &hash, size);
                    }
                }
            }
        }
        tracing::debug!("send to {}: {}", to.short(), describe(&message));
        match wire::encode_frame(&message) {
            Ok(frame) => self.net.send(&to, Bytes::from(frame)),
            Err(e) => tracing::error!("not sent to {}: {e}", to.short()),
        }
    }

    /// Passes a changed path to the `chglog` subscribers. One whose queue is full misses it and
    /// is told so (`Lost`) before its next path; one that went away is dropped.
    fn chglog_send(&mut self, path: &RelPath) {
        if path.as_str() == rsyncfs_mesh::ignore::FILE {
            self.reload_ignore();
        }
        if self.chglog.is_empty() || self.chglog_last.as_ref() == Some(path) {
            return;
        }
        self.chglog_last = Some(path.clone());
        let line = path.to_string();
        self.chglog.retain_mut(|reader| reader.send(&line));
    }

    /// Makes the directories the applies changed durable, then the store.
    pub(super) fn commit(&mut self) -> Result<(), DaemonError> {
        self.tree.sync_dirs().map_err(|source| DaemonError::Io {
            what: "syncing the backing directory",
            path: self.tree.root().to_path_buf(),
            source,
        })?;
        let path = self.engine.store().path().to_path_buf();
        self.engine
            .store_mut()
            .commit()
            .map_err(|source| DaemonError::Store { path, source })?;
        self.tree.flush_stamps(false);
        Ok(())
    }

    /// Answers a control request; joins, which may wait an hour for an operator, answer from
    /// a task of their own.
    fn control(&mut self, request: Request, reply: tokio::sync::oneshot::Sender<Response>) {
        let response = match request {
            Request::Status => match serde_json::to_value(self.status()) {
                Ok(v) => Response::Ok(v),
                Err(e) => Response::Err(e.to_string()),
            },
            Request::Conflicts => Response::Ok(self.conflicts()),
            Request::Chglog { tx } => {
                if self.chglog.len() >= control::CHGLOG_SUBSCRIBERS_MAX {
                    Response::Err("too many chglog readers".into())
                } else {
                    self.chglog.push(ChglogReader { tx, lost: false });
                    Response::Ok(serde_json::Value::Null)
                }
            }
            Request::Rescan => {
                self.rescan();
                let paths = self.scan.as_ref().map_or(0, |s| s.paths);
                Response::Ok(serde_json::json!({ "paths": paths }))
            }
            Request::Invite { addr } => {
                let addr = addr.unwrap_or_else(|| reachable(self.listen).to_string());
                Response::Ok(
                    serde_json::json!({ "token": self.net.invite(addr.clone()), "addr": addr }),
                )
            }
            Request::Accept { id } => match self.asking(&id) {
                Err(e) => Response::Err(e),
                Ok(id) => match self.net.accept(id) {
                    Ok(()) => Response::Ok(serde_json::json!({ "accepted": id.long() })),
                    Err(e) => Response::Err(e.to_string()),
                },
            },
            Request::Forget { id } => {
                let peers = self.net.links().into_iter().map(|l| l.id).collect();
                match resolve_id(&id, peers, "peer of this node") {
                    Err(e) => Response::Err(e),
                    Ok(id) => match self.net.forget(id) {
                        Ok(told) => Response::Ok(serde_json::json!({
                            "forgot": id.long(),
                            "told": told,
                        })),
                        Err(e) => Response::Err(e.to_string()),
                    },
                }
            }
            Request::Versions { path } => match (RelPath::new(path.as_str()), self.tree.versions())
            {
                (Err(e), _) => {
                    Response::Err(format!("{path}: {e} (give the path within the tree)"))
                }
                (_, None) => Response::Err(
                    "this node keeps no versions (start it with --keep-versions)".into(),
                ),
                (Ok(p), Some(v)) => match v.list(&p) {
                    Ok(list) => Response::Ok(serde_json::to_value(list).expect("serialising")),
                    Err(e) => Response::Err(format!("versions of {p}: {e}")),
                },
            },
            Request::Restore { path, version } => {
                let rel = match RelPath::new(path.as_str()) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = reply.send(Response::Err(format!(
                            "{path}: {e} (give the path within the tree)"
                        )));
                        return;
                    }
                };
                let (tree, mount) = (Arc::clone(&self.tree), self.mount.clone());
                self.rt.spawn_blocking(move || {
                    let response = match restore(&tree, &mount, &rel, version.as_deref()) {
                        Ok(bytes) => Response::Ok(
                            serde_json::json!({ "restored": rel.as_str(), "bytes": bytes }),
                        ),
                        Err(e) => Response::Err(e),
                    };
                    let _ = reply.send(response);
                });
                return;
            }
            Request::Revoke { token } => match self.net.revoke(token.as_deref()) {
                Ok(n) => Response::Ok(serde_json::json!({ "revoked": n })),
                Err(e) => Response::Err(e.to_string()),
            },
            Request::Leave => {
                let net = Arc::clone(&self.net);
                self.rt.spawn(async move {
                    let response = match net.leave().await {
                        Ok(told) => Response::Ok(serde_json::json!({ "told": told })),
                        Err(e) => Response::Err(e.to_string()),
                    };
                    let _ = reply.send(response);
                });
                return;
            }
            Request::Join { peer, token } => {
                let net = Arc::clone(&self.net);
                self.rt.spawn(async move {
                    let response = match net.join(peer, token).await {
                        Ok(member) => Response::Ok(serde_json::json!({ "member": member.long() })),
                        Err(e) => Response::Err(e.to_string()),
                    };
                    let _ = reply.send(response);
                });
                return;
            }
        };
        let _ = reply.send(response);
    }

    /// The node that asked to join named by `text` (long id, or the start of it).
    fn asking(&self, text: &str) -> Result<NodeId, String> {
        let asking = self
            .net
            .pending_joins()
            .into_iter()
            .map(|(long, ..)| long)
            .collect();
        resolve_id(text, asking, "node asking to join")
    }

    fn caches(&self) -> Vec<control::CacheStatus> {
        let cache = |name: &str, bytes: usize, budget: usize| control::CacheStatus {
            name: name.to_string(),
            bytes: bytes as u64,
            budget_bytes: budget as u64,
        };
        let (inline, inline_max) = self.engine.cache_bytes();
        let mut caches = vec![cache("engine's small contents", inline, inline_max)];
        caches.extend(
            self.engine
                .store()
                .caches()
                .into_iter()
                .map(|(name, bytes, budget)| cache(name, bytes, budget)),
        );
        caches.extend(self.tree.caches());
        caches
    }

    fn status(&self) -> Status {
        let engine_peers: HashMap<NodeId, rsyncfs_mesh::engine::PeerStatus> = self
            .engine
            .peer_status()
            .into_iter()
            .map(|p| (p.peer, p))
            .collect();
        let log_end = self.engine.log_end();
        let peers = self
            .net
            .links()
            .into_iter()
            .map(|l| {
                let id = NodeId::parse(&l.id);
                let e = id.and_then(|id| engine_peers.get(&id));
                control::PeerStatus {
                    id: l.id,
                    addr: l.addr,
                    last_seen_ms: l.last_seen_ms,
                    connected: l.connected,
                    connected_for_s: l.connected_for_s,
                    rtt_ms: l.rtt_ms,
                    mtu: l.mtu,
                    lost_packets: l.lost_packets,
                    black_holes: l.black_holes,
                    behind: e.map(|e| log_end.saturating_sub(e.acked)),
                    their_records_applied: e.map(|e| e.applied),
                    paths_pending_from_them: e.map(|e| e.held),
                    their_files: e.map(|e| e.their_tree.files),
                    their_bytes: e.map(|e| e.their_tree.bytes),
                }
            })
            .collect();
        let mut sorted: Vec<f64> = self.engine.latencies_ms().iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * q).round() as usize])
        };
        let stats = self.engine.stats();
        let c = &self.net.counters;
        let (udp_rx, udp_tx) = self.net.udp_bytes();
        let work = self.engine.pending_work();
        let counts = self.engine.tree_counts();
        let observing = self.observing();
        let scanning = self
            .scan
            .as_ref()
            .filter(|_| observing > 0)
            .map(|scan| control::Scan {
                paths: scan.paths,
                left: observing.min(scan.paths),
                for_s: scan.started.elapsed().as_secs(),
            });
        Status {
            node: self.net.id().long(),
            short: self.net.id().short(),
            mode: mode_name(self.mode).to_string(),
            listen: self.listen.to_string(),
            metrics: self.metrics.map(|a| a.to_string()),
            up_s: self.started.elapsed().as_secs(),
            idle: self.engine.is_idle_here() && observing == 0,
            busy_because: {
                let mut why = self.engine.busy_reasons();
                if observing > 0 {
                    why.push(format!("{observing} paths to observe"));
                }
                why
            },
            pending_paths: work.paths,
            pending_bytes: work.bytes,
            waiting_paths: work.waiting_paths,
            waiting_bytes: work.waiting_bytes,
            observing,
            scanning,
            files: counts.files,
            bytes: counts.bytes,
            other_entries: counts.others,
            failing: self
                .engine
                .failing(FAILING_SHOWN_MAX)
                .into_iter()
                .map(|(path, failure, retries)| control::Failing {
                    path: path.to_string(),
                    error: failure.to_string(),
                    retries,
                })
                .collect(),
            peers,
            pending_joins: self
                .net
                .pending_joins()
                .into_iter()
                .map(|(id, addr, waiting_s)| control::PendingJoinStatus {
                    id,
                    addr,
                    waiting_s,
                })
                .collect(),
            conflicts: counts.conflict_copies,
            conflicts_settled_here: stats.conflicts,
            caught_up: stats.caught_up,
            local_writes: stats.local_writes,
            applies: stats.applies,
            records_sent: stats.records_sent,
            records_received: stats.records_received,
            fetched_bytes: c.fetched_bytes.load(Ordering::Relaxed),
            served_bytes: c.served_bytes.load(Ordering::Relaxed),
            preseeded_bytes: c.preseeded_bytes.load(Ordering::Relaxed),
            preseed_pushed_bytes: c.preseed_pushed_bytes.load(Ordering::Relaxed),
            frames_dropped: c.frames_dropped.load(Ordering::Relaxed),
            udp_rx_bytes: udp_rx,
            udp_tx_bytes: udp_tx,
            latency_ms: control::Latency {
                count: sorted.len(),
                p50: pct(0.5),
                p99: pct(0.99),
                max: sorted.last().copied(),
            },
            ignore: control::IgnoreStatus {
                patterns: self.engine.ignore_rules().patterns,
                errors: self.engine.ignore_rules().errors.clone(),
                ignored_local: stats.ignored_local,
                ignored_remote: stats.ignored_remote,
            },
            latency_histogram: {
                let h = self.engine.latency_histogram();
                control::Histogram {
                    bounds_ms: rsyncfs_mesh::engine::LATENCY_BOUNDS_MS.to_vec(),
                    counts: h.counts.to_vec(),
                    sum_ms: h.sum_ms,
                    count: h.count,
                }
            },
            recent_conflicts: self
                .engine
                .recent_conflicts()
                .iter()
                .map(|(path, at_ms)| control::RecentConflict {
                    path: path.to_string(),
                    at_ms: *at_ms,
                })
                .collect(),
            bugs: self.engine.bugs().to_vec(),
            caches: self.caches(),
        }
    }

    /// The conflict copies the tree holds, with the versions they keep.
    fn conflicts(&self) -> serde_json::Value {
        let entries = self.engine.store().entries().unwrap_or_default();
        let copies: Vec<serde_json::Value> = entries
            .iter()
            .filter(|(p, _)| p.name().contains(".sync-conflict-"))
            .filter_map(|(p, e)| {
                let record = e.record.as_ref()?;
                let w = record.winner();
                Some(serde_json::json!({
                    "path": p.to_string(),
                    "of": original_name(p.as_str()),
                    "origin": w.dot.node.short(),
                    "written_at_ms": w.hlc.get_time().to_duration().as_millis() as u64,
                    "live": record.is_live(),
                }))
            })
            .collect();
        serde_json::Value::Array(copies)
    }
}

/// The path a conflict copy was made for: `a/b.sync-conflict-…-N.txt` → `a/b.txt`.
fn original_name(copy: &str) -> String {
    let Some(i) = copy.find(".sync-conflict-") else {
        return copy.to_string();
    };
    let rest = &copy[i + ".sync-conflict-".len()..];
    let ext = rest.find('.').map(|j| &rest[j..]).unwrap_or("");
    format!("{}{}", &copy[..i], ext)
}

/// An address of this host that peers can dial for a node listening on `listen`: `listen`
/// itself unless it is a wildcard, else the first address of an interface that is up, of the
/// same family, preferring addresses other than loopback and link-local ones.
pub(crate) fn reachable(listen: SocketAddr) -> SocketAddr {
    if !listen.ip().is_unspecified() {
        return listen;
    }
    let rank = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) if v4.is_loopback() => 2,
        IpAddr::V4(v4) if v4.is_link_local() => 1,
        IpAddr::V6(v6) if v6.is_loopback() => 2,
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => 1,
        _ => 0,
    };
    let mut found: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| ip.is_ipv4() == listen.is_ipv4())
        .collect();
    found.sort_by_key(rank);
    let ip = found.first().copied().unwrap_or(if listen.is_ipv4() {
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
    });
    SocketAddr::new(ip, listen.port())
}

/// A `chglog` reader: its queue, and whether it missed paths it has not been told of yet.
pub(super) struct ChglogReader {
    tx: mpsc::Sender<control::Changed>,
    lost: bool,
}

impl ChglogReader {
    /// Queues `path` (after the news of a loss, if any); `false` once the reader is gone.
    fn send(&mut self, path: &str) -> bool {
        use mpsc::error::TrySendError;
        if self.lost {
            match self.tx.try_send(control::Changed::Lost) {
                Ok(()) => self.lost = false,
                Err(TrySendError::Full(_)) => return true,
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        match self.tx.try_send(control::Changed::Path(path.to_string())) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.lost = true;
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

/// The node `text` names among `candidates` (long ids): its long id, or the first characters
/// of it (the short id `status` and the logs show) where they name one of them.
fn resolve_id(text: &str, candidates: Vec<String>, what: &str) -> Result<NodeId, String> {
    if let Some(id) = NodeId::parse(text) {
        return Ok(id);
    }
    let compact = |t: &str| -> String {
        t.chars()
            .filter(|c| *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect()
    };
    let wanted = compact(text);
    if wanted.len() < 4 {
        return Err(format!(
            "{text} is not a node id (give the id `status` shows, at least 4 characters)"
        ));
    }
    let matching: Vec<NodeId> = candidates
        .iter()
        .filter(|long| compact(long).starts_with(&wanted))
        .filter_map(|long| NodeId::parse(long))
        .collect();
    match matching.as_slice() {
        [id] => Ok(*id),
        [] => Err(format!("no {what} has an id starting with {text}")),
        _ => Err(format!(
            "{} of them ({what}) have ids starting with {text}: give more of it",
            matching.len()
        )),
    }
}

/// The text of the tree's ignore rules (`.rsyncfsignore` at the backing directory's root), at
/// most [`rsyncfs_mesh::ignore::FILE_BYTES_MAX`] bytes of it; empty where there is none or it
/// cannot be read (a symlink is not followed; the failure is logged).
pub(super) fn read_ignore_file(backing: &std::path::Path) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path = backing.join(rsyncfs_mesh::ignore::FILE);
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path);
    let mut bytes = Vec::new();
    let read = opened.and_then(|f| {
        f.take(rsyncfs_mesh::ignore::FILE_BYTES_MAX as u64 + 1)
            .read_to_end(&mut bytes)
    });
    match read {
        Ok(_) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            tracing::warn!(
                "{}: {e}; only the default ignore patterns hold",
                path.display()
            );
            String::new()
        }
    }
}

/// Writes a kept version of `path` back through the mount at `mount` (a local write, which
/// replicates); returns its bytes.
fn restore(
    tree: &Tree,
    mount: &std::path::Path,
    path: &RelPath,
    version: Option<&str>,
) -> Result<u64, String> {
    let versions = tree
        .versions()
        .ok_or("this node keeps no versions (start it with --keep-versions)")?;
    let mut from = versions
        .open_version(path, version)
        .map_err(|e| e.to_string())?;
    let target = mount.join(path.as_str());
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let mut to =
        std::fs::File::create(&target).map_err(|e| format!("{}: {e}", target.display()))?;
    let bytes =
        std::io::copy(&mut from, &mut to).map_err(|e| format!("{}: {e}", target.display()))?;
    to.sync_all()
        .map_err(|e| format!("{}: {e}", target.display()))?;
    Ok(bytes)
}
