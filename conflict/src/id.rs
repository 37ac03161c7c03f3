//! Node identity: a hash of the node's TLS public key, pinned by its peers.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A node's identity: the first 16 bytes of the BLAKE3 hash of its public key.
///
/// Sixteen bytes is what a [`uhlc::ID`] holds, so the HLC timestamps of a node carry its id and
/// the pair (time, origin) that orders concurrent writes is simply the timestamp.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    /// The id of the node whose public key (DER bytes) this is.
    pub fn from_public_key(public_key_der: &[u8]) -> NodeId {
        let hash = blake3::hash(public_key_der);
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash.as_bytes()[..16]);
        // uhlc ids must not be zero; a zero hash prefix has probability 2^-128.
        assert!(id != [0u8; 16]);
        NodeId(id)
    }

    /// A test or simulator id built from a small number (never zero). Ids grow with the index,
    /// and for indexes below 31 the short form starts with a letter that tells them apart
    /// (index 0 is `B...`, index 1 `C...`).
    pub fn from_index(index: u64) -> NodeId {
        let mut id = [0u8; 16];
        id[0] = ((index.min(30) + 1) as u8) << 3;
        id[8..].copy_from_slice(&(index + 1).to_be_bytes());
        NodeId(id)
    }

    /// The short readable form (7 base32 characters), as in conflict copy names and logs.
    pub fn short(&self) -> String {
        let mut full = data_encoding::BASE32_NOPAD.encode(&self.0);
        full.truncate(7);
        full
    }

    /// The full readable form: 26 base32 characters in groups, as users type it in `accept`.
    pub fn long(&self) -> String {
        let full = data_encoding::BASE32_NOPAD.encode(&self.0);
        let groups: Vec<&str> = full
            .as_bytes()
            .chunks(7)
            .map(|c| std::str::from_utf8(c).expect("base32 is ASCII"))
            .collect();
        groups.join("-")
    }

    /// Parses the full form (with or without dashes, any case).
    pub fn parse(text: &str) -> Option<NodeId> {
        let compact: String = text
            .chars()
            .filter(|c| *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let bytes = data_encoding::BASE32_NOPAD
            .decode(compact.as_bytes())
            .ok()?;
        let id: [u8; 16] = bytes.try_into().ok()?;
        (id != [0u8; 16]).then_some(NodeId(id))
    }

    /// The HLC id of this node.
    pub fn hlc_id(&self) -> uhlc::ID {
        uhlc::ID::try_from(self.0).expect("node ids are never zero")
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_form_round_trips() {
        let id = NodeId::from_public_key(b"some public key");
        assert_eq!(NodeId::parse(&id.long()), Some(id));
        assert_eq!(NodeId::parse(&id.long().to_lowercase()), Some(id));
        assert_eq!(id.short().len(), 7);
        assert!(id.long().starts_with(&id.short()));
        assert_eq!(NodeId::parse("not-an-id"), None);
    }

    #[test]
    fn hlc_ids_order_like_node_ids() {
        // Concurrent writes are ordered by (time, id); the tie-break must not depend on which of
        // the two representations is compared.
        let a = NodeId::from_index(1);
        let b = NodeId::from_index(2);
        assert!(a < b);
        assert!(a.hlc_id() < b.hlc_id());
    }
}
