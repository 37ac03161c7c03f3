//! The daemon: the change logger, the engine and its store, the workers that touch the backing
//! directory, and the transport, wired together.
//!
//! Threads and tasks:
//! - the **engine thread** owns the engine and the redb store. It takes [`Event`]s from one
//!   bounded queue, feeds them to the engine, carries the engine's outputs out, and commits the
//!   store in groups (after making the directories it changed durable);
//! - the **logger bridge** turns the mount's change stream into observations;
//! - **workers** observe paths (stat and hash) and carry out applies, each worker owning a
//!   share of the paths, so that everything about one path happens in order;
//! - **tokio tasks** run the QUIC endpoint, one reader and writer per peer, content transfers
//!   and the control socket.

use crate::control::{self, Request, Response};
use crate::files::{rel_path, Prepared, Tree};
use crate::identity::Identity;
use crate::peers::Book;
use crate::store::RedbStore;
use crate::transport::Net;
use bytes::Bytes;
use rsyncfs_conflict::NodeId;
use rsyncfs_logger::{Change, ChangeKind, Mounted};
use rsyncfs_mesh::engine::{
    Apply, ApplyError, Config, Engine, FetchError, Input, Mode, Now, Output, Source, StagedId,
};
use rsyncfs_mesh::path::RelPath;

use rsyncfs_mesh::wire::{self, Message};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// The mount as the applies see it.
impl crate::files::Mount for Mounted {
    fn busy(&self, path: &RelPath) -> bool {
        self.is_open_for_writing(Path::new(path.as_str()))
    }

    fn exclusive(&self, f: &mut dyn FnMut()) {
        Mounted::exclusive(self, f)
    }
}

/// Events queued for the engine thread.
const EVENTS_QUEUED_MAX: usize = 4096;
/// Observations queued for the workers by the logger bridge before it waits.
const OBSERVES_QUEUED_MAX: usize = 20_000;
/// Workers that observe and apply.
const WORKERS: usize = 4;
/// Jobs a worker takes at once (the applies among them share one sync).
const JOBS_PER_TURN_MAX: usize = 128;
/// Events the engine thread takes before it carries outputs out.
const EVENTS_PER_TURN_MAX: usize = 512;

/// Something for the engine thread.
pub enum Event {
    Input(Input),
    /// Everything the store knows at or below this path is to be observed again (a directory
    /// moved away or removed).
    Gone(RelPath),
    /// The change stream overflowed: observe everything.
    Rescan,
    /// Dial a newly trusted peer.
    Dial(NodeId),
    /// A fetch ended; its content, when it came, is staged at this path.
    Fetched {
        staged: Option<(StagedId, PathBuf)>,
        input: Input,
    },
    Control(Request, oneshot::Sender<Response>),
    /// Stop: commit and return.
    Stop,
}

/// What `up` is told.
pub struct Options {
    pub state: PathBuf,
    pub backing: PathBuf,
    pub mount: PathBuf,
    pub listen: SocketAddr,
    pub mode: Mode,
    /// Trust the members that trusted peers introduce.
    pub introductions: bool,
}

/// One job for a worker.
enum Job {
    /// Observe a path; `true` when the logger bridge queued it (and counts it).
    Observe(RelPath, bool),
    WriterClosed(RelPath),
    Apply(Box<Apply>, Option<PathBuf>),
    /// End the worker (the bridge may still hold a way to its queue).
    Stop,
}

