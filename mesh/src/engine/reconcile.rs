//! Making the filesystem show what the store is heading for, one path at a time.
//!
//! For a dirty path, `reconcile` compares what the path should show (the pending target, or the
//! stored record, turned into a [`Meta`] by [`shown`]) with what the node's filesystem holds
//! (`Entry::local`), and does at most one step towards it:
//! 1. directories above the path must be directories (a file there waits for its own turn, which
//!    keeps it as a conflict copy and makes the directory);
//! 2. every content the target no longer shows must be kept by a conflict copy on this node; the
//!    copy paths become pending targets of their own, and the path waits for them;
//! 3. if the filesystem already shows the target, the record is stored;
//! 4. a directory to be replaced or removed must be empty first;
//! 5. otherwise the engine finds the content (inline, staged by a fetch, or a local file with the
//!    same hash) or fetches it, and asks the driver to apply it; the record is stored when the
//!    apply is done.

use super::{
    Action, Apply, ApplyError, Engine, Fetch, FetchError, OpKind, Output, Pending, Source,
};
use crate::path::RelPath;
use crate::store::{Entry, Store};
use bytes::Bytes;
use rsyncfs_conflict::{join, ConflictCopy, Content, Hash, Meta, NodeId, Record, DIR_MODE_DEFAULT};

/// Observations asked for and not answered that the engine remembers (to ask each once).
const OBSERVING_MAX: usize = 65_536;

/// Directories above a path that one reconcile looks at (or asks the driver to observe after
/// a stale apply): enough for every tree people make, bounded for trees thousands deep.
const ANCESTORS_LOOKED_AT_MAX: usize = 16;

/// What a path shows for a record: the winner, or a directory when something below lives
/// (`shadowed`), or nothing.
pub(crate) fn shown(record: Option<&Record>, shadowed: bool) -> Option<Meta> {
    if shadowed {
        let dir = record
            .map(Record::winner)
            .filter(|w| w.meta.is_dir())
            .map_or_else(|| Meta::dir(DIR_MODE_DEFAULT), |w| w.meta.clone());
        return Some(dir);
    }
    let winner = record?.winner();
    (!winner.meta.is_tombstone()).then(|| winner.meta.clone())
}

