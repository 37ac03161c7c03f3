//! The command line of `rsyncfs-node`: the daemon (`up`) and the commands that talk to it
//! through its control socket, plus `logger`, which mounts the change logger alone and prints
//! every changed path (the 2005 proposal's change stream, for `rsync --from0 --files-from=-` to
//! follow).

mod chglog;
mod demo;
mod status;
mod up;

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

#[derive(Copy, Clone, Debug, ValueEnum)]
enum ModeArg {
    /// Local changes are shipped and peers' changes applied.
    TwoWay,
    /// Local changes are shipped; peers' changes are not applied here.
    SendOnly,
    /// Peers' changes are applied; the mount refuses local writes with EROFS.
    ReceiveOnly,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CongestionArg {
    Bbr,
    Cubic,
    NewReno,
}

impl ModeArg {
    fn engine(self) -> rsyncfs_mesh::engine::Mode {
        match self {
            ModeArg::TwoWay => rsyncfs_mesh::engine::Mode::TwoWay,
            ModeArg::SendOnly => rsyncfs_mesh::engine::Mode::SendOnly,
            ModeArg::ReceiveOnly => rsyncfs_mesh::engine::Mode::ReceiveOnly,
        }
    }
}

impl CongestionArg {
    fn net(self) -> net::tls::Congestion {
        match self {
            CongestionArg::Bbr => net::tls::Congestion::Bbr,
            CongestionArg::Cubic => net::tls::Congestion::Cubic,
            CongestionArg::NewReno => net::tls::Congestion::NewReno,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the node in the foreground: mount, replicate, serve the control socket.
    ///
    /// SIGINT or SIGTERM (`systemctl stop`) unmounts and stops it. Its options can come from a
    /// TOML file (--config; node/dist/rsyncfs.toml is an example, node/dist/rsyncfs.service a
    /// systemd unit that uses one). RUST_LOG chooses what is logged (default: warnings), e.g.
    /// RUST_LOG=info.
    Up(up::UpArgs),
    /// Look at the whole backing directory again now, for changes made there directly (not
    /// through the mount).
    Rescan {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
    },
    /// Start a local mesh of real nodes on 127.0.0.1 in a temporary folder, show a write
    /// crossing between them, and keep them running until Ctrl-C (needs root and /dev/fuse).
    Demo {
        /// How many nodes.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=8))]
        nodes: u8,
        /// Where to put the nodes' folders (default: rsyncfs-demo-PID in $TMPDIR, or in /tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Stop after the demonstration instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Print this node's id (making its identity if there is none yet).
    Id {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
    },
    /// Print a token that lets another node join this node's mesh (valid for an hour).
    Invite {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// The address other nodes reach this one at, HOST:PORT (default: the listening
        /// address, or when that is a wildcard such as 0.0.0.0, an address of this host).
        #[arg(long)]
        address: Option<String>,
    },
    /// Make the running local node join the mesh of a member.
    Join {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
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
    /// Let in a node that asked to join without a token (`status` lists the requests).
    Accept {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// The asking node's id, long or short (its first characters, as `status` shows them).
        node_id: String,
    },
    /// List the peers this node trusts: address, link, round trip, when last seen.
    Peers {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// Print the peers as JSON, for programs, instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Forget a peer for good (its link closed, refused when introduced again) and tell the
    /// other peers to forget it too. Only a new join or accept brings it back.
    Forget {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// The peer's id, long or short (its first characters, as `peers` shows them).
        node_id: String,
    },
    /// Leave the mesh: every peer is told to forget this node, then this node forgets them all.
    /// The tree stays as it is; the node keeps running on its own.
    Leave {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
    },
    /// Revoke an invitation token from `invite` (or, with --all, every one): joins with it are
    /// refused.
    Revoke {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// The token to revoke.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        token: Option<String>,
        /// Revoke every invitation this node has handed out.
        #[arg(long)]
        all: bool,
    },
    /// List the kept versions of a path: what peers' updates replaced or removed here (a node
    /// started with --keep-versions), newest first.
    Versions {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// The path, within the tree (as it is below the mount).
        path: String,
        /// Print the versions as JSON, for programs, instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a kept version of a path back (the newest, or --version), through the mount: a
    /// new local write, which replicates.
    Restore {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// The path, within the tree (as it is below the mount).
        path: String,
        /// The version to bring back, as `versions` lists it (default: the newest).
        #[arg(long)]
        version: Option<String>,
    },
    /// Show the node, its peers, pending joins, conflicts and replication latency.
    Status {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// Print the daemon's whole answer as JSON, for programs, instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the conflict copies and the versions they keep.
    Conflicts {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// Print the daemon's whole answer as JSON, for programs, instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stream the paths the running node changes (local writes and applied updates).
    ///
    /// With --batch, the paths are gathered for that long after the first one and given as one
    /// list: to COMMAND's standard input, one run per list (a run that fails gets its paths
    /// again with the next list, after a backoff; rsync's exit status 24, "some files
    /// vanished", counts as done, since a vanished path comes again as removed), or without a
    /// command, written out with an empty entry after each list. The 2005 proposal's pipeline,
    /// a loop of rsync runs:
    ///
    ///   rsyncfs-node chglog --from0 --batch 2 -- rsync -ar --from0 --files-from=- --no-implied-dirs --delete-missing-args --force /srv/a/mnt/ host:/copy/
    ///
    /// (--delete-missing-args and --force: removed paths are listed too, directories with what
    /// was in them; --no-implied-dirs: a removed path's parent may be gone as well.) A list
    /// holding `.` means that some changes were not listed (the reader fell behind): sync the
    /// whole tree.
    Chglog {
        /// The node's state folder: its identity, store, peers and control socket (one per
        /// node; give the same folder as to `up`).
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// Separate paths with NUL bytes (for rsync --from0).
        #[arg(long)]
        from0: bool,
        /// Gather changed paths for this many seconds (after the first) into one list.
        #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
        batch: Option<Duration>,
        /// Run for each list, with the list on its standard input (needs --batch).
        #[arg(last = true, value_name = "COMMAND", requires = "batch")]
        command: Vec<String>,
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
    let cli = Cli::parse();
    // Logs go to standard error, filtered by RUST_LOG (default: warnings); the filesystem
    // library's own log lines come through too. `up` may send them to a file instead.
    if !matches!(cli.command, Command::Up(_)) {
        if let Err(e) = up::init_log(None) {
            return fail(e.to_string());
        }
    }
    if cli.command.prints_for_a_pipe() {
        die_quietly_on_a_closed_pipe();
    }
    match cli.command {
        Command::Logger {
            backing,
            mount,
            from0,
            receive_only,
        } => logger(backing, mount, from0, receive_only),
        Command::Up(args) => match args.resolve() {
            Err(e) => fail(e.to_string()),
            Ok(up) => match up::init_log(up.log_file.as_deref()) {
                Err(e) => fail(e.to_string()),
                Ok(()) => run_up(up.options),
            },
        },
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
                        "rsyncfs-node: asking to join; on the member run: rsyncfs-node accept {} \
                         (with --state FOLDER where the member's state folder is not {DEFAULT_STATE})",
                        id.id.short()
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
        Command::Peers { state, json } => match client::status(&state) {
            Ok(s) if json => {
                println!(
                    "{}",
                    serde_json::to_string(&s.peers).expect("serialising to memory")
                );
                ExitCode::SUCCESS
            }
            Ok(s) => {
                status::print_peers(&s);
                ExitCode::SUCCESS
            }
            Err(e) => fail(e.to_string()),
        },
        Command::Forget { state, node_id } => {
            match client::call(&state, &control::Wire::Forget { id: node_id }) {
                Ok(v) => {
                    println!(
                        "forgot {}; told {} peers to forget it",
                        v["forgot"].as_str().unwrap_or_default(),
                        v["told"].as_u64().unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e.to_string()),
            }
        }
        Command::Leave { state } => match client::call(&state, &control::Wire::Leave) {
            Ok(v) => {
                println!(
                    "left the mesh: {} peers told to forget this node, every peer forgotten",
                    v["told"].as_u64().unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e.to_string()),
        },
        Command::Revoke { state, token, all } => {
            let token = if all { None } else { token };
            match client::call(&state, &control::Wire::Revoke { token }) {
                Ok(v) => {
                    println!("revoked {}", v["revoked"].as_u64().unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e.to_string()),
            }
        }
        Command::Versions { state, path, json } => {
            match client::call(&state, &control::Wire::Versions { path: path.clone() }) {
                Ok(v) if json => {
                    println!("{v}");
                    ExitCode::SUCCESS
                }
                Ok(v) => {
                    let list: Vec<crate::tree::versions::Version> =
                        serde_json::from_value(v).unwrap_or_default();
                    if list.is_empty() {
                        println!("no versions of {path} are kept");
                    }
                    for version in list {
                        println!(
                            "{}  replaced {}  {}",
                            version.id,
                            humantime::format_rfc3339_seconds(
                                std::time::UNIX_EPOCH + Duration::from_millis(version.at_ms)
                            ),
                            status::bytes(version.size)
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e.to_string()),
            }
        }
        Command::Restore {
            state,
            path,
            version,
        } => match client::call(&state, &control::Wire::Restore { path, version }) {
            Ok(v) => {
                println!(
                    "restored {} ({}) as a new local write",
                    v["restored"].as_str().unwrap_or_default(),
                    status::bytes(v["bytes"].as_u64().unwrap_or_default())
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e.to_string()),
        },
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
        Command::Chglog {
            state,
            from0,
            batch,
            command,
        } => {
            let sep = if from0 { 0 } else { b'\n' };
            match batch {
                Some(every) => chglog::batches(&state, sep, every, &command),
                None => chglog::stream(&state, sep),
            }
        }
    }
}

impl Command {
    /// Whether the command only prints to standard output, so that a reader that goes away
    /// (`rsyncfs-node status | head -1`) may simply end it, as it ends `ls` or `cat`. The
    /// daemon, the logger, the demo and chglog's command runs handle a closed pipe themselves.
    fn prints_for_a_pipe(&self) -> bool {
        match self {
            Command::Up(_) | Command::Logger { .. } | Command::Demo { .. } => false,
            Command::Chglog { command, .. } => command.is_empty(),
            _ => true,
        }
    }
}

/// Restores the default action of SIGPIPE (the process ends, silently), which Rust's runtime
/// replaces with "ignore": a write to a closed pipe then fails, and `println!` panics on it.
fn die_quietly_on_a_closed_pipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL installs no handler and touches no
    // memory; no other thread runs yet.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

pub(crate) fn fail(message: String) -> ExitCode {
    eprintln!("rsyncfs-node: {message}");
    ExitCode::from(1)
}

/// `up --listen`: IP, IP:PORT, [IPv6]:PORT, PORT, or a host name with or without a port.
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    use std::net::{IpAddr, ToSocketAddrs};
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, net::DEFAULT_PORT));
    }
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let how = format!(
        "give IP, IP:PORT, [IPv6]:PORT, PORT or HOST[:PORT] (the port defaults to {})",
        net::DEFAULT_PORT
    );
    // A number is a port, never a host (the resolver would read "70000" as 0.1.17.112).
    let number = text.chars().all(|c| c.is_ascii_digit());
    if number || text.is_empty() || text.chars().any(char::is_whitespace) {
        return Err(format!("not an address: {how}"));
    }
    let named = if text.contains(':') {
        text.to_socket_addrs()
    } else {
        (text, net::DEFAULT_PORT).to_socket_addrs()
    };
    match named.map(|mut a| a.next()) {
        Ok(Some(addr)) => Ok(addr),
        Ok(None) => Err(format!("{text} has no address: {how}")),
        Err(e) => Err(format!("{text}: {e}; {how}")),
    }
}

/// `chglog --batch`: seconds, fractions allowed, from a millisecond to a day.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{text} is not a number of seconds"))?;
    if !(0.001..=86_400.0).contains(&seconds) {
        return Err("between 0.001 and 86400 seconds".into());
    }
    Ok(Duration::from_secs_f64(seconds))
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

fn run_up(options: daemon::Options) -> ExitCode {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn listen_takes_an_address_a_port_or_both() {
        let port = net::DEFAULT_PORT;
        let cases = [
            ("127.0.0.1", format!("127.0.0.1:{port}")),
            ("48016", "0.0.0.0:48016".to_string()),
            ("10.0.0.2:7000", "10.0.0.2:7000".to_string()),
            ("::1", format!("[::1]:{port}")),
            ("[::1]", format!("[::1]:{port}")),
            ("[::1]:9", "[::1]:9".to_string()),
        ];
        for (text, want) in cases {
            assert_eq!(
                parse_listen(text).map(|a| a.to_string()),
                Ok(want),
                "{text}"
            );
        }
        assert!(parse_listen("localhost").is_ok_and(|a| a.ip().is_loopback() && a.port() == port));
        for bad in ["", "1.2.3.4:99999", "no such host.invalid", "70000"] {
            let e = parse_listen(bad).expect_err(bad);
            assert!(e.contains("IP:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn every_option_of_every_command_says_what_it_is() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for command in cli.get_subcommands() {
            assert!(command.get_about().is_some(), "{}", command.get_name());
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                assert!(
                    arg.get_help()
                        .is_some_and(|h| !h.to_string().trim().is_empty()),
                    "`{} --{id}` has no help text",
                    command.get_name()
                );
            }
        }
    }
}