/// The workers, each owning the paths that hash to it. Observations are not merged: their
/// order is the filesystem's, which the engine relies on.
struct Workers {
    queues: Vec<std::sync::mpsc::Sender<Job>>,
    /// Observations queued by the logger bridge and not done yet.
    observes: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start(
        tree: Arc<Tree>,
        mounted: Arc<Mounted>,
        events: mpsc::Sender<Event>,
        rt: tokio::runtime::Handle,
    ) -> std::io::Result<Workers> {
        let mut queues = Vec::new();
        let mut threads = Vec::new();
        let observes = Arc::new(AtomicUsize::new(0));
        for i in 0..WORKERS {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let (tree, mounted, events, observes2, rt) = (
                Arc::clone(&tree),
                Arc::clone(&mounted),
                events.clone(),
                Arc::clone(&observes),
                rt.clone(),
            );
            let thread = std::thread::Builder::new()
                .name(format!("rsyncfs-worker-{i}"))
                .spawn(move || {
                    let _guard = rt.enter();
                    while let Ok(first) = rx.recv() {
                        // Take what is queued (in order), so that the applies among it share
                        // one sync of their contents.
                        let mut jobs = vec![first];
                        while jobs.len() < JOBS_PER_TURN_MAX {
                            match rx.try_recv() {
                                Ok(job) => jobs.push(job),
                                Err(_) => break,
                            }
                        }
                        let mut prepared: Vec<Option<Result<Prepared, ApplyError>>> = jobs
                            .iter()
                            .map(|job| match job {
                                Job::Apply(apply, staged) => {
                                    Some(tree.prepare(apply, staged.as_deref()))
                                }
                                _ => None,
                            })
                            .collect();
                        let durable = {
                            let ok: Vec<&Prepared> = prepared
                                .iter()
                                .filter_map(|p| p.as_ref().and_then(|r| r.as_ref().ok()))
                                .collect();
                            tree.make_durable(&ok)
                        };
                        let mut stop = false;
                        for (job, prep) in jobs.into_iter().zip(prepared.iter_mut()) {
                            let input = match job {
                                Job::Observe(path, counted) => {
                                    if counted {
                                        observes2.fetch_sub(1, Ordering::Relaxed);
                                    }
                                    match tree.observe(&path) {
                                        Ok(observed) => Input::LocalChange { path, observed },
                                        Err(e) => {
                                            tracing::warn!("{e}");
                                            continue;
                                        }
                                    }
                                }
                                Job::WriterClosed(path) => Input::WriterClosed { path },
                                Job::Stop => {
                                    stop = true;
                                    break;
                                }
                                Job::Apply(apply, _) => {
                                    let result = match (prep.take().expect("prepared"), &durable) {
                                        (Ok(p), Ok(())) => tree.commit(&apply, p, &*mounted),
                                        (Ok(p), Err(e)) => {
                                            tree.discard(&apply, p);
                                            Err(ApplyError::Io(crate::files::io_failure(
                                                apply.path.as_str(),
                                                e,
                                            )))
                                        }
                                        (Err(e), _) => Err(e),
                                    };
                                    if result.is_ok() {
                                        mounted.invalidate(Path::new(apply.path.as_str()));
                                    }
                                    Input::ApplyDone {
                                        op: apply.op,
                                        result,
                                    }
                                }
                            };
                            if events.blocking_send(Event::Input(input)).is_err() {
                                stop = true;
                                break;
                            }
                        }
                        if stop {
                            break;
                        }
                    }
                })?;
            queues.push(tx);
            threads.push(thread);
        }
        Ok(Workers {
            queues,
            observes,
            threads,
        })
    }

    /// The worker of a path: chosen by its first component, so that a path and every
    /// directory above it are handled by one worker, in order (a child's apply never makes a
    /// parent behind the parent's own apply, and a directory is observed before what is in it).
    fn shard(path: &RelPath) -> usize {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        path.components().next().unwrap_or("").hash(&mut h);
        (h.finish() % WORKERS as u64) as usize
    }

    fn observe(&self, path: RelPath) {
        let _ = self.queues[Self::shard(&path)].send(Job::Observe(path, false));
    }

    fn send(&self, path: &RelPath, job: Job) {
        let _ = self.queues[Self::shard(path)].send(job);
    }

    fn handle(&self) -> WorkersHandle {
        WorkersHandle {
            queues: self.queues.clone(),
            observes: Arc::clone(&self.observes),
        }
    }