impl<S: Store> Engine<S> {
    pub(super) fn reconcile(&mut self, path: &RelPath) {
        // Copies wished for this path look again whether they are still needed, whatever this
        // path does now (a starved copy of a superseded content must not wait forever).
        if let Some(wished) = self.wishes.get(path) {
            self.dirty.extend(wished.iter().cloned());
        }
        let entry = self.store.get(path).unwrap_or_default();
        let (target, blocked, wish_of) = match self.pending.get(path) {
            Some(p) => (
                p.target.clone().or_else(|| entry.record.clone()),
                p.op.is_some() || p.busy || p.retry_at.is_some(),
                p.wish_of.clone(),
            ),
            None => (entry.record.clone(), false, None),
        };
        if blocked {
            return;
        }
        self.clear_waits(path);
        if let Some(main) = wish_of {
            if !self.still_wished(&main, path) {
                // The losing content this copy was for has been superseded meanwhile.
                self.drop_pending(path);
                self.wake_waiters(path);
                return;
            }
        }
        let shadowed = self.live_below(path);
        let want = shown(target.as_ref(), shadowed);

        // 1. Directories above: the nearest one the disk holds decides (everything above a
        // directory is a directory; the driver makes the missing ones). The look is bounded:
        // beyond it the driver's own check finds a file above (Stale) and the engine observes.
        if want.is_some() {
            for ancestor in path.ancestors().take(ANCESTORS_LOOKED_AT_MAX) {
                let Some(local) = self.store.get(&ancestor).and_then(|e| e.local) else {
                    continue;
                };
                if !local.is_dir() {
                    self.wait_for(path, &ancestor);
                    self.dirty.insert(ancestor);
                    return;
                }
                break;
            }
        }

        // 2. Conflict copies of every content the path will not show.
        if let Some(t) = &target {
            let mut waiting = false;
            for copy in self.copies_needed(path, t, shadowed) {
                let copy_path = RelPath::new(copy.path.clone())
                    .expect("conflict copy names are valid paths next to a valid path");
                if self.copy_done(&copy_path, &copy) {
                    continue;
                }
                self.wish_copy(path, &copy_path, &copy);
                self.wait_for(path, &copy_path);
                waiting = true;
            }
            if waiting {
                return;
            }
        }

        // 3. Already shown: store the record.
        if want == entry.local {
            self.settle_entry(path, target, want, false);
            return;
        }

        // 4. A directory goes only once it is empty. Nothing below lives (or the path would
        // show a directory), so what is still on disk below is being removed, and each removal
        // marks its parent: this path comes back when they are gone. (On a receive-only node a
        // file made in the backing directory behind the mount's back is not the mesh's to
        // remove: it keeps its directory waiting, and status shows the path pending.)
        let local_is_dir = entry.local.as_ref().is_some_and(Meta::is_dir);
        if local_is_dir && !want.as_ref().is_some_and(Meta::is_dir) && self.local_below(path) {
            return;
        }

        // 5. Act.
        let action = match &want {
            None => Action::Remove,
            Some(meta) => match &meta.content {
                Content::Dir => Action::Mkdir { meta: meta.clone() },
                Content::Symlink { target } => Action::Symlink {
                    target: target.clone(),
                    owner: meta.owner,
                },
                Content::File { size, hash } => {
                    let same_content = entry
                        .local
                        .as_ref()
                        .and_then(Meta::file_hash)
                        .is_some_and(|(h, _)| h == *hash);
                    if same_content {
                        Action::SetAttr { meta: meta.clone() }
                    } else {
                        match self.content_source(path, *hash, *size, entry.local.as_ref()) {
                            Some(source) => Action::Write {
                                meta: meta.clone(),
                                source,
                            },
                            None => return, // fetching, queued or no source yet
                        }
                    }
                }
                Content::Tombstone => unreachable!("shown() never returns a tombstone"),
            },
        };
        // A file another path is being copied from stays until that copy is done (the
        // source of a rename is removed only after the new name has its content).
        if entry
            .local
            .as_ref()
            .is_some_and(|m| m.file_hash().is_some())
        {
            let copying: Vec<RelPath> = self
                .ops
                .values()
                .filter_map(|(q, kind)| match kind {
                    OpKind::Apply {
                        source: Some(s), ..
                    } if s == path => Some(q.clone()),
                    _ => None,
                })
                .collect();
            if !copying.is_empty() {
                for q in &copying {
                    self.wait_for(path, q);
                }
                return;
            }
        }
        let (source, staged) = match &action {
            Action::Write {
                source: Source::Local(q),
                ..
            } => (Some(q.clone()), false),
            Action::Write {
                source: Source::Staged(_),
                ..
            } => (None, true),
            _ => (None, false),
        };
        let op = self.new_op();
        self.ops.insert(
            op,
            (
                path.clone(),
                OpKind::Apply {
                    expect: entry.local.clone(),
                    want,
                    target,
                    source,
                    staged,
                },
            ),
        );
        self.pending.entry(path.clone()).or_default().op = Some(op);
        self.stats.applies += 1;
        self.out.push_back(Output::Apply(Apply {
            op,
            path: path.clone(),
            expect: entry.local,
            action,
        }));
    }

    fn copies_needed(&self, path: &RelPath, target: &Record, shadowed: bool) -> Vec<ConflictCopy> {
        #[cfg(feature = "planted-bugs")]
        if self.cfg.planted_bug == Some(super::PlantedBug::LoseConflictCopy) {
            return Vec::new();
        }
        target.copies(path.as_str(), shadowed)
    }

    /// True when this node already stores the copy (or something that has seen it: a user may
    /// have edited or removed the copy since).
    fn copy_done(&self, copy_path: &RelPath, copy: &ConflictCopy) -> bool {
        self.store
            .get(copy_path)
            .and_then(|e| e.record)
            .is_some_and(|stored| join(&stored, &copy.record()) == stored)
    }

    /// True when the target of `main` still needs the conflict copy at `copy_path`.
    fn still_wished(&self, main: &RelPath, copy_path: &RelPath) -> bool {
        let entry = self.store.get(main).unwrap_or_default();
        let target = self
            .pending
            .get(main)
            .and_then(|p| p.target.clone())
            .or(entry.record);
        let Some(target) = target else {
            return false;
        };
        let shadowed = self.live_below(main);
        self.copies_needed(main, &target, shadowed)
            .iter()
            .any(|c| c.path == copy_path.as_str())
    }

