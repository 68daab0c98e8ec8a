//! One node of the cluster as a single state machine: membership, dissemination and the
//! replica composed behind one closed set of inputs and effects. The daemon drives it with
//! real sockets and time; the simulation drives the very same code in virtual time.

use crate::membership::{Member, MemberStatus, Membership, MembershipConfig, MembershipEffect};
use crate::store::{Backend, Bytes, Change, Key, NodeId, Replica, StoreError, Written};
use crate::sync::message::{Envelope, Message};
use crate::sync::{ReconcileReport, SyncConfig, SyncEffect, SyncEngine, SyncError};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub sync: SyncConfig,
    pub membership: MembershipConfig,
}

/// Everything that can wake the node up.
#[derive(Debug, Clone)]
pub enum Input {
    Envelope(Envelope),
    Timer(Timer),
}

#[derive(Debug, Clone)]
pub enum Timer {
    Swim(foca::Timer<Member>),
    Gossip,
    AntiEntropy,
    Gc,
}

/// Everything the node asks of its surroundings.
#[derive(Debug, Clone)]
pub enum Effect {
    Send(Member, Envelope),
    Schedule(Duration, Timer),
    Changed(Change),
    MemberUp(Member),
    MemberDown(Member),
    /// A reconcile ended: for the log (warn) and the metrics.
    Reconciled(ReconcileReport),
    /// A peer sent entries without a valid proof; they were left out. For the log (warn).
    Unvouched {
        peer: NodeId,
        entries: Vec<(Key, crate::store::Version, crate::store::Unvouched)>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("membership message from {peer} refused")]
    Membership {
        peer: NodeId,
        #[source]
        source: crate::membership::MembershipError,
    },
}

/// Where the node's peers come from: SWIM membership (always, in the agent), or a fixed list
/// (the large-scale dissemination simulation, which studies sync alone).
pub enum Peers {
    Swim(Box<Membership>),
    Static(Arc<Vec<Member>>),
}

pub struct Node<B: Backend> {
    me: Member,
    replica: Replica<B>,
    sync: SyncEngine,
    peers: Peers,
    /// Live members (possibly including us: every pick skips us), refreshed on membership
    /// changes.
    live: Arc<Vec<Member>>,
    rng: StdRng,
    cfg: NodeConfig,
}

impl<B: Backend> Node<B> {
    /// A node with SWIM membership.
    pub fn new(me: Member, replica: Replica<B>, cfg: NodeConfig, seed: u64) -> Node<B> {
        let membership = Membership::new(me.clone(), &cfg.membership, seed ^ 0x5eed);
        Node::with_peers(me, replica, cfg, seed, Peers::Swim(Box::new(membership)))
    }

    pub fn with_peers(
        me: Member,
        replica: Replica<B>,
        cfg: NodeConfig,
        seed: u64,
        peers: Peers,
    ) -> Node<B> {
        let replica = match cfg.sync.departed_ms {
            0 => replica,
            lease => replica.with_lease(lease),
        };
        let mut node = Node {
            sync: SyncEngine::new(me.clone(), cfg.sync.clone()),
            me,
            replica,
            peers,
            live: Arc::new(Vec::new()),
            rng: StdRng::seed_from_u64(seed),
            cfg,
        };
        node.refresh_live();
        node
    }

    fn refresh_live(&mut self) {
        self.live = match &self.peers {
            Peers::Swim(m) => Arc::new(m.live().cloned().collect()),
            Peers::Static(list) => list.clone(),
        };
    }

    pub fn me(&self) -> &Member {
        &self.me
    }

    pub fn id(&self) -> &NodeId {
        &self.me.id
    }

    pub fn replica(&self) -> &Replica<B> {
        &self.replica
    }

    pub fn sync(&self) -> &SyncEngine {
        &self.sync
    }

    /// The periodic timers; call once after creating the node. Phases are randomised so nodes
    /// started together do not tick together.
    pub fn start(&mut self, out: &mut Vec<Effect>) {
        let s = &self.cfg.sync;
        let jitter =
            |rng: &mut StdRng, ms: u64| Duration::from_millis(rng.random_range(0..ms.max(1)));
        let g = jitter(&mut self.rng, s.gossip_interval_ms);
        let a = jitter(&mut self.rng, s.anti_entropy_interval_ms);
        let c = jitter(&mut self.rng, s.gc_interval_ms);
        out.push(Effect::Schedule(g, Timer::Gossip));
        out.push(Effect::Schedule(a, Timer::AntiEntropy));
        out.push(Effect::Schedule(c, Timer::Gc));
    }

