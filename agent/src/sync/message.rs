//! The peer protocol's messages and their wire form: a 4-byte magic, a version byte, then the
//! postcard encoding of an `Envelope`. Decoding checks size, magic, version and every key and
//! value before anything reaches the store.

use crate::membership::Member;
use crate::store::{Digest, Entry, Hlc, Key, NodeId};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const MAGIC: [u8; 4] = *b"SHOL";
pub const WIRE_VERSION: u8 = 1;
/// Largest encoded message accepted or produced.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// Most entries one message may carry.
pub const MAX_ENTRIES: usize = 4096;

/// A fresh write travelling by rumor: the entry and its origin's previous watermark, so a
/// receiver already holding everything up to `prev` can advance without anti-entropy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rumor {
    pub entry: Entry,
    pub prev: Hlc,
}

/// A run of entries with, per origin, the HLC up to which the sender included everything it has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub entries: Vec<Entry>,
    pub through: BTreeMap<NodeId, Hlc>,
    pub complete: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// A SWIM packet, opaque here, for the membership layer.
    Swim(Bytes),
    /// Fresh writes, pushed at once to a few peers and passed on by them.
    Push(Vec<Rumor>),
    /// Anti-entropy, first leg: what the sender holds.
    SyncRequest(Digest),
    /// Second leg: what the requester lacks, and what the replier holds.
    SyncReply { digest: Digest, range: Range },
    /// Third leg: what the replier lacks.
    SyncPush(Range),
    /// A replica below a peer's collection horizon asks for the whole state, page by page.
    ReconcileRequest { after: Option<Key> },
    ReconcileReply {
        digest: Digest,
        after: Option<Key>,
        entries: Vec<Entry>,
        next: Option<Key>,
    },
}

impl Message {
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Swim(_) => "swim",
            Message::Push(_) => "push",
            Message::SyncRequest(_) => "sync_request",
            Message::SyncReply { .. } => "sync_reply",
            Message::SyncPush(_) => "sync_push",
            Message::ReconcileRequest { .. } => "reconcile_request",
            Message::ReconcileReply { .. } => "reconcile_reply",
        }
    }

    fn entry_count(&self) -> usize {
        match self {
            Message::Push(r) => r.len(),
            Message::SyncReply { range, .. } | Message::SyncPush(range) => range.entries.len(),
            Message::ReconcileReply { entries, .. } => entries.len(),
            _ => 0,
        }
    }
}

/// A message with its sender, as it crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub from: Member,
    pub msg: Message,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message is {0} bytes, more than the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("message is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("not a shoal peer message (bad magic)")]
    BadMagic,
    #[error("peer protocol version {0} is not supported (this node speaks {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message carries {0} entries, more than the {MAX_ENTRIES} limit")]
    TooManyEntries(usize),
    #[error("message has {0} trailing bytes")]
    Trailing(usize),
}

pub fn encode(env: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.push(WIRE_VERSION);
    // Serializing owned, plain data into a Vec does not fail.
    postcard::to_io(env, &mut out).map(|_| ()).unwrap_or(());
    out
}

pub fn decode(buf: &[u8]) -> Result<Envelope, DecodeError> {
    if buf.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge(buf.len()));
    }
    if buf.len() < MAGIC.len() + 1 {
        return Err(DecodeError::Truncated(buf.len()));
    }
    if buf[..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if buf[4] != WIRE_VERSION {
        return Err(DecodeError::UnsupportedVersion(buf[4]));
    }
    let (env, rest): (Envelope, &[u8]) = postcard::take_from_bytes(&buf[5..]).map_err(|e| {
        if matches!(e, postcard::Error::DeserializeUnexpectedEnd) {
            DecodeError::Truncated(buf.len())
        } else {
            DecodeError::Malformed(e.to_string())
        }
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    let n = env.msg.entry_count();
    if n > MAX_ENTRIES {
        return Err(DecodeError::TooManyEntries(n));
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Version;

    fn member(id: &str) -> Member {
        Member::new(NodeId::new(id).unwrap(), "127.0.0.1:7443".into(), 1)
    }

    fn sample() -> Envelope {
        let entry = Entry {
            key: Key::parse("apps/hello").unwrap(),
            version: Version {
                hlc: Hlc(42),
                origin: NodeId::new("n1").unwrap(),
            },
            value: Some(Bytes::from_static(b"{\"replicas\":2}")),
            proof: Default::default(),
        };
        Envelope {
            from: member("n1"),
            msg: Message::Push(vec![Rumor {
                entry,
                prev: Hlc(7),
            }]),
        }
    }

    #[test]
    fn round_trips() {
        let env = sample();
        assert_eq!(decode(&encode(&env)).unwrap(), env);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&sample());
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "prefix of {n} bytes decoded");
        }
    }

    #[test]
    fn wrong_magic_version_and_trailing_bytes_are_refused() {
        let mut bytes = encode(&sample());
        bytes[4] = 9;
        assert_eq!(decode(&bytes), Err(DecodeError::UnsupportedVersion(9)));
        let mut bytes = encode(&sample());
        bytes[0] = b'X';
        assert_eq!(decode(&bytes), Err(DecodeError::BadMagic));
        let mut bytes = encode(&sample());
        bytes.push(0);
        assert_eq!(decode(&bytes), Err(DecodeError::Trailing(1)));
        assert_eq!(
            decode(&vec![0u8; MAX_MESSAGE_BYTES + 1]),
            Err(DecodeError::TooLarge(MAX_MESSAGE_BYTES + 1))
        );
    }

    #[test]
    fn invalid_keys_inside_a_message_are_refused() {
        let bytes = encode(&sample());
        let good = b"apps/hello";
        let pos = bytes.windows(good.len()).position(|w| w == good).unwrap();
        let mut bad = bytes.clone();
        bad[pos..pos + 4].copy_from_slice(b"nope");
        assert!(matches!(decode(&bad), Err(DecodeError::Malformed(_))));
    }
}