    /// Makes the copy a pending target of its own, with the sources of the path it comes from.
    fn wish_copy(&mut self, main: &RelPath, copy_path: &RelPath, copy: &ConflictCopy) {
        let record = copy.record();
        let stored = self.store.get(copy_path).and_then(|e| e.record);
        let sources = self
            .pending
            .get(main)
            .map(|p| p.sources.clone())
            .unwrap_or_default();
        if !self.pending.contains_key(copy_path) {
            self.wishes
                .entry(main.clone())
                .or_default()
                .insert(copy_path.clone());
        }
        let p = self
            .pending
            .entry(copy_path.clone())
            .or_insert_with(|| Pending {
                wish_of: Some(main.clone()),
                ..Pending::default()
            });
        let joined = match p.target.clone().or(stored) {
            Some(base) => join(&base, &record),
            None => record,
        };
        if p.target.as_ref() != Some(&joined) {
            let before = self.own(copy_path);
            let p = self.pending.get_mut(copy_path).expect("made above");
            p.target = Some(joined);
            p.from = None;
            p.tried.clear();
            self.retally(copy_path, before);
        }
        let p = self.pending.get_mut(copy_path).expect("made above");
        for s in sources {
            if !p.sources.contains(&s) {
                p.sources.push(s);
            }
        }
        self.dirty.insert(copy_path.clone());
    }

    /// Where the content with `hash` can come from right now. When nothing local has it, starts
    /// a fetch (or queues one) and returns `None`.
    fn content_source(
        &mut self,
        path: &RelPath,
        hash: Hash,
        size: u64,
        local: Option<&Meta>,
    ) -> Option<Source> {
        if size == 0 {
            return Some(Source::Inline(Bytes::new()));
        }
        if let Some(bytes) = self.cache.get(&hash) {
            return Some(Source::Inline(bytes.clone()));
        }
        let p = self.pending.entry(path.clone()).or_default();
        match p.staged {
            Some((h, staged)) if h == hash => return Some(Source::Staged(staged)),
            Some((_, staged)) => {
                p.staged = None;
                self.out.push_back(Output::Release { staged });
            }
            None => {}
        }
        if let Some(q) = self.store.find_local(&hash) {
            if &q != path {
                return Some(Source::Local(q));
            }
        }
        if self.fetches >= self.cfg.fetches_max {
            self.fetch_queue.insert(path.clone());
            return None;
        }
        let op = self.next_op;
        let peers = &self.peers;
        let p = self.pending.get_mut(path).expect("made above");
        let Some(from) = p
            .sources
            .iter()
            .copied()
            .find(|s| !p.tried.contains(&(*s, hash)) && peers.contains_key(s))
        else {
            // Nobody we are connected to has it now; a newer record will bring a source. A
            // source that did not have it may have it later (it was applying it itself): ask
            // them again after a backoff (a retry forgets what was tried).
            let asked_all = p.sources.iter().any(|s| peers.contains_key(s));
            if asked_all {
                self.after_failed_op(path, None);
            }
            return None;
        };
        self.next_op += 1;
        p.op = Some(op);
        self.fetches += 1;
        self.stats.fetches += 1;
        let announcements = p.announcements;
        self.ops.insert(
            op,
            (
                path.clone(),
                OpKind::Fetch {
                    from,
                    hash,
                    announcements,
                },
            ),
        );
        let basis = local
            .filter(|m| m.file_hash().is_some())
            .map(|_| path.clone());
        self.out.push_back(Output::Fetch(Fetch {
            op,
            from,
            path: path.clone(),
            hash,
            size,
            basis,
        }));
        None
    }

    /// Stores what the path now shows and the record it shows, and ends its pending work unless
    /// a newer target arrived meanwhile.
    fn settle_entry(
        &mut self,
        path: &RelPath,
        applied: Option<Record>,
        want: Option<Meta>,
        staged_used: bool,
    ) {
        let applied = self.fold_if_too_many(path, applied);
        let entry = self.store.get(path).unwrap_or_default();
        let local_changed = entry.local != want;
        let record_changed = applied != entry.record;
        let shows = want.clone();
        let (from, finished) = match self.pending.get(path) {
            Some(p) => {
                let newer = p.target.is_some() && p.target != applied;
                let from = if p.target == applied { p.from } else { None };
                (from, !newer)
            }
            None => (None, true),
        };
        if record_changed || local_changed {
            let mut new = entry;
            new.local = want;
            if record_changed {
                if let Some(r) = applied.as_ref().filter(|_| local_changed) {
                    if r.winner().dot.node != self.cfg.node {
                        self.note_latency(r, from);
                    }
                }
                new.record = applied;
                new.seq = self.next_seq();
                new.from = from;
            }
            self.put_entry(path, new);
        }
        if let Some(p) = self.pending.get_mut(path) {
            p.op = None;
            if staged_used {
                p.staged = None;
            }
        }
        if finished {
            self.drop_pending(path);
        } else {
            self.dirty.insert(path.clone());
        }
        // What the path is to show may have changed while the apply was out (something below
        // came or went): look again.
        let stored = self.store.get(path).and_then(|e| e.record);
        if shown(stored.as_ref(), self.live_below(path)) != shows {
            self.dirty.insert(path.clone());
        }
        if local_changed {
            self.after_local_state_change(path);
        } else {
            self.wake_waiters(path);
        }
    }

