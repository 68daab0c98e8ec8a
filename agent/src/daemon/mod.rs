//! The agent process: the tokio shell around the sans-IO `Node`. It owns the sockets, the
//! clock and the disk: peer messages and timers go in, effects come out and are carried out
//! here. One task (the core loop) owns the node; everything else talks to it by message.

pub mod agent;
pub mod bootstrap;
pub mod testing;

use crate::clock::{wall_ms, ClockWatch};
use crate::config::AgentConfig;
use crate::identity::vouch::OperatorKey;
use crate::identity::Trust;
use crate::membership::Member;
use crate::node::{Effect, Input, Node, Timer};
use crate::peer;
use crate::state::{Command, Counters, Handle, Snapshot, StateError};
use crate::store::entry::check_write;
use crate::store::{
    Bytes, Change, DiskBackend, Key, NodeId, Replica, Sign, StoreError, Version, Vouch, Writer,
};
use crate::tls::Tls;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;

/// Runs disk work from the core loop: off the worker's queue on a multi-threaded runtime;
/// in place on a single-threaded one (tests with paused time), where there is nobody to wait.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The store is rewritten when its files exceed this multiple of the live data.
const COMPACT_RATIO: f64 = 3.0;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot open the store under {path}")]
    Store {
        path: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Mdns(#[from] crate::discovery::mdns::MdnsError),
    #[error("the agent is shutting down")]
    Stopped,
    #[error(transparent)]
    State(#[from] StateError),
}

/// What the node trusts and presents, handed to `start`.
pub struct Security {
    pub tls: Tls,
    pub trust: Arc<Trust>,
    /// Proves this node's writes.
    pub signer: Arc<dyn Sign>,
    /// Checks the proofs of peers' entries.
    pub vouch: Box<dyn Vouch>,
}

/// Carries out the node's effects.
struct Effects {
    timers: DelayQueue<Timer>,
    peers: peer::PeerClient,
    changes: broadcast::Sender<Change>,
    /// Bumped when a member comes up or goes down (`Handle::members`).
    members: tokio::sync::watch::Sender<u64>,
}

impl Effects {
    fn run(&mut self, effects: &mut Vec<Effect>) {
        for e in effects.drain(..) {
            match e {
                Effect::Send(to, env) => self.peers.send(&to.addr, &env),
                Effect::Schedule(after, t) => {
                    self.timers.insert(t, after);
                }
                Effect::Changed(c) => {
                    // Nobody listening is fine.
                    let _ = self.changes.send(c);
                }
                Effect::MemberUp(m) => {
                    tracing::info!(member = %m.id, addr = %m.addr, "member up");
                    self.members.send_modify(|g| *g += 1);
                }
                Effect::MemberDown(m) => {
                    tracing::warn!(member = %m.id, addr = %m.addr, "member down");
                    self.members.send_modify(|g| *g += 1);
                }
                Effect::Unvouched { peer, entries } => {
                    for (key, version, why) in entries {
                        tracing::warn!(%peer, %key, %version, reason = %why, "entry refused: no valid proof");
                    }
                }
                // Every reconcile is worth a look: it can drop keys.
                Effect::Reconciled(r) => tracing::warn!(
                    peer = %r.peer,
                    merged = r.merged,
                    named = r.named,
                    dropped = r.dropped,
                    held = r.held,
                    outcome = ?r.outcome,
                    "reconcile ended"
                ),
            }
        }
    }
}

/// A running agent core, started by `start` and driven by `Handle`s.
pub struct Core {
    pub handle: Handle,
    pub task: tokio::task::JoinHandle<()>,
}

/// Opens the store, creates the node and starts its core loop.
pub fn start(
    cfg: &AgentConfig,
    id: NodeId,
    advertise: String,
    security: Security,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) -> Result<Core, DaemonError> {
    let dir = cfg.state_dir.join("store");
    let store_err = |source| DaemonError::Store {
        path: dir.display().to_string(),
        source,
    };
    let backend = DiskBackend::open(&dir).map_err(store_err)?;
    let replica = Replica::open(id.clone(), backend.clone())
        .map_err(store_err)?
        .with_proofs(security.signer, security.vouch);
    let started_ms = wall_ms();
    // A restarted node must win over its former self in the membership layer.
    let me = Member::new(id, advertise, started_ms);
    let node = Node::new(me.clone(), replica, cfg.node_config(), rand::random());
    let (cmd, rx) = mpsc::channel(4096);
    let (changes, _) = broadcast::channel(4096);
    let clock = Arc::new(ClockWatch::default());
    let (members, members_rx) = tokio::sync::watch::channel(0u64);
    let effects = Effects {
        members,
        timers: DelayQueue::new(),
        peers: peer::PeerClient::new(me.clone(), counters.clone(), &security.tls, clock.clone()),
        changes: changes.clone(),
    };
    let handle = Handle::new(
        cmd,
        changes,
        backend,
        me,
        started_ms,
        counters,
        security.tls,
        security.trust,
        clock,
        members_rx,
    );
    let task = tokio::spawn(core_loop(node, rx, effects, shutdown));
    Ok(Core { handle, task })
}

async fn core_loop(
    mut node: Node<DiskBackend>,
    mut rx: mpsc::Receiver<Command>,
    mut fx: Effects,
    shutdown: CancellationToken,
) {
    let mut out = Vec::new();
    node.start(&mut out);
    fx.run(&mut out);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let cmd = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = housekeeping.tick() => {
                let backend = node.replica().backend().clone();
                if let Err(e) = blocking(|| backend.maybe_compact(COMPACT_RATIO)) {
                    tracing::error!(err = %e, "store compaction failed");
                }
                continue;
            }
            Some(t) = fx.timers.next() => {
                if let Err(e) = node.handle(wall_ms(), Input::Timer(t.into_inner()), &mut out) {
                    tracing::warn!(err = %e, "timer failed");
                }
                fx.run(&mut out);
                continue;
            }
            cmd = rx.recv() => match cmd {
                Some(c) => c,
                None => break,
            },
        };
        handle_command(&mut node, cmd, &mut rx, &mut out);
        fx.run(&mut out);
    }
    node.leave(&mut out);
    fx.run(&mut out);
    if let Err(e) = node.flush() {
        tracing::error!(err = %e, "final flush failed");
    }
    // Give the departure notice a moment to leave; peers detect us anyway if it does not.
    fx.peers.drain(Duration::from_millis(500)).await;
}

