//! The messages replicators exchange, their encoding and their limits.
//!
//! Every message travels as an [`Envelope`] (protocol version and message) encoded with postcard.
//! Over a byte stream each envelope is preceded by its length as a big-endian `u32`; the length is
//! checked against [`FRAME_BYTES_MAX`] before anything is allocated. Postcard is not
//! self-describing: a change to any type here changes the wire and must bump
//! [`PROTOCOL_VERSION`].

use crate::path::RelPath;
use bytes::Bytes;
use rsyncfs_conflict::{Content, Record, RecordError};
use serde::{Deserialize, Serialize};

/// Bumped on every change of the wire types.
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest content that travels inside its announcement.
pub const INLINE_BYTES_MAX: usize = 64 * 1024;
/// Most records one batch carries.
pub const BATCH_RECORDS_MAX: usize = 256;
/// Bytes of one [`WireRecord`], encoded, at most: its sequence, path, record and inline content.
pub const WIRE_RECORD_BYTES_MAX: usize = 10
    + (5 + crate::path::PATH_BYTES_MAX)
    + rsyncfs_conflict::limits::RECORD_ENCODED_BYTES_MAX
    + (1 + 5 + INLINE_BYTES_MAX);
/// Encoded bytes (records with their inline contents) a sender puts into one batch: a record
/// that would take a batch past this starts the next one, except that a batch always takes its
/// first record.
pub const BATCH_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Bytes of an envelope around a batch's records: version, variant, range, count and holds.
const BATCH_ENVELOPE_BYTES_MAX: usize = 3 + 1 + 10 + 10 + 5 + 10 + 10;
/// Largest encoded envelope: a full batch plus one record of the largest size always fits.
pub const FRAME_BYTES_MAX: usize = 8 * 1024 * 1024;
const _: () =
    assert!(BATCH_BYTES_MAX + WIRE_RECORD_BYTES_MAX + BATCH_ENVELOPE_BYTES_MAX <= FRAME_BYTES_MAX);

/// A message with the protocol version of its sender.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u16,
    pub message: Message,
}

/// What one replicator says to another over their connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Sent when a connection opens: "I have applied your store up to `progress`; send what
    /// follows". `fresh` is set on the first connection after the sender started: it may have
    /// lost records it wrote or took before a crash, so the receiver must not leave out records
    /// that came from the sender or that it wrote, this time.
    ///
    /// `session` names the sender's session with the receiver (a new one each time the sender
    /// takes the link up). A Hello of a newer session than the receiver knows means the
    /// sender started over (it saw the connection drop, or restarted) when the receiver may not
    /// have: the receiver starts over too, so that the two sides never disagree about it.
    ///
    /// `taken` is the receiver's session whose Hello the sender has taken (0 if none). A newer
    /// session that has already taken the receiver's current one started over in answer to
    /// it (or after taking it): the receiver then only takes the new Hello, without a new session
    /// of its own. Without this, each side's new session was news to the other, which
    /// started over again, and under loss and delay two sides could trade new sessions for
    /// ever (the simulator found it once connections could be replaced under a live link).
    Hello {
        progress: u64,
        fresh: bool,
        session: u64,
        taken: u64,
    },
    /// The answer to every Hello (naming its session): it arrived, records follow. Until it
    /// comes, Hello is sent again, so that a lost Hello cannot leave a connection silent.
    Welcome { session: u64 },
    /// Records of the sender's store with sequence numbers in `(after, upto]`, minus those the
    /// receiver has anyway (it sent them, or wrote them).
    Batch(Batch),
    /// The receiver has applied everything up to `progress` (flow control and resend).
    Ack { progress: u64 },
    /// The receiver saw a gap: resend everything after `after`.
    Pull { after: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub after: u64,
    pub upto: u64,
    pub records: Vec<WireRecord>,
    /// What the sender's tree held then (for progress: a first sync is done when this node
    /// holds as much).
    pub holds: Holds,
}

/// Files and their bytes in a tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holds {
    pub files: u64,
    pub bytes: u64,
}

/// One path's record as the sender stores it, with the content of its winner when that is a
/// small file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireRecord {
    /// The sender's store sequence of this record.
    pub seq: u64,
    pub path: RelPath,
    pub record: Record,
    /// The winner's file content, when it is at most [`INLINE_BYTES_MAX`] bytes and the sender
    /// could read it.
    pub data: Option<Bytes>,
}

/// Why bytes from a peer were refused. Any of these closes the connection to that peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes is larger than the limit of {FRAME_BYTES_MAX}")]
    FrameTooLarge(usize),
    #[error("message does not decode: {0}")]
    Decode(String),
    #[error("message has {0} trailing bytes")]
    Trailing(usize),
    #[error("peer speaks protocol {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("batch range ({after}, {upto}] is empty or backwards")]
    BadRange { after: u64, upto: u64 },
    #[error("batch has {0} records, more than {BATCH_RECORDS_MAX}")]
    TooManyRecords(usize),
    #[error("record for {path} is invalid: {error}")]
    BadRecord { path: String, error: RecordError },
    #[error("record for {path} has sequence {seq} outside its batch")]
    SeqOutsideBatch { path: String, seq: u64 },
    #[error("inline content for {0} does not match the record's size and hash")]
    BadInline(String),
}

