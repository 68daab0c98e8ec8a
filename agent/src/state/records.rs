//! The records nodes write about themselves, typed, with their readers: what the executor,
//! the status endpoint and the modules to come read back from the store. Keys are built by
//! `store::keys`.

use crate::spec::AppSpec;
use crate::store::replica::scan_keyspace;
use crate::store::{DiskBackend, Keyspace};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A node's own record, `nodes/<id>`: written by the node at every start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// Where peers reach its API (`host:port`).
    pub addr: String,
    /// The agent's version.
    pub version: String,
    /// When this run of its agent started (ms since the epoch): task records name it, so a
    /// record from an earlier run says nothing about what runs now.
    pub started_at_ms: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Whether it runs containers: the scheduler places replicas only on nodes that do.
    #[serde(default)]
    pub containers: bool,
    /// What it can hold (cpu and memory, from the kernel); unknown: anything fits.
    #[serde(default)]
    pub capacity: Option<crate::scheduler::Capacity>,
}

/// A task's lifecycle (ARCHITECTURE.md): `pending → scheduled → starting → running →
/// completed | failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Pending,
    Scheduled,
    Starting,
    Running,
    Completed,
    Failed,
}

/// The observed state of one replica on this node: the value of `tasks/<node>/<app>/<replica>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub app: String,
    pub replica: u32,
    pub node: String,
    /// The app spec's version this task runs.
    pub version: String,
    pub image: String,
    pub state: TaskState,
    pub reason: String,
    /// When `state` last changed (ms since the epoch).
    pub since_ms: u64,
    pub container: Option<String>,
    pub ip: Option<String>,
    pub port: Option<u16>,
    /// Containers of this replica that stopped or failed to start, since the agent started.
    pub restarts: u32,
    /// How the replica's last container ended, if one did.
    pub exit_code: Option<i64>,
    /// Whether its probes say it is ready for traffic (`[health]`).
    #[serde(default)]
    pub ready: bool,
    /// Containers of this replica at this version that failed (crashed, or restarted for
    /// failing their probes): a rollout fails at `[update] max_failures`.
    #[serde(default)]
    pub failures: u32,
    /// When this replica's first container at this version started (ms since the epoch; 0
    /// before one has): a rollout's readiness deadline counts from here, through restarts.
    #[serde(default)]
    pub version_since_ms: u64,
    /// When the agent that wrote this started (its node record's `started_at_ms`): a record
    /// from an earlier run of the node says nothing about what runs now.
    pub agent_started_ms: u64,
}

impl Task {
    /// Whether `other` says something new (anything but the time).
    pub fn differs(&self, other: &Task) -> bool {
        let mut o = other.clone();
        o.since_ms = self.since_ms;
        *self != o
    }
}

impl NodeRecord {
    /// This node's record, published at every start, durably, before anything answers.
    pub async fn publish(
        h: &super::Handle,
        labels: BTreeMap<String, String>,
        containers: bool,
        capacity: Option<crate::scheduler::Capacity>,
    ) -> Result<(), super::StateError> {
        let key = crate::store::keys::node(&h.me.id).map_err(super::StateError::Write)?;
        let record = NodeRecord {
            id: h.me.id.to_string(),
            addr: h.me.addr.clone(),
            version: crate::VERSION.into(),
            started_at_ms: h.started_ms,
            labels,
            containers,
            capacity,
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        h.write(vec![(key, Some(value.into()))]).await.map(|_| ())
    }
}

/// Every node record in the store (unreadable ones left out).
pub fn nodes(store: &DiskBackend) -> Vec<NodeRecord> {
    values(store, Keyspace::Nodes, "")
}

/// Every task record under `prefix` of `tasks/` (`store::keys::tasks_of` for one node's).
pub fn tasks(store: &DiskBackend, prefix: &str) -> Vec<Task> {
    values(store, Keyspace::Tasks, prefix)
}

/// An app as its record says: the spec, the revision its containers run
/// (`AppSpec::revision`), and the store version of the record: a newer record is a new
/// rollout, even of the same revision.
#[derive(Debug, Clone, PartialEq)]
pub struct AppRecord {
    pub spec: AppSpec,
    pub revision: String,
    pub record: String,
}

impl AppRecord {
    pub fn new(spec: AppSpec, record: String) -> AppRecord {
        AppRecord {
            revision: spec.revision(),
            spec,
            record,
        }
    }
}

/// Every app, by its record.
pub fn apps(store: &DiskBackend) -> Vec<AppRecord> {
    scan_keyspace(store, Keyspace::Apps, "", usize::MAX)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let spec = serde_json::from_slice::<AppSpec>(e.value.as_deref()?).ok()?;
            Some(AppRecord::new(spec, e.version.to_string()))
        })
        .collect()
}

