//! Whole randomized runs: determinism and a small sweep over every topology.

use rsyncfs_sim::{hex, run, Options, Topology};

#[test]
fn the_same_seed_gives_the_same_digest() {
    let opts = Options::new(42, 3);
    let one = run(&opts);
    let two = run(&opts);
    assert!(one.violations.is_empty(), "{:#?}", one.violations);
    assert_eq!(hex(&one.digest), hex(&two.digest));
    let other = run(&Options::new(43, 3));
    assert_ne!(
        hex(&one.digest),
        hex(&other.digest),
        "different seeds, same run"
    );
}

#[test]
fn a_small_sweep_passes_on_every_topology() {
    for topology in Topology::ALL {
        for seed in 0..10 {
            let mut opts = Options::new(seed, 4);
            opts.topology = topology;
            opts.steps = 300;
            let outcome = run(&opts);
            assert!(
                outcome.violations.is_empty(),
                "{}: {:#?}",
                opts.replay_line(),
                outcome.violations
            );
            assert!(outcome.stats.ops > 0 && outcome.stats.messages > 0);
        }
    }
}
