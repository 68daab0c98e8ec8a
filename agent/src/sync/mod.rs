//! Dissemination of the store between nodes, as a state machine: messages and ticks in,
//! sends and applied changes out. Two mechanisms, as in proven designs: fresh writes are
//! pushed at once to a few random peers, which pass them on (rumor mongering); and periodic
//! anti-entropy compares digests and repairs whatever the rumors missed. Does no IO and reads
//! no clock.
//!
//! A peer may lie. What it says about clocks (digests, `through`) is bounded by ours before
//! anything is applied or remembered, and a reconcile never deletes on one peer's word: the
//! keys a reconcile names as deleted elsewhere are dropped only when a second peer names them
//! too, or, with no second peer to ask, when they are at most `reconcile_drop_bound`. Every
//! reconcile ends in a `ReconcileReport` for the log and the metrics.

pub mod message;

use crate::membership::Member;
use crate::store::replica::check_bound;
use crate::store::{
    Applied, Backend, Change, Digest, Entry, Hlc, Key, NodeId, Replica, StoreError, Unvouched,
    Version, Written,
};
use message::{Message, Range, Rumor};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// A `Message::ReconcileReply`'s fields, handed on whole.
struct ReconcilePage {
    digest: Digest,
    after: Option<Key>,
    entries: Vec<Entry>,
    next: Option<Key>,
}

/// Keys one reconcile may name as deleted before it stops listing them (and drops none of
/// them): bounds the memory a lying peer can make us hold.
const MAX_CANDIDATES: usize = 100_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Peers each fresh write is pushed to, by every node that receives it first.
    pub fanout: usize,
    /// Gossip rounds in which a fresh write is pushed again, to new random peers.
    pub retransmit_rounds: u8,
    pub gossip_interval_ms: u64,
    pub anti_entropy_interval_ms: u64,
    /// Bounds on one anti-entropy message; larger catch-ups continue in further rounds.
    pub max_entries: usize,
    pub max_bytes: usize,
    pub gc_interval_ms: u64,
    /// A tombstone every live member has seen is kept at least this long.
    pub tombstone_min_age_ms: u64,
    /// A tombstone older than this is collected even if some member never confirmed it.
    pub tombstone_horizon_ms: u64,
    /// A node's records of its workload (`tasks/`, `metrics/`, `images/`) are leases of this
    /// long: written again every quarter of it, and collected on every node once their owner
    /// has not been heard from for this long (`Replica::expire_departed`). 0: kept forever.
    pub departed_ms: u64,
    /// Pass rumors on as soon as they arrive (true) or only at the next gossip round.
    pub forward_immediately: bool,
    /// With no second peer to confirm them, a reconcile drops at most this many keys.
    pub reconcile_drop_bound: usize,
    /// A reconcile whose peer stops answering is abandoned after this long.
    pub reconcile_timeout_ms: u64,
    /// A peer that named keys a second peer did not confirm starts no reconcile for this long.
    pub reconcile_distrust_ms: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            fanout: 3,
            retransmit_rounds: 2,
            gossip_interval_ms: 200,
            anti_entropy_interval_ms: 1000,
            max_entries: 512,
            max_bytes: 1 << 20,
            gc_interval_ms: 10_000,
            tombstone_min_age_ms: 60_000,
            tombstone_horizon_ms: 7 * 24 * 3600 * 1000,
            departed_ms: 24 * 3600 * 1000,
            forward_immediately: true,
            reconcile_drop_bound: 32,
            reconcile_timeout_ms: 30_000,
            reconcile_distrust_ms: 10 * 60 * 1000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("refused entries from {peer}")]
    Refused {
        peer: NodeId,
        #[source]
        source: StoreError,
    },
    #[error("store failed during sync")]
    Store(#[from] StoreError),
}

/// Most refused entries one report names (the counters hold them all).
const MAX_REPORTED: usize = 8;

