//! The driver's side of the engine's contract, on a real directory and without FUSE or root:
//! what an apply does and refuses, who owns a staged file and until when, and that nothing a
//! peer names reaches outside the tree. (The engine's side is the simulator's.)

use rsyncfs_conflict::Meta;
use rsyncfs_mesh::engine::{Action, Apply, ApplyError, Source};
use rsyncfs_mesh::RelPath;
use rsyncfs_node::tree::{Mount, Parents, Tree};
use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

/// A mount stand-in: the paths a "local writer" holds open.
#[derive(Default)]
struct Writers(Mutex<BTreeSet<String>>);

impl Mount for Writers {
    fn busy(&self, path: &RelPath) -> bool {
        self.0.lock().unwrap().contains(path.as_str())
    }

    fn exclusive(&self, f: &mut dyn FnMut()) {
        f()
    }
}

fn path(p: &str) -> RelPath {
    RelPath::new(p).unwrap()
}

fn file_meta(data: &[u8], mode: u32) -> Meta {
    Meta::file(
        data.len() as u64,
        *blake3::hash(data).as_bytes(),
        mode,
        1_700_000_000_123_456_789,
    )
}

fn write(p: &str, expect: Option<Meta>, data: &[u8], source: Source) -> Apply {
    Apply {
        op: 1,
        path: path(p),
        expect,
        action: Action::Write {
            meta: file_meta(data, 0o640),
            source,
        },
    }
}

/// What observe says, without the owner (the test's meta carries none).
fn observed(tree: &Tree, p: &str) -> Option<Meta> {
    tree.observe(&path(p)).unwrap().map(|mut m| {
        m.owner = None;
        m
    })
}

fn staged(tree: &Tree, data: &[u8]) -> std::path::PathBuf {
    let (mut f, p) = tree.staging_file().unwrap();
    f.write_all(data).unwrap();
    p
}

fn open() -> (tempfile::TempDir, Tree) {
    let dir = tempfile::tempdir().unwrap();
    let tree = Tree::open(dir.path()).unwrap();
    (dir, tree)
}

#[test]
fn a_write_makes_the_file_and_the_directories_above_it() {
    let (_dir, tree) = open();
    let mount = Writers::default();
    let data = b"hello";
    let apply = write(
        "a/b/c.txt",
        None,
        data,
        Source::Inline(data.to_vec().into()),
    );
    tree.apply(&apply, None, &mount).unwrap();
    assert_eq!(observed(&tree, "a/b/c.txt"), Some(file_meta(data, 0o640)));
    assert!(observed(&tree, "a/b").unwrap().is_dir());
    // Applied again with the same expectation: what is there is no longer what it expected.
    assert_eq!(tree.apply(&apply, None, &mount), Err(ApplyError::Stale));
}

/// Names in a directory of the backing tree.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_new_file_has_no_name_until_its_commit_links_it() {
    let (_dir, tree) = open();
    let mount = Writers::default();
    fs::create_dir(tree.root().join("d")).unwrap();
    let tmp = tree.root().join(".rsyncfs/tmp");
    let applies: Vec<Apply> = (0..5)
        .map(|i| {
            let data = format!("file {i}\n");
            let mut a = write(
                &format!("d/f{i}"),
                None,
                data.as_bytes(),
                Source::Inline(data.clone().into_bytes().into()),
            );
            a.op = i;
            a
        })
        .collect();
    // Prepared as a worker's turn of many prepares them (closing what a syncfs covers).
    let mut prepared: Vec<_> = applies
        .iter()
        .map(|a| {
            let mut p = tree.prepare(a, None).unwrap();
            p.close_file();
            p
        })
        .collect();
    tree.make_durable(&prepared.iter().collect::<Vec<_>>())
        .unwrap();
    // Nothing shows yet, in the directory or in the state folder.
    assert!(names(&tree.root().join("d")).is_empty());
    assert!(names(&tmp).is_empty(), "{:?}", names(&tmp));
    // A local file appeared at one path meanwhile: that apply is stale and the file is kept.
    fs::write(tree.root().join("d/f3"), b"local").unwrap();
    let last = prepared.pop().unwrap();
    let raced = prepared.pop().unwrap();
    assert_eq!(
        tree.commit(&applies[3], raced, &mount),
        Err(ApplyError::Stale)
    );
    assert_eq!(fs::read(tree.root().join("d/f3")).unwrap(), b"local");
    prepared.push(last);
    for (i, p) in [0, 1, 2, 4].into_iter().zip(prepared) {
        tree.commit(&applies[i], p, &mount).unwrap();
        let data = format!("file {i}\n");
        assert_eq!(
            observed(&tree, &format!("d/f{i}")),
            Some(file_meta(data.as_bytes(), 0o640))
        );
    }
    assert_eq!(
        names(&tree.root().join("d")),
        ["f0", "f1", "f2", "f3", "f4"]
    );
    assert!(names(&tmp).is_empty());
}

