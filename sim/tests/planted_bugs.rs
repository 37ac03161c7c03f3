//! The checker has teeth: a build with the `planted-bugs` feature, told to break a rule, fails a
//! 200-seed sweep, and the replay line it prints reproduces the failure exactly.
//!
//! This runs the real `rsyncfs-sim` command line, built with the feature into its own target
//! directory (the first run builds it, which takes a minute).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn planted_binary() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let target = root.join("target").join("planted-bugs");
        let status = Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(["build", "--quiet", "--release", "-p", "rsyncfs-sim"])
            .args(["--features", "planted-bugs", "--target-dir"])
            .arg(&target)
            .status()
            .expect("cargo runs");
        assert!(
            status.success(),
            "building rsyncfs-sim with planted-bugs failed"
        );
        target.join("release").join("rsyncfs-sim")
    })
}

fn sim(args: &[&str]) -> (bool, String) {
    let out = Command::new(planted_binary())
        .args(args)
        .output()
        .expect("rsyncfs-sim runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Sweeps 200 seeds with the bug planted, expects failures, and replays the first one.
fn caught(bug: &str, invariant: &str) {
    let (ok, out) = sim(&[
        "sweep",
        "--seeds",
        "0..200",
        "--nodes",
        "3",
        "--topology",
        "all",
        "--jobs",
        "2",
        "--planted-bug",
        bug,
    ]);
    assert!(!ok, "the sweep passed with {bug} planted:\n{out}");
    let summary = out
        .lines()
        .find(|l| l.ends_with(" failed") && l.contains(" passed, "))
        .expect("a summary line");
    let failed: u64 = summary
        .split(", ")
        .nth(1)
        .and_then(|f| f.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a count of failed seeds");
    assert!(failed > 0, "{summary}");
    println!("{bug}: {summary}");
    let replay = out
        .lines()
        .find_map(|l| l.strip_prefix("replay: rsyncfs-sim "))
        .expect("a replay line");
    assert!(replay.contains(&format!("--planted-bug {bug}")), "{replay}");
    let args: Vec<&str> = replay.split_whitespace().collect();
    let (ok1, first) = sim(&args);
    let (ok2, second) = sim(&args);
    assert!(!ok1 && !ok2, "the replay passed:\n{first}");
    assert!(
        first.contains(&format!("violated: {invariant}")),
        "the replay broke something else than {invariant}:\n{first}"
    );
    let digest = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("digest: "))
            .map(String::from)
    };
    assert_eq!(
        digest(&first),
        digest(&second),
        "the replay is not deterministic"
    );
    assert!(digest(&first).is_some());
}

#[test]
fn losing_conflict_copies_is_caught() {
    caught("lose-conflict-copy", "nothing lost");
}

#[test]
fn echo_is_caught() {
    caught("echo", "no echo");
}

#[test]
fn forgetting_staged_content_is_caught() {
    caught("forget-staged", "driver contract");
}

#[test]
fn giving_up_on_a_failed_apply_is_caught() {
    caught("give-up-on-error", "liveness");
}

#[test]
fn the_feature_alone_breaks_nothing() {
    let (ok, out) = sim(&["sweep", "--seeds", "0..20", "--nodes", "3", "--jobs", "2"]);
    assert!(ok, "{out}");
}
