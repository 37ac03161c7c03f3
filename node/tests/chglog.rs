//! `chglog` as the 2005 proposal meant it: the running node's changed paths feeding a loop of
//! real rsync runs (`--batch`), a run that fails getting its paths again, lists on standard
//! output; and the printing commands ending quietly when their reader goes away. Real `up`
//! processes and a real rsync; needs /dev/fuse and root (elsewhere each test prints why it did
//! not run).

mod common;

use common::{wait_for, Node, BIN};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `chglog` process, stopped by its pid when dropped (also when the test fails).
struct Chglog(Child);

impl Drop for Chglog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Chglog {
    fn start(node: &Node, args: &[&str], stdout: Stdio, stderr: &Path) -> Chglog {
        Chglog(
            Command::new(BIN)
                .args(["chglog", "--state"])
                .arg(&node.state)
                .args(args)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(fs::File::create(stderr).unwrap())
                .spawn()
                .unwrap(),
        )
    }

    fn still_running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

/// Every file under `root` with its content, and every directory (content `None`).
fn files(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Option<Vec<u8>>>) {
        for e in fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if path.is_dir() {
                out.insert(rel, None);
                walk(root, &path, out);
            } else {
                out.insert(rel, Some(fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Writes `path` on the mount until `seen` says the change arrived where it should (the reader
/// may not be subscribed yet when the first write happens). A file beside it is written before
/// each try, since the daemon passes a path changed twice in a row on once.
fn until_seen(path: &Path, mut seen: impl FnMut() -> bool) {
    let mut round = 0u32;
    let mut nudge = path.as_os_str().to_owned();
    nudge.push(".nudge");
    wait_for(
        "chglog to pass a first change on",
        Duration::from_secs(30),
        || {
            round += 1;
            fs::write(&nudge, format!("{round}")).unwrap();
            fs::write(path, format!("ready {round}")).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            seen()
        },
    );
}

fn rsync_missing() -> bool {
    let found = Command::new("rsync").arg("--version").output().is_ok();
    if !found {
        println!("rsync is not installed: this test needs a real rsync (.ci/run installs it)");
        assert!(std::env::var("CI").is_err(), "CI must have rsync");
    }
    !found
}

#[test]
fn batches_feed_a_loop_of_real_rsync_runs() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    if rsync_missing() {
        return;
    }
    let a = Node::start(dir.path(), "a");
    let copy = dir.path().join("copy");
    fs::create_dir(&copy).unwrap();
    let source = format!("{}/", a.mnt.display());
    let target = format!("{}/", copy.display());
    let err = dir.path().join("chglog.err");
    let mut chglog = Chglog::start(
        &a,
        &[
            "--from0",
            "--batch",
            "0.2",
            "--",
            "rsync",
            "-ar",
            "--from0",
            "--files-from=-",
            "--no-implied-dirs",
            "--delete-missing-args",
            "--force",
            &source,
            &target,
        ],
        Stdio::null(),
        &err,
    );
    until_seen(&a.m("ready"), || copy.join("ready").exists());
    // Files, a directory with files, an overwrite, made while earlier runs may be going.
    fs::create_dir(a.m("d")).unwrap();
    fs::write(a.m("d/one"), b"one").unwrap();
    fs::write(a.m("d/two"), vec![7u8; 300_000]).unwrap();
    fs::write(a.m("top"), b"first").unwrap();
    fs::write(a.m("top"), b"second").unwrap();
    let same = || files(&a.mnt) == files(&copy);
    wait_for(
        "the copy to hold what the mount holds",
        Duration::from_secs(30),
        same,
    );
    assert_eq!(fs::read(copy.join("top")).unwrap(), b"second");
    // A removal, then a directory renamed: both reach the copy.
    fs::remove_file(a.m("d/one")).unwrap();
    wait_for("the removal in the copy", Duration::from_secs(30), || {
        !copy.join("d/one").exists()
    });
    fs::rename(a.m("d"), a.m("e")).unwrap();
    wait_for("the rename in the copy", Duration::from_secs(30), same);
    assert!(copy.join("e/two").exists() && !copy.join("d").exists());
    assert!(
        chglog.still_running(),
        "{}",
        fs::read_to_string(&err).unwrap()
    );
    // Nothing failed for good: no list is being tried again (rsync's "vanished" is done).
    let said = fs::read_to_string(&err).unwrap();
    assert!(!said.contains("not listed"), "{said}");
    std::thread::sleep(Duration::from_secs(2));
    let said = fs::read_to_string(&err).unwrap();
    assert!(!said.contains("go again"), "{said}");
}

#[test]
fn a_failed_run_gets_its_paths_again_and_lists_go_to_standard_output() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let a = Node::start(dir.path(), "a");
    let flag: PathBuf = dir.path().join("may-succeed");
    let got = dir.path().join("lists");
    // Fails (reading its list first) until the flag exists, then keeps each list it is given.
    let script = format!(
        "if [ -e '{}' ]; then cat >> '{}'; else cat > /dev/null; exit 3; fi",
        flag.display(),
        got.display()
    );
    let err = dir.path().join("chglog.err");
    let _runs = Chglog::start(
        &a,
        &["--batch", "0.1", "--", "sh", "-c", &script],
        Stdio::null(),
        &err,
    );
    let failed = || {
        fs::read_to_string(&err)
            .unwrap_or_default()
            .contains("go again")
    };
    until_seen(&a.m("early"), failed);
    fs::write(a.m("kept"), b"x").unwrap();
    fs::write(&flag, b"").unwrap();
    // The failed list's paths come with the next run, after the backoff.
    wait_for(
        "the failed paths in a later run",
        Duration::from_secs(30),
        || {
            let lists = fs::read_to_string(&got).unwrap_or_default();
            lists.lines().any(|l| l == "early") && lists.lines().any(|l| l == "kept")
        },
    );
    let said = fs::read_to_string(&err).unwrap();
    assert!(said.contains("`sh` exit status: 3"), "{said}");

    // Without a command: each list on standard output, an empty line after it.
    let err2 = dir.path().join("chglog2.err");
    let mut printing = Chglog::start(&a, &["--batch", "0.1"], Stdio::piped(), &err2);
    // Its lines, read on a thread of their own, so that a missing list fails the wait below
    // instead of blocking it.
    let out = BufReader::new(printing.0.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in out.lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let mut list = Vec::new();
    let mut whole = None;
    until_seen(&a.m("printed"), || {
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            if !line.is_empty() {
                list.push(line);
            } else if list.iter().any(|l| l == "printed") {
                whole = Some(std::mem::take(&mut list));
                return true;
            } else {
                list.clear();
            }
        }
        false
    });
    let list = whole.unwrap();
    assert!(list.iter().all(|l| !l.is_empty()), "{list:?}");
    let mut sorted = list.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(list, sorted, "a list is sorted, each path once");
}

#[test]
fn printing_commands_end_quietly_when_their_reader_goes_away() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let a = Node::start(dir.path(), "a");
    // As `rsyncfs-node status | head -1` once the head has gone: a pipe nobody reads.
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["conflicts", "--json"],
        vec!["id"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(BIN)
            .arg(args[0])
            .arg("--state")
            .arg(&a.state)
            .args(&args[1..])
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.is_empty(), "{args:?} said: {said}");
        assert!(
            !out.status.success(),
            "{args:?} cannot have written its output"
        );
    }
}
