//! A deterministic discrete-event simulation of a whole cluster in one process: the real
//! `Node` state machines over a simulated network (latency, loss, duplication, reordering,
//! partitions) and simulated clocks (per-node skew), with crashes that lose unflushed data and
//! restarts. Everything is derived from one seed, so a failing run replays exactly.
//!
//! Nodes listed in `SimConfig::byzantine` run the honest code but lie in everything they
//! send about the store: digests with collection horizons as recent as looks plausible (or at
//! the top of the clock), and reconcile pages that hold nothing, the sequence that once
//! emptied a real cluster. They also slip forged entries into what they push: another node's
//! task records and apps with no operator's signature.
//!
//! Proofs are keyed hashes (`SimProofs`), not signatures: the simulation checks who may write
//! what, at a cost a 10 000-node run can pay; real signatures are measured in the benches.

use crate::membership::Member;
use crate::node::{Effect, Input, Node, NodeConfig, Peers, Timer};
use crate::store::vouch::{Lookup, Proof, Sign, Unvouched, Vouch, Writer};
use crate::store::{Bytes, Digest, Entry, Hlc, Key, MemBackend, NodeId, Replica, Version};
use crate::sync::message::{self, Message, Range};
use crate::sync::ReconcileReport;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;

/// Wall-clock time at the start of every simulation, in ms since the epoch.
pub const EPOCH_MS: u64 = 1_700_000_000_000;
/// How often a simulated node hears of another through discovery.
const DISCOVERY_US: u64 = 2_000_000;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub nodes: usize,
    pub seed: u64,
    /// One-way latency, uniform in this range, in microseconds.
    pub latency_us: (u64, u64),
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Each node's clock is off by up to this much, either way.
    pub max_skew_ms: u64,
    /// SWIM membership (true) or every node knowing every other from the start.
    pub swim: bool,
    pub node: NodeConfig,
    /// Nodes that lie about the store in every sync message they send.
    pub byzantine: Vec<usize>,
    /// Whom each node's discovery can find (static peers); `None`: anyone (mDNS on a LAN).
    pub discovery: Option<Vec<Vec<usize>>>,
}

impl SimConfig {
    pub fn new(nodes: usize, seed: u64) -> SimConfig {
        SimConfig {
            nodes,
            seed,
            latency_us: (500, 5_000),
            loss: 0.0,
            duplicate: 0.0,
            max_skew_ms: 0,
            swim: true,
            node: NodeConfig::default(),
            byzantine: Vec::new(),
            discovery: None,
        }
    }
}

enum Event {
    Deliver {
        to: usize,
        bytes: Vec<u8>,
    },
    /// What mDNS does on a LAN: the node learns of one random node and joins it if new.
    Discover {
        node: usize,
        epoch: u64,
    },
    Timer {
        node: usize,
        epoch: u64,
        timer: Timer,
    },
}

struct Scheduled {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct SimNode {
    id: NodeId,
    node: Option<Node<MemBackend>>,
    backend: MemBackend,
    gen: u64,
    epoch: u64,
    skew_ms: i64,
    group: u32,
    /// Hears nothing while it still sends (a process whose listener closed first).
    deaf: bool,
}

/// An acknowledged write: durable on its origin when the writer was told it succeeded.
#[derive(Debug, Clone)]
pub struct Acked {
    pub key: Key,
    pub version: Version,
    pub value: Option<Bytes>,
    pub at_us: u64,
}

pub struct Sim {
    cfg: SimConfig,
    now_us: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    nodes: Vec<SimNode>,
    index: HashMap<NodeId, usize>,
    rng: StdRng,
    static_peers: Arc<Vec<Member>>,
    /// Bytes each node has sent.
    pub bytes_sent: Vec<u64>,
    pub messages_sent: u64,
    pub messages_refused: u64,
    /// First time each node applied a change to a watched key.
    watched: HashMap<Key, Vec<Option<u64>>>,
    /// (time, observer, member) for every member declared down.
    pub downs: Vec<(u64, usize, NodeId)>,
    pub history: Vec<Acked>,
    /// Every reconcile that ended, by the node that ran it.
    pub reconciles: Vec<(usize, ReconcileReport)>,
    /// Sync messages the byzantine nodes forged.
    pub forged: u64,
    /// Entries honest nodes left out for a bad proof, and the reports of them.
    pub unvouched: u64,
}

/// The simulation's proofs: SHA-256 of a per-writer secret and the signed bytes. Every node's
/// secret derives from the seed and its id; the operator's from the seed alone. Nodes check
/// with the secrets (the simulation knows them all); a byzantine node signs with its own.
#[derive(Clone)]
pub struct SimProofs {
    seed: u64,
    /// Whose proofs this makes: a node, or (`None`) the operator.
    me: Option<NodeId>,
}

impl SimProofs {
    pub fn node(seed: u64, me: NodeId) -> SimProofs {
        SimProofs { seed, me: Some(me) }
    }

