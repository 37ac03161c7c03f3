//! What the node's end-to-end tests share: real `rsyncfs-node up` processes on 127.0.0.1, each
//! with its own state, backing directory and mount, stopped by their own pids and unmounted when
//! the test ends (also when it fails); and a tree comparison (paths, kinds, content hashes,
//! modes, mtimes, symlink targets).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_rsyncfs-node");
/// How long a test waits for replicas to agree.
pub const CONVERGE: Duration = Duration::from_secs(60);

/// A folder for a test's nodes under `base`, or `None` where FUSE tests cannot run (after
/// saying why; under `CI=true` the test fails instead).
pub fn root_in(base: &str) -> Option<tempfile::TempDir> {
    if !rsyncfs_logger::fuse_tests_can_run() {
        return None;
    }
    Some(tempfile::tempdir_in(base).unwrap())
}

/// A running node.
pub struct Node {
    pub name: String,
    pub state: PathBuf,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub log: PathBuf,
    listen: String,
    mode: String,
    extra: Vec<String>,
    /// What the node is started through (`nsenter` into a network namespace, `prlimit`), if
    /// anything: a command and its arguments, the node's own command line after them.
    prefix: Vec<String>,
    child: Option<Child>,
}

impl Node {
    /// Starts a node with its directories under `root/name`.
    pub fn start(root: &Path, name: &str) -> Node {
        Node::start_with(root, name, "two-way")
    }

    pub fn start_with(root: &Path, name: &str, mode: &str) -> Node {
        let mut node = Node::prepare(root, name, mode, &[]);
        node.run();
        node
    }

    /// Makes a node's directories without starting it; `extra` are more flags for `up`.
    pub fn prepare(root: &Path, name: &str, mode: &str, extra: &[&str]) -> Node {
        let base = root.join(name);
        let (state, backing, mnt) = (base.join("state"), base.join("backing"), base.join("mnt"));
        for d in [&state, &backing, &mnt] {
            fs::create_dir_all(d).unwrap();
        }
        let node = Node {
            name: name.to_string(),
            state,
            backing,
            mnt,
            log: root.join(format!("{name}.log")),
            listen: "127.0.0.1:0".into(),
            mode: mode.into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            prefix: Vec::new(),
            child: None,
        };
        node
    }

    /// The same node listening on `listen` (HOST:PORT) instead of 127.0.0.1 on any port.
    pub fn listening(mut self, listen: &str) -> Node {
        self.listen = listen.into();
        self
    }

    /// The same node run in the network namespace `netns` (nsenter, so that its mount is
    /// visible to the test).
    pub fn in_netns(self, netns: &str) -> Node {
        self.through(&["nsenter", &format!("--net=/run/netns/{netns}")])
    }

    /// The same node started through `command` (a program and its arguments that then runs the
    /// node's command line, as `nsenter` or `prlimit` do).
    pub fn through(mut self, command: &[&str]) -> Node {
        self.prefix.extend(command.iter().map(|s| s.to_string()));
        self
    }

    pub fn run(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = command
            .args(["up", "--state"])
            .arg(&self.state)
            .arg("--backing")
            .arg(&self.backing)
            .arg("--mount")
            .arg(&self.mnt)
            .args(["--listen", &self.listen, "--mode", &self.mode])
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("RSYNCFS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let sock = self.state.join("control.sock");
        wait_for(
            &format!("{} to start", self.name),
            Duration::from_secs(30),
            || {
                if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!(
                        "{} exited at start ({status}):\n{}",
                        self.name,
                        self.log_text()
                    );
                }
                is_mounted(&self.mnt) && sock.exists() && self.try_status().is_some()
            },
        );
        // Restarts listen where the first run did, so that peers find it again.
        let listen = self.status()["listen"].as_str().unwrap().to_string();
        self.listen = listen;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the node with SIGTERM (SIGKILL after 20 s) and makes sure it is unmounted.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!("{} did not stop on SIGTERM; killing it", self.name);
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }

