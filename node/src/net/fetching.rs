//! One fetch of a content at a time on this node.
//!
//! The engine asks for a content again when it no longer counts on the fetch it asked for
//! first (that fetch's op is stale): after a connection was replaced under it, say, the new
//! request can start before the old fetch has noticed its stream is gone. Run side by side, the
//! newer one would find no partial copy (the older one still holds its staging file) and move
//! everything again, and the older one would then keep a partial copy nobody uses. So a newer
//! fetch of a content stops the older one and waits for it to end, which keeps what it staged
//! as the partial copy the newer one resumes from.

use parking_lot::Mutex;
use rsyncfs_conflict::Hash;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// How long a newer fetch waits for the older one to end once asked to stop (it ends within
/// moments: the wait bounds a fetch stuck in a disk call).
const WAIT_MAX: Duration = Duration::from_secs(10);

/// The fetches running, by content (at most one each; as many as the engine runs at once).
#[derive(Default)]
pub struct Fetching {
    running: Mutex<HashMap<Hash, Running>>,
    next: std::sync::atomic::AtomicU64,
}

struct Running {
    id: u64,
    stop: Arc<Notify>,
    ended: oneshot::Receiver<()>,
}

/// A fetch's turn: `stop` is notified when a newer fetch of the content wants it to end; the
/// turn ends when this is dropped.
pub struct Turn<'a> {
    fetching: &'a Fetching,
    hash: Hash,
    id: u64,
    pub stop: Arc<Notify>,
    _ended: oneshot::Sender<()>,
}

impl Fetching {
    /// Takes the turn for `hash`: stops the fetch of it that runs, if any, and waits until it
    /// ended (at most [`WAIT_MAX`]).
    pub async fn begin(&self, hash: Hash) -> Turn<'_> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let stop = Arc::new(Notify::new());
        let previous = self.running.lock().insert(
            hash,
            Running {
                id,
                stop: Arc::clone(&stop),
                ended: rx,
            },
        );
        if let Some(previous) = previous {
            // A permit: the older fetch sees it also if it is not waiting yet.
            previous.stop.notify_one();
            if tokio::time::timeout(WAIT_MAX, previous.ended)
                .await
                .is_err()
            {
                tracing::warn!(
                    "an earlier fetch of the same content did not stop within {WAIT_MAX:?}; \
                     fetching beside it"
                );
            }
        }
        Turn {
            fetching: self,
            hash,
            id,
            stop,
            _ended: tx,
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut running = self.fetching.running.lock();
        if running.get(&self.hash).is_some_and(|r| r.id == self.id) {
            running.remove(&self.hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_newer_fetch_stops_the_older_and_waits_for_its_end() {
        let fetching = Arc::new(Fetching::default());
        let first = fetching.begin([1; 32]).await;
        let (ended_tx, mut ended_rx) = oneshot::channel::<()>();
        let f = Arc::clone(&fetching);
        let second = tokio::spawn(async move {
            let turn = f.begin([1; 32]).await;
            // The first ended before the second's turn began.
            assert!(ended_rx.try_recv().is_ok());
            drop(turn);
        });
        // The first is asked to stop, and stops.
        tokio::time::timeout(Duration::from_secs(5), first.stop.notified())
            .await
            .expect("asked to stop");
        ended_tx.send(()).unwrap();
        drop(first);
        second.await.unwrap();
        assert!(fetching.running.lock().is_empty());
    }

    #[tokio::test]
    async fn fetches_of_different_contents_run_side_by_side() {
        let fetching = Fetching::default();
        let a = fetching.begin([1; 32]).await;
        let b = tokio::time::timeout(Duration::from_secs(1), fetching.begin([2; 32]))
            .await
            .expect("no wait");
        assert_eq!(fetching.running.lock().len(), 2);
        drop((a, b));
        assert!(fetching.running.lock().is_empty());
    }

    #[tokio::test]
    async fn an_older_turn_ending_late_leaves_the_newer_in_place() {
        let fetching = Fetching::default();
        let first = fetching.begin([1; 32]).await;
        let stop = Arc::clone(&first.stop);
        // The first ends (dropped) while the second waits: the map then names the second.
        let (second, ()) = tokio::join!(fetching.begin([1; 32]), async move {
            stop.notified().await;
            drop(first);
        });
        assert_eq!(
            fetching.running.lock().get(&[1; 32]).map(|r| r.id),
            Some(second.id)
        );
        drop(second);
        assert!(fetching.running.lock().is_empty());
    }
}
