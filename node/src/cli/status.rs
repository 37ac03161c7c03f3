//! `rsyncfs-node status` as a person reads it.

use crate::control::Status;

pub(super) fn print(s: &Status) {
    println!("node      {} ({})", s.node, s.mode);
    println!("listening {}", s.listen);
    println!(
        "state     {}, {} paths ({} bytes of content) pending, {} conflicts so far",
        if s.idle { "idle" } else { "busy" },
        s.pending_paths,
        s.pending_bytes,
        s.conflicts
    );
    for f in &s.failing {
        println!(
            "failing   {}: {} (tried {} times; retrying)",
            f.path, f.error, f.retries
        );
    }
    let l = &s.latency_ms;
    if l.count > 0 {
        println!(
            "latency   p50 {:.1} ms, p99 {:.1} ms over the last {} applied updates",
            l.p50.unwrap_or(0.0),
            l.p99.unwrap_or(0.0),
            l.count
        );
    }
    for p in &s.peers {
        println!(
            "peer      {} {} {}{}",
            p.id,
            p.addr.as_deref().unwrap_or("(no address)"),
            if p.connected {
                "connected"
            } else {
                "not connected"
            },
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
    for b in &s.bugs {
        println!("BUG       {b} (please report it)");
    }
}
