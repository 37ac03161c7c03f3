//! The replication protocol of one engine, driven by hand: handshake, batches, gaps, holds,
//! echo rules and limits. (Whole meshes over a simulated filesystem are the simulator's tests.)

use rsyncfs_conflict::{Dot, Meta, NodeId, Record, Timestamp, NTP64};
use rsyncfs_mesh::engine::{Action, Apply, Fetch, Now, Source};
use rsyncfs_mesh::wire::{Batch, Holds, Message, WireRecord};
use rsyncfs_mesh::{Config, Engine, Input, MemStore, Output, RelPath, Store};

const SEC: u64 = 1_000_000_000;
const T0: u64 = 1_795_651_200 * SEC;

/// Both clocks at `t` (the tests that step one of them say so).
fn now(t: u64) -> Now {
    Now::new(t, t)
}

fn node(i: u64) -> NodeId {
    NodeId::from_index(i)
}

fn engine(i: u64) -> Engine<MemStore> {
    Engine::new(Config::new(node(i)), MemStore::new())
}

fn drain(e: &mut Engine<MemStore>) -> Vec<Output> {
    std::iter::from_fn(|| e.poll_output()).collect()
}

fn sent_to(outputs: &[Output], to: NodeId) -> Vec<Message> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send { to: t, message } if *t == to => Some(message.clone()),
            _ => None,
        })
        .collect()
}

fn path(p: &str) -> RelPath {
    RelPath::new(p).unwrap()
}

fn file(bytes: &[u8]) -> Meta {
    Meta::file(
        bytes.len() as u64,
        *blake3::hash(bytes).as_bytes(),
        0o644,
        7,
    )
}

fn receive(e: &mut Engine<MemStore>, from: NodeId, message: Message) {
    receive_at(e, T0, from, message);
}

/// A Hello of a node that has received nothing yet.
fn hello(fresh: bool, session: u64) -> Message {
    hello_taking(fresh, session, 0)
}

/// The same, from a node that has taken the receiver's session `taken`.
fn hello_taking(fresh: bool, session: u64, taken: u64) -> Message {
    Message::Hello {
        progress: 0,
        fresh,
        session,
        taken,
    }
}

fn receive_at(e: &mut Engine<MemStore>, at: u64, from: NodeId, message: Message) {
    e.handle(now(at), Input::Received { from, message });
}

fn first_apply(outputs: &[Output]) -> Option<Apply> {
    outputs.iter().find_map(|o| match o {
        Output::Apply(a) => Some(a.clone()),
        _ => None,
    })
}

/// The session of the Hello among `outputs` sent to `peer`.
fn hello_session(outputs: &[Output], peer: NodeId) -> u64 {
    sent_to(outputs, peer)
        .into_iter()
        .find_map(|m| match m {
            Message::Hello { session, .. } => Some(session),
            _ => None,
        })
        .expect("a Hello was sent")
}

/// Connects `e` to `peer` and completes the handshake as the peer would.
fn connect(e: &mut Engine<MemStore>, peer: NodeId, peer_progress: u64) -> Vec<Output> {
    e.handle(now(T0), Input::PeerUp { peer });
    let mut out = drain(e);
    let session = hello_session(&out, peer);
    e.handle(
        now(T0),
        Input::Received {
            from: peer,
            message: Message::Welcome { session },
        },
    );
    e.handle(
        now(T0),
        Input::Received {
            from: peer,
            message: Message::Hello {
                progress: peer_progress,
                fresh: false,
                session: 1,
                taken: 0,
            },
        },
    );
    out.extend(drain(e));
    out
}

/// A record written by `author`, as a peer would send it.
fn remote_write(author: u64, counter: u64, meta: Meta) -> Record {
    let n = node(author);
    Record::write(
        None,
        Dot { node: n, counter },
        Timestamp::new(NTP64(counter << 32), n.hlc_id()),
        meta,
    )
}

