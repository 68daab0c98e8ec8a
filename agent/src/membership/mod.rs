//! Membership and failure detection: SWIM through `foca`, wrapped so that its sends, timers
//! and notifications come out as plain values. No sockets and no clock here.

use crate::store::NodeId;
use foca::{
    AccumulatingRuntime, Config, Foca, NoCustomBroadcast, OwnedNotification, PostcardCodec, State,
    Timer,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

/// A member's identity: its node id, the address peers reach it at, and a generation that
/// grows on every restart (and on rejoining after being declared down), so a restarted node
/// wins over its previous self.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub addr: String,
    pub gen: u64,
}

impl Member {
    pub fn new(id: NodeId, addr: String, gen: u64) -> Member {
        Member { id, addr, gen }
    }
}

impl foca::Identity for Member {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(Member {
            gen: self.gen + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> NodeId {
        self.id.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.gen > adversary.gen
    }
}

/// What the membership layer asks of its surroundings.
#[derive(Debug, Clone)]
pub enum MembershipEffect {
    Send(Member, Vec<u8>),
    Schedule(Duration, Timer<Member>),
    Up(Member),
    Down(Member),
    /// This node was declared down by others and rejoined under a new generation.
    Renamed(Member),
}

/// Timings of the failure detector. The defaults target a LAN: a dead member is declared down
/// everywhere within about 3 s in clusters of up to 100 nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MembershipConfig {
    pub probe_period_ms: u64,
    pub probe_rtt_ms: u64,
    pub suspect_to_down_ms: u64,
    pub indirect_probes: usize,
    pub gossip_period_ms: u64,
    pub gossip_members: usize,
    /// Expected cluster size, used to size update dissemination.
    pub expected_size: u32,
    /// How often to try one member we consider down, in case it is back.
    pub announce_to_down_ms: u64,
    /// Each membership update is passed on `ceil(multiplier * log10(n + 1))` times, with `n`
    /// the live cluster size. foca's LAN default is 4; at 10 % loss that leaves a node ~e^-7
    /// likely to miss a refutation entirely, which turns suspicions into false deaths.
    pub transmit_multiplier: f64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            probe_period_ms: 400,
            probe_rtt_ms: 200,
            suspect_to_down_ms: 1200,
            indirect_probes: 5,
            gossip_period_ms: 200,
            gossip_members: 3,
            expected_size: 100,
            announce_to_down_ms: 3000,
            transmit_multiplier: 10.0,
        }
    }
}

impl MembershipConfig {
    /// The foca configuration for a cluster of about `size` live members. Suspicion lasts
    /// `suspect_to_down_ms` up to 100 members and grows with log10(size) beyond, since updates
    /// need more hops to reach everyone.
    fn foca(&self, size: u32) -> Config {
        let size = size.max(self.expected_size).max(1);
        let mut c = Config::new_lan(NonZeroU32::new(size).unwrap_or(NonZeroU32::MIN));
        let tx = (self.transmit_multiplier * f64::from(size + 1).log10()).ceil();
        c.max_transmissions = std::num::NonZeroU8::new(tx.clamp(1.0, 255.0) as u8)
            .unwrap_or(std::num::NonZeroU8::MIN);
        let stretch = (f64::from(size).log10() / 2.0).max(1.0);
        c.probe_period = Duration::from_millis(self.probe_period_ms.max(2));
        c.probe_rtt =
            Duration::from_millis(self.probe_rtt_ms.clamp(1, self.probe_period_ms.max(2) - 1));
        c.suspect_to_down_after =
            Duration::from_millis((self.suspect_to_down_ms.max(1) as f64 * stretch) as u64);
        c.num_indirect_probes =
            NonZeroUsize::new(self.indirect_probes.max(1)).unwrap_or(NonZeroUsize::MIN);
        c.max_packet_size = NonZeroUsize::new(16 * 1024).unwrap_or(NonZeroUsize::MIN);
        // Members on the far side of a healed partition were declared down on both sides;
        // re-announcing to down members every few seconds brings them back without waiting
        // for discovery.
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(self.announce_to_down_ms.max(1)),
            num_members: NonZeroUsize::MIN,
        });
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(self.gossip_period_ms.max(1)),
            num_members: NonZeroUsize::new(self.gossip_members.max(1)).unwrap_or(NonZeroUsize::MIN),
        });
        c
    }
}

#[derive(Debug, thiserror::Error)]
#[error("membership: {0}")]
pub struct MembershipError(String);

/// What SWIM says of a member (`/v1/status` shows it in lowercase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    /// Missed its probes; others are asked to vouch for it before it is declared dead.
    Suspect,
    Dead,
}

