//! One node's copy of the replicated state, over any `Backend`. Owns the merge rule, the
//! per-origin watermarks that anti-entropy compares, the change log that watchers follow and
//! tombstone collection. It does no IO of its own and reads no clock: time is passed in.
//!
//! Invariant (per origin O): a replica whose watermark for O is `w` holds every entry written
//! by O with an HLC `<= w`, or an entry of the same key with a higher version. Watermarks only
//! move on a node's own writes, on a complete range received from a peer (`through`), or when
//! a pushed entry directly follows the watermark (`prev == w`).
//!
//! Peers are not trusted with clocks or with deletions: every watermark, `through` and
//! collection horizon a peer shows is bounded by this node's clock (`Digest::check`), a peer
//! never moves this node's own watermark, and a reconcile only names keys it believes were
//! deleted (`reconcile_page` returns candidates): the sync engine decides whether to drop
//! them (`drop_confirmed`), after a second peer agrees. Keys go otherwise only by tombstones.

use super::backend::{Backend, Batch};
use super::entry::{Entry, Key, Keyspace, NodeId, Version};
use super::hlc::{Hlc, HlcClock};
use super::vouch::{Proof, Sign, TrustAll, Unsigned, Unvouched, Vouch};
use super::StoreError;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const P_KEY: u8 = b'k';
const P_ORIGIN: u8 = b'o';
const P_TOMB: u8 = b't';
const P_CHANGE: u8 = b'c';
const P_WATERMARK: u8 = b'w';
const P_COLLECTED: u8 = b'g';
const META_SEQ: &[u8] = b"m/seq";
const META_COMPACTED: &[u8] = b"m/compacted";

/// What a replica knows, per origin: `watermarks` (holds everything up to) and `collected`
/// (tombstones up to here were collected, so a replica below it must reconcile).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub watermarks: BTreeMap<NodeId, Hlc>,
    pub collected: BTreeMap<NodeId, Hlc>,
}

impl Digest {
    pub fn watermark(&self, origin: &NodeId) -> Hlc {
        self.watermarks.get(origin).copied().unwrap_or(Hlc::ZERO)
    }

    /// The highest collection horizon of any origin.
    pub fn max_collected(&self) -> Hlc {
        self.collected.values().copied().max().unwrap_or(Hlc::ZERO)
    }

    /// Whether a digest received from a peer is plausible against this node's clock: no
    /// watermark past `now + MAX_DRIFT_MS`, and no collection horizon younger than the
    /// tombstone minimum age allows (with the same drift): honest nodes collect only
    /// tombstones at least that old.
    pub fn check(&self, now_ms: u64, tombstone_min_age_ms: u64) -> Result<(), StoreError> {
        check_bound(&self.watermarks, "watermark", now_ms)?;
        let horizon_now = now_ms.saturating_sub(tombstone_min_age_ms);
        check_bound(&self.collected, "collection horizon", horizon_now)
    }

    /// Whether a replica with this digest may miss tombstones `other` has already collected,
    /// and so must reconcile against `other` before trusting or serving ordinary ranges.
    pub fn behind_horizon_of(&self, other: &Digest) -> bool {
        other.collected.iter().any(|(o, g)| self.watermark(o) < *g)
    }
}

/// Every reading in `map` at most `MAX_DRIFT_MS` past `now_ms`.
pub fn check_bound(
    map: &BTreeMap<NodeId, Hlc>,
    what: &'static str,
    now_ms: u64,
) -> Result<(), StoreError> {
    for (o, h) in map {
        let ahead = h.millis().saturating_sub(now_ms);
        if ahead > MAX_DRIFT_MS {
            return Err(StoreError::ClockBound {
                origin: o.to_string(),
                what,
                ahead_ms: ahead,
            });
        }
    }
    Ok(())
}

/// One applied change, numbered in this replica's local order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub seq: u64,
    pub entry: Entry,
}

/// Entries another replica lacks, and per origin how far they cover it.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    pub entries: Vec<Entry>,
    pub through: BTreeMap<NodeId, Hlc>,
    pub complete: bool,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    hlc: Hlc,
    origin: NodeId,
    value: Option<Vec<u8>>,
    seq: u64,
    proof: Proof,
}

/// The record as stored before entries carried proofs: read, never written.
#[derive(Deserialize)]
struct StoredV0 {
    hlc: Hlc,
    origin: NodeId,
    value: Option<Vec<u8>>,
    seq: u64,
}

fn k_key(key: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(key.len() + 1);
    v.push(P_KEY);
    v.extend_from_slice(key.as_bytes());
    v
}

fn origin_key(prefix: u8, origin: &NodeId, hlc: Hlc) -> Vec<u8> {
    let mut v = origin_prefix(prefix, origin);
    v.extend_from_slice(&hlc.to_be_bytes());
    v
}

