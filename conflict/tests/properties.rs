//! Property tests: settling is order-independent, idempotent and commutative.

use proptest::prelude::*;
use rsyncfs_conflict::*;

fn node(i: u64) -> NodeId {
    NodeId::from_index(i)
}

/// A small palette of metas so that equal contents, modes and kinds collide often.
fn meta_strategy() -> impl Strategy<Value = Meta> {
    prop_oneof![
        Just(Meta::tombstone()),
        (0u8..3).prop_map(|m| Meta::dir(0o700 + u32::from(m))),
        (0u8..3, 0u8..2).prop_map(|(c, m)| Meta::file(3, [c; 32], 0o600 + u32::from(m), 7)),
        (0u8..2).prop_map(|c| Meta::symlink(format!("target{c}"))),
    ]
}

/// Concurrent writes: each node writes once on top of a shared base it has seen.
fn concurrent_writes() -> impl Strategy<Value = Vec<Record>> {
    (
        prop::collection::vec((meta_strategy(), 0u64..4), 1..7),
        meta_strategy(),
    )
        .prop_map(|(writes, base_meta)| {
            let base = Record::write(
                None,
                Dot {
                    node: node(100),
                    counter: 1,
                },
                Timestamp::new(NTP64(1 << 32), node(100).hlc_id()),
                base_meta,
            );
            writes
                .into_iter()
                .enumerate()
                .map(|(i, (meta, secs))| {
                    let n = node(i as u64);
                    Record::write(
                        Some(&base),
                        Dot {
                            node: n,
                            counter: 1 + i as u64,
                        },
                        Timestamp::new(NTP64((10 + secs) << 32), n.hlc_id()),
                        meta,
                    )
                })
                .collect()
        })
}

/// A delivery schedule: every index at least once, some several times, in a random order.
fn schedule(len: usize) -> impl Strategy<Value = Vec<usize>> {
    (
        prop::collection::vec(0..len, 0..len * 2),
        Just((0..len).collect::<Vec<_>>()),
    )
        .prop_map(|(mut extra, all)| {
            extra.extend(all);
            extra
        })
        .prop_shuffle()
}

/// Folds a delivery schedule through `settle` as a replica would.
fn replica(records: &[Record], order: &[usize]) -> Option<Record> {
    let mut local: Option<Record> = None;
    for &i in order {
        let remote = &records[i];
        local = match settle("dir/f.txt", local.as_ref(), remote) {
            Decision::AlreadyHave | Decision::KeepLocal => local,
            Decision::TakeRemote => Some(remote.clone()),
            Decision::Merge(m) | Decision::Conflict { merged: m, .. } => Some(m),
        };
        assert!(local.as_ref().unwrap().validate().is_ok());
    }
    local
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn concurrent_versions_settle_the_same_everywhere(
        (records, one, two) in concurrent_writes().prop_flat_map(|r| {
            let n = r.len();
            (Just(r), schedule(n), schedule(n))
        })
    ) {
        let a = replica(&records, &one).unwrap();
        let b = replica(&records, &two).unwrap();
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(a.winner(), b.winner());
        prop_assert_eq!(a.copies("dir/f.txt", false), b.copies("dir/f.txt", false));
        // Pairwise concurrent writes all survive: each one is the winner, shows the winner's
        // content, or is kept by a copy with its content.
        let copies = a.copies("dir/f.txt", false);
        for r in &records {
            let s = &r.siblings[0];
            prop_assert!(a.siblings.contains(s));
            if s.meta.has_data() {
                let kept = a.winner().meta.content == s.meta.content
                    || copies.iter().any(|c| c.sibling.meta.content == s.meta.content);
                prop_assert!(kept, "content of {:?} lost", s.dot);
            }
        }
    }
}

/// A random causal history: replicas write on top of what they hold and pass records around.
#[derive(Debug, Clone)]
enum Step {
    Write {
        replica: usize,
        meta: Meta,
        secs: u64,
    },
    Deliver {
        from: usize,
        to: usize,
    },
}

fn history() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            (0usize..4, meta_strategy(), 0u64..6).prop_map(|(replica, meta, secs)| Step::Write {
                replica,
                meta,
                secs
            }),
            (0usize..4, 0usize..4).prop_map(|(from, to)| Step::Deliver { from, to }),
        ],
        1..40,
    )
}

/// Runs a history and returns every record any replica held along the way.
fn run(steps: &[Step]) -> Vec<Record> {
    let mut held: Vec<Option<Record>> = vec![None; 4];
    let mut counters = [0u64; 4];
    let mut seen = Vec::new();
    for step in steps {
        match step {
            Step::Write {
                replica,
                meta,
                secs,
            } => {
                counters[*replica] += 1;
                let n = node(*replica as u64);
                let r = Record::write(
                    held[*replica].as_ref(),
                    Dot {
                        node: n,
                        counter: counters[*replica],
                    },
                    Timestamp::new(NTP64((10 + secs) << 32), n.hlc_id()),
                    meta.clone(),
                );
                held[*replica] = Some(r.clone());
                seen.push(r);
            }
            Step::Deliver { from, to } => {
                if let Some(r) = held[*from].clone() {
                    let merged = match held[*to].as_ref() {
                        Some(l) => join(l, &r),
                        None => r,
                    };
                    held[*to] = Some(merged.clone());
                    seen.push(merged);
                }
            }
        }
    }
    seen
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn join_is_a_semilattice(steps in history(), picks in prop::collection::vec(any::<prop::sample::Index>(), 3)) {
        let pool = run(&steps);
        prop_assume!(!pool.is_empty());
        let a = &pool[picks[0].index(pool.len())];
        let b = &pool[picks[1].index(pool.len())];
        let c = &pool[picks[2].index(pool.len())];
        prop_assert_eq!(&join(a, a), a);
        prop_assert_eq!(join(a, b), join(b, a));
        prop_assert_eq!(join(&join(a, b), c), join(a, &join(b, c)));
        prop_assert!(join(a, b).validate().is_ok());
    }

    #[test]
    fn any_delivery_order_of_a_history_converges(steps in history(), seed in any::<u64>()) {
        let pool = run(&steps);
        prop_assume!(!pool.is_empty());
        let forward = pool.iter().skip(1).fold(pool[0].clone(), |acc, r| join(&acc, r));
        // A deterministic shuffle of the pool, with every record delivered twice.
        let mut order: Vec<usize> = (0..pool.len()).chain(0..pool.len()).collect();
        let mut x = seed | 1;
        for i in (1..order.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let shuffled = order.iter().skip(1).fold(pool[order[0]].clone(), |acc, &i| join(&acc, &pool[i]));
        prop_assert_eq!(&forward, &shuffled);
        prop_assert_eq!(forward.copies("f", false), shuffled.copies("f", false));
    }
}
