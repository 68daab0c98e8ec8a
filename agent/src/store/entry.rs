//! The replicated value and its names: node ids, keys in typed keyspaces, versions and entries.

use super::hlc::Hlc;
use super::StoreError;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

/// Longest node id, in bytes.
pub const MAX_NODE_ID_LEN: usize = 64;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Largest value, in bytes.
pub const MAX_VALUE_LEN: usize = 1 << 20;

/// A node's stable identifier: 1–64 characters of `[A-Za-z0-9._-]`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub fn new(id: &str) -> Result<NodeId, StoreError> {
        let ok = !id.is_empty()
            && id.len() <= MAX_NODE_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(NodeId(id.into()))
        } else {
            Err(StoreError::InvalidNodeId(id.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        NodeId::new(&s)
    }
}

impl From<NodeId> for String {
    fn from(n: NodeId) -> String {
        n.0.to_string()
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The top-level partitions of the store. Observed-state keyspaces are owner-only: a key
/// `nodes/<id>`, `tasks/<id>/...`, `metrics/<id>/...` or `images/<id>` may only be written by
/// node `<id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keyspace {
    Nodes,
    Apps,
    Tasks,
    Builds,
    Secrets,
    Metrics,
    /// Evicted nodes (`revoked/<id>`): written by operators, refused as peers and signers.
    Revoked,
    /// Cluster-wide settings written by operators (`cluster/join`: the join secret in force).
    Cluster,
    /// An app's earlier specs (`history/<app>`), written by operators with each new spec.
    History,
    /// How the latest rollout of each of an app's revisions ended (`rollouts/<app>/<rev>`):
    /// complete, or failed and why.
    /// Written by the member that watched it (the app's rendezvous owner), as builds are.
    Rollouts,
    /// The images a node holds (`images/<id>`), content addressed: where peers fetch an
    /// image from without a registry.
    Images,
    /// TLS certificates operators uploaded for the ingress (`certs/<host>`), the key sealed.
    Certs,
    /// The replica count the autoscaler chose for an app (`scale/<app>`), written by the
    /// app's rendezvous owner, or by a node whose ingress woke an app scaled to zero; held
    /// within the spec's `min` and `max` wherever it is read.
    Scale,
    /// What the ingress's ACME client keeps (`acme/account/<dir>`, `acme/certs/<host>`,
    /// `acme/challenges/<token>`, `acme/failures/<host>`): written by the member that
    /// ordered, the keys sealed; a certificate is served only for a host an app asks it for.
    Acme,
}

impl Keyspace {
    pub const ALL: [Keyspace; 14] = [
        Keyspace::Nodes,
        Keyspace::Apps,
        Keyspace::Tasks,
        Keyspace::Builds,
        Keyspace::Secrets,
        Keyspace::Metrics,
        Keyspace::Revoked,
        Keyspace::Cluster,
        Keyspace::History,
        Keyspace::Rollouts,
        Keyspace::Images,
        Keyspace::Certs,
        Keyspace::Scale,
        Keyspace::Acme,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Keyspace::Nodes => "nodes",
            Keyspace::Apps => "apps",
            Keyspace::Tasks => "tasks",
            Keyspace::Builds => "builds",
            Keyspace::Secrets => "secrets",
            Keyspace::Metrics => "metrics",
            Keyspace::Revoked => "revoked",
            Keyspace::Cluster => "cluster",
            Keyspace::History => "history",
            Keyspace::Rollouts => "rollouts",
            Keyspace::Images => "images",
            Keyspace::Certs => "certs",
            Keyspace::Scale => "scale",
            Keyspace::Acme => "acme",
        }
    }

    pub fn parse(s: &str) -> Option<Keyspace> {
        Keyspace::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Whether keys here describe one node and may be written only by it.
    pub fn owner_only(self) -> bool {
        matches!(
            self,
            Keyspace::Nodes | Keyspace::Tasks | Keyspace::Metrics | Keyspace::Images
        )
    }

    /// What a node observes of its own workload (tasks, metrics, images): owner-only records
    /// held as leases, collected once their owner has departed
    /// (`Replica::expire_departed`). Not `nodes/<id>`: it carries the certificate that
    /// vouches for everything the node ever signed, and stays until the node is evicted.
    pub fn leased(self) -> bool {
        matches!(self, Keyspace::Tasks | Keyspace::Metrics | Keyspace::Images)
    }
}

/// A validated key: `<keyspace>/<rest>`, printable ASCII, no empty segments, at most 512 bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Key(Arc<str>);

impl Key {
    pub fn parse(s: &str) -> Result<Key, StoreError> {
        let invalid = || StoreError::InvalidKey(s.chars().take(80).collect());
        if s.is_empty() || s.len() > MAX_KEY_LEN {
            return Err(invalid());
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid());
        }
        let mut parts = s.split('/');
        let space = parts.next().and_then(Keyspace::parse).ok_or_else(invalid)?;
        let rest: Vec<&str> = parts.collect();
        if rest.is_empty() || rest.iter().any(|p| p.is_empty()) {
            return Err(invalid());
        }
        if space.owner_only() || space == Keyspace::Revoked {
            NodeId::new(rest[0]).map_err(|_| invalid())?;
        }
        Ok(Key(s.into()))
    }

    /// Builds `<keyspace>/<a>/<b>...` from validated parts.
    pub fn join(space: Keyspace, parts: &[&str]) -> Result<Key, StoreError> {
        let mut s = String::from(space.name());
        for p in parts {
            s.push('/');
            s.push_str(p);
        }
        Key::parse(&s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn keyspace(&self) -> Keyspace {
        let head = self.0.split('/').next().unwrap_or_default();
        // Parsing guarantees a known keyspace.
        Keyspace::parse(head).unwrap_or(Keyspace::Apps)
    }

    /// The part after `<keyspace>/`.
    pub fn name(&self) -> &str {
        self.0.split_once('/').map(|(_, r)| r).unwrap_or_default()
    }

    /// For owner-only keyspaces, the node the key describes.
    pub fn owner(&self) -> Option<&str> {
        if self.keyspace().owner_only() {
            self.name().split('/').next()
        } else {
            None
        }
    }
}

impl TryFrom<String> for Key {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Key::parse(&s)
    }
}

impl From<Key> for String {
    fn from(k: Key) -> String {
        k.0.to_string()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The version of a value: when (HLC) and where (origin node) it was written.
/// Ordered by HLC, then by origin, so every pair of versions has a single winner.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Version {
    pub hlc: Hlc,
    pub origin: NodeId,
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.hlc
            .cmp(&other.hlc)
            .then_with(|| self.origin.cmp(&other.origin))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.hlc, self.origin)
    }
}

/// Whether `origin` may write `value` at `key`: the value fits, and an owner-only key is
/// written only by the node it describes.
pub fn check_write(key: &Key, value: Option<&Bytes>, origin: &NodeId) -> Result<(), StoreError> {
    if let Some(v) = value {
        if v.len() > MAX_VALUE_LEN {
            return Err(StoreError::ValueTooLarge {
                key: key.to_string(),
                len: v.len(),
            });
        }
    }
    if let Some(owner) = key.owner() {
        if owner != origin.as_str() {
            return Err(StoreError::NotOwner {
                key: key.to_string(),
                origin: origin.to_string(),
            });
        }
    }
    Ok(())
}

/// One replicated fact: a key's value at a version, or its deletion (a tombstone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: Key,
    pub version: Version,
    /// `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Who vouches for it (`vouch`): checked on every hop, never part of the merge order.
    pub proof: super::vouch::Proof,
}