/// Bytes `record` takes in a batch once its inline content (if it has one, of `inline` bytes)
/// is attached, for cutting batches by encoded size.
pub fn record_bytes(record: &WireRecord, inline: Option<u64>) -> usize {
    let bare = postcard::experimental::serialized_size(record).expect("sizing cannot fail");
    bare + inline.map_or(0, |n| 5 + n as usize)
}

/// Encodes one message (without the length prefix).
pub fn encode(message: &Message) -> Vec<u8> {
    let envelope = Envelope {
        version: PROTOCOL_VERSION,
        message: message.clone(),
    };
    postcard::to_stdvec(&envelope).expect("encoding to memory cannot fail")
}

/// Encodes one message with its length prefix, ready for a byte stream. A message over the
/// frame limit is refused here rather than sent to a peer that would refuse it (the engine's
/// batches are cut to fit, so this is a bug, reported and survived).
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, WireError> {
    let body = encode(message);
    if body.len() > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Reads the length prefix of a frame and checks it before the body is read.
pub fn frame_length(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge(len));
    }
    Ok(len)
}

/// Decodes and checks one message from a peer: version, structure, limits, every record's rules
/// and every inline content's hash. What passes is safe for the engine to act on.
pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge(bytes.len()));
    }
    // The version comes first in the envelope; read it alone so that a newer peer gets a clear
    // error rather than a decoding failure.
    let (version, _) =
        postcard::take_from_bytes::<u16>(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version(version));
    }
    let (envelope, rest) = postcard::take_from_bytes::<Envelope>(bytes)
        .map_err(|e| WireError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Trailing(rest.len()));
    }
    check(&envelope.message)?;
    Ok(envelope.message)
}

fn check(message: &Message) -> Result<(), WireError> {
    let Message::Batch(batch) = message else {
        return Ok(());
    };
    if batch.upto <= batch.after {
        return Err(WireError::BadRange {
            after: batch.after,
            upto: batch.upto,
        });
    }
    if batch.records.len() > BATCH_RECORDS_MAX {
        return Err(WireError::TooManyRecords(batch.records.len()));
    }
    for r in &batch.records {
        let path = r.path.to_string();
        if r.seq <= batch.after || r.seq > batch.upto {
            return Err(WireError::SeqOutsideBatch { path, seq: r.seq });
        }
        r.record.validate().map_err(|error| WireError::BadRecord {
            path: path.clone(),
            error,
        })?;
        if let Some(data) = &r.data {
            let ok = match r.record.winner().meta.content {
                Content::File { size, hash } => {
                    data.len() <= INLINE_BYTES_MAX
                        && data.len() as u64 == size
                        && *blake3::hash(data).as_bytes() == hash
                }
                _ => false,
            };
            if !ok {
                return Err(WireError::BadInline(path));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsyncfs_conflict::{Dot, Meta, NodeId, Timestamp, NTP64};

    fn record(meta: Meta) -> Record {
        let node = NodeId::from_index(1);
        Record::write(
            None,
            Dot { node, counter: 3 },
            Timestamp::new(NTP64(5 << 32), node.hlc_id()),
            meta,
        )
    }

    fn batch_with(data: &[u8], claimed: &[u8]) -> Message {
        let hash = *blake3::hash(claimed).as_bytes();
        Message::Batch(Batch {
            after: 0,
            upto: 3,
            records: vec![WireRecord {
                seq: 3,
                path: RelPath::new("a/b").unwrap(),
                record: record(Meta::file(claimed.len() as u64, hash, 0o644, 1)),
                data: Some(Bytes::copy_from_slice(data)),
            }],
            holds: Holds { files: 2, bytes: 9 },
        })
    }

    #[test]
    fn round_trip() {
        let m = batch_with(b"hello", b"hello");
        assert_eq!(decode(&encode(&m)).unwrap(), m);
        let frame = encode_frame(&Message::Ack { progress: 9 }).unwrap();
        let len = frame_length(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(
            decode(&frame[4..4 + len]).unwrap(),
            Message::Ack { progress: 9 }
        );
    }

    #[test]
    fn refuses_lies_and_garbage() {
        assert!(matches!(
            decode(&encode(&batch_with(b"evil!", b"hello"))),
            Err(WireError::BadInline(_))
        ));
        assert_eq!(
            decode(&[PROTOCOL_VERSION as u8 + 1, 0xff, 0xff]),
            Err(WireError::Version(PROTOCOL_VERSION + 1))
        );
        assert!(matches!(decode(&[]), Err(WireError::Decode(_))));
        let mut trailing = encode(&Message::Ack { progress: 1 });
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(WireError::Trailing(1)));
        assert!(matches!(
            frame_length((FRAME_BYTES_MAX as u32 + 1).to_be_bytes()),
            Err(WireError::FrameTooLarge(_))
        ));
        let backwards = Message::Batch(Batch {
            after: 5,
            upto: 5,
            records: vec![],
            holds: Holds::default(),
        });
        assert!(matches!(
            decode(&encode(&backwards)),
            Err(WireError::BadRange { .. })
        ));
        let Message::Batch(mut b) = batch_with(b"x", b"x") else {
            unreachable!()
        };
        b.records[0].seq = 4;
        assert!(matches!(
            decode(&encode(&Message::Batch(b))),
            Err(WireError::SeqOutsideBatch { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn truncated_messages_are_refused(cut in 0usize..200) {
            let full = encode(&batch_with(b"hello world", b"hello world"));
            let cut = cut.min(full.len() - 1);
            proptest::prop_assert!(decode(&full[..cut]).is_err());
        }
    }
}