/// One app, by its record.
pub fn app(store: &DiskBackend, name: &str) -> Option<AppRecord> {
    let key = crate::store::keys::app(name).ok()?;
    let (e, _) = crate::store::replica::read_entry(store, key.as_str()).ok()??;
    let spec = serde_json::from_slice::<AppSpec>(e.value.as_deref()?).ok()?;
    Some(AppRecord::new(spec, e.version.to_string()))
}

/// How many earlier specs `history/<app>` keeps.
pub const HISTORY_LEN: usize = 10;

/// One earlier spec of an app, in `history/<app>` (a list, newest first): written by the
/// operator's request that replaced it, in the same batch as the new spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Previous {
    pub revision: String,
    pub spec: AppSpec,
    /// When it was replaced (ms since the epoch).
    pub replaced_ms: u64,
}

/// An app's earlier specs, newest first (empty when none are recorded).
pub fn history(store: &DiskBackend, app: &str) -> Vec<Previous> {
    crate::store::keys::history(app)
        .ok()
        .and_then(|k| {
            crate::store::replica::read_entry(store, k.as_str())
                .ok()
                .flatten()
        })
        .and_then(|(e, _)| serde_json::from_slice(e.value.as_deref()?).ok())
        .unwrap_or_default()
}

/// Every app's history, by app.
pub fn histories(store: &DiskBackend) -> BTreeMap<String, Vec<Previous>> {
    keyed(store, Keyspace::History)
}

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Every replica of the new revision was ready.
    Complete,
    /// A replica of the new revision failed or was not ready in time: with `[update]
    /// rollback`, the previous revision is restored.
    Failed,
}

/// `rollouts/<app>/<revision>`: how the rollout of one app record ended, written once by the
/// member that watched it (the app's rendezvous owner). As an outcome it speaks only of that
/// record (a newer record of the app is a new rollout); that the revision failed is kept,
/// so a rollback does not return to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// The store version of the app record it judged.
    pub record: String,
    pub revision: String,
    pub outcome: Outcome,
    pub reason: String,
    pub at_ms: u64,
    /// The node that wrote it.
    pub by: String,
}

/// Every rollout record, by (app, revision).
pub fn rollouts(store: &DiskBackend) -> BTreeMap<(String, String), RolloutRecord> {
    keyed::<RolloutRecord>(store, Keyspace::Rollouts)
        .into_iter()
        .filter_map(|(name, r)| {
            // The key names the revision; a record that says another is not believed.
            let (app, revision) = name.split_once('/')?;
            (revision == r.revision).then(|| ((app.to_string(), r.revision.clone()), r))
        })
        .collect()
}

/// Every readable value of a keyspace whose keys are `<space>/<app>`, by app.
fn keyed<T: serde::de::DeserializeOwned>(
    store: &DiskBackend,
    space: Keyspace,
) -> BTreeMap<String, T> {
    scan_keyspace(store, space, "", usize::MAX)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let v = serde_json::from_slice(e.value.as_deref()?).ok()?;
            Some((e.key.name().to_string(), v))
        })
        .collect()
}

fn values<T: serde::de::DeserializeOwned>(
    store: &DiskBackend,
    space: Keyspace,
    prefix: &str,
) -> Vec<T> {
    scan_keyspace(store, space, prefix, usize::MAX)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| serde_json::from_slice(e.value.as_deref()?).ok())
        .collect()
}

/// An operator's drain mark on a node, `cluster/drain/<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainMark {
    /// When it was drained (ms since the epoch).
    pub at_ms: u64,
}

/// The drained nodes, by id.
pub fn drained(store: &DiskBackend) -> BTreeMap<String, DrainMark> {
    scan_keyspace(
        store,
        Keyspace::Cluster,
        crate::store::keys::DRAIN_PREFIX,
        usize::MAX,
    )
    .unwrap_or_default()
    .into_iter()
    .filter_map(|e| {
        let id = e
            .key
            .name()
            .strip_prefix(crate::store::keys::DRAIN_PREFIX)?;
        let mark = serde_json::from_slice(e.value.as_deref()?).ok()?;
        Some((id.to_string(), mark))
    })
    .collect()
}

/// One image a node holds, content addressed: what peers fetch it by (`id`) and what it
/// answers to (`tags`, `digests`: `repo@sha256:…` from a registry, or learned when the node
/// fetched it from a peer in place of one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldImage {
    /// `sha256:<64 hex>`: the digest of the image's config, the same on every node.
    pub id: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub digests: Vec<String>,
    #[serde(default)]
    pub size: u64,
}

impl HeldImage {
    /// Whether `reference` (an id, a `repo@sha256:…` digest, or a name with a tag) names it.
    pub fn answers_to(&self, reference: &str) -> bool {
        self.id == reference
            || self.digests.iter().any(|d| d == reference)
            || self
                .tags
                .iter()
                .any(|t| *t == crate::spec::tagged(reference))
    }
}

/// `images/<id>`: the images a node holds, written by the node when they change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImagesRecord {
    pub images: Vec<HeldImage>,
    /// The ids of those the node pulled or fetched itself: the ones it removes once no
    /// version of any app needs them (an image an operator loaded stays).
    #[serde(default)]
    pub brought: Vec<String>,
}