#[test]
fn a_staged_content_stays_until_an_apply_consumes_it() {
    let (_dir, tree) = open();
    let mount = Writers::default();
    let data = vec![7u8; 300_000];
    let file = staged(&tree, &data);
    let apply = write("db", None, &data, Source::Staged(9));
    // A local writer holds the path: the apply waits, and the staged file is still there for
    // the retry (the bug that lost held-back updates).
    mount.0.lock().unwrap().insert("db".into());
    assert_eq!(
        tree.apply(&apply, Some(&file), &mount),
        Err(ApplyError::Busy)
    );
    assert!(
        file.exists(),
        "a refused apply must not take the staged file"
    );
    // Something else is at the path now: stale, and still there.
    mount.0.lock().unwrap().clear();
    fs::write(tree.root().join("db"), b"local").unwrap();
    assert_eq!(
        tree.apply(&apply, Some(&file), &mount),
        Err(ApplyError::Stale)
    );
    assert!(file.exists());
    // The expected state: consumed (renamed into place).
    fs::remove_file(tree.root().join("db")).unwrap();
    tree.apply(&apply, Some(&file), &mount).unwrap();
    assert!(!file.exists());
    assert_eq!(fs::read(tree.root().join("db")).unwrap(), data);
    // A staged content that is gone is said so, for the engine to fetch again.
    let apply = write("db2", None, &data, Source::Staged(10));
    assert_eq!(
        tree.apply(&apply, Some(&file), &mount),
        Err(ApplyError::StagedGone)
    );
    assert_eq!(
        tree.apply(&apply, None, &mount),
        Err(ApplyError::StagedGone)
    );
}

#[test]
fn removals_and_replacements_check_what_is_there() {
    let (_dir, tree) = open();
    let mount = Writers::default();
    fs::create_dir_all(tree.root().join("d/inner")).unwrap();
    let dir_meta = tree.observe(&path("d")).unwrap();
    let remove = Apply {
        op: 2,
        path: path("d"),
        expect: dir_meta.clone(),
        action: Action::Remove,
    };
    assert_eq!(tree.apply(&remove, None, &mount), Err(ApplyError::Stale));
    fs::remove_dir(tree.root().join("d/inner")).unwrap();
    tree.apply(&remove, None, &mount).unwrap();
    assert!(!tree.root().join("d").exists());
    // A file where a directory above should be: stale (a local change the engine has not
    // seen), and nothing is made.
    fs::write(tree.root().join("f"), b"x").unwrap();
    let apply = write("f/below", None, b"y", Source::Inline(b"y".to_vec().into()));
    assert_eq!(tree.apply(&apply, None, &mount), Err(ApplyError::Stale));
    assert_eq!(fs::read(tree.root().join("f")).unwrap(), b"x");
}

/// A worker observes a turn's paths through the directory it opened for the one before
/// (`observe_in`): it sees what `observe` sees, and a directory removed or replaced meanwhile
/// is not looked into again.
#[test]
fn observations_through_a_kept_directory_see_what_is_there() {
    let (_dir, tree) = open();
    let root = tree.root().to_path_buf();
    fs::create_dir_all(root.join("d/e")).unwrap();
    for (p, data) in [("top", "t"), ("d/a", "1"), ("d/b", "22"), ("d/e/c", "333")] {
        fs::write(root.join(p), data).unwrap();
    }
    let mut parents = Parents::default();
    for p in [
        "top",
        "d",
        "d/a",
        "d/b",
        "d/missing",
        "d/b",
        "d/e",
        "d/e/c",
        "top",
        "d/a",
    ] {
        assert_eq!(
            tree.observe_in(&mut parents, &path(p)).unwrap(),
            tree.observe(&path(p)).unwrap(),
            "{p}"
        );
    }
    // The kept directory is removed: nothing is there any more.
    assert!(tree
        .observe_in(&mut parents, &path("d/b"))
        .unwrap()
        .is_some());
    fs::rename(root.join("d"), root.join("gone")).unwrap();
    fs::remove_dir_all(root.join("gone")).unwrap();
    assert_eq!(tree.observe_in(&mut parents, &path("d/a")).unwrap(), None);
    // ... and made again: what the new one holds is seen, not the old one's.
    fs::create_dir(root.join("d")).unwrap();
    fs::write(root.join("d/a"), "new").unwrap();
    assert_eq!(
        tree.observe_in(&mut parents, &path("d/a"))
            .unwrap()
            .map(|m| m.content),
        Some(rsyncfs_conflict::Content::File {
            size: 3,
            hash: *blake3::hash(b"new").as_bytes()
        })
    );
    // Through a symlink put where the directory was, nothing is seen, as by `observe`.
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("a"), "secret").unwrap();
    fs::remove_dir_all(root.join("d")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("d")).unwrap();
    assert_eq!(tree.observe_in(&mut parents, &path("d/a")).unwrap(), None);
}

