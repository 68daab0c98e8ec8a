//! App secrets at rest: sealed with AES-256-GCM under the cluster's **data key**, bound to the
//! key they are stored under so a sealed value cannot be moved to another app or name. The
//! replicated store and its sync only ever see sealed bytes; a node opens a secret only to hand
//! it to a container of the app it runs.
//!
//! The data key is random (made by `shoal gen cluster`) and travels only wrapped: sealed under
//! a key-encryption key derived (HKDF-SHA256, salted with the cluster id) from a join secret.
//! Rotating the join secret re-wraps the same data key, so nothing sealed is lost. Clusters made
//! before wrapping used the derived key itself as the data key (`legacy`); their first rotation
//! wraps that one.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;

const MAGIC: &[u8; 4] = b"SSv1";
const INFO: &[&[u8]] = &[b"shoal app secrets v1"];
const WRAP_INFO: &[&[u8]] = &[b"shoal data key wrap v1"];
/// What a wrapped data key is bound to (the AEAD's associated data).
const WRAP_AAD: &str = "shoal data key";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("sealed secret is malformed")]
    Malformed,
    #[error("sealed secret does not open with this cluster's key (another cluster, or tampered)")]
    Open,
    #[error("cannot seal")]
    Seal,
}

pub struct SecretKey {
    key: LessSafeKey,
    raw: [u8; 32],
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// The 32 bytes HKDF-SHA256 gives for `join_secret` in `cluster_id` under `info`.
fn derive_raw(join_secret: &str, cluster_id: &str, info: &[&[u8]]) -> [u8; 32] {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, cluster_id.as_bytes());
    let prk = salt.extract(join_secret.trim().as_bytes());
    let mut raw = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit: neither step can fail.
    if let Ok(okm) = prk.expand(info, Len32) {
        let _ = okm.fill(&mut raw);
    }
    raw
}

