//! Dissemination of the store between nodes, as a state machine: messages and ticks in,
//! sends and applied changes out. Two mechanisms, as in proven designs: fresh writes are
//! pushed at once to a few random peers, which pass them on (rumor mongering); and periodic
//! anti-entropy compares digests and repairs whatever the rumors missed. Does no IO and reads
//! no clock.

pub mod message;

use crate::membership::Member;
use crate::store::{Backend, Change, Digest, Hlc, NodeId, Replica, StoreError, Written};
use message::{Message, Range, Rumor};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

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
    /// Pass rumors on as soon as they arrive (true) or only at the next gossip round.
    pub forward_immediately: bool,
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
            forward_immediately: true,
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

#[derive(Debug, Clone)]
pub enum SyncEffect {
    Send(Member, Message),
    Changed(Change),
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
}

pub struct SyncEngine {
    cfg: SyncConfig,
    me: Member,
    /// The latest digest each peer showed us: what it holds, for deltas and collection.
    digests: HashMap<NodeId, Digest>,
    /// Rumors still to be pushed in coming gossip rounds, with rounds left.
    rumors: Vec<(Rumor, u8)>,
    reconciling: Option<NodeId>,
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

    pub fn forget(&mut self, peer: &NodeId) {
        self.digests.remove(peer);
        if self.reconciling.as_ref() == Some(peer) {
            self.reconciling = None;
        }
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

    /// An anti-entropy round: offer our digest to one random peer.
    pub fn on_anti_entropy_tick<B: Backend, R: RngExt>(
        &mut self,
        replica: &Replica<B>,
        peers: &[Member],
        rng: &mut R,
        out: &mut Vec<SyncEffect>,
    ) {
        if self.reconciling.is_some() {
            return;
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
                let reply = self.reply_to(replica, &digest)?;
                let behind = replica.digest().behind_horizon_of(&digest);
                self.digests.insert(from.id.clone(), digest);
                out.push(SyncEffect::Send(from.clone(), reply));
                if behind {
                    self.start_reconcile(from, out);
                }
                Ok(())
            }
            Message::SyncReply { digest, range } => {
                let behind = replica.digest().behind_horizon_of(&digest);
                if behind {
                    self.digests.insert(from.id.clone(), digest);
                    self.start_reconcile(from, out);
                    return Ok(());
                }
                let complete = range.complete;
                self.apply_range(replica, now_ms, from, range, out)?;
                if !digest.behind_horizon_of(replica.digest()) {
                    let delta =
                        replica.delta_for(&digest, self.cfg.max_entries, self.cfg.max_bytes)?;
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
                if self.reconciling.as_ref() != Some(&from.id) {
                    return Ok(());
                }
                let changes = replica
                    .reconcile_page(now_ms, &digest, after.as_ref(), &entries, next.as_ref())
                    .map_err(|source| self.refused(from, source))?;
                self.stats.entries_repaired += changes.len() as u64;
                out.extend(changes.into_iter().map(SyncEffect::Changed));
                match next {
                    Some(after) => out.push(SyncEffect::Send(
                        from.clone(),
                        Message::ReconcileRequest { after: Some(after) },
                    )),
                    None => {
                        self.reconciling = None;
                        self.digests.insert(from.id.clone(), digest);
                    }
                }
                Ok(())
            }
        }
    }

    fn refused(&mut self, from: &Member, source: StoreError) -> SyncError {
        self.stats.refused += 1;
        SyncError::Refused {
            peer: from.id.clone(),
            source,
        }
    }

    fn start_reconcile(&mut self, from: &Member, out: &mut Vec<SyncEffect>) {
        if self.reconciling.is_some() {
            return;
        }
        self.stats.reconciles += 1;
        self.reconciling = Some(from.id.clone());
        out.push(SyncEffect::Send(
            from.clone(),
            Message::ReconcileRequest { after: None },
        ));
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
        let changes = replica
            .apply_remote(now_ms, &range.entries)
            .map_err(|source| self.refused(from, source))?;
        replica.advance(&range.through)?;
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
        let changes = replica
            .apply_remote(now_ms, &entries)
            .map_err(|source| self.refused(from, source))?;
        if self.reconciling.is_none() {
            for r in &rumors {
                replica.advance_chain(&r.entry.version.origin, r.prev, r.entry.version.hlc)?;
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
