//! The fault suite on real hosts: nodes in network namespaces of the test's own (one veth pair
//! each to a bridge in another namespace, addresses 10.77.0.0/24), real `up` processes and
//! mounts, and the faults users meet: kill -9 of any node at random moments during bursts and
//! during a large transfer, restarts, partitions (nftables drops on the bridge) and heals, and a
//! receiver whose filesystem fills and then gets space back. After each scenario the replicas
//! must agree (content hashes, modes, owners, links), every completed write must be on every
//! node (at its path or in a conflict copy), and no conflict copy may be empty; the time each
//! took is printed. The random moments come from a seed, printed first:
//! `RSYNCFS_FAULT_SEED=N cargo test -p rsyncfs-node --test faults` replays one.
//!
//! Needs root, /dev/fuse, `ip` and `nft` (elsewhere each test prints why it did not run; under
//! CI=true it fails instead). Namespaces are removed when a test ends, also when it fails.

mod common;

use common::{converge, wait_for, Item, Node};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const PORT: u16 = 7431;

/// Why this machine cannot run the suite, if it cannot.
fn why_not() -> Option<String> {
    if let Some(why) = rsyncfs_logger::why_no_fuse() {
        return Some(why);
    }
    for tool in ["ip", "nft", "nsenter"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

fn can_run() -> bool {
    let Some(why) = why_not() else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true, and the fault suite cannot run: {why}");
    }
    println!("SKIPPED: the fault suite needs network namespaces and FUSE: {why}");
    false
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Network namespaces for `n` hosts on one bridge; removed on drop.
struct Lab {
    bridge: String,
    hosts: Vec<String>,
}

impl Lab {
    fn new(tag: &str, n: usize) -> Lab {
        let base = format!("rsf{}{tag}", std::process::id() % 100_000);
        let lab = Lab {
            bridge: format!("{base}br"),
            hosts: (0..n).map(|i| format!("{base}h{i}")).collect(),
        };
        run(&["ip", "netns", "add", &lab.bridge]);
        run(&[
            "ip",
            "-n",
            &lab.bridge,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
        ]);
        run(&["ip", "-n", &lab.bridge, "link", "set", "br0", "up"]);
        for (i, host) in lab.hosts.iter().enumerate() {
            let port = format!("v{i}");
            run(&["ip", "netns", "add", host]);
            run(&[
                "ip",
                "-n",
                host,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &lab.bridge,
            ]);
            run(&[
                "ip",
                "-n",
                &lab.bridge,
                "link",
                "set",
                &port,
                "master",
                "br0",
                "up",
            ]);
            run(&[
                "ip",
                "-n",
                host,
                "addr",
                "add",
                &format!("{}/24", lab.ip(i)),
                "dev",
                "eth0",
            ]);
            run(&["ip", "-n", host, "link", "set", "eth0", "up"]);
            run(&["ip", "-n", host, "link", "set", "lo", "up"]);
        }
        run(&[
            "ip",
            "netns",
            "exec",
            &lab.bridge,
            "nft",
            "add",
            "table",
            "bridge",
            "faults",
        ]);
        run(&[
            "ip",
            "netns",
            "exec",
            &lab.bridge,
            "nft",
            "add chain bridge faults forward { type filter hook forward priority 0 ; }",
        ]);
        lab
    }

    fn ip(&self, i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// A node on host `i`, not started.
    fn node(&self, root: &Path, i: usize, name: &str, extra: &[&str]) -> Node {
        Node::prepare(root, name, "two-way", extra)
            .in_netns(&self.hosts[i])
            .listening(&format!("{}:{PORT}", self.ip(i)))
    }

    /// Cuts host `i` off from every other (its packets are dropped silently, as by a pulled
    /// cable somewhere along the way).
    fn isolate(&self, i: usize) {
        for dir in ["iifname", "oifname"] {
            run(&[
                "ip",
                "netns",
                "exec",
                &self.bridge,
                "nft",
                &format!("add rule bridge faults forward {dir} v{i} drop"),
            ]);
        }
    }

    /// Ends every partition.
    fn heal(&self) {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.bridge,
            "nft",
            "flush chain bridge faults forward",
        ]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain([&self.bridge]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The seed for this run's random moments: `RSYNCFS_FAULT_SEED`, or a new one.
fn seed() -> u64 {
    let seed = std::env::var("RSYNCFS_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("fault seed {seed} (RSYNCFS_FAULT_SEED={seed} replays it)");
    seed
}

/// Content of a write: unique, and says what it is when a check fails.
fn content(tag: &str, i: usize, len: usize) -> Vec<u8> {
    let head = format!("{tag} {i}\n");
    let mut out = head.repeat(len / head.len() + 1).into_bytes();
    out.truncate(len.max(head.len()));
    out
}

/// Writes `count` files on the mount `mnt`, and returns
/// the writes that completed (written and closed without an error). A write that fails (the
/// node is down: its dead mount answers ENOTCONN) is tried again every 50 ms, also in the moment
/// a restarted node has cleared its dead mount and not yet mounted anew: such a write lands in
/// the bare mount point, and the node must move it into the tree.
fn burst(mnt: &Path, tag: &str, count: usize, len: usize) -> Vec<(String, Vec<u8>)> {
    let mut done = Vec::new();
    for i in 0..count {
        let (path, data) = (format!("{tag}/f{i}"), content(tag, i, len));
        for attempt in 0.. {
            let wrote = fs::create_dir_all(mnt.join(tag))
                .and_then(|()| fs::File::create(mnt.join(&path)))
                .and_then(|mut f| f.write_all(&data).and_then(|()| f.sync_all()));
            match wrote {
                Ok(()) => {
                    done.push((path, data));
                    break;
                }
                // The node is down (being restarted): try again once it is back.
                Err(_) if attempt < 400 => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("{path}: {e}"),
            }
        }
    }
    done
}

/// The replicas agree; every write is on every node; no conflict copy is empty. Returns how
/// long agreeing took.
fn check(nodes: &[&Node], writes: &[(String, Vec<u8>)], since: Instant) -> Duration {
    let t = converge(nodes, |t| {
        writes.iter().all(|(path, _)| t.contains_key(path))
    });
    let took = since.elapsed();
    for n in nodes {
        let all = common::contents(&n.mnt);
        for (path, data) in writes {
            assert!(
                all.contains(data),
                "{}: the write of {path} is lost",
                n.name
            );
        }
        empty_copies(n, &t);
    }
    took
}

fn empty_copies(n: &Node, t: &BTreeMap<String, Item>) {
    for (path, item) in t {
        if path.contains(".sync-conflict-") && matches!(item, Item::File { .. }) {
            let len = fs::metadata(n.m(path)).unwrap().len();
            assert!(len > 0, "{}: empty conflict copy {path}", n.name);
        }
    }
}

fn joined(lab: &Lab, root: &Path, names: &[&str]) -> Vec<Node> {
    let mut nodes: Vec<Node> = names
        .iter()
        .enumerate()
        .map(|(i, name)| lab.node(root, i, name, &[]))
        .collect();
    for n in &mut nodes {
        n.run();
    }
    for n in &nodes[1..] {
        common::join(&nodes[0], n);
    }
    // Introductions connect the others to each other.
    wait_for("a full mesh", Duration::from_secs(30), || {
        nodes.iter().all(|n| n.connected_peers() == nodes.len() - 1)
    });
    nodes
}

#[test]
fn kills_during_bursts_and_transfers_and_partitions() {
    if !can_run() {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let lab = Lab::new("k", 3);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut nodes = joined(&lab, dir.path(), &["a", "b", "c"]);
    let mut writes = Vec::new();

    // 1. A burst of small files on a; kill -9 of a random node at a random moment, restarted
    // after a random while. Twice.
    for round in 0..2 {
        let victim = rng.random_range(0..3);
        let (kill_after, down_for) = (rng.random_range(0..400), rng.random_range(100..1500));
        let started = Instant::now();
        let writer = {
            let (mnt, tag) = (nodes[0].mnt.clone(), format!("burst{round}"));
            std::thread::spawn(move || burst(&mnt, &tag, 200, 4096))
        };
        std::thread::sleep(Duration::from_millis(kill_after));
        nodes[victim].crash();
        std::thread::sleep(Duration::from_millis(down_for));
        nodes[victim].run();
        writes.extend(writer.join().unwrap());
        let all: Vec<&Node> = nodes.iter().collect();
        let took = check(&all, &writes, started);
        println!(
            "burst {round}: {} killed after {kill_after} ms, down {down_for} ms; converged {:.1} s after the burst began",
            nodes[victim].name,
            took.as_secs_f64()
        );
    }

    // 2. A large file; a receiver killed during its transfer.
    let victim = rng.random_range(1..3);
    let kill_after = rng.random_range(50..1500);
    let big = content("big", 0, 48 << 20);
    let started = Instant::now();
    fs::write(nodes[0].m("big"), &big).unwrap();
    std::thread::sleep(Duration::from_millis(kill_after));
    nodes[victim].crash();
    std::thread::sleep(Duration::from_millis(300));
    nodes[victim].run();
    writes.push(("big".into(), big));
    let all: Vec<&Node> = nodes.iter().collect();
    let took = check(&all, &writes, started);
    println!(
        "large file (48 MiB): {} killed {kill_after} ms after the close; converged {:.1} s after the close",
        nodes[victim].name,
        took.as_secs_f64()
    );

    // 3. A partition: c cut off; a and c write, also the same file; healed.
    let started = Instant::now();
    lab.isolate(2);
    let (wa, wc) = {
        let (ma, mc) = (nodes[0].mnt.clone(), nodes[2].mnt.clone());
        let a = std::thread::spawn(move || burst(&ma, "left", 50, 1000));
        let c = std::thread::spawn(move || burst(&mc, "right", 50, 1000));
        (a.join().unwrap(), c.join().unwrap())
    };
    writes.extend(wa);
    writes.extend(wc);
    for (i, who) in [(0, "a"), (2, "c")] {
        let data = format!("both sides wrote this: {who}").into_bytes();
        fs::write(nodes[i].m("shared"), &data).unwrap();
        writes.push(("shared".into(), data));
    }
    let cut_for = rng.random_range(1000..6000);
    std::thread::sleep(Duration::from_millis(cut_for));
    let healed = Instant::now();
    lab.heal();
    let all: Vec<&Node> = nodes.iter().collect();
    check(&all, &writes, started);
    println!(
        "partition of c for {:.1} s: converged {:.1} s after the heal",
        (healed - started).as_secs_f64(),
        healed.elapsed().as_secs_f64()
    );

    // 4. Every node restarted at once.
    let started = Instant::now();
    for n in &mut nodes {
        n.crash();
    }
    for n in &mut nodes {
        n.run();
    }
    let all: Vec<&Node> = nodes.iter().collect();
    let took = check(&all, &writes, started);
    println!(
        "all three killed and restarted: converged {:.1} s later",
        took.as_secs_f64()
    );
    for n in &nodes {
        assert!(
            n.status()["bugs"].as_array().unwrap().is_empty(),
            "{}",
            n.name
        );
    }
}

#[test]
fn a_receiver_whose_disk_fills_catches_up_when_space_returns() {
    if !can_run() {
        return;
    }
    let lab = Lab::new("d", 2);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    // b's backing directory on a small filesystem of its own.
    let small = dir.path().join("b/backing");
    fs::create_dir_all(&small).unwrap();
    run(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=24m",
        "rsyncfs-test",
        small.to_str().unwrap(),
    ]);
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let nodes = joined(&lab, dir.path(), &["a", "b"]);
    let (a, b) = (&nodes[0], &nodes[1]);

    let started = Instant::now();
    let writes = burst(&a.mnt, "big", 40, 1 << 20);
    // b runs out of space: it says so, and leaves no empty or partial files at the paths.
    wait_for("b to report the full disk", common::CONVERGE, || {
        b.status()["failing"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["error"].as_str().unwrap_or("").contains("space"))
    });
    let failing = b.status()["failing"].clone();
    println!("b failing: {failing}");
    for (path, data) in &writes {
        if let Ok(got) = fs::read(b.m(path)) {
            assert!(
                &got == data,
                "{path} on b is {} bytes, not whole",
                got.len()
            );
        }
    }
    let stalled = started.elapsed();
    let freed = Instant::now();
    run(&["mount", "-o", "remount,size=256m", small.to_str().unwrap()]);
    let took = check(&[a, b], &writes, freed);
    println!(
        "disk full on b {:.1} s after the burst began; caught up {:.1} s after space returned",
        stalled.as_secs_f64(),
        took.as_secs_f64()
    );
    assert!(b.status()["failing"].as_array().unwrap().is_empty());
    // Each path's failure was logged once, with its reason, however often it was retried.
    let log = b.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("could not receive") || l.contains("could not apply"))
        .collect();
    assert!(!lines.is_empty(), "b logged nothing of its full disk");
    for (path, _) in &writes {
        let times = lines
            .iter()
            .filter(|l| l.contains(&format!("{path}:")))
            .count();
        assert!(times <= 1, "{path}'s failure logged {times} times");
    }
}

/// Bytes of the largest fetch staging file in a node's temporary folder.
fn staged_bytes(n: &Node) -> u64 {
    fs::read_dir(n.backing.join(".rsyncfs/tmp"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("f-"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

fn fetched(n: &Node) -> u64 {
    n.status()["fetched_bytes"].as_u64().unwrap()
}

#[test]
fn an_interrupted_transfer_resumes_from_what_is_staged() {
    if !can_run() {
        return;
    }
    const SIZE: usize = 192 << 20;
    const STAGED: u64 = 64 << 20;
    let lab = Lab::new("r", 2);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut nodes = joined(&lab, dir.path(), &["a", "b"]);
    // (what breaks the transfer, whether the receiver restarts)
    for (round, fault) in ["receiver killed", "sender killed", "link lost"]
        .iter()
        .enumerate()
    {
        let data = content(&format!("resume{round}"), 0, SIZE);
        let name = format!("big{round}");
        let before = fetched(&nodes[1]);
        fs::write(nodes[0].m(&name), &data).unwrap();
        wait_for(
            "b to stage a good part of the file",
            common::CONVERGE,
            || staged_bytes(&nodes[1]) >= STAGED,
        );
        let staged = staged_bytes(&nodes[1]);
        // What crossed before the break counts too (the counter follows the bytes as they
        // arrive): it is at least what was staged.
        let at_break = fetched(&nodes[1]);
        let broke = Instant::now();
        let restarted_b = match round {
            0 => {
                nodes[1].crash();
                nodes[1].run();
                true
            }
            1 => {
                nodes[0].crash();
                nodes[0].run();
                false
            }
            _ => {
                lab.isolate(1);
                // Long enough for both sides to give the connection up.
                std::thread::sleep(Duration::from_secs(6));
                lab.heal();
                false
            }
        };
        wait_for("the file on b", common::CONVERGE, || {
            fs::metadata(nodes[1].m(&name)).is_ok_and(|m| m.len() == SIZE as u64)
                && fs::read(nodes[1].m(&name)).is_ok_and(|d| d == data)
        });
        let moved = fetched(&nodes[1]) - if restarted_b { 0 } else { at_break.max(before) };
        println!(
            "{fault} with {} MiB of {} MiB staged: {:.1} MiB moved by the resumed fetch, the file whole {:.1} s later",
            staged >> 20,
            SIZE >> 20,
            moved as f64 / f64::from(1 << 20),
            broke.elapsed().as_secs_f64()
        );
        // Whole segments of what was staged did not move again (a 4 MiB segment may have
        // been cut short). `fetched_bytes` counts content bytes as they arrive: after the break,
        // those of the resumed fetch (and of the first one's last moments).
        assert!(
            moved <= SIZE as u64 - staged + (8 << 20),
            "{fault}: {moved} bytes moved after the break, {staged} were staged"
        );
    }
}

#[test]
fn a_refused_join_between_hosts_says_why_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let lab = Lab::new("j", 2);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut a = lab.node(dir.path(), 0, "a", &[]);
    let mut b = lab.node(dir.path(), 1, "b", &[]);
    a.run();
    b.run();
    let token = String::from_utf8(a.cmd(&["invite"]).stdout).unwrap();
    // Invitations live in the running member: after its restart this one is void.
    a.crash();
    a.run();
    let started = Instant::now();
    let out = b.cmd(&["join", "--token", token.trim()]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    println!(
        "void token refused in {:.2} s: {}",
        started.elapsed().as_secs_f64(),
        stderr.trim()
    );
    assert!(!out.status.success());
    assert!(
        stderr.contains("the token is unknown, expired or revoked"),
        "{stderr}"
    );
    let peers = fs::read_to_string(b.state.join("peers.json")).unwrap_or_default();
    assert!(!peers.contains(&a.id()), "{peers}");
    // A good token then works between the hosts.
    common::join(&a, &b);
    fs::write(a.m("after"), b"joined").unwrap();
    wait_for("the write on b", common::CONVERGE, || {
        fs::read(b.m("after")).is_ok_and(|d| d == b"joined")
    });
}
