//! A tar of a real tree of 100,000 entries (directories, symlinks and files of up to 16 KiB
//! from this machine's /usr) extracted onto a node's mount, as a user restoring a backup would:
//! it must succeed (the logger once ran out of file descriptors at about 20,000 inodes and
//! failed thousands of opens with EMFILE) and the peer must end with the same tree. Real `up`
//! processes; needs /dev/fuse and root (elsewhere the test prints why it did not run).

mod common;

use common::{joined_pair, tree};
use std::process::Command;
use std::time::{Duration, Instant};

const ENTRIES: usize = 100_000;
/// Fewer entries than this on the machine, and the test says so and fails: it would not show
/// what it is for.
const ENTRIES_MIN: usize = 50_000;

#[test]
fn a_tar_of_a_real_tree_onto_the_mount_replicates_whole() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    // The list and the archive, beside the nodes (not on a mount).
    let list = dir.path().join("list");
    let archive = dir.path().join("tree.tar");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find /usr -xdev \\( -type d -o -type l -o \\( -type f -size -16k \\) \\) \
             2>/dev/null | head -{ENTRIES} > {}",
            list.display()
        ))
        .status()
        .unwrap();
    assert!(out.success());
    let entries = std::fs::read_to_string(&list).unwrap().lines().count();
    assert!(
        entries >= ENTRIES_MIN,
        "only {entries} entries under /usr on this machine"
    );
    let out = Command::new("tar")
        .args(["--no-recursion", "-cf"])
        .arg(&archive)
        .arg("-T")
        .arg(&list)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (a, b) = joined_pair(dir.path());
    let started = Instant::now();
    let out = Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&a.mnt)
        .output()
        .unwrap();
    let extracted = started.elapsed();
    assert!(
        out.status.success(),
        "tar onto the mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Both replicas hold what the archive holds (`find` lists the root too; the mount's
    // root is not an entry of the tree).
    let deadline = Instant::now() + Duration::from_secs(900);
    let (ta, tb) = loop {
        let idle = a.status()["idle"] == true && b.status()["idle"] == true;
        if idle {
            let (ta, tb) = (tree(&a.mnt), tree(&b.mnt));
            if ta == tb && ta.len() + 1 >= entries {
                break (ta, tb);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the replicas did not agree within 15 minutes"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    println!(
        "{entries} entries: extracted onto the mount in {:.1} s, on both replicas {:.1} s after the start; {} paths compared",
        extracted.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        tb.len()
    );
    assert_eq!(ta, tb);
    // Nothing failed on the way.
    for n in [&a, &b] {
        let s = n.status();
        assert!(s["bugs"].as_array().unwrap().is_empty(), "{s}");
        assert!(
            !n.log_text().contains("Too many open files"),
            "{} ran out of descriptors",
            n.name
        );
    }
}