impl MemberState {
    /// Alive or suspect: still counted on (it runs its tasks, it takes messages).
    pub fn is_live(self) -> bool {
        self != MemberState::Dead
    }

    pub fn name(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
        }
    }
}

/// A member as the status endpoint shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub id: NodeId,
    pub addr: String,
    pub state: MemberState,
    pub incarnation: u16,
}

pub struct Membership {
    foca: Foca<Member, PostcardCodec, StdRng, NoCustomBroadcast>,
    rt: AccumulatingRuntime<Member>,
    config: MembershipConfig,
    /// The cluster size the current foca configuration was made for.
    sized_for: u32,
}

impl Membership {
    pub fn new(me: Member, config: &MembershipConfig, seed: u64) -> Membership {
        Membership {
            foca: Foca::new(
                me,
                config.foca(config.expected_size),
                StdRng::seed_from_u64(seed),
                PostcardCodec,
            ),
            rt: AccumulatingRuntime::new(),
            config: config.clone(),
            sized_for: config.expected_size,
        }
    }

    /// Re-sizes dissemination and suspicion when the cluster has grown past (or shrunk well
    /// below) what the configuration was made for.
    fn resize(&mut self) {
        let n = self.foca.iter_members().count() as u32 + 1;
        let shrunk = n < self.sized_for / 4 && self.sized_for > self.config.expected_size;
        if n > self.sized_for || shrunk {
            let target = n.next_power_of_two().max(self.config.expected_size);
            if let Err(e) = self.foca.set_config(self.config.foca(target)) {
                tracing::warn!(%e, "cannot resize membership configuration");
                return;
            }
            self.sized_for = target;
        }
    }

    pub fn me(&self) -> &Member {
        self.foca.identity()
    }

    /// Members currently considered alive or suspect.
    pub fn live(&self) -> impl Iterator<Item = &Member> {
        self.foca.iter_members().map(|m| m.id())
    }

    pub fn status(&self) -> Vec<MemberStatus> {
        self.foca
            .iter_membership_state()
            .map(|m| MemberStatus {
                id: m.id().id.clone(),
                addr: m.id().addr.clone(),
                state: match m.state() {
                    State::Alive => MemberState::Alive,
                    State::Suspect => MemberState::Suspect,
                    State::Down => MemberState::Dead,
                },
                incarnation: m.incarnation(),
            })
            .collect()
    }

    pub fn handle_data(
        &mut self,
        data: &[u8],
        out: &mut Vec<MembershipEffect>,
    ) -> Result<(), MembershipError> {
        let r = self.foca.handle_data(data, &mut self.rt);
        self.drain(out);
        r.map_err(|e| MembershipError(e.to_string()))
    }

    pub fn handle_timer(&mut self, t: Timer<Member>, out: &mut Vec<MembershipEffect>) {
        if let Err(e) = self.foca.handle_timer(t, &mut self.rt) {
            tracing::debug!(%e, "membership timer");
        }
        self.drain(out);
    }

    /// Asks `peer` to let us in; it answers with its view of the cluster.
    pub fn announce(&mut self, peer: Member, out: &mut Vec<MembershipEffect>) {
        if let Err(e) = self.foca.announce(peer, &mut self.rt) {
            tracing::debug!(%e, "membership announce");
        }
        self.drain(out);
    }

    /// Tells the cluster we are leaving, so nobody has to detect it.
    pub fn leave(&mut self, out: &mut Vec<MembershipEffect>) {
        if let Err(e) = self.foca.leave_cluster(&mut self.rt) {
            tracing::debug!(%e, "membership leave");
        }
        self.drain(out);
    }

    fn drain(&mut self, out: &mut Vec<MembershipEffect>) {
        let before = out.len();
        while let Some((to, data)) = self.rt.to_send() {
            out.push(MembershipEffect::Send(to, data.to_vec()));
        }
        while let Some((after, t)) = self.rt.to_schedule() {
            out.push(MembershipEffect::Schedule(after, t));
        }
        while let Some(n) = self.rt.to_notify() {
            match n {
                OwnedNotification::MemberUp(m) => out.push(MembershipEffect::Up(m)),
                OwnedNotification::MemberDown(m) => out.push(MembershipEffect::Down(m)),
                OwnedNotification::Rename(_, m) => out.push(MembershipEffect::Up(m)),
                OwnedNotification::Rejoin(m) => out.push(MembershipEffect::Renamed(m)),
                _ => {}
            }
        }
        if out[before..]
            .iter()
            .any(|e| matches!(e, MembershipEffect::Up(_) | MembershipEffect::Down(_)))
        {
            self.resize();
        }
    }
}
