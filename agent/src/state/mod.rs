//! The node's state as the rest of the agent uses it: a `Handle` with narrow capabilities —
//! writes acknowledged once durable, snapshots and reads of the replicated store, a
//! subscription to its changes, the node's identity and trust — and the counters the
//! endpoints export. The daemon makes one and runs the core loop that answers it; `api`,
//! `executor` and `discovery` (and the modules to come) take it as an argument and never reach
//! the daemon.

pub mod records;

use crate::clock::ClockWatch;
use crate::identity::vouch::OperatorKey;
use crate::identity::Trust;
use crate::membership::{Member, MemberStatus};
use crate::store::{Bytes, Change, Digest, DiskBackend, Key, NodeId, StoreError, Version};
use crate::sync::message::Envelope;
use crate::sync::SyncStats;
use crate::tls::{Refusal, Tls};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the agent is shutting down")]
    Stopped,
    #[error("write refused: {0}")]
    Write(#[source] StoreError),
    #[error("write not acknowledged: the store could not make it durable ({0})")]
    NotDurable(String),
}

/// Work for the core loop.
pub enum Command {
    Envelope(Envelope),
    Write {
        ops: Vec<(Key, Option<Bytes>)>,
        /// Who vouches for the writes: an operator's key, or (`None`) this node's.
        signer: Option<Arc<OperatorKey>>,
        reply: oneshot::Sender<Result<Vec<Version>, StateError>>,
    },
    Discovered(Vec<Member>),
    Snapshot(oneshot::Sender<Snapshot>),
}

/// The node's view of the cluster at one moment, for the status endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub me: Member,
    pub members: Vec<MemberStatus>,
    pub digest: Digest,
    pub peer_digests: HashMap<NodeId, Digest>,
    pub sync: SyncStats,
    pub seq: u64,
    /// Live keys per keyspace, kept by the replica as entries change.
    pub keys: std::collections::BTreeMap<&'static str, u64>,
}

/// Event-stream clients a node serves at once; more get 503.
pub const MAX_EVENT_STREAMS: usize = 128;

/// Counters the endpoints expose as metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub peer_messages: AtomicU64,
    pub peer_messages_refused: AtomicU64,
    pub peer_sends_failed: AtomicU64,
    pub writes: AtomicU64,
    /// TLS handshakes refused on the API listener, by `Refusal` (see `refused`).
    tls_refused: [AtomicU64; Refusal::ALL.len()],
    /// TLS handshakes completed on the API listener.
    pub tls_handshakes: AtomicU64,
    pub join_requests: AtomicU64,
    pub join_refused: AtomicU64,
    /// Nodes of other clusters seen over mDNS (each counted once).
    pub mdns_foreign: AtomicU64,
    /// Connections of the status, API and ingress listeners: open, shed, closed for idling.
    pub status_conns: Arc<ConnCounters>,
    pub api_conns: Arc<ConnCounters>,
    pub ingress_conns: Arc<ConnCounters>,
}

/// Connections a listener shed (over its cap) and closed for idling, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnCounters {
    pub open: AtomicUsize,
    pub shed: AtomicU64,
    pub idle_closed: AtomicU64,
}

impl Counters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refusal on the API listener.
    pub fn refused(&self, why: Refusal) {
        Self::inc(&self.tls_refused[why as usize]);
    }

    /// Refusals so far, by reason.
    pub fn refusals(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL
            .into_iter()
            .map(|r| (r, self.tls_refused[r as usize].load(Ordering::Relaxed)))
    }
}

