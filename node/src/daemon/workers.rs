use super::Event;
use crate::tree::{rel_path, Mount, ObserveError, Parents, Prepared, Tree};
use rsyncfs_logger::{ChangeKind, ChangeStream, Mounted};
use rsyncfs_mesh::engine::{Apply, ApplyError, Input};
use rsyncfs_mesh::path::RelPath;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The mount as the applies see it.
impl Mount for Mounted {
    fn busy(&self, path: &RelPath) -> bool {
        self.is_open_for_writing(Path::new(path.as_str()))
    }

    fn exclusive(&self, f: &mut dyn FnMut()) {
        Mounted::exclusive(self, f)
    }
}

/// Observations queued for the workers by the logger bridge before it waits.
const OBSERVES_QUEUED_MAX: usize = 20_000;
/// Workers that observe and apply.
const WORKERS: usize = 4;
/// Jobs a worker takes at once (the applies among them share one sync: in a first sync of
/// small files, a fourth as many `syncfs` calls as with 128).
const JOBS_PER_TURN_MAX: usize = 512;
/// Results a worker sends to the engine thread in one event. Under a stream of jobs (a scan,
/// a first sync) one event per result cost a wake-up of the engine thread each: 18% of a
/// worker's time in a restart's profile. A turn of one job still sends at once.
const INPUTS_PER_EVENT_MAX: usize = 64;
/// Turns a worker prepares ahead of the one being finished (each holds at most
/// [`JOBS_PER_TURN_MAX`] jobs and, for new files, as many open descriptors).
const TURNS_AHEAD_MAX: usize = 1;
/// One job for a worker.
pub(super) enum Job {
    /// Observe a path; `true` when the logger bridge queued it (and counts it), `false` when
    /// the engine thread did (counted apart, in `Workers::queued`).
    Observe(RelPath, bool),
    WriterClosed(RelPath),
    Apply(Box<Apply>, Option<PathBuf>),
    /// End the worker (the bridge may still hold a way to its queue).
    Stop,
}

/// The workers, each owning the paths that hash to it. Observations are not merged: their
/// order is the filesystem's, which the engine relies on.
pub(super) struct Workers {
    queues: Vec<std::sync::mpsc::Sender<Job>>,
    /// Observations queued by the logger bridge and not done yet.
    observes: Arc<AtomicUsize>,
    /// Observations queued by the engine thread (scans, retries) and not done yet.
    queued: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// A turn: jobs a worker took from its queue at once (in order), with their applies prepared.
struct Turn {
    jobs: Vec<Job>,
    prepared: Vec<Option<Result<Prepared, ApplyError>>>,
}

impl Turn {
    /// Takes what is queued after `first` (in order, at most [`JOBS_PER_TURN_MAX`]) and
    /// prepares its applies, so that they share one sync of their contents.
    fn take(first: Job, rx: &std::sync::mpsc::Receiver<Job>, tree: &Tree) -> Turn {
        let mut jobs = vec![first];
        while jobs.len() < JOBS_PER_TURN_MAX {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        // More than two applies share one syncfs, which needs no descriptor.
        let many = Self::applies(&jobs) > 2;
        let prepared = jobs
            .iter()
            .map(|job| match job {
                Job::Apply(apply, staged) => {
                    let mut p = tree.prepare(apply, staged.as_deref());
                    if let (true, Ok(p)) = (many, &mut p) {
                        p.close_file();
                    }
                    Some(p)
                }
                _ => None,
            })
            .collect();
        Turn { jobs, prepared }
    }

    fn applies(jobs: &[Job]) -> usize {
        jobs.iter().filter(|j| matches!(j, Job::Apply(..))).count()
    }

    fn stops(&self) -> bool {
        self.jobs.iter().any(|j| matches!(j, Job::Stop))
    }
}

/// What finishing a turn needs: the tree, the mount, the way to the engine thread and the
/// counters of queued observations.
struct Finisher {
    tree: Arc<Tree>,
    mounted: Arc<Mounted>,
    events: mpsc::Sender<Event>,
    observes: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
}

impl Finisher {
    /// Makes a turn's prepared contents durable, then does its jobs in order (observations,
    /// writers' closes, the applies' commits) and sends the results to the engine thread.
    /// False once the worker is to stop (a `Stop` job, or the engine thread is gone).
    fn finish(&self, turn: Turn) -> bool {
        let Turn { jobs, mut prepared } = turn;
        let tree = &self.tree;
        let durable = {
            let ok: Vec<&Prepared> = prepared
                .iter()
                .filter_map(|p| p.as_ref().and_then(|r| r.as_ref().ok()))
                .collect();
            tree.make_durable(&ok)
        };
        let mut results = Vec::new();
        let mut parents = Parents::default();
        for (job, prep) in jobs.into_iter().zip(prepared.iter_mut()) {
            if !matches!(job, Job::Observe(..)) {
                parents = Parents::default();
            }
            let input = match job {
                Job::Observe(path, counted) => {
                    if counted {
                        self.observes.fetch_sub(1, Ordering::Relaxed);
                    } else {
                        self.queued.fetch_sub(1, Ordering::Relaxed);
                    }
                    match tree.observe_in(&mut parents, &path) {
                        Ok(observed) => Input::LocalChange { path, observed },
                        Err(e) => {
                            // The engine asks again after a backoff. A file being written is
                            // no failure: its close (or the next report of a file held open)
                            // brings it back, and status shows it meanwhile.
                            if matches!(e, ObserveError::Changing(_)) {
                                tracing::debug!("{e}; looking again later");
                            } else {
                                tracing::warn!("{e}; looking again later");
                            }
                            Input::ObserveFailed { path }
                        }
                    }
                }
                Job::WriterClosed(path) => Input::WriterClosed { path },
                Job::Stop => {
                    self.send(results);
                    return false;
                }
                Job::Apply(apply, _) => {
                    let result = match (prep.take().expect("prepared"), &durable) {
                        (Ok(p), Ok(())) => tree.commit(&apply, p, &*self.mounted),
                        (Ok(p), Err(e)) => {
                            tree.discard(&apply, p);
                            Err(ApplyError::Io(crate::tree::io_failure(
                                apply.path.as_str(),
                                e,
                            )))
                        }
                        (Err(e), _) => Err(e),
                    };
                    if result.is_ok() {
                        self.mounted.invalidate(Path::new(apply.path.as_str()));
                    }
                    Input::ApplyDone {
                        op: apply.op,
                        result,
                    }
                }
            };
            results.push(input);
            if results.len() >= INPUTS_PER_EVENT_MAX && !self.send(std::mem::take(&mut results)) {
                return false;
            }
        }
        self.send(results)
    }