#[derive(Debug, Clone)]
pub enum SyncEffect {
    Send(Member, Message),
    Changed(Change),
    Reconciled(ReconcileReport),
    /// A peer sent entries whose proofs failed (forged, an evicted signer, no operator
    /// signature): they were left out. For the log (warn).
    Unvouched {
        peer: NodeId,
        entries: Vec<(Key, Version, Unvouched)>,
    },
}

/// How one reconcile ended: what it merged, which keys it named as deleted elsewhere, and what
/// became of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// The peer whose state was compared.
    pub peer: NodeId,
    /// Entries merged from it.
    pub merged: usize,
    /// Keys it named as deleted and collected there.
    pub named: usize,
    pub dropped: usize,
    /// Named but kept: unconfirmed, over the bound, or changed since.
    pub held: usize,
    pub outcome: ReconcileOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconcileOutcome {
    /// Nothing to drop, or drops within the bound with no second peer to ask.
    Done,
    /// The named keys wait for a second peer (`confirming`) to name them too.
    AwaitingSecondPeer,
    /// A second peer's reconcile confirmed what both named (the report's `peer` is the first).
    Confirmed,
    /// More than the bound and no second peer: nothing dropped.
    RefusedOverBound,
    /// The peer showed an implausible digest: the reconcile stopped, nothing dropped.
    RefusedImplausible,
    /// The peer stopped answering or left.
    Abandoned,
}

/// A reconcile under way with one peer.
#[derive(Debug)]
struct Reconcile {
    peer: NodeId,
    started_ms: u64,
    merged: usize,
    named: BTreeMap<Key, Version>,
    overflow: bool,
    /// Set on a second peer's reconcile: the first peer and the keys it named.
    confirming: Option<(NodeId, BTreeMap<Key, Version>)>,
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncStats {
    pub rumors_received: u64,
    pub rumors_applied: u64,
    pub sync_rounds: u64,
    pub entries_repaired: u64,
    pub reconciles: u64,
    pub refused: u64,
    pub tombstones_collected: u64,
    /// Keys dropped because a reconcile named them (and, with peers to ask, a second agreed).
    pub reconcile_dropped: u64,
    /// Keys a reconcile named but that were kept (unconfirmed or over the bound).
    pub reconcile_held: u64,
    /// Reconciles in which a second peer did not confirm every key the first one named.
    pub reconcile_unconfirmed: u64,
    /// Entries left out for a bad proof: forged, by an evicted signer, or unsigned.
    pub unvouched_refused: u64,
    /// Entries left out until their signer's record arrives.
    pub unvouched_pending: u64,
}

pub struct SyncEngine {
    cfg: SyncConfig,
    me: Member,
    /// The latest digest each peer showed us: what it holds, for deltas and collection.
    digests: HashMap<NodeId, Digest>,
    /// Rumors still to be pushed in coming gossip rounds, with rounds left.
    rumors: Vec<(Rumor, u8)>,
    reconciling: Option<Reconcile>,
    /// Peers whose word a second peer did not confirm, and until when they start no reconcile.
    distrusted: HashMap<NodeId, u64>,
    pub stats: SyncStats,
}

/// Picks up to `k` distinct members from `peers`, none of them in `skip`. Constant work per
/// pick on large lists, so a 10 000-node simulation stays cheap.
pub fn choose<'a, R: RngExt>(
    rng: &mut R,
    peers: &'a [Member],
    k: usize,
    skip: &[&NodeId],
) -> Vec<&'a Member> {
    let n = peers.len();
    if n > 4 * (k + skip.len()) {
        let mut picked: Vec<usize> = Vec::with_capacity(k);
        while picked.len() < k {
            let i = rng.random_range(0..n);
            if !picked.contains(&i) && !skip.contains(&&peers[i].id) {
                picked.push(i);
            }
        }
        return picked.into_iter().map(|i| &peers[i]).collect();
    }
    let mut idx: Vec<usize> = (0..n).filter(|&i| !skip.contains(&&peers[i].id)).collect();
    let k = k.min(idx.len());
    for i in 0..k {
        let j = rng.random_range(i..idx.len());
        idx.swap(i, j);
    }
    idx[..k].iter().map(|&i| &peers[i]).collect()
}

