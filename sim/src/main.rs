//! `rsyncfs-sim`: runs the race simulator for one seed or a sweep of seeds.

use clap::{Parser, Subcommand};
use rsyncfs_sim::{hex, run, Options, Topology};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "rsyncfs-sim",
    version,
    about = "Deterministic race simulator for rsyncfs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=64))]
    nodes: u64,
    /// Workload operations per run.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Break a rule on purpose (lose-conflict-copy, echo, forget-staged, give-up-on-error); needs
    /// the planted-bugs feature.
    #[arg(long)]
    planted_bug: Option<String>,
    /// Leave out the seed's faults and shapes (modes, full disks, failing applies, clock steps,
    /// long holds, limits, deep and wide trees): only partitions, crashes and the network.
    #[arg(long)]
    no_faults: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run one seed; print its digest; exit non-zero if an invariant broke.
    Run {
        #[arg(long)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = Topology::Full)]
        topology: Topology,
        /// Print every event of the run (for debugging a seed).
        #[arg(long)]
        trace: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Run a range of seeds; exit non-zero if any failed.
    Sweep {
        /// A range A..B (B excluded).
        #[arg(long)]
        seeds: String,
        /// A topology, or "all" to rotate through them by seed.
        #[arg(long, default_value = "full")]
        topology: String,
        /// Worker threads.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        #[command(flatten)]
        common: Common,
    },
}

fn options(seed: u64, topology: Topology, common: &Common) -> Result<Options, String> {
    let mut o = Options::new(seed, common.nodes as usize);
    o.steps = common.steps;
    o.topology = topology;
    o.faults = !common.no_faults;
    if let Some(name) = &common.planted_bug {
        #[cfg(feature = "planted-bugs")]
        {
            o.planted_bug = Some(rsyncfs_sim::parse_planted_bug(name).ok_or_else(|| {
                format!("unknown planted bug {name:?}; known: lose-conflict-copy, echo, forget-staged, give-up-on-error")
            })?);
        }
        #[cfg(not(feature = "planted-bugs"))]
        return Err(format!(
            "--planted-bug {name} needs a build with the planted-bugs feature: \
             cargo run --release -p rsyncfs-sim --features planted-bugs -- ..."
        ));
    }
    Ok(o)
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("--seeds {s:?}: expected a range like 0..1000"))?;
    let a: u64 = a
        .trim()
        .parse()
        .map_err(|_| format!("--seeds: {a:?} is not a number"))?;
    let b: u64 = b
        .trim()
        .parse()
        .map_err(|_| format!("--seeds: {b:?} is not a number"))?;
    if b <= a {
        return Err(format!("--seeds {s}: the range is empty"));
    }
    Ok((a, b))
}

fn parse_topology(s: &str) -> Result<Option<Topology>, String> {
    match s {
        "all" => Ok(None),
        _ => Topology::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .map(Some)
            .ok_or_else(|| format!("--topology {s:?}: expected full, line, ring, star or all")),
    }
}

/// Prints what broke, the trace of events around it (from a traced replay of the same seed),
/// and the replay line.
fn report_failure(opts: &Options, violations: &[rsyncfs_sim::Violation]) {
    for v in violations {
        println!("violated: {}: {}", v.invariant, v.detail);
    }
    let mut traced = opts.clone();
    traced.trace = true;
    let outcome = run(&traced);
    let path = violations.iter().find_map(|v| v.path.clone());
    let lines: Vec<&String> = match &path {
        Some(p) => outcome
            .trace
            .iter()
            .filter(|l| l.contains(p.as_str()))
            .collect(),
        None => outcome.trace.iter().collect(),
    };
    let start = lines.len().saturating_sub(60);
    println!(
        "trace: the last {} events{}:",
        lines.len() - start,
        path.map(|p| format!(" that mention {p}"))
            .unwrap_or_default()
    );
    for l in &lines[start..] {
        println!("  {l}");
    }
    println!("replay: {}", opts.replay_line());
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            seed,
            topology,
            trace,
            common,
        } => {
            let opts = match options(seed, topology, &common) {
                Ok(mut o) => {
                    o.trace = trace;
                    o
                }
                Err(e) => {
                    eprintln!("rsyncfs-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            let started = Instant::now();
            let outcome = run(&opts);
            for line in &outcome.trace {
                println!("{line}");
            }
            let s = &outcome.stats;
            println!("faults: {}", outcome.character);
            println!(
                "seed {seed}: {} nodes, {}, {} ops, {} messages, {} records sent, {} conflicts, {} crashes, {} cuts, {} connections replaced, {} ms simulated in {:.1} ms, at most {} store operations per engine call",
                opts.nodes,
                opts.topology.name(),
                s.ops,
                s.messages,
                s.records_sent,
                s.conflicts,
                s.crashes,
                s.cuts,
                s.replacements,
                s.virtual_ms,
                started.elapsed().as_secs_f64() * 1e3,
                s.store_ops_max
            );
            if outcome.violations.is_empty() {
                println!(
                    "converged: {} replicas identical ({} paths, {} conflict copies), {} completed writes all kept, no echo",
                    opts.nodes, s.final_paths, s.final_conflict_copies, s.contents_owed
                );
            }
            println!("digest: {}", hex(&outcome.digest));
            if outcome.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                report_failure(&opts, &outcome.violations);
                ExitCode::FAILURE
            }
        }
        Command::Sweep {
            seeds,
            topology,
            jobs,
            common,
        } => {
            let parsed = parse_range(&seeds).and_then(|r| Ok((r, parse_topology(&topology)?)));
            let ((a, b), topology) = match parsed {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("rsyncfs-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Err(e) = options(a, Topology::Full, &common) {
                eprintln!("rsyncfs-sim: {e}");
                return ExitCode::from(2);
            }
            let started = Instant::now();
            let jobs = jobs.clamp(1, 64);
            let next = std::sync::atomic::AtomicU64::new(a);
            let failures = std::sync::Mutex::new(Vec::new());
            std::thread::scope(|scope| {
                for _ in 0..jobs {
                    scope.spawn(|| loop {
                        let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if seed >= b {
                            break;
                        }
                        let t = topology.unwrap_or(Topology::ALL[(seed % 4) as usize]);
                        let opts = options(seed, t, &common).expect("checked above");
                        // A panic (an engine assertion) fails its seed, not the sweep.
                        let outcome = match std::panic::catch_unwind(|| run(&opts)) {
                            Ok(o) => o,
                            Err(e) => {
                                let why = e
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_default();
                                failures.lock().expect("no panics hold it").push((
                                    opts,
                                    vec![rsyncfs_sim::Violation {
                                        invariant: "no panic",
                                        path: None,
                                        detail: why,
                                    }],
                                ));
                                continue;
                            }
                        };
                        if !outcome.violations.is_empty() {
                            failures
                                .lock()
                                .expect("no panics hold it")
                                .push((opts, outcome.violations));
                        }
                    });
                }
            });
            let mut failures = failures.into_inner().expect("threads done");
            failures.sort_by_key(|(o, _)| o.seed);
            for (opts, violations) in failures.iter().take(3) {
                println!("seed {} failed:", opts.seed);
                report_failure(opts, violations);
            }
            for (opts, violations) in &failures {
                println!(
                    "failed: seed {} ({}) replay: {}",
                    opts.seed,
                    violations[0].invariant,
                    opts.replay_line()
                );
            }
            let total = b - a;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "speed: {total} seeds in {secs:.1} s, {:.1} seeds/s on {jobs} thread(s)",
                total as f64 / secs
            );
            println!(
                "{} passed, {} failed",
                total - failures.len() as u64,
                failures.len()
            );
            if failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
