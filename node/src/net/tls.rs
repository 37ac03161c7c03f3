//! QUIC endpoint configuration: TLS 1.3 with mutual authentication, where each side proves it
//! holds its key and is identified by the hash of its public key (its node id).
//!
//! The client side pins the server: a dial to a known peer accepts only that peer's id. The
//! server side asks every client for its certificate and checks its signature; whether the
//! client is trusted is decided right after the handshake from its id and the protocol it asked
//! for ([`ALPN`] for replication, [`ALPN_JOIN`] for a join request). See `transport.rs`.

use crate::trust::identity::{id_of_cert, Identity};
use rsyncfs_conflict::NodeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;

/// The replication protocol and its version (2 since Hello carries `taken`): a node of another
/// version fails the TLS handshake with "no application protocol" instead of sending frames it
/// cannot decode.
pub const ALPN: &[u8] = b"rsyncfs/3";
/// A node asking to join (it is not trusted yet).
pub const ALPN_JOIN: &[u8] = b"rsyncfs-join/1";
/// The name a client puts in its hello; certificates are checked by id, not by name.
pub const SERVER_NAME: &str = "rsyncfs";

/// Stream receive window: one stream can have this much in flight (a 20 ms round trip at
/// 400 MB/s). These windows bound the memory a peer's transfers take.
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Connection receive window and send window, across streams.
const CONNECTION_WINDOW: u32 = 24 * 1024 * 1024;
/// The largest UDP payload a node accepts (the most UDP allows).
pub const MAX_UDP_PAYLOAD: u16 = 65_527;
/// The largest packet path MTU discovery searches for. It starts at QUIC's 1,200 bytes; on
/// Ethernet it settles near 1,452, on loopback and jumbo-frame links at this bound, where larger
/// packets cut the per-packet costs (encryption calls, system calls, acknowledgements).
///
/// Not more: quinn sends up to 10 packets in one GSO system call, the kernel refuses a call of
/// more than 64 KiB (EMSGSIZE), and quinn-udp drops such a batch without a word (it takes
/// EMSGSIZE for a lost MTU probe). With the bound at 65,527 on loopback, every batch of two or
/// more large packets was lost; quinn took the path for a black hole and fell back to 1,200
/// bytes. 1 GiB then crossed in 5.4 s, and in 2.6 s with this bound (docs/BENCHMARKS.md).
pub const MTU_PROBED_MAX: u16 = 6_500;
/// Ten packets of the largest size, with IPv6 and UDP headers, fit one GSO call.
const _: () = assert!(MTU_PROBED_MAX as usize * 10 + 48 <= u16::MAX as usize);
/// After bursts of lost large packets quinn takes the path for a black hole and falls back to
/// 1,200-byte packets until it probes again, a minute later by default. Lost bursts are far
/// more often a full queue (or random loss on a WAN) than a smaller MTU, so it probes again
/// soon: a probe that is lost costs one packet.
const BLACK_HOLE_COOLDOWN: Duration = Duration::from_secs(3);
/// Keep-alives every second, and a connection that hears nothing for 4 s is gone: a dead peer
/// is shown down within 5 s (it was 30 s, and status showed a killed peer connected).
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct Verifier {
    /// The server id a client accepts; `None` accepts any (a join without a token, which learns
    /// the member's id from this handshake).
    expect: Option<NodeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Verifier {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<NodeId, rustls::Error> {
        let id = id_of_cert(cert).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        match self.expect {
            Some(expect) if expect != id => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(id),
        }
    }
}

impl Verifier {
    /// QUIC is TLS 1.3 only.
    fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Verifier::tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for Verifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Verifier::tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The congestion controller of a node's connections (quinn's three). BBR (the default) paces
/// by the measured bottleneck and round trip and does not take random loss for congestion:
/// through a relay adding 50 ms each way and 1% loss it moved 100 MiB in 4.2 s, 2.4x faster
/// than rsync over TCP BBR, where Cubic (quinn's own default) took 127 s for 20 MiB
/// (`bench/wan.py`, docs/BENCHMARKS.md). Cubic and NewReno back off at every loss, which yields
/// more to TCP flows on a congested link. quinn calls its BBR experimental.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    #[default]
    Bbr,
    Cubic,
    NewReno,
}

fn transport_config(congestion: Congestion) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    match congestion {
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
    };
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_PROBED_MAX)
        .black_hole_cooldown(BLACK_HOLE_COOLDOWN);
    t.mtu_discovery_config(Some(mtu));
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW))
        .receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("a small timeout"),
        ))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(256))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(16));
    Arc::new(t)
}

/// The server side of a node's endpoint.
pub fn server_config(
    identity: &Identity,
    congestion: Congestion,
) -> Result<quinn::ServerConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(Verifier {
        expect: None,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert.clone()], identity.private_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec(), ALPN_JOIN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(congestion));
    Ok(config)
}

/// The client side of one dial: to `expect` (any server when `None`), speaking `alpn`.
pub fn client_config(
    identity: &Identity,
    expect: Option<NodeId>,
    alpn: &[u8],
    congestion: Congestion,
) -> Result<quinn::ClientConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(Verifier {
        expect,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.private_key())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(congestion));
    Ok(config)
}

/// The id of the node at the other end of an established connection.
pub fn peer_id(conn: &quinn::Connection) -> Option<NodeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    id_of_cert(certs.first()?).ok()
}

/// The protocol an established connection speaks.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}