    /// A record about to be stored with more concurrent writers than a record may carry: every
    /// losing content is kept by a copy by now and the winner's content is on this node's disk
    /// (so that it can be had here should the fold lose a race later), so the record folds
    /// into one write of the winner's content ([`rsyncfs_conflict::fold`]).
    fn fold_if_too_many(&mut self, path: &RelPath, applied: Option<Record>) -> Option<Record> {
        let record = match applied {
            Some(r) if r.siblings.len() > self.cfg.siblings_max => r,
            other => return other,
        };
        let folded = rsyncfs_conflict::fold(&record);
        self.stats.folds += 1;
        let before = self.own(path);
        if let Some(p) = self.pending.get_mut(path) {
            if let Some(target) = &p.target {
                // A newer target (records that came while the apply was out) takes the fold in,
                // or the next store of it would go back on the fold's write.
                p.target = Some(if *target == record {
                    folded.clone()
                } else {
                    join(target, &folded)
                });
                p.from = None;
            }
        }
        self.retally(path, before);
        Some(folded)
    }

    /// Makes a copy target a target of its own (a peer announced it, or a user wrote it).
    pub(super) fn unwish(&mut self, path: &RelPath) {
        let Some(main) = self.pending.get_mut(path).and_then(|p| p.wish_of.take()) else {
            return;
        };
        if let Some(set) = self.wishes.get_mut(&main) {
            set.remove(path);
            if set.is_empty() {
                self.wishes.remove(&main);
            }
        }
    }

    /// Ends the pending work of a path, releasing what it holds.
    pub(super) fn drop_pending(&mut self, path: &RelPath) {
        self.unwish(path);
        let before = self.own(path);
        let removed = self.pending.remove(path);
        self.retally(path, before);
        if let Some(p) = removed {
            if let Some((_, staged)) = p.staged {
                self.out.push_back(Output::Release { staged });
            }
            if let Some(at) = p.retry_at {
                self.retries.remove(&(at, path.clone()));
            }
            self.release_holds(p.holds);
        }
        if self.pending.is_empty() {
            // Inline content is only kept for paths that wait for it.
            self.cache.clear();
            self.cache_bytes = 0;
        }
    }

