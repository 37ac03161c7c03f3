//! The daemon (`rsyncfs-node up`): the change logger, the engine and its store, the workers
//! that touch the backing directory, and the network, wired together.
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

mod core;
mod layout;
mod workers;

use self::core::Core;
use self::workers::{bridge, Workers};
use crate::control::{self, Call};
use crate::net::{Net, NetEvent};
use crate::store::{RedbStore, StoreError};
use crate::tree::Tree;
use crate::trust::identity::Identity;
use crate::trust::peers::Book;
use rsyncfs_mesh::engine::{Config, Engine, Input, Mode, StagedId};
use rsyncfs_mesh::path::RelPath;
use rsyncfs_mesh::wire::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Events queued for the engine thread.
const EVENTS_QUEUED_MAX: usize = 4096;

/// Something for the engine thread.
pub enum Event {
    /// From the network: an input for the engine.
    Input(Input),
    /// From a worker, in the order it did them: observations, writers' closes, applies'
    /// results (at most `INPUTS_PER_EVENT_MAX`).
    Inputs(Vec<Input>),
    /// Everything the store knows at or below this path is to be observed again (a directory
    /// moved away).
    Gone(RelPath),
    /// The change stream overflowed: observe everything.
    Rescan,
    /// From the network.
    Net(NetEvent),
    /// A fetch ended; its content, when it came, is staged at this path.
    Fetched {
        path: RelPath,
        staged: Option<(StagedId, PathBuf)>,
        input: Input,
    },
    /// From the control socket.
    Control(Call),
    /// Stop: commit and return.
    Stop,
}

/// What `up` is told.
#[derive(Debug)]
pub struct Options {
    pub state: PathBuf,
    pub backing: PathBuf,
    pub mount: PathBuf,
    pub listen: SocketAddr,
    pub mode: Mode,
    /// Trust the members that trusted peers introduce.
    pub introductions: bool,
    /// How often to scan the backing directory for changes made there directly (none: only
    /// at start and on `rescan`).
    pub scan_every: Option<Duration>,
    /// The congestion controller of peer connections.
    pub congestion: crate::net::tls::Congestion,
    /// Where to serve metrics and the status page (HTTP), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Keep the files applies replace or remove (`--keep-versions`), and how.
    pub versions: Option<crate::tree::versions::Policy>,
}

/// Why the daemon could not start, or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the store {}: {source}", path.display())]
    Store { path: PathBuf, source: StoreError },
    #[error(transparent)]
    Mount(#[from] rsyncfs_logger::MountError),
    #[error("serving metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Start {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Layout(String),
    #[error("unmounting: {0}")]
    Unmount(String),
}