    fn stop(self) {
        for q in &self.queues {
            let _ = q.send(Job::Stop);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// The logger bridge's way to the workers.
struct WorkersHandle {
    queues: Vec<std::sync::mpsc::Sender<Job>>,
    observes: Arc<AtomicUsize>,
}

impl WorkersHandle {
    fn observe(&self, path: RelPath) {
        // Bounded: wait while the workers are far behind.
        while self.observes.load(Ordering::Relaxed) >= OBSERVES_QUEUED_MAX {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.observes.fetch_add(1, Ordering::Relaxed);
        let _ = self.queues[Workers::shard(&path)].send(Job::Observe(path, true));
    }

    fn writer_closed(&self, path: RelPath) {
        let _ = self.queues[Workers::shard(&path)].send(Job::WriterClosed(path));
    }
}

/// Every path below `dir` in the backing tree (depth first, parents before children).
fn walk(root: &Path, dir: Option<&RelPath>, out: &mut Vec<RelPath>) {
    let start = match dir {
        Some(d) => root.join(d.as_str()),
        None => root.to_path_buf(),
    };
    let mut stack = vec![(start, dir.cloned())];
    while let Some((abs, rel)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&abs) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let child_rel = match &rel {
                Some(r) => Path::new(r.as_str()).join(&name),
                None => PathBuf::from(&name),
            };
            let Some(child) = rel_path(&child_rel) else {
                if rel.is_some() || name != rsyncfs_logger::STATE_DIR_NAME {
                    tracing::warn!(
                        "{}: name not replicated (not UTF-8 or not allowed)",
                        child_rel.display()
                    );
                }
                continue;
            };
            out.push(child.clone());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((entry.path(), Some(child)));
            }
        }
    }
}

/// Runs the node until `stop` is set; unmounts and closes cleanly.
pub fn run(opts: Options, stop: Arc<AtomicBool>) -> Result<(), String> {
    std::fs::create_dir_all(&opts.state)
        .map_err(|e| format!("state directory {}: {e}", opts.state.display()))?;
    std::fs::set_permissions(
        &opts.state,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(|e| format!("state directory {}: {e}", opts.state.display()))?;
    let identity =
        Arc::new(Identity::load_or_create(&opts.state).map_err(|e| format!("identity: {e}"))?);
    let book = Book::load(&opts.state).map_err(|e| format!("peers: {e}"))?;
    let store = RedbStore::open(&opts.state.join("store.redb"))
        .map_err(|e| format!("store {}: {e}", opts.state.join("store.redb").display()))?;
    let tree = Arc::new(
        Tree::open(&opts.backing)
            .map_err(|e| format!("backing directory {}: {e}", opts.backing.display()))?,
    );
    let logger_mode = match opts.mode {
        Mode::ReceiveOnly => rsyncfs_logger::Mode::ReceiveOnly,
        _ => rsyncfs_logger::Mode::ReadWrite,
    };
    let mounted = rsyncfs_logger::mount(&opts.backing, &opts.mount, logger_mode)
        .map_err(|e| e.to_string())?;
    let changes = mounted
        .take_changes()
        .expect("a fresh mount has its changes");
    let mounted = Arc::new(mounted);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("rsyncfs-io")
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let (events_tx, events_rx) = mpsc::channel(EVENTS_QUEUED_MAX);
    let net = {
        let _guard = rt.enter();
        Net::start(
            Arc::clone(&identity),
            opts.listen,
            book,
            events_tx.clone(),
            Arc::clone(&tree),
            opts.introductions,
        )
        .map_err(|e| format!("listening on {}: {e}", opts.listen))?
    };
    let listen = net.local_addr().map_err(|e| e.to_string())?;
    control::set_net(Arc::clone(&net));
    let workers = Workers::start(
        Arc::clone(&tree),
        Arc::clone(&mounted),
        events_tx.clone(),
        rt.handle().clone(),
    )
    .map_err(|e| format!("workers: {e}"))?;
    let control_path = opts.state.join(control::SOCKET);
    {
        let _guard = rt.enter();
        control::serve(&control_path, events_tx.clone())
            .map_err(|e| format!("control socket {}: {e}", control_path.display()))?;
    }
    eprintln!(
        "rsyncfs-node {} ({}) serving {} at {}, listening on {listen} ({})",
        identity.id.short(),
        mode_name(opts.mode),
        opts.backing.display(),
        opts.mount.display(),
        if mounted.passthrough() {
            "kernel FUSE passthrough"
        } else {
            "ordinary FUSE I/O"
        }
    );
    tracing::info!("node id {}", identity.id.long());

    // The logger bridge.
    let bridge = {
        let (handle, events, root) = (
            workers.handle(),
            events_tx.clone(),
            tree.root().to_path_buf(),
        );
        std::thread::Builder::new()
            .name("rsyncfs-bridge".into())
            .spawn(move || bridge(changes, handle, events, root))
            .map_err(|e| format!("bridge: {e}"))?
    };

    // Signals end the run through the same queue.
    {
        let (stop, events) = (Arc::clone(&stop), events_tx.clone());
        rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = events.send(Event::Stop).await;
        });
    }