    pub(super) fn on_apply_done(&mut self, op: super::OpId, result: Result<(), ApplyError>) {
        let Some((
            path,
            OpKind::Apply {
                expect,
                want,
                target,
                source,
                staged,
            },
        )) = self.ops.remove(&op)
        else {
            return;
        };
        let entry = self.store.get(&path).unwrap_or_default();
        // The record the path heads for now: local writes or records that came while the apply
        // was out may have moved it on (the disk may even be back at what the apply expected).
        let heading = self
            .pending
            .get(&path)
            .and_then(|p| p.target.clone())
            .or(entry.record.clone());
        if result.is_ok() && entry.local == expect && want.is_some() {
            // Directories the driver made above the path: up to the first one the store knows
            // (everything above a directory is a directory).
            for ancestor in path.ancestors() {
                let e = self.store.get(&ancestor).unwrap_or_default();
                if e.local.is_some() {
                    break;
                }
                self.put_local(&ancestor, e, Some(Meta::dir(DIR_MODE_DEFAULT)));
            }
        }
        match result {
            Ok(()) if entry.local == expect && heading != target => {
                // Done, but for a record that is no longer the one to store: the disk holds
                // `want` now; look again from there.
                if let Some(p) = self.pending.get_mut(&path) {
                    p.op = None;
                    if staged {
                        p.staged = None; // consumed by the apply
                    }
                }
                let entry = self.store.get(&path).unwrap_or_default();
                self.put_local(&path, entry, want);
                self.dirty.insert(path);
            }
            Ok(()) if entry.local == expect => {
                self.settle_entry(&path, target, want, staged);
            }
            Ok(()) => {
                // A local change was recorded while the apply was out, yet the apply found what
                // it expected: the driver broke the ordering promise of Input::LocalChange. Look
                // again rather than store something the filesystem may not show.
                debug_assert!(
                    false,
                    "apply to {path} succeeded over an unseen local change"
                );
                if staged {
                    if let Some(p) = self.pending.get_mut(&path) {
                        p.staged = None; // consumed by the apply
                    }
                }
                self.after_failed_apply(&path, None);
            }
            Err(ApplyError::Busy) => {
                #[cfg(feature = "planted-bugs")]
                self.planted_forget_staged(&path);
                if let Some(p) = self.pending.get_mut(&path) {
                    p.op = None;
                    p.busy = true;
                }
                // Should the close never be reported, try again anyway after a while.
                let delay = self.cfg.retry_after * 16;
                self.schedule_retry(&path, delay.as_nanos() as u64);
            }
            Err(ApplyError::Stale) => {
                #[cfg(feature = "planted-bugs")]
                self.planted_forget_staged(&path);
                self.after_failed_apply(&path, source);
            }
            Err(ApplyError::StagedGone) => {
                if let Some(p) = self.pending.get_mut(&path) {
                    p.staged = None;
                }
                self.after_failed_op(&path, None);
            }
            Err(ApplyError::Io(failure)) => {
                #[cfg(feature = "planted-bugs")]
                if self.cfg.planted_bug == Some(super::PlantedBug::GiveUpOnError) {
                    // The bug: the path keeps its pending work but is never looked at again.
                    if let Some(p) = self.pending.get_mut(&path) {
                        p.op = None;
                        p.retry_at = Some(u64::MAX);
                    }
                    return;
                }
                self.after_failed_op(&path, Some(failure));
            }
        }
    }

    /// Asks the driver what `path` holds, unless it was asked lately and has not answered: many
    /// failed applies below one directory must not flood the driver with the same question.
    pub(super) fn observe(&mut self, path: RelPath) {
        let resend_ns = self.cfg.resend_after.as_nanos() as u64;
        if let Some(&asked) = self.observing.get(&path) {
            if asked + resend_ns > self.now {
                return;
            }
        }
        if self.observing.len() >= OBSERVING_MAX {
            // Forget questions old enough to be asked again anyway.
            let now = self.now;
            self.observing.retain(|_, asked| *asked + resend_ns > now);
        }
        self.observing.insert(path.clone(), self.now);
        self.out.push_back(Output::Observe { path });
    }

    /// The planted bug `forget-staged`: a refused apply lets its staged content go, but the path
    /// still counts on it.
    #[cfg(feature = "planted-bugs")]
    fn planted_forget_staged(&mut self, path: &RelPath) {
        if self.cfg.planted_bug != Some(super::PlantedBug::ForgetStaged) {
            return;
        }
        if let Some((_, staged)) = self.pending.get(path).and_then(|p| p.staged) {
            self.out.push_back(Output::Release { staged });
        }
    }

    /// An apply found something else than it expected: learn what is really there, then try
    /// again after a backoff.
    fn after_failed_apply(&mut self, path: &RelPath, source: Option<RelPath>) {
        for p in std::iter::once(path.clone())
            .chain(path.ancestors().take(ANCESTORS_LOOKED_AT_MAX))
            .chain(source)
        {
            self.observe(p);
        }
        self.after_failed_op(path, None);
    }

    /// An operation on `path` failed: it is tried again after a backoff that doubles with each
    /// failure (up to 64 times [`super::Config::retry_after`]); an I/O failure is kept for
    /// status until the path's work is done.
    fn after_failed_op(&mut self, path: &RelPath, failure: Option<super::IoFailure>) {
        let retries = {
            let p = self.pending.entry(path.clone()).or_default();
            p.op = None;
            p.retries = p.retries.saturating_add(1);
            if failure.is_some() {
                p.failing = failure;
            }
            p.retries
        };
        let backoff = self.cfg.retry_after.as_nanos() as u64 * (1u64 << retries.min(6));
        self.schedule_retry(path, backoff);
        // A source kept for this copy need not wait for the retry.
        self.wake_waiters(path);
    }

