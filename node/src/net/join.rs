//! Joining a mesh: invitation tokens, the join request a new node makes on the join ALPN (the
//! only thing an untrusted node may speak), the operator's accept, and introducing a new member
//! to the others.

use super::framing::{read_frame, write_frame};
use super::{
    lost, tls, with_default_port, Net, NetError, CLOSE_PROTOCOL, SMALL_FRAME_MAX, TAG_JOIN,
};
use crate::trust::peers::PEERS_MAX;
use parking_lot::Mutex;
use rsyncfs_conflict::NodeId;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How long a join without a token waits for an operator's accept.
pub const JOIN_WAIT: Duration = Duration::from_secs(3600);
/// Pending join requests a node keeps.
const PENDING_JOINS_MAX: usize = 64;
/// How long an invitation token stays valid.
pub const INVITE_VALID: Duration = Duration::from_secs(3600);

/// A node waiting for an operator's `accept`.
pub struct PendingJoin {
    pub id: NodeId,
    pub addr: String,
    pub since: std::time::SystemTime,
    accepted: Option<oneshot::Sender<()>>,
}

struct Invite {
    secret: [u8; 16],
    until: Instant,
}

/// What an invitation token carries.
#[derive(Serialize, Deserialize)]
struct Token {
    addr: String,
    id: NodeId,
    secret: [u8; 16],
}

const TOKEN_PREFIX: &str = "rsyncfs1-";

#[derive(Serialize, Deserialize)]
enum JoinRequest {
    Join {
        secret: Option<[u8; 16]>,
        /// The port the joining node listens on (its address is the one it dialled from).
        port: u16,
    },
}

#[derive(Serialize, Deserialize)]
enum JoinReply {
    /// Trusted; these are the other members.
    Accepted {
        members: Vec<(NodeId, String)>,
    },
    /// Waiting for an operator's accept on the member.
    Pending,
    Refused {
        why: String,
    },
}

/// The joins of one node: tokens it handed out and requests waiting for an accept.
#[derive(Default)]
pub(super) struct Joins {
    pending: Mutex<Vec<PendingJoin>>,
    invites: Mutex<Vec<Invite>>,
}

impl Net {
    /// Makes an invitation token for this node, valid for [`INVITE_VALID`].
    pub fn invite(&self, addr: String) -> String {
        let secret: [u8; 16] = rand::random();
        let mut invites = self.joins.invites.lock();
        invites.retain(|i| i.until > Instant::now());
        invites.push(Invite {
            secret,
            until: Instant::now() + INVITE_VALID,
        });
        let token = Token {
            addr,
            id: self.me,
            secret,
        };
        format!(
            "{TOKEN_PREFIX}{}",
            data_encoding::BASE32_NOPAD
                .encode(&postcard::to_stdvec(&token).expect("encoding to memory"))
                .to_lowercase()
        )
    }

    /// Revokes the invitation `token` (every one this node handed out, with `None`): a join with
    /// it is refused from now on. Returns how many were revoked.
    pub fn revoke(&self, token: Option<&str>) -> Result<usize, NetError> {
        let mut invites = self.joins.invites.lock();
        invites.retain(|i| i.until > Instant::now());
        let before = invites.len();
        match token {
            None => invites.clear(),
            Some(text) => {
                let token = parse_token(text)?;
                if token.id != self.me {
                    return Err(NetError::Token("the token is another node's"));
                }
                invites.retain(|i| i.secret != token.secret);
                if invites.len() == before {
                    return Err(NetError::Token(
                        "no such invitation here (expired, revoked, or from before a restart)",
                    ));
                }
            }
        }
        Ok(before - invites.len())
    }