impl SyncEngine {
    pub fn new(me: Member, cfg: SyncConfig) -> SyncEngine {
        SyncEngine {
            cfg,
            me,
            digests: HashMap::new(),
            rumors: Vec::new(),
            reconciling: None,
            distrusted: HashMap::new(),
            stats: SyncStats::default(),
        }
    }

    pub fn config(&self) -> &SyncConfig {
        &self.cfg
    }

    pub fn set_me(&mut self, me: Member) {
        self.me = me;
    }

    /// The last digest seen from each peer.
    pub fn peer_digests(&self) -> &HashMap<NodeId, Digest> {
        &self.digests
    }

    /// A peer left: its digest goes, and so does a reconcile with it (abandoned, reported).
    pub fn forget(&mut self, peer: &NodeId, out: &mut Vec<SyncEffect>) {
        self.digests.remove(peer);
        if self.reconciling.as_ref().is_some_and(|r| r.peer == *peer) {
            self.abandon(ReconcileOutcome::Abandoned, out);
        }
    }

    /// Whether a reconcile is under way, and with whom.
    pub fn reconciling_with(&self) -> Option<&NodeId> {
        self.reconciling.as_ref().map(|r| &r.peer)
    }

    /// Pushes this node's fresh (already durable) writes.
    pub fn publish<R: RngExt>(
        &mut self,
        written: &[Written],
        peers: &[Member],
        rng: &mut R,
        out: &mut Vec<SyncEffect>,
    ) {
        let rumors: Vec<Rumor> = written
            .iter()
            .map(|w| Rumor {
                entry: w.change.entry.clone(),
                prev: w.prev,
            })
            .collect();
        if rumors.is_empty() {
            return;
        }
        for p in choose(rng, peers, self.cfg.fanout, &[&self.me.id]) {
            out.push(SyncEffect::Send(p.clone(), Message::Push(rumors.clone())));
        }
        self.queue(rumors);
    }

    fn queue(&mut self, rumors: Vec<Rumor>) {
        if self.cfg.retransmit_rounds > 0 {
            self.rumors
                .extend(rumors.into_iter().map(|r| (r, self.cfg.retransmit_rounds)));
        }
    }

    /// A gossip round: rumors still in flight go to new random peers.
    pub fn on_gossip_tick<R: RngExt>(
        &mut self,
        peers: &[Member],
        rng: &mut R,
        out: &mut Vec<SyncEffect>,
    ) {
        if self.rumors.is_empty() {
            return;
        }
        let batch: Vec<Rumor> = self.rumors.iter().map(|(r, _)| r.clone()).collect();
        for chunk in batch.chunks(message::MAX_ENTRIES.min(self.cfg.max_entries.max(1))) {
            for p in choose(rng, peers, self.cfg.fanout, &[&self.me.id]) {
                out.push(SyncEffect::Send(p.clone(), Message::Push(chunk.to_vec())));
            }
        }
        self.rumors.retain_mut(|(_, left)| {
            *left -= 1;
            *left > 0
        });
    }

    /// An anti-entropy round: offer our digest to one random peer. A reconcile under way
    /// holds rounds back until it ends or times out.
    pub fn on_anti_entropy_tick<B: Backend, R: RngExt>(
        &mut self,
        replica: &Replica<B>,
        now_ms: u64,
        peers: &[Member],
        rng: &mut R,
        out: &mut Vec<SyncEffect>,
    ) {
        if let Some(r) = &self.reconciling {
            if now_ms.saturating_sub(r.started_ms) <= self.cfg.reconcile_timeout_ms {
                return;
            }
            self.abandon(ReconcileOutcome::Abandoned, out);
        }
        if let Some(p) = choose(rng, peers, 1, &[&self.me.id]).first() {
            self.stats.sync_rounds += 1;
            out.push(SyncEffect::Send(
                (*p).clone(),
                Message::SyncRequest(replica.digest().clone()),
            ));
        }
    }

