//! The peers a node trusts, kept in `peers.json` in the state directory: each peer's node id,
//! where known the address to dial it at, and when a link to it was last up; and the nodes this
//! node forgot (`rsyncfs-node forget`, `leave`), which an introduction does not bring back.

use super::identity::write_private;
use rsyncfs_conflict::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FILE: &str = "peers.json";
/// Most peers a node keeps; a join beyond this is refused.
pub const PEERS_MAX: usize = 256;

/// Forgotten nodes remembered at most (the oldest go first).
const FORGOTTEN_MAX: usize = 1024;

#[derive(Serialize, Deserialize, Default)]
struct File {
    peers: Vec<Saved>,
    #[serde(default)]
    forgotten: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    id: String,
    addr: Option<String>,
    /// When a link to it was last up, in ms since the epoch.
    #[serde(default)]
    last_seen_ms: Option<u64>,
}

/// The trusted peers and their addresses.
pub struct Book {
    path: PathBuf,
    peers: BTreeMap<NodeId, Option<String>>,
    last_seen_ms: BTreeMap<NodeId, u64>,
    /// Forgotten nodes, oldest first.
    forgotten: Vec<NodeId>,
}

impl Book {
    pub fn load(state: &Path) -> std::io::Result<Book> {
        let path = state.join(FILE);
        let mut book = Book {
            path,
            peers: BTreeMap::new(),
            last_seen_ms: BTreeMap::new(),
            forgotten: Vec::new(),
        };
        let bytes = match std::fs::read(&book.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(book),
            Err(e) => return Err(e),
        };
        let at = book.path.display().to_string();
        let file: File = serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::other(format!("{at}: {e}")))?;
        let parse = |id: &str| {
            NodeId::parse(id)
                .ok_or_else(|| std::io::Error::other(format!("{at}: bad node id {id}")))
        };
        for p in file.peers {
            let id = parse(&p.id)?;
            book.peers.insert(id, p.addr);
            if let Some(ms) = p.last_seen_ms {
                book.last_seen_ms.insert(id, ms);
            }
        }
        for id in file.forgotten {
            book.forgotten.push(parse(&id)?);
        }
        Ok(book)
    }

    fn save(&self) -> std::io::Result<()> {
        let file = File {
            peers: self
                .peers
                .iter()
                .map(|(id, addr)| Saved {
                    id: id.long(),
                    addr: addr.clone(),
                    last_seen_ms: self.last_seen_ms.get(id).copied(),
                })
                .collect(),
            forgotten: self.forgotten.iter().map(NodeId::long).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("serialising to memory");
        write_private(&self.path, &bytes)
    }

    pub fn is_trusted(&self, id: &NodeId) -> bool {
        self.peers.contains_key(id)
    }

    /// Trusts `id`, introduced by a trusted peer, unless this node forgot it (then `false`).
    pub fn trust_introduced(&mut self, id: NodeId, addr: String) -> std::io::Result<bool> {
        if self.forgotten.contains(&id) {
            return Ok(false);
        }
        self.trust(id, Some(addr))
    }

    /// Trusts `id` (a join or an accept: also a node forgotten before); a known address is kept
    /// unless a new one is given. Returns whether anything changed.
    pub fn trust(&mut self, id: NodeId, addr: Option<String>) -> std::io::Result<bool> {
        if !self.peers.contains_key(&id) && self.peers.len() >= PEERS_MAX {
            return Err(std::io::Error::other(format!(
                "this node already trusts {PEERS_MAX} peers"
            )));
        }
        // A forgotten node is never in `peers`, so the insert below saves this too.
        self.forgotten.retain(|f| *f != id);
        let old = self.peers.get(&id).cloned();
        let new = addr.or_else(|| old.clone().flatten());
        if old == Some(new.clone()) {
            return Ok(false);
        }
        self.peers.insert(id, new);
        self.save()?;
        Ok(true)
    }

    /// Trusts `id` no more (a failed join). Returns whether it was trusted.
    pub fn forget(&mut self, id: &NodeId) -> std::io::Result<bool> {
        if self.peers.remove(id).is_none() {
            return Ok(false);
        }
        self.last_seen_ms.remove(id);
        self.save()?;
        Ok(true)
    }

    /// Trusts `id` no more, and refuses it when a peer introduces it again (`forget`,
    /// `leave`): only a join or an accept brings it back. Returns whether it was trusted.
    pub fn forget_for_good(&mut self, id: &NodeId) -> std::io::Result<bool> {
        let was = self.peers.remove(id).is_some();
        self.last_seen_ms.remove(id);
        if !self.forgotten.contains(id) {
            if self.forgotten.len() >= FORGOTTEN_MAX {
                self.forgotten.remove(0);
            }
            self.forgotten.push(*id);
        }
        self.save()?;
        Ok(was)
    }

    /// A link to `id` was up at `ms` (since the epoch); kept on disk when the link goes down.
    pub fn seen(&mut self, id: &NodeId, ms: u64, save: bool) -> std::io::Result<()> {
        if self.peers.contains_key(id) {
            self.last_seen_ms.insert(*id, ms);
            if save {
                self.save()?;
            }
        }
        Ok(())
    }

    pub fn last_seen_ms(&self, id: &NodeId) -> Option<u64> {
        self.last_seen_ms.get(id).copied()
    }

    pub fn addr(&self, id: &NodeId) -> Option<String> {
        self.peers.get(id).cloned().flatten()
    }

    pub fn list(&self) -> Vec<(NodeId, Option<String>)> {
        self.peers.iter().map(|(k, v)| (*k, v.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_node_comes_back_by_a_join_only_and_all_of_it_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (x, y) = (NodeId::from_public_key(b"x"), NodeId::from_public_key(b"y"));
        let mut book = Book::load(dir.path()).unwrap();
        assert!(book.trust(x, Some("10.0.0.1:7431".into())).unwrap());
        assert!(book.trust(y, Some("10.0.0.2:7431".into())).unwrap());
        book.seen(&y, 1234, true).unwrap();
        assert!(book.forget_for_good(&x).unwrap());
        assert!(!book.is_trusted(&x));
        assert!(!book.trust_introduced(x, "10.0.0.1:7431".into()).unwrap());
        assert!(!book.is_trusted(&x));
        let mut book = Book::load(dir.path()).unwrap();
        assert_eq!(book.last_seen_ms(&y), Some(1234));
        assert!(!book.trust_introduced(x, "10.0.0.1:7431".into()).unwrap());
        assert!(book.trust(x, None).unwrap(), "an accept brings it back");
        let book = Book::load(dir.path()).unwrap();
        assert!(book.is_trusted(&x));
    }
}