    pub fn operator(seed: u64) -> SimProofs {
        SimProofs { seed, me: None }
    }

    fn mac(&self, writer: Option<&NodeId>, e: &Entry) -> Bytes {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&self.seed.to_be_bytes());
        ctx.update(writer.map_or(b"operator".as_slice(), |n| n.as_str().as_bytes()));
        ctx.update(&e.signed_bytes());
        Bytes::from(ctx.finish().as_ref().to_vec())
    }
}

impl Sign for SimProofs {
    fn prove(&self, e: &Entry) -> Proof {
        Proof {
            sig: self.mac(self.me.as_ref(), e),
            cert: None,
        }
    }
}

impl Vouch for SimProofs {
    fn check(&mut self, e: &Entry, _: &mut Lookup<'_>) -> Result<(), Unvouched> {
        let (writer, why) = match e.key.writer(&e.version.origin) {
            Writer::Operator => (None, Unvouched::NotOperator),
            Writer::Node(n) => (
                Some(n.clone()),
                Unvouched::Forged {
                    signer: n,
                    reason: "the proof does not verify".into(),
                },
            ),
        };
        if e.proof.sig == self.mac(writer.as_ref(), e) {
            Ok(())
        } else {
            Err(why)
        }
    }
}

fn member(i: usize, gen: u64) -> Member {
    Member::new(
        NodeId::new(&format!("n{i}")).unwrap_or_else(|_| unreachable!()),
        format!("sim:{i}"),
        gen,
    )
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let static_peers: Arc<Vec<Member>> =
            Arc::new((0..cfg.nodes).map(|i| member(i, 1)).collect());
        let mut sim = Sim {
            now_us: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: Vec::with_capacity(cfg.nodes),
            index: HashMap::new(),
            bytes_sent: vec![0; cfg.nodes],
            messages_sent: 0,
            messages_refused: 0,
            watched: HashMap::new(),
            downs: Vec::new(),
            history: Vec::new(),
            reconciles: Vec::new(),
            forged: 0,
            unvouched: 0,
            static_peers,
            rng: StdRng::seed_from_u64(0),
            cfg: cfg.clone(),
        };
        for i in 0..cfg.nodes {
            let skew = if cfg.max_skew_ms > 0 {
                rng.random_range(-(cfg.max_skew_ms as i64)..=cfg.max_skew_ms as i64)
            } else {
                0
            };
            let id = member(i, 1).id;
            sim.index.insert(id.clone(), i);
            sim.nodes.push(SimNode {
                id,
                node: None,
                backend: MemBackend::new(),
                gen: 0,
                epoch: 0,
                skew_ms: skew,
                group: 0,
                deaf: false,
            });
        }
        sim.rng = rng;
        for i in 0..cfg.nodes {
            sim.boot(i);
        }
        sim
    }

    pub fn now_ms(&self) -> u64 {
        self.now_us / 1000
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].node.is_some()
    }

    pub fn node(&self, i: usize) -> Option<&Node<MemBackend>> {
        self.nodes[i].node.as_ref()
    }

    /// Node `i`'s wall clock now (virtual time plus its skew), in ms since the epoch.
    pub fn wall_clock_of(&self, i: usize) -> u64 {
        self.wall_ms(i)
    }

    fn wall_ms(&self, i: usize) -> u64 {
        (EPOCH_MS as i64 + self.now_ms() as i64 + self.nodes[i].skew_ms) as u64
    }

    fn boot(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.gen += 1;
        n.epoch += 1;
        let me = member(i, n.gen);
        let replica = match Replica::open(n.id.clone(), n.backend.clone()) {
            Ok(r) => r,
            Err(e) => panic!("replica n{i} failed to reopen: {e}"),
        };
        let proofs = SimProofs::node(self.cfg.seed, n.id.clone());
        let replica = replica.with_proofs(Arc::new(proofs.clone()), Box::new(proofs));
        let seed = self.cfg.seed ^ ((i as u64) << 20) ^ n.gen;
        let mut node = if self.cfg.swim {
            Node::new(me, replica, self.cfg.node.clone(), seed)
        } else {
            Node::with_peers(
                me,
                replica,
                self.cfg.node.clone(),
                seed,
                Peers::Static(self.static_peers.clone()),
            )
        };
        let mut out = Vec::new();
        node.start(&mut out);
        if self.cfg.swim {
            // Join through a random live node, as a node with a static peer list would.
            let up: Vec<usize> = (0..self.nodes.len())
                .filter(|&j| j != i && self.is_up(j))
                .filter(|j| {
                    self.cfg
                        .discovery
                        .as_ref()
                        .is_none_or(|d| d.get(i).is_some_and(|d| d.contains(j)))
                })
                .collect();
            if !up.is_empty() {
                let j = up[self.rng.random_range(0..up.len())];
                if let Some(peer) = self.nodes[j].node.as_ref().map(|n| n.me().clone()) {
                    node.join(peer, &mut out);
                }
            }
        }
        self.nodes[i].node = Some(node);
        self.apply_effects(i, out);
        if self.cfg.swim {
            let at = self.now_us + self.rng.random_range(0..DISCOVERY_US);
            let epoch = self.nodes[i].epoch;
            self.schedule(at, Event::Discover { node: i, epoch });
        }
    }

    /// Kills node `i`: everything it had not flushed is lost, its timers and messages die.
    pub fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.node = None;
        n.epoch += 1;
        n.backend.crash();
    }

    pub fn restart(&mut self, i: usize) {
        if !self.is_up(i) {
            self.boot(i);
        }
    }

    /// Splits the network: nodes only reach nodes of their own group.
    pub fn partition(&mut self, groups: &[&[usize]]) {
        for (g, members) in groups.iter().enumerate() {
            for &i in *members {
                self.nodes[i].group = g as u32 + 1;
            }
        }
    }

    /// Node `i` stops hearing anything (or hears again), while what it sends still arrives.
    pub fn deafen(&mut self, i: usize, deaf: bool) {
        self.nodes[i].deaf = deaf;
    }

    pub fn heal(&mut self) {
        for n in &mut self.nodes {
            n.group = 0;
        }
    }

    /// Records when each node first applies a change to `key`.
    pub fn watch(&mut self, key: &Key) {
        self.watched
            .insert(key.clone(), vec![None; self.nodes.len()]);
    }

    /// Per node, the simulated time (µs) it first applied a change to a watched key.
    pub fn seen(&self, key: &Key) -> &[Option<u64>] {
        self.watched.get(key).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// A client write on node `i`, acknowledged once flushed, as the agent does: desired
    /// state signed by the operator, a node's own keys by the node.
    pub fn write(&mut self, i: usize, key: Key, value: Option<Bytes>) -> Option<Version> {
        let wall = self.wall_ms(i);
        let seed = self.cfg.seed;
        let node = self.nodes[i].node.as_mut()?;
        let w = match key.writer(node.id()) {
            Writer::Operator => node
                .write_signed(wall, key, value, &SimProofs::operator(seed))
                .ok()?,
            Writer::Node(_) => node.write(wall, key, value).ok()?,
        };
        node.flush().ok()?;
        let version = w.change.entry.version.clone();
        self.history.push(Acked {
            key: w.change.entry.key.clone(),
            version: version.clone(),
            value: w.change.entry.value.clone(),
            at_us: self.now_us,
        });
        let mut out = Vec::new();
        node.publish(vec![w], &mut out);
        self.apply_effects(i, out);
        Some(version)
    }

    /// Reads a key on node `i` (tombstones read as absent).
    pub fn read(&self, i: usize, key: &Key) -> Option<Entry> {
        let e = self.nodes[i].node.as_ref()?.replica().get(key).ok()??;
        (!e.is_tombstone()).then_some(e)
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            event,
        }));
    }

    fn apply_effects(&mut self, i: usize, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Reconciled(r) => self.reconciles.push((i, r)),
                Effect::Unvouched { entries, .. } => self.unvouched += entries.len() as u64,
                Effect::Send(to, mut env) => {
                    let Some(&j) = self.index.get(&to.id) else {
                        continue;
                    };
                    if self.cfg.byzantine.contains(&i) {
                        env.msg = self.forge(i, env.msg);
                    }
                    let bytes = message::encode(&env);
                    self.bytes_sent[i] += bytes.len() as u64;
                    self.messages_sent += 1;
                    if self.nodes[i].group != self.nodes[j].group
                        || self.nodes[j].deaf
                        || self.rng.random_bool(self.cfg.loss)
                    {
                        continue;
                    }
                    let copies = if self.rng.random_bool(self.cfg.duplicate) {
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        let (lo, hi) = self.cfg.latency_us;
                        let at = self.now_us + self.rng.random_range(lo..=hi.max(lo));
                        self.schedule(
                            at,
                            Event::Deliver {
                                to: j,
                                bytes: bytes.clone(),
                            },
                        );
                    }
                }
                Effect::Schedule(after, timer) => {
                    let at = self.now_us + after.as_micros() as u64;
                    let epoch = self.nodes[i].epoch;
                    self.schedule(
                        at,
                        Event::Timer {
                            node: i,
                            epoch,
                            timer,
                        },
                    );
                }
                Effect::Changed(c) => {
                    let now = self.now_us;
                    if let Some(seen) = self.watched.get_mut(&c.entry.key) {
                        seen[i].get_or_insert(now);
                    }
                }
                Effect::MemberDown(m) => self.downs.push((self.now_us, i, m.id)),
                Effect::MemberUp(_) => {}
            }
        }
    }

    /// What a byzantine node sends instead of `msg`: its own digest with every collection
    /// horizon pulled up to the most recent a peer's clock allows (a third of the time, to the
    /// top of the clock), and reconcile pages that hold nothing and end the comparison.
    fn forge(&mut self, i: usize, msg: Message) -> Message {
        let Some(node) = self.nodes[i].node.as_ref() else {
            return msg;
        };
        let mut d: Digest = node.replica().digest().clone();
        if self.rng.random_range(0..3) == 0 {
            for w in d.watermarks.values_mut() {
                *w = Hlc(u64::MAX);
            }
            d.collected = d.watermarks.clone();
        } else {
            let horizon = Hlc::from_millis(
                self.wall_ms(i)
                    .saturating_sub(self.cfg.node.sync.tombstone_min_age_ms),
            );
            for w in d.watermarks.values_mut() {
                *w = (*w).max(horizon);
            }
            d.collected = d.watermarks.keys().map(|o| (o.clone(), horizon)).collect();
        }
        let forged = match msg {
            Message::SyncRequest(_) => Message::SyncRequest(d),
            Message::SyncReply { .. } => Message::SyncReply {
                digest: d,
                range: Range {
                    complete: true,
                    ..Range::default()
                },
            },
            Message::ReconcileReply { .. } => Message::ReconcileReply {
                digest: d,
                after: None,
                entries: Vec::new(),
                next: None,
            },
            // Rumors carry forgeries: a victim's task record and an app, signed by the liar.
            Message::Push(mut rumors) => {
                let victim = self.rng.random_range(0..self.nodes.len());
                let liar = self.nodes[i].id.clone();
                let hlc = Hlc::from_millis(self.wall_ms(i));
                for key in [
                    format!("tasks/n{victim}/forged/0"),
                    "apps/forged".to_string(),
                ] {
                    let Ok(key) = Key::parse(&key) else { continue };
                    let mut entry = Entry {
                        key,
                        version: Version {
                            hlc,
                            origin: NodeId::new(&format!("n{victim}")).unwrap_or(liar.clone()),
                        },
                        value: Some(Bytes::from_static(b"forged")),
                        proof: Proof::default(),
                    };
                    entry.proof = SimProofs::node(self.cfg.seed, liar.clone()).prove(&entry);
                    rumors.push(message::Rumor { entry, prev: hlc });
                }
                Message::Push(rumors)
            }
            other => return other,
        };
        self.forged += 1;
        forged
    }

    fn discover(&mut self, i: usize) {
        let j = match &self.cfg.discovery {
            None => self.rng.random_range(0..self.nodes.len()),
            Some(d) => match d.get(i).filter(|d| !d.is_empty()) {
                Some(d) => d[self.rng.random_range(0..d.len())],
                None => i,
            },
        };
        let found = self.nodes[j].node.as_ref().map(|n| n.me().clone());
        let mut out = Vec::new();
        if let (Some(found), Some(node)) = (found, self.nodes[i].node.as_mut()) {
            node.discovered([found], &mut out);
        }
        self.apply_effects(i, out);
        let at = self.now_us + DISCOVERY_US;
        let epoch = self.nodes[i].epoch;
        self.schedule(at, Event::Discover { node: i, epoch });
    }

    /// Runs the next event; false when nothing is left.
    pub fn step(&mut self) -> bool {
        let Some(Reverse(s)) = self.queue.pop() else {
            return false;
        };
        self.now_us = s.at;
        let (i, input) = match s.event {
            Event::Deliver { to, bytes } => {
                let env = match message::decode(&bytes) {
                    Ok(env) => env,
                    Err(e) => panic!("the simulation produced an undecodable message: {e}"),
                };
                (to, Input::Envelope(env))
            }
            Event::Timer { node, epoch, timer } => {
                if self.nodes[node].epoch != epoch {
                    return true;
                }
                (node, Input::Timer(timer))
            }
            Event::Discover { node, epoch } => {
                if self.nodes[node].epoch == epoch {
                    self.discover(node);
                }
                return true;
            }
        };
        let wall = self.wall_ms(i);
        let Some(node) = self.nodes[i].node.as_mut() else {
            return true;
        };
        let mut out = Vec::new();
        if node.handle(wall, input, &mut out).is_err() {
            self.messages_refused += 1;
        }
        self.apply_effects(i, out);
        true
    }

    pub fn run_until_us(&mut self, t: u64) {
        while self.queue.peek().is_some_and(|Reverse(s)| s.at <= t) {
            self.step();
        }
        self.now_us = self.now_us.max(t);
    }

    pub fn run_for_ms(&mut self, ms: u64) {
        self.run_until_us(self.now_us + ms * 1000);
    }

    /// Runs until `done` holds, checking every `every_ms`; returns the time it took (µs) or
    /// `None` at the deadline.
    pub fn run_until(
        &mut self,
        deadline_ms: u64,
        every_ms: u64,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Option<u64> {
        let start = self.now_us;
        let end = start + deadline_ms * 1000;
        while self.now_us < end {
            if done(self) {
                return Some(self.now_us - start);
            }
            self.run_until_us((self.now_us + every_ms * 1000).min(end));
        }
        done(self).then(|| self.now_us - start)
    }

    /// Whether every live node holds the same state (tombstones aside: collection may lag).
    pub fn converged(&self) -> bool {
        let mut first: Option<BTreeMap<Key, (Version, Option<Bytes>)>> = None;
        for i in 0..self.nodes.len() {
            let Some(n) = self.nodes[i].node.as_ref() else {
                continue;
            };
            let mut state = BTreeMap::new();
            let mut after = None;
            loop {
                let Ok((page, next)) = n.replica().snapshot_page(after.as_ref(), 1024) else {
                    return false;
                };
                for e in page.into_iter().filter(|e| !e.is_tombstone()) {
                    state.insert(e.key, (e.version, e.value));
                }
                match next {
                    Some(k) => after = Some(k),
                    None => break,
                }
            }
            match &first {
                None => first = Some(state),
                Some(f) if *f != state => return false,
                Some(_) => {}
            }
        }
        true
    }

    /// Checks every live node against the history of acknowledged writes: each key holds its
    /// highest acknowledged version (a deleted key holds nothing), and no value comes from
    /// nowhere.
    pub fn check_history(&self) -> Result<(), String> {
        let mut last: BTreeMap<&Key, &Acked> = BTreeMap::new();
        for a in &self.history {
            let slot = last.entry(&a.key).or_insert(a);
            if a.version > slot.version {
                *slot = a;
            }
        }
        for i in 0..self.nodes.len() {
            if !self.is_up(i) {
                continue;
            }
            for (key, a) in &last {
                let held = self.read(i, key);
                match (&a.value, held) {
                    (None, None) => {}
                    (None, Some(e)) => {
                        return Err(format!(
                            "n{i}: {key} was deleted at {} but holds {}",
                            a.version, e.version
                        ));
                    }
                    (Some(_), None) => {
                        return Err(format!("n{i}: {key} lost its write at {}", a.version))
                    }
                    (Some(v), Some(e)) => {
                        if e.version != a.version || e.value.as_ref() != Some(v) {
                            return Err(format!(
                                "n{i}: {key} holds {} instead of {}",
                                e.version, a.version
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Members node `i` currently sees alive (not suspect).
    pub fn alive_view(&self, i: usize) -> Vec<NodeId> {
        self.nodes[i]
            .node
            .as_ref()
            .map(|n| {
                n.members()
                    .into_iter()
                    .filter(|m| m.state == crate::membership::MemberState::Alive)
                    .map(|m| m.id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Members node `i` currently sees as live.
    pub fn live_view(&self, i: usize) -> Vec<NodeId> {
        self.nodes[i]
            .node
            .as_ref()
            .map(|n| n.peers().map(|m| m.id.clone()).collect())
            .unwrap_or_default()
    }
}
