//! `rsyncfs-node`: the daemon and its commands.
//!
//! Today only `logger` works: it mounts the change logger alone and prints every changed path,
//! as the 2005 proposal's change stream, for `rsync --from0 --files-from=-` to follow. The
//! replicating daemon (`up`, `join`, ...) comes with the node issue and says so when called.

use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "rsyncfs-node",
    version,
    about = "rsyncfs: N read-write copies of a tree, kept in sync"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Run the replicating node (not built yet).
    #[command(external_subcommand)]
    Other(Vec<String>),
}

fn main() -> ExitCode {
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
        Command::Other(args) => {
            eprintln!(
                "rsyncfs-node: '{}' is not built yet; only 'rsyncfs-node logger' works today \
                 (see README.md)",
                args.first().map(String::as_str).unwrap_or("")
            );
            ExitCode::from(2)
        }
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
        if mounted.passthrough() {
            "kernel FUSE passthrough for file I/O"
        } else {
            "ordinary FUSE I/O: this kernel offers no passthrough"
        }
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
