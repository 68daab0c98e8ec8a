//! App secrets at rest: sealed with AES-256-GCM under a key derived (HKDF-SHA256) from the
//! cluster's join secret and id, bound to the key they are stored under so a sealed value
//! cannot be moved to another app or name. The replicated store and its sync only ever see
//! sealed bytes; a node opens a secret only to hand it to a container of the app it runs.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;

const MAGIC: &[u8; 4] = b"SSv1";
const INFO: &[&[u8]] = &[b"shoal app secrets v1"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("sealed secret is malformed")]
    Malformed,
    #[error("sealed secret does not open with this cluster's key (another cluster, or tampered)")]
    Open,
    #[error("cannot seal")]
    Seal,
}

pub struct SecretKey(LessSafeKey);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// The cluster's key: every node that holds the join secret derives the same one.
    pub fn derive(join_secret: &str, cluster_id: &str) -> Result<SecretKey, SealError> {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, cluster_id.as_bytes());
        let prk = salt.extract(join_secret.trim().as_bytes());
        let okm = prk
            .expand(INFO, &AES_256_GCM)
            .map_err(|_| SealError::Seal)?;
        Ok(SecretKey(LessSafeKey::new(UnboundKey::from(okm))))
    }

    /// Seals `plain` for the store key `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut buf = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(name.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::Seal)?;
        let mut out = Vec::with_capacity(4 + NONCE_LEN + buf.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Opens what `seal` produced for the same `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let rest = sealed.strip_prefix(MAGIC).ok_or(SealError::Malformed)?;
        if rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::Malformed);
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Malformed)?;
        let mut buf = ct.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
            .map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_the_same_cluster_and_name() {
        let k = SecretKey::derive("join", "cluster-a").unwrap();
        let sealed = k.seal("secrets/web/API_KEY", b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(k.open("secrets/web/API_KEY", &sealed).unwrap(), b"hunter2");
        // Same key derived elsewhere.
        let k2 = SecretKey::derive("join\n", "cluster-a").unwrap();
        assert_eq!(k2.open("secrets/web/API_KEY", &sealed).unwrap(), b"hunter2");
        // Moved to another name, another cluster, another secret, tampered, truncated.
        assert_eq!(k.open("secrets/db/API_KEY", &sealed), Err(SealError::Open));
        let other = SecretKey::derive("join", "cluster-b").unwrap();
        assert_eq!(
            other.open("secrets/web/API_KEY", &sealed),
            Err(SealError::Open)
        );
        let other = SecretKey::derive("nioj", "cluster-a").unwrap();
        assert_eq!(
            other.open("secrets/web/API_KEY", &sealed),
            Err(SealError::Open)
        );
        let mut t = sealed.clone();
        let last = t.len() - 1;
        t[last] ^= 1;
        assert_eq!(k.open("secrets/web/API_KEY", &t), Err(SealError::Open));
        assert_eq!(
            k.open("secrets/web/API_KEY", &sealed[..10]),
            Err(SealError::Malformed)
        );
        assert_eq!(
            k.open("secrets/web/API_KEY", b"nope"),
            Err(SealError::Malformed)
        );
        // Two seals of one value differ (random nonce).
        assert_ne!(sealed, k.seal("secrets/web/API_KEY", b"hunter2").unwrap());
    }
}
