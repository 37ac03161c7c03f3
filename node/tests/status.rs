//! `status` tells the truth: latency only for writes made while the link was up (what was
//! caught up is counted apart), conflicts counted as `conflicts` lists them, work that waits
//! for a peer that is down kept apart from work here (and not "busy" forever), the tree's files
//! and bytes, its caches within their budgets; and changes made directly in the backing directory are found, by `rescan` and by
//! the periodic scan. Real `up` processes; needs /dev/fuse and root (elsewhere each test prints
//! why it did not run).

mod common;

use common::{joined_pair, wait_for, Node};
use std::fs;
use std::time::Duration;

#[test]
fn latency_counts_only_writes_made_while_linked() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let (a, mut b) = joined_pair(dir.path());
    b.stop();
    for i in 0..5 {
        fs::write(a.m(&format!("while-away-{i}")), b"old").unwrap();
    }
    // Old enough that their age would show as seconds of "latency".
    std::thread::sleep(Duration::from_secs(2));
    b.run();
    wait_for("b to catch up", common::CONVERGE, || {
        (0..5).all(|i| b.m(&format!("while-away-{i}")).exists())
    });
    let s = b.status();
    assert_eq!(s["latency_ms"]["count"], 0, "{s}");
    assert!(s["caught_up"].as_u64().unwrap() >= 5, "{s}");
    fs::write(a.m("live"), b"new").unwrap();
    wait_for("the live write on b", common::CONVERGE, || {
        b.m("live").exists()
    });
    wait_for("its latency", Duration::from_secs(5), || {
        b.status()["latency_ms"]["count"] == 1
    });
    let p50 = b.status()["latency_ms"]["p50"].as_f64().unwrap();
    println!("live write: {p50:.1} ms; 5 caught up, not counted");
    assert!(p50 < 1000.0, "{p50} ms");
}

#[test]
fn counts_and_waiting_work_are_what_they_say() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let (mut a, b) = joined_pair(dir.path());
    fs::create_dir(a.m("d")).unwrap();
    fs::write(a.m("d/one"), vec![1u8; 1000]).unwrap();
    fs::write(a.m("two"), vec![2u8; 234]).unwrap();
    wait_for("b to have both", common::CONVERGE, || {
        b.m("two").exists() && b.m("d/one").exists()
    });
    wait_for("the counts on b", Duration::from_secs(10), || {
        let s = b.status();
        s["files"] == 2 && s["bytes"] == 1234 && s["other_entries"] == 1
    });
    // Each cache within its fixed budget; the store's pages hold what b just wrote, and the
    // person's view sums them.
    for n in [&a, &b] {
        let s = n.status();
        let caches = s["caches"].as_array().expect("a list of caches");
        assert!(caches.len() >= 6, "{s}");
        for c in caches {
            let (held, budget) = (
                c["bytes"].as_u64().unwrap(),
                c["budget_bytes"].as_u64().unwrap(),
            );
            assert!(budget > 0 && held <= budget, "{c}");
        }
        let pages = caches
            .iter()
            .find(|c| c["name"] == "store's database pages")
            .expect("the store's pages");
        assert!(pages["bytes"].as_u64().unwrap() > 0, "{pages}");
        let out = n.cmd(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("\ncaches    "), "{text}");
    }
    // A race: both write one file while apart (b into its bare mount point while it is down,
    // which `up` takes in as a local write before it links); each lists and counts the same
    // copies.
    let mut b = b;
    b.stop();
    fs::write(a.m("raced"), b"a's").unwrap();
    fs::write(b.m("raced"), b"b's").unwrap();
    b.run();
    let copies = |n: &Node| {
        let out = n.cmd(&["conflicts", "--json"]);
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["live"] == true)
            .count() as u64
    };
    common::converge(&[&a, &b], |t| {
        t.keys().any(|k| k.contains(".sync-conflict-"))
    });
    for n in [&a, &b] {
        wait_for(
            "status to count the copies listed",
            Duration::from_secs(10),
            || n.status()["conflicts"].as_u64() == Some(copies(n)),
        );
        assert_eq!(copies(n), 1);
    }
    // A large file whose only source goes away mid-transfer: b waits for it, and says so, but
    // is not busy.
    fs::write(a.m("big"), vec![7u8; 256 << 20]).unwrap();
    wait_for("b to start on the big file", common::CONVERGE, || {
        b.status()["pending_bytes"].as_u64().unwrap_or(0) > 0
    });
    a.stop();
    wait_for("b to say it waits for a", Duration::from_secs(20), || {
        let s = b.status();
        s["waiting_paths"] == 1 && s["idle"] == true
    });
    a.run();
    wait_for("the big file on b", common::CONVERGE, || {
        fs::metadata(b.m("big")).is_ok_and(|m| m.len() == 256 << 20)
    });
    wait_for(
        "b idle with nothing waiting",
        Duration::from_secs(20),
        || {
            let s = b.status();
            s["waiting_paths"] == 0 && s["idle"] == true
        },
    );
}

