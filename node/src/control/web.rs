//! `up --metrics ADDR`: Prometheus metrics at `/metrics` and a read-only status page at `/`,
//! both made from the daemon's status (the answer `status --json` gives), asked for like any
//! control request. Nothing here changes the node.

use super::{human_bytes as bytes, Call, Histogram, Request, Response, Status};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Requests served at once; more are answered 503 at once (each asks the engine thread).
const REQUESTS_AT_ONCE_MAX: usize = 8;
/// How often the status page reloads itself.
const PAGE_REFRESH_S: u32 = 2;

#[derive(Clone)]
struct Web {
    calls: mpsc::Sender<Call>,
    at_once: Arc<Semaphore>,
}

/// Serves metrics and the status page on `addr` (needs a tokio runtime); returns the address
/// bound (its port, where `addr`'s was 0).
pub fn serve(addr: SocketAddr, calls: mpsc::Sender<Call>) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let web = Web {
        calls,
        at_once: Arc::new(Semaphore::new(REQUESTS_AT_ONCE_MAX)),
    };
    let app = axum::Router::new()
        .route("/", axum::routing::get(page))
        .route("/metrics", axum::routing::get(metrics))
        .with_state(web);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics on {bound} stopped: {e}");
        }
    });
    Ok(bound)
}