#[test]
fn handshake_is_repeated_until_welcomed() {
    let mut e = engine(0);
    e.handle(now(T0), Input::PeerUp { peer: node(1) });
    let out = drain(&mut e);
    let session = hello_session(&out, node(1));
    assert_eq!(sent_to(&out, node(1)), vec![hello(true, session)]);
    // The Hello is lost: it goes again after the resend interval, still fresh.
    let at = e.poll_timeout().expect("a resend is due");
    e.handle_timeout(now(at));
    assert_eq!(sent_to(&drain(&mut e), node(1)), vec![hello(true, session)]);
    // A Welcome of another session does not count.
    receive_at(
        &mut e,
        at,
        node(1),
        Message::Welcome {
            session: session + 1,
        },
    );
    assert!(e.poll_timeout().is_some(), "still waiting for the Welcome");
    receive_at(&mut e, at, node(1), Message::Welcome { session });
    assert!(drain(&mut e).is_empty());
    assert_eq!(e.poll_timeout(), None, "nothing left to resend");
    // A Hello from the peer is answered with Welcome, twice if it comes twice; the first of a
    // session also gets this node's Hello again (the peer may have started its session after
    // the first one reached it).
    for round in 0..2 {
        receive_at(&mut e, at, node(1), hello(false, 7));
        let mut want = vec![Message::Welcome { session: 7 }];
        if round == 0 {
            want.insert(0, hello_taking(true, session, 7));
        }
        assert_eq!(sent_to(&drain(&mut e), node(1)), want);
    }
    // A Hello of an older session is left alone.
    receive_at(&mut e, at, node(1), hello(false, 6));
    assert!(sent_to(&drain(&mut e), node(1)).is_empty());
    // A newer one means the peer started over without this node seeing the link drop: this
    // node starts over too, with a Hello of its own (a new session), and welcomes the peer's.
    receive_at(&mut e, at, node(1), hello(false, 8));
    let out = sent_to(&drain(&mut e), node(1));
    let again = match out.as_slice() {
        [Message::Hello {
            fresh: false,
            session: s,
            ..
        }, Message::Welcome { session: 8 }] => *s,
        other => panic!("expected a new Hello and a Welcome, got {other:?}"),
    };
    assert!(again > session);
    // The peer starts over again, but its new session has taken this node's: this node goes
    // on with its own (no new Hello, which would be news to the peer in turn), only welcoming.
    receive_at(&mut e, at, node(1), hello_taking(false, 9, again));
    assert_eq!(
        sent_to(&drain(&mut e), node(1)),
        vec![Message::Welcome { session: 9 }]
    );
    assert_eq!(e.session(&node(1)), again);
}

#[test]
fn local_writes_are_recorded_and_shipped_to_welcomed_peers() {
    let mut e = engine(0);
    connect(&mut e, node(1), 0);
    let meta = file(b"hello");
    e.handle(
        now(T0),
        Input::LocalChange {
            path: path("a"),
            observed: Some(meta.clone()),
        },
    );
    let out = drain(&mut e);
    let [Message::Batch(batch)] = &sent_to(&out, node(1))[..] else {
        panic!("expected one batch: {out:?}");
    };
    assert_eq!(batch.records.len(), 1);
    let r = &batch.records[0];
    assert_eq!(r.record.author, Some(node(0)));
    assert_eq!(r.record.winner().meta, meta);
    assert_eq!(
        r.record.winner().dot,
        Dot {
            node: node(0),
            counter: r.seq
        }
    );
    // The same state reported again is not a new write.
    e.handle(
        now(T0),
        Input::LocalChange {
            path: path("a"),
            observed: Some(meta),
        },
    );
    assert!(sent_to(&drain(&mut e), node(1)).is_empty());
    assert_eq!(e.stats().local_writes, 1);
}

#[test]
fn a_record_never_goes_back_to_its_author_or_source() {
    let mut e = engine(0);
    connect(&mut e, node(1), 0);
    connect(&mut e, node(2), 0);
    let data = b"from node 1";
    let record = remote_write(1, 5, file(data));
    let batch = Batch {
        holds: Holds {
            files: 7,
            bytes: 70,
        },
        after: 0,
        upto: 5,
        records: vec![WireRecord {
            seq: 5,
            path: path("a"),
            record,
            data: Some(bytes::Bytes::from_static(data)),
        }],
    };
    receive(&mut e, node(1), Message::Batch(batch));
    // What the sender said it holds is kept for progress.
    let told = e.peer_status();
    let from_one = told.iter().find(|p| p.peer == node(1)).unwrap();
    assert_eq!(
        from_one.their_tree,
        Holds {
            files: 7,
            bytes: 70
        }
    );
    let out = drain(&mut e);
    assert_eq!(sent_to(&out, node(1)), vec![Message::Ack { progress: 5 }]);
    let apply = first_apply(&out).expect("the record is applied");
    assert!(matches!(
        apply.action,
        Action::Write {
            source: Source::Inline(_),
            ..
        }
    ));
    e.handle(
        now(T0),
        Input::ApplyDone {
            op: apply.op,
            result: Ok(()),
        },
    );
    let out = drain(&mut e);
    assert!(
        sent_to(&out, node(1)).is_empty(),
        "sent back to its author: {out:?}"
    );
    let to_two = sent_to(&out, node(2));
    assert!(
        matches!(&to_two[..], [Message::Batch(b)] if b.records.len() == 1),
        "forwarded to the other peer: {to_two:?}"
    );
    // A batch says what its sender holds: here the one file just applied.
    assert!(
        matches!(&to_two[..], [Message::Batch(b)] if b.holds == Holds { files: 1, bytes: data.len() as u64 }),
        "{to_two:?}"
    );
}