#[test]
fn changes_made_in_the_backing_directory_are_found() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let mut a = Node::prepare(dir.path(), "a", "two-way", &["--scan-every", "3s"]);
    a.run();
    let b = Node::start(dir.path(), "b");
    common::join(&a, &b);
    // Straight into b's backing directory: b's periodic scan is the default (an hour), so
    // only `rescan` finds it.
    fs::write(b.b("behind-b"), b"x").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(!a.m("behind-b").exists());
    let out = b.cmd(&["rescan"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the rescanned file on a", common::CONVERGE, || {
        a.m("behind-b").exists()
    });
    // Straight into a's: its scan every 3 s finds it.
    fs::write(a.b("behind-a"), b"y").unwrap();
    wait_for(
        "the periodically scanned file on b",
        Duration::from_secs(15),
        || fs::read(b.m("behind-a")).is_ok_and(|d| d == b"y"),
    );
}

#[test]
fn the_start_up_scan_is_shown_as_such_until_it_is_done() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    const FILES: usize = 60_000;
    let mut a = Node::prepare(dir.path(), "a", "two-way", &[]);
    for d in 0..30 {
        let sub = a.backing.join(format!("d{d}"));
        fs::create_dir(&sub).unwrap();
        for f in 0..FILES / 30 {
            fs::write(sub.join(format!("f{f}")), format!("{d}/{f}")).unwrap();
        }
    }
    a.run();
    // The first answer comes while the scan runs: not idle, with its progress.
    let s = a.status();
    println!("at start: idle {}, scanning {}", s["idle"], s["scanning"]);
    assert_eq!(s["idle"], false, "{s}");
    let paths = s["scanning"]["paths"].as_u64().unwrap();
    assert_eq!(paths, FILES as u64 + 30, "{s}");
    wait_for("the scan to end", common::CONVERGE, || {
        let s = a.status();
        s["idle"] == true && s["scanning"].is_null()
    });
    let s = a.status();
    assert_eq!(s["files"], FILES as u64, "{s}");
    assert_eq!(s["other_entries"], 30, "{s}");
    // While it is down: a folder and part of another removed, and a file whose name sorts
    // between a folder and what is inside it ("d7" < "d7.txt" < "d7/f0"). The restart's scan
    // finds exactly those gone, though its paths reach the workers a part at a time.
    a.stop();
    fs::remove_dir_all(a.b("d3")).unwrap();
    for f in 0..100 {
        fs::remove_file(a.b(&format!("d7/f{f}"))).unwrap();
    }
    fs::write(a.b("d7.txt"), b"new").unwrap();
    a.run();
    wait_for("the restart's scan to end", common::CONVERGE, || {
        let s = a.status();
        s["idle"] == true && s["scanning"].is_null()
    });
    let s = a.status();
    let files = FILES - FILES / 30 - 100 + 1;
    assert_eq!(s["files"], files as u64, "{s}");
    assert_eq!(s["other_entries"], 29, "{s}");
    let log = a.log_text();
    let last = log.lines().rfind(|l| l.contains("rescan: ")).unwrap();
    let said = format!(
        "rescan: {} paths in the tree, {} gone",
        files + 29,
        FILES / 30 + 1 + 100
    );
    assert!(last.contains(&said), "{last}");
}
