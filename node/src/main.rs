//! `rsyncfs-node`: the daemon and its commands. Not built yet: the node issue fills this in. Until
//! then the binary says so instead of pretending to work.

use clap::Parser;

#[derive(Parser)]
#[command(name = "rsyncfs-node", version, about = "rsyncfs node (not built yet)")]
struct Cli {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

fn main() -> std::process::ExitCode {
    let _ = Cli::parse();
    eprintln!(
        "rsyncfs-node: the daemon is not built yet; the replication engine runs in the \
         simulator for now: cargo run --release -p rsyncfs-sim -- run --seed 42 --nodes 3"
    );
    std::process::ExitCode::from(2)
}