    /// Collects tombstones every live member has seen.
    pub fn on_gc_tick<B: Backend>(
        &mut self,
        replica: &mut Replica<B>,
        now_ms: u64,
        live: &[NodeId],
    ) -> Result<usize, StoreError> {
        let me = replica.node().clone();
        let digests = &self.digests;
        let acked = |origin: &NodeId| -> Hlc {
            let mut min = replica.digest().watermark(origin);
            for peer in live.iter().filter(|p| **p != me) {
                match digests.get(peer) {
                    Some(d) => min = min.min(d.watermark(origin)),
                    None => return Hlc::ZERO,
                }
            }
            min
        };
        let acked: HashMap<NodeId, Hlc> = replica
            .digest()
            .watermarks
            .keys()
            .map(|o| (o.clone(), acked(o)))
            .collect();
        let n = replica.collect_tombstones(
            now_ms,
            |o| acked.get(o).copied().unwrap_or(Hlc::ZERO),
            self.cfg.tombstone_min_age_ms,
            self.cfg.tombstone_horizon_ms,
        )?;
        self.stats.tombstones_collected += n as u64;
        Ok(n)
    }

    /// Handles one message from `from`.
    #[allow(clippy::too_many_arguments)]
    pub fn on_message<B: Backend, R: RngExt>(
        &mut self,
        replica: &mut Replica<B>,
        now_ms: u64,
        from: &Member,
        msg: Message,
        peers: &[Member],
        rng: &mut R,
        out: &mut Vec<SyncEffect>,
    ) -> Result<(), SyncError> {
        match msg {
            Message::Swim(_) => Ok(()),
            Message::Push(rumors) => self.on_push(replica, now_ms, from, rumors, peers, rng, out),
            Message::SyncRequest(digest) => {
                self.on_sync_request(replica, now_ms, from, digest, out)
            }
            Message::SyncReply { digest, range } => {
                self.on_sync_reply(replica, now_ms, from, digest, range, out)
            }
            Message::SyncPush(range) => self.apply_range(replica, now_ms, from, range, out),
            Message::ReconcileRequest { after } => {
                let (entries, next) =
                    replica.snapshot_page(after.as_ref(), self.cfg.max_entries.max(1))?;
                out.push(SyncEffect::Send(
                    from.clone(),
                    Message::ReconcileReply {
                        digest: replica.digest().clone(),
                        after,
                        entries,
                        next,
                    },
                ));
                Ok(())
            }
            Message::ReconcileReply {
                digest,
                after,
                entries,
                next,
            } => {
                let page = ReconcilePage {
                    digest,
                    after,
                    entries,
                    next,
                };
                self.on_reconcile_reply(replica, now_ms, from, page, peers, rng, out)
            }
        }
    }

    /// A peer's digest: answer with what it lacks; reconcile when it is past our horizon.
    fn on_sync_request<B: Backend>(
        &mut self,
        replica: &mut Replica<B>,
        now_ms: u64,
        from: &Member,
        digest: Digest,
        out: &mut Vec<SyncEffect>,
    ) -> Result<(), SyncError> {
        self.check_digest(from, &digest, now_ms)?;
        let reply = self.reply_to(replica, &digest)?;
        let behind = replica.digest().behind_horizon_of(&digest);
        self.digests.insert(from.id.clone(), digest);
        out.push(SyncEffect::Send(from.clone(), reply));
        if behind {
            self.start_reconcile(from, now_ms, None, out);
        }
        Ok(())
    }

