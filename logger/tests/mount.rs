//! Real mounts: the logger over a temporary backing directory. These need /dev/fuse and root;
//! elsewhere each test prints why it did not run.

use rsyncfs_logger::{mount_over, Change, ChangeKind, Mode, Mounted, Transport};
use std::collections::BTreeMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

macro_rules! need_fuse {
    () => {
        if !rsyncfs_logger::fuse_tests_can_run() {
            return;
        }
    };
}

struct Fixture {
    _dir: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    mounted: Option<Mounted>,
}

impl Fixture {
    fn new(mode: Mode) -> Fixture {
        Fixture::over(mode, Transport::Auto)
    }

    fn over(mode: Mode, transport: Transport) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        let mounted = mount_over(&backing, &mnt, mode, false, transport).expect("mount");
        Fixture {
            _dir: dir,
            backing,
            mnt,
            mounted: Some(mounted),
        }
    }

    fn changes(&self) -> Vec<Change> {
        std::thread::sleep(Duration::from_millis(50));
        self.mounted
            .as_ref()
            .unwrap()
            .changes()
            .try_iter()
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            m.unmount().expect("unmount");
        }
    }
}

/// A scripted run of file operations; each step records its result or errno.
fn script(root: &Path) -> Vec<String> {
    let mut log = Vec::new();
    let p = |name: &str| root.join(name);
    let mut note = |what: &str, r: std::io::Result<String>| {
        log.push(match r {
            Ok(v) => format!("{what}: ok {v}"),
            Err(e) => format!("{what}: errno {:?}", e.raw_os_error()),
        })
    };
    note(
        "write",
        fs::write(p("a.txt"), b"hello world").map(|_| String::new()),
    );
    note(
        "read",
        fs::read(p("a.txt")).map(|d| String::from_utf8_lossy(&d).into_owned()),
    );
    note(
        "create excl existing",
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p("a.txt"))
            .map(|_| String::new()),
    );
    note("mkdir", fs::create_dir(p("d")).map(|_| String::new()));
    note("mkdir again", fs::create_dir(p("d")).map(|_| String::new()));
    note(
        "write inside",
        fs::write(p("d/inner"), b"x").map(|_| String::new()),
    );
    note(
        "rmdir non-empty",
        fs::remove_dir(p("d")).map(|_| String::new()),
    );
    note(
        "unlink a directory",
        fs::remove_file(p("d")).map(|_| String::new()),
    );
    note(
        "read missing",
        fs::read(p("missing")).map(|_| String::new()),
    );
    note(
        "symlink",
        std::os::unix::fs::symlink("a.txt", p("link")).map(|_| String::new()),
    );
    note(
        "readlink",
        fs::read_link(p("link")).map(|t| t.display().to_string()),
    );
    note(
        "hard link",
        fs::hard_link(p("a.txt"), p("hard")).map(|_| String::new()),
    );
    note(
        "nlink",
        fs::metadata(p("a.txt")).map(|m| m.nlink().to_string()),
    );
    note(
        "chmod",
        fs::set_permissions(p("a.txt"), fs::Permissions::from_mode(0o640)).map(|_| String::new()),
    );
    note(
        "mode",
        fs::metadata(p("a.txt")).map(|m| format!("{:o}", m.mode() & 0o7777)),
    );
    note(
        "truncate",
        fs::OpenOptions::new()
            .write(true)
            .open(p("a.txt"))
            .and_then(|f| f.set_len(5))
            .map(|_| String::new()),
    );
    note(
        "read truncated",
        fs::read(p("a.txt")).map(|d| String::from_utf8_lossy(&d).into_owned()),
    );
    note(
        "append",
        fs::OpenOptions::new()
            .append(true)
            .open(p("a.txt"))
            .and_then(|mut f| f.write_all(b"++"))
            .map(|_| String::new()),
    );
    note(
        "overwrite (O_TRUNC)",
        fs::write(p("d/inner"), b"shorter").map(|_| String::new()),
    );
    note(
        "read overwritten",
        fs::read(p("d/inner")).map(|d| String::from_utf8_lossy(&d).into_owned()),
    );
    note(
        "read appended",
        fs::read(p("a.txt")).map(|d| String::from_utf8_lossy(&d).into_owned()),
    );
    note(
        "rename noreplace onto existing",
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            p("hard"),
            rustix::fs::CWD,
            p("d/inner"),
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map(|_| String::new())
        .map_err(std::io::Error::from),
    );
    note(
        "rename exchange",
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            p("hard"),
            rustix::fs::CWD,
            p("d/inner"),
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .map(|_| String::new())
        .map_err(std::io::Error::from),
    );
    note(
        "read exchanged",
        fs::read(p("hard")).map(|d| String::from_utf8_lossy(&d).into_owned()),
    );
    note(
        "setxattr",
        rustix::fs::setxattr(
            p("a.txt").as_path(),
            "user.colour",
            b"blue",
            rustix::fs::XattrFlags::empty(),
        )
        .map(|_| String::new())
        .map_err(std::io::Error::from),
    );
    let mut buf = [0u8; 64];
    note(
        "getxattr",
        rustix::fs::getxattr(p("a.txt").as_path(), "user.colour", &mut buf[..])
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
            .map_err(std::io::Error::from),
    );
    note(
        "getxattr missing",
        rustix::fs::getxattr(p("a.txt").as_path(), "user.none", &mut buf[..])
            .map(|_| String::new())
            .map_err(std::io::Error::from),
    );
    // While a file is open its extended attributes are read through the open descriptor.
    let held = fs::OpenOptions::new().append(true).open(p("a.txt"));
    note(
        "getxattr while open",
        rustix::fs::getxattr(p("a.txt").as_path(), "user.colour", &mut buf[..])
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
            .map_err(std::io::Error::from),
    );
    note(
        "getxattr size while open",
        rustix::fs::getxattr(p("a.txt").as_path(), "user.colour", &mut [0u8; 0][..])
            .map(|n| n.to_string())
            .map_err(std::io::Error::from),
    );
    note(
        "getxattr too small while open",
        rustix::fs::getxattr(p("a.txt").as_path(), "user.colour", &mut buf[..2])
            .map(|n| n.to_string())
            .map_err(std::io::Error::from),
    );
    note(
        "getxattr missing while open",
        rustix::fs::getxattr(p("a.txt").as_path(), "user.none", &mut buf[..])
            .map(|_| String::new())
            .map_err(std::io::Error::from),
    );
    note(
        "terminal attributes of a file",
        held.as_ref()
            .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(0)))
            .and_then(|f| {
                rustix::termios::tcgetattr(f)
                    .map(|_| String::new())
                    .map_err(std::io::Error::from)
            }),
    );
    drop(held);
    note(
        "sparse file",
        (|| {
            let mut f = fs::File::create(p("sparse"))?;
            f.seek(SeekFrom::Start(1 << 20))?;
            f.write_all(b"end")?;
            let data = rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(0))
                .map_err(std::io::Error::from)?;
            let hole = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(0))
                .map_err(std::io::Error::from)?;
            Ok(format!("data at {data}, hole at {hole}"))
        })(),
    );
    note(
        "mkfifo",
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p("fifo").as_path(),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o640),
            0,
        )
        .map(|_| String::new())
        .map_err(std::io::Error::from),
    );
    note(
        "fifo kind",
        fs::symlink_metadata(p("fifo")).map(|m| {
            format!(
                "{:?}",
                std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type())
            )
        }),
    );
    note(
        "rmdir missing",
        fs::remove_dir(p("nope")).map(|_| String::new()),
    );
    note("unlink", fs::remove_file(p("link")).map(|_| String::new()));
    note("readdir", {
        let mut names: Vec<String> = fs::read_dir(root)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        Ok(names.join(","))
    });
    log
}