/// What request handlers share: a way to the core loop and read access to the store.
#[derive(Clone)]
pub struct Handle {
    cmd: mpsc::Sender<Command>,
    changes: broadcast::Sender<Change>,
    /// Places for event-stream clients (`/v1/events`): each holds one while connected.
    pub event_streams: Arc<tokio::sync::Semaphore>,
    pub store: DiskBackend,
    pub me: Member,
    pub started_ms: u64,
    pub counters: Arc<Counters>,
    pub tls: Tls,
    pub trust: Arc<Trust>,
    /// How this node's clock compares with its peers'.
    pub clock: Arc<ClockWatch>,
    /// Changes whenever a member comes up or goes down: placement depends on who is live.
    pub members: tokio::sync::watch::Receiver<u64>,
}

impl Handle {
    /// A handle on a core loop that reads `cmd` and broadcasts on `changes` (the daemon's).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cmd: mpsc::Sender<Command>,
        changes: broadcast::Sender<Change>,
        store: DiskBackend,
        me: Member,
        started_ms: u64,
        counters: Arc<Counters>,
        tls: Tls,
        trust: Arc<Trust>,
        clock: Arc<ClockWatch>,
        members: tokio::sync::watch::Receiver<u64>,
    ) -> Handle {
        Handle {
            cmd,
            changes,
            event_streams: Arc::new(tokio::sync::Semaphore::new(MAX_EVENT_STREAMS)),
            store,
            me,
            started_ms,
            counters,
            tls,
            trust,
            clock,
            members,
        }
    }

    async fn send(&self, c: Command) -> Result<(), StateError> {
        self.cmd.send(c).await.map_err(|_| StateError::Stopped)
    }

    /// Hands a peer's message to the core loop.
    pub async fn deliver(&self, env: Envelope) -> Result<(), StateError> {
        self.send(Command::Envelope(env)).await
    }

    /// Tells the core loop about members discovery found.
    pub async fn discovered(&self, members: Vec<Member>) -> Result<(), StateError> {
        self.send(Command::Discovered(members)).await
    }

    /// Every change applied to the store from now on (writes here and from peers).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Writes as this node and waits until the writes are durable and on their way to peers.
    pub async fn write(&self, ops: Vec<(Key, Option<Bytes>)>) -> Result<Vec<Version>, StateError> {
        self.write_signed(ops, None).await
    }

    /// Writes desired state on an operator's behalf, signed with the key from its token.
    pub async fn write_as(
        &self,
        ops: Vec<(Key, Option<Bytes>)>,
        operator: Arc<OperatorKey>,
    ) -> Result<Vec<Version>, StateError> {
        self.write_signed(ops, Some(operator)).await
    }

    async fn write_signed(
        &self,
        ops: Vec<(Key, Option<Bytes>)>,
        signer: Option<Arc<OperatorKey>>,
    ) -> Result<Vec<Version>, StateError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Write { ops, signer, reply }).await?;
        rx.await.map_err(|_| StateError::Stopped)?
    }

    /// Whether `id` was evicted (a live `revoked/<id>` record in this node's store).
    pub fn is_revoked(&self, id: &NodeId) -> bool {
        let mut lookup = |k: &Key| {
            crate::store::replica::read_entry(&self.store, k.as_str())
                .ok()
                .flatten()
                .map(|(e, _)| e)
        };
        crate::identity::vouch::is_revoked(id, &mut lookup)
    }

    /// The join secret joins are checked against: the one an operator set cluster-wide
    /// (`cluster/join`, opened with the data key) once it has arrived, else this node's own.
    pub fn join_secret(&self) -> String {
        let rotated =
            crate::store::replica::read_entry(&self.store, crate::store::keys::JOIN_SECRET)
                .ok()
                .flatten()
                .and_then(|(e, _)| e.value)
                .and_then(|v| {
                    serde_json::from_slice::<crate::identity::join::JoinSecretRecord>(&v).ok()
                })
                .and_then(|r| r.open(&self.trust.secrets));
        rotated.unwrap_or_else(|| self.trust.join_secret.clone())
    }

    pub async fn snapshot(&self) -> Result<Snapshot, StateError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Snapshot(tx)).await?;
        rx.await.map_err(|_| StateError::Stopped)
    }
}
