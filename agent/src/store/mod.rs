//! The replicated state store: typed keys and versioned entries (`entry`), hybrid logical
//! clocks (`hlc`), the storage engine behind a narrow trait (`backend`) and the merge logic
//! (`replica`), and the one place keys are built (`keys`). No other module touches the
//! storage engine.

pub mod backend;
pub mod entry;
pub mod hlc;
pub mod keys;
pub mod replica;
pub mod vouch;

pub use backend::{Backend, DiskBackend, MemBackend};
pub use bytes::Bytes;
pub use entry::{Entry, Key, Keyspace, NodeId, Version};
pub use hlc::{Hlc, HlcClock};
pub use replica::{Applied, Change, Delta, Digest, Replica, Written};
pub use vouch::{Proof, Sign, Unvouched, Vouch, Writer};

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid node id {0:?}: use 1-64 characters of A-Z, a-z, 0-9, '.', '_', '-'")]
    InvalidNodeId(String),
    #[error(
        "invalid key {0:?}: keys are <keyspace>/<name> with a known keyspace and printable ASCII"
    )]
    InvalidKey(String),
    #[error("value of {key} is {len} bytes, more than the 1 MiB limit")]
    ValueTooLarge { key: String, len: usize },
    #[error("{key} describes another node and cannot be written by {origin}")]
    NotOwner { key: String, origin: String },
    #[error("{key}: {reason}")]
    Unvouched { key: String, reason: &'static str },
    #[error("entry from {origin} is {ahead_ms} ms ahead of this node's clock")]
    ClockDrift { origin: String, ahead_ms: u64 },
    #[error("a peer's {what} for {origin} is {ahead_ms} ms past what this node's clock allows")]
    ClockBound {
        origin: String,
        what: &'static str,
        ahead_ms: u64,
    },
    #[error("changes since {since} were compacted (oldest kept: {compacted}); list again")]
    Compacted { since: u64, compacted: u64 },
    #[error("store data is corrupt: bad {0}")]
    Corrupt(String),
    #[error("storage engine failed to {op}")]
    Engine {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

#[cfg(test)]
mod tests;