    let mut cfg = Config::new(identity.id);
    cfg.mode = opts.mode;
    let engine = Engine::new(cfg, store);
    let mut core = Core {
        engine,
        tree: Arc::clone(&tree),
        net: Arc::clone(&net),
        workers,
        staged: HashMap::new(),
        next_staged: 1,
        applies: HashMap::new(),
        events: events_tx.clone(),
        epoch: Instant::now(),
        mode: opts.mode,
        listen,
        started: Instant::now(),
        chglog: Vec::new(),
        chglog_last: None,
        rt: rt.handle().clone(),
    };
    let result = rt.block_on(core.run(events_rx));
    let Core { workers, .. } = core;
    workers.stop();
    rt.block_on(net.shutdown());
    drop(events_tx);
    let _ = std::fs::remove_file(&control_path);
    // The bridge ends when the mount's change stream does.
    let unmounted = match Arc::try_unwrap(mounted) {
        Ok(m) => m.unmount().map_err(|e| format!("unmounting: {e}")),
        Err(_) => Err("unmounting: the mount is still in use".to_string()),
    };
    let _ = bridge.join();
    rt.shutdown_timeout(Duration::from_secs(2));
    result.and(unmounted)
}

/// A message in a few words, for debug logs.
pub fn describe(message: &Message) -> String {
    match message {
        Message::Hello {
            progress,
            fresh,
            session,
        } => format!("hello {progress} fresh {fresh} session {session}"),
        Message::Welcome { session } => format!("welcome {session}"),
        Message::Batch(b) => format!("batch ({}, {}] of {}", b.after, b.upto, b.records.len()),
        Message::Ack { progress } => format!("ack {progress}"),
        Message::Pull { after } => format!("pull after {after}"),
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::TwoWay => "two-way",
        Mode::SendOnly => "send-only",
        Mode::ReceiveOnly => "receive-only",
    }
}

/// Turns the mount's changes into observations (and, for what the store must expand, events).
fn bridge(
    changes: std::sync::mpsc::Receiver<Change>,
    workers: WorkersHandle,
    events: mpsc::Sender<Event>,
    root: PathBuf,
) {
    for change in changes {
        if change.kind == ChangeKind::Overflow {
            tracing::warn!("the change stream overflowed: rescanning");
            let _ = events.blocking_send(Event::Rescan);
            continue;
        }
        let Some(path) = rel_path(&change.path) else {
            tracing::warn!(
                "{}: name not replicated (not UTF-8 or not allowed)",
                change.path.display()
            );
            continue;
        };
        match change.kind {
            ChangeKind::Written => {
                workers.observe(path.clone());
                workers.writer_closed(path);
            }
            ChangeKind::RenamedTo { to } => {
                if let Some(to) = rel_path(&to) {
                    workers.observe(to.clone());
                    let mut below = Vec::new();
                    walk(&root, Some(&to), &mut below);
                    for p in below {
                        workers.observe(p);
                    }
                }
                let _ = events.blocking_send(Event::Gone(path));
            }
            // rmdir removes only empty directories: what was below was reported gone first.
            ChangeKind::DirRemoved => workers.observe(path),
            _ => workers.observe(path),
        }
    }
}