/// Everything about a tree that must match: kind, mode, size, content, target, links, xattrs.
fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if rel == ".rsyncfs" {
                continue;
            }
            let m = fs::symlink_metadata(&path).unwrap();
            let mut list = [0u8; 256];
            let xattrs = rustix::fs::llistxattr(path.as_path(), &mut list[..]).unwrap_or(0);
            let what = if m.is_dir() {
                walk(root, &path, out);
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else if !m.is_file() {
                format!("special {:o}", m.mode() & 0o170000)
            } else {
                format!(
                    "file {:?} nlink {}",
                    fs::read(&path).unwrap().len(),
                    m.nlink()
                )
            };
            out.insert(
                rel,
                format!(
                    "{what} mode {:o} xattrs {:?}",
                    m.mode() & 0o7777,
                    &list[..xattrs]
                ),
            );
        }
    }
    walk(root, root, &mut out);
    out
}

#[test]
fn operations_behave_as_on_the_backing_filesystem() {
    need_fuse!();
    // The mount clears this process's umask (the kernel applied the caller's already), and the
    // caller here is this process: the native run must see the same umask, whichever test
    // mounted first.
    rustix::process::umask(rustix::fs::Mode::empty());
    let native = tempfile::tempdir().unwrap();
    let expected = script(native.path());
    let f = Fixture::new(Mode::ReadWrite);
    let got = script(&f.mnt);
    for (e, g) in expected.iter().zip(got.iter()) {
        assert_eq!(e, g);
    }
    assert_eq!(expected.len(), got.len());
    assert_eq!(describe(native.path()), describe(&f.backing));
    assert_eq!(describe(&f.mnt), describe(&f.backing));
}