#[test]
fn nothing_reaches_outside_the_tree() {
    let (dir, tree) = open();
    let outside = tempfile::tempdir().unwrap();
    let mount = Writers::default();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("escape")).unwrap();
    let apply = write(
        "escape/planted",
        None,
        b"evil",
        Source::Inline(b"evil".to_vec().into()),
    );
    assert!(tree.apply(&apply, None, &mount).is_err());
    assert!(!outside.path().join("planted").exists());
    // Observing through the symlink sees nothing either.
    fs::write(outside.path().join("secret"), b"s").unwrap();
    assert_eq!(tree.observe(&path("escape/secret")).unwrap(), None);
    assert!(tree
        .read_small(&path("escape/secret"), &[0; 32], 1)
        .is_none());
    assert!(!Path::new(&outside.path().join("planted")).exists());
}

/// A file written all the time is read a bounded number of times and then left to its
/// writer's close (observing it once recursed for as long as the writer went on).
#[test]
fn a_file_that_keeps_changing_is_observed_a_bounded_number_of_times() {
    let (_dir, tree) = open();
    let file = tree.root().join("busy.log");
    fs::write(&file, vec![b'x'; 16 << 20]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (file, stop) = (file.clone(), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut f = fs::OpenOptions::new().append(true).open(file).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(b"more\n").unwrap();
            }
        })
    };
    let mut changing = 0;
    for _ in 0..5 {
        match tree.observe(&path("busy.log")) {
            Ok(Some(meta)) => assert!(meta.file_hash().is_some()),
            Ok(None) => panic!("the file vanished"),
            Err(rsyncfs_node::tree::ObserveError::Changing(_)) => changing += 1,
            Err(e) => panic!("{e}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    println!("{changing} of 5 observations gave up on a changing file");
    // Once the writer is done, it is observed as it is.
    assert!(tree.observe(&path("busy.log")).unwrap().is_some());
}

/// A file of three segments and a little, and the same with segment 1 changed.
fn three_segments() -> (Vec<u8>, Vec<u8>) {
    use rsyncfs_node::tree::segments::SEGMENT;
    let old: Vec<u8> = (0..3 * SEGMENT + 1000).map(|i| (i % 251) as u8).collect();
    let mut new = old.clone();
    new[SEGMENT as usize + 5..SEGMENT as usize + 70_000].fill(0xA5);
    (old, new)
}

/// Stages segment 1 of `new` as a patch of `old`.
fn staged_patch(tree: &Tree, old: &[u8], new: &[u8]) -> std::path::PathBuf {
    use rsyncfs_node::tree::in_place::Patch;
    use rsyncfs_node::tree::segments::SEGMENT;
    use std::os::unix::fs::FileExt;
    let (f, p) = tree.patch_staging_file().unwrap();
    let s = SEGMENT as usize;
    f.write_all_at(&new[s..2 * s], SEGMENT).unwrap();
    let patch = Patch {
        basis: (*blake3::hash(old).as_bytes(), old.len() as u64),
        size: new.len() as u64,
        segments: vec![1],
    };
    assert!(tree.remember_patch(&p, patch));
    p
}

#[test]
fn a_patch_is_written_into_the_file_in_place_when_it_holds_the_basis() {
    use std::os::unix::fs::MetadataExt;
    let (_dir, tree) = open();
    let mount = Writers::default();
    let (old, new) = three_segments();
    let target = tree.root().join("big");
    fs::write(&target, &old).unwrap();
    let before = tree.observe(&path("big")).unwrap().unwrap();
    let ino = fs::metadata(&target).unwrap().ino();
    let patch = staged_patch(&tree, &old, &new);
    let apply = write("big", Some(before.clone()), &new, Source::Staged(3));

    // Held open by a local writer: refused, the patch kept.
    mount.0.lock().unwrap().insert("big".into());
    assert_eq!(
        tree.apply(&apply, Some(&patch), &mount),
        Err(ApplyError::Busy)
    );
    assert!(patch.exists());
    mount.0.lock().unwrap().clear();

    tree.apply(&apply, Some(&patch), &mount).unwrap();
    assert_eq!(fs::read(&target).unwrap(), new);
    assert_eq!(observed(&tree, "big"), Some(file_meta(&new, 0o640)));
    if rsyncfs_node::tree::in_place::overwrites_in_place(fs::File::open(tree.root()).unwrap()) {
        assert_eq!(
            fs::metadata(&target).unwrap().ino(),
            ino,
            "updated in place"
        );
    } else {
        println!("this filesystem shares blocks between copies: no update in place to check");
    }
    assert!(!patch.exists(), "the patch is used up");
}

#[test]
fn a_patch_of_another_content_or_of_a_hard_linked_file_is_not_used() {
    let (_dir, tree) = open();
    let mount = Writers::default();
    let (old, new) = three_segments();
    let target = tree.root().join("big");
    // The file holds something else than the patch's basis (the engine expected that, after
    // a local write, say): the patch is of no use, and the engine fetches again.
    let mut other = old.clone();
    other[10] ^= 1;
    fs::write(&target, &other).unwrap();
    let now = tree.observe(&path("big")).unwrap().unwrap();
    let patch = staged_patch(&tree, &old, &new);
    let apply = write("big", Some(now), &new, Source::Staged(4));
    assert_eq!(
        tree.apply(&apply, Some(&patch), &mount),
        Err(ApplyError::StagedGone)
    );
    assert_eq!(fs::read(&target).unwrap(), other, "untouched");

    // The basis, but hard-linked: writing in place would change the other name too.
    fs::write(&target, &old).unwrap();
    fs::hard_link(&target, tree.root().join("link")).unwrap();
    let now = tree.observe(&path("big")).unwrap().unwrap();
    let apply = write("big", Some(now), &new, Source::Staged(4));
    assert_eq!(
        tree.apply(&apply, Some(&patch), &mount),
        Err(ApplyError::StagedGone)
    );
    assert_eq!(fs::read(tree.root().join("link")).unwrap(), old);
    assert!(!tree.updates_in_place(&fs::File::open(&target).unwrap(), 1 << 40));

    // A patch file the tree does not know (its list was lost): never taken for a content.
    tree.release_staged(&patch);
    assert!(!patch.exists());
    fs::write(&patch, b"stray").unwrap();
    fs::remove_file(tree.root().join("link")).unwrap();
    let now = tree.observe(&path("big")).unwrap().unwrap();
    let apply = write("big", Some(now), &new, Source::Staged(4));
    assert_eq!(
        tree.apply(&apply, Some(&patch), &mount),
        Err(ApplyError::StagedGone)
    );
    assert_eq!(fs::read(&target).unwrap(), old);
}

/// The extended attributes a file is observed with.
fn observed_xattrs(tree: &Tree, p: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    tree.observe(&path(p)).unwrap().expect("a file").xattrs
}

#[test]
fn an_attribute_set_after_a_file_was_seen_without_any_is_observed_also_after_a_restart() {
    let (dir, tree) = open();
    let file = dir.path().join("f");
    fs::write(&file, b"data").unwrap();
    // The first observation reads the attributes; the second answers from the hash cache.
    assert!(observed_xattrs(&tree, "f").is_empty());
    assert!(observed_xattrs(&tree, "f").is_empty());
    match rustix::fs::setxattr(&file, "user.k", b"v1", rustix::fs::XattrFlags::empty()) {
        Ok(()) => {}
        Err(rustix::io::Errno::NOTSUP) => {
            eprintln!("not run: the temporary directory's filesystem has no user attributes");
            return;
        }
        Err(e) => panic!("setxattr: {e}"),
    }
    let with = vec![(b"user.k".to_vec(), b"v1".to_vec())];
    assert_eq!(observed_xattrs(&tree, "f"), with);
    rustix::fs::removexattr(&file, "user.k").unwrap();
    assert!(observed_xattrs(&tree, "f").is_empty());
    // A restart answers from the cache on disk, which now says "no attributes".
    tree.flush_stamps(true);
    drop(tree);
    let tree = Tree::open(dir.path()).unwrap();
    assert!(observed_xattrs(&tree, "f").is_empty());
    rustix::fs::setxattr(&file, "user.k", b"v2", rustix::fs::XattrFlags::empty()).unwrap();
    assert_eq!(
        observed_xattrs(&tree, "f"),
        vec![(b"user.k".to_vec(), b"v2".to_vec())]
    );
}

/// The way an apply makes a file: a new one with no name in its directory, one through the
/// state folder (its directory is missing), and one from a staged fetch over an older file.
#[derive(Debug, Clone, Copy)]
enum Made {
    Anonymous,
    StateFolder,
    Staged,
}

#[test]
fn a_file_gets_exactly_its_mode_owner_and_attributes_however_it_is_made() {
    let (dir, tree) = open();
    let mount = Writers::default();
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("owners not checked: changing a file's owner needs root");
    }
    let xattrs = match rustix::fs::setxattr(
        dir.path(),
        "user.probe",
        b"",
        rustix::fs::XattrFlags::empty(),
    ) {
        Ok(()) => {
            rustix::fs::removexattr(dir.path(), "user.probe").unwrap();
            vec![(b"user.k".to_vec(), b"v".to_vec())]
        }
        Err(_) => {
            eprintln!("attributes not checked: the temporary directory's filesystem has no user attributes");
            Vec::new()
        }
    };
    // A set-group-id directory gives new files its group, which the record may not want.
    fs::create_dir(dir.path().join("sgid")).unwrap();
    if root {
        rustix::fs::chown(
            dir.path().join("sgid"),
            None,
            Some(rustix::fs::Gid::from_raw(4321)),
        )
        .unwrap();
    }
    rustix::fs::chmod(
        dir.path().join("sgid"),
        rustix::fs::Mode::from_raw_mode(0o2777),
    )
    .unwrap();
    let modes = [0o640, 0o000, 0o777, 0o4755, 0o2750, 0o1644, 0o6711];
    let owners: &[Option<(u32, u32)>] = if root {
        &[None, Some((0, 0)), Some((1234, 5678))]
    } else {
        &[None]
    };
    let mut n = 0;
    for made in [Made::Anonymous, Made::StateFolder, Made::Staged] {
        for &mode in &modes {
            for &owner in owners {
                for with_xattrs in [false, true] {
                    n += 1;
                    let data = format!("content {n}\n").into_bytes();
                    let mut meta = file_meta(&data, mode);
                    if let Some((uid, gid)) = owner {
                        meta = meta.with_owner(uid, gid);
                    }
                    if with_xattrs {
                        meta = meta.with_xattrs(xattrs.clone());
                    }
                    let (p, expect, staged_at) = match made {
                        Made::Anonymous => (format!("sgid/f{n}"), None, None),
                        Made::StateFolder => (format!("missing{n}/f"), None, None),
                        Made::Staged => {
                            let p = format!("sgid/s{n}");
                            let old = b"older".to_vec();
                            fs::write(tree.root().join(&p), &old).unwrap();
                            let expect = tree.observe(&path(&p)).unwrap();
                            (p, expect, Some(staged(&tree, &data)))
                        }
                    };
                    let source = match &staged_at {
                        Some(_) => Source::Staged(n),
                        None => Source::Inline(data.clone().into()),
                    };
                    let apply = Apply {
                        op: n,
                        path: path(&p),
                        expect,
                        action: Action::Write {
                            meta: meta.clone(),
                            source,
                        },
                    };
                    tree.apply(&apply, staged_at.as_deref(), &mount).unwrap();
                    let what = format!("{made:?} {mode:o} {owner:?} attributes {with_xattrs}");
                    let st = rustix::fs::stat(tree.root().join(&p)).unwrap();
                    assert_eq!(st.st_mode & 0o7777, mode, "{what}");
                    if let Some((uid, gid)) = owner {
                        assert_eq!((st.st_uid, st.st_gid), (uid, gid), "{what}");
                    }
                    let seen = tree.observe(&path(&p)).unwrap().expect("a file");
                    assert_eq!(seen.mode, mode, "{what}");
                    assert_eq!(seen.mtime_ns, meta.mtime_ns, "{what}");
                    assert_eq!(seen.xattrs, meta.xattrs, "{what}");
                    assert_eq!(fs::read(tree.root().join(&p)).unwrap(), data, "{what}");
                }
            }
        }
    }
}