impl Entry {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Checks what the type system cannot: value size and the owner-only rule.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_write(&self.key, self.value.as_ref(), &self.version.origin)
    }

    /// Last writer wins: whether `self` replaces `current`. Honest nodes never issue one
    /// version twice, but ties are still broken (a tombstone loses to any value, values by
    /// bytes) so that the merge stays a total order whatever arrives.
    pub fn supersedes(&self, current: &Entry) -> bool {
        (&self.version, &self.value) > (&current.version, &current.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        for ok in [
            "apps/hello",
            "nodes/n1",
            "tasks/n1/hello/0",
            "secrets/hello/API_KEY",
        ] {
            Key::parse(ok).unwrap();
        }
        for bad in [
            "",
            "apps",
            "apps/",
            "apps//x",
            "unknown/x",
            "apps/he llo",
            "apps/\u{e9}",
            "nodes/bad id",
        ] {
            assert!(Key::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Key::parse(&format!("apps/{}", "x".repeat(600))).is_err());
    }

    #[test]
    fn owner_only_rule() {
        let n1 = NodeId::new("n1").unwrap();
        let n2 = NodeId::new("n2").unwrap();
        let e = |key: &str, origin: &NodeId| Entry {
            key: Key::parse(key).unwrap(),
            version: Version {
                hlc: Hlc(1),
                origin: origin.clone(),
            },
            value: Some(Bytes::from_static(b"{}")),
            proof: Default::default(),
        };
        e("nodes/n1", &n1).validate().unwrap();
        e("tasks/n1/a/0", &n1).validate().unwrap();
        assert!(e("nodes/n1", &n2).validate().is_err());
        assert!(e("metrics/n1/rps", &n2).validate().is_err());
        e("apps/a", &n2).validate().unwrap();
    }

    #[test]
    fn versions_order_by_hlc_then_origin() {
        let v = |h, o: &str| Version {
            hlc: Hlc(h),
            origin: NodeId::new(o).unwrap(),
        };
        assert!(v(2, "a") > v(1, "z"));
        assert!(v(1, "b") > v(1, "a"));
    }

    #[test]
    fn node_ids_are_validated() {
        NodeId::new("node-1.a_b").unwrap();
        for bad in ["", "a b", "a/b", "a\0b", &"x".repeat(65)] {
            assert!(NodeId::new(bad).is_err());
        }
    }
}