/// The same script over both transports: FUSE over io_uring (where this kernel offers it; CI
/// turns it on) and reads of /dev/fuse. Each must behave as the backing filesystem does, and
/// the mount must say which one it uses.
#[test]
fn both_transports_behave_as_the_backing_filesystem() {
    need_fuse!();
    let offered = rsyncfs_logger::kernel_offers_uring();
    let off_by_env = rsyncfs_logger::uring_turned_off();
    match offered {
        None => println!("SKIPPED (io_uring half): this kernel has no FUSE over io_uring"),
        Some(false) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and /sys/module/fuse/parameters/enable_uring is N: .ci/run turns it on")
        }
        Some(false) => println!(
            "SKIPPED (io_uring half): /sys/module/fuse/parameters/enable_uring is N (echo Y > it)"
        ),
        Some(true) => {}
    }
    for transport in [Transport::Auto, Transport::DevFuse] {
        let f = Fixture::over(Mode::ReadWrite, transport);
        let m = f.mounted.as_ref().unwrap();
        let want_ring = transport == Transport::Auto && offered == Some(true) && !off_by_env;
        assert_eq!(m.io_uring(), want_ring, "{transport:?}: {}", m.transport());
        // After the mount, which sets this process's umask (the kernel applies the caller's).
        let native = tempfile::tempdir().unwrap();
        let expected = script(native.path());
        let got = script(&f.mnt);
        assert_eq!(expected, got, "{transport:?}");
        assert_eq!(
            describe(native.path()),
            describe(&f.backing),
            "{transport:?}"
        );
        assert_eq!(describe(&f.mnt), describe(&f.backing), "{transport:?}");
        // A listing bigger than one reply and a value of some kilobytes travel whole.
        let big = f.mnt.join("big-dir");
        fs::create_dir(&big).unwrap();
        for i in 0..3000 {
            fs::write(big.join(format!("entry-with-a-long-name-{i:05}")), b"").unwrap();
        }
        assert_eq!(fs::read_dir(&big).unwrap().count(), 3000, "{transport:?}");
        let value = vec![7u8; 3_500];
        let file = f.mnt.join("with-xattr");
        fs::write(&file, b"x").unwrap();
        match rustix::fs::setxattr(&file, "user.big", &value, rustix::fs::XattrFlags::empty()) {
            Ok(()) => {
                let mut back = vec![0u8; 65536];
                let n = rustix::fs::getxattr(&file, "user.big", &mut back).unwrap();
                assert_eq!(&back[..n], &value[..], "{transport:?}");
            }
            Err(e) => {
                println!("note: the backing filesystem refuses a 3.5 kB extended attribute: {e}")
            }
        }
    }
}

#[test]
fn inode_numbers_are_the_backing_ones_and_survive_renames() {
    need_fuse!();
    let f = Fixture::new(Mode::ReadWrite);
    fs::write(f.mnt.join("x"), b"1").unwrap();
    let ino = fs::metadata(f.mnt.join("x")).unwrap().ino();
    assert_eq!(ino, fs::metadata(f.backing.join("x")).unwrap().ino());
    fs::rename(f.mnt.join("x"), f.mnt.join("y")).unwrap();
    fs::hard_link(f.mnt.join("y"), f.mnt.join("z")).unwrap();
    assert_eq!(fs::metadata(f.mnt.join("y")).unwrap().ino(), ino);
    assert_eq!(fs::metadata(f.mnt.join("z")).unwrap().ino(), ino);
}

