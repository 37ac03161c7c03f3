//! What a seed adds to the plain workload: the faults and the shapes that real hosts meet and
//! that the daemon once got wrong. Each seed draws its own mix, so that a sweep covers them all
//! and their combinations:
//!
//! - **modes**: a send-only node (where the rest stays connected without it) and a
//!   receive-only node in the mix;
//! - **a full disk** on a node for a while (applies, fetches and users' writes fail with
//!   ENOSPC), then space again;
//! - **failing applies** (EIO, EACCES) at a rate, while faults last;
//! - **wall clocks stepped** back and forth by seconds to minutes;
//! - **long holds**: local writers that keep files open for seconds (updates wait: Busy);
//! - **slow observations**: the driver answers "what is at this path" late, after more changes;
//! - **limits**: names of 255 bytes and paths near the path limit among the hot paths,
//!   extended attributes up to their limit, batches of up to 256 records, a low sibling limit
//!   (so that many writers on one path pass it);
//! - **shapes**: a chain of directories thousands of levels deep made and removed, a directory
//!   of thousands of files, a first sync of a large tree to every other node at once.

use crate::Topology;
use rand::Rng;
use rsyncfs_mesh::Mode;

const MS: u64 = 1_000_000;

/// A big one-off piece of work by one node.
#[derive(Clone, Debug)]
pub enum Shape {
    /// A chain of directories this deep (made, then removed later: [`Shape::Unchain`]).
    Deep { node: usize, depth: usize },
    /// The removal of a chain `Deep` made, deepest first.
    Unchain { node: usize, depth: usize },
    /// This many files in one directory (made, then half of them removed later).
    Wide { node: usize, files: usize },
    /// A tree of this many files on the node before the links first come up: a first sync to
    /// every other node at once.
    Bulk { node: usize, files: usize },
}

/// The faults and shapes of one seed.
#[derive(Clone, Debug)]
pub struct Character {
    pub modes: Vec<Mode>,
    pub batch_records_max: usize,
    pub siblings_max: usize,
    /// (node, from, until): the node's disk is full in between (simulation time).
    pub disk_full: Vec<(usize, u64, u64)>,
    /// Chance that an apply fails with EIO or EACCES while faults last.
    pub apply_fail_rate: f64,
    /// (node, at, step in ns): the node's wall clock jumps.
    pub clock_steps: Vec<(usize, u64, i64)>,
    /// Longest a local writer keeps a file open.
    pub hold_max_ns: u64,
    /// Longest an observation waits before the driver answers it.
    pub observe_delay_max_ns: u64,
    /// Paths at the limits among the hot paths.
    pub long_paths: bool,
    /// Chance that a user operation sets extended attributes (up to their limit).
    pub xattr_rate: f64,
    pub shapes: Vec<(u64, Shape)>,
}

impl Character {
    /// No faults, no shapes: the scripted stories' world.
    pub fn calm(nodes: usize) -> Character {
        Character {
            modes: vec![Mode::TwoWay; nodes],
            batch_records_max: 16,
            siblings_max: rsyncfs_conflict::limits::SIBLINGS_MAX,
            disk_full: Vec::new(),
            apply_fail_rate: 0.0,
            clock_steps: Vec::new(),
            hold_max_ns: 300 * MS,
            observe_delay_max_ns: 0,
            long_paths: false,
            xattr_rate: 0.0,
            shapes: Vec::new(),
        }
    }