#[test]
fn a_gap_asks_for_a_resend_and_a_duplicate_is_only_acknowledged() {
    let mut e = engine(0);
    connect(&mut e, node(1), 0);
    let gap = Batch {
        holds: Default::default(),
        after: 3,
        upto: 4,
        records: vec![],
    };
    receive(&mut e, node(1), Message::Batch(gap));
    assert_eq!(
        sent_to(&drain(&mut e), node(1)),
        vec![Message::Pull { after: 0 }]
    );
    let first = Batch {
        holds: Default::default(),
        after: 0,
        upto: 4,
        records: vec![],
    };
    receive(&mut e, node(1), Message::Batch(first.clone()));
    assert_eq!(
        sent_to(&drain(&mut e), node(1)),
        vec![Message::Ack { progress: 4 }]
    );
    receive(&mut e, node(1), Message::Batch(first));
    assert_eq!(
        sent_to(&drain(&mut e), node(1)),
        vec![Message::Ack { progress: 4 }]
    );
    assert_eq!(e.store().progress(&node(1)), 4);
}

#[test]
fn progress_is_held_back_until_fetched_content_is_applied() {
    let mut e = engine(0);
    connect(&mut e, node(1), 0);
    let data = vec![9u8; 200_000];
    let record = remote_write(1, 8, file(&data));
    let batch = Batch {
        holds: Default::default(),
        after: 0,
        upto: 9,
        records: vec![WireRecord {
            seq: 8,
            path: path("big"),
            record,
            data: None,
        }],
    };
    receive(&mut e, node(1), Message::Batch(batch));
    let out = drain(&mut e);
    let fetch: Fetch = out
        .iter()
        .find_map(|o| match o {
            Output::Fetch(f) => Some(f.clone()),
            _ => None,
        })
        .expect("large content is fetched");
    assert_eq!(fetch.from, node(1));
    // Acknowledged to the sender, but a crash now must not lose the record: the stored
    // progress stays before it.
    assert_eq!(sent_to(&out, node(1)), vec![Message::Ack { progress: 9 }]);
    assert_eq!(e.store().progress(&node(1)), 7);
    e.handle(
        now(T0),
        Input::FetchDone {
            op: fetch.op,
            result: Ok(77),
        },
    );
    let apply = first_apply(&drain(&mut e)).expect("applied once fetched");
    assert!(matches!(
        apply.action,
        Action::Write {
            source: Source::Staged(77),
            ..
        }
    ));
    e.handle(
        now(T0),
        Input::ApplyDone {
            op: apply.op,
            result: Ok(()),
        },
    );
    drain(&mut e);
    assert_eq!(e.store().progress(&node(1)), 9);
    assert!(e.store().get(&path("big")).unwrap().record.is_some());
}

#[test]
fn a_peer_claiming_more_than_was_written_gets_everything() {
    let mut e = engine(0);
    e.handle(
        now(T0),
        Input::LocalChange {
            path: path("a"),
            observed: Some(file(b"x")),
        },
    );
    drain(&mut e);
    let out = connect(&mut e, node(1), 1_000_000);
    let batches = sent_to(&out, node(1));
    assert!(
        batches
            .iter()
            .any(|m| matches!(m, Message::Batch(b) if b.after == 0 && b.records.len() == 1)),
        "{batches:?}"
    );
}

