//! The control socket (`control.sock` in the state directory, for root only): the commands
//! `status`, `conflicts`, `invite`, `join`, `accept` and `chglog` talk to the running daemon
//! through it. One JSON request per connection, one line; the answer is one JSON line, except
//! for `chglog`, which streams changed paths until the reader goes away.

use crate::runtime::Event;
use crate::transport::Net;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

pub const SOCKET: &str = "control.sock";
/// Longest request line.
const REQUEST_BYTES_MAX: usize = 64 * 1024;
pub const CHGLOG_SUBSCRIBERS_MAX: usize = 16;
/// Lines queued for one chglog reader before it misses some.
const CHGLOG_QUEUE: usize = 65_536;

/// A request as it travels on the socket.
#[derive(Serialize, Deserialize, Debug)]
pub enum Wire {
    Status,
    Conflicts,
    Invite {
        addr: Option<String>,
    },
    Join {
        peer: Option<String>,
        token: Option<String>,
    },
    Accept {
        id: String,
    },
    Chglog,
}

/// What the engine thread answers.
pub enum Request {
    Status,
    Conflicts,
    Chglog { tx: mpsc::Sender<String> },
}

pub enum Response {
    Ok(serde_json::Value),
    Err(String),
}

#[derive(Serialize, Deserialize)]
struct Answer {
    ok: Option<serde_json::Value>,
    error: Option<String>,
}

/// The network, once the daemon has one (the socket may be served a moment earlier).
static NET: OnceLock<Arc<Net>> = OnceLock::new();

pub fn set_net(net: Arc<Net>) {
    let _ = NET.set(net);
}

/// Serves the control socket at `path` (replacing a stale one).
pub fn serve(path: &Path, events: mpsc::Sender<Event>) -> std::io::Result<()> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::other(
                "another daemon is running with this state directory",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let events = events.clone();
            tokio::spawn(async move {
                if let Err(e) = connection(stream, events).await {
                    tracing::debug!("control connection: {e}");
                }
            });
        }
    });
    Ok(())
}

async fn connection(
    stream: tokio::net::UnixStream,
    events: mpsc::Sender<Event>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(REQUEST_BYTES_MAX as u64));
    reader.read_line(&mut line).await?;
    let request: Wire = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            return reply(&mut write, Response::Err(format!("bad request: {e}"))).await;
        }
    };
    let ask = |request: Request| {
        let events = events.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            if events.send(Event::Control(request, tx)).await.is_err() {
                return Response::Err("the daemon is stopping".into());
            }
            rx.await
                .unwrap_or_else(|_| Response::Err("the daemon is stopping".into()))
        }
    };
    let net = NET.get().cloned();
    let response = match request {
        Wire::Status => ask(Request::Status).await,
        Wire::Conflicts => ask(Request::Conflicts).await,
        Wire::Chglog => {
            let (tx, mut rx) = mpsc::channel(CHGLOG_QUEUE);
            match ask(Request::Chglog { tx }).await {
                Response::Ok(_) => {
                    // "/path" and a NUL each: paths may hold newlines, never NUL.
                    while let Some(path) = rx.recv().await {
                        let mut line = Vec::with_capacity(path.len() + 2);
                        line.push(b'/');
                        line.extend_from_slice(path.as_bytes());
                        line.push(0);
                        write.write_all(&line).await?;
                    }
                    return Ok(());
                }
                e => e,
            }
        }
        Wire::Invite { addr } => match net {
            Some(net) => {
                let addr = addr
                    .unwrap_or_else(|| net.local_addr().map(|a| a.to_string()).unwrap_or_default());
                Response::Ok(serde_json::json!({ "token": net.invite(addr) }))
            }
            None => Response::Err("the daemon is starting".into()),
        },
        Wire::Join { peer, token } => match net {
            Some(net) => match net.join(peer, token).await {
                Ok(member) => Response::Ok(serde_json::json!({ "member": member.long() })),
                Err(e) => Response::Err(e),
            },
            None => Response::Err("the daemon is starting".into()),
        },
        Wire::Accept { id } => match (net, rsyncfs_conflict::NodeId::parse(&id)) {
            (Some(net), Some(id)) => match net.accept(id) {
                Ok(()) => Response::Ok(serde_json::json!({ "accepted": id.long() })),
                Err(e) => Response::Err(e),
            },
            (_, None) => Response::Err(format!("{id} is not a node id")),
            (None, _) => Response::Err("the daemon is starting".into()),
        },
    };
    reply(&mut write, response).await
}

async fn reply(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: Response,
) -> std::io::Result<()> {
    let answer = match response {
        Response::Ok(v) => Answer {
            ok: Some(v),
            error: None,
        },
        Response::Err(e) => Answer {
            ok: None,
            error: Some(e),
        },
    };
    let mut line = serde_json::to_vec(&answer).expect("serialising to memory");
    line.push(b'\n');
    write.write_all(&line).await
}

/// Sends one request to the daemon of `state` and returns its answer.
pub fn call(state: &Path, request: &Wire) -> Result<serde_json::Value, String> {
    let path = state.join(SOCKET);
    let mut stream = UnixStream::connect(&path).map_err(|e| {
        format!(
            "no daemon answers at {} ({e}); start one with `rsyncfs-node up`",
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(request).expect("serialising to memory");
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    let answer: Answer = serde_json::from_str(answer.trim())
        .map_err(|e| format!("bad answer from the daemon: {e}"))?;
    match (answer.ok, answer.error) {
        (_, Some(e)) => Err(e),
        (Some(v), None) => Ok(v),
        (None, None) => Err("empty answer from the daemon".into()),
    }
}

/// Streams the daemon's changed paths to `out`, separated by `sep`, until either side stops.
pub fn chglog(state: &Path, sep: u8, out: &mut dyn Write) -> Result<(), String> {
    let path = state.join(SOCKET);
    let mut stream = UnixStream::connect(&path)
        .map_err(|e| format!("no daemon answers at {} ({e})", path.display()))?;
    let mut line = serde_json::to_vec(&Wire::Chglog).expect("serialising");
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| e.to_string())?;
    let reader = BufReader::new(stream);
    for line in reader.split(0) {
        let line = line.map_err(|e| e.to_string())?;
        let Some(path) = line.strip_prefix(b"/") else {
            // An error answer instead of the stream.
            let answer: Answer = serde_json::from_slice(&line).map_err(|e| e.to_string())?;
            return Err(answer.error.unwrap_or_default());
        };
        let mut line = path.to_vec();
        line.push(sep);
        if out.write_all(&line).and_then(|_| out.flush()).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
