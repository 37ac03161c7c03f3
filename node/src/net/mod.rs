//! The QUIC transport between nodes: one connection per peer, the engine's messages on one
//! stream in each direction, each content transfer on a stream of its own (so that a large file
//! never holds small updates back), membership news, and joins.
//!
//! Every stream starts with a tag byte. Each frame on a stream is a big-endian `u32` length and
//! that many bytes, checked against a limit before anything is allocated. Anything a peer sends
//! that does not decode, or breaks a limit, closes that peer's connection with an error in the
//! log; the node goes on serving the others.

pub mod content;
mod fetching;
pub mod framing;
mod join;
pub mod preseed;
pub mod tls;

pub use join::{PendingJoin, INVITE_VALID, JOIN_WAIT};

use crate::tree::Tree;
use crate::trust::identity::Identity;
use crate::trust::peers::Book;
use bytes::Bytes;
use framing::{read_frame, write_frame, FrameError};
use parking_lot::Mutex;
use rsyncfs_conflict::NodeId;
use rsyncfs_mesh::engine::{Fetch, FetchError, Input};
use rsyncfs_mesh::wire;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What the network tells the daemon, in the order it happened on each link.
#[derive(Debug)]
pub enum NetEvent {
    /// A link came up or went down, or a peer sent the engine a message.
    Engine(Input),
    /// A peer introduced a member this node now trusts: dial it.
    Dial(NodeId),
}

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The address does not resolve, or the peer does not answer.
    #[error("cannot reach {addr}: {why}")]
    Unreachable { addr: String, why: String },
    /// A stream or the connection ended (not the peer's fault as far as we know).
    #[error("stream lost: {0}")]
    Lost(String),
    /// The peer broke the protocol: its connection is closed.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The member said no, and why.
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Token(&'static str),
    #[error("no pending join from {0}")]
    NoSuchJoin(String),
    #[error("that is this node")]
    Myself,
    #[error("not connected to {0}")]
    NotConnected(String),
    #[error("no accept came in time")]
    JoinTimedOut,
    #[error("trusting {0}: {1}")]
    Trust(String, std::io::Error),
    #[error("the daemon is stopping")]
    Stopping,
}

impl From<FrameError> for NetError {
    fn from(e: FrameError) -> NetError {
        match e {
            FrameError::Lost(e) => NetError::Lost(e),
            FrameError::Bad(e) => NetError::Protocol(e),
        }
    }
}

/// `d` give or take a quarter, so that nodes that lost each other do not redial in step.
fn jitter(d: Duration) -> Duration {
    let quarter = d.as_millis() as u64 / 4;
    if quarter == 0 {
        return d;
    }
    d - Duration::from_millis(quarter)
        + Duration::from_millis(rand::random::<u64>() % (2 * quarter))
}

fn lost(e: impl std::fmt::Display) -> NetError {
    NetError::Lost(e.to_string())
}

/// The port a node listens on when none is given.
pub const DEFAULT_PORT: u16 = 7431;

const TAG_ENGINE: u8 = 1;
const TAG_MEMBERS: u8 = 2;
const TAG_FETCH: u8 = 3;
const TAG_JOIN: u8 = 4;
const TAG_PRESEED: u8 = 5;

/// Engine frames queued for one peer; beyond this a frame is dropped (the engine resends).
const SEND_QUEUE_FRAMES: usize = 8;
/// Largest frame of the node's own small messages (fetch requests, joins, membership).
pub const SMALL_FRAME_MAX: usize = 1 << 20;
/// Bytes of UDP socket buffer asked for (quinn leaves the small system default otherwise).
const UDP_BUFFER_BYTES: usize = 4 << 20;
/// Longest wait between two dials of an unreachable peer.
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(5);
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A link that lived less than this before it closed makes the next dial wait, with a backoff
/// that doubles (so a peer that refuses every connection is not redialled in a storm).
const LINK_LIVED_MIN: Duration = Duration::from_secs(2);
/// Two connections of one pair younger than this are dials that crossed (see `register`).
const CROSSING_WINDOW: Duration = Duration::from_secs(2);
/// Content fetches a node serves at once; more wait.
const SERVES_MAX: usize = 32;

/// Application error codes on connection close.
const CLOSE_DUPLICATE: u32 = 1;
const CLOSE_UNTRUSTED: u32 = 2;
const CLOSE_PROTOCOL: u32 = 3;
const CLOSE_SHUTDOWN: u32 = 4;

