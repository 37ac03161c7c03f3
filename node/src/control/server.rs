//! The daemon's side of the control socket: it reads a request, hands it to the daemon as a
//! [`Call`], and writes the answer back.

use super::{Answer, Call, Request, Response, Wire};
use std::os::unix::net::UnixStream;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Longest request line.
const REQUEST_BYTES_MAX: usize = 64 * 1024;
/// Lines queued for one chglog reader before it misses some.
const CHGLOG_QUEUE: usize = 65_536;

/// Serves the control socket at `path` (replacing a stale one).
pub fn serve(path: &Path, calls: mpsc::Sender<Call>) -> std::io::Result<()> {
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
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!("control socket: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let calls = calls.clone();
            tokio::spawn(async move {
                if let Err(e) = connection(stream, calls).await {
                    tracing::debug!("control connection: {e}");
                }
            });
        }
    });
    Ok(())
}

async fn connection(
    stream: tokio::net::UnixStream,
    calls: mpsc::Sender<Call>,
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
        let calls = calls.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            if calls.send((request, tx)).await.is_err() {
                return Response::Err("the daemon is stopping".into());
            }
            rx.await
                .unwrap_or_else(|_| Response::Err("the daemon is stopping".into()))
        }
    };
    let response = match request {
        Wire::Status => ask(Request::Status).await,
        Wire::Conflicts => ask(Request::Conflicts).await,
        Wire::Invite { addr } => ask(Request::Invite { addr }).await,
        Wire::Join { peer, token } => ask(Request::Join { peer, token }).await,
        Wire::Accept { id } => ask(Request::Accept { id }).await,
        Wire::Forget { id } => ask(Request::Forget { id }).await,
        Wire::Leave => ask(Request::Leave).await,
        Wire::Revoke { token } => ask(Request::Revoke { token }).await,
        Wire::Versions { path } => ask(Request::Versions { path }).await,
        Wire::Restore { path, version } => ask(Request::Restore { path, version }).await,
        Wire::Rescan => ask(Request::Rescan).await,
        Wire::Chglog => {
            let (tx, mut rx) = mpsc::channel(CHGLOG_QUEUE);
            match ask(Request::Chglog { tx }).await {
                Response::Ok(_) => {
                    // "/path" and a NUL each (paths may hold newlines, never NUL); "!" and a
                    // NUL where paths were left out.
                    while let Some(changed) = rx.recv().await {
                        let line = match changed {
                            super::Changed::Path(path) => {
                                let mut line = Vec::with_capacity(path.len() + 2);
                                line.push(b'/');
                                line.extend_from_slice(path.as_bytes());
                                line.push(0);
                                line
                            }
                            super::Changed::Lost => b"!\0".to_vec(),
                        };
                        write.write_all(&line).await?;
                    }
                    return Ok(());
                }
                e => e,
            }
        }
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