    /// False when the engine thread is gone.
    fn send(&self, results: Vec<Input>) -> bool {
        results.is_empty() || self.events.blocking_send(Event::Inputs(results)).is_ok()
    }
}

/// One worker: a thread that takes turns from the queue and prepares their applies, and a
/// thread that finishes them (sync, commits, results), so that the next turn is prepared while
/// the last one's `syncfs` waits for the disk (a first sync of small files spent about a third
/// of a worker's time waiting there). A turn of at most two applies, with none in flight, is
/// finished by the first thread at once: a single write pays no hand-over.
fn work(
    i: usize,
    rx: std::sync::mpsc::Receiver<Job>,
    finisher: Finisher,
    rt: tokio::runtime::Handle,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let tree = Arc::clone(&finisher.tree);
    let finisher = Arc::new(finisher);
    // Turns prepared and not finished: at most TURNS_AHEAD_MAX queued, one being finished.
    let (turns, taken) = std::sync::mpsc::sync_channel::<Turn>(TURNS_AHEAD_MAX);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finishing = {
        let (finisher, in_flight, stopped, rt) = (
            Arc::clone(&finisher),
            Arc::clone(&in_flight),
            Arc::clone(&stopped),
            rt.clone(),
        );
        std::thread::Builder::new()
            .name(format!("rsyncfs-commit-{i}"))
            .spawn(move || {
                let _guard = rt.enter();
                while let Ok(turn) = taken.recv() {
                    let go_on = finisher.finish(turn);
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    if !go_on {
                        stopped.store(true, Ordering::Release);
                        break;
                    }
                }
            })?
    };
    std::thread::Builder::new()
        .name(format!("rsyncfs-worker-{i}"))
        .spawn(move || {
            let _guard = rt.enter();
            while let Ok(first) = rx.recv() {
                if stopped.load(Ordering::Acquire) {
                    break;
                }
                let turn = Turn::take(first, &rx, &tree);
                let stop = turn.stops();
                // Only this thread adds to `in_flight`: zero means the finishing thread has
                // nothing of an earlier turn, so finishing here keeps the order.
                if in_flight.load(Ordering::Acquire) == 0 && Turn::applies(&turn.jobs) <= 2 {
                    if !finisher.finish(turn) {
                        break;
                    }
                } else {
                    in_flight.fetch_add(1, Ordering::AcqRel);
                    if turns.send(turn).is_err() {
                        break;
                    }
                }
                if stop {
                    break;
                }
            }
            drop(turns);
            let _ = finishing.join();
        })
}

impl Workers {
    pub(super) fn start(
        tree: Arc<Tree>,
        mounted: Arc<Mounted>,
        events: mpsc::Sender<Event>,
        rt: tokio::runtime::Handle,
    ) -> std::io::Result<Workers> {
        let mut queues = Vec::new();
        let mut threads = Vec::new();
        let observes = Arc::new(AtomicUsize::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        for i in 0..WORKERS {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let finisher = Finisher {
                tree: Arc::clone(&tree),
                mounted: Arc::clone(&mounted),
                events: events.clone(),
                observes: Arc::clone(&observes),
                queued: Arc::clone(&queued),
            };
            threads.push(work(i, rx, finisher, rt.clone())?);
            queues.push(tx);
        }
        Ok(Workers {
            queues,
            observes,
            queued,
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

    pub(super) fn observe(&self, path: RelPath) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.queues[Self::shard(&path)].send(Job::Observe(path, false));
    }

    /// A scan's observations (queued by [`Workers::observe`]) not done yet.
    pub(super) fn scan_queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Observations queued and not done yet.
    pub(super) fn queued_observations(&self) -> usize {
        self.observes.load(Ordering::Relaxed) + self.queued.load(Ordering::Relaxed)
    }

    pub(super) fn send(&self, path: &RelPath, job: Job) {
        let _ = self.queues[Self::shard(path)].send(job);
    }

    pub(super) fn handle(&self) -> WorkersHandle {
        WorkersHandle {
            queues: self.queues.clone(),
            observes: Arc::clone(&self.observes),
        }
    }

    pub(super) fn stop(self) {
        for q in &self.queues {
            let _ = q.send(Job::Stop);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// The logger bridge's way to the workers.
pub(super) struct WorkersHandle {
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
pub(super) fn walk(root: &Path, dir: Option<&RelPath>, out: &mut Vec<RelPath>) {
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

/// Turns the mount's changes into observations (and, for what the store must expand, events).
pub(super) fn bridge(
    changes: ChangeStream,
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
