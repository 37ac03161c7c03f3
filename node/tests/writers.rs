//! Files a local program is still writing: a peer never shows an empty or partial file at the
//! path of a file whose writer closed it whole (a create used to be shipped before its content,
//! so peers showed new files empty until the close), and `open('w')` + write racing on two
//! nodes leaves no empty conflict copies. Real `up` processes; needs /dev/fuse and root
//! (elsewhere each test prints why it did not run).

mod common;

use common::{converge, joined_pair, Item};
use std::fs;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const FILES: usize = 20;

fn content(i: usize, round: usize) -> Vec<u8> {
    format!("file {i} round {round} ")
        .repeat(50 + i)
        .into_bytes()
}

#[test]
fn a_peer_never_shows_a_file_half_made() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let (a, b) = joined_pair(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let seen_bad = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (stop, seen_bad, mnt) = (Arc::clone(&stop), Arc::clone(&seen_bad), b.mnt.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for i in 0..FILES {
                    if let Ok(data) = fs::read(mnt.join(format!("f{i}"))) {
                        // Whole in some round, or nothing.
                        if !(0..2).any(|round| data == content(i, round)) {
                            seen_bad.lock().unwrap().push((i, data.len()));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    // Round 0 creates the files, round 1 rewrites them with open('w'); each writer pauses
    // between its two halves, as a program that computes what it writes does.
    for round in 0..2 {
        for i in 0..FILES {
            let data = content(i, round);
            let mut f = fs::File::create(a.m(&format!("f{i}"))).unwrap();
            f.write_all(&data[..data.len() / 2]).unwrap();
            std::thread::sleep(Duration::from_millis(40));
            f.write_all(&data[data.len() / 2..]).unwrap();
        }
        common::wait_for("b to have every file whole", common::CONVERGE, || {
            (0..FILES)
                .all(|i| fs::read(b.m(&format!("f{i}"))).is_ok_and(|d| d == content(i, round)))
        });
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let bad = seen_bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "b showed files empty or partial (file, size): {bad:?}"
    );
}

#[test]
fn racing_rewrites_leave_no_empty_conflict_copies() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let (a, b) = joined_pair(dir.path());
    for round in 0..5 {
        let name = format!("race{round}");
        let writers: Vec<_> = [&a, &b]
            .iter()
            .enumerate()
            .map(|(k, n)| {
                let path = n.m(&name);
                std::thread::spawn(move || {
                    let mut f = fs::File::create(path).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                    f.write_all(format!("written by {k} in round {round}").as_bytes())
                        .unwrap();
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let t = converge(&[&a, &b], |_| true);
    let empty: Vec<_> = t
        .iter()
        .filter(|(p, i)| {
            matches!(i, Item::File { .. }) && fs::metadata(a.m(p)).is_ok_and(|m| m.len() == 0)
        })
        .map(|(p, _)| p.clone())
        .collect();
    assert!(empty.is_empty(), "empty files after the races: {empty:?}");
    // Every write survived, at its path or in a conflict copy.
    let all = common::contents(&a.mnt);
    for round in 0..5 {
        for k in 0..2 {
            let w = format!("written by {k} in round {round}").into_bytes();
            assert!(all.contains(&w), "lost: {}", String::from_utf8_lossy(&w));
        }
    }
}