    /// Asks the member at `peer` (or the one a token names) to let this node join; waits for an
    /// operator's accept there when there is no token. Returns the member's id.
    pub async fn join(
        self: &Arc<Net>,
        peer: Option<String>,
        token: Option<String>,
    ) -> Result<NodeId, NetError> {
        let token = token.map(|t| parse_token(&t)).transpose()?;
        let addr = match (&peer, &token) {
            (Some(p), _) => with_default_port(p),
            (None, Some(t)) => t.addr.clone(),
            (None, None) => return Err(NetError::Token("join needs --peer or --token")),
        };
        let conn = self
            .dial(&addr, token.as_ref().map(|t| t.id), tls::ALPN_JOIN)
            .await?;
        let member = tls::peer_id(&conn)
            .ok_or_else(|| NetError::Protocol("the member has no identity".into()))?;
        if member == self.me {
            return Err(NetError::Myself);
        }
        // This node chose to join that member: trust it now, so that it can dial back; a join
        // that does not go through takes that back (a refused member is not dialled again).
        let was_trusted = self.book.lock().is_trusted(&member);
        self.book
            .lock()
            .trust(member, Some(addr.clone()))
            .map_err(|e| NetError::Trust(member.short(), e))?;
        let joined = self.join_with(&conn, member, &addr, token.as_ref()).await;
        if joined.is_err() && !was_trusted {
            if let Err(e) = self.book.lock().forget(&member) {
                tracing::warn!("forgetting {} after a failed join: {e}", member.short());
            }
        }
        joined
    }