fn origin_prefix(prefix: u8, origin: &NodeId) -> Vec<u8> {
    let mut v = Vec::with_capacity(origin.as_str().len() + 10);
    v.push(prefix);
    v.extend_from_slice(origin.as_str().as_bytes());
    v.push(0);
    v
}

fn named_key(prefix: u8, origin: &NodeId) -> Vec<u8> {
    let mut v = vec![prefix];
    v.extend_from_slice(origin.as_str().as_bytes());
    v
}

fn c_key(seq: u64) -> Vec<u8> {
    let mut v = vec![P_CHANGE];
    v.extend_from_slice(&seq.to_be_bytes());
    v
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn decode_u64(b: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = b.try_into().map_err(|_| corrupt("integer"))?;
    Ok(u64::from_be_bytes(arr))
}

fn decode_stored(key: &[u8], raw: &[u8]) -> Result<(Entry, u64), StoreError> {
    let key = std::str::from_utf8(key).map_err(|_| corrupt("key"))?;
    let s: Stored = match postcard::from_bytes(raw) {
        Ok(s) => s,
        Err(_) => {
            // Kept for stores written before proofs; such entries carry none, so peers that
            // check proofs refuse them until their writer writes them again.
            let v0: StoredV0 = postcard::from_bytes(raw).map_err(|_| corrupt("entry"))?;
            Stored {
                hlc: v0.hlc,
                origin: v0.origin,
                value: v0.value,
                seq: v0.seq,
                proof: Proof::default(),
            }
        }
    };
    let entry = Entry {
        key: Key::parse(key)?,
        version: Version {
            hlc: s.hlc,
            origin: s.origin,
        },
        value: s.value.map(Bytes::from),
        proof: s.proof,
    };
    Ok((entry, s.seq))
}

/// Reads an entry by key from any backend; shared by the replica and read-only views.
pub fn read_entry<B: Backend>(b: &B, key: &str) -> Result<Option<(Entry, u64)>, StoreError> {
    match b.get(&k_key(key))? {
        Some(raw) => decode_stored(key.as_bytes(), &raw).map(Some),
        None => Ok(None),
    }
}

/// Live (non-tombstone) entries of a keyspace whose name starts with `prefix`, in key order.
pub fn scan_keyspace<B: Backend>(
    b: &B,
    space: Keyspace,
    prefix: &str,
    limit: usize,
) -> Result<Vec<Entry>, StoreError> {
    let start = k_key(&format!("{}/{}", space.name(), prefix));
    let mut end = start.clone();
    end.push(0xff);
    let mut out = Vec::new();
    let mut cursor = start;
    let mut after = false;
    while out.len() < limit {
        let page = b.scan(&cursor, after, &end, 256)?;
        if page.is_empty() {
            break;
        }
        for (k, v) in &page {
            let (e, _) = decode_stored(&k[1..], v)?;
            if !e.is_tombstone() && out.len() < limit {
                out.push(e);
            }
        }
        cursor = page.last().map(|(k, _)| k.clone()).unwrap_or_default();
        after = true;
    }
    Ok(out)
}

/// Changes with a sequence number above `since`, oldest first. Each key appears at most once,
/// at its latest change. Errors with `Compacted` when collected tombstones fall in the range.
pub fn changes_since<B: Backend>(
    b: &B,
    since: u64,
    limit: usize,
) -> Result<Vec<Change>, StoreError> {
    let compacted = b
        .get(META_COMPACTED)?
        .map(|v| decode_u64(&v))
        .transpose()?
        .unwrap_or(0);
    if since < compacted {
        return Err(StoreError::Compacted { since, compacted });
    }
    let rows = b.scan(&c_key(since), true, &[P_CHANGE + 1], limit)?;
    let mut out = Vec::with_capacity(rows.len());
    for (k, key) in rows {
        let seq = decode_u64(&k[1..])?;
        let key = std::str::from_utf8(&key).map_err(|_| corrupt("change key"))?;
        if let Some((entry, s)) = read_entry(b, key)? {
            if s == seq {
                out.push(Change { seq, entry });
            }
        }
    }
    Ok(out)
}

/// A node's replica of the store.
pub struct Replica<B: Backend> {
    node: NodeId,
    backend: B,
    clock: HlcClock,
    digest: Digest,
    seq: u64,
    /// Proves this node's own writes.
    signer: Arc<dyn Sign>,
    /// Checks the proofs of entries from peers.
    vouch: Box<dyn Vouch>,
    /// Origins with entries a reconcile under way left out (signer unknown then).
    reconcile_held: BTreeSet<NodeId>,
    /// Live keys per keyspace (in `Keyspace::ALL` order), kept as entries change: status
    /// reads them instead of scanning the store.
    live: [u64; Keyspace::ALL.len()],
    /// Owner-only records are leases of this long (`with_lease`); `None`: kept forever.
    lease_ms: Option<u64>,
}

/// Live keys per keyspace (in `Keyspace::ALL` order) and tombstones, by a full scan.
fn count_all<B: Backend>(b: &B) -> Result<([u64; Keyspace::ALL.len()], u64), StoreError> {
    let mut live = [0u64; Keyspace::ALL.len()];
    let mut tombs = 0;
    let mut cursor = vec![P_KEY];
    let mut after = false;
    loop {
        let page = b.scan(&cursor, after, &[P_KEY + 1], 4096)?;
        let Some((last, _)) = page.last() else {
            break;
        };
        cursor = last.clone();
        after = true;
        for (k, v) in &page {
            let (e, _) = decode_stored(&k[1..], v)?;
            if e.is_tombstone() {
                tombs += 1;
            } else {
                live[space_index(e.key.keyspace())] += 1;
            }
        }
    }
    Ok((live, tombs))
}

fn space_index(k: Keyspace) -> usize {
    Keyspace::ALL.iter().position(|s| *s == k).unwrap_or(0)
}

/// What merging a peer's entries did: the changes, and the entries left out for want of a
/// valid proof.
#[derive(Debug, Default)]
pub struct Applied {
    pub changes: Vec<Change>,
    pub unvouched: Vec<(Key, Version, Unvouched)>,
    /// Departed nodes' records left out (`Replica::with_lease`).
    pub expired: usize,
}

impl Applied {
    /// Origins with entries that may be acceptable later: their watermarks must not pass them.
    pub fn pending_origins(&self) -> BTreeSet<NodeId> {
        self.unvouched
            .iter()
            .filter(|(_, _, why)| why.is_pending())
            .map(|(_, v, _)| v.origin.clone())
            .collect()
    }
}

/// Entries whose wall time is further ahead of ours than this are refused: a node with a
/// broken clock must not drag every version into the future.
pub const MAX_DRIFT_MS: u64 = 15 * 60 * 1000;

/// 2200-01-01 in ms since the epoch: no honest clock reads past it.
const IMPLAUSIBLE_MS: u64 = 7_258_118_400_000;

/// A key a reconcile named as deleted elsewhere, at the version it held here.
pub type Named = (Key, Version);

/// A local write as applied: the change and the previous watermark of this node, which a
/// receiver uses to extend its own watermark without waiting for anti-entropy.
#[derive(Debug, Clone)]
pub struct Written {
    pub change: Change,
    pub prev: Hlc,
}

impl<B: Backend> Replica<B> {
    /// Opens the replica stored in `backend`, restoring watermarks, sequence and clock.
    pub fn open(node: NodeId, backend: B) -> Result<Replica<B>, StoreError> {
        let mut digest = Digest::default();
        for (prefix, map) in [
            (P_WATERMARK, &mut digest.watermarks),
            (P_COLLECTED, &mut digest.collected),
        ] {
            for (k, v) in backend.scan(&[prefix], false, &[prefix + 1], usize::MAX)? {
                let origin = std::str::from_utf8(&k[1..]).map_err(|_| corrupt("origin"))?;
                map.insert(NodeId::new(origin)?, Hlc(decode_u64(&v)?));
            }
        }
        let seq = backend
            .get(META_SEQ)?
            .map(|v| decode_u64(&v))
            .transpose()?
            .unwrap_or(0);
        // A store written before peers' clocks were bounded may hold readings at the top of
        // the clock; they would pin ours there (every later version equal): skip them.
        let last = digest
            .watermarks
            .values()
            .chain(digest.collected.values())
            .copied()
            .filter(|h| h.millis() <= IMPLAUSIBLE_MS)
            .max()
            .unwrap_or(Hlc::ZERO);
        // Our own versions must never repeat: the clock restarts past everything stored.
        // Our own writes move our watermark in the same atomic batch, so `last` is past every
        // version we ever issued: the clock restarts beyond it and never repeats one.
        let clock = HlcClock::new(last);
        // Live keys per keyspace: counted once here, then kept up to date.
        let (live, _) = count_all(&backend)?;
        Ok(Replica {
            node,
            backend,
            clock,
            digest,
            seq,
            signer: Arc::new(Unsigned),
            vouch: Box::new(TrustAll),
            reconcile_held: BTreeSet::new(),
            live,
            lease_ms: None,
        })
    }

    /// Makes a node's records of its workload (`Keyspace::leased`) leases of `lease_ms` (see
    /// `expire_departed`): a peer's such record older than that is neither kept nor accepted.
    pub fn with_lease(mut self, lease_ms: u64) -> Replica<B> {
        self.lease_ms = Some(lease_ms.max(1));
        self
    }

    /// Whether `e` is a departed node's record: leased, another node's, and older than
    /// the lease (its owner would have written it again by now if it were alive).
    fn is_expired(&self, e: &Entry, now_ms: u64) -> bool {
        self.lease_ms.is_some_and(|lease| {
            e.key.keyspace().leased()
                && e.version.origin != self.node
                && e.version.hlc.millis().saturating_add(lease) < now_ms
        })
    }

    /// Signs this node's writes with `signer` and checks peers' entries with `vouch` (the
    /// replica opens with neither: `Unsigned`, `TrustAll`).
    pub fn with_proofs(mut self, signer: Arc<dyn Sign>, vouch: Box<dyn Vouch>) -> Replica<B> {
        self.signer = signer;
        self.vouch = vouch;
        self
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn clock(&self) -> Hlc {
        self.clock.last()
    }

    pub fn get(&self, key: &Key) -> Result<Option<Entry>, StoreError> {
        Ok(read_entry(&self.backend, key.as_str())?.map(|(e, _)| e))
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.backend.flush()
    }

    /// Writes a value (or, with `None`, a tombstone) as this node at a fresh version, proved
    /// by this node's signer.
    pub fn write(
        &mut self,
        now_ms: u64,
        key: Key,
        value: Option<Bytes>,
    ) -> Result<Written, StoreError> {
        let signer = self.signer.clone();
        self.write_signed(now_ms, key, value, &*signer)
    }

    /// Writes as this node, proved by `signer` (an operator's key for desired state).
    pub fn write_signed(
        &mut self,
        now_ms: u64,
        key: Key,
        value: Option<Bytes>,
        signer: &dyn Sign,
    ) -> Result<Written, StoreError> {
        let prev = self.digest.watermark(&self.node);
        let mut entry = Entry {
            key,
            version: Version {
                hlc: self.clock.tick(now_ms),
                origin: self.node.clone(),
            },
            value,
            proof: Proof::default(),
        };
        entry.validate()?;
        entry.proof = signer.prove(&entry);
        let current = read_entry(&self.backend, entry.key.as_str())?;
        let mut batch = Batch::default();
        let change = self.stage(&mut batch, entry, current);
        self.stage_watermark(&mut batch, &self.node.clone(), change.entry.version.hlc);
        self.backend.apply(batch)?;
        Ok(Written { change, prev })
    }

    /// Merges entries received from a peer. Every entry must be well-formed and within the
    /// clock bound, or nothing changes and the error says why. Each entry that would win by
    /// last-writer-wins must then carry a valid proof (`vouch`): those that do not are left
    /// out and reported in `Applied::unvouched`; the rest merge. Node records go first, so a
    /// batch can carry the certificate its other entries are signed with.
    pub fn apply_remote(&mut self, now_ms: u64, entries: &[Entry]) -> Result<Applied, StoreError> {
        for e in entries {
            e.validate()?;
            let ahead = e.version.hlc.millis().saturating_sub(now_ms);
            if ahead > MAX_DRIFT_MS {
                return Err(StoreError::ClockDrift {
                    origin: e.version.origin.to_string(),
                    ahead_ms: ahead,
                });
            }
        }
        let mut order: Vec<&Entry> = entries.iter().collect();
        order.sort_by_key(|e| e.key.keyspace() != Keyspace::Nodes);
        let mut batch = Batch::default();
        let mut applied = Applied::default();
        // A batch may carry the same key twice; what we staged is the current value then.
        let mut staged: BTreeMap<Key, (Entry, u64)> = BTreeMap::new();
        for e in order {
            self.clock.observe(e.version.hlc);
            // A departed node's record is not brought back by a peer that still holds it.
            if self.is_expired(e, now_ms) {
                applied.expired += 1;
                continue;
            }
            let current = match staged.get(&e.key) {
                Some(s) => Some(s.clone()),
                None => read_entry(&self.backend, e.key.as_str())?,
            };
            let wins = match &current {
                Some((cur, _)) => e.supersedes(cur),
                // A tombstone we already collected needs no second life.
                None => {
                    !(e.is_tombstone() && e.version.hlc <= self.collected_floor(&e.version.origin))
                }
            };
            if !wins {
                continue;
            }
            // Only winners are checked: duplicates and stale copies cost no signature check.
            let backend = &self.backend;
            let mut lookup = |k: &Key| match staged.get(k) {
                Some((e, _)) => Some(e.clone()),
                None => read_entry(backend, k.as_str())
                    .ok()
                    .flatten()
                    .map(|(e, _)| e),
            };
            if let Err(why) = self.vouch.check(e, &mut lookup) {
                applied
                    .unvouched
                    .push((e.key.clone(), e.version.clone(), why));
                continue;
            }
            let change = self.stage(&mut batch, e.clone(), current);
            staged.insert(e.key.clone(), (e.clone(), change.seq));
            applied.changes.push(change);
        }
        if !batch.is_empty() {
            self.backend.apply(batch)?;
        }
        Ok(applied)
    }

    fn collected_floor(&self, origin: &NodeId) -> Hlc {
        self.digest
            .collected
            .get(origin)
            .copied()
            .unwrap_or(Hlc::ZERO)
    }

    /// Live keys per keyspace, in `Keyspace::ALL` order.
    pub fn live_counts(&self) -> [(Keyspace, u64); Keyspace::ALL.len()] {
        let mut out = [(Keyspace::Apps, 0); Keyspace::ALL.len()];
        for (i, k) in Keyspace::ALL.iter().enumerate() {
            out[i] = (*k, self.live[i]);
        }
        out
    }

    /// Stages `entry` as the key's new value, replacing `current` in every index.
    fn stage(&mut self, batch: &mut Batch, entry: Entry, current: Option<(Entry, u64)>) -> Change {
        let was_live = current.as_ref().is_some_and(|(e, _)| !e.is_tombstone());
        let i = space_index(entry.key.keyspace());
        match (was_live, entry.is_tombstone()) {
            (false, false) => self.live[i] += 1,
            (true, true) => self.live[i] = self.live[i].saturating_sub(1),
            _ => {}
        }
        if let Some((old, old_seq)) = current {
            batch.remove(origin_key(P_ORIGIN, &old.version.origin, old.version.hlc));
            if old.is_tombstone() {
                batch.remove(origin_key(P_TOMB, &old.version.origin, old.version.hlc));
            }
            if old_seq > 0 {
                batch.remove(c_key(old_seq));
            }
        }
        self.seq += 1;
        let key = entry.key.as_str().as_bytes().to_vec();
        let stored = Stored {
            hlc: entry.version.hlc,
            origin: entry.version.origin.clone(),
            value: entry.value.as_ref().map(|v| v.to_vec()),
            seq: self.seq,
            proof: entry.proof.clone(),
        };
        // Serializing plain data into a Vec cannot fail.
        let raw = postcard::to_allocvec(&stored).unwrap_or_default();
        batch.put(k_key(entry.key.as_str()), raw);
        batch.put(
            origin_key(P_ORIGIN, &entry.version.origin, entry.version.hlc),
            key.clone(),
        );
        if entry.is_tombstone() {
            batch.put(
                origin_key(P_TOMB, &entry.version.origin, entry.version.hlc),
                key.clone(),
            );
        }
        batch.put(c_key(self.seq), key);
        batch.put(META_SEQ.to_vec(), self.seq.to_be_bytes().to_vec());
        Change {
            seq: self.seq,
            entry,
        }
    }

    fn stage_watermark(&mut self, batch: &mut Batch, origin: &NodeId, hlc: Hlc) {
        let w = self
            .digest
            .watermarks
            .entry(origin.clone())
            .or_insert(Hlc::ZERO);
        if hlc > *w {
            *w = hlc;
            batch.put(named_key(P_WATERMARK, origin), hlc.0.to_be_bytes().to_vec());
        }
    }

    /// Raises watermarks to what a peer vouched for (`through`): call only after the entries
    /// that came with it were applied, and with readings bounded by `check_bound`. This node's
    /// own watermark moves only with its own writes: no peer speaks for them.
    pub fn advance(&mut self, through: &BTreeMap<NodeId, Hlc>) -> Result<(), StoreError> {
        self.advance_except(through, &BTreeSet::new())
    }

    /// `advance`, except for `held` origins: entries of theirs were left out for now (their
    /// signer unknown here), and the watermark must not claim we hold them.
    pub fn advance_except(
        &mut self,
        through: &BTreeMap<NodeId, Hlc>,
        held: &BTreeSet<NodeId>,
    ) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for (origin, hlc) in through {
            if *origin != self.node && !held.contains(origin) {
                self.stage_watermark(&mut batch, origin, *hlc);
            }
        }
        if !batch.is_empty() {
            self.backend.apply(batch)?;
        }
        Ok(())
    }

    /// Extends the watermark of `origin` to `hlc` if the entry written at `hlc` directly
    /// followed the one at `prev` and we already hold everything up to `prev`.
    pub fn advance_chain(
        &mut self,
        origin: &NodeId,
        prev: Hlc,
        hlc: Hlc,
    ) -> Result<bool, StoreError> {
        if *origin == self.node || self.digest.watermark(origin) != prev || hlc <= prev {
            return Ok(false);
        }
        let mut batch = Batch::default();
        self.stage_watermark(&mut batch, origin, hlc);
        self.backend.apply(batch)?;
        Ok(true)
    }

    /// What a peer with digest `theirs` lacks, in per-origin version order, bounded by entry
    /// count and bytes. `through` says how far each origin is covered.
    /// The signers' records of its entries come in front (`with_signers`).
    pub fn delta_for(
        &self,
        theirs: &Digest,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Delta, StoreError> {
        let mut delta = self.delta_inner(theirs, max_entries, max_bytes)?;
        self.with_signers(&mut delta.entries)?;
        Ok(delta)
    }

    fn delta_inner(
        &self,
        theirs: &Digest,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Delta, StoreError> {
        let mut delta = Delta {
            complete: true,
            ..Delta::default()
        };
        let mut bytes = 0usize;
        for (origin, ours) in &self.digest.watermarks {
            let from = theirs.watermark(origin);
            if *ours <= from {
                continue;
            }
            let mut cursor = origin_key(P_ORIGIN, origin, from);
            let end = origin_key(P_ORIGIN, origin, Hlc(ours.0.saturating_add(1)));
            loop {
                let room = max_entries.saturating_sub(delta.entries.len());
                if room == 0 {
                    delta.complete = false;
                    return Ok(delta);
                }
                let page = self.backend.scan(&cursor, true, &end, room.min(256))?;
                if page.is_empty() {
                    break;
                }
                for (k, key) in &page {
                    let key = std::str::from_utf8(key).map_err(|_| corrupt("origin index"))?;
                    let hlc = Hlc(decode_u64(&k[k.len() - 8..])?);
                    if let Some((e, _)) = read_entry(&self.backend, key)? {
                        let size = key.len() + e.value.as_ref().map_or(0, |v| v.len()) + 32;
                        if bytes + size > max_bytes && !delta.entries.is_empty() {
                            delta.complete = false;
                            return Ok(delta);
                        }
                        bytes += size;
                        delta.entries.push(e);
                    }
                    delta.through.insert(origin.clone(), hlc);
                }
                cursor = page.last().map(|(k, _)| k.clone()).unwrap_or_default();
            }
            delta.through.insert(origin.clone(), *ours);
        }
        Ok(delta)
    }

    /// Puts in front of `entries` the current record of every node that signed one of them and
    /// whose record is not among them: a receiver learns each signer's key before it needs it,
    /// whatever order the entries come in.
    fn with_signers(&self, entries: &mut Vec<Entry>) -> Result<(), StoreError> {
        let have: BTreeSet<&Key> = entries.iter().map(|e| &e.key).collect();
        let wanted: BTreeSet<Key> = entries
            .iter()
            .filter_map(Entry::signer_record)
            .filter(|k| !have.contains(k))
            .collect();
        let mut front = Vec::with_capacity(wanted.len());
        for k in wanted {
            if let Some((e, _)) = read_entry(&self.backend, k.as_str())? {
                front.push(e);
            }
        }
        if !front.is_empty() {
            front.append(entries);
            *entries = front;
        }
        Ok(())
    }

    /// A page of the whole state in key order, tombstones included, for a replica that must
    /// reconcile. `next` is the cursor for the following page, `None` at the end.
    pub fn snapshot_page(
        &self,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<(Vec<Entry>, Option<Key>), StoreError> {
        let (start, excl) = match after {
            Some(k) => (k_key(k.as_str()), true),
            None => (vec![P_KEY], false),
        };
        let rows = self.backend.scan(&start, excl, &[P_KEY + 1], limit)?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, v) in &rows {
            out.push(decode_stored(&k[1..], v)?.0);
        }
        let next = if rows.len() == limit {
            out.last().map(|e| e.key.clone())
        } else {
            None
        };
        self.with_signers(&mut out)?;
        Ok((out, next))
    }

    /// Merges one reconcile page from a peer whose state is `theirs` (checked with
    /// `Digest::check`): entries are merged as usual. Our keys in the page's range that the
    /// peer lacks although it has seen their version, and whose version is below a horizon up
    /// to which it collected tombstones, may have been deleted and collected there: they are
    /// returned as candidates, not dropped (see `drop_confirmed`). At the last page, watermarks
    /// rise to the peer's (never our own, never its collection horizons).
    pub fn reconcile_page(
        &mut self,
        now_ms: u64,
        theirs: &Digest,
        after: Option<&Key>,
        entries: &[Entry],
        next: Option<&Key>,
    ) -> Result<(Applied, Vec<Named>), StoreError> {
        let applied = self.apply_remote(now_ms, entries)?;
        self.reconcile_held.extend(applied.pending_origins());
        let present: std::collections::BTreeSet<&Key> = entries.iter().map(|e| &e.key).collect();
        let (start, excl) = match after {
            Some(k) => (k_key(k.as_str()), true),
            None => (vec![P_KEY], false),
        };
        let end = match next {
            Some(k) => {
                let mut e = k_key(k.as_str());
                e.push(0);
                e
            }
            None => vec![P_KEY + 1],
        };
        let horizon = theirs.max_collected();
        let mut candidates = Vec::new();
        let mut cursor = (start, excl);
        loop {
            let rows = self.backend.scan(&cursor.0, cursor.1, &end, 1024)?;
            let Some((last, _)) = rows.last() else { break };
            cursor = (last.clone(), true);
            for (k, v) in &rows {
                let (e, _) = decode_stored(&k[1..], v)?;
                let seen = e.version.hlc <= theirs.watermark(&e.version.origin);
                if !present.contains(&e.key) && seen && e.version.hlc <= horizon {
                    candidates.push((e.key, e.version));
                }
            }
        }
        if next.is_none() {
            // The whole key space was compared: we now hold what the peer vouched for, except
            // entries left out for a signer we did not know yet.
            let held = std::mem::take(&mut self.reconcile_held);
            self.advance_except(&theirs.watermarks, &held)?;
        }
        Ok((applied, candidates))
    }

    /// Drops the keys a reconcile named (`reconcile_page`) that still hold the version it
    /// named: deletions another node collected before this one saw their tombstones.
    pub fn drop_confirmed(&mut self, keys: &[Named]) -> Result<Vec<Change>, StoreError> {
        let mut found = Vec::new();
        for (key, version) in keys {
            if let Some((e, seq)) = read_entry(&self.backend, key.as_str())? {
                if e.version == *version {
                    found.push((e, seq));
                }
            }
        }
        self.remove_entries(found)
    }

    /// Removes entries outright (no tombstone: every replica removes them by the same rule)
    /// in one batch; the changes, as deletions, for watchers.
    fn remove_entries(&mut self, entries: Vec<(Entry, u64)>) -> Result<Vec<Change>, StoreError> {
        let mut batch = Batch::default();
        let mut changes = Vec::new();
        for (e, seq) in entries {
            if !e.is_tombstone() {
                let i = space_index(e.key.keyspace());
                self.live[i] = self.live[i].saturating_sub(1);
            }
            Self::stage_removal(&mut batch, &e, seq);
            self.seq += 1;
            changes.push(Change {
                seq: self.seq,
                entry: Entry { value: None, ..e },
            });
        }
        if !batch.is_empty() {
            batch.put(META_SEQ.to_vec(), self.seq.to_be_bytes().to_vec());
            batch.put(META_COMPACTED.to_vec(), self.seq.to_be_bytes().to_vec());
            self.backend.apply(batch)?;
        }
        Ok(changes)
    }

    fn stage_removal(batch: &mut Batch, e: &Entry, seq: u64) {
        batch.remove(k_key(e.key.as_str()));
        batch.remove(origin_key(P_ORIGIN, &e.version.origin, e.version.hlc));
        batch.remove(origin_key(P_TOMB, &e.version.origin, e.version.hlc));
        batch.remove(c_key(seq));
    }

    fn stage_collected(&mut self, batch: &mut Batch, origin: &NodeId, hlc: Hlc) {
        let g = self
            .digest
            .collected
            .entry(origin.clone())
            .or_insert(Hlc::ZERO);
        if hlc > *g {
            *g = hlc;
            batch.put(named_key(P_COLLECTED, origin), hlc.0.to_be_bytes().to_vec());
        }
    }

    /// Collects tombstones that every live member has seen (`acked(origin)` is the lowest
    /// watermark for that origin among them) and that are at least `min_age_ms` old, and any
    /// tombstone older than `horizon_ms`. Returns how many were collected.
    pub fn collect_tombstones(
        &mut self,
        now_ms: u64,
        acked: impl Fn(&NodeId) -> Hlc,
        min_age_ms: u64,
        horizon_ms: u64,
    ) -> Result<usize, StoreError> {
        let aged = Hlc::from_millis(now_ms.saturating_sub(min_age_ms));
        let expired = Hlc::from_millis(now_ms.saturating_sub(horizon_ms));
        let origins: Vec<NodeId> = self.digest.watermarks.keys().cloned().collect();
        let mut batch = Batch::default();
        let mut count = 0;
        for origin in origins {
            let limit = acked(&origin).min(aged).max(expired);
            if limit == Hlc::ZERO {
                continue;
            }
            let start = origin_prefix(P_TOMB, &origin);
            let end = origin_key(P_TOMB, &origin, Hlc(limit.0.saturating_add(1)));
            let mut top = Hlc::ZERO;
            for (k, key) in self.backend.scan(&start, false, &end, 10_000)? {
                let key = std::str::from_utf8(&key).map_err(|_| corrupt("tombstone index"))?;
                let hlc = Hlc(decode_u64(&k[k.len() - 8..])?);
                if let Some((e, seq)) = read_entry(&self.backend, key)? {
                    if e.is_tombstone() && e.version.hlc == hlc {
                        Self::stage_removal(&mut batch, &e, seq);
                        count += 1;
                    }
                }
                top = top.max(hlc);
            }
            if top > Hlc::ZERO {
                self.stage_collected(&mut batch, &origin, top);
            }
        }
        if !batch.is_empty() {
            batch.put(META_COMPACTED.to_vec(), self.seq.to_be_bytes().to_vec());
            self.backend.apply(batch)?;
        }
        Ok(count)
    }

    /// A node's records of its workload (`tasks/`, `metrics/`, `images/`) are leases: their
    /// owner writes each again before a quarter of the lease has passed (`refresh_own`), so
    /// a record older than the lease is a departed node's: dead, or cut off, for that long.
    /// Drops such records of other nodes (at most `max` per call) and returns the changes, as
    /// deletions, for watchers. Every node applies the same rule to the same versions, and
    /// `apply_remote` refuses them, so they do not come back; a node that returns writes its
    /// records again, at new versions, and is back. No tombstone is written: the owner-only
    /// rule lets no other node write one.
    pub fn expire_departed(&mut self, now_ms: u64, max: usize) -> Result<Vec<Change>, StoreError> {
        let Some(lease) = self.lease_ms else {
            return Ok(Vec::new());
        };
        let cutoff = Hlc::from_millis(now_ms.saturating_sub(lease));
        // Only a node this one has heard nothing from since the cutoff can have departed (a
        // live one writes its records again well within the lease); its records are under
        // its own id in each leased keyspace (`leased_of`).
        let departed: Vec<NodeId> = self
            .digest
            .watermarks
            .iter()
            .filter(|(o, w)| **o != self.node && **w < cutoff)
            .map(|(o, _)| o.clone())
            .collect();
        let mut expired = Vec::new();
        for origin in departed {
            let left = max.saturating_sub(expired.len());
            let records = self.leased_of(&origin, left)?;
            expired.extend(
                records
                    .into_iter()
                    .filter(|(e, _)| self.is_expired(e, now_ms)),
            );
        }
        self.remove_entries(expired)
    }

    /// Writes again, unchanged but at a new version, this node's own leased records older
    /// than a quarter of the lease (at most `max` per call), so they never expire while
    /// it lives (`expire_departed`).
    pub fn refresh_own(&mut self, now_ms: u64, max: usize) -> Result<Vec<Written>, StoreError> {
        let Some(lease) = self.lease_ms else {
            return Ok(Vec::new());
        };
        let stale = Hlc::from_millis(now_ms.saturating_sub(lease / 4));
        let me = self.node.clone();
        // Its own records only: older desired state it wrote (specs, rollout records) is no
        // lease, and must not crowd them out of `max`.
        let due: Vec<Entry> = self
            .leased_of(&me, usize::MAX)?
            .into_iter()
            .map(|(e, _)| e)
            .filter(|e| !e.is_tombstone() && e.version.hlc < stale)
            .take(max)
            .collect();
        due.into_iter()
            .map(|e| self.write(now_ms, e.key, e.value))
            .collect()
    }

    /// `node`'s leased records (`Keyspace::leased`: `space/<node>` and `space/<node>/…`),
    /// tombstones included, at most `max`.
    fn leased_of(&self, node: &NodeId, max: usize) -> Result<Vec<(Entry, u64)>, StoreError> {
        let mut out = Vec::new();
        for space in Keyspace::ALL.into_iter().filter(|k| k.leased()) {
            let exact = k_key(&format!("{}/{}", space.name(), node.as_str()));
            let mut end = exact.clone();
            end.push(0);
            let mut under = exact.clone();
            under.push(b'/');
            let mut under_end = exact.clone();
            under_end.push(b'/' + 1);
            for (start, end) in [(exact, end), (under, under_end)] {
                let left = max.saturating_sub(out.len());
                if left == 0 {
                    return Ok(out);
                }
                for (k, v) in self.backend.scan(&start, false, &end, left)? {
                    out.push(decode_stored(&k[1..], &v)?);
                }
            }
        }
        Ok(out)
    }

    /// Counts of live entries and tombstones by a full scan (`live_counts` is kept as entries
    /// change; this recounts, for tests).
    pub fn counts(&self) -> Result<(u64, u64), StoreError> {
        let (live, tombs) = count_all(&self.backend)?;
        Ok((live.iter().sum(), tombs))
    }
}