    fn schedule_retry(&mut self, path: &RelPath, delay_ns: u64) {
        let at = self.now + delay_ns;
        let p = self.pending.entry(path.clone()).or_default();
        if let Some(old) = p.retry_at.replace(at) {
            self.retries.remove(&(old, path.clone()));
        }
        self.retries.insert((at, path.clone()));
    }

    pub(super) fn on_fetch_done(
        &mut self,
        op: super::OpId,
        result: Result<super::StagedId, FetchError>,
    ) {
        let Some((
            path,
            OpKind::Fetch {
                from,
                hash,
                announcements,
            },
        )) = self.ops.remove(&op)
        else {
            // A fetch the engine gave up on (its peer went down): what it staged is not needed.
            if let Ok(staged) = result {
                self.out.push_back(Output::Release { staged });
            }
            return;
        };
        self.fetch_ended();
        let Some(p) = self.pending.get_mut(&path) else {
            if let Ok(staged) = result {
                self.out.push_back(Output::Release { staged });
            }
            return;
        };
        p.op = None;
        match result {
            Ok(staged) => {
                p.failing = None;
                if let Some((_, old)) = p.staged.replace((hash, staged)) {
                    self.out.push_back(Output::Release { staged: old });
                }
                self.dirty.insert(path);
            }
            Err(FetchError::NotFound) | Err(FetchError::Corrupt(_)) => {
                // That peer's file changed since it announced it (it will announce the newer
                // one), or what it sent did not check out. Unless it announced something since
                // the fetch started: then it may have it now.
                if p.announcements == announcements {
                    p.tried.insert((from, hash));
                }
                self.dirty.insert(path);
            }
            Err(FetchError::Unreachable) => {
                // The link may be going down (PeerDown takes the source away then) or a stream
                // failed on a link that stays: ask again after a while.
                self.after_failed_op(&path, None);
            }
            Err(FetchError::Io(failure)) => {
                // Staging failed here (a full disk): the same source is asked again later.
                self.after_failed_op(&path, Some(failure));
            }
        }
    }

    /// A fetch is over (done, failed or given up): the next queued ones may start.
    pub(super) fn fetch_ended(&mut self) {
        self.fetches -= 1;
        let queued = std::mem::take(&mut self.fetch_queue);
        self.dirty.extend(queued);
    }

    pub(super) fn cache_put(&mut self, hash: Hash, data: Bytes) {
        if self.cache.contains_key(&hash) {
            return;
        }
        // Evict (in hash order, which is as good as random) until it fits; an evicted content
        // is fetched again if still needed.
        while self.cache_bytes + data.len() > self.cfg.cache_bytes_max {
            let Some((_, old)) = self.cache.pop_first() else {
                return;
            };
            self.cache_bytes -= old.len();
        }
        self.cache_bytes += data.len();
        self.cache.insert(hash, data);
    }

    fn new_op(&mut self) -> super::OpId {
        let op = self.next_op;
        self.next_op += 1;
        op
    }

    fn wait_for(&mut self, waiter: &RelPath, awaited: &RelPath) {
        self.waits
            .entry(waiter.clone())
            .or_default()
            .insert(awaited.clone());
        self.waiters
            .entry(awaited.clone())
            .or_default()
            .insert(waiter.clone());
    }

    /// Forgets what `path` waited for, before it looks again.
    fn clear_waits(&mut self, path: &RelPath) {
        let Some(awaited) = self.waits.remove(path) else {
            return;
        };
        for a in awaited {
            if let Some(set) = self.waiters.get_mut(&a) {
                set.remove(path);
                if set.is_empty() {
                    self.waiters.remove(&a);
                }
            }
        }
    }

    pub(super) fn wake_waiters(&mut self, path: &RelPath) {
        if let Some(waiters) = self.waiters.remove(path) {
            for w in waiters {
                if let Some(set) = self.waits.get_mut(&w) {
                    set.remove(path);
                }
                self.dirty.insert(w);
            }
        }
    }

    /// The node ids of peers in `sources` of a path, for diagnostics.
    #[allow(dead_code)]
    fn sources_of(&self, path: &RelPath) -> Vec<NodeId> {
        self.pending
            .get(path)
            .map(|p| p.sources.clone())
            .unwrap_or_default()
    }
}

impl Entry {
    /// True when the node's filesystem holds a directory here.
    pub fn is_local_dir(&self) -> bool {
        self.local.as_ref().is_some_and(Meta::is_dir)
    }
}