    /// Kills the node at once (a crash), leaving its mount dead; `restart` clears it.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg(args[0])
            .arg("--state")
            .arg(&self.state)
            .args(&args[1..])
            .output()
            .unwrap()
    }

    fn try_status(&self) -> Option<serde_json::Value> {
        let out = self.cmd(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn status(&self) -> serde_json::Value {
        self.try_status()
            .unwrap_or_else(|| panic!("status of {} failed:\n{}", self.name, self.log_text()))
    }

    pub fn id(&self) -> String {
        self.status()["node"].as_str().unwrap().to_string()
    }

    pub fn listen(&self) -> String {
        self.listen.clone()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A path on the mount.
    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// A path in the backing directory.
    pub fn b(&self, rel: &str) -> PathBuf {
        self.backing.join(rel)
    }

    pub fn connected_peers(&self) -> usize {
        self.status()["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["connected"].as_bool() == Some(true))
            .count()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let text = self.log_text();
            // Whole logs when a log level was asked for, the end otherwise.
            let keep = if std::env::var_os("RSYNCFS_TEST_LOG").is_some() {
                usize::MAX
            } else {
                60
            };
            let tail: Vec<&str> = text.lines().rev().take(keep).collect();
            eprintln!("---- last lines of {}'s log ----", self.name);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Two nodes, "a" and "b", under `root`, with b joined to a's mesh.
pub fn joined_pair(root: &Path) -> (Node, Node) {
    let a = Node::start(root, "a");
    let b = Node::start(root, "b");
    join(&a, &b);
    (a, b)
}

/// Makes `joiner` join `member`'s mesh with an invitation token.
pub fn join(member: &Node, joiner: &Node) {
    let out = member.cmd(&["invite"]);
    assert!(
        out.status.success(),
        "invite: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = joiner.cmd(&["join", "--token", &token]);
    assert!(
        out.status.success(),
        "join: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        joiner.log_text()
    );
    wait_for("the pair to connect", Duration::from_secs(30), || {
        member.status()["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == joiner.id() && p["connected"] == true)
    });
}

pub fn is_mounted(path: &Path) -> bool {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(canonical.to_str().unwrap_or("")))
}

/// Waits until `f` holds, or panics saying what did not happen.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One path of a tree as the comparison sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    File {
        hash: String,
        mode: u32,
        mtime_ns: i64,
        owner: (u32, u32),
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    Dir {
        mode: u32,
        owner: (u32, u32),
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    Symlink {
        target: String,
    },
    Other,
}

/// Every path below `root` (relative), with what it holds.
pub fn tree(root: &Path) -> BTreeMap<String, Item> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .to_string();
            if rel == ".rsyncfs" {
                continue;
            }
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let owner = (meta.uid(), meta.gid());
            let item = if meta.is_dir() {
                stack.push(path.clone());
                Item::Dir {
                    mode: meta.permissions().mode() & 0o7777,
                    owner,
                    xattrs: xattrs(&path),
                }
            } else if meta.file_type().is_symlink() {
                Item::Symlink {
                    target: fs::read_link(&path).unwrap().to_string_lossy().to_string(),
                }
            } else if meta.is_file() {
                let Ok(data) = fs::read(&path) else { continue };
                Item::File {
                    hash: blake3::hash(&data).to_hex().to_string(),
                    mode: meta.permissions().mode() & 0o7777,
                    mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                    owner,
                    xattrs: xattrs(&path),
                }
            } else {
                Item::Other
            };
            out.insert(rel, item);
        }
    }
    out
}

/// The extended attributes of a file or directory, sorted.
pub fn xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 65536];
    let Ok(n) = rustix::fs::llistxattr(path, &mut names[..]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        if let Ok(len) = rustix::fs::lgetxattr(path, cname.as_c_str(), &mut value[..]) {
            out.push((name.to_vec(), value[..len].to_vec()));
        }
    }
    out.sort();
    out
}

/// Waits until `status` says idle; on timeout, shows why it is not (and every peer's view).
pub fn wait_idle(n: &Node, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while n.status()["idle"] != true {
        if Instant::now() > deadline {
            panic!("{} is not idle after {timeout:?}: {}", n.name, n.status());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every node's mount shows the same tree (and that tree satisfies `check`), and
/// returns it. On timeout, shows the differences.
pub fn converge(
    nodes: &[&Node],
    check: impl Fn(&BTreeMap<String, Item>) -> bool,
) -> BTreeMap<String, Item> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let trees: Vec<_> = nodes.iter().map(|n| tree(&n.mnt)).collect();
        if trees.windows(2).all(|w| w[0] == w[1]) && check(&trees[0]) {
            return trees.into_iter().next().unwrap();
        }
        if Instant::now() > deadline {
            for (n, t) in nodes.iter().zip(&trees) {
                eprintln!("{}: {t:#?}", n.name);
            }
            panic!("the replicas did not converge");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The content of every file in a tree, for "is this write still somewhere?".
pub fn contents(root: &Path) -> Vec<Vec<u8>> {
    tree(root)
        .into_iter()
        .filter(|(_, i)| matches!(i, Item::File { .. }))
        .filter_map(|(p, _)| fs::read(root.join(p)).ok())
        .collect()
}

pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}