/// The engine thread's state.
struct Core {
    engine: Engine<RedbStore>,
    tree: Arc<Tree>,
    net: Arc<Net>,
    workers: Workers,
    /// Fetched contents, staged in the state folder, that the engine may still use: each stays
    /// until the engine releases it or an apply consumes it (the driver contract in
    /// `rsyncfs_mesh::engine`).
    staged: HashMap<StagedId, PathBuf>,
    next_staged: StagedId,
    /// The path of each apply in flight, and the staged content it consumes if it succeeds.
    applies: HashMap<rsyncfs_mesh::engine::OpId, (RelPath, Option<StagedId>)>,
    events: mpsc::Sender<Event>,
    /// Where the monotonic clock the engine's timers run on starts.
    epoch: Instant,
    mode: Mode,
    listen: SocketAddr,
    started: Instant,
    /// Subscribers to the changed-path stream (`chglog`).
    chglog: Vec<mpsc::Sender<String>>,
    /// The path last passed to them (one change often comes as several events).
    chglog_last: Option<RelPath>,
    rt: tokio::runtime::Handle,
}

impl Core {
    async fn run(&mut self, mut events: mpsc::Receiver<Event>) -> Result<(), String> {
        self.rescan();
        self.dispatch()?;
        loop {
            let deadline = self.engine.poll_timeout().map(|at| self.instant(at));
            let event = match deadline {
                Some(at) => tokio::time::timeout_at(at.into(), events.recv()).await.ok(),
                None => Some(events.recv().await),
            };
            let mut taken = 0;
            let mut next = event.flatten();
            while let Some(ev) = next.take() {
                if matches!(ev, Event::Stop) {
                    self.commit()?;
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
                            // A staged content was renamed into place.
                            if let Some(id) = staged.flatten() {
                                self.staged.remove(&id);
                            }
                            if let Some(path) = &path {
                                self.chglog_send(path);
                            }
                        }
                        Err(ApplyError::Io(failure)) => {
                            tracing::warn!("apply {op} failed, will retry: {failure}")
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
            Event::Fetched { staged, input } => {
                if let Some((id, path)) = staged {
                    self.staged.insert(id, path);
                }
                if let Input::FetchDone {
                    result: Err(FetchError::Io(failure)),
                    ..
                } = &input
                {
                    tracing::warn!("a fetch failed here, will retry: {failure}");
                }
                let now = self.now();
                self.engine.handle(now, input);
            }
            Event::Rescan => self.rescan(),
            Event::Dial(id) => self.net.dial_new(id),
            Event::Control(request, reply) => {
                let response = self.control(request);
                let _ = reply.send(response);
            }
            Event::Stop => {}
        }
    }

    /// Observes every path of the tree and every path the store knows.
    fn rescan(&mut self) {
        let mut paths = Vec::new();
        walk(self.tree.root(), None, &mut paths);
        let known = self.engine.store().paths_under(None).unwrap_or_default();
        let seen: HashSet<&RelPath> = paths.iter().collect();
        let gone: Vec<RelPath> = known.into_iter().filter(|p| !seen.contains(p)).collect();
        tracing::info!(
            "rescan: {} paths in the tree, {} gone",
            paths.len(),
            gone.len()
        );
        for p in paths {
            self.workers.observe(p);
        }
        for p in gone.into_iter().rev() {
            self.workers.observe(p);
        }
    }

    /// Carries the engine's outputs out.
    fn dispatch(&mut self) -> Result<(), String> {
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
                        let _ = events.send(Event::Fetched { staged, input }).await;
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
                        let _ = std::fs::remove_file(path);
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

    /// Passes a changed path to the `chglog` subscribers (a subscriber that falls behind misses
    /// lines; one that went away is dropped).
    fn chglog_send(&mut self, path: &RelPath) {
        if self.chglog.is_empty() || self.chglog_last.as_ref() == Some(path) {
            return;
        }
        self.chglog_last = Some(path.clone());
        let line = path.to_string();
        self.chglog.retain(|tx| {
            !matches!(
                tx.try_send(line.clone()),
                Err(mpsc::error::TrySendError::Closed(_))
            )
        });
    }

    /// Makes the directories the applies changed durable, then the store.
    fn commit(&mut self) -> Result<(), String> {
        self.tree
            .sync_dirs()
            .map_err(|e| format!("syncing the backing directory: {e}"))?;
        self.engine.store_mut().commit().map_err(|e| {
            format!(
                "committing the store {}: {e}",
                self.engine.store().path().display()
            )
        })?;
        Ok(())
    }

    fn control(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response::Ok(self.status()),
            Request::Conflicts => Response::Ok(self.conflicts()),
            Request::Chglog { tx } => {
                if self.chglog.len() >= control::CHGLOG_SUBSCRIBERS_MAX {
                    return Response::Err("too many chglog readers".into());
                }
                self.chglog.push(tx);
                Response::Ok(serde_json::Value::Null)
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let engine_peers: HashMap<NodeId, rsyncfs_mesh::engine::PeerStatus> = self
            .engine
            .peer_status()
            .into_iter()
            .map(|p| (p.peer, p))
            .collect();
        let log_end = self.engine.log_end();
        let peers: Vec<serde_json::Value> = self
            .net
            .links()
            .into_iter()
            .map(|l| {
                let id = NodeId::parse(&l.id);
                let e = id.and_then(|id| engine_peers.get(&id));
                serde_json::json!({
                    "id": l.id,
                    "addr": l.addr,
                    "connected": l.connected,
                    "connected_for_s": l.connected_for_s,
                    "rtt_ms": l.rtt_ms,
                    // Our records the peer has not acknowledged yet.
                    "behind": e.map(|e| log_end.saturating_sub(e.acked)),
                    "their_records_applied": e.map(|e| e.applied),
                    "paths_pending_from_them": e.map(|e| e.held),
                })
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
        let (pending_paths, pending_bytes) = self.engine.pending_work();
        serde_json::json!({
            "node": self.net.id().long(),
            "short": self.net.id().short(),
            "mode": mode_name(self.mode),
            "listen": self.listen.to_string(),
            "up_s": self.started.elapsed().as_secs(),
            "idle": self.engine.is_idle(),
            "pending_paths": pending_paths,
            "pending_bytes": pending_bytes,
            "peers": peers,
            "pending_joins": self.net.pending_joins().into_iter().map(|(id, addr, s)| serde_json::json!({"id": id, "addr": addr, "waiting_s": s})).collect::<Vec<_>>(),
            "conflicts": stats.conflicts,
            "local_writes": stats.local_writes,
            "applies": stats.applies,
            "records_sent": stats.records_sent,
            "records_received": stats.records_received,
            "fetched_bytes": c.fetched_bytes.load(Ordering::Relaxed),
            "served_bytes": c.served_bytes.load(Ordering::Relaxed),
            "frames_dropped": c.frames_dropped.load(Ordering::Relaxed),
            "udp_rx_bytes": udp_rx,
            "udp_tx_bytes": udp_tx,
            "latency_ms": {"count": sorted.len(), "p50": pct(0.5), "p99": pct(0.99), "max": sorted.last()},
        })
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
