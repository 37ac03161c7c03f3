//! `rsyncfs-node status` as a person reads it.

use crate::control::Status;

/// How far this node is from holding what a peer holds (a first sync, or a catch-up): the
/// peer with the most files, while this node is busy and holds fewer.
pub(super) struct Progress {
    pub peer: String,
    pub files: u64,
    pub files_there: u64,
    pub bytes: u64,
    pub bytes_there: u64,
}

pub(super) fn progress(s: &Status) -> Option<Progress> {
    let p = s
        .peers
        .iter()
        .filter(|p| p.connected)
        .max_by_key(|p| p.their_files.unwrap_or(0))?;
    let (files_there, bytes_there) = (p.their_files?, p.their_bytes.unwrap_or(0));
    (!s.idle && s.files < files_there).then(|| Progress {
        peer: p.id.clone(),
        files: s.files,
        files_there,
        bytes: s.bytes,
        bytes_there,
    })
}

/// A bar of `width` characters, `done` of `of` filled.
fn bar(done: u64, of: u64, width: usize) -> String {
    let filled = if of == 0 {
        width
    } else {
        ((done.min(of) as u128 * width as u128) / of as u128) as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// The progress line: files and bytes done and left.
pub(super) fn progress_text(p: &Progress) -> String {
    format!(
        "{} of {} files ({} left), {} of {} ({} left), from {}",
        p.files,
        p.files_there,
        p.files_there.saturating_sub(p.files),
        bytes(p.bytes),
        bytes(p.bytes_there),
        bytes(p.bytes_there.saturating_sub(p.bytes)),
        p.peer
    )
}

pub(super) fn print(s: &Status) {
    println!("node      {} ({})", s.node, s.mode);
    println!("listening {}", s.listen);
    if let Some(m) = &s.metrics {
        println!("metrics   http://{m}/metrics, status page http://{m}/");
    }
    println!(
        "tree      {} files ({}), {} other entries, {} conflict copies (`rsyncfs-node conflicts`)",
        s.files,
        bytes(s.bytes),
        s.other_entries,
        s.conflicts
    );
    let state = if s.idle {
        "idle".to_string()
    } else {
        format!(
            "busy: {} paths pending here ({} of content to come){}",
            s.pending_paths,
            bytes(s.pending_bytes),
            if s.observing > 0 {
                format!(", {} paths to look at", s.observing)
            } else {
                String::new()
            }
        )
    };
    println!("state     {state}");
    if let Some(p) = progress(s) {
        println!(
            "receiving {} {}",
            bar(p.files, p.files_there, 30),
            progress_text(&p)
        );
    }
    if !s.idle && !s.busy_because.is_empty() {
        println!("because   {}", s.busy_because.join("; "));
    }
    if let Some(scan) = &s.scanning {
        println!(
            "scanning  {} of {} paths looked at ({} s so far)",
            scan.paths - scan.left,
            scan.paths,
            scan.for_s
        );
    }
    if s.waiting_paths > 0 {
        println!(
            "waiting   {} paths ({}) for peers that are down",
            s.waiting_paths,
            bytes(s.waiting_bytes)
        );
    }
    for f in &s.failing {
        println!(
            "failing   {}: {} (tried {} times; retrying)",
            f.path, f.error, f.retries
        );
    }
    let l = &s.latency_ms;
    if l.count > 0 {
        println!(
            "latency   p50 {:.1} ms, p99 {:.1} ms over the last {} peers' writes made while linked",
            l.p50.unwrap_or(0.0),
            l.p99.unwrap_or(0.0),
            l.count
        );
    }
    if s.caught_up > 0 {
        println!(
            "caught up {} earlier writes of peers (made while not linked)",
            s.caught_up
        );
    }
    if s.ignore.patterns > 0 || s.ignore.ignored_local + s.ignore.ignored_remote > 0 {
        println!(
            "ignored   {} changes here and {} of peers' ({} patterns in .rsyncfsignore, and the defaults)",
            s.ignore.ignored_local, s.ignore.ignored_remote, s.ignore.patterns
        );
    }
    for e in &s.ignore.errors {
        println!("ignore!   .rsyncfsignore {e}");
    }
    for p in &s.peers {
        println!(
            "peer      {} {} {}{}",
            p.id,
            p.addr.as_deref().unwrap_or("(no address)"),
            link_text(p),
            match p.behind {
                Some(n) if n > 0 => format!(", {n} of our records not yet acknowledged"),
                _ => String::new(),
            }
        );
    }
    for j in &s.pending_joins {
        println!(
            "join?     {} from {} (waiting {} s): rsyncfs-node accept {}",
            j.id, j.addr, j.waiting_s, j.id
        );
    }
    if !s.caches.is_empty() {
        let held: u64 = s.caches.iter().map(|c| c.bytes).sum();
        let budget: u64 = s.caches.iter().map(|c| c.budget_bytes).sum();
        println!(
            "caches    {} of their fixed {} (`status --json` lists each)",
            bytes(held),
            bytes(budget)
        );
    }
    for b in &s.bugs {
        println!("BUG       {b} (please report it)");
    }
}

/// `rsyncfs-node peers`: one line a trusted peer, with when it was last seen.
pub(super) fn print_peers(s: &Status) {
    if s.peers.is_empty() {
        println!("no peers: `rsyncfs-node invite` here, `rsyncfs-node join --token ...` there");
    }
    for p in &s.peers {
        let seen = match (p.connected, p.last_seen_ms) {
            (true, _) => format!(
                "connected for {}",
                humantime::format_duration(std::time::Duration::from_secs(
                    p.connected_for_s.unwrap_or(0)
                ))
            ),
            (false, Some(ms)) => {
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
                let ago = std::time::SystemTime::now()
                    .duration_since(at)
                    .map_or(0, |d| d.as_secs());
                format!(
                    "last seen {} ({} ago)",
                    humantime::format_rfc3339_seconds(at),
                    humantime::format_duration(std::time::Duration::from_secs(ago))
                )
            }
            (false, None) => "never seen".to_string(),
        };
        println!(
            "{}  {}  {}  {}",
            p.id,
            p.addr.as_deref().unwrap_or("(no address)"),
            link_text(p),
            seen
        );
    }
}

/// How a peer's link is: connected or not, and when it is, its round trip, its packet size
/// and the packets lost on it.
fn link_text(p: &crate::control::PeerStatus) -> String {
    if !p.connected {
        return "not connected".into();
    }
    let mut parts = Vec::new();
    if let Some(rtt) = p.rtt_ms {
        parts.push(format!("rtt {rtt:.1} ms"));
    }
    if let Some(mtu) = p.mtu {
        parts.push(format!("packets of {mtu} B"));
    }
    if let Some(lost) = p.lost_packets {
        parts.push(format!("{lost} lost"));
    }
    match p.black_holes {
        Some(n) if n > 0 => parts.push(format!("{n} MTU black holes")),
        _ => {}
    }
    if parts.is_empty() {
        "connected".into()
    } else {
        format!("connected ({})", parts.join(", "))
    }
}

/// Bytes as a person reads them.
pub(super) fn bytes(n: u64) -> String {
    crate::control::human_bytes(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_what_is_done() {
        assert_eq!(bar(0, 10, 10), "[----------]");
        assert_eq!(bar(5, 10, 10), "[#####-----]");
        assert_eq!(bar(12, 10, 10), "[##########]");
        assert_eq!(bar(0, 0, 4), "[####]");
    }
}
