//! A peer that is not trusted, and a trusted peer that lies: the node refuses the first in the
//! handshake, cuts the second off with a logged error, writes nothing outside its tree, and
//! keeps serving its other peers. The bad peer is built here from the node's own library (its
//! identity and TLS), speaking hand-made frames.

mod common;

use common::{converge, join, Node};
use rsyncfs_conflict::{Dot, Meta, NodeId, Record, Timestamp, NTP64};
use rsyncfs_node::net::tls;
use rsyncfs_node::trust::identity::Identity;
use serde::Serialize;
use std::fs;
use std::net::SocketAddr;
use std::time::Duration;

/// The wire types, with a path that is any string (the real ones refuse bad paths).
#[derive(Serialize)]
struct Envelope {
    version: u16,
    message: EvilMessage,
}

#[derive(Serialize)]
#[allow(dead_code)]
enum EvilMessage {
    Hello {
        progress: u64,
        fresh: bool,
        session: u64,
    },
    Welcome {
        session: u64,
    },
    Batch(EvilBatch),
}

#[derive(Serialize)]
struct EvilBatch {
    after: u64,
    upto: u64,
    records: Vec<EvilRecord>,
}

#[derive(Serialize)]
struct EvilRecord {
    seq: u64,
    path: String,
    record: Record,
    data: Option<Vec<u8>>,
}

fn batch_for(id: NodeId, path: &str) -> Vec<u8> {
    let data = b"owned".to_vec();
    let meta = Meta::file(data.len() as u64, *blake3::hash(&data).as_bytes(), 0o644, 0);
    let record = Record::write(
        None,
        Dot {
            node: id,
            counter: 1,
        },
        Timestamp::new(NTP64(1 << 40), id.hlc_id()),
        meta,
    );
    let envelope = Envelope {
        version: rsyncfs_mesh::wire::PROTOCOL_VERSION,
        message: EvilMessage::Batch(EvilBatch {
            after: 0,
            upto: 1,
            records: vec![EvilRecord {
                seq: 1,
                path: path.to_string(),
                record,
                data: Some(data),
            }],
        }),
    };
    let body = postcard::to_stdvec(&envelope).unwrap();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Connects as `identity` and sends `bytes` on an engine stream; returns the close code the
/// node answered with.
async fn send_as(
    identity: &Identity,
    to: SocketAddr,
    expect: NodeId,
    bytes: Vec<u8>,
) -> Option<u64> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(
        tls::client_config(
            identity,
            Some(expect),
            tls::ALPN,
            tls::Congestion::default(),
        )
        .unwrap(),
    );
    let conn = endpoint.connect(to, tls::SERVER_NAME).unwrap().await.ok()?;
    if let Ok(mut stream) = conn.open_uni().await {
        let _ = stream.write_all(&[1]).await;
        let _ = stream.write_all(&bytes).await;
        let _ = stream.finish();
    }
    let reason = tokio::time::timeout(Duration::from_secs(20), conn.closed())
        .await
        .expect("the node did not close the connection");
    endpoint.close(0u32.into(), b"");
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}

#[test]
fn untrusted_and_lying_peers_are_cut_off() {
    if !rsyncfs_logger::fuse_tests_can_run() {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let liar_state = dir.path().join("liar");
    fs::create_dir_all(&liar_state).unwrap();
    let liar = Identity::load_or_create(&liar_state).unwrap();
    let stranger_state = dir.path().join("stranger");
    fs::create_dir_all(&stranger_state).unwrap();
    let stranger = Identity::load_or_create(&stranger_state).unwrap();

    // a trusts b (joined) and the liar (written into its peers before it starts).
    let mut a = Node::prepare(dir.path(), "a", "two-way", &[]);
    fs::write(
        a.state.join("peers.json"),
        format!(r#"{{"peers":[{{"id":"{}","addr":null}}]}}"#, liar.id.long()),
    )
    .unwrap();
    a.run();
    let b = Node::start(dir.path(), "b");
    join(&a, &b);
    let a_id = NodeId::parse(&a.id()).unwrap();
    let a_addr: SocketAddr = a.listen().parse().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    // A stranger is refused before it can say anything.
    let code = rt.block_on(send_as(
        &stranger,
        a_addr,
        a_id,
        batch_for(stranger.id, "x"),
    ));
    assert_eq!(code, Some(2), "the untrusted peer was not refused");
    assert!(a.log_text().contains("is not trusted"));

    // A trusted peer with bad paths or an oversized frame is cut off, one connection each.
    let bad_paths = [
        "../escape",
        "/etc/rsyncfs-escape",
        "a\0b",
        ".rsyncfs/tmp/x",
        "x/../../y",
    ];
    for path in bad_paths {
        let code = rt.block_on(send_as(&liar, a_addr, a_id, batch_for(liar.id, path)));
        assert_eq!(code, Some(3), "a record for {path:?} was not refused");
    }
    let mut huge = (64u32 << 20).to_be_bytes().to_vec();
    huge.extend_from_slice(&[0; 1024]);
    assert_eq!(rt.block_on(send_as(&liar, a_addr, a_id, huge)), Some(3));
    assert_eq!(
        rt.block_on(send_as(
            &liar,
            a_addr,
            a_id,
            vec![0, 0, 0, 3, 0xff, 0xff, 0xff]
        )),
        Some(3),
        "a frame that does not decode was not refused"
    );
    let log = a.log_text();
    assert!(
        log.matches("sent bad data").count() >= bad_paths.len() + 2,
        "{log}"
    );

    // Nothing was written outside the tree or into the state folder.
    assert!(!dir.path().join("escape").exists());
    assert!(!dir.path().join("a/escape").exists());
    assert!(!std::path::Path::new("/etc/rsyncfs-escape").exists());
    assert!(!a.b(".rsyncfs/tmp/x").exists());
    // And a still serves b, both ways.
    fs::write(a.m("after.txt"), b"still here").unwrap();
    fs::write(b.m("from-b.txt"), b"b too").unwrap();
    converge(&[&a, &b], |t| {
        t.contains_key("after.txt") && t.contains_key("from-b.txt")
    });
}
