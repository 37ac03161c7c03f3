//! Length-prefixed frames on QUIC streams: a big-endian `u32` length, then that many bytes,
//! checked against a limit before anything is allocated.

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream or connection ended (not the peer's fault as far as we know).
    #[error("stream lost: {0}")]
    Lost(String),
    /// The peer broke a limit or sent what does not decode.
    #[error("{0}")]
    Bad(String),
}

/// Writes one length-prefixed frame.
pub async fn write_frame(stream: &mut quinn::SendStream, body: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(body.len())
        .map_err(|_| FrameError::Bad(format!("a frame of {} bytes", body.len())))?;
    stream
        .write_all(&len.to_be_bytes())
        .await
        .map_err(|e| FrameError::Lost(e.to_string()))?;
    stream
        .write_all(body)
        .await
        .map_err(|e| FrameError::Lost(e.to_string()))
}

/// Reads one length-prefixed frame of at most `max` bytes; `None` at a clean end of stream.
pub async fn read_frame(
    stream: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; 4];
    match stream.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(FrameError::Lost(e.to_string())),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::Bad(format!(
            "frame of {len} bytes is larger than the limit of {max}"
        )));
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| FrameError::Lost(e.to_string()))?;
    Ok(Some(body))
}
