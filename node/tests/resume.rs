//! What a fetch leaves for the next fetch of the same content when its sender goes away, on a
//! real QUIC connection to a hand-made sender (no FUSE, no root).

use rsyncfs_mesh::engine::{Fetch, FetchError};
use rsyncfs_mesh::RelPath;
use rsyncfs_node::net::{content, tls};
use rsyncfs_node::tree::segments::{self, SEGMENT};
use rsyncfs_node::tree::Tree;
use rsyncfs_node::trust::identity::Identity;
use std::sync::atomic::AtomicU64;

/// A preseed (what the sender pushed while its writer wrote the file) becomes the fetch's
/// staging file when the fetch starts. The sender killed right after the fetch asked, before it
/// answered, must not lose those segments: they are kept as the partial copy the next fetch of
/// the content resumes from, as when the transfer breaks later. (The fault suite's "sender
/// killed" round met this now and then: 64 MiB staged, 192 MiB moved again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preseed_taken_over_is_kept_when_the_sender_goes_before_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let state = |name: &str| {
        let p = dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let sender = Identity::load_or_create(&state("sender")).unwrap();
    let receiver = Identity::load_or_create(&state("receiver")).unwrap();
    let tree = Tree::open(&state("tree")).unwrap();

    // The sender: reads the fetch's request, then is gone without a word.
    let server = quinn::Endpoint::server(
        tls::server_config(&sender, tls::Congestion::default()).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let gone = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (_send, mut recv) = conn.accept_bi().await.unwrap();
        let mut some = [0u8; 16];
        recv.read_exact(&mut some).await.unwrap();
        conn.close(0u32.into(), b"killed");
        server.wait_idle().await;
    });

    // Three segments of a 40 MiB file pushed here before its writer closed it.
    let path = RelPath::new("big").unwrap();
    let size = 10 * SEGMENT;
    let data: Vec<u8> = (0..3 * SEGMENT).map(|i| (i % 251) as u8).collect();
    {
        let seed = tree.preseed(sender.id, 1, &path).unwrap();
        let mut seed = seed.lock();
        for (i, segment) in data.chunks(SEGMENT as usize).enumerate() {
            seed.write(i as u64, segment, segments::cv(i as u64, segment))
                .unwrap();
        }
    }
    let hash = [7u8; 32];
    assert!(tree.partial(&hash).is_none());

    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(
        tls::client_config(
            &receiver,
            Some(sender.id),
            tls::ALPN,
            tls::Congestion::default(),
        )
        .unwrap(),
    );
    let conn = client
        .connect(addr, tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let fetch = Fetch {
        op: 1,
        from: sender.id,
        path: path.clone(),
        hash,
        size,
        basis: None,
    };
    let result = content::fetch(
        &tree,
        &fetch,
        &mut send,
        &mut recv,
        &AtomicU64::new(0),
        &tokio::sync::Notify::new(),
    )
    .await;
    assert!(matches!(result, Err(FetchError::Unreachable)), "{result:?}");
    let (_, len) = tree
        .partial(&hash)
        .expect("the preseed's segments are kept for the next fetch");
    assert!(len >= 3 * SEGMENT, "{len} bytes kept");
    gone.await.unwrap();
    client.close(0u32.into(), b"");
}
