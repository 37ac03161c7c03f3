//! `rsyncfs-node`: see [`rsyncfs_node::cli`].

/// malloc arenas at most (glibc's default is 8 per core). Each thread that allocates takes an
/// arena of its own while one is free, and a large file's 4 MiB segments, allocated on one
/// thread and freed on another once quinn has them acknowledged, were kept by each arena: a
/// 1 GiB transfer left the sender at 54-78 MiB and the receiver at 38-45 MiB of RSS; with two
/// arenas, 37 and 32 (docs/BENCHMARKS.md). `GLIBC_TUNABLES` set by the user is left to rule.
const MALLOC_ARENAS_MAX: libc::c_int = 2;

fn main() -> std::process::ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: called before any other thread exists; mallopt only sets an allocator
        // parameter.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS_MAX);
        }
    }
    rsyncfs_node::cli::main()
}
