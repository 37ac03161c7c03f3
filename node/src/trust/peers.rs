//! The peers a node trusts, kept in `peers.json` in the state directory: each peer's node id
//! and, where known, the address to dial it at.

use super::identity::write_private;
use rsyncfs_conflict::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FILE: &str = "peers.json";
/// Most peers a node keeps; a join beyond this is refused.
pub const PEERS_MAX: usize = 256;

#[derive(Serialize, Deserialize, Default)]
struct File {
    peers: Vec<Saved>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    id: String,
    addr: Option<String>,
}

/// The trusted peers and their addresses.
pub struct Book {
    path: PathBuf,
    peers: BTreeMap<NodeId, Option<String>>,
}

impl Book {
    pub fn load(state: &Path) -> std::io::Result<Book> {
        let path = state.join(FILE);
        let mut peers = BTreeMap::new();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let file: File = serde_json::from_slice(&bytes)
                    .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
                for p in file.peers {
                    let id = NodeId::parse(&p.id).ok_or_else(|| {
                        std::io::Error::other(format!("{}: bad node id {}", path.display(), p.id))
                    })?;
                    peers.insert(id, p.addr);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Book { path, peers })
    }

    fn save(&self) -> std::io::Result<()> {
        let file = File {
            peers: self
                .peers
                .iter()
                .map(|(id, addr)| Saved {
                    id: id.long(),
                    addr: addr.clone(),
                })
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("serialising to memory");
        write_private(&self.path, &bytes)
    }

    pub fn is_trusted(&self, id: &NodeId) -> bool {
        self.peers.contains_key(id)
    }

    /// Trusts `id`; a known address is kept unless a new one is given. Returns whether anything
    /// changed.
    pub fn trust(&mut self, id: NodeId, addr: Option<String>) -> std::io::Result<bool> {
        if !self.peers.contains_key(&id) && self.peers.len() >= PEERS_MAX {
            return Err(std::io::Error::other(format!(
                "this node already trusts {PEERS_MAX} peers"
            )));
        }
        let old = self.peers.get(&id).cloned();
        let new = addr.or_else(|| old.clone().flatten());
        if old == Some(new.clone()) {
            return Ok(false);
        }
        self.peers.insert(id, new);
        self.save()?;
        Ok(true)
    }

    /// Trusts `id` no more. Returns whether it was trusted.
    pub fn forget(&mut self, id: &NodeId) -> std::io::Result<bool> {
        if self.peers.remove(id).is_none() {
            return Ok(false);
        }
        self.save()?;
        Ok(true)
    }

    pub fn addr(&self, id: &NodeId) -> Option<String> {
        self.peers.get(id).cloned().flatten()
    }

    pub fn list(&self) -> Vec<(NodeId, Option<String>)> {
        self.peers.iter().map(|(k, v)| (*k, v.clone())).collect()
    }
}
