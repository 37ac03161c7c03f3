//! The deterministic race simulator of rsyncfs.
//!
//! One `u64` seed decides a whole run ([`run`]): the workload (writes, appends, truncates,
//! renames, deletes, mkdir, rmdir, chmod, symlinks and files held open across other events, on a
//! few hot paths), the network (delay, reordering, duplication, loss), faults (link partitions
//! and heals, node crashes that lose uncommitted store writes, restarts with a rescan), per-node
//! clock skew of up to ±2 s with drift, and the topology. The engines are the real
//! [`rsyncfs_mesh::Engine`]s with the real conflict rules; only the filesystem ([`fs::SimFs`]),
//! the network, the clock and the store's disk are simulated. [`check`] lists the invariants.

pub mod check;
pub mod faults;
pub mod fs;
pub mod world;

pub use check::Violation;
pub use world::{Outcome, RunStats};

#[cfg(feature = "planted-bugs")]
pub use rsyncfs_mesh::engine::PlantedBug;

/// How the nodes are connected.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Topology {
    Full,
    Line,
    Ring,
    Star,
}

impl Topology {
    pub const ALL: [Topology; 4] = [
        Topology::Full,
        Topology::Line,
        Topology::Ring,
        Topology::Star,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Topology::Full => "full",
            Topology::Line => "line",
            Topology::Ring => "ring",
            Topology::Star => "star",
        }
    }
}

/// Everything that decides a run.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    pub nodes: usize,
    /// Workload operations.
    pub steps: u64,
    pub topology: Topology,
    /// Keep a trace of events for a failure report (slower).
    pub trace: bool,
    /// Draw the seed's faults and shapes ([`faults::Character`]); off, only partitions,
    /// crashes and the network's weather remain.
    pub faults: bool,
    #[cfg(feature = "planted-bugs")]
    pub planted_bug: Option<PlantedBug>,
}

impl Options {
    pub fn new(seed: u64, nodes: usize) -> Options {
        Options {
            seed,
            nodes,
            steps: 1000,
            topology: Topology::Full,
            trace: false,
            faults: true,
            #[cfg(feature = "planted-bugs")]
            planted_bug: None,
        }
    }

    /// The command that reproduces this run exactly.
    pub fn replay_line(&self) -> String {
        #[allow(unused_mut)]
        let mut line = format!(
            "rsyncfs-sim run --seed {} --nodes {} --steps {} --topology {}",
            self.seed,
            self.nodes,
            self.steps,
            self.topology.name()
        );
        if !self.faults {
            line.push_str(" --no-faults");
        }
        #[cfg(feature = "planted-bugs")]
        if let Some(bug) = self.planted_bug {
            line.push_str(&format!(" --planted-bug {}", planted_bug_name(bug)));
        }
        line
    }
}

#[cfg(feature = "planted-bugs")]
pub fn planted_bug_name(bug: PlantedBug) -> &'static str {
    match bug {
        PlantedBug::LoseConflictCopy => "lose-conflict-copy",
        PlantedBug::Echo => "echo",
        PlantedBug::ForgetStaged => "forget-staged",
        PlantedBug::GiveUpOnError => "give-up-on-error",
    }
}

#[cfg(feature = "planted-bugs")]
pub fn parse_planted_bug(name: &str) -> Option<PlantedBug> {
    match name {
        "lose-conflict-copy" => Some(PlantedBug::LoseConflictCopy),
        "echo" => Some(PlantedBug::Echo),
        "forget-staged" => Some(PlantedBug::ForgetStaged),
        "give-up-on-error" => Some(PlantedBug::GiveUpOnError),
        _ => None,
    }
}

/// Runs one seed.
pub fn run(opts: &Options) -> Outcome {
    assert!(opts.nodes >= 1 && opts.nodes <= 64, "1 to 64 nodes");
    world::World::new(opts.clone()).run()
}

/// Hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