    /// The answer to our digest: merge it, push back what the peer lacks, and ask again at
    /// once while the range is incomplete.
    fn on_sync_reply<B: Backend>(
        &mut self,
        replica: &mut Replica<B>,
        now_ms: u64,
        from: &Member,
        digest: Digest,
        range: Range,
        out: &mut Vec<SyncEffect>,
    ) -> Result<(), SyncError> {
        self.check_digest(from, &digest, now_ms)?;
        let behind = replica.digest().behind_horizon_of(&digest);
        if behind {
            self.digests.insert(from.id.clone(), digest);
            self.start_reconcile(from, now_ms, None, out);
            return Ok(());
        }
        let complete = range.complete;
        self.apply_range(replica, now_ms, from, range, out)?;
        if !digest.behind_horizon_of(replica.digest()) {
            let delta = replica.delta_for(&digest, self.cfg.max_entries, self.cfg.max_bytes)?;
            if !delta.entries.is_empty() || !delta.through.is_empty() {
                out.push(SyncEffect::Send(
                    from.clone(),
                    Message::SyncPush(Range {
                        entries: delta.entries,
                        through: delta.through,
                        complete: delta.complete,
                    }),
                ));
            }
        }
        self.digests.insert(from.id.clone(), digest);
        if !complete {
            // A large catch-up streams on at once instead of waiting a round.
            out.push(SyncEffect::Send(
                from.clone(),
                Message::SyncRequest(replica.digest().clone()),
            ));
        }
        Ok(())
    }

    /// One page of the peer we reconcile with: merge it, remember what it named, then ask
    /// for the next page or finish.
    #[allow(clippy::too_many_arguments)]
    fn on_reconcile_reply<B: Backend, R: RngExt>(
        &mut self,
        replica: &mut Replica<B>,
        now_ms: u64,
        from: &Member,
        page: ReconcilePage,
        peers: &[Member],
        rng: &mut R,
        out: &mut Vec<SyncEffect>,
    ) -> Result<(), SyncError> {
        let ReconcilePage {
            digest,
            after,
            entries,
            next,
        } = page;
        if self.reconciling_with() != Some(&from.id) {
            return Ok(());
        }
        if let Err(e) = self.check_digest(from, &digest, now_ms) {
            self.abandon(ReconcileOutcome::RefusedImplausible, out);
            return Err(e);
        }
        let (applied, named) = match replica.reconcile_page(
            now_ms,
            &digest,
            after.as_ref(),
            &entries,
            next.as_ref(),
        ) {
            Ok(r) => r,
            Err(source) => {
                self.abandon(ReconcileOutcome::RefusedImplausible, out);
                return Err(self.refused(from, source));
            }
        };
        let changes = self.note_unvouched(from, applied, out);
        self.stats.entries_repaired += changes.len() as u64;
        if let Some(r) = self.reconciling.as_mut() {
            r.merged += changes.len();
            for (k, v) in named {
                if r.named.len() >= MAX_CANDIDATES {
                    r.overflow = true;
                    break;
                }
                r.named.insert(k, v);
            }
        }
        out.extend(changes.into_iter().map(SyncEffect::Changed));
        match next {
            Some(after) => out.push(SyncEffect::Send(
                from.clone(),
                Message::ReconcileRequest { after: Some(after) },
            )),
            None => {
                self.digests.insert(from.id.clone(), digest);
                self.finish_reconcile(replica, now_ms, peers, rng, out)?;
            }
        }
        Ok(())
    }

    /// Counts and reports the entries a merge left out for want of a proof; returns the changes.
    fn note_unvouched(
        &mut self,
        from: &Member,
        applied: Applied,
        out: &mut Vec<SyncEffect>,
    ) -> Vec<Change> {
        let mut forged = Vec::new();
        for (key, version, why) in applied.unvouched {
            if why.is_pending() {
                self.stats.unvouched_pending += 1;
            } else {
                self.stats.unvouched_refused += 1;
                if forged.len() < MAX_REPORTED {
                    forged.push((key, version, why));
                }
            }
        }
        if !forged.is_empty() {
            out.push(SyncEffect::Unvouched {
                peer: from.id.clone(),
                entries: forged,
            });
        }
        applied.changes
    }

    fn refused(&mut self, from: &Member, source: StoreError) -> SyncError {
        self.stats.refused += 1;
        SyncError::Refused {
            peer: from.id.clone(),
            source,
        }
    }