fn handle_command(
    node: &mut Node<DiskBackend>,
    cmd: Command,
    rx: &mut mpsc::Receiver<Command>,
    out: &mut Vec<Effect>,
) {
    match cmd {
        Command::Envelope(env) => {
            let from = env.from.id.clone();
            let kind = env.msg.kind();
            if let Err(e) = node.handle(wall_ms(), Input::Envelope(env), out) {
                tracing::warn!(peer = %from, kind, err = %crate::error_chain(&e), "peer message refused");
            }
        }
        Command::Discovered(members) => node.discovered(members, out),
        Command::Snapshot(tx) => {
            let _ = tx.send(Snapshot {
                me: node.me().clone(),
                members: node.members(),
                digest: node.replica().digest().clone(),
                peer_digests: node.sync().peer_digests().clone(),
                sync: node.sync().stats.clone(),
                seq: node.replica().seq(),
                keys: node
                    .replica()
                    .live_counts()
                    .into_iter()
                    .map(|(k, n)| (k.name(), n))
                    .collect(),
            });
        }
        Command::Write { ops, signer, reply } => {
            // Group commit: every write already queued shares one flush.
            let mut group = vec![(ops, signer, reply)];
            let mut deferred = None;
            while group.len() < 1024 {
                match rx.try_recv() {
                    Ok(Command::Write { ops, signer, reply }) => group.push((ops, signer, reply)),
                    Ok(other) => {
                        deferred = Some(other);
                        break;
                    }
                    Err(_) => break,
                }
            }
            write_group(node, group, out);
            if let Some(c) = deferred {
                handle_command(node, c, rx, out);
            }
        }
    }
}

type WriteRequest = (
    Vec<(Key, Option<Bytes>)>,
    Option<Arc<OperatorKey>>,
    oneshot::Sender<Result<Vec<Version>, StateError>>,
);

/// Whether `signer` may vouch for a write at `key`: desired state needs an operator, a
/// node's own keys need the node.
fn check_signer(
    key: &Key,
    node: &NodeId,
    signer: Option<&Arc<OperatorKey>>,
) -> Result<(), StoreError> {
    let operator = key.writer(node) == Writer::Operator;
    if operator != signer.is_some() {
        return Err(StoreError::Unvouched {
            key: key.to_string(),
            reason: if operator {
                "desired state is written on an operator's token"
            } else {
                "a node's own state is signed by the node"
            },
        });
    }
    Ok(())
}

fn write_group(node: &mut Node<DiskBackend>, group: Vec<WriteRequest>, out: &mut Vec<Effect>) {
    let now = wall_ms();
    let mut written = Vec::new();
    let mut replies = Vec::new();
    for (ops, signer, reply) in group {
        // Check the whole request first, so a refused request writes nothing.
        if let Some(e) = ops.iter().find_map(|(k, v)| {
            check_write(k, v.as_ref(), node.id())
                .and_then(|()| check_signer(k, node.id(), signer.as_ref()))
                .err()
        }) {
            let _ = reply.send(Err(StateError::Write(e)));
            continue;
        }
        let mut versions = Vec::new();
        for (k, v) in ops {
            let w = match &signer {
                Some(op) => node.write_signed(now, k, v, &**op),
                None => node.write(now, k, v),
            };
            match w {
                Ok(w) => {
                    versions.push(w.change.entry.version.clone());
                    written.push(w);
                }
                Err(e) => tracing::error!(err = %e, "write failed after its checks passed"),
            }
        }
        replies.push((reply, versions));
    }
    if written.is_empty() {
        for (reply, v) in replies {
            let _ = reply.send(Ok(v));
        }
        return;
    }
    // Acknowledge nothing before it is on disk: peers and clients depend on it.
    let flushed = blocking(|| node.flush());
    match flushed {
        Ok(()) => {
            node.publish(written, out);
            for (reply, v) in replies {
                let _ = reply.send(Ok(v));
            }
        }
        Err(e) => {
            tracing::error!(err = %e, "flush failed: writes not acknowledged");
            let msg = e.to_string();
            for (reply, _) in replies {
                let _ = reply.send(Err(StateError::NotDurable(msg.clone())));
            }
        }
    }
}
