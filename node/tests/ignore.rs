//! Ignore patterns as a user writes them: `.rsyncfsignore` at the root (gitignore syntax)
//! replicates like any file; what it names (and the defaults: editors' swap files and the
//! like) is neither sent nor applied, either way; a change to it takes effect without a restart,
//! and what is no longer ignored then crosses. Real `up` processes; needs /dev/fuse and root
//! (elsewhere the test prints why it did not run).

mod common;

use common::{joined_pair, wait_for};
use std::fs;
use std::time::Duration;

#[test]
fn ignored_paths_stay_where_they_were_written_until_the_rules_change() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let (a, b) = joined_pair(dir.path());
    fs::write(
        a.m(".rsyncfsignore"),
        "# build output\n*.log\n!keep.log\nbuild/\n",
    )
    .unwrap();
    wait_for("the rules on b", common::CONVERGE, || {
        fs::read_to_string(b.m(".rsyncfsignore")).is_ok_and(|t| t.contains("build/"))
    });
    fs::create_dir_all(a.m("build/obj")).unwrap();
    fs::write(a.m("build/obj/x.o"), b"object").unwrap();
    fs::write(a.m("x.log"), b"a's log").unwrap();
    fs::write(a.m("keep.log"), b"kept").unwrap();
    fs::create_dir(a.m("src")).unwrap();
    fs::write(a.m("src/.main.c.swp"), b"vim swap").unwrap();
    fs::write(a.m("src/main.c"), b"int main;").unwrap();
    fs::write(b.m("b.log"), b"b's log").unwrap();
    fs::write(b.m("from-b"), b"b").unwrap();
    wait_for("what is not ignored, both ways", common::CONVERGE, || {
        b.m("src/main.c").exists() && b.m("keep.log").exists() && a.m("from-b").exists()
    });
    // Anything ignored would have come with or before these; give it a moment more anyway.
    std::thread::sleep(Duration::from_secs(1));
    for (node, path) in [
        (&b, "x.log"),
        (&b, "build"),
        (&b, "src/.main.c.swp"),
        (&a, "b.log"),
    ] {
        assert!(!node.m(path).exists(), "{path} crossed to {}", node.name);
    }
    let s = a.status();
    assert_eq!(s["ignore"]["patterns"], 3, "{s}");
    assert!(s["ignore"]["ignored_local"].as_u64().unwrap() >= 4, "{s}");
    let text = String::from_utf8(a.cmd(&["status"]).stdout).unwrap();
    assert!(text.contains("ignored"), "{text}");

    // b stops ignoring logs (and says something that is not a pattern): both logs cross now,
    // without a restart; the build folder stays.
    fs::write(b.m(".rsyncfsignore"), "build/\n[z-a]\n").unwrap();
    wait_for("the logs, both ways", common::CONVERGE, || {
        b.m("x.log").exists() && a.m("b.log").exists()
    });
    assert_eq!(fs::read(b.m("x.log")).unwrap(), b"a's log");
    assert_eq!(fs::read(a.m("b.log")).unwrap(), b"b's log");
    assert!(!b.m("build").exists());
    let s = a.status();
    let errors = s["ignore"]["errors"].as_array().unwrap();
    assert!(
        errors.len() == 1 && errors[0].as_str().unwrap().starts_with("line 2"),
        "{s}"
    );
}
