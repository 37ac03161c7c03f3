//! Versions of what peers replaced or removed: a node started with `--keep-versions` keeps the
//! local content an applied update replaces or removes (at most `--versions-max` per path),
//! never replicated; `versions PATH` lists them and `restore PATH [--version V]` writes one back
//! as a local write, which replicates. Real `up` processes; needs /dev/fuse and root
//! (elsewhere the test prints why it did not run).

mod common;

use common::{join, wait_for, Node};
use std::fs;

fn listed(n: &Node, path: &str) -> Vec<serde_json::Value> {
    let out = n.cmd(&["versions", path, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn replaced_and_removed_contents_are_kept_listed_and_restored() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let a = Node::start(dir.path(), "a");
    let mut b = Node::prepare(
        dir.path(),
        "b",
        "two-way",
        &["--keep-versions", "30d", "--versions-max", "2"],
    );
    b.run();
    join(&a, &b);
    let on = |n: &Node, want: &[u8]| fs::read(n.m("x")).is_ok_and(|c| c == want);

    fs::write(b.m("x"), b"b's own").unwrap();
    wait_for("b's x on a", common::CONVERGE, || on(&a, b"b's own"));
    assert!(listed(&b, "x").is_empty(), "b's own write replaced nothing");
    fs::write(a.m("x"), b"a1").unwrap();
    wait_for("a1 on b", common::CONVERGE, || on(&b, b"a1"));
    let v = listed(&b, "x");
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0]["size"], 7, "the content a1 replaced: b's own");
    for next in [b"a2", b"a3"] {
        fs::write(a.m("x"), next).unwrap();
        wait_for("the update on b", common::CONVERGE, || on(&b, next));
    }
    // a removes it: b keeps a3, and at most two in all.
    fs::remove_file(a.m("x")).unwrap();
    wait_for("the removal on b", common::CONVERGE, || !b.m("x").exists());
    let v = listed(&b, "x");
    assert_eq!(v.len(), 2, "{v:?}");
    let text = String::from_utf8(b.cmd(&["versions", "x"]).stdout).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");

    // The newest back, as a local write on b that reaches a; then the older one by its id.
    let out = b.cmd(&["restore", "x"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the restored a3 on a", common::CONVERGE, || on(&a, b"a3"));
    let older = v[1]["id"].as_str().unwrap();
    let out = b.cmd(&["restore", "x", "--version", older]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the older version on a", common::CONVERGE, || on(&a, b"a2"));
    assert!(on(&b, b"a2"));

    // Bad asks say why; a node without --keep-versions says so; nothing of it replicates.
    let out = b.cmd(&["restore", "x", "--version", "12-nope/../../etc"]);
    assert!(!out.status.success());
    let out = a.cmd(&["versions", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--keep-versions"));
    let t = common::tree(&a.mnt);
    assert!(t.keys().all(|k| !k.contains("versions")), "{t:#?}");
}