    /// Draws the mix of a seed whose workload runs until `end` (simulation time).
    pub fn draw(rng: &mut impl Rng, nodes: usize, topology: Topology, end: u64) -> Character {
        let mut c = Character::calm(nodes);
        let at = |rng: &mut dyn rand::RngCore| rng.random_range(MS..end.max(2 * MS));
        if nodes >= 3 && rng.random_bool(0.3) {
            let candidates: Vec<usize> = match topology {
                Topology::Full | Topology::Ring => (0..nodes).collect(),
                Topology::Line => vec![0, nodes - 1],
                Topology::Star => (1..nodes).collect(),
            };
            let n = candidates[rng.random_range(0..candidates.len())];
            c.modes[n] = Mode::SendOnly;
        }
        if nodes >= 2 && rng.random_bool(0.3) {
            let n = rng.random_range(0..nodes);
            if c.modes[n] == Mode::TwoWay {
                c.modes[n] = Mode::ReceiveOnly;
            }
        }
        c.batch_records_max = [16, 256][rng.random_range(0..2)];
        c.siblings_max = [2, 3, rsyncfs_conflict::limits::SIBLINGS_MAX][rng.random_range(0..3)];
        if rng.random_bool(0.3) {
            for _ in 0..rng.random_range(1..=2) {
                let node = rng.random_range(0..nodes);
                let from = at(rng);
                let until = (from + rng.random_range(50 * MS..3_000 * MS)).min(end);
                c.disk_full.push((node, from, until));
            }
        }
        c.apply_fail_rate = [0.0, 0.0, 0.01, 0.05][rng.random_range(0..4)];
        if rng.random_bool(0.3) {
            for _ in 0..rng.random_range(1..=3) {
                let node = rng.random_range(0..nodes);
                let secs = rng.random_range(1i64..=300);
                let sign = if rng.random_bool(0.5) { -1 } else { 1 };
                c.clock_steps
                    .push((node, at(rng), sign * secs * 1_000_000_000));
            }
        }
        if rng.random_bool(0.2) {
            c.hold_max_ns = 5_000 * MS;
        }
        if rng.random_bool(0.3) {
            c.observe_delay_max_ns = 20 * MS;
        }
        c.long_paths = rng.random_bool(0.2);
        c.xattr_rate = [0.0, 0.0, 0.03][rng.random_range(0..3)];
        if rng.random_bool(0.06) {
            let node = rng.random_range(0..nodes);
            let depth = rng.random_range(1_000..=2_000);
            c.shapes.push((at(rng), Shape::Deep { node, depth }));
        }
        if rng.random_bool(0.04) {
            let node = rng.random_range(0..nodes);
            let files = rng.random_range(2_000..=10_000);
            c.shapes.push((at(rng), Shape::Wide { node, files }));
        }
        if rng.random_bool(0.04) {
            let node = rng.random_range(0..nodes);
            let files = rng.random_range(1_000..=5_000);
            c.shapes.push((0, Shape::Bulk { node, files }));
        }
        c
    }

    /// The mix in a few words, for `run`'s summary.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (i, m) in self.modes.iter().enumerate() {
            match m {
                Mode::SendOnly => parts.push(format!("n{i} send-only")),
                Mode::ReceiveOnly => parts.push(format!("n{i} receive-only")),
                Mode::TwoWay => {}
            }
        }
        if !self.disk_full.is_empty() {
            parts.push(format!("{} disk-full windows", self.disk_full.len()));
        }
        if self.apply_fail_rate > 0.0 {
            parts.push(format!("{}% failing applies", self.apply_fail_rate * 100.0));
        }
        if !self.clock_steps.is_empty() {
            parts.push(format!("{} clock steps", self.clock_steps.len()));
        }
        if self.hold_max_ns > 300 * MS {
            parts.push("long holds".into());
        }
        if self.observe_delay_max_ns > 0 {
            parts.push("slow observations".into());
        }
        if self.long_paths {
            parts.push("paths at the limits".into());
        }
        if self.xattr_rate > 0.0 {
            parts.push("extended attributes".into());
        }
        parts.push(format!(
            "batches of {}, {} siblings",
            self.batch_records_max, self.siblings_max
        ));
        for (_, s) in &self.shapes {
            parts.push(match s {
                Shape::Deep { node, depth } => format!("n{node} deep tree of {depth}"),
                Shape::Unchain { node, depth } => format!("n{node} removes a chain of {depth}"),
                Shape::Wide { node, files } => format!("n{node} directory of {files} files"),
                Shape::Bulk { node, files } => format!("n{node} first sync of {files} files"),
            });
        }
        parts.join(", ")
    }
}