/// The daemon's status, or why not (busy with too many requests, or stopping).
async fn status(web: &Web) -> Result<Status, (StatusCode, String)> {
    let _permit = web.at_once.try_acquire().map_err(|_| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests at once".to_string(),
        )
    })?;
    let stopping = || {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the node is stopping".to_string(),
        )
    };
    let (tx, rx) = oneshot::channel();
    web.calls
        .send((Request::Status, tx))
        .await
        .map_err(|_| stopping())?;
    match rx.await.map_err(|_| stopping())? {
        Response::Ok(v) => serde_json::from_value(v)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Response::Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

async fn metrics(State(web): State<Web>) -> axum::response::Response {
    match status(&web).await {
        Ok(s) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            encode(&s),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn page(State(web): State<Web>) -> axum::response::Response {
    match status(&web).await {
        Ok(s) => Html(render(&s, &humantime_now()).into_string()).into_response(),
        Err(e) => e.into_response(),
    }
}

fn humantime_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A histogram whose buckets were counted elsewhere (the engine's).
#[derive(Debug)]
struct Counted(Histogram);

impl EncodeMetric for Counted {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = &self.0;
        let buckets: Vec<(f64, u64)> = h
            .bounds_ms
            .iter()
            .map(|ms| ms / 1e3)
            .chain(std::iter::once(f64::INFINITY))
            .zip(h.counts.iter().copied())
            .collect();
        encoder.encode_histogram::<NoLabelSet>(h.sum_ms / 1e3, h.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type ByPeer<M> = Family<Vec<(String, String)>, M>;

/// The status as Prometheus metrics (OpenMetrics text).
pub fn encode(s: &Status) -> String {
    let mut r = Registry::with_prefix("rsyncfs");
    let gauge = |v: u64| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g
    };
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    r.register(
        "up_seconds",
        "Seconds since the node started",
        gauge(s.up_s),
    );
    r.register(
        "idle",
        "1 when the node has nothing to do now",
        gauge(u64::from(s.idle)),
    );
    r.register(
        "peers",
        "Peers this node trusts",
        gauge(s.peers.len() as u64),
    );
    let connected = ByPeer::<Gauge>::default();
    let rtt = ByPeer::<Gauge<f64, AtomicU64>>::default();
    let behind = ByPeer::<Gauge>::default();
    let lost = ByPeer::<Counter>::default();
    for p in &s.peers {
        let label = vec![("peer".to_string(), p.id.clone())];
        connected.get_or_create(&label).set(i64::from(p.connected));
        if let Some(ms) = p.rtt_ms {
            rtt.get_or_create(&label).set(ms / 1e3);
        }
        if let Some(n) = p.behind {
            behind
                .get_or_create(&label)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if let Some(n) = p.lost_packets {
            lost.get_or_create(&label).inc_by(n);
        }
    }
    r.register(
        "peer_connected",
        "1 while the link to the peer is up",
        connected,
    );
    r.register(
        "peer_rtt_seconds",
        "Round-trip time of the link, as QUIC measures it",
        rtt,
    );
    r.register(
        "peer_behind_records",
        "This node's records the peer has not acknowledged",
        behind,
    );
    r.register("peer_lost_packets", "Packets lost on the link", lost);
    r.register(
        "pending_paths",
        "Paths with work this node can do now",
        gauge(s.pending_paths as u64),
    );
    r.register(
        "pending_bytes",
        "Bytes of content the pending paths wait for",
        gauge(s.pending_bytes),
    );
    r.register(
        "waiting_paths",
        "Paths whose content only peers that are down have",
        gauge(s.waiting_paths as u64),
    );
    r.register(
        "waiting_bytes",
        "Bytes of the waiting paths",
        gauge(s.waiting_bytes),
    );
    r.register(
        "observing_paths",
        "Paths queued to be looked at (stat and hash)",
        gauge(s.observing as u64),
    );
    r.register("files", "Regular files in the tree", gauge(s.files));
    r.register("bytes", "Bytes of the tree's files", gauge(s.bytes));
    r.register(
        "replication_latency_seconds",
        "From a peer's write to its apply here, for writes made while the link was up",
        Counted(s.latency_histogram.clone()),
    );
    r.register(
        "conflict_copies",
        "Conflict copies in the tree",
        gauge(s.conflicts),
    );
    r.register(
        "conflicts",
        "Races this node settled with a conflict copy",
        counter(s.conflicts_settled_here),
    );
    r.register("applies", "Peers' changes applied here", counter(s.applies));
    r.register(
        "local_writes",
        "Changes made here and shipped",
        counter(s.local_writes),
    );
    r.register(
        "failing_paths",
        "Paths whose work keeps failing (retried with a backoff; status says why)",
        gauge(s.failing.len() as u64),
    );
    r.register(
        "bugs",
        "Broken invariants the engine noticed (please report them)",
        gauge(s.bugs.len() as u64),
    );
    r.register(
        "frames_dropped",
        "Frames dropped because a peer's queue was full (resent)",
        counter(s.frames_dropped),
    );
    r.register(
        "records_sent",
        "Records sent to peers",
        counter(s.records_sent),
    );
    r.register(
        "records_received",
        "Records received from peers",
        counter(s.records_received),
    );
    r.register(
        "content_received_bytes",
        "File content received from peers",
        counter(s.fetched_bytes),
    );
    r.register(
        "content_sent_bytes",
        "File content served to peers",
        counter(s.served_bytes),
    );
    r.register(
        "udp_received_bytes",
        "UDP bytes received on the node's socket",
        counter(s.udp_rx_bytes),
    );
    r.register(
        "udp_sent_bytes",
        "UDP bytes sent on the node's socket",
        counter(s.udp_tx_bytes),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String");
    out
}

/// The status page: the node, its peers, its progress, recent conflicts and errors.
pub fn render(s: &Status, now: &str) -> maud::Markup {
    use maud::{html, PreEscaped, DOCTYPE};
    let state = if s.idle {
        "idle: in sync with every connected peer".to_string()
    } else {
        format!("busy: {}", s.busy_because.join("; "))
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content=(PAGE_REFRESH_S);
                title { "rsyncfs " (s.short) }
                style { (PreEscaped("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}.bad{color:#a00}")) }
            }
            body {
                h1 { "rsyncfs node " span id="node" { (s.short) } }
                p {
                    (s.mode) ", listening on " (s.listen) ", up " (s.up_s) " s. "
                    span id="state" { (state) }
                }
                h2 { "Peers" }
                @if s.peers.is_empty() {
                    p id="no-peers" { "No peers yet: `rsyncfs-node invite` on this node, `rsyncfs-node join --token ...` on another." }
                } @else {
                    table id="peers" {
                        tr { th { "peer" } th { "address" } th { "link" } th { "round trip" } th { "ours unacknowledged" } th { "their paths pending here" } }
                        @for p in &s.peers {
                            tr class=(if p.connected { "up" } else { "down bad" }) {
                                td { (p.id) }
                                td { (p.addr.as_deref().unwrap_or("-")) }
                                td { @if p.connected { "connected" @if let Some(t) = p.connected_for_s { " for " (t) " s" } } @else { "down" } }
                                td { @if let Some(ms) = p.rtt_ms { (format!("{ms:.1} ms")) } @else { "-" } }
                                td { (p.behind.map_or("-".to_string(), |b| b.to_string())) }
                                td { (p.paths_pending_from_them.map_or("-".to_string(), |n| n.to_string())) }
                            }
                        }
                    }
                }
                h2 { "Progress" }
                table id="progress" {
                    tr { th { "the tree" } td { (s.files) " files, " (bytes(s.bytes)) ", " (s.other_entries) " other entries" } }
                    tr { th { "to do here now" } td { (s.pending_paths) " paths, " (bytes(s.pending_bytes)) } }
                    tr { th { "waiting for peers that are down" } td { (s.waiting_paths) " paths, " (bytes(s.waiting_bytes)) } }
                    tr { th { "to look at" } td { (s.observing) " paths" @if let Some(scan) = &s.scanning { " (scanning: " (scan.left) " of " (scan.paths) " left)" } } }
                    tr { th { "replication latency" } td {
                        @if let (Some(p50), Some(p99)) = (s.latency_ms.p50, s.latency_ms.p99) {
                            (format!("p50 {p50:.1} ms, p99 {p99:.1} ms over the last {} writes", s.latency_ms.count))
                        } @else { "no peer's write applied yet" }
                    } }
                }
                h2 { "Recent conflicts" }
                p { (s.conflicts) " conflict copies in the tree; " (s.conflicts_settled_here) " races settled here since the start (`rsyncfs-node conflicts` lists the copies)." }
                @if !s.recent_conflicts.is_empty() {
                    table id="conflicts" {
                        tr { th { "path" } th { "settled at" } }
                        @for c in s.recent_conflicts.iter().rev() {
                            tr { td { (c.path) } td { (humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(c.at_ms)).to_string()) } }
                        }
                    }
                }
                h2 { "Errors" }
                @if s.failing.is_empty() && s.bugs.is_empty() {
                    p id="no-errors" { "None." }
                } @else {
                    table id="errors" {
                        tr { th { "path" } th { "error" } th { "tries" } }
                        @for f in &s.failing {
                            tr class="bad" { td { (f.path) } td { (f.error) } td { (f.retries) } }
                        }
                        @for b in &s.bugs {
                            tr class="bad" { td { "(engine)" } td { (b) } td { "-" } }
                        }
                    }
                }
                p { small { "Read-only; reloads every " (PAGE_REFRESH_S) " s. Shown " (now) ". Metrics: " a href="/metrics" { "/metrics" } "." } }
            }
        }
    }
}