    /// Refuses a digest with readings past what our clock allows (counted; the error says
    /// which origin and by how much).
    fn check_digest(&mut self, from: &Member, d: &Digest, now_ms: u64) -> Result<(), SyncError> {
        d.check(now_ms, self.cfg.tombstone_min_age_ms)
            .map_err(|source| self.refused(from, source))
    }

    fn start_reconcile(
        &mut self,
        with: &Member,
        now_ms: u64,
        confirming: Option<(NodeId, BTreeMap<Key, Version>)>,
        out: &mut Vec<SyncEffect>,
    ) {
        if self.reconciling.is_some() {
            return;
        }
        if confirming.is_none() {
            // A peer whose word was not confirmed lately does not get to start another.
            self.distrusted.retain(|_, until| *until > now_ms);
            if self.distrusted.contains_key(&with.id) {
                return;
            }
        }
        self.stats.reconciles += 1;
        self.reconciling = Some(Reconcile {
            peer: with.id.clone(),
            started_ms: now_ms,
            merged: 0,
            named: BTreeMap::new(),
            overflow: false,
            confirming,
        });
        out.push(SyncEffect::Send(
            with.clone(),
            Message::ReconcileRequest { after: None },
        ));
    }

    /// Ends the reconcile under way without dropping anything.
    fn abandon(&mut self, outcome: ReconcileOutcome, out: &mut Vec<SyncEffect>) {
        let Some(r) = self.reconciling.take() else {
            return;
        };
        let (peer, named) = match r.confirming {
            Some((first, named)) => (first, named.len()),
            None => (r.peer, r.named.len()),
        };
        self.stats.reconcile_held += named as u64;
        out.push(SyncEffect::Reconciled(ReconcileReport {
            peer,
            merged: r.merged,
            named,
            dropped: 0,
            held: named,
            outcome,
        }));
    }

    /// The last page came: drop what may be dropped, or ask a second peer first.
    fn finish_reconcile<B: Backend, R: RngExt>(
        &mut self,
        replica: &mut Replica<B>,
        now_ms: u64,
        peers: &[Member],
        rng: &mut R,
        out: &mut Vec<SyncEffect>,
    ) -> Result<(), SyncError> {
        let Some(r) = self.reconciling.take() else {
            return Ok(());
        };
        let mut report = ReconcileReport {
            peer: r.peer.clone(),
            merged: r.merged,
            named: r.named.len(),
            dropped: 0,
            held: 0,
            outcome: ReconcileOutcome::Done,
        };
        let drop: Vec<(Key, Version)> = match r.confirming {
            // A second peer: drop what both named, at the same version.
            Some((first, named)) => {
                report.peer = first;
                report.named = named.len();
                report.outcome = ReconcileOutcome::Confirmed;
                named
                    .into_iter()
                    .filter(|(k, v)| r.named.get(k) == Some(v))
                    .collect()
            }
            None if r.named.is_empty() && !r.overflow => Vec::new(),
            None => {
                let second = choose(rng, peers, 1, &[&self.me.id, &r.peer])
                    .first()
                    .map(|m| (*m).clone());
                match second {
                    Some(p) => {
                        report.held = report.named;
                        report.outcome = ReconcileOutcome::AwaitingSecondPeer;
                        out.push(SyncEffect::Reconciled(report));
                        self.start_reconcile(&p, now_ms, Some((r.peer, r.named)), out);
                        return Ok(());
                    }
                    None if r.named.len() <= self.cfg.reconcile_drop_bound && !r.overflow => {
                        r.named.into_iter().collect()
                    }
                    None => {
                        report.outcome = ReconcileOutcome::RefusedOverBound;
                        Vec::new()
                    }
                }
            }
        };
        let changes = replica.drop_confirmed(&drop)?;
        report.dropped = changes.len();
        report.held = report.named - report.dropped;
        if report.outcome == ReconcileOutcome::Confirmed && drop.len() < report.named {
            self.stats.reconcile_unconfirmed += 1;
            self.distrusted.insert(
                report.peer.clone(),
                now_ms.saturating_add(self.cfg.reconcile_distrust_ms),
            );
        }
        self.stats.reconcile_dropped += report.dropped as u64;
        self.stats.reconcile_held += report.held as u64;
        out.extend(changes.into_iter().map(SyncEffect::Changed));
        out.push(SyncEffect::Reconciled(report));
        Ok(())
    }

