//! Links as a user meets them when a peer dies: a killed peer is shown down within seconds, a
//! peer restarted right after a kill -9 is back and receiving within seconds, and nobody
//! redials in a storm. Real `up` processes on 127.0.0.1; needs /dev/fuse and root (elsewhere
//! each test prints why it did not run).

mod common;

use common::{joined_pair, wait_for};
use std::fs;
use std::time::{Duration, Instant};

fn connected_to(n: &common::Node, id: &str) -> bool {
    n.status()["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == id && p["connected"] == true)
}

/// "disconnected from" and "connected to" lines in a node's log: how often it redialled.
fn link_lines(n: &common::Node) -> usize {
    n.log_text()
        .lines()
        .filter(|l| l.contains("connected to ") || l.contains("disconnected from "))
        .count()
}

#[test]
fn a_killed_peer_is_seen_down_and_a_restarted_one_is_back_within_seconds() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let (a, mut b) = joined_pair(dir.path());
    let b_id = b.id();
    fs::write(a.m("before"), b"1").unwrap();
    wait_for("the first write on b", common::CONVERGE, || {
        b.m("before").exists()
    });

    let killed = Instant::now();
    b.crash();
    wait_for("a to see b down", Duration::from_secs(10), || {
        !connected_to(&a, &b_id)
    });
    let seen_down = killed.elapsed();
    println!(
        "b seen down {:.1} s after the kill",
        seen_down.as_secs_f64()
    );
    assert!(seen_down < Duration::from_secs(6), "{seen_down:?}");

    // Killed again, and restarted at once (before a can notice).
    b.restart();
    let restarted = Instant::now();
    b.crash();
    b.restart();
    let restarted_again = Instant::now();
    fs::write(a.m("after"), b"2").unwrap();
    wait_for(
        "the write after the restart on b",
        Duration::from_secs(10),
        || fs::read(b.m("after")).is_ok_and(|d| d == b"2"),
    );
    let back = restarted_again.elapsed();
    println!(
        "b receiving {:.1} s after its second restart ({:.1} s after the first)",
        back.as_secs_f64(),
        restarted.elapsed().as_secs_f64()
    );
    assert!(back < Duration::from_secs(4), "{back:?}");
    // No storm: a handful of link changes, not hundreds.
    std::thread::sleep(Duration::from_secs(2));
    let lines = link_lines(&a) + link_lines(&b);
    assert!(lines < 40, "{lines} link changes logged");
}

#[test]
fn a_refused_join_leaves_no_trace_and_says_why() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let mut a = common::Node::start(dir.path(), "a");
    let mut b = common::Node::start(dir.path(), "b");
    let out = a.cmd(&["invite"]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // Invitations live in the running member: after its restart this one is void.
    a.restart();
    let out = b.cmd(&["join", "--token", &token]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    println!("join with a void token: {stderr}");
    assert!(!out.status.success(), "a void token was accepted");
    assert!(
        stderr.contains("the token is unknown, expired or revoked"),
        "the joiner was not told the member's reason: {stderr}"
    );
    let peers = fs::read_to_string(b.state.join("peers.json")).unwrap_or_default();
    assert!(
        !peers.contains(&a.id()),
        "the refusing member stayed in peers.json: {peers}"
    );
    // Nothing to redial: the member sees (almost) no attempts after the joiner restarts.
    b.restart();
    std::thread::sleep(Duration::from_secs(3));
    let refusals = a
        .log_text()
        .lines()
        .filter(|l| l.contains("is not trusted"))
        .count();
    assert!(
        refusals <= 2,
        "{refusals} refused dials logged by the member"
    );
}

#[test]
fn an_invite_from_a_wildcard_listener_names_a_reachable_address() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let a = common::Node::prepare(dir.path(), "a", "two-way", &[]);
    let mut a = a.listening("0.0.0.0:0");
    a.run();
    let out = a.cmd(&["invite"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    println!("{stderr}");
    assert!(
        !stderr.contains("0.0.0.0"),
        "the invite names the wildcard: {stderr}"
    );
    // The token works: a node joins with it and receives.
    let b = common::Node::start(dir.path(), "b");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = b.cmd(&["join", "--token", &token]);
    assert!(
        out.status.success(),
        "join: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(a.m("hello"), b"hi").unwrap();
    wait_for("the write on b", common::CONVERGE, || {
        fs::read(b.m("hello")).is_ok_and(|d| d == b"hi")
    });
}

/// A node stopped while its peer writes, started again and written on at once: its dial and
/// the peer's redial cross, and whichever connection stays, the writes of both sides (one of
/// them to the same file) are on both within seconds, round after round.
#[test]
fn writes_cross_within_seconds_after_a_restart_whose_dials_cross() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let (a, mut b) = joined_pair(dir.path());
    for round in 0..6u64 {
        b.stop();
        let (from_a, from_b, raced) = (
            format!("from-a-{round}"),
            format!("from-b-{round}"),
            format!("raced-{round}"),
        );
        fs::write(a.m(&from_a), b"a").unwrap();
        fs::write(a.m(&raced), b"a's").unwrap();
        std::thread::sleep(Duration::from_millis(50 + 300 * round));
        b.run();
        fs::write(b.m(&from_b), b"b").unwrap();
        fs::write(b.m(&raced), b"b's").unwrap();
        let started = Instant::now();
        let tree = common::converge(&[&a, &b], |t| {
            t.contains_key(&from_a) && t.contains_key(&from_b) && t.contains_key(&raced)
        });
        let copies: Vec<Vec<u8>> = tree
            .keys()
            .filter(|k| k.starts_with(&raced) && k.contains(".sync-conflict-"))
            .map(|k| fs::read(a.m(k)).unwrap())
            .collect();
        let kept = fs::read(a.m(&raced)).unwrap();
        // Either b wrote before a's version reached it (a race: both kept), or after (b's
        // write replaced what it had seen).
        match copies.len() {
            0 => assert_eq!(kept, b"b's", "round {round}"),
            1 => {
                let mut both = vec![kept, copies[0].clone()];
                both.sort();
                assert_eq!(both, [b"a's".to_vec(), b"b's".to_vec()], "round {round}");
            }
            n => panic!("round {round}: {n} conflict copies of one race"),
        }
        println!(
            "round {round}: all writes on both {:.2} s after the restart ({})",
            started.elapsed().as_secs_f64(),
            if copies.is_empty() {
                "in order"
            } else {
                "raced"
            }
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}
