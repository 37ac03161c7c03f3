//! `rsyncfs-node demo`: a local mesh of real nodes on 127.0.0.1 that shows a write crossing.

use super::fail;
use crate::control::{self, client};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A node process the demo started; stopped by its pid when dropped.
struct DemoNode {
    child: std::process::Child,
    state: PathBuf,
    mount: PathBuf,
}

impl Drop for DemoNode {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let _ = self.child.wait();
    }
}

pub(super) fn run(count: u8, dir: Option<PathBuf>, once: bool) -> ExitCode {
    if let Some(why) = rsyncfs_logger::why_no_fuse() {
        return fail(format!("the demo mounts real filesystems: {why}"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(signal, Arc::clone(&stop));
    }
    let root = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("rsyncfs-demo-{}", std::process::id())),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find this program: {e}")),
    };
    let mut nodes: Vec<DemoNode> = Vec::new();
    for i in 0..count {
        let base = root.join(format!("node{}", i + 1));
        let (state, backing, mount) = (base.join("state"), base.join("backing"), base.join("mnt"));
        for d in [&state, &backing, &mount] {
            if let Err(e) = std::fs::create_dir_all(d) {
                return fail(format!("{}: {e}", d.display()));
            }
        }
        let log = match std::fs::File::create(base.join("log")) {
            Ok(f) => f,
            Err(e) => return fail(format!("{}: {e}", base.join("log").display())),
        };
        let child = std::process::Command::new(&exe)
            .args(["up", "--listen", "127.0.0.1:0", "--state"])
            .arg(&state)
            .arg("--backing")
            .arg(&backing)
            .arg("--mount")
            .arg(&mount)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn();
        match child {
            Ok(child) => nodes.push(DemoNode {
                child,
                state,
                mount,
            }),
            Err(e) => return fail(format!("starting a node: {e}")),
        }
    }
    let ready = |n: &DemoNode| client::call(&n.state, &control::Wire::Status).is_ok();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(ready) {
        if std::time::Instant::now() > deadline || stop.load(Ordering::Relaxed) {
            return fail(format!(
                "the nodes did not start; see the logs under {}",
                root.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Everyone joins the first node with a token.
    for n in &nodes[1..] {
        let token = match client::call(&nodes[0].state, &control::Wire::Invite { addr: None }) {
            Ok(v) => v["token"].as_str().unwrap_or_default().to_string(),
            Err(e) => return fail(format!("invite: {e}")),
        };
        if let Err(e) = client::call(
            &n.state,
            &control::Wire::Join {
                peer: None,
                token: Some(token),
            },
        ) {
            return fail(format!("join: {e}"));
        }
    }
    println!("rsyncfs demo: {count} nodes under {}", root.display());
    for (i, n) in nodes.iter().enumerate() {
        println!("  node{}: mount {}", i + 1, n.mount.display());
    }
    let (first, last) = (&nodes[0], &nodes[nodes.len() - 1]);
    let text = format!("written on node1 at {:?}\n", std::time::SystemTime::now());
    let started = std::time::Instant::now();
    if let Err(e) = std::fs::write(first.mount.join("hello.txt"), &text) {
        return fail(format!("writing on node1: {e}"));
    }
    let target = last.mount.join("hello.txt");
    loop {
        if std::fs::read_to_string(&target).is_ok_and(|t| t == text) {
            println!(
                "  hello.txt written on node1 arrived on node{count} in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
            break;
        }
        if started.elapsed() > Duration::from_secs(30) || stop.load(Ordering::Relaxed) {
            return fail(format!(
                "hello.txt did not arrive; see the logs under {}",
                root.display()
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    if once {
        drop(nodes);
        let _ = std::fs::remove_dir_all(&root);
        return ExitCode::SUCCESS;
    }
    println!(
        "  write in any mount and watch the others; `rsyncfs-node status --state {}` shows a \
         node; Ctrl-C stops them all",
        first.state.display()
    );
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(nodes);
    println!(
        "rsyncfs demo: stopped and unmounted; the folders stay under {}",
        root.display()
    );
    ExitCode::SUCCESS
}