#[test]
fn the_state_folder_is_hidden_and_untouchable() {
    need_fuse!();
    let f = Fixture::new(Mode::ReadWrite);
    fs::create_dir(f.backing.join(".rsyncfs")).unwrap();
    fs::write(f.backing.join(".rsyncfs/store"), b"secret").unwrap();
    let names: Vec<_> = fs::read_dir(&f.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "{names:?}");
    assert!(fs::read(f.mnt.join(".rsyncfs/store")).is_err());
    assert!(fs::create_dir(f.mnt.join(".rsyncfs")).is_err());
    assert!(fs::write(f.mnt.join(".rsyncfs"), b"x").is_err());
    assert_eq!(
        fs::read(f.backing.join(".rsyncfs/store")).unwrap(),
        b"secret"
    );
}

#[test]
fn every_change_is_reported() {
    need_fuse!();
    let f = Fixture::new(Mode::ReadWrite);
    fs::write(f.mnt.join("f"), b"data").unwrap();
    // The kernel sends a close's RELEASE without waiting for it, so the steps below may be
    // served before it: wait for the write's report, or a release served after the unlink
    // below would find no file left to report (rightly: there is nothing to ship).
    let mut changes = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !changes
        .iter()
        .any(|c: &Change| c.kind == ChangeKind::Written)
    {
        assert!(std::time::Instant::now() < deadline, "{changes:?}");
        changes.extend(f.changes());
    }
    fs::create_dir(f.mnt.join("d")).unwrap();
    fs::rename(f.mnt.join("f"), f.mnt.join("d/g")).unwrap();
    std::os::unix::fs::symlink("g", f.mnt.join("d/s")).unwrap();
    fs::set_permissions(f.mnt.join("d/g"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(f.mnt.join("d/s")).unwrap();
    fs::remove_file(f.mnt.join("d/g")).unwrap();
    fs::remove_dir(f.mnt.join("d")).unwrap();
    changes.extend(f.changes());
    let has = |path: &str, kind: ChangeKind| {
        changes
            .iter()
            .any(|c| c.path == Path::new(path) && c.kind == kind)
    };
    // A file made by a writer is reported once, when it is whole.
    assert!(!has("f", ChangeKind::Created), "{changes:?}");
    assert!(has("f", ChangeKind::Written), "{changes:?}");
    assert!(has("d", ChangeKind::DirMade), "{changes:?}");
    assert!(
        has(
            "f",
            ChangeKind::RenamedTo {
                to: PathBuf::from("d/g")
            }
        ),
        "{changes:?}"
    );
    assert!(has("d/s", ChangeKind::Symlink), "{changes:?}");
    assert!(has("d/g", ChangeKind::Attr), "{changes:?}");
    assert!(has("d/s", ChangeKind::Removed), "{changes:?}");
    assert!(has("d/g", ChangeKind::Removed), "{changes:?}");
    assert!(has("d", ChangeKind::DirRemoved), "{changes:?}");
}

#[test]
fn a_file_is_not_reported_while_its_writer_makes_it() {
    need_fuse!();
    let f = Fixture::new(Mode::ReadWrite);
    // Created, then written before the close: nothing until the close.
    let mut file = fs::File::create(f.mnt.join("new")).unwrap();
    file.write_all(b"half").unwrap();
    assert!(f.changes().is_empty());
    file.write_all(b" and the rest").unwrap();
    drop(file);
    assert_eq!(
        f.changes(),
        vec![Change {
            path: "new".into(),
            kind: ChangeKind::Written
        }]
    );
    // Truncated on open (`open('w')`) and rewritten: nothing until the close either.
    let mut file = fs::File::create(f.mnt.join("new")).unwrap();
    assert!(f.changes().is_empty());
    file.write_all(b"again").unwrap();
    drop(file);
    assert_eq!(f.changes().len(), 1);
    // Created and closed with nothing written (`touch`): reported at the close.
    drop(fs::File::create(f.mnt.join("empty")).unwrap());
    assert_eq!(
        f.changes(),
        vec![Change {
            path: "empty".into(),
            kind: ChangeKind::Written
        }]
    );
}

#[test]
fn a_burst_of_writes_to_an_open_file_is_one_change() {
    need_fuse!();
    let f = Fixture::new(Mode::ReadWrite);
    let mut file = fs::File::create(f.mnt.join("log")).unwrap();
    let before = f.changes().len();
    assert!(f
        .mounted
        .as_ref()
        .unwrap()
        .is_open_for_writing(Path::new("log")));
    for i in 0..10_000 {
        writeln!(file, "line {i}").unwrap();
    }
    drop(file);
    let after = f.changes();
    assert!(before <= 1 && after.len() <= 2, "{before} then {after:?}");
    assert!(after.iter().any(|c| c.kind == ChangeKind::Written));
    assert!(!f
        .mounted
        .as_ref()
        .unwrap()
        .is_open_for_writing(Path::new("log")));
    assert_eq!(
        fs::read_to_string(f.backing.join("log"))
            .unwrap()
            .lines()
            .count(),
        10_000
    );
}

#[test]
fn a_file_kept_open_and_written_is_reported_while_open() {
    need_fuse!();
    let f = Fixture::new(Mode::ReadWrite);
    let mut file = fs::File::create(f.mnt.join("kept-open")).unwrap();
    f.changes();
    file.write_all(b"first part").unwrap();
    // Not while it is young: a writer that closes soon is reported once, whole.
    std::thread::sleep(rsyncfs_logger::DIRTY_REPORT_INTERVAL * 2);
    assert!(f.changes().is_empty());
    std::thread::sleep(rsyncfs_logger::HELD_OPEN_MIN);
    let while_open = f.changes();
    assert!(
        while_open
            .iter()
            .any(|c| c.path == Path::new("kept-open") && c.kind == ChangeKind::Written),
        "{while_open:?}"
    );
    // Nothing new written: nothing new reported, even after another interval and the close.
    std::thread::sleep(rsyncfs_logger::DIRTY_REPORT_INTERVAL * 2);
    drop(file);
    assert!(f.changes().is_empty());
}

#[test]
fn invalidation_shows_changes_made_underneath() {
    need_fuse!();
    let f = Fixture::new(Mode::ReadWrite);
    fs::write(f.mnt.join("x"), b"old").unwrap();
    assert_eq!(fs::read(f.mnt.join("x")).unwrap(), b"old");
    // The node replaces the file in the backing directory (write a temp file, rename over).
    fs::write(f.backing.join("x.tmp"), b"new content").unwrap();
    fs::rename(f.backing.join("x.tmp"), f.backing.join("x")).unwrap();
    f.mounted.as_ref().unwrap().invalidate(Path::new("x"));
    assert_eq!(fs::read(f.mnt.join("x")).unwrap(), b"new content");
    fs::remove_file(f.backing.join("x")).unwrap();
    f.mounted.as_ref().unwrap().invalidate(Path::new("x"));
    assert!(fs::metadata(f.mnt.join("x")).is_err());
    // A new entry made underneath shows in a listing the kernel had cached.
    fs::create_dir(f.mnt.join("d")).unwrap();
    let names = |dir: &Path| {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    assert!(names(&f.mnt.join("d")).is_empty());
    fs::write(f.backing.join("d/arrived"), b"from a peer").unwrap();
    f.mounted
        .as_ref()
        .unwrap()
        .invalidate(Path::new("d/arrived"));
    assert_eq!(
        names(&f.mnt.join("d")),
        vec![std::ffi::OsString::from("arrived")]
    );
    assert_eq!(fs::read(f.mnt.join("d/arrived")).unwrap(), b"from a peer");
}

#[test]
fn a_name_found_missing_appears_once_made() {
    need_fuse!();
    let f = Fixture::new(Mode::ReadWrite);
    let m = f.mounted.as_ref().unwrap();
    // A lookup that misses must not hide the name once it is made: through the mount, by the
    // node underneath (which invalidates it), or by another program (docs/BENCHMARKS.md,
    // "Negative entries", on why the kernel is not asked to remember misses).
    // Made through the mount after a lookup missed.
    assert!(fs::metadata(f.mnt.join("a")).is_err());
    fs::write(f.mnt.join("a"), b"here").unwrap();
    assert_eq!(fs::read(f.mnt.join("a")).unwrap(), b"here");
    fs::create_dir(f.mnt.join("d")).unwrap();
    assert!(fs::metadata(f.mnt.join("d/b")).is_err());
    fs::rename(f.mnt.join("a"), f.mnt.join("d/b")).unwrap();
    assert_eq!(fs::read(f.mnt.join("d/b")).unwrap(), b"here");
    // Made underneath by the node, which invalidates the name: seen at once.
    assert!(fs::metadata(f.mnt.join("d/c")).is_err());
    fs::write(f.backing.join("d/c"), b"from a peer").unwrap();
    m.invalidate(Path::new("d/c"));
    assert_eq!(fs::read(f.mnt.join("d/c")).unwrap(), b"from a peer");
    assert!(fs::metadata(f.mnt.join("e")).is_err());
    fs::create_dir(f.backing.join("e")).unwrap();
    m.invalidate(Path::new("e"));
    assert!(fs::metadata(f.mnt.join("e")).unwrap().is_dir());
    // Made underneath by another program, with no invalidation.
    assert!(fs::metadata(f.mnt.join("late")).is_err());
    fs::write(f.backing.join("late"), b"").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(fs::metadata(f.mnt.join("late")).is_ok());
    // Removed underneath and invalidated: gone at once, and made again: back at once.
    fs::remove_file(f.backing.join("d/c")).unwrap();
    m.invalidate(Path::new("d/c"));
    assert!(fs::metadata(f.mnt.join("d/c")).is_err());
    fs::write(f.backing.join("d/c"), b"again").unwrap();
    m.invalidate(Path::new("d/c"));
    assert_eq!(fs::read(f.mnt.join("d/c")).unwrap(), b"again");
}

#[test]
fn a_listing_the_kernel_caches_follows_every_change() {
    need_fuse!();
    let f = Fixture::new(Mode::ReadWrite);
    let m = f.mounted.as_ref().unwrap();
    let (dir, under) = (f.mnt.join("d"), f.backing.join("d"));
    fs::create_dir(&dir).unwrap();
    // Enough entries that a listing takes several getdents calls (and readdir requests).
    for i in 0..3000 {
        fs::write(dir.join(format!("f{i:04}")), b"").unwrap();
    }
    let names = |d: &Path| -> std::collections::BTreeSet<String> {
        fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    // The mount lists what the backing directory holds (the difference, where it does not).
    let same = |step: &str| {
        let (seen, there) = (names(&dir), names(&under));
        let extra: Vec<_> = seen.difference(&there).collect();
        let missing: Vec<_> = there.difference(&seen).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "{step}: listed but gone {extra:?}, there but not listed {missing:?}"
        );
    };
    let settle = || std::thread::sleep(Duration::from_millis(120));
    settle();
    // Listed once it is read; listed again unchanged the kernel caches it; then serves it.
    same("listed once");
    same("listed twice");
    let reads = m.directory_reads();
    for _ in 0..3 {
        assert_eq!(names(&dir).len(), 3000);
    }
    assert_eq!(
        m.directory_reads(),
        reads,
        "listings were not served from the cache"
    );

    // Changes underneath, with no invalidation (a program writing to the backing directory):
    // a new entry, a removed one, a renamed one.
    fs::write(under.join("new"), b"").unwrap();
    fs::remove_file(under.join("f0001")).unwrap();
    fs::rename(under.join("f0002"), under.join("moved")).unwrap();
    same("changed underneath");
    assert!(names(&dir).contains("new"));
    // Changes through the mount, at once and after the directory settled.
    fs::write(dir.join("made"), b"").unwrap();
    same("made through the mount");
    settle();
    for _ in 0..3 {
        same("settled");
    }
    fs::remove_file(dir.join("made")).unwrap();
    same("removed through the mount");

    // A listing half read while the directory changes and another reader lists it: the
    // cache must not keep the first reader's older entries beside the second's.
    settle();
    for _ in 0..3 {
        same("cached again");
    }
    let mut first = fs::read_dir(&dir).unwrap();
    let early: Vec<_> = first.by_ref().take(10).map(|e| e.unwrap()).collect();
    assert_eq!(early.len(), 10);
    for i in 0..50 {
        fs::remove_file(under.join(format!("f{:04}", 2000 + i))).unwrap();
        fs::write(under.join(format!("late{i}")), b"").unwrap();
    }
    same("listed while another listing was half read");
    assert!(first.count() > 0);
    settle();
    for _ in 0..3 {
        same("after the half-read listing ended");
    }
}

#[test]
fn new_entries_belong_to_the_process_that_made_them() {
    need_fuse!();
    if !have("setpriv") {
        println!("SKIPPED: setpriv (util-linux) is not installed");
        return;
    }
    let f = Fixture::new(Mode::ReadWrite);
    let shared = f.mnt.join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let as_nobody = |script: &str| {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sh",
                "-c",
                script,
            ])
            .current_dir(&shared)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    as_nobody("echo x > file && mkdir dir && ln -s file link && mkfifo fifo");
    for name in ["file", "dir", "link", "fifo"] {
        let m = fs::symlink_metadata(f.backing.join("shared").join(name)).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{name}");
    }
    // A process that is not root cannot read what root keeps private.
    fs::write(f.mnt.join("secret"), b"root only").unwrap();
    fs::set_permissions(f.mnt.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(f.mnt.join("secret"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "nobody read a 0600 root file through the mount"
    );
}

#[test]
fn receive_only_refuses_writes() {
    need_fuse!();
    let f = Fixture::new(Mode::ReceiveOnly);
    fs::write(f.backing.join("there"), b"from a peer").unwrap();
    assert_eq!(fs::read(f.mnt.join("there")).unwrap(), b"from a peer");
    let err = fs::write(f.mnt.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = fs::OpenOptions::new()
        .write(true)
        .open(f.mnt.join("there"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        fs::remove_file(f.mnt.join("there"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
}

/// Runs a program in `dir`, failing the test with its output if it fails.
fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok()
}

#[test]
fn real_programs_work_on_the_mount() {
    need_fuse!();
    for program in ["git", "tar", "sqlite3", "cp"] {
        if !have(program) {
            println!("SKIPPED: {program} is not installed (.ci/run installs it)");
            return;
        }
    }
    let f = Fixture::new(Mode::ReadWrite);
    let m = &f.mnt;
    // git: init, commits, a checkout, fsck.
    run(m, "git", &["init", "-q", "repo"]);
    let repo = m.join("repo");
    let git = |args: &[&str]| {
        let mut all = vec![
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "commit.gpgsign=false",
        ];
        all.extend_from_slice(args);
        run(&repo, "git", &all)
    };
    fs::write(repo.join("a"), b"one\n").unwrap();
    git(&["add", "a"]);
    git(&["commit", "-q", "-m", "one"]);
    git(&["checkout", "-q", "-b", "side"]);
    fs::write(repo.join("a"), b"two\n").unwrap();
    git(&["commit", "-q", "-am", "two"]);
    git(&["checkout", "-q", "-"]);
    assert_eq!(fs::read(repo.join("a")).unwrap(), b"one\n");
    git(&["fsck", "--strict"]);
    // tar: archive the repository, extract it again, compare.
    run(m, "tar", &["cf", "repo.tar", "repo"]);
    fs::create_dir(m.join("untar")).unwrap();
    run(&m.join("untar"), "tar", &["xf", "../repo.tar"]);
    assert_eq!(describe(&m.join("repo")), describe(&m.join("untar/repo")));
    // A real source tree (this repository's working files, without build output and without
    // .git, whose objects may be hard-linked to another clone) archived into the mount,
    // extracted there, and compared with the original.
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tarball = m.join("src.tar");
    run(
        &source,
        "tar",
        &[
            "--exclude=./target",
            "--exclude=./.git",
            "-cf",
            tarball.to_str().unwrap(),
            ".",
        ],
    );
    fs::create_dir(m.join("src")).unwrap();
    run(&m.join("src"), "tar", &["-xf", "../src.tar"]);
    let extracted = describe(&m.join("src"));
    let mut original = describe(&source);
    original.retain(|k, _| !k.starts_with("target") && !k.starts_with(".git/") && k != ".git");
    assert_eq!(original.len(), extracted.len());
    assert_eq!(original, extracted);
    // An editor's atomic save: temp file, fsync, rename over.
    let mut tmp = fs::File::create(m.join(".a.swp")).unwrap();
    tmp.write_all(b"saved").unwrap();
    tmp.sync_all().unwrap();
    drop(tmp);
    fs::rename(m.join(".a.swp"), m.join("a.txt")).unwrap();
    assert_eq!(fs::read(f.backing.join("a.txt")).unwrap(), b"saved");
    // SQLite with its journal and locks.
    let db = m.join("test.db");
    let db = db.to_str().unwrap();
    run(
        m,
        "sqlite3",
        &[
            db,
            "create table t(x); begin; insert into t values (1),(2),(3); commit;",
        ],
    );
    run(
        m,
        "sqlite3",
        &[
            db,
            "pragma journal_mode=wal; insert into t select x+3 from t;",
        ],
    );
    assert_eq!(
        run(m, "sqlite3", &[db, "select count(*) from t;"]).trim(),
        "6"
    );
    assert_eq!(
        run(m, "sqlite3", &[db, "pragma integrity_check;"]).trim(),
        "ok"
    );
    // cp -a in and out keeps modes, links and times.
    let outside = tempfile::tempdir().unwrap();
    run(
        m,
        "cp",
        &["-a", "repo", outside.path().join("copy").to_str().unwrap()],
    );
    run(
        m,
        "cp",
        &["-a", outside.path().join("copy").to_str().unwrap(), "back"],
    );
    assert_eq!(describe(&m.join("repo")), describe(&m.join("back")));
    let _ = OpenOptionsExt::mode(&mut fs::OpenOptions::new(), 0o644);
}

/// Descriptors this process holds on files under `root` (tests run side by side in one
/// process, each with its own mount).
fn open_descriptors(root: &Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(root))
        .count()
}

#[test]
fn a_tree_larger_than_the_descriptor_cache_is_served_with_bounded_descriptors() {
    need_fuse!();
    let f = Fixture::new(Mode::ReadWrite);
    let files = rsyncfs_logger::FDS_CACHED_MAX * 3;
    // Made through the mount, as `tar x` does: directories, files, symlinks.
    for i in 0..files {
        let dir = f.mnt.join(format!("d{}", i / 500));
        if i % 500 == 0 {
            fs::create_dir(&dir).unwrap();
        }
        if i % 10 == 0 {
            std::os::unix::fs::symlink(format!("f{}", i + 1), dir.join(format!("s{i}"))).unwrap();
        } else {
            fs::write(dir.join(format!("f{i}")), format!("{i}")).unwrap();
        }
    }
    let held = f.mounted.as_ref().unwrap().inode_descriptors();
    println!(
        "{files} entries: the logger holds {held} inode descriptors, {} open under the backing directory",
        open_descriptors(&f.backing)
    );
    assert!(held <= rsyncfs_logger::FDS_CACHED_MAX + 8, "{held}");
    assert!(open_descriptors(&f.backing) <= rsyncfs_logger::FDS_CACHED_MAX + 64);
    // Everything is there and readable, also what fell out of the cache long ago; a renamed
    // directory's inodes (reopened by handle) follow it.
    fs::rename(f.mnt.join("d0"), f.mnt.join("moved")).unwrap();
    for i in 0..files {
        let dir = if i < 500 {
            f.mnt.join("moved")
        } else {
            f.mnt.join(format!("d{}", i / 500))
        };
        if i % 10 == 0 {
            let target = fs::read_link(dir.join(format!("s{i}"))).unwrap();
            assert_eq!(target, PathBuf::from(format!("f{}", i + 1)));
        } else {
            let data = fs::read_to_string(dir.join(format!("f{i}"))).unwrap();
            assert_eq!(data, format!("{i}"));
        }
    }
    assert!(f.mounted.as_ref().unwrap().inode_descriptors() <= rsyncfs_logger::FDS_CACHED_MAX + 8);
}

#[test]
fn an_open_file_works_after_its_last_name_is_gone() {
    need_fuse!();
    let f = Fixture::new(Mode::ReadWrite);
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(f.mnt.join("doomed"))
        .unwrap();
    fs::remove_file(f.mnt.join("doomed")).unwrap();
    // Push the inode's cached descriptor out: the open file keeps its own.
    for i in 0..rsyncfs_logger::FDS_CACHED_MAX + 100 {
        fs::write(f.mnt.join(format!("x{i}")), b"x").unwrap();
    }
    file.write_all(b"still here").unwrap();
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap();
    let meta = file.metadata().unwrap();
    assert_eq!(meta.len(), 10);
    assert_eq!(meta.mode() & 0o777, 0o600);
    file.seek(SeekFrom::Start(0)).unwrap();
    let mut back = String::new();
    std::io::Read::read_to_string(&mut file, &mut back).unwrap();
    assert_eq!(back, "still here");
}