    /// Peers to talk to: live members other than us.
    pub fn peers(&self) -> impl Iterator<Item = &Member> {
        self.live.iter().filter(|m| m.id != self.me.id)
    }

    pub fn members(&self) -> Vec<MemberStatus> {
        let mut v = match &self.peers {
            Peers::Swim(m) => m.status(),
            Peers::Static(list) => list
                .iter()
                .map(|m| MemberStatus {
                    id: m.id.clone(),
                    addr: m.addr.clone(),
                    state: crate::membership::MemberState::Alive,
                    incarnation: 0,
                })
                .collect(),
        };
        v.retain(|m| m.id != self.me.id);
        v
    }

    /// Asks a known peer to let us into its cluster.
    pub fn join(&mut self, peer: Member, out: &mut Vec<Effect>) {
        if peer.id == self.me.id {
            return;
        }
        if let Peers::Swim(m) = &mut self.peers {
            let mut fx = Vec::new();
            m.announce(peer, &mut fx);
            self.membership_effects(fx, out);
        }
    }

    /// Discovery found these members (mDNS, static peers, DNS): join the ones we do not
    /// already count as live, and those that restarted since (a newer generation than the one
    /// we count: the old one may linger as suspect for good once we were renamed ourselves,
    /// and the new process ignores what is addressed to the old). Cheap to call often.
    pub fn discovered(
        &mut self,
        candidates: impl IntoIterator<Item = Member>,
        out: &mut Vec<Effect>,
    ) {
        let fresh: Vec<Member> = candidates
            .into_iter()
            .filter(|c| {
                c.id != self.me.id && !self.live.iter().any(|m| m.id == c.id && m.gen >= c.gen)
            })
            .collect();
        for m in fresh {
            self.join(m, out);
        }
    }

    /// Announces our departure.
    pub fn leave(&mut self, out: &mut Vec<Effect>) {
        if let Peers::Swim(m) = &mut self.peers {
            let mut fx = Vec::new();
            m.leave(&mut fx);
            self.membership_effects(fx, out);
        }
    }

    /// Applies a local write. It is not yet durable nor announced: flush the backend, then
    /// `publish` everything written since the last flush.
    pub fn write(
        &mut self,
        now_ms: u64,
        key: Key,
        value: Option<Bytes>,
    ) -> Result<Written, StoreError> {
        self.replica.write(now_ms, key, value)
    }

    /// A local write proved by `signer` instead of this node's key (an operator's writes).
    pub fn write_signed(
        &mut self,
        now_ms: u64,
        key: Key,
        value: Option<Bytes>,
        signer: &dyn crate::store::Sign,
    ) -> Result<Written, StoreError> {
        self.replica.write_signed(now_ms, key, value, signer)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.replica.flush()
    }

    /// Pushes durable local writes to peers and reports them to watchers.
    pub fn publish(&mut self, written: Vec<Written>, out: &mut Vec<Effect>) {
        let mut fx = Vec::new();
        self.sync
            .publish(&written, &self.live, &mut self.rng, &mut fx);
        self.sync_effects(fx, out);
        out.extend(written.into_iter().map(|w| Effect::Changed(w.change)));
    }

    pub fn handle(
        &mut self,
        now_ms: u64,
        input: Input,
        out: &mut Vec<Effect>,
    ) -> Result<(), NodeError> {
        match input {
            Input::Envelope(env) => self.on_envelope(now_ms, env, out),
            Input::Timer(t) => {
                self.on_timer(now_ms, t, out)?;
                Ok(())
            }
        }
    }

    fn on_envelope(
        &mut self,
        now_ms: u64,
        env: Envelope,
        out: &mut Vec<Effect>,
    ) -> Result<(), NodeError> {
        let Envelope { from, msg } = env;
        if from.id == self.me.id {
            return Ok(());
        }
        if let Message::Swim(data) = &msg {
            if let Peers::Swim(m) = &mut self.peers {
                let mut fx = Vec::new();
                let r = m.handle_data(data, &mut fx);
                self.membership_effects(fx, out);
                r.map_err(|source| NodeError::Membership {
                    peer: from.id.clone(),
                    source,
                })?;
            }
            return Ok(());
        }
        let mut fx = Vec::new();
        let r = self.sync.on_message(
            &mut self.replica,
            now_ms,
            &from,
            msg,
            &self.live,
            &mut self.rng,
            &mut fx,
        );
        self.sync_effects(fx, out);
        r.map_err(NodeError::from)
    }

