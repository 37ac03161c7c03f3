//! The command line of `rsyncfs-node`: the daemon (`up`) and the commands that talk to it
//! through its control socket, plus `logger`, which mounts the change logger alone and prints
//! every changed path (the 2005 proposal's change stream, for `rsync --from0 --files-from=-` to
//! follow).

mod demo;
mod status;

use crate::control::{self, client};
use crate::trust::identity;
use crate::{daemon, net};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "rsyncfs-node",
    version,
    about = "rsyncfs: N read-write copies of a tree, kept in sync",
    after_help = "Environment:\n  \
        RUST_LOG            what is logged to standard error (default: warnings), e.g. \
        RUST_LOG=info or RUST_LOG=rsyncfs_node::net=debug\n  \
        RSYNCFS_FUSE_URING  off: the mount reads requests from /dev/fuse even where the \
        kernel offers FUSE over io_uring (Linux 6.14+, /sys/module/fuse/parameters/enable_uring)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a node keeps its identity, store, peers and control socket when `--state` is not given
/// (one node per host).
const DEFAULT_STATE: &str = "/var/lib/rsyncfs";

#[derive(Copy, Clone, ValueEnum)]
enum ModeArg {
    /// Local changes are shipped and peers' changes applied.
    TwoWay,
    /// Local changes are shipped; peers' changes are not applied here.
    SendOnly,
    /// Peers' changes are applied; the mount refuses local writes with EROFS.
    ReceiveOnly,
}