#[test]
fn too_much_pending_work_defers_new_batches_until_it_shrinks() {
    let mut cfg = Config::new(node(0));
    cfg.pending_max = 2;
    let mut e = Engine::new(cfg, MemStore::new());
    connect(&mut e, node(1), 0);
    let records: Vec<WireRecord> = (1..=3)
        .map(|i| WireRecord {
            seq: i,
            path: path(&format!("f{i}")),
            record: remote_write(1, i, file(&vec![i as u8; 100_000])),
            data: None,
        })
        .collect();
    receive(
        &mut e,
        node(1),
        Message::Batch(Batch {
            holds: Default::default(),
            after: 0,
            upto: 3,
            records,
        }),
    );
    let mut outputs = drain(&mut e);
    let more = Batch {
        holds: Default::default(),
        after: 3,
        upto: 4,
        records: vec![],
    };
    receive(&mut e, node(1), Message::Batch(more));
    let out = drain(&mut e);
    // Deferred, not dropped: the sender hears that this node is alive and has up to 3.
    assert_eq!(
        sent_to(&out, node(1)),
        vec![Message::Ack { progress: 3 }],
        "{out:?}"
    );
    assert_eq!(e.stats().batches_deferred, 1);
    // The pending work completes (fetched, applied): the deferred batch is taken.
    let mut acks = Vec::new();
    for _ in 0..100 {
        let Some(o) = outputs.pop() else { break };
        match o {
            Output::Fetch(f) => e.handle(
                now(T0),
                Input::FetchDone {
                    op: f.op,
                    result: Ok(f.op),
                },
            ),
            Output::Apply(a) => e.handle(
                now(T0),
                Input::ApplyDone {
                    op: a.op,
                    result: Ok(()),
                },
            ),
            Output::Send {
                message: Message::Ack { progress },
                ..
            } => acks.push(progress),
            _ => {}
        }
        outputs.extend(drain(&mut e));
    }
    assert!(acks.contains(&4), "{acks:?}");
}

#[test]
fn sequences_are_never_reused_across_a_crash() {
    let mut store = MemStore::new();
    let mut e = Engine::new(Config::new(node(0)), store);
    e.handle(
        now(T0),
        Input::LocalChange {
            path: path("a"),
            observed: Some(file(b"1")),
        },
    );
    let used = e.log_end();
    store = e.into_store();
    store.crash();
    let mut e = Engine::new(Config::new(node(0)), store);
    e.handle(
        now(T0),
        Input::LocalChange {
            path: path("b"),
            observed: Some(file(b"2")),
        },
    );
    assert!(e.log_end() > used, "{} after {used}", e.log_end());
}

/// Batches are cut by what they weigh on the wire: 300 files with about 60 KiB of extended
/// attributes each go out in frames that a peer accepts, and every record goes.
#[test]
fn batches_of_records_with_large_attributes_fit_a_frame() {
    let mut e = engine(0);
    connect(&mut e, node(1), 0);
    let xattrs: Vec<(Vec<u8>, Vec<u8>)> = (0..15)
        .map(|k| (format!("user.k{k}").into_bytes(), vec![b'v'; 4000]))
        .collect();
    for i in 0..300 {
        e.handle(
            now(T0),
            Input::LocalChange {
                path: path(&format!("dir/file{i:03}")),
                observed: Some(file(format!("{i}").as_bytes()).with_xattrs(xattrs.clone())),
            },
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut frames = 0;
    for _ in 0..100 {
        let out = drain(&mut e);
        let batches: Vec<_> = sent_to(&out, node(1))
            .into_iter()
            .filter_map(|m| match m {
                Message::Batch(b) => Some(b),
                _ => None,
            })
            .collect();
        if batches.is_empty() && seen.len() == 300 {
            break;
        }
        for b in batches {
            let message = Message::Batch(b.clone());
            let frame = rsyncfs_mesh::wire::encode_frame(&message).expect("within the limit");
            assert_eq!(rsyncfs_mesh::wire::decode(&frame[4..]).unwrap(), message);
            frames += 1;
            seen.extend(b.records.iter().map(|r| r.path.clone()));
            receive(&mut e, node(1), Message::Ack { progress: b.upto });
        }
    }
    assert_eq!(seen.len(), 300);
    assert!(frames >= 9, "{frames} frames for about 18 MB of attributes");
}

/// An observation that failed (the file changed every time it was read) is asked for again
/// after a backoff, until one succeeds; meanwhile the engine is not idle.
#[test]
fn a_failed_observation_is_asked_for_again() {
    let mut e = engine(0);
    e.handle(now(T0), Input::ObserveFailed { path: path("busy") });
    assert!(!e.is_idle());
    let mut at = T0;
    for round in 0..3 {
        at = e.poll_timeout().expect("a retry is due");
        assert!(at > T0, "round {round}");
        e.handle_timeout(now(at));
        let out = drain(&mut e);
        assert!(
            out.contains(&Output::Observe { path: path("busy") }),
            "round {round}: {out:?}"
        );
        e.handle(now(at), Input::ObserveFailed { path: path("busy") });
    }
    e.handle(
        now(at),
        Input::LocalChange {
            path: path("busy"),
            observed: Some(file(b"done")),
        },
    );
    drain(&mut e);
    assert!(e.is_idle());
}
