//! `rsyncfs-node`: see [`rsyncfs_node::cli`].

fn main() -> std::process::ExitCode {
    rsyncfs_node::cli::main()
}