    fn reply_to<B: Backend>(
        &self,
        replica: &Replica<B>,
        theirs: &Digest,
    ) -> Result<Message, StoreError> {
        let mine = replica.digest();
        // Neither side may serve ordinary ranges across a collection horizon: the one behind
        // must reconcile first.
        let range = if theirs.behind_horizon_of(mine) || mine.behind_horizon_of(theirs) {
            Range {
                complete: true,
                ..Range::default()
            }
        } else {
            let d = replica.delta_for(theirs, self.cfg.max_entries, self.cfg.max_bytes)?;
            Range {
                entries: d.entries,
                through: d.through,
                complete: d.complete,
            }
        };
        Ok(Message::SyncReply {
            digest: mine.clone(),
            range,
        })
    }

    fn apply_range<B: Backend>(
        &mut self,
        replica: &mut Replica<B>,
        now_ms: u64,
        from: &Member,
        range: Range,
        out: &mut Vec<SyncEffect>,
    ) -> Result<(), SyncError> {
        if self.reconciling.is_some() {
            return Ok(());
        }
        check_bound(&range.through, "through", now_ms)
            .map_err(|source| self.refused(from, source))?;
        let applied = replica
            .apply_remote(now_ms, &range.entries)
            .map_err(|source| self.refused(from, source))?;
        let held = applied.pending_origins();
        let changes = self.note_unvouched(from, applied, out);
        replica.advance_except(&range.through, &held)?;
        self.stats.entries_repaired += changes.len() as u64;
        out.extend(changes.into_iter().map(SyncEffect::Changed));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn on_push<B: Backend, R: RngExt>(
        &mut self,
        replica: &mut Replica<B>,
        now_ms: u64,
        from: &Member,
        rumors: Vec<Rumor>,
        peers: &[Member],
        rng: &mut R,
        out: &mut Vec<SyncEffect>,
    ) -> Result<(), SyncError> {
        self.stats.rumors_received += rumors.len() as u64;
        let entries: Vec<_> = rumors.iter().map(|r| r.entry.clone()).collect();
        let applied = replica
            .apply_remote(now_ms, &entries)
            .map_err(|source| self.refused(from, source))?;
        let left_out: Vec<(Key, Version)> = applied
            .unvouched
            .iter()
            .map(|(k, v, _)| (k.clone(), v.clone()))
            .collect();
        let changes = self.note_unvouched(from, applied, out);
        if self.reconciling.is_none() {
            for r in &rumors {
                let e = &r.entry;
                if !left_out.contains(&(e.key.clone(), e.version.clone())) {
                    replica.advance_chain(&e.version.origin, r.prev, e.version.hlc)?;
                }
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.stats.rumors_applied += changes.len() as u64;
        // Pass on only what was news here; a rumor we already knew dies with us.
        let fresh: Vec<Rumor> = rumors
            .into_iter()
            .filter(|r| changes.iter().any(|c| c.entry == r.entry))
            .collect();
        out.extend(changes.into_iter().map(SyncEffect::Changed));
        if self.cfg.forward_immediately {
            for p in choose(rng, peers, self.cfg.fanout, &[&self.me.id, &from.id]) {
                out.push(SyncEffect::Send(p.clone(), Message::Push(fresh.clone())));
            }
            self.queue(fresh);
        } else {
            self.rumors.extend(
                fresh
                    .into_iter()
                    .map(|r| (r, self.cfg.retransmit_rounds.max(1))),
            );
        }
        Ok(())
    }
}
