//! Membership as an operator runs it: `peers` (links and when each peer was last seen),
//! `forget` (a peer dropped here and, told, by the others; refused when it calls again; only a
//! new join brings it back), `leave`, and invitations revoked one by one or all at once. Real
//! `up` processes; needs /dev/fuse and root (elsewhere each test prints why it did not run).

mod common;

use common::{join, wait_for, Node};
use std::fs;
use std::time::Duration;

fn peer_ids(n: &Node) -> Vec<String> {
    n.status()["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn invite(n: &Node) -> String {
    let out = n.cmd(&["invite"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn peers_forget_leave_and_revoked_invitations() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let a = Node::start(dir.path(), "a");
    let b = Node::start(dir.path(), "b");
    let mut c = Node::start(dir.path(), "c");
    join(&a, &b);
    join(&a, &c);
    let (a_id, b_id, c_id) = (a.id(), b.id(), c.id());
    wait_for("a full mesh of three", Duration::from_secs(30), || {
        [&a, &b, &c].iter().all(|n| n.connected_peers() == 2)
    });

    // `peers`: both connected; c, stopped, last seen a moment ago.
    let out = a.cmd(&["peers"]);
    let listed = text(&out);
    assert!(out.status.success(), "{listed}");
    assert!(listed.contains(&b_id) && listed.contains(&c_id), "{listed}");
    assert_eq!(listed.matches("connected for").count(), 2, "{listed}");
    c.stop();
    wait_for("a to see c down", Duration::from_secs(30), || {
        a.connected_peers() == 1
    });
    let listed = text(&a.cmd(&["peers"]));
    let c_line = listed.lines().find(|l| l.contains(&c_id)).unwrap();
    assert!(
        c_line.contains("last seen") && c_line.contains("s ago"),
        "{listed}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&a.cmd(&["peers", "--json"]).stdout).unwrap();
    let seen = json
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == c_id.as_str())
        .unwrap()["last_seen_ms"]
        .as_u64()
        .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(now_ms - seen < 60_000, "{json}");
    c.run();
    wait_for("c back", Duration::from_secs(30), || {
        c.connected_peers() == 2
    });

    // `forget` by the short id: a drops c and tells b, which drops it too; c is refused.
    let out = a.cmd(&["forget", &c_id[..7]]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("told 1 peers"), "{}", text(&out));
    assert_eq!(peer_ids(&a), vec![b_id.clone()]);
    wait_for("b to forget c as told", Duration::from_secs(30), || {
        peer_ids(&b) == vec![a_id.clone()]
    });
    wait_for("c cut off", Duration::from_secs(30), || {
        c.connected_peers() == 0
    });
    fs::write(c.m("from-forgotten-c"), b"c").unwrap();
    fs::write(a.m("from-a"), b"a").unwrap();
    wait_for("a's write on b", common::CONVERGE, || {
        b.m("from-a").exists()
    });
    // c redials and is refused; nothing of it arrives, and it is not introduced back.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!a.m("from-forgotten-c").exists() && !b.m("from-forgotten-c").exists());
    assert!(!c.m("from-a").exists());
    assert!(!peer_ids(&a).contains(&c_id) && !peer_ids(&b).contains(&c_id));
    assert!(a.log_text().contains("not trusted"), "{}", a.log_text());

    // Invitations: one revoked by its token, then all; a revoked token is refused.
    let first = invite(&a);
    let out = a.cmd(&["revoke", &first]);
    assert!(text(&out).contains("revoked 1"), "{}", text(&out));
    let out = c.cmd(&["join", "--no-wait", "--token", &first]);
    assert!(!out.status.success());
    assert!(text(&out).contains("revoked"), "{}", text(&out));
    let _second = invite(&a);
    let _third = invite(&a);
    // Every invitation still valid: these two and the two the joins above used (a token lets
    // any number of nodes join within its hour).
    let out = a.cmd(&["revoke", "--all"]);
    assert!(text(&out).contains("revoked 4"), "{}", text(&out));
    assert!(
        !a.cmd(&["revoke", &first]).status.success(),
        "already revoked"
    );
    // A new join brings the forgotten c back.
    join(&a, &c);
    wait_for(
        "c's write on a after its new join",
        common::CONVERGE,
        || a.m("from-forgotten-c").exists(),
    );

    // `leave` on b: a forgets b, b forgets everyone; the tree stays on b.
    let out = b.cmd(&["leave"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("a and c to forget b", Duration::from_secs(30), || {
        !peer_ids(&a).contains(&b_id) && !peer_ids(&c).contains(&b_id)
    });
    assert!(peer_ids(&b).is_empty());
    assert!(b.m("from-a").exists());
    fs::write(a.m("after-b-left"), b"a").unwrap();
    wait_for("a's write on c", common::CONVERGE, || {
        c.m("after-b-left").exists()
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(!b.m("after-b-left").exists());
}
