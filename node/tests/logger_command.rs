//! `rsyncfs-node logger` as a person runs it: a real process, a real mount, paths on standard
//! output, a clean unmount on SIGTERM, and clear refusals. Needs /dev/fuse and root; elsewhere
//! each test prints why it did not run.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A temporary backing directory and mount point, or None (after saying why) where FUSE
/// mounts cannot run.
fn mountable_dirs() -> Option<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf)> {
    if !rsyncfs_logger::fuse_tests_can_run() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dir.path().join("b"), dir.path().join("m"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    Some((dir, backing, mnt))
}

fn is_mounted(path: &Path) -> bool {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(canonical.to_str().unwrap()))
}

/// The logger process; stopped by its own pid and unmounted when the test ends, also on failure.
struct Logger {
    child: Child,
    mnt: std::path::PathBuf,
}

impl Drop for Logger {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

fn start(backing: &Path, mnt: &Path, extra: &[&str]) -> Logger {
    start_with_fd_limit(backing, mnt, extra, None)
}

/// Starts the logger, optionally under a low soft limit of open files (as `ulimit -n` sets).
fn start_with_fd_limit(
    backing: &Path,
    mnt: &Path,
    extra: &[&str],
    fd_limit: Option<u32>,
) -> Logger {
    let mut command = match fd_limit {
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -S -n {n} && exec \"$0\" \"$@\""))
                .arg(env!("CARGO_BIN_EXE_rsyncfs-node"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_rsyncfs-node")),
    };
    let child = command
        .arg("logger")
        .arg("--backing")
        .arg(backing)
        .arg("--mount")
        .arg(mnt)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rsyncfs-node starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_mounted(mnt) {
        assert!(Instant::now() < deadline, "the mount did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    Logger {
        child,
        mnt: mnt.to_path_buf(),
    }
}

#[test]
fn streams_changed_paths_and_unmounts_on_sigterm() {
    let Some((_dir, backing, mnt)) = mountable_dirs() else {
        return;
    };
    let mut logger = start(&backing, &mnt, &["--from0"]);
    fs::write(mnt.join("one.txt"), b"1").unwrap();
    fs::create_dir(mnt.join("sub")).unwrap();
    fs::write(mnt.join("sub/two"), b"2").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = rustix::process::Pid::from_raw(logger.child.id() as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = logger.child.wait().unwrap();
    let mut out = Vec::new();
    logger
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    let mut err = String::new();
    logger
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(!is_mounted(&mnt), "still mounted after SIGTERM");
    let paths: Vec<&[u8]> = out.split(|&b| b == 0).filter(|p| !p.is_empty()).collect();
    for want in [&b"one.txt"[..], b"sub", b"sub/two"] {
        assert!(paths.contains(&want), "{want:?} missing from {paths:?}");
    }
    assert!(err.contains("mounted at"), "{err}");
    assert_eq!(fs::read(backing.join("sub/two")).unwrap(), b"2");
}

fn refusal(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rsyncfs-node"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn refuses_bad_mount_points_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dir.path().join("b"), dir.path().join("m"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let b = backing.to_str().unwrap();
    let m = mnt.to_str().unwrap();
    if let Some(why) = rsyncfs_logger::why_no_fuse() {
        // Without FUSE every mount is refused first, and says why.
        println!("no FUSE here ({why}): checking only that the refusal says so");
        let err = refusal(&["logger", "--backing", b, "--mount", m]);
        assert!(
            err.contains("/dev/fuse") || err.contains("mounting failed"),
            "{err}"
        );
        return;
    }
    fs::write(mnt.join("occupied"), b"x").unwrap();
    let err = refusal(&["logger", "--backing", b, "--mount", m]);
    assert!(err.contains("is not empty"), "{err}");
    fs::remove_file(mnt.join("occupied")).unwrap();
    let err = refusal(&["logger", "--backing", m, "--mount", m]);
    assert!(err.contains("inside the mount point"), "{err}");
    let missing = dir.path().join("missing");
    let err = refusal(&[
        "logger",
        "--backing",
        missing.to_str().unwrap(),
        "--mount",
        m,
    ]);
    assert!(err.contains("backing directory"), "{err}");
    let err = refusal(&["logger", "--backing", b]);
    assert!(err.contains("--mount"), "{err}");
    let err = refusal(&["up", "--backing", b]);
    assert!(err.contains("--mount"), "{err}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn many_files_work_under_a_low_open_file_limit() {
    let Some((_dir, backing, mnt)) = mountable_dirs() else {
        return;
    };
    // The logger keeps a descriptor per inode the kernel caches: 3,000 files pass a limit of
    // 256 unless it raises its own limit.
    let _logger = start_with_fd_limit(&backing, &mnt, &[], Some(256));
    for i in 0..3000 {
        fs::write(mnt.join(format!("f{i}")), b"x").unwrap();
    }
    for i in 0..3000 {
        fs::metadata(mnt.join(format!("f{i}"))).unwrap();
    }
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 3000);
}