fn io_at(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> DaemonError {
    let path = path.to_path_buf();
    move |source| DaemonError::Io { what, path, source }
}

fn start(what: &'static str) -> impl FnOnce(std::io::Error) -> DaemonError {
    move |source| DaemonError::Start { what, source }
}

/// Runs the node until `stop` is set; unmounts and closes cleanly.
pub fn run(mut opts: Options, stop: Arc<AtomicBool>) -> Result<(), DaemonError> {
    // Nothing is created before the folders are known to be safe, /dev/fuse opens and the
    // address can be listened on.
    let layout = layout::check(&opts.state, &opts.backing, &opts.mount)?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| DaemonError::Mount(rsyncfs_logger::MountError::NoFuse(e)))?;
    std::net::UdpSocket::bind(opts.listen).map_err(|source| DaemonError::Listen {
        addr: opts.listen,
        source,
    })?;
    std::fs::create_dir_all(&layout.state).map_err(io_at("state directory", &layout.state))?;
    let (layout, _locks) = layout::lock(layout)?;
    (opts.state, opts.backing, opts.mount) = (layout.state, layout.backing, layout.mount);
    std::fs::set_permissions(
        &opts.state,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(io_at("state directory", &opts.state))?;
    let identity =
        Arc::new(Identity::load_or_create(&opts.state).map_err(io_at("identity in", &opts.state))?);
    let book = Book::load(&opts.state).map_err(io_at("peers in", &opts.state))?;
    let store_path = opts.state.join("store.redb");
    let store = RedbStore::open(&store_path).map_err(|source| DaemonError::Store {
        path: store_path.clone(),
        source,
    })?;
    let mut tree = Tree::open(&opts.backing).map_err(io_at("backing directory", &opts.backing))?;
    if let Some(policy) = opts.versions {
        tree = tree
            .with_versions(policy)
            .map_err(io_at("versions in", &opts.backing))?;
    }
    let tree = Arc::new(tree);
    let logger_mode = match opts.mode {
        Mode::ReceiveOnly => rsyncfs_logger::Mode::ReceiveOnly,
        _ => rsyncfs_logger::Mode::ReadWrite,
    };
    // The bare mount point, held so that what programs wrote there while the node was down
    // (or in the moment before the mount covers it) is moved into the tree (`layout::rescue`).
    let bare = layout::bare(&opts.mount)?;
    let mounted = rsyncfs_logger::mount_with(&opts.backing, &opts.mount, logger_mode, true)?;
    layout::rescue(&bare, &opts.backing);
    let changes = mounted
        .take_changes()
        .expect("a fresh mount has its changes");
    let mounted = Arc::new(mounted);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("rsyncfs-io")
        .build()
        .map_err(start("the async runtime"))?;
    let (events_tx, events_rx) = mpsc::channel(EVENTS_QUEUED_MAX);
    // The network and the control socket have queues of their own, forwarded into the engine
    // thread's (neither knows the daemon).
    let (net_tx, net_rx) = mpsc::channel::<NetEvent>(EVENTS_QUEUED_MAX);
    let (calls_tx, calls_rx) = mpsc::channel::<Call>(64);
    rt.spawn(forward(net_rx, events_tx.clone(), Event::Net));
    rt.spawn(forward(calls_rx, events_tx.clone(), Event::Control));
    let net = {
        let _guard = rt.enter();
        Net::start(
            Arc::clone(&identity),
            opts.listen,
            book,
            net_tx,
            Arc::clone(&tree),
            opts.introductions,
            opts.congestion,
        )
        .map_err(|source| DaemonError::Listen {
            addr: opts.listen,
            source,
        })?
    };
    let listen = net.local_addr().map_err(start("the listening address"))?;
    // Large files are pushed to peers while they are written (see `net::preseed`).
    net.accept_preseeds(opts.mode != Mode::SendOnly);
    let pusher = rt.spawn(crate::net::preseed::run(
        Arc::clone(&net),
        Arc::downgrade(&mounted),
        Arc::clone(&tree),
        opts.mode != Mode::ReceiveOnly,
    ));
    let workers = Workers::start(
        Arc::clone(&tree),
        Arc::clone(&mounted),
        events_tx.clone(),
        rt.handle().clone(),
    )
    .map_err(start("the workers"))?;
    let control_path = opts.state.join(control::SOCKET);
    {
        let _guard = rt.enter();
        control::server::serve(&control_path, calls_tx.clone())
            .map_err(io_at("control socket", &control_path))?;
    }
    let metrics = match opts.metrics {
        None => None,
        Some(addr) => {
            let _guard = rt.enter();
            let bound = control::web::serve(addr, calls_tx)
                .map_err(|source| DaemonError::Metrics { addr, source })?;
            eprintln!(
                "rsyncfs-node: metrics at http://{bound}/metrics, status page at http://{bound}/"
            );
            Some(bound)
        }
    };
    eprintln!(
        "rsyncfs-node {} ({}) serving {} at {}, listening on {listen} ({})",
        identity.id.short(),
        mode_name(opts.mode),
        opts.backing.display(),
        opts.mount.display(),
        mounted.transport()
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
            .map_err(start("the logger bridge"))?
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
    let began = Instant::now();
    let mut engine = Engine::new(cfg, store);
    tracing::info!(
        "engine started in {:.2} s (its tally of directories built from the store)",
        began.elapsed().as_secs_f64()
    );
    // The ignore patterns hold from the start-up scan on.
    let ignore_loaded = core::read_ignore_file(&opts.backing);
    engine.set_ignore(&ignore_loaded);
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
        metrics,
        started: Instant::now(),
        chglog: Vec::new(),
        chglog_last: None,
        ignore_loaded,
        mount: opts.mount.clone(),
        rt: rt.handle().clone(),
        scan: None,
        scan_every: opts.scan_every,
        failed: std::collections::HashSet::new(),
    };
    let result = rt.block_on(core.run(events_rx));
    let Core { workers, .. } = core;
    workers.stop();
    rt.block_on(net.shutdown());
    drop(events_tx);
    let _ = std::fs::remove_file(&control_path);
    // The pusher holds the mount only between two awaits: once aborted, it holds nothing.
    pusher.abort();
    let _ = rt.block_on(pusher);
    // The bridge ends when the mount's change stream does.
    let unmounted = match Arc::try_unwrap(mounted) {
        Ok(m) => m.unmount().map_err(|e| DaemonError::Unmount(e.to_string())),
        Err(_) => Err(DaemonError::Unmount("the mount is still in use".into())),
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
            taken,
        } => format!("hello {progress} fresh {fresh} session {session} taken {taken}"),
        Message::Welcome { session } => format!("welcome {session}"),
        Message::Batch(b) => format!("batch ({}, {}] of {}", b.after, b.upto, b.records.len()),
        Message::Ack { progress } => format!("ack {progress}"),
        Message::Pull { after } => format!("pull after {after}"),
    }
}

/// Passes what comes on one queue to the engine thread's.
async fn forward<T>(mut from: mpsc::Receiver<T>, to: mpsc::Sender<Event>, wrap: fn(T) -> Event) {
    while let Some(item) = from.recv().await {
        if to.send(wrap(item)).await.is_err() {
            break;
        }
    }
}

pub(crate) fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::TwoWay => "two-way",
        Mode::SendOnly => "send-only",
        Mode::ReceiveOnly => "receive-only",
    }
}
