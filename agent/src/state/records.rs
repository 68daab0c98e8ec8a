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
    ) -> Result<(), super::StateError> {
        let key = crate::store::keys::node(&h.me.id).map_err(super::StateError::Write)?;
        let record = NodeRecord {
            id: h.me.id.to_string(),
            addr: h.me.addr.clone(),
            version: crate::VERSION.into(),
            started_at_ms: h.started_ms,
            labels,
            containers,
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

/// Every app spec, with the version of its record (what its containers are labelled with).
pub fn apps(store: &DiskBackend) -> Vec<(AppSpec, String)> {
    scan_keyspace(store, Keyspace::Apps, "", usize::MAX)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let spec = serde_json::from_slice::<AppSpec>(e.value.as_deref()?).ok()?;
            Some((spec, e.version.to_string()))
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
