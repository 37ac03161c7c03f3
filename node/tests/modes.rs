//! Send-only and receive-only nodes as a user runs them: real `up` processes, real mounts, real
//! QUIC on 127.0.0.1. Needs /dev/fuse and root; elsewhere each test prints why it did not run.

mod common;

use common::{converge, join, wait_for, Node};
use std::fs;
use std::time::Duration;

/// Waits until `node` has taken every record its peers sent and has nothing pending.
fn settled(node: &Node, records_at_least: u64) {
    wait_for(
        &format!("{} to take its peers' records", node.name),
        common::CONVERGE,
        || {
            let s = node.status();
            s["records_received"].as_u64().unwrap_or(0) >= records_at_least && s["idle"] == true
        },
    );
}

#[test]
fn a_send_only_node_ships_its_writes_and_applies_none() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let a = Node::start(dir.path(), "a");
    let s = Node::start_with(dir.path(), "s", "send-only");
    join(&a, &s);

    fs::write(s.m("from-send-only.txt"), b"shipped\n").unwrap();
    fs::create_dir(s.m("dir")).unwrap();
    fs::write(s.m("dir/inner"), vec![7u8; 300_000]).unwrap();
    wait_for("a to have s's writes", common::CONVERGE, || {
        fs::read(a.m("dir/inner")).is_ok_and(|d| d == vec![7u8; 300_000])
            && fs::read(a.m("from-send-only.txt")).is_ok_and(|d| d == b"shipped\n")
    });

    // a's writes reach s's engine (it hears them) but are not applied there.
    let before = s.status()["records_received"].as_u64().unwrap();
    fs::write(a.m("from-a.txt"), b"not for s\n").unwrap();
    fs::write(a.m("from-send-only.txt"), b"a's edit\n").unwrap();
    settled(&s, before + 2);
    assert!(!s.m("from-a.txt").exists(), "s applied a's new file");
    assert_eq!(fs::read(s.m("from-send-only.txt")).unwrap(), b"shipped\n");
    assert!(s.log_text().lines().all(|l| !l.contains("panicked")));
}

#[test]
fn a_receive_only_node_applies_and_refuses_local_writes() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let a = Node::start(dir.path(), "a");
    let r = Node::start_with(dir.path(), "r", "receive-only");
    join(&a, &r);

    fs::write(a.m("doc.txt"), b"from a\n").unwrap();
    fs::create_dir_all(a.m("x/y")).unwrap();
    fs::write(a.m("x/y/big"), vec![3u8; 500_000]).unwrap();
    converge(&[&a, &r], |t| {
        t.contains_key("doc.txt") && t.contains_key("x/y/big")
    });

    let err = fs::write(r.m("local.txt"), b"refused").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = fs::remove_file(r.m("doc.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    // Later changes keep arriving.
    fs::write(a.m("doc.txt"), b"edited on a\n").unwrap();
    fs::remove_file(a.m("x/y/big")).unwrap();
    converge(&[&a, &r], |t| !t.contains_key("x/y/big"));
    assert_eq!(fs::read(r.m("doc.txt")).unwrap(), b"edited on a\n");
    wait_for("r to be idle", Duration::from_secs(10), || {
        r.status()["idle"] == true
    });
}