/// A connected peer.
struct Link {
    conn: quinn::Connection,
    tx: mpsc::Sender<Bytes>,
    /// The node that dialled this connection; of two, the one dialled by the lower id stays.
    dialer: NodeId,
    generation: u64,
    since: Instant,
}

#[derive(Serialize, Deserialize)]
enum MembersMsg {
    /// Members the sender trusts, with addresses, for the receiver to trust and dial.
    Introduce { members: Vec<(NodeId, String)> },
    /// The sender's operator forgot `member` (`rsyncfs-node forget`), or `member` is the sender
    /// and leaves (`rsyncfs-node leave`): the receiver forgets it too and tells its own peers.
    Forget { member: NodeId },
}

/// Transfer counters, for status and the benchmarks.
#[derive(Default)]
pub struct Counters {
    /// Content bytes received by fetches / sent when serving them.
    pub fetched_bytes: AtomicU64,
    pub served_bytes: AtomicU64,
    /// Bytes of preseeds (segments of files still being written) kept here / pushed to peers.
    pub preseeded_bytes: AtomicU64,
    pub preseed_pushed_bytes: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_dropped: AtomicU64,
    /// UDP bytes of connections that have closed (live ones are counted from their stats).
    pub closed_udp_rx: AtomicU64,
    pub closed_udp_tx: AtomicU64,
}

/// What status shows of one trusted peer.
#[derive(Clone, Debug, Serialize)]
pub struct LinkStatus {
    pub id: String,
    pub addr: Option<String>,
    /// When a link to it was last up (now, while it is), ms since the epoch.
    pub last_seen_ms: Option<u64>,
    pub connected: bool,
    pub connected_for_s: Option<u64>,
    pub rtt_ms: Option<f64>,
    /// The link's packet size now (path MTU discovery), packets lost on it, and the times quinn
    /// took it for an MTU black hole (and fell back to 1,200-byte packets).
    pub mtu: Option<u16>,
    pub lost_packets: Option<u64>,
    pub black_holes: Option<u64>,
}

pub struct Net {
    me: NodeId,
    identity: Arc<Identity>,
    endpoint: quinn::Endpoint,
    port: u16,
    links: Mutex<HashMap<NodeId, Link>>,
    generation: AtomicU64,
    book: Mutex<Book>,
    events: mpsc::Sender<NetEvent>,
    /// Link ups and downs, in the order they happen, forwarded to `events` by one task (so
    /// that a down never overtakes the up before it).
    link_events: mpsc::UnboundedSender<NetEvent>,
    tree: Arc<Tree>,
    dialing: Mutex<HashMap<NodeId, bool>>,
    /// Per peer, the wait before the next dial after a link that closed young.
    redial: Mutex<HashMap<NodeId, Duration>>,
    joins: join::Joins,
    serving: tokio::sync::Semaphore,
    pub counters: Counters,
    /// Whether members introduced by trusted peers are trusted.
    introductions: bool,
    congestion: tls::Congestion,
    /// Whether peers' preseeds are kept (a node that applies nothing refuses them).
    accepts_preseeds: std::sync::atomic::AtomicBool,
    /// Pushes received at once (each holds a segment's buffer); more are refused.
    preseeding: tokio::sync::Semaphore,
    /// The fetches running, one per content (a newer one stops the older).
    fetching: fetching::Fetching,
}

