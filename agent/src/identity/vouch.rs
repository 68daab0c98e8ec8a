//! The agent's proofs (see `store::vouch`): a node signs what it writes with its TLS key
//! (ECDSA P-256, or Ed25519), whose certificate travels in the proof of its `nodes/<id>`
//! record; an operator's writes are signed with an Ed25519 key derived from the admin token,
//! of which nodes keep only the public half (`admin.pub`). Checking is done on every hop.
//!
//! Why signatures and not the connection's identity: entries travel through other nodes
//! (rumors, anti-entropy, reconcile), so the TLS peer is rarely the writer. A signature made
//! once by the writer is checked by every receiver, costs nothing to relay, and only entries
//! that would win the merge are checked (duplicates cost a lookup, not a verification).

use crate::identity::cert::cert_info_der;
use crate::store::vouch::{Lookup, Proof, Sign, Unvouched, Vouch, Writer};
use crate::store::{Bytes, Entry, Keyspace, NodeId};
use ring::signature::{self, KeyPair};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum VouchError {
    #[error("node key: {0}")]
    Key(String),
    #[error("node certificate: {0}")]
    Cert(String),
    #[error("admin public key {0:?}: expected 64 hex digits (admin.pub)")]
    OperatorKey(String),
}

/// What a public key is for ring.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Alg {
    EcdsaP256,
    Ed25519,
}

impl Alg {
    fn verifier(self) -> &'static dyn signature::VerificationAlgorithm {
        match self {
            Alg::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1,
            Alg::Ed25519 => &signature::ED25519,
        }
    }
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_ED25519: &str = "1.3.101.112";

/// The algorithm and raw public key of a DER certificate.
fn public_key(der: &[u8]) -> Result<(Alg, Vec<u8>), String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let spki = cert.public_key();
    let alg = match spki.algorithm.algorithm.to_id_string().as_str() {
        OID_ED25519 => Alg::Ed25519,
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            if curve.as_deref() != Some(OID_P256) {
                return Err("only P-256 EC keys are accepted".into());
            }
            Alg::EcdsaP256
        }
        other => return Err(format!("unsupported key algorithm {other}")),
    };
    Ok((alg, spki.subject_public_key.data.to_vec()))
}

enum NodeKey {
    Ecdsa(signature::EcdsaKeyPair),
    Ed25519(signature::Ed25519KeyPair),
}

/// Signs this node's writes with its TLS key; its own record carries its certificate.
pub struct NodeSigner {
    key: NodeKey,
    cert: Bytes,
    rng: ring::rand::SystemRandom,
}

impl NodeSigner {
    /// From the node's key (PKCS#8 PEM) and certificate (PEM), as `NodeIdentity` holds them.
    pub fn new(key_pem: &str, cert_pem: &str) -> Result<NodeSigner, VouchError> {
        use rustls_pki_types::pem::PemObject;
        let key_der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| VouchError::Key(e.to_string()))?;
        let cert = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| VouchError::Cert(e.to_string()))?;
        let (alg, public) = public_key(&cert).map_err(VouchError::Cert)?;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = key_der.secret_pkcs8_der();
        let key = match alg {
            Alg::EcdsaP256 => NodeKey::Ecdsa(
                signature::EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                    pkcs8,
                    &rng,
                )
                .map_err(|e| VouchError::Key(e.to_string()))?,
            ),
            Alg::Ed25519 => NodeKey::Ed25519(
                signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
                    .map_err(|e| VouchError::Key(e.to_string()))?,
            ),
        };
        let matches = match &key {
            NodeKey::Ecdsa(k) => k.public_key().as_ref() == public.as_slice(),
            NodeKey::Ed25519(k) => k.public_key().as_ref() == public.as_slice(),
        };
        if !matches {
            return Err(VouchError::Key(
                "the key does not match the certificate".into(),
            ));
        }
        Ok(NodeSigner {
            key,
            cert: Bytes::from(cert.as_ref().to_vec()),
            rng,
        })
    }
}

impl Sign for NodeSigner {
    fn prove(&self, e: &Entry) -> Proof {
        let msg = e.signed_bytes();
        let sig = match &self.key {
            // Signing fails only when the system RNG does; an empty proof is then refused by
            // every receiver, which is the safe way to fail.
            NodeKey::Ecdsa(k) => k
                .sign(&self.rng, &msg)
                .map(|s| Bytes::from(s.as_ref().to_vec()))
                .unwrap_or_default(),
            NodeKey::Ed25519(k) => Bytes::from(k.sign(&msg).as_ref().to_vec()),
        };
        Proof {
            sig,
            cert: (e.key.keyspace() == Keyspace::Nodes).then(|| self.cert.clone()),
        }
    }
}