    fn on_timer(&mut self, now_ms: u64, t: Timer, out: &mut Vec<Effect>) -> Result<(), StoreError> {
        let s = self.cfg.sync.clone();
        match t {
            Timer::Swim(t) => {
                if let Peers::Swim(m) = &mut self.peers {
                    let mut fx = Vec::new();
                    m.handle_timer(t, &mut fx);
                    self.membership_effects(fx, out);
                }
            }
            Timer::Gossip => {
                let mut fx = Vec::new();
                self.sync.on_gossip_tick(&self.live, &mut self.rng, &mut fx);
                self.sync_effects(fx, out);
                out.push(Effect::Schedule(
                    Duration::from_millis(s.gossip_interval_ms),
                    Timer::Gossip,
                ));
            }
            Timer::AntiEntropy => {
                let mut fx = Vec::new();
                self.sync.on_anti_entropy_tick(
                    &self.replica,
                    now_ms,
                    &self.live,
                    &mut self.rng,
                    &mut fx,
                );
                self.sync_effects(fx, out);
                // ±25 % jitter keeps rounds from synchronising across the cluster.
                let base = s.anti_entropy_interval_ms.max(4);
                let next = base * 3 / 4 + self.rng.random_range(0..base / 2);
                out.push(Effect::Schedule(
                    Duration::from_millis(next),
                    Timer::AntiEntropy,
                ));
            }
            Timer::Gc => {
                let mut live: Vec<NodeId> = self.peers().map(|m| m.id.clone()).collect();
                live.push(self.me.id.clone());
                let r = self.sync.on_gc_tick(&mut self.replica, now_ms, &live);
                out.push(Effect::Schedule(
                    Duration::from_millis(s.gc_interval_ms),
                    Timer::Gc,
                ));
                r?;
                self.renew_leases(now_ms, out)?;
            }
        }
        Ok(())
    }

    /// Owner-only records as leases (`SyncConfig::departed_ms`): this node's own are written
    /// again before they age, departed nodes' are dropped (and watchers told).
    fn renew_leases(&mut self, now_ms: u64, out: &mut Vec<Effect>) -> Result<(), StoreError> {
        const PER_TICK: usize = 4096;
        let renewed = self.replica.refresh_own(now_ms, PER_TICK)?;
        if !renewed.is_empty() {
            // Published only once durable, like every write.
            self.replica.flush()?;
            self.publish(renewed, out);
        }
        let gone = self.replica.expire_departed(now_ms, PER_TICK)?;
        out.extend(gone.into_iter().map(Effect::Changed));
        Ok(())
    }

    fn sync_effects(&mut self, fx: Vec<SyncEffect>, out: &mut Vec<Effect>) {
        for e in fx {
            match e {
                SyncEffect::Send(to, msg) => out.push(Effect::Send(
                    to,
                    Envelope {
                        from: self.me.clone(),
                        msg,
                    },
                )),
                SyncEffect::Changed(c) => out.push(Effect::Changed(c)),
                SyncEffect::Reconciled(r) => out.push(Effect::Reconciled(r)),
                SyncEffect::Unvouched { peer, entries } => {
                    out.push(Effect::Unvouched { peer, entries })
                }
            }
        }
    }

    fn membership_effects(&mut self, fx: Vec<MembershipEffect>, out: &mut Vec<Effect>) {
        let changed = fx.iter().any(|e| {
            matches!(
                e,
                MembershipEffect::Up(_) | MembershipEffect::Down(_) | MembershipEffect::Renamed(_)
            )
        });
        for e in fx {
            match e {
                MembershipEffect::Send(to, data) => out.push(Effect::Send(
                    to,
                    Envelope {
                        from: self.me.clone(),
                        msg: Message::Swim(data.into()),
                    },
                )),
                MembershipEffect::Schedule(after, t) => {
                    out.push(Effect::Schedule(after, Timer::Swim(t)))
                }
                MembershipEffect::Up(m) => out.push(Effect::MemberUp(m)),
                MembershipEffect::Down(m) => {
                    let mut fx = Vec::new();
                    self.sync.forget(&m.id, &mut fx);
                    self.sync_effects(fx, out);
                    out.push(Effect::MemberDown(m));
                }
                MembershipEffect::Renamed(m) => {
                    self.me = m.clone();
                    self.sync.set_me(m);
                }
            }
        }
        if changed {
            self.refresh_live();
        }
    }
}
