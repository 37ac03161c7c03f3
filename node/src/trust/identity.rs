//! A node's identity: a key pair and a self-signed certificate made on first start and kept in
//! the state directory (readable by root only). The node id is the BLAKE3 hash of the public key
//! (its DER SubjectPublicKeyInfo); peers pin that id, nothing else authenticates a node.

use rcgen::{CertificateParams, KeyPair, PublicKeyData};
use rsyncfs_conflict::NodeId;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

const KEY_FILE: &str = "key.der";
const CERT_FILE: &str = "cert.der";

pub struct Identity {
    pub id: NodeId,
    pub cert: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Identity {
    /// Loads the identity kept in `state`, or makes one there.
    pub fn load_or_create(state: &Path) -> std::io::Result<Identity> {
        let (key_path, cert_path) = (state.join(KEY_FILE), state.join(CERT_FILE));
        if key_path.exists() {
            let key_der = std::fs::read(&key_path)?;
            let cert = std::fs::read(&cert_path)?;
            let key = KeyPair::try_from(key_der.as_slice()).map_err(|e| {
                std::io::Error::other(format!("{}: not a key: {e}", key_path.display()))
            })?;
            let cert = CertificateDer::from(cert);
            let id = id_of_cert(&cert)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", cert_path.display())))?;
            if id != NodeId::from_public_key(&key.subject_public_key_info()) {
                return Err(std::io::Error::other(format!(
                    "{} does not belong to {}",
                    cert_path.display(),
                    key_path.display()
                )));
            }
            return Ok(Identity { id, cert, key_der });
        }
        let key = KeyPair::generate().map_err(std::io::Error::other)?;
        let id = NodeId::from_public_key(&key.subject_public_key_info());
        let params = CertificateParams::new(vec![format!("{}.rsyncfs", id.long())])
            .map_err(std::io::Error::other)?;
        let cert = params.self_signed(&key).map_err(std::io::Error::other)?;
        let key_der = key.serialize_der();
        write_private(&key_path, &key_der)?;
        write_private(&cert_path, cert.der())?;
        Ok(Identity {
            id,
            cert: cert.der().clone(),
            key_der,
        })
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// The node id a certificate speaks for: the hash of its public key.
pub fn id_of_cert(cert: &CertificateDer<'_>) -> Result<NodeId, webpki::Error> {
    let parsed = webpki::EndEntityCert::try_from(cert)?;
    Ok(NodeId::from_public_key(
        parsed.subject_public_key_info().as_ref(),
    ))
}

/// Writes a file only root can read, atomically (a temporary file renamed into place).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_made_once_and_its_id_is_the_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(id_of_cert(&a.cert).unwrap(), a.id);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(Identity::load_or_create(other.path()).unwrap().id, a.id);
    }
}
