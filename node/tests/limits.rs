//! A node started under a low limit of open files (1,024 is a common default; 256 here) raises
//! it to the hard limit (the logger's mount does, or further where it may), and takes a first
//! sync of many small files:
//! each new file holds a descriptor from its preparation until its commit, and a worker keeps up
//! to three turns of 512 in flight. Real `up` processes and mounts; needs /dev/fuse and root
//! (elsewhere it prints why it did not run).

mod common;

use common::{join, wait_for, Node};
use std::fs;

const FILES: usize = 3_000;

/// The soft and hard limits of open files of a process, from `/proc/PID/limits`.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a line for open files");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn a_low_open_files_limit_is_raised_and_a_first_sync_of_many_files_completes() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    // The member's tree is in its backing directory before it starts (its scan finds it).
    let mut a = Node::prepare(dir.path(), "a", "two-way", &[]);
    fs::create_dir_all(a.b("many")).unwrap();
    for i in 0..FILES {
        fs::write(a.b(&format!("many/f{i:05}")), format!("file {i}\n")).unwrap();
    }
    a.run();
    let mut b = Node::prepare(dir.path(), "b", "two-way", &[]).through(&[
        "prlimit",
        "--nofile=256:8192",
        "--",
    ]);
    b.run();
    let (soft, hard) = open_files_limit(b.pid().unwrap());
    assert!(
        soft >= 8192 && soft == hard,
        "the node did not raise its soft limit to the hard one: {soft} of {hard}"
    );
    join(&a, &b);
    wait_for("b to hold every file", common::CONVERGE, || {
        fs::read_dir(b.b("many")).map_or(0, |d| d.count()) >= FILES
    });
    for i in [0, FILES / 2, FILES - 1] {
        assert_eq!(
            fs::read_to_string(b.m(&format!("many/f{i:05}"))).unwrap(),
            format!("file {i}\n")
        );
    }
    let log = b.log_text();
    assert!(
        !log.contains("Too many open files") && !log.contains("panicked"),
        "{log}"
    );
}