/// An operator's signing key, derived from the admin token (HKDF-SHA256, salted with the
/// cluster id). Made for one request from the token it carried; nodes never store it.
pub struct OperatorKey(signature::Ed25519KeyPair);

impl OperatorKey {
    pub fn from_token(token: &str, cluster_id: &str) -> OperatorKey {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, cluster_id.as_bytes());
        let mut seed = [0u8; 32];
        // Expanding 32 bytes from SHA-256 is within HKDF's limit: these cannot fail.
        let _ = salt
            .extract(token.trim().as_bytes())
            .expand(&[b"shoal operator key v1"], ring::hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut seed));
        let pair = signature::Ed25519KeyPair::from_seed_unchecked(&seed)
            .expect("every 32-byte seed is an Ed25519 key");
        OperatorKey(pair)
    }

    pub fn public(&self) -> OperatorPublic {
        let mut b = [0u8; 32];
        b.copy_from_slice(self.0.public_key().as_ref());
        OperatorPublic(b)
    }
}

impl Sign for OperatorKey {
    fn prove(&self, e: &Entry) -> Proof {
        Proof {
            sig: Bytes::from(self.0.sign(&e.signed_bytes()).as_ref().to_vec()),
            cert: None,
        }
    }
}

/// The public half of an operator key: what nodes keep instead of the admin token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct OperatorPublic(pub [u8; 32]);

impl std::fmt::Debug for OperatorPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OperatorPublic({})", self.hex())
    }
}

impl OperatorPublic {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn parse(s: &str) -> Result<OperatorPublic, VouchError> {
        let s = s.trim();
        let bad = || VouchError::OperatorKey(s.chars().take(80).collect());
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut b = [0u8; 32];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(OperatorPublic(b))
    }

    /// Whether `token` is the admin token this key was derived from (compares public keys,
    /// in constant time).
    pub fn accepts(&self, token: &str, cluster_id: &str) -> Option<OperatorKey> {
        let key = OperatorKey::from_token(token, cluster_id);
        ring_ct_eq(&key.public().0, &self.0).then_some(key)
    }

    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(msg, sig)
            .is_ok()
    }
}

fn ring_ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a member certificate: chains to the cluster CA and names a member.
pub trait CertCheck: Send + Sync {
    fn check(&self, der: &[u8]) -> Result<(), String>;
}

/// Most certificates remembered as checked; past it the memory starts again.
const CERT_CACHE: usize = 4096;

/// Checks peers' entries: node-signed ones against the certificate in the signer's record
/// (itself checked against the CA and the node id), operator-signed ones against the
/// operator keys; nothing signed by an evicted node (`revoked/<id>`).
pub struct Vouchers {
    members: Arc<dyn CertCheck>,
    operators: Vec<OperatorPublic>,
    /// Certificates already checked: DER → (node id, algorithm, public key).
    known: HashMap<Bytes, (String, Alg, Vec<u8>)>,
}

impl Vouchers {
    pub fn new(members: Arc<dyn CertCheck>, operators: Vec<OperatorPublic>) -> Vouchers {
        Vouchers {
            members,
            operators,
            known: HashMap::new(),
        }
    }

    fn node_key(&mut self, cert: &Bytes, node: &NodeId) -> Result<(Alg, Vec<u8>), Unvouched> {
        let forged = |reason: String| Unvouched::Forged {
            signer: node.clone(),
            reason,
        };
        if let Some((cn, alg, key)) = self.known.get(cert) {
            if cn != node.as_str() {
                return Err(forged(format!("its certificate names {cn:?}")));
            }
            return Ok((*alg, key.clone()));
        }
        self.members
            .check(cert)
            .map_err(|e| forged(format!("certificate refused: {e}")))?;
        let cn = cert_info_der(cert)
            .map_err(|e| forged(format!("certificate unreadable: {e}")))?
            .common_name;
        let (alg, key) = public_key(cert).map_err(forged)?;
        if self.known.len() >= CERT_CACHE {
            self.known.clear();
        }
        self.known
            .insert(cert.clone(), (cn.clone(), alg, key.clone()));
        if cn != node.as_str() {
            return Err(forged(format!("its certificate names {cn:?}")));
        }
        Ok((alg, key))
    }
}