    /// The join request on an open join connection, and its answers.
    async fn join_with(
        self: &Arc<Net>,
        conn: &quinn::Connection,
        member: NodeId,
        addr: &str,
        token: Option<&Token>,
    ) -> Result<NodeId, NetError> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(lost)?;
        send.write_all(&[TAG_JOIN]).await.map_err(lost)?;
        let request = JoinRequest::Join {
            secret: token.map(|t| t.secret),
            port: self.port,
        };
        write_frame(&mut send, &postcard::to_stdvec(&request).expect("encoding")).await?;
        let deadline = tokio::time::Instant::now() + JOIN_WAIT;
        loop {
            let frame = tokio::time::timeout_at(deadline, read_frame(&mut recv, SMALL_FRAME_MAX))
                .await
                .map_err(|_| NetError::JoinTimedOut)??
                .ok_or_else(|| NetError::Lost("the member closed the join".into()))?;
            let reply = postcard::from_bytes::<JoinReply>(&frame)
                .map_err(|e| NetError::Protocol(format!("join reply: {e}")))?;
            match reply {
                JoinReply::Pending => {
                    tracing::info!(
                        "join pending: on {} run `rsyncfs-node accept {}`",
                        addr,
                        self.me.long()
                    );
                }
                JoinReply::Refused { why } => return Err(NetError::Refused(why)),
                JoinReply::Accepted { members } => {
                    conn.close(quinn::VarInt::from_u32(0), b"joined");
                    let members = if self.introductions {
                        members
                    } else {
                        Vec::new()
                    };
                    for (m, a) in members.into_iter().take(PEERS_MAX) {
                        if m != self.me {
                            let _ = self.book.lock().trust(m, Some(a));
                            self.dial_soon(m);
                        }
                    }
                    self.dial_soon(member);
                    return Ok(member);
                }
            }
        }
    }

    pub(super) async fn serve_join(self: &Arc<Net>, conn: quinn::Connection, id: NodeId) {
        let result: Result<(), NetError> = async {
            let (mut send, mut recv) = conn.accept_bi().await.map_err(lost)?;
            let mut tag = [0u8; 1];
            recv.read_exact(&mut tag).await.map_err(lost)?;
            if tag[0] != TAG_JOIN {
                return Err(NetError::Protocol(format!(
                    "stream tag {} on a join connection",
                    tag[0]
                )));
            }
            let frame = read_frame(&mut recv, SMALL_FRAME_MAX)
                .await?
                .ok_or_else(|| NetError::Protocol("empty join request".into()))?;
            let JoinRequest::Join { secret, port } = postcard::from_bytes(&frame)
                .map_err(|e| NetError::Protocol(format!("join request: {e}")))?;
            let addr = SocketAddr::new(conn.remote_address().ip(), port).to_string();
            let invited = secret.is_some_and(|s| {
                let mut invites = self.joins.invites.lock();
                invites.retain(|i| i.until > Instant::now());
                invites.iter().any(|i| i.secret == s)
            });
            let trusted = self.book.lock().is_trusted(&id);
            if let (Some(_), false) = (secret, invited) {
                let reply = JoinReply::Refused {
                    why: "the token is unknown, expired or revoked".into(),
                };
                write_frame(&mut send, &postcard::to_stdvec(&reply).expect("encoding")).await?;
                let _ = send.finish();
                // Let the reply reach the joiner before the connection goes.
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                return Ok(());
            }
            if !invited && !trusted {
                let (tx, rx) = oneshot::channel();
                {
                    let mut pending = self.joins.pending.lock();
                    pending.retain(|p| p.id != id);
                    if pending.len() >= PENDING_JOINS_MAX {
                        return Err(NetError::Refused("too many pending joins".into()));
                    }
                    pending.push(PendingJoin {
                        id,
                        addr: addr.clone(),
                        since: std::time::SystemTime::now(),
                        accepted: Some(tx),
                    });
                }
                tracing::warn!(
                    "node {} at {addr} asks to join: `rsyncfs-node accept {}` lets it in",
                    id.short(),
                    id.long()
                );
                let pending = postcard::to_stdvec(&JoinReply::Pending).expect("encoding");
                write_frame(&mut send, &pending).await?;
                tokio::select! {
                    r = rx => r.map_err(|_| NetError::Stopping)?,
                    _ = conn.closed() => return Ok(()),
                }
            } else {
                self.book
                    .lock()
                    .trust(id, Some(addr.clone()))
                    .map_err(|e| NetError::Trust(id.short(), e))?;
            }
            let members = self.members_except(id);
            let reply = JoinReply::Accepted { members };
            write_frame(&mut send, &postcard::to_stdvec(&reply).expect("encoding")).await?;
            let _ = send.finish();
            tracing::info!("node {} at {addr} joined", id.short());
            self.introduce_everywhere(id, addr);
            self.dial_soon(id);
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!("join from {}: {e}", id.short());
            conn.close(
                quinn::VarInt::from_u32(CLOSE_PROTOCOL),
                e.to_string().as_bytes(),
            );
        }
    }

    /// Lets a pending node in (`rsyncfs-node accept`).
    pub fn accept(self: &Arc<Net>, id: NodeId) -> Result<(), NetError> {
        let entry = {
            let mut pending = self.joins.pending.lock();
            let i = pending
                .iter()
                .position(|p| p.id == id)
                .ok_or_else(|| NetError::NoSuchJoin(id.long()))?;
            pending.remove(i)
        };
        self.book
            .lock()
            .trust(id, Some(entry.addr.clone()))
            .map_err(|e| NetError::Trust(id.short(), e))?;
        if let Some(tx) = entry.accepted {
            let _ = tx.send(());
        } else {
            self.introduce_everywhere(id, entry.addr);
            self.dial_soon(id);
        }
        Ok(())
    }

    pub fn pending_joins(&self) -> Vec<(String, String, u64)> {
        self.joins
            .pending
            .lock()
            .iter()
            .map(|p| {
                (
                    p.id.long(),
                    p.addr.clone(),
                    p.since.elapsed().map_or(0, |d| d.as_secs()),
                )
            })
            .collect()
    }
}

fn parse_token(text: &str) -> Result<Token, NetError> {
    let body = text
        .trim()
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(NetError::Token("not an rsyncfs token"))?;
    let bytes = data_encoding::BASE32_NOPAD
        .decode(body.to_uppercase().as_bytes())
        .map_err(|_| NetError::Token("the token is damaged"))?;
    postcard::from_bytes(&bytes).map_err(|_| NetError::Token("the token is damaged"))
}