impl Net {
    /// Binds the endpoint and starts accepting; dials every trusted peer with an address.
    pub fn start(
        identity: Arc<Identity>,
        listen: SocketAddr,
        book: Book,
        events: mpsc::Sender<NetEvent>,
        tree: Arc<Tree>,
        introductions: bool,
        congestion: tls::Congestion,
    ) -> std::io::Result<Arc<Net>> {
        let socket = std::net::UdpSocket::bind(listen)?;
        for set in [
            rustix::net::sockopt::set_socket_recv_buffer_size_force,
            rustix::net::sockopt::set_socket_send_buffer_size_force,
        ] {
            if set(&socket, UDP_BUFFER_BYTES).is_err() {
                tracing::debug!("could not force the UDP socket buffer size");
            }
        }
        let port = socket.local_addr()?.port();
        let server = tls::server_config(&identity, congestion).map_err(std::io::Error::other)?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(tls::MAX_UDP_PAYLOAD)
            .map_err(std::io::Error::other)?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let (link_events, mut link_rx) = mpsc::unbounded_channel();
        {
            let events = events.clone();
            tokio::spawn(async move {
                while let Some(event) = link_rx.recv().await {
                    if events.send(event).await.is_err() {
                        break;
                    }
                }
            });
        }
        let net = Arc::new(Net {
            me: identity.id,
            link_events,
            identity,
            endpoint,
            port,
            links: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            book: Mutex::new(book),
            events,
            tree,
            dialing: Mutex::new(HashMap::new()),
            redial: Mutex::new(HashMap::new()),
            joins: join::Joins::default(),
            serving: tokio::sync::Semaphore::new(SERVES_MAX),
            counters: Counters::default(),
            introductions,
            congestion,
            accepts_preseeds: std::sync::atomic::AtomicBool::new(true),
            preseeding: tokio::sync::Semaphore::new(preseed::RECEIVING_MAX),
            fetching: fetching::Fetching::default(),
        });
        tokio::spawn(Arc::clone(&net).accept_loop());
        for (id, addr) in net.book.lock().list() {
            if addr.is_some() {
                net.dial_soon(id);
            }
        }
        Ok(net)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    /// The peers connected now.
    pub fn connected(&self) -> Vec<NodeId> {
        self.links.lock().keys().copied().collect()
    }

    /// Whether peers' preseeds are kept here (see [`preseed`]).
    pub fn accept_preseeds(&self, accept: bool) {
        self.accepts_preseeds.store(accept, Ordering::Relaxed);
    }

    /// Sends one push of a preseed (see [`preseed::push`]).
    pub async fn push_preseed(&self, push: &preseed::Push) -> Result<u64, preseed::PushError> {
        let conn = self
            .links
            .lock()
            .get(&push.to)
            .map(|l| l.conn.clone())
            .ok_or_else(|| preseed::PushError::Lost("not connected".into()))?;
        let mut stream = conn
            .open_uni()
            .await
            .map_err(|e| preseed::PushError::Lost(e.to_string()))?;
        stream
            .write_all(&[TAG_PRESEED])
            .await
            .map_err(|e| preseed::PushError::Lost(e.to_string()))?;
        let sent = preseed::push(&self.tree, &push.header, &mut stream).await?;
        self.counters
            .preseed_pushed_bytes
            .fetch_add(sent, Ordering::Relaxed);
        Ok(sent)
    }

    /// Closes every connection and the endpoint.
    pub async fn shutdown(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
    }

    async fn accept_loop(self: Arc<Net>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let net = Arc::clone(&self);
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("connection from {remote} failed: {e}");
                        return;
                    }
                };
                let Some(id) = tls::peer_id(&conn) else {
                    conn.close(quinn::VarInt::from_u32(CLOSE_UNTRUSTED), b"no identity");
                    return;
                };
                if tls::alpn(&conn).as_deref() == Some(tls::ALPN_JOIN) {
                    net.serve_join(conn, id).await;
                    return;
                }
                if !net.book.lock().is_trusted(&id) {
                    tracing::warn!("refused {remote}: node {} is not trusted", id.short());
                    conn.close(quinn::VarInt::from_u32(CLOSE_UNTRUSTED), b"not trusted");
                    return;
                }
                net.register(conn, id, id);
            });
        }
    }

    /// Dials `id` unless a link or a dial is there already, again and again with backoff until
    /// a link is up.
    fn dial_soon(self: &Arc<Net>, id: NodeId) {
        self.dial_after(id, Duration::ZERO);
    }

    /// Dials `id` after `wait` unless a link or a dial is there already, again and again with
    /// backoff (and jitter) until a link is up.
    fn dial_after(self: &Arc<Net>, id: NodeId, wait: Duration) {
        if id == self.me {
            return;
        }
        {
            let mut dialing = self.dialing.lock();
            if dialing.get(&id) == Some(&true) || self.links.lock().contains_key(&id) {
                return;
            }
            dialing.insert(id, true);
        }
        let net = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let mut backoff = DIAL_BACKOFF_MIN;
            loop {
                if net.links.lock().contains_key(&id) {
                    break;
                }
                let Some(addr) = net.book.lock().addr(&id) else {
                    break;
                };
                match net.dial(&addr, Some(id), tls::ALPN).await {
                    Ok(conn) => {
                        net.register(conn, id, net.me);
                        break;
                    }
                    Err(e) => {
                        tracing::debug!("dialling {} at {addr}: {e}", id.short());
                    }
                }
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
            }
            net.dialing.lock().insert(id, false);
            // The link this dial made may have closed already (the peer refused it as the
            // duplicate of a crossed dial) while the dial was still marked: its watcher then
            // found a dial under way and did not dial again, and nothing would have.
            if !net.links.lock().contains_key(&id) && net.book.lock().addr(&id).is_some() {
                let wait = net.redial_wait(id, Duration::ZERO);
                net.dial_after(id, wait);
            }
        });
    }

    /// The wait before redialling a peer whose link lived `lived`: none after a link that
    /// lasted, a doubling one after links that close young.
    fn redial_wait(&self, id: NodeId, lived: Duration) -> Duration {
        let mut redial = self.redial.lock();
        if lived >= LINK_LIVED_MIN {
            redial.remove(&id);
            return Duration::ZERO;
        }
        let wait = redial
            .get(&id)
            .map_or(DIAL_BACKOFF_MIN, |w| (*w * 2).min(DIAL_BACKOFF_MAX));
        redial.insert(id, wait);
        jitter(wait)
    }

    async fn dial(
        &self,
        addr: &str,
        expect: Option<NodeId>,
        alpn: &[u8],
    ) -> Result<quinn::Connection, NetError> {
        let unreachable = |why: String| NetError::Unreachable {
            addr: addr.to_string(),
            why,
        };
        let target = resolve(addr).await?;
        let config = tls::client_config(&self.identity, expect, alpn, self.congestion)
            .map_err(|e| unreachable(e.to_string()))?;
        let connecting = self
            .endpoint
            .connect_with(config, target, tls::SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(conn)
    }

    /// Takes a new authenticated connection to a trusted peer into use, keeping one per peer.
    fn register(self: &Arc<Net>, conn: quinn::Connection, id: NodeId, dialer: NodeId) {
        // A dial that began before the peer was forgotten can complete after (QUIC resends its
        // first packet for seconds while the peer is not listening yet).
        if !self.book.lock().is_trusted(&id) {
            tracing::info!("dropped a new link to {}: no longer trusted", id.short());
            conn.close(quinn::VarInt::from_u32(CLOSE_UNTRUSTED), b"not trusted");
            return;
        }
        let preferred = self.me.min(id);
        let (tx, rx) = mpsc::channel(SEND_QUEUE_FRAMES);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let replaced = {
            let mut links = self.links.lock();
            if let Some(old) = links.get(&id) {
                let old_alive = old.conn.close_reason().is_none();
                // A new connection while one is up: the peer does not see ours. Two dials that
                // crossed (both young, different dialers) keep the one the lower id dialled, on
                // both sides alike. Otherwise the peer lost ours (it restarted, or timed out
                // first): the new one replaces it, or the peer would be refused until our side
                // timed out too.
                let crossed = old.dialer != dialer && old.since.elapsed() < CROSSING_WINDOW;
                if old_alive && crossed && (old.dialer == preferred || dialer != preferred) {
                    drop(links);
                    conn.close(quinn::VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate");
                    return;
                }
            }
            links
                .insert(
                    id,
                    Link {
                        conn: conn.clone(),
                        tx,
                        dialer,
                        generation,
                        since: Instant::now(),
                    },
                )
                .map(|old| old.conn)
        };
        tracing::info!("connected to {} at {}", id.short(), conn.remote_address());
        match replaced {
            // The engine's session with the peer goes on over the new connection: the peer may
            // never have taken the old one into use (it refused it as a duplicate), so a new
            // handshake here could wait for a Hello that never comes. What was in flight on the
            // old connection is sent again by the engine's timers, and a peer that started over
            // says so in its Hello. The simulator replaces connections the same way
            // (`Event::Replace`).
            Some(old) => old.close(quinn::VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate"),
            None => self.to_engine(NetEvent::Engine(Input::PeerUp { peer: id })),
        }
        tokio::spawn(Arc::clone(self).writer(conn.clone(), rx));
        tokio::spawn(Arc::clone(self).readers(conn.clone(), id));
        tokio::spawn(Arc::clone(self).bi_streams(conn.clone(), id));
        let net = Arc::clone(self);
        let since = Instant::now();
        tokio::spawn(async move {
            let reason = conn.closed().await;
            let stats = conn.stats();
            net.counters
                .closed_udp_rx
                .fetch_add(stats.udp_rx.bytes, Ordering::Relaxed);
            net.counters
                .closed_udp_tx
                .fetch_add(stats.udp_tx.bytes, Ordering::Relaxed);
            let mine = {
                let mut links = net.links.lock();
                if links.get(&id).is_some_and(|l| l.generation == generation) {
                    links.remove(&id);
                    true
                } else {
                    false
                }
            };
            if mine {
                tracing::info!("disconnected from {}: {reason}", id.short());
                if let Err(e) = net.book.lock().seen(&id, now_ms(), true) {
                    tracing::warn!("keeping when {} was last seen: {e}", id.short());
                }
                net.to_engine(NetEvent::Engine(Input::PeerDown { peer: id }));
                let wait = net.redial_wait(id, since.elapsed());
                net.dial_after(id, wait);
            }
        });
        // Tell the peer who else is in the mesh.
        let members = self.members_except(id);
        if !members.is_empty() {
            let net = Arc::clone(self);
            tokio::spawn(async move {
                let msg = postcard::to_stdvec(&MembersMsg::Introduce { members })
                    .expect("encoding to memory");
                if let Err(e) = net.send_once(&id, TAG_MEMBERS, &msg).await {
                    tracing::debug!("introducing members to {}: {e}", id.short());
                }
            });
        }
    }

    fn members_except(&self, id: NodeId) -> Vec<(NodeId, String)> {
        self.book
            .lock()
            .list()
            .into_iter()
            .filter(|(m, _)| *m != id)
            .filter_map(|(m, a)| a.map(|a| (m, a)))
            .collect()
    }

    fn to_engine(&self, event: NetEvent) {
        let _ = self.link_events.send(event);
    }

    /// Queues an engine frame for `to`; dropped when the link is down or its queue is full (the
    /// engine sends again what is not acknowledged).
    pub fn send(&self, to: &NodeId, frame: Bytes) {
        let tx = self.links.lock().get(to).map(|l| l.tx.clone());
        match tx.map(|tx| tx.try_send(frame)) {
            Some(Ok(())) => {
                self.counters.frames_sent.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                tracing::debug!(
                    "frame to {} dropped: {}",
                    to.short(),
                    match other {
                        None => "no link",
                        Some(Err(mpsc::error::TrySendError::Full(_))) => "queue full",
                        Some(_) => "writer gone",
                    }
                );
                self.counters.frames_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn writer(self: Arc<Net>, conn: quinn::Connection, mut rx: mpsc::Receiver<Bytes>) {
        let result: Result<(), NetError> = async {
            let mut stream = conn.open_uni().await.map_err(lost)?;
            stream.write_all(&[TAG_ENGINE]).await.map_err(lost)?;
            while let Some(frame) = rx.recv().await {
                stream.write_all(&frame).await.map_err(lost)?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!("engine stream to {} ended: {e}", conn.remote_address());
        }
    }

    async fn readers(self: Arc<Net>, conn: quinn::Connection, id: NodeId) {
        while let Ok(mut stream) = conn.accept_uni().await {
            let net = Arc::clone(&self);
            let conn = conn.clone();
            tokio::spawn(async move {
                let mut tag = [0u8; 1];
                if stream.read_exact(&mut tag).await.is_err() {
                    return;
                }
                let result = match tag[0] {
                    TAG_ENGINE => net.read_engine(&mut stream, id).await,
                    TAG_MEMBERS => net.read_members(&mut stream, id).await,
                    TAG_PRESEED => {
                        let permit = net.preseeding.try_acquire();
                        preseed::receive(
                            &net.tree,
                            id,
                            net.accepts_preseeds.load(Ordering::Relaxed) && permit.is_ok(),
                            &mut stream,
                            &net.counters.preseeded_bytes,
                        )
                        .await
                    }
                    other => Err(FrameError::Bad(format!("unknown stream tag {other}"))),
                };
                match result {
                    Ok(()) => {}
                    Err(FrameError::Lost(e)) => tracing::debug!("stream from {}: {e}", id.short()),
                    Err(FrameError::Bad(e)) => {
                        tracing::error!(
                            "peer {} sent bad data, closing its connection: {e}",
                            id.short()
                        );
                        conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), e.as_bytes());
                    }
                }
            });
        }
    }

    async fn read_engine(
        &self,
        stream: &mut quinn::RecvStream,
        id: NodeId,
    ) -> Result<(), FrameError> {
        while let Some(frame) = read_frame(stream, wire::FRAME_BYTES_MAX).await? {
            let message = wire::decode(&frame).map_err(|e| FrameError::Bad(e.to_string()))?;
            if self
                .events
                .send(NetEvent::Engine(Input::Received { from: id, message }))
                .await
                .is_err()
            {
                break;
            }
        }
        Ok(())
    }

    async fn read_members(
        self: &Arc<Net>,
        stream: &mut quinn::RecvStream,
        id: NodeId,
    ) -> Result<(), FrameError> {
        let Some(frame) = read_frame(stream, SMALL_FRAME_MAX).await? else {
            return Ok(());
        };
        let members = match postcard::from_bytes(&frame)
            .map_err(|e| FrameError::Bad(format!("membership message: {e}")))?
        {
            MembersMsg::Introduce { members } => members,
            MembersMsg::Forget { member } => {
                self.forgotten_by(id, member);
                return Ok(());
            }
        };
        if members.len() > crate::trust::peers::PEERS_MAX {
            return Err(FrameError::Bad("too many members introduced".into()));
        }
        if !self.introductions {
            tracing::debug!(
                "{} introduced {} members; not trusted here",
                id.short(),
                members.len()
            );
            return Ok(());
        }
        let mut new = Vec::new();
        for (member, addr) in members {
            if member == self.me || addr.len() > 300 {
                continue;
            }
            match self.book.lock().trust_introduced(member, addr) {
                Ok(true) => new.push(member),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    "cannot trust {} introduced by {}: {e}",
                    member.short(),
                    id.short()
                ),
            }
        }
        for member in new {
            tracing::info!("{} introduced member {}", id.short(), member.short());
            self.events_dial(member);
        }
        Ok(())
    }

    fn events_dial(&self, id: NodeId) {
        let _ = self.events.try_send(NetEvent::Dial(id));
    }

    /// Dials a newly trusted peer (called from the runtime, which holds the `Arc`).
    pub fn dial_new(self: &Arc<Net>, id: NodeId) {
        self.dial_soon(id);
    }

    /// Sends one small message on a stream of its own.
    async fn send_once(&self, to: &NodeId, tag: u8, body: &[u8]) -> Result<(), NetError> {
        let conn = self
            .links
            .lock()
            .get(to)
            .map(|l| l.conn.clone())
            .ok_or_else(|| NetError::NotConnected(to.short()))?;
        let mut stream = conn.open_uni().await.map_err(lost)?;
        stream.write_all(&[tag]).await.map_err(lost)?;
        write_frame(&mut stream, body).await?;
        stream.finish().map_err(lost)?;
        Ok(())
    }

    async fn bi_streams(self: Arc<Net>, conn: quinn::Connection, id: NodeId) {
        while let Ok((send, mut recv)) = conn.accept_bi().await {
            let net = Arc::clone(&self);
            let conn = conn.clone();
            tokio::spawn(async move {
                let mut tag = [0u8; 1];
                if recv.read_exact(&mut tag).await.is_err() {
                    return;
                }
                let result = match tag[0] {
                    TAG_FETCH => net.serve_fetch(send, recv).await,
                    other => Err(NetError::Protocol(format!("unknown stream tag {other}"))),
                };
                match result {
                    Ok(()) => {}
                    Err(NetError::Protocol(e)) => {
                        tracing::error!(
                            "peer {} sent a bad request, closing its connection: {e}",
                            id.short()
                        );
                        conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), e.as_bytes());
                    }
                    // A stream that ended is not the peer's fault.
                    Err(e) => tracing::debug!("serving {}: {e}", id.short()),
                }
            });
        }
    }

    /// Answers one content request.
    async fn serve_fetch(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), NetError> {
        let Some(frame) = read_frame(&mut recv, content::REQUEST_MAX).await? else {
            return Ok(());
        };
        let request: content::Request = postcard::from_bytes(&frame)
            .map_err(|e| NetError::Protocol(format!("fetch request: {e}")))?;
        request
            .check()
            .map_err(|e| NetError::Protocol(e.to_string()))?;
        let _permit = self
            .serving
            .acquire()
            .await
            .map_err(|_| NetError::Stopping)?;
        let tree = Arc::clone(&self.tree);
        let served = content::serve(&tree, request, &mut send, &mut recv).await;
        match served {
            Ok(bytes) => {
                self.counters
                    .served_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
                let _ = send.finish();
                Ok(())
            }
            // A peer that went away or stopped reading is not a protocol error.
            Err(content::ServeError::Io(e)) => {
                tracing::debug!("serving content: {e}");
                Ok(())
            }
            Err(content::ServeError::Protocol(e)) => Err(NetError::Protocol(e)),
        }
    }

    /// Fetches content from a peer into a staging file, checked against its hash, once a fetch
    /// of the same content that still runs has stopped (see `fetching`).
    pub async fn fetch(&self, f: &Fetch) -> Result<PathBuf, FetchError> {
        let turn = self.fetching.begin(f.hash).await;
        let conn = self
            .links
            .lock()
            .get(&f.from)
            .map(|l| l.conn.clone())
            .ok_or(FetchError::Unreachable)?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|_| FetchError::Unreachable)?;
        send.write_all(&[TAG_FETCH])
            .await
            .map_err(|_| FetchError::Unreachable)?;
        let started = std::time::Instant::now();
        let r = content::fetch(
            &self.tree,
            f,
            &mut send,
            &mut recv,
            &self.counters.fetched_bytes,
            &turn.stop,
        )
        .await;
        if tracing::enabled!(tracing::Level::DEBUG) {
            let path = conn.stats().path;
            tracing::debug!(
                "fetch of {} ({} bytes) ended after {:?}, {}; the link: rtt {:?}, mtu {}, {} packets lost, {} black holes",
                f.path,
                f.size,
                started.elapsed(),
                if r.is_ok() { "whole" } else { "failed" },
                path.rtt,
                path.current_mtu,
                path.lost_packets,
                path.black_holes_detected
            );
        }
        r
    }

    /// Forgets `id` for good here (`rsyncfs-node forget`): no longer trusted, its link closed,
    /// refused when introduced again; and tells every connected peer to do the same. Returns
    /// the peers told.
    pub fn forget(self: &Arc<Net>, id: NodeId) -> Result<usize, NetError> {
        if id == self.me {
            return Err(NetError::Refused(
                "this is the node itself: `rsyncfs-node leave` leaves the mesh".into(),
            ));
        }
        let was = self
            .book
            .lock()
            .forget_for_good(&id)
            .map_err(|e| NetError::Trust(id.short(), e))?;
        if !was {
            return Err(NetError::Refused(format!(
                "{} is not a peer of this node",
                id.long()
            )));
        }
        self.drop_link(&id, b"forgotten");
        tracing::warn!("forgot peer {}", id.short());
        Ok(self.tell_forget(id, None))
    }

    /// Leaves the mesh (`rsyncfs-node leave`): tells every connected peer to forget this node,
    /// waits (up to 5 s each) until the peer has done so (it closes the link), then forgets
    /// every peer. The tree stays as it is. Returns the peers that took it.
    pub async fn leave(self: &Arc<Net>) -> Result<usize, NetError> {
        let connected: Vec<(NodeId, quinn::Connection)> = self
            .links
            .lock()
            .iter()
            .map(|(id, l)| (*id, l.conn.clone()))
            .collect();
        let msg = postcard::to_stdvec(&MembersMsg::Forget { member: self.me }).expect("encoding");
        let mut telling = tokio::task::JoinSet::new();
        for (peer, conn) in connected {
            let (net, msg) = (Arc::clone(self), msg.clone());
            telling.spawn(async move {
                let took = async {
                    net.send_once(&peer, TAG_MEMBERS, &msg).await?;
                    conn.closed().await;
                    Ok::<(), NetError>(())
                };
                match tokio::time::timeout(Duration::from_secs(5), took).await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::warn!("telling {} that this node leaves: {e}", peer.short());
                        false
                    }
                    Err(_) => {
                        tracing::warn!(
                            "{} did not take that this node leaves within 5 s",
                            peer.short()
                        );
                        false
                    }
                }
            });
        }
        let told = telling.join_all().await.into_iter().filter(|t| *t).count();
        let peers: Vec<NodeId> = self
            .book
            .lock()
            .list()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for peer in peers {
            self.book
                .lock()
                .forget_for_good(&peer)
                .map_err(|e| NetError::Trust(peer.short(), e))?;
            self.drop_link(&peer, b"left the mesh");
        }
        tracing::warn!("left the mesh: {told} peers told, every peer forgotten");
        Ok(told)
    }

    /// A trusted peer `from` says to forget `member` (itself, when it leaves).
    fn forgotten_by(self: &Arc<Net>, from: NodeId, member: NodeId) {
        if member == self.me {
            tracing::warn!("{} says it forgot this node", from.short());
            return;
        }
        if member != from && !self.introductions {
            tracing::info!(
                "{} forgot {}; kept here (this node takes no introductions)",
                from.short(),
                member.short()
            );
            return;
        }
        match self.book.lock().forget_for_good(&member) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!("forgetting {}: {e}", member.short());
                return;
            }
        }
        if member == from {
            tracing::warn!("{} left the mesh: forgotten here", member.short());
        } else {
            tracing::warn!(
                "{} forgot {}: forgotten here too",
                from.short(),
                member.short()
            );
        }
        self.drop_link(&member, b"forgotten");
        self.tell_forget(member, Some(from));
    }

    /// Tells every connected peer but `except` to forget `member`; returns how many.
    fn tell_forget(self: &Arc<Net>, member: NodeId, except: Option<NodeId>) -> usize {
        let peers: Vec<NodeId> = self
            .links
            .lock()
            .keys()
            .copied()
            .filter(|p| *p != member && Some(*p) != except)
            .collect();
        let msg = postcard::to_stdvec(&MembersMsg::Forget { member }).expect("encoding");
        for peer in &peers {
            let (net, msg, peer) = (Arc::clone(self), msg.clone(), *peer);
            tokio::spawn(async move {
                if let Err(e) = net.send_once(&peer, TAG_MEMBERS, &msg).await {
                    tracing::warn!("telling {} to forget {}: {e}", peer.short(), member.short());
                }
            });
        }
        peers.len()
    }

    /// Closes the link to `id`, if any (its watcher tells the engine the peer is down).
    fn drop_link(&self, id: &NodeId, why: &[u8]) {
        let conn = self.links.lock().get(id).map(|l| l.conn.clone());
        if let Some(conn) = conn {
            conn.close(quinn::VarInt::from_u32(CLOSE_UNTRUSTED), why);
        }
    }

    /// Tells every connected peer about a new member.
    fn introduce_everywhere(self: &Arc<Net>, id: NodeId, addr: String) {
        let peers: Vec<NodeId> = self
            .links
            .lock()
            .keys()
            .copied()
            .filter(|p| *p != id)
            .collect();
        for peer in peers {
            let net = Arc::clone(self);
            let msg = postcard::to_stdvec(&MembersMsg::Introduce {
                members: vec![(id, addr.clone())],
            })
            .expect("encoding");
            tokio::spawn(async move {
                if let Err(e) = net.send_once(&peer, TAG_MEMBERS, &msg).await {
                    tracing::debug!("introducing to {}: {e}", peer.short());
                }
            });
        }
    }

    /// UDP bytes received and sent by all peer connections so far.
    pub fn udp_bytes(&self) -> (u64, u64) {
        let links = self.links.lock();
        let (mut rx, mut tx) = (
            self.counters.closed_udp_rx.load(Ordering::Relaxed),
            self.counters.closed_udp_tx.load(Ordering::Relaxed),
        );
        for l in links.values() {
            let s = l.conn.stats();
            rx += s.udp_rx.bytes;
            tx += s.udp_tx.bytes;
        }
        (rx, tx)
    }

    pub fn links(&self) -> Vec<LinkStatus> {
        let links = self.links.lock();
        let book = self.book.lock();
        book.list()
            .into_iter()
            .map(|(id, addr)| {
                let link = links.get(&id);
                let path = link.map(|l| l.conn.stats().path);
                LinkStatus {
                    id: id.long(),
                    addr,
                    last_seen_ms: if link.is_some() {
                        Some(now_ms())
                    } else {
                        book.last_seen_ms(&id)
                    },
                    connected: link.is_some(),
                    connected_for_s: link.map(|l| l.since.elapsed().as_secs()),
                    rtt_ms: path.map(|p| p.rtt.as_secs_f64() * 1e3),
                    mtu: path.map(|p| p.current_mtu),
                    lost_packets: path.map(|p| p.lost_packets),
                    black_holes: path.map(|p| p.black_holes_detected),
                }
            })
            .collect()
    }
}

/// Now, in ms since the epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `host` or `host:port`, with the default port where none is given.
pub fn with_default_port(addr: &str) -> String {
    let has_port = match addr.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    if has_port {
        addr.to_string()
    } else if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:{DEFAULT_PORT}")
    } else {
        format!("{addr}:{DEFAULT_PORT}")
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, NetError> {
    let addr = with_default_port(addr);
    let unreachable = |why: String| NetError::Unreachable {
        addr: addr.clone(),
        why,
    };
    tokio::net::lookup_host(addr.clone())
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))
}
