//! Who may write what, and the proof that they did. Every entry carries a `Proof`: a signature
//! over its canonical bytes (`Entry::signed_bytes`) by the writer its key calls for
//! (`Key::writer`): the node an owner-only key describes, the node that made a build record, or
//! an operator for desired state. A receiver checks the proof on every hop (`Vouch`), so a
//! member can relay another node's entries but never alter or invent them.
//!
//! The store knows only the traits: the agent signs with ECDSA node keys and an Ed25519
//! operator key (`identity::vouch`), the simulation with cheap keyed hashes, and store-logic
//! tests with `Unsigned` and `TrustAll`.

use super::entry::{Entry, Key, Keyspace, NodeId};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A signature and, on a node's own record (`nodes/<id>`), the certificate whose key made it:
/// that record is how every other node learns the key.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    pub sig: Bytes,
    pub cert: Option<Bytes>,
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Proof({} sig bytes{})",
            self.sig.len(),
            if self.cert.is_some() { ", cert" } else { "" }
        )
    }
}

/// Whose signature an entry needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writer {
    /// The node the key describes (`nodes/`, `tasks/`, `metrics/`), or that made it (`builds/`,
    /// `rollouts/`, `scale/`, `acme/`).
    Node(NodeId),
    /// An operator: desired state (`apps/`, `history/`, `secrets/`, `certs/`), evictions (`revoked/`)
    /// and cluster settings (`cluster/`).
    Operator,
}

impl Key {
    /// The writer whose proof an entry at this key must carry, given the entry's origin.
    pub fn writer(&self, origin: &NodeId) -> Writer {
        match self.keyspace() {
            Keyspace::Apps
            | Keyspace::Secrets
            | Keyspace::Revoked
            | Keyspace::Cluster
            | Keyspace::History
            | Keyspace::Certs => Writer::Operator,
            Keyspace::Builds | Keyspace::Rollouts | Keyspace::Scale | Keyspace::Acme => {
                Writer::Node(origin.clone())
            }
            // Owner-only keys: `check_write` already holds the origin to the owner.
            Keyspace::Nodes | Keyspace::Tasks | Keyspace::Metrics | Keyspace::Images => {
                Writer::Node(origin.clone())
            }
        }
    }
}

/// Why an entry was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unvouched {
    /// The signer's key is not known here yet (its `nodes/` record has not arrived): the entry
    /// is skipped and asked for again later, not held against the sender.
    #[error("signer {0} is not known here yet")]
    UnknownSigner(NodeId),
    #[error("signer {0} was evicted")]
    Revoked(NodeId),
    #[error("no valid operator signature")]
    NotOperator,
    #[error("bad proof for {signer}: {reason}")]
    Forged { signer: NodeId, reason: String },
}

impl Unvouched {
    /// Whether the entry may become acceptable later (the sender is not at fault).
    pub fn is_pending(&self) -> bool {
        matches!(self, Unvouched::UnknownSigner(_))
    }
}

/// What the store lets a checker read: the current entry at a key (a `nodes/` record for a
/// signer's certificate, a `revoked/` record), including ones staged earlier in the same batch.
pub type Lookup<'a> = dyn FnMut(&Key) -> Option<Entry> + 'a;

/// Checks proofs of entries arriving from peers.
pub trait Vouch: Send {
    fn check(&mut self, e: &Entry, lookup: &mut Lookup<'_>) -> Result<(), Unvouched>;
}

/// Makes proofs for entries this node writes.
pub trait Sign: Send + Sync {
    fn prove(&self, e: &Entry) -> Proof;
}

/// Signs nothing: for store-logic tests and benchmarks of the merge alone.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unsigned;

impl Sign for Unsigned {
    fn prove(&self, _: &Entry) -> Proof {
        Proof::default()
    }
}

/// Accepts every entry: for store-logic tests and benchmarks of the merge alone.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrustAll;

impl Vouch for TrustAll {
    fn check(&mut self, _: &Entry, _: &mut Lookup<'_>) -> Result<(), Unvouched> {
        Ok(())
    }
}

impl Entry {
    /// The bytes a proof signs: a domain tag, the key, the version and the value (or that it
    /// is a tombstone), each length-prefixed so no two entries share them.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let key = self.key.as_str().as_bytes();
        let origin = self.version.origin.as_str().as_bytes();
        let value = self.value.as_deref().unwrap_or_default();
        let mut b = Vec::with_capacity(32 + key.len() + origin.len() + value.len());
        b.extend_from_slice(b"shoal entry v1\0");
        for part in [key, origin] {
            b.extend_from_slice(&(part.len() as u32).to_be_bytes());
            b.extend_from_slice(part);
        }
        b.extend_from_slice(&self.version.hlc.0.to_be_bytes());
        match &self.value {
            Some(_) => {
                b.push(1);
                b.extend_from_slice(&(value.len() as u32).to_be_bytes());
                b.extend_from_slice(value);
            }
            None => b.push(0),
        }
        b
    }

    /// For an entry a node signs, the key of that node's record (where its certificate is).
    pub fn signer_record(&self) -> Option<Key> {
        match self.key.writer(&self.version.origin) {
            Writer::Node(n) => super::keys::node(&n).ok(),
            Writer::Operator => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Hlc, Version};

    fn entry(key: &str, origin: &str, hlc: u64, value: Option<&'static [u8]>) -> Entry {
        Entry {
            key: Key::parse(key).unwrap(),
            version: Version {
                hlc: Hlc(hlc),
                origin: NodeId::new(origin).unwrap(),
            },
            value: value.map(Bytes::from_static),
            proof: Proof::default(),
        }
    }

    #[test]
    fn signed_bytes_differ_in_every_field() {
        let base = entry("apps/a", "n1", 5, Some(b"x"));
        let variants = [
            entry("apps/b", "n1", 5, Some(b"x")),
            entry("apps/a", "n2", 5, Some(b"x")),
            entry("apps/a", "n1", 6, Some(b"x")),
            entry("apps/a", "n1", 5, Some(b"y")),
            entry("apps/a", "n1", 5, None),
            entry("apps/a", "n1", 5, Some(b"")),
        ];
        let mut seen = vec![base.signed_bytes()];
        for v in variants {
            let b = v.signed_bytes();
            assert!(
                !seen.contains(&b),
                "{v:?} signs the same bytes as another entry"
            );
            seen.push(b);
        }
    }

    #[test]
    fn writers_follow_the_keyspace() {
        let n1 = NodeId::new("n1").unwrap();
        let w = |k: &str| Key::parse(k).unwrap().writer(&n1);
        assert_eq!(w("apps/a"), Writer::Operator);
        assert_eq!(w("secrets/a/X"), Writer::Operator);
        assert_eq!(w("revoked/n2"), Writer::Operator);
        assert_eq!(w("builds/a/1"), Writer::Node(n1.clone()));
        assert_eq!(w("scale/a"), Writer::Node(n1.clone()));
        assert_eq!(w("tasks/n1/a/0"), Writer::Node(n1.clone()));
        assert_eq!(
            entry("metrics/n1/x", "n1", 1, None).signer_record(),
            Some(Key::parse("nodes/n1").unwrap())
        );
        assert_eq!(entry("apps/a", "n1", 1, None).signer_record(), None);
    }
}
