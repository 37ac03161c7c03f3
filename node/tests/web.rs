//! `up --metrics`: Prometheus text at `/metrics` with the peers, their links, the work, the
//! latency histogram, conflicts and traffic; and the status page at `/`, loaded in a real
//! headless browser (Chromium), showing the node, its peers, a race settled with a conflict
//! copy (its path escaped) and no errors. Real `up` processes; needs /dev/fuse and root, and
//! Chromium (`.ci/run` installs it; elsewhere the test prints why it did not run).

mod common;

use common::{join, wait_for, Node};
use std::fs;
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

/// One plain HTTP/1.0 GET: the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

/// The page as a headless Chromium renders it (its DOM), or `None` where there is no Chromium.
fn in_browser(url: &str, profile: &std::path::Path) -> Option<String> {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--timeout=20000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .output();
    match out {
        Ok(out) => {
            assert!(
                out.status.success(),
                "chromium: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Err(e) => {
            println!("chromium cannot run ({e}): the status page is not checked in a browser here");
            assert!(std::env::var("CI").is_err(), "CI installs chromium");
            None
        }
    }
}

#[test]
fn metrics_and_the_status_page_show_peers_work_conflicts_and_errors() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let mut a = Node::prepare(dir.path(), "a", "two-way", &["--metrics", "127.0.0.1:0"]);
    a.run();
    let mut b = Node::start(dir.path(), "b");
    join(&a, &b);
    let addr = a.status()["metrics"]
        .as_str()
        .expect("status names the metrics address")
        .to_string();
    let b_id = b.id();

    // A write from b, applied on a while linked: a latency.
    fs::write(b.m("from-b"), b"b").unwrap();
    wait_for("b's write on a", common::CONVERGE, || {
        a.m("from-b").exists()
    });
    // A race: the same new path on both while b is down, settled with a conflict copy.
    let racy = "race<b>.txt";
    b.stop();
    fs::write(a.m(racy), b"on a").unwrap();
    fs::write(b.b(racy), b"on b, while down").unwrap();
    b.run();
    wait_for("the race settled on a", common::CONVERGE, || {
        a.status()["recent_conflicts"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    });
    wait_for("b back on a's side", Duration::from_secs(30), || {
        a.connected_peers() == 1
    });

    let (code, text) = get(&addr, "/metrics");
    assert_eq!(code, 200, "{text}");
    for want in [
        format!("rsyncfs_peer_connected{{peer=\"{b_id}\"}} 1"),
        "rsyncfs_peers 1".to_string(),
        "rsyncfs_replication_latency_seconds_bucket{le=\"+Inf\"}".to_string(),
        "rsyncfs_replication_latency_seconds_count ".to_string(),
        "rsyncfs_conflicts_total ".to_string(),
        "rsyncfs_applies_total ".to_string(),
        "rsyncfs_pending_paths ".to_string(),
        "rsyncfs_failing_paths 0".to_string(),
        "rsyncfs_udp_sent_bytes_total ".to_string(),
        "# EOF".to_string(),
    ] {
        assert!(text.contains(&want), "no `{want}` in:\n{text}");
    }
    let count: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("rsyncfs_replication_latency_seconds_count "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(count >= 1, "{text}");
    let conflicts: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("rsyncfs_conflicts_total "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(conflicts >= 1, "{text}");
    assert_eq!(get(&addr, "/nothing-here").0, 404);

    let Some(dom) = in_browser(&format!("http://{addr}/"), &dir.path().join("chromium")) else {
        return;
    };
    let short = a.status()["short"].as_str().unwrap().to_string();
    for want in [
        format!("<span id=\"node\">{short}</span>"),
        "<table id=\"peers\">".to_string(),
        b_id.clone(),
        "connected".to_string(),
        "<table id=\"conflicts\">".to_string(),
        // The path is shown as text, never as markup.
        "race&lt;b&gt;.txt".to_string(),
        "id=\"no-errors\"".to_string(),
        "<table id=\"progress\">".to_string(),
    ] {
        assert!(dom.contains(&want), "no `{want}` in the page:\n{dom}");
    }
    assert!(!dom.contains("race<b>"), "{dom}");
}