/// At most this many images in one node's record (the rest are not offered to peers).
pub const MAX_HELD_IMAGES: usize = 2000;

/// What every node says it holds, by node.
pub fn held_images(store: &DiskBackend) -> BTreeMap<String, Vec<HeldImage>> {
    keyed::<ImagesRecord>(store, Keyspace::Images)
        .into_iter()
        .map(|(node, r)| (node, r.images))
        .collect()
}

/// One node's image record.
pub fn held_images_record(store: &DiskBackend, node: &str) -> Option<ImagesRecord> {
    let key = crate::store::keys::images(node).ok()?;
    let (e, _) = crate::store::replica::read_entry(store, key.as_str()).ok()??;
    serde_json::from_slice(e.value.as_deref()?).ok()
}

/// A certificate an operator uploaded for the ingress, `certs/<host>`: the chain in the
/// clear, the private key sealed with the cluster's data key for this store key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertRecord {
    /// Certificates, leaf first (PEM).
    pub chain_pem: String,
    /// The private key's PEM, sealed (`SecretKey::seal` for the key `certs/<host>`), in hex.
    pub key_sealed: String,
    /// The leaf's DNS names.
    pub names: Vec<String>,
    /// When the leaf expires (ms since the epoch).
    pub not_after_ms: u64,
}

/// The uploaded certificates, by the host each was uploaded for.
pub fn certs(store: &DiskBackend) -> BTreeMap<String, CertRecord> {
    keyed(store, Keyspace::Certs)
}

/// A certificate an ACME CA issued, `acme/certs/<host>`: as an uploaded one (the key sealed
/// for this store key), and where and when it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcmeCert {
    #[serde(flatten)]
    pub cert: CertRecord,
    /// The directory URL of the CA that issued it.
    pub directory: String,
    pub issued_ms: u64,
    /// The leaf's start of validity (ms since the epoch): with `not_after_ms`, its life.
    pub not_before_ms: u64,
    /// The member that ordered it.
    pub by: String,
}

/// An HTTP-01 challenge, `acme/challenges/<token>`: what every node answers at
/// `/.well-known/acme-challenge/<token>` until `expires_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcmeChallenge {
    pub host: String,
    pub key_authorization: String,
    pub expires_ms: u64,
}

/// The cluster's account with one CA, `acme/account/<dir>`: its credentials (JSON) sealed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcmeAccount {
    pub directory: String,
    pub credentials_sealed: String,
}

/// A host's failed orders, `acme/failures/<host>`: removed when one succeeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcmeFailure {
    /// Orders that failed in a row: the next waits longer each time.
    pub failures: u32,
    pub error: String,
    pub at_ms: u64,
    pub by: String,
}

/// Everything under `acme/<kind>/`, by the rest of the key.
pub fn acme<T: serde::de::DeserializeOwned>(
    store: &DiskBackend,
    kind: &str,
) -> BTreeMap<String, T> {
    scan_keyspace(store, Keyspace::Acme, &format!("{kind}/"), usize::MAX)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let v = serde_json::from_slice(e.value.as_deref()?).ok()?;
            let name = e
                .key
                .name()
                .strip_prefix(kind)?
                .strip_prefix('/')?
                .to_string();
            Some((name, v))
        })
        .collect()
}

/// The replica count the autoscaler chose for an app, `scale/<app>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleRecord {
    pub replicas: u32,
    /// When it was chosen (ms since the epoch): the app does not shrink again within its
    /// `down_window` of any change.
    pub at_ms: u64,
    /// The node that chose it.
    pub by: String,
    /// Why, as a person reads it.
    pub reason: String,
}

/// The autoscaler's counts, by app.
pub fn scales(store: &DiskBackend) -> BTreeMap<String, ScaleRecord> {
    keyed(store, Keyspace::Scale)
}

/// What one node's ingress saw of one app over its last interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppLoad {
    /// Requests a second that entered at this node.
    pub rps: f64,
    /// Requests in flight at the end of the interval (held ones included).
    pub inflight: u64,
    /// Requests held for an app scaled to zero.
    #[serde(default)]
    pub waiting: u64,
}

/// What a node's ingress saw, `metrics/<node>/ingress`: the autoscaler's input.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadRecord {
    /// The end of the interval (ms since the epoch): an old record says nothing of now.
    pub at_ms: u64,
    pub interval_ms: u64,
    pub apps: BTreeMap<String, AppLoad>,
}

/// Every node's latest load record, by node.
pub fn loads(store: &DiskBackend) -> BTreeMap<String, LoadRecord> {
    scan_keyspace(store, Keyspace::Metrics, "", usize::MAX)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let (node, what) = e.key.name().split_once('/')?;
            if what != "ingress" {
                return None;
            }
            let v = serde_json::from_slice(e.value.as_deref()?).ok()?;
            Some((node.to_string(), v))
        })
        .collect()
}
