//! The systemd unit and the config file in `node/dist`, run as systemd would run them: the
//! unit passes `systemd-analyze verify`; its `ExecStart` with its `Environment`, pointed at a
//! config file of the test's own, mounts and replicates; its `KillSignal` stops the node within
//! `TimeoutStopSec`, unmounted and with exit status 0 (so `Restart=on-failure` leaves a clean
//! stop alone); the log goes to the config's `log-file`. Real processes; needs /dev/fuse and
//! root (elsewhere the test prints why it did not run).

mod common;

use common::{is_mounted, wait_for, BIN};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const UNIT: &str = include_str!("../dist/rsyncfs.service");

/// The unit's `[Service]` settings, each key with its values in order.
fn service() -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = "";
    for line in UNIT.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]" {
            let (k, v) = line.split_once('=').expect("key=value");
            out.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    out
}

fn one<'a>(s: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match s.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("{key}: {other:?}"),
    }
}

#[test]
fn the_unit_verifies_and_its_command_runs_and_stops_cleanly() {
    let Some(dir) = common::root_in("/var/tmp") else {
        return;
    };
    let s = service();
    assert_eq!(one(&s, "Restart"), "on-failure");
    // The unit as installed, with this build's binary where it would be installed.
    let exec = one(&s, "ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv[0], "/usr/local/bin/rsyncfs-node", "{exec}");
    let unit = dir.path().join("rsyncfs.service");
    fs::write(&unit, UNIT.replace(argv[0], BIN)).unwrap();
    match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
    {
        Ok(out) => {
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && said.trim().is_empty(), "{said}");
        }
        Err(e) => {
            println!("systemd-analyze cannot run ({e}): the unit's syntax is not verified here");
            assert!(std::env::var("CI").is_err(), "CI installs systemd-analyze");
        }
    }

    // ExecStart, with the config file it names replaced by one for this test.
    let at = argv
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    assert_eq!(argv[at + 1], "/etc/rsyncfs/rsyncfs.toml");
    let node = dir.path().join("node");
    for d in ["state", "data", "mnt"] {
        fs::create_dir_all(node.join(d)).unwrap();
    }
    let config = node.join("rsyncfs.toml");
    fs::write(
        &config,
        "backing = \"data\"\nmount = \"mnt\"\nstate = \"state\"\nlisten = \"127.0.0.1:0\"\n\
         log-file = \"node.log\"\n",
    )
    .unwrap();
    let mut command = Command::new(BIN);
    command
        .args(&argv[1..at + 1])
        .arg(&config)
        .args(&argv[at + 2..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env_remove("RUST_LOG");
    for e in s.get("Environment").into_iter().flatten() {
        let (k, v) = e.split_once('=').expect("NAME=value");
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let mnt = node.join("mnt");
    let stopped = |child: &mut std::process::Child| child.try_wait().unwrap().is_some();
    wait_for("the unit's node to mount", Duration::from_secs(30), || {
        assert!(!stopped(&mut child), "{}", log(&node));
        is_mounted(&mnt)
    });
    fs::write(mnt.join("through-the-unit"), b"x").unwrap();
    assert_eq!(fs::read(node.join("data/through-the-unit")).unwrap(), b"x");
    let status = Command::new(BIN)
        .args(["status", "--state"])
        .arg(node.join("state"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", log(&node));

    // `systemctl stop`: the unit's KillSignal, then at most TimeoutStopSec.
    let signal = match one(&s, "KillSignal") {
        "SIGTERM" => rustix::process::Signal::TERM,
        "SIGINT" => rustix::process::Signal::INT,
        other => panic!("a stop signal the node does not handle: {other}"),
    };
    let timeout: u64 = one(&s, "TimeoutStopSec").parse().unwrap();
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
    let asked = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if asked.elapsed() > Duration::from_secs(timeout) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("not stopped within {timeout} s:\n{}", log(&node));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("stopped in {:.2} s", asked.elapsed().as_secs_f64());
    assert!(
        exit.success(),
        "{exit}: Restart=on-failure would restart it\n{}",
        log(&node)
    );
    assert!(!is_mounted(&mnt));
    // RUST_LOG=info from the unit, into the config's log file.
    let text = log(&node);
    assert!(
        text.contains(" INFO ") && text.contains("Mounting"),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "no terminal colours in a file: {text}"
    );
}

fn log(node: &Path) -> String {
    fs::read_to_string(node.join("node.log")).unwrap_or_else(|e| format!("(no log: {e})"))
}
