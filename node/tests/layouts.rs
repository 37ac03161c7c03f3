//! Unsafe layouts are refused before anything is created, with a message that says why: a mount
//! point inside the backing directory (which hung the daemon), a state folder inside the tree
//! (which replicated the private key), the backing directory as its own mount point, a tree on
//! another rsyncfs mount, and a second node on one backing directory. Real `up` processes;
//! needs /dev/fuse and root (elsewhere each test prints why it did not run).

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `up` with these folders; it must exit (within 20 s) with an error. Returns its stderr.
fn refused(state: &Path, backing: &Path, mount: &Path) -> String {
    let mut child = Command::new(common::BIN)
        .args(["up", "--listen", "127.0.0.1:0", "--state"])
        .arg(state)
        .arg("--backing")
        .arg(backing)
        .arg("--mount")
        .arg(mount)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        if common::is_mounted(mount) {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
        panic!("up did not exit within 20 s");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "up accepted the layout: {stderr}");
    assert!(!common::is_mounted(mount), "up left a mount behind");
    stderr
}

/// Nothing of a node was made: no state folder, no `.rsyncfs` in the backing directory.
fn nothing_created(state: &Path, backing: &Path) {
    assert!(
        !state.join("identity.key").exists() && !state.join("store.redb").exists(),
        "state was written in {}",
        state.display()
    );
    assert!(
        !backing.join(".rsyncfs").exists(),
        "the backing directory was written to"
    );
}

#[test]
fn unsafe_layouts_are_refused_before_anything_is_made() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let root = dir.path();
    let backing = root.join("backing");
    let mount = root.join("mnt");
    fs::create_dir_all(&backing).unwrap();
    fs::create_dir_all(&mount).unwrap();
    let cases: Vec<(
        &str,
        std::path::PathBuf,
        std::path::PathBuf,
        std::path::PathBuf,
        &str,
    )> = vec![
        (
            "mount inside backing",
            root.join("state1"),
            backing.clone(),
            backing.join("inner"),
            "inside the backing directory",
        ),
        (
            "state inside backing",
            backing.join("state"),
            backing.clone(),
            mount.clone(),
            "private key",
        ),
        (
            "state inside the mount",
            mount.join("state"),
            backing.clone(),
            mount.clone(),
            "private key",
        ),
        (
            "backing = mount",
            root.join("state2"),
            backing.clone(),
            backing.clone(),
            "must be two folders",
        ),
        (
            "backing inside mount",
            root.join("state3"),
            mount.join("b"),
            mount.clone(),
            "inside the mount point",
        ),
        (
            "no mount point",
            root.join("state4"),
            backing.clone(),
            root.join("missing"),
            "create it with mkdir",
        ),
    ];
    for (name, state, b, m, why) in cases {
        fs::create_dir_all(&b).unwrap();
        if name == "mount inside backing" || name == "backing inside mount" {
            fs::create_dir_all(&m).unwrap();
        }
        let stderr = refused(&state, &b, &m);
        println!("{name}: {}", stderr.trim());
        assert!(stderr.contains(why), "{name}: {stderr}");
        nothing_created(&state, &b);
        // Clean for the next case.
        let _ = fs::remove_dir_all(backing.join("inner"));
        let _ = fs::remove_dir_all(mount.join("b"));
    }
}

#[test]
fn one_node_per_backing_directory_and_none_on_another_mount() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let a = common::Node::start(dir.path(), "a");
    // A second node, with its own state and mount, on a's backing directory.
    let (state, mount) = (dir.path().join("b-state"), dir.path().join("b-mnt"));
    fs::create_dir_all(&mount).unwrap();
    let stderr = refused(&state, &a.backing, &mount);
    println!("second node: {}", stderr.trim());
    assert!(
        stderr.contains("one node per backing directory"),
        "{stderr}"
    );
    // The same state folder twice.
    let stderr = refused(&a.state, &dir.path().join("b-backing-x"), &mount);
    assert!(stderr.contains("backing directory"), "{stderr}");
    fs::create_dir_all(dir.path().join("b-backing")).unwrap();
    let stderr = refused(&a.state, &dir.path().join("b-backing"), &mount);
    println!("same state: {}", stderr.trim());
    assert!(
        stderr.contains("is running with the state folder"),
        "{stderr}"
    );
    // A tree inside a's mount.
    let inner = a.m("inner-backing");
    fs::create_dir_all(&inner).unwrap();
    let stderr = refused(&dir.path().join("c-state"), &inner, &mount);
    println!("on another mount: {}", stderr.trim());
    assert!(stderr.contains("another rsyncfs mount"), "{stderr}");
    // a still serves.
    fs::write(a.m("still"), b"yes").unwrap();
    assert_eq!(fs::read(a.b("still")).unwrap(), b"yes");
}

#[test]
fn what_was_written_to_the_bare_mount_point_while_down_joins_the_tree() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let (mut a, b) = common::joined_pair(dir.path());
    // A file the tree holds, written again while a is down: the later version wins.
    fs::write(a.m("top"), b"old").unwrap();
    common::wait_for("the old version on b", common::CONVERGE, || {
        fs::read(b.m("top")).is_ok_and(|d| d == b"old")
    });
    a.crash();
    // The dead mount is cleared as a restart would, and a program writes to the path.
    let _ = Command::new("umount").arg("-l").arg(&a.mnt).status();
    fs::create_dir_all(a.mnt.join("while-down")).unwrap();
    fs::write(a.mnt.join("while-down/file"), b"written while a was down").unwrap();
    fs::write(a.mnt.join("top"), b"top").unwrap();
    a.run();
    common::wait_for("the rescued writes on b", common::CONVERGE, || {
        fs::read(b.m("while-down/file")).is_ok_and(|d| d == b"written while a was down")
            && fs::read(b.m("top")).is_ok_and(|d| d == b"top")
    });
    assert!(a.log_text().contains("before the mount covered it"));
}
