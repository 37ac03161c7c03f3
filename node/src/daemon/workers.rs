use super::Event;
use crate::tree::{rel_path, Mount, ObserveError, Prepared, Tree};
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
            let (tree, mounted, events, observes2, queued2, rt) = (
                Arc::clone(&tree),
                Arc::clone(&mounted),
                events.clone(),
                Arc::clone(&observes),
                Arc::clone(&queued),
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
                        // More than two applies share one syncfs, which needs no descriptor.
                        let many = jobs.iter().filter(|j| matches!(j, Job::Apply(..))).count() > 2;
                        let mut prepared: Vec<Option<Result<Prepared, ApplyError>>> = jobs
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
                        let durable = {
                            let ok: Vec<&Prepared> = prepared
                                .iter()
                                .filter_map(|p| p.as_ref().and_then(|r| r.as_ref().ok()))
                                .collect();
                            tree.make_durable(&ok)
                        };
                        let mut stop = false;
                        let mut results = Vec::new();
                        for (job, prep) in jobs.into_iter().zip(prepared.iter_mut()) {
                            let input = match job {
                                Job::Observe(path, counted) => {
                                    if counted {
                                        observes2.fetch_sub(1, Ordering::Relaxed);
                                    } else {
                                        queued2.fetch_sub(1, Ordering::Relaxed);
                                    }
                                    match tree.observe(&path) {
                                        Ok(observed) => Input::LocalChange { path, observed },
                                        Err(e) => {
                                            // The engine asks again after a backoff. A file
                                            // being written is no failure: its close (or the
                                            // next report of a file held open) brings it back,
                                            // and status shows it meanwhile.
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
                                    stop = true;
                                    break;
                                }
                                Job::Apply(apply, _) => {
                                    let result = match (prep.take().expect("prepared"), &durable) {
                                        (Ok(p), Ok(())) => tree.commit(&apply, p, &*mounted),
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
                                        mounted.invalidate(Path::new(apply.path.as_str()));
                                    }
                                    Input::ApplyDone {
                                        op: apply.op,
                                        result,
                                    }
                                }
                            };
                            results.push(input);
                            if results.len() >= INPUTS_PER_EVENT_MAX {
                                let batch = std::mem::take(&mut results);
                                if events.blocking_send(Event::Inputs(batch)).is_err() {
                                    stop = true;
                                    break;
                                }
                            }
                        }
                        if !results.is_empty()
                            && events.blocking_send(Event::Inputs(results)).is_err()
                        {
                            stop = true;
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