#[derive(Clone, Copy, ValueEnum)]
enum CongestionArg {
    Bbr,
    Cubic,
    NewReno,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node in the foreground: mount, replicate, serve the control socket.
    Up {
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// The directory that holds this host's copy of the tree.
        #[arg(long)]
        backing: PathBuf,
        /// An empty directory to mount the tree on; programs use this one.
        #[arg(long)]
        mount: PathBuf,
        /// Address and UDP port to listen on (default port 7431).
        #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], net::DEFAULT_PORT)))]
        listen: SocketAddr,
        #[arg(long, value_enum, default_value = "two-way")]
        mode: ModeArg,
        /// Trust only the peers this node joined or accepted, not the members they introduce
        /// (for meshes that are not fully connected, such as a line).
        #[arg(long)]
        no_introductions: bool,
        /// How often to look at the whole backing directory for changes made there directly,
        /// not through the mount (cheap when nothing changed: a stat per path); `off` for
        /// never (at start and on `rsyncfs-node rescan` only).
        #[arg(long, default_value = "1h", value_parser = parse_every)]
        scan_every: Every,
        /// The congestion controller of peer connections: bbr paces by the measured bandwidth
        /// and round trip, and random loss does not slow it (through 50 ms each way and 1% loss
        /// it moved 100 MiB in 4.2 s, cubic 20 MiB in 127 s: bench/wan.py); cubic and new-reno
        /// back off at every loss, which yields more to TCP flows on a congested link.
        #[arg(long, value_enum, default_value = "bbr")]
        congestion: CongestionArg,
    },
    /// Look at the whole backing directory again now, for changes made there directly (not
    /// through the mount).
    Rescan {
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
    },
    /// Start a local mesh of real nodes on 127.0.0.1 in a temporary folder, show a write
    /// crossing between them, and keep them running until Ctrl-C (needs root and /dev/fuse).
    Demo {
        /// How many nodes.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=8))]
        nodes: u8,
        /// Where to put the nodes' folders (default: a new folder under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Stop after the demonstration instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Print this node's id (making its identity if there is none yet).
    Id {
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
    },
    /// Print a token that lets another node join this node's mesh (valid for an hour).
    Invite {
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// The address other nodes reach this one at, HOST:PORT (default: the listening
        /// address, or when that is a wildcard such as 0.0.0.0, an address of this host).
        #[arg(long)]
        address: Option<String>,
    },
    /// Make the running local node join the mesh of a member.
    Join {
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// The member: HOST or HOST:PORT.
        #[arg(long)]
        peer: Option<String>,
        /// A token from `rsyncfs-node invite` on the member; without one, the member's operator
        /// must run `rsyncfs-node accept`.
        #[arg(long)]
        token: Option<String>,
        /// Return once joined. By default, on a terminal, `join` then shows the first sync's
        /// progress (files and bytes done and left) until this node holds what the member
        /// holds; elsewhere it returns once joined.
        #[arg(long)]
        no_wait: bool,
    },
    /// Let in a node that asked to join without a token.
    Accept {
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        node_id: String,
    },
    /// Show the node, its peers, pending joins, conflicts and replication latency.
    Status {
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the conflict copies and the versions they keep.
    Conflicts {
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Stream the paths the running node changes (local writes and applied updates).
    Chglog {
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// Separate paths with NUL bytes (for rsync --from0).
        #[arg(long)]
        from0: bool,
    },
    /// Mount the change logger alone and print each changed path (relative to the mount).
    Logger {
        /// The directory whose contents the mount shows.
        #[arg(long)]
        backing: PathBuf,
        /// An empty directory to mount on.
        #[arg(long)]
        mount: PathBuf,
        /// Separate paths with NUL bytes instead of newlines (for rsync --from0).
        #[arg(long)]
        from0: bool,
        /// Refuse every write through the mount with EROFS.
        #[arg(long)]
        receive_only: bool,
    },
}

/// Runs the command line; what `rsyncfs-node` does.
pub fn main() -> ExitCode {
    // Logs go to standard error, filtered by RUST_LOG (default: warnings); the filesystem
    // library's own log lines come through too.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Logger {
            backing,
            mount,
            from0,
            receive_only,
        } => logger(backing, mount, from0, receive_only),
        Command::Up {
            state,
            backing,
            mount,
            listen,
            mode,
            no_introductions,
            scan_every,
            congestion,
        } => up(daemon::Options {
            state,
            backing,
            mount,
            listen,
            mode: match mode {
                ModeArg::TwoWay => rsyncfs_mesh::engine::Mode::TwoWay,
                ModeArg::SendOnly => rsyncfs_mesh::engine::Mode::SendOnly,
                ModeArg::ReceiveOnly => rsyncfs_mesh::engine::Mode::ReceiveOnly,
            },
            introductions: !no_introductions,
            scan_every: scan_every.0,
            congestion: match congestion {
                CongestionArg::Bbr => net::tls::Congestion::Bbr,
                CongestionArg::Cubic => net::tls::Congestion::Cubic,
                CongestionArg::NewReno => net::tls::Congestion::NewReno,
            },
        }),
        Command::Rescan { state } => match client::call(&state, &control::Wire::Rescan) {
            Ok(v) => {
                println!(
                    "scanning {} paths; `rsyncfs-node status` shows the progress",
                    v["paths"].as_u64().unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e.to_string()),
        },
        Command::Demo { nodes, dir, once } => demo::run(nodes, dir, once),
        Command::Id { state } => match identity::Identity::load_or_create(&state) {
            Ok(id) => {
                println!("{}", id.id.long());
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("identity in {}: {e}", state.display())),
        },
        Command::Invite { state, address } => {
            match client::call(&state, &control::Wire::Invite { addr: address }) {
                Ok(v) => {
                    eprintln!(
                        "rsyncfs-node: the token names {} (valid for an hour; \
                         --address sets another)",
                        v["addr"].as_str().unwrap_or("?")
                    );
                    println!("{}", v["token"].as_str().unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e.to_string()),
            }
        }
        Command::Join {
            state,
            peer,
            token,
            no_wait,
        } => {
            if peer.is_none() && token.is_none() {
                return fail("join needs --peer HOST[:PORT] (and optionally --token)".into());
            }
            if token.is_none() {
                if let Ok(id) = identity::Identity::load_or_create(&state) {
                    eprintln!(
                        "rsyncfs-node: asking to join; on the member run: rsyncfs-node accept {}",
                        id.id.long()
                    );
                }
            }
            match client::call(&state, &control::Wire::Join { peer, token }) {
                Ok(v) => {
                    println!(
                        "joined: member {}",
                        v["member"].as_str().unwrap_or_default()
                    );
                    if !no_wait && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                        return first_sync(&state);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e.to_string()),
            }
        }
        Command::Accept { state, node_id } => {
            match client::call(&state, &control::Wire::Accept { id: node_id }) {
                Ok(v) => {
                    println!("accepted {}", v["accepted"].as_str().unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e.to_string()),
            }
        }
        Command::Status { state, json } => match client::call(&state, &control::Wire::Status) {
            Ok(v) if json => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Ok(v) => match serde_json::from_value::<control::Status>(v) {
                Ok(s) => {
                    status::print(&s);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("bad status from the daemon: {e}")),
            },
            Err(e) => fail(e.to_string()),
        },
        Command::Conflicts { state, json } => {
            match client::call(&state, &control::Wire::Conflicts) {
                Ok(v) if json => {
                    println!("{v}");
                    ExitCode::SUCCESS
                }
                Ok(v) => {
                    for c in v.as_array().into_iter().flatten() {
                        println!(
                            "{}\tcopy of {} written on {} at {}",
                            c["path"].as_str().unwrap_or_default(),
                            c["of"].as_str().unwrap_or_default(),
                            c["origin"].as_str().unwrap_or_default(),
                            humantime::format_rfc3339_millis(
                                std::time::UNIX_EPOCH
                                    + Duration::from_millis(
                                        c["written_at_ms"].as_u64().unwrap_or(0)
                                    )
                            )
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e.to_string()),
            }
        }
        Command::Chglog { state, from0 } => {
            let mut out = std::io::stdout().lock();
            match client::chglog(&state, if from0 { 0 } else { b'\n' }, &mut out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e.to_string()),
            }
        }
    }
}

pub(crate) fn fail(message: String) -> ExitCode {
    eprintln!("rsyncfs-node: {message}");
    ExitCode::from(1)
}

/// An interval, or none (`off`).
#[derive(Clone, Copy, Debug)]
struct Every(Option<std::time::Duration>);

fn parse_every(text: &str) -> Result<Every, String> {
    if matches!(text, "off" | "never" | "0") {
        return Ok(Every(None));
    }
    let every = humantime::parse_duration(text)
        .map_err(|e| format!("{e} (an interval such as 30m, 1h or 1day, or `off`)"))?;
    if every < std::time::Duration::from_secs(1) {
        return Err("at least 1s, or `off`".into());
    }
    Ok(Every(Some(every)))
}

fn up(options: daemon::Options) -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&stop)) {
            return fail(format!("cannot handle signal {signal}: {e}"));
        }
    }
    match daemon::run(options, stop) {
        Ok(()) => {
            eprintln!("rsyncfs-node: stopped, unmounted");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.to_string()),
    }
}

fn logger(backing: PathBuf, mount: PathBuf, from0: bool, receive_only: bool) -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&stop)) {
            eprintln!("rsyncfs-node: cannot handle signal {signal}: {e}");
            return ExitCode::from(1);
        }
    }
    let mode = if receive_only {
        rsyncfs_logger::Mode::ReceiveOnly
    } else {
        rsyncfs_logger::Mode::ReadWrite
    };
    let mounted = match rsyncfs_logger::mount(&backing, &mount, mode) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("rsyncfs-node: {e}");
            return ExitCode::from(1);
        }
    };
    eprintln!(
        "rsyncfs-node: {} mounted at {} ({}); Ctrl-C unmounts",
        backing.display(),
        mounted.mount_point().display(),
        mounted.transport()
    );
    let separator: &[u8] = if from0 { b"\0" } else { b"\n" };
    let mut out = std::io::stdout().lock();
    let mut status = ExitCode::SUCCESS;
    while !stop.load(Ordering::Relaxed) {
        let change = match mounted.changes().recv_timeout(Duration::from_millis(100)) {
            Ok(c) => c,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut paths = vec![change.path.clone()];
        match &change.kind {
            rsyncfs_logger::ChangeKind::RenamedTo { to } => paths.push(to.clone()),
            rsyncfs_logger::ChangeKind::Overflow => {
                eprintln!(
                    "rsyncfs-node: changes were lost (the reader fell behind): rescan the tree"
                );
                paths = vec![PathBuf::from(".")];
            }
            _ => {}
        }
        for p in paths {
            let written = out
                .write_all(p.as_os_str().as_encoded_bytes())
                .and_then(|_| out.write_all(separator))
                .and_then(|_| out.flush());
            if written.is_err() {
                // The reader went away (a closed pipe): stop like on a signal.
                stop.store(true, Ordering::Relaxed);
                status = ExitCode::from(1);
            }
        }
    }
    match mounted.unmount() {
        Ok(()) => {
            eprintln!("rsyncfs-node: unmounted");
            status
        }
        Err(e) => {
            eprintln!("rsyncfs-node: unmounting failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// Shows the first sync's progress on a terminal until this node is idle and holds what the
/// member holds (Ctrl-C leaves it running in the daemon).
fn first_sync(state: &std::path::Path) -> ExitCode {
    /// How often the daemon is asked.
    const EVERY: std::time::Duration = std::time::Duration::from_millis(250);
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} receiving [{bar:30}] {pos}/{len} files, {msg} ({elapsed})",
        )
        .expect("a valid template")
        .progress_chars("#>-"),
    );
    // Seen idle without any progress to show, a few times in a row: done (or nothing to take).
    let mut settled = 0;
    loop {
        let s = match client::call(state, &control::Wire::Status)
            .map_err(|e| e.to_string())
            .and_then(|v| serde_json::from_value::<control::Status>(v).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                bar.abandon();
                return fail(e);
            }
        };
        match status::progress(&s) {
            Some(p) => {
                settled = 0;
                bar.set_length(p.files_there);
                bar.set_position(p.files);
                bar.set_message(format!(
                    "{} of {}",
                    status::bytes(p.bytes),
                    status::bytes(p.bytes_there)
                ));
            }
            None if s.idle && s.peers.iter().any(|p| p.connected) => {
                settled += 1;
                // A member whose tree is empty sends no batch: give it three seconds.
                let heard = s.peers.iter().any(|p| p.their_files.unwrap_or(0) > 0);
                if settled >= if heard { 4 } else { 12 } {
                    bar.finish_and_clear();
                    println!("in sync: {} files ({})", s.files, status::bytes(s.bytes));
                    return ExitCode::SUCCESS;
                }
            }
            None => settled = 0,
        }
        bar.tick();
        std::thread::sleep(EVERY);
    }
}
