//! The commands' side of the control socket.

use super::{Answer, Wire, SOCKET};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Why a command could not get its answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no daemon answers at {0} ({1}); start one with `rsyncfs-node up`")]
    NoDaemon(PathBuf, std::io::Error),
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad answer from the daemon: {0}")]
    BadAnswer(String),
    /// The daemon's own error message.
    #[error("{0}")]
    Daemon(String),
}

/// Sends one request to the daemon of `state` and returns its answer.
pub fn call(state: &Path, request: &Wire) -> Result<serde_json::Value, ControlError> {
    let path = state.join(SOCKET);
    let mut stream =
        UnixStream::connect(&path).map_err(|e| ControlError::NoDaemon(path.clone(), e))?;
    let mut line = serde_json::to_vec(request).expect("serialising to memory");
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    let answer: Answer =
        serde_json::from_str(answer.trim()).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
    match (answer.ok, answer.error) {
        (_, Some(e)) => Err(ControlError::Daemon(e)),
        (Some(v), None) => Ok(v),
        (None, None) => Err(ControlError::BadAnswer("an empty answer".into())),
    }
}

/// The daemon's status.
pub fn status(state: &Path) -> Result<super::Status, ControlError> {
    let v = call(state, &Wire::Status)?;
    serde_json::from_value(v).map_err(|e| ControlError::BadAnswer(e.to_string()))
}

/// One item of the daemon's stream of changed paths.
#[derive(Debug, PartialEq, Eq)]
pub enum Changed<'a> {
    /// A path relative to the tree's root, as its bytes.
    Path(&'a [u8]),
    /// Some paths were not sent: this reader fell behind the daemon's queue.
    Lost,
}

/// Reads the daemon's changed paths, giving each to `each`, until the daemon goes away or
/// `each` says stop (returns `false`).
pub fn chglog(state: &Path, mut each: impl FnMut(Changed<'_>) -> bool) -> Result<(), ControlError> {
    let path = state.join(SOCKET);
    let mut stream =
        UnixStream::connect(&path).map_err(|e| ControlError::NoDaemon(path.clone(), e))?;
    let mut line = serde_json::to_vec(&Wire::Chglog).expect("serialising");
    line.push(b'\n');
    stream.write_all(&line)?;
    let reader = BufReader::new(stream);
    for line in reader.split(0) {
        let line = line?;
        let item = match line.first() {
            Some(b'/') => Changed::Path(&line[1..]),
            Some(b'!') => Changed::Lost,
            _ => {
                // An error answer instead of the stream.
                let answer: Answer = serde_json::from_slice(&line)
                    .map_err(|e| ControlError::BadAnswer(e.to_string()))?;
                return Err(ControlError::Daemon(answer.error.unwrap_or_default()));
            }
        };
        if !each(item) {
            return Ok(());
        }
    }
    Ok(())
}