/// Whether `node` was evicted: a live `revoked/<node>` record.
pub fn is_revoked(node: &NodeId, lookup: &mut Lookup<'_>) -> bool {
    crate::store::keys::revoked(node)
        .ok()
        .and_then(|k| lookup(&k))
        .is_some_and(|e| !e.is_tombstone())
}

impl Vouch for Vouchers {
    fn check(&mut self, e: &Entry, lookup: &mut Lookup<'_>) -> Result<(), Unvouched> {
        let msg = e.signed_bytes();
        match e.key.writer(&e.version.origin) {
            Writer::Operator => {
                if e.proof.cert.is_none()
                    && self.operators.iter().any(|k| k.verify(&msg, &e.proof.sig))
                {
                    Ok(())
                } else {
                    Err(Unvouched::NotOperator)
                }
            }
            Writer::Node(node) => {
                if is_revoked(&node, lookup) {
                    return Err(Unvouched::Revoked(node));
                }
                let cert = if e.key.keyspace() == Keyspace::Nodes {
                    e.proof.cert.clone().ok_or_else(|| Unvouched::Forged {
                        signer: node.clone(),
                        reason: "a node record without its certificate".into(),
                    })?
                } else {
                    let record = e.signer_record().and_then(|k| lookup(&k));
                    record
                        .and_then(|r| r.proof.cert)
                        .ok_or_else(|| Unvouched::UnknownSigner(node.clone()))?
                };
                let (alg, key) = self.node_key(&cert, &node)?;
                signature::UnparsedPublicKey::new(alg.verifier(), &key)
                    .verify(&msg, &e.proof.sig)
                    .map_err(|_| Unvouched::Forged {
                        signer: node,
                        reason: "the signature does not verify".into(),
                    })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::cert::NodeIdentity;
    use crate::identity::Bundle;
    use crate::store::Key;
    use crate::store::{Hlc, Version};
    use std::collections::BTreeMap;

    fn entry(key: &str, origin: &str, value: &str) -> Entry {
        Entry {
            key: Key::parse(key).unwrap(),
            version: Version {
                hlc: Hlc::from_millis(1_800_000_000_000),
                origin: NodeId::new(origin).unwrap(),
            },
            value: Some(Bytes::from(value.to_string())),
            proof: Proof::default(),
        }
    }

    fn signed(s: &dyn Sign, mut e: Entry) -> Entry {
        e.proof = s.prove(&e);
        e
    }

    struct World {
        bundle: Bundle,
        vouch: Vouchers,
        n1: NodeSigner,
        n2: NodeSigner,
        store: BTreeMap<Key, Entry>,
    }

    fn world() -> World {
        let bundle = Bundle::generate("t", 1).unwrap();
        let id = |n: &str| {
            let i = NodeIdentity::issue(&bundle.cluster, &bundle.ca_cert, &bundle.ca_key, n, &[])
                .unwrap();
            NodeSigner::new(&i.key_pem, &i.cert_pem).unwrap()
        };
        let operator =
            OperatorPublic::parse(bundle.cluster.operator_key.as_deref().unwrap()).unwrap();
        World {
            vouch: Vouchers::new(
                Arc::new(crate::tls::MemberCheck::new(&bundle.ca_cert).unwrap()),
                vec![operator],
            ),
            n1: id("n1"),
            n2: id("n2"),
            store: BTreeMap::new(),
            bundle,
        }
    }

    impl World {
        fn check(&mut self, e: &Entry) -> Result<(), Unvouched> {
            let store = &self.store;
            let mut lookup = |k: &Key| store.get(k).cloned();
            self.vouch.check(e, &mut lookup)
        }

        fn put(&mut self, e: Entry) {
            self.store.insert(e.key.clone(), e);
        }
    }

    #[test]
    fn a_node_vouches_for_its_own_entries_only() {
        let mut w = world();
        let record = signed(&w.n1, entry("nodes/n1", "n1", "{}"));
        assert!(record.proof.cert.is_some());
        w.check(&record).unwrap();
        let task = signed(&w.n1, entry("tasks/n1/a/0", "n1", "{}"));
        // Its record not known yet: pending, not forged.
        assert_eq!(
            w.check(&task),
            Err(Unvouched::UnknownSigner(task.version.origin.clone()))
        );
        w.put(record);
        w.check(&task).unwrap();

        // Altered on the way: the signature no longer matches.
        let mut altered = task.clone();
        altered.value = Some(Bytes::from_static(b"{\"state\":\"evil\"}"));
        assert!(matches!(w.check(&altered), Err(Unvouched::Forged { .. })));
        // n2 signing for n1, with its own certificate or against n1's record.
        let claimed = signed(&w.n2, entry("nodes/n1", "n1", "{}"));
        assert!(
            matches!(w.check(&claimed), Err(Unvouched::Forged { reason, .. }) if reason.contains("names \"n2\""))
        );
        let task2 = signed(&w.n2, entry("tasks/n1/a/0", "n1", "{}"));
        assert!(matches!(w.check(&task2), Err(Unvouched::Forged { .. })));
        // A node's record must carry its certificate.
        let mut bare = signed(&w.n1, entry("nodes/n1", "n1", "{}"));
        bare.proof.cert = None;
        assert!(matches!(w.check(&bare), Err(Unvouched::Forged { .. })));
        // A certificate from another CA is not a member's.
        let other = Bundle::generate("other", 1).unwrap();
        let i =
            NodeIdentity::issue(&other.cluster, &other.ca_cert, &other.ca_key, "n1", &[]).unwrap();
        let stranger = NodeSigner::new(&i.key_pem, &i.cert_pem).unwrap();
        let foreign = signed(&stranger, entry("nodes/n1", "n1", "{}"));
        assert!(
            matches!(w.check(&foreign), Err(Unvouched::Forged { reason, .. }) if reason.contains("certificate refused"))
        );
    }

    #[test]
    fn desired_state_needs_the_operator() {
        let mut w = world();
        let token = w.bundle.admin_token.clone();
        let op = OperatorPublic::parse(w.bundle.cluster.operator_key.as_deref().unwrap())
            .unwrap()
            .accepts(&token, &w.bundle.cluster.id)
            .expect("the bundle's token matches its operator key");
        assert!(
            OperatorPublic::parse(w.bundle.cluster.operator_key.as_deref().unwrap())
                .unwrap()
                .accepts("not-the-token", &w.bundle.cluster.id)
                .is_none()
        );
        let app = signed(&op, entry("apps/web", "n1", "{}"));
        w.check(&app).unwrap();
        let mut gone = signed(&op, entry("apps/web", "n1", ""));
        gone.value = None;
        assert!(
            w.check(&gone).is_err(),
            "a proof for a value is no proof for a deletion"
        );
        gone.proof = op.prove(&gone);
        w.check(&gone).unwrap();
        // A member's own key is no operator's.
        let by_node = signed(&w.n1, entry("apps/web", "n1", "{}"));
        assert_eq!(w.check(&by_node), Err(Unvouched::NotOperator));
        assert_eq!(
            w.check(&entry("secrets/web/X", "n1", "x")),
            Err(Unvouched::NotOperator)
        );
        // The same token in another cluster is another key.
        let elsewhere = OperatorKey::from_token(&token, "another-cluster-id");
        assert_eq!(
            w.check(&signed(&elsewhere, entry("apps/web", "n1", "{}"))),
            Err(Unvouched::NotOperator)
        );
    }

    #[test]
    fn an_evicted_node_vouches_for_nothing() {
        let mut w = world();
        let record = signed(&w.n1, entry("nodes/n1", "n1", "{}"));
        w.put(record.clone());
        let task = signed(&w.n1, entry("tasks/n1/a/0", "n1", "{}"));
        w.check(&task).unwrap();
        let token = w.bundle.admin_token.clone();
        let op = OperatorKey::from_token(&token, &w.bundle.cluster.id);
        let eviction = signed(&op, entry("revoked/n1", "n2", "{}"));
        w.check(&eviction).unwrap();
        w.put(eviction);
        let n1 = NodeId::new("n1").unwrap();
        assert_eq!(w.check(&task), Err(Unvouched::Revoked(n1.clone())));
        assert_eq!(w.check(&record), Err(Unvouched::Revoked(n1)));
    }

    #[test]
    fn operator_keys_parse_strictly() {
        let k = OperatorKey::from_token("t", "c").public();
        assert_eq!(OperatorPublic::parse(&k.hex()).unwrap(), k);
        for bad in ["", "zz", &"g".repeat(64), &"a".repeat(63), &"a".repeat(65)] {
            assert!(OperatorPublic::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ring_ct_eq(b"abc", b"abc"));
        assert!(!ring_ct_eq(b"abc", b"abd"));
        assert!(!ring_ct_eq(b"abc", b"abcd"));
    }
}