impl SecretKey {
    fn from_raw(raw: [u8; 32]) -> Result<SecretKey, SealError> {
        let unbound = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| SealError::Seal)?;
        Ok(SecretKey {
            key: LessSafeKey::new(unbound),
            raw,
        })
    }

    /// A new random data key (`shoal gen cluster`).
    pub fn random() -> Result<SecretKey, SealError> {
        SecretKey::from_raw(rand::random())
    }

    /// The data key of a cluster made before wrapping: derived from its first join secret.
    pub fn legacy(join_secret: &str, cluster_id: &str) -> Result<SecretKey, SealError> {
        SecretKey::from_raw(derive_raw(join_secret, cluster_id, INFO))
    }

    /// The data key for a holder of `join_secret`: unwrapped from `wrapped` when there is one,
    /// else the legacy derivation.
    pub fn resolve(
        wrapped: Option<&str>,
        join_secret: &str,
        cluster_id: &str,
    ) -> Result<SecretKey, SealError> {
        match wrapped.map(str::trim).filter(|w| !w.is_empty()) {
            Some(w) => SecretKey::unwrap(w, join_secret, cluster_id),
            None => SecretKey::legacy(join_secret, cluster_id),
        }
    }

    /// The data key from the first of `wrapped` that opens with `join_secret`; the legacy
    /// derivation only when there is no wrapped key at all (one that does not open is an
    /// error: sealing with a guessed key would make secrets nobody else can read).
    pub fn first_of(
        wrapped: &[Option<&str>],
        join_secret: &str,
        cluster_id: &str,
    ) -> Result<SecretKey, SealError> {
        let mut last = None;
        for w in wrapped.iter().flatten().filter(|w| !w.trim().is_empty()) {
            match SecretKey::unwrap(w, join_secret, cluster_id) {
                Ok(k) => return Ok(k),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(e),
            None => SecretKey::legacy(join_secret, cluster_id),
        }
    }

    /// This data key sealed for holders of `join_secret` (hex): safe to carry in user-data
    /// and join replies, useless without the join secret.
    pub fn wrap(&self, join_secret: &str, cluster_id: &str) -> Result<String, SealError> {
        let kek = SecretKey::from_raw(derive_raw(join_secret, cluster_id, WRAP_INFO))?;
        let sealed = kek.seal(WRAP_AAD, &self.raw)?;
        Ok(sealed.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The data key `wrap` sealed for `join_secret`.
    pub fn unwrap(
        wrapped: &str,
        join_secret: &str,
        cluster_id: &str,
    ) -> Result<SecretKey, SealError> {
        let w = wrapped.trim();
        if !w.len().is_multiple_of(2) || w.len() > 512 {
            return Err(SealError::Malformed);
        }
        let bytes = (0..w.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(w.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| SealError::Malformed)?;
        let kek = SecretKey::from_raw(derive_raw(join_secret, cluster_id, WRAP_INFO))?;
        let raw: [u8; 32] = kek
            .open(WRAP_AAD, &bytes)?
            .try_into()
            .map_err(|_| SealError::Malformed)?;
        SecretKey::from_raw(raw)
    }

    /// Whether two handles hold the same key (tests only: not constant time).
    #[cfg(test)]
    pub fn same_as(&self, other: &SecretKey) -> bool {
        self.raw == other.raw
    }

    /// Seals `plain` for the store key `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut buf = plain.to_vec();
        self.key
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
            .key
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
        let k = SecretKey::legacy("join", "cluster-a").unwrap();
        let sealed = k.seal("secrets/web/API_KEY", b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(k.open("secrets/web/API_KEY", &sealed).unwrap(), b"hunter2");
        // Same key derived elsewhere.
        let k2 = SecretKey::legacy("join\n", "cluster-a").unwrap();
        assert_eq!(k2.open("secrets/web/API_KEY", &sealed).unwrap(), b"hunter2");
        // Moved to another name, another cluster, another secret, tampered, truncated.
        assert_eq!(k.open("secrets/db/API_KEY", &sealed), Err(SealError::Open));
        let other = SecretKey::legacy("join", "cluster-b").unwrap();
        assert_eq!(
            other.open("secrets/web/API_KEY", &sealed),
            Err(SealError::Open)
        );
        let other = SecretKey::legacy("nioj", "cluster-a").unwrap();
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

    #[test]
    fn the_legacy_key_is_what_earlier_versions_derived() {
        // Sealed by the previous implementation (ring's HKDF straight into an AES key) with
        // join secret "join" in cluster "cluster-a": still opens.
        let k = SecretKey::legacy("join", "cluster-a").unwrap();
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"cluster-a").extract(b"join");
        let okm = prk.expand(INFO, &AES_256_GCM).unwrap();
        let old = LessSafeKey::new(UnboundKey::from(okm));
        let mut buf = b"v".to_vec();
        old.seal_in_place_append_tag(
            Nonce::assume_unique_for_key([7; NONCE_LEN]),
            Aad::from(b"secrets/a/B"),
            &mut buf,
        )
        .unwrap();
        let mut sealed = MAGIC.to_vec();
        sealed.extend_from_slice(&[7; NONCE_LEN]);
        sealed.extend_from_slice(&buf);
        assert_eq!(k.open("secrets/a/B", &sealed).unwrap(), b"v");
    }

    #[test]
    fn a_wrapped_data_key_survives_join_secret_rotation() {
        let data = SecretKey::random().unwrap();
        let sealed = data.seal("secrets/web/K", b"v1").unwrap();
        let old = data.wrap("old-secret", "c").unwrap();
        // Rotation: whoever holds the old secret re-wraps the same key for the new one.
        let new = SecretKey::unwrap(&old, "old-secret", "c")
            .unwrap()
            .wrap("new-secret", "c")
            .unwrap();
        let k = SecretKey::resolve(Some(&new), "new-secret", "c").unwrap();
        assert!(k.same_as(&data));
        assert_eq!(k.open("secrets/web/K", &sealed).unwrap(), b"v1");
        // A wrap opens only with its own secret and cluster, and is not the key in clear.
        assert_eq!(
            SecretKey::unwrap(&new, "old-secret", "c").err(),
            Some(SealError::Open)
        );
        assert_eq!(
            SecretKey::unwrap(&new, "new-secret", "d").err(),
            Some(SealError::Open)
        );
        assert_eq!(
            SecretKey::unwrap("zz", "new-secret", "c").err(),
            Some(SealError::Malformed)
        );
        assert_eq!(
            SecretKey::unwrap("abc", "new-secret", "c").err(),
            Some(SealError::Malformed)
        );
        assert!(!SecretKey::resolve(None, "new-secret", "c")
            .unwrap()
            .same_as(&data));
        // The first wrap that opens; legacy only without any; a stray wrap is an error.
        let k = SecretKey::first_of(&[None, Some(&old), Some(&new)], "new-secret", "c").unwrap();
        assert!(k.same_as(&data));
        assert_eq!(
            SecretKey::first_of(&[Some(&old)], "new-secret", "c").err(),
            Some(SealError::Open)
        );
        assert!(SecretKey::first_of(&[None, Some("")], "s", "c")
            .unwrap()
            .same_as(&SecretKey::legacy("s", "c").unwrap()));
        // A legacy cluster's first rotation wraps the derived key.
        let legacy = SecretKey::legacy("first", "c").unwrap();
        let w = legacy.wrap("second", "c").unwrap();
        assert!(SecretKey::unwrap(&w, "second", "c")
            .unwrap()
            .same_as(&legacy));
    }
}
