//! The executor: makes this node's containers match its share of the placement. It reads the
//! desired state (apps, their secrets, the placement) from the store, what runs from the
//! container runtime, starts and removes containers, and writes each task's observed state to
//! `tasks/<node>/<app>/<replica>`, a key only this node writes.
//!
//! The decisions are a pure function (`plan`); the runtime sits behind `ContainerRuntime`
//! (Docker through bollard in the agent); `run` is the loop around them.

pub mod distribute;
pub mod docker;
pub mod fake;
pub mod firewall;
pub mod health;
pub mod images;
pub mod plan;
pub mod run;

use std::collections::BTreeMap;
use std::future::Future;

/// Labels on every container the agent creates (ARCHITECTURE.md's fixed names).
pub const LABEL_APP: &str = "shoal.app";
pub const LABEL_REPLICA: &str = "shoal.replica";
pub const LABEL_VERSION: &str = "shoal.version";
pub const LABEL_CLUSTER: &str = "shoal.cluster";
/// The node that made the container: nodes that share one Docker (tests, a development
/// machine) each manage only their own.
pub const LABEL_NODE: &str = "shoal.node";

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("docker is not reachable at {socket}")]
    Connect {
        socket: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("docker refused to {what}")]
    Docker {
        what: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("docker did not load the image: {0}")]
    Load(String),
    #[error("cannot pull {image}: {why}")]
    Pull { image: String, why: String },
}

/// A registry login for a pull (`source.credentials` names the app secret that holds
/// `user:password`).
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegistryAuth({}, password omitted)", self.username)
    }
}

/// A container to create: everything the runtime needs, already resolved (secrets opened,
/// sizes parsed).
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// Empty: the image's own command.
    pub command: Vec<String>,
    /// `NAME=value`, sorted.
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub memory_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub port: Option<u16>,
    /// The app's own network (`docker::network_name`): its replicas reach each other, other
    /// apps' do not reach them.
    pub network: String,
    /// Named volumes (`docker::volume_name`) and where they are mounted: they outlive the
    /// container, so a replica restarted or updated on this node finds its data.
    pub volumes: Vec<(String, String)>,
}

/// A container just started: its id, and its address on the container network (probes
/// start at once, not at the next pass).
#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    pub id: String,
    pub ip: Option<String>,
}

/// A container the runtime reports, identified by its labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub id: String,
    pub app: String,
    pub replica: u32,
    pub version: String,
    pub running: bool,
    /// For a container that stopped.
    pub exit_code: Option<i64>,
    /// Its address on the container network, while it runs.
    pub ip: Option<String>,
    /// Whether its probes say it is ready for traffic (the executor fills this in from its
    /// health trackers; a runtime reports false).
    pub ready: bool,
}

/// The side effects the executor needs, owned by the executor, images included. The agent's
/// is Docker (`docker::Docker`); the decisions are tested without one (`plan`).
pub trait ContainerRuntime: images::Images {
    /// Every container labelled with `cluster` and `node`, running or not.
    fn list(
        &self,
        cluster: &str,
        node: &str,
    ) -> impl Future<Output = Result<Vec<Observed>, ExecutorError>> + Send;
    fn has_image(&self, image: &str) -> impl Future<Output = Result<bool, ExecutorError>> + Send;
    /// Pulls an image from its registry, with a login when given; until it is done.
    fn pull(
        &self,
        image: &str,
        auth: Option<RegistryAuth>,
    ) -> impl Future<Output = Result<(), ExecutorError>> + Send;
    /// Creates and starts; the container's id and address.
    fn start(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<Started, ExecutorError>> + Send;
    /// Stops (with a grace period) and removes.
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), ExecutorError>> + Send;
    /// Removes this node's app networks that no container uses any more.
    fn prune_networks(
        &self,
        cluster: &str,
        node: &str,
    ) -> impl Future<Output = Result<(), ExecutorError>> + Send;
    /// A stream that yields whenever a container of `cluster` stops, so a crash is handled at
    /// once rather than at the next periodic pass; it ends when the runtime goes away.
    fn stops(
        &self,
        cluster: &str,
    ) -> impl Future<Output = Result<futures_util::stream::BoxStream<'static, ()>, ExecutorError>> + Send;
    /// Makes the host's rules that keep containers tenants what they should be
    /// (`firewall`); what that changed, `None` for a runtime with no host rules.
    fn guard_host(
        &self,
    ) -> impl Future<Output = Result<Option<firewall::Asserted>, firewall::FirewallError>> + Send;
    /// One health probe of container `id` (at `ip` on its network); why it failed. The caller
    /// bounds its time.
    fn probe(
        &self,
        id: &str,
        ip: Option<&str>,
        kind: &crate::spec::ProbeKind,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

impl<T: images::Images + ?Sized> images::Images for std::sync::Arc<T> {
    fn max_image_bytes(&self) -> u64 {
        (**self).max_image_bytes()
    }
    fn load(
        &self,
        archive: images::Archive,
    ) -> futures_util::future::BoxFuture<'_, Result<Vec<String>, ExecutorError>> {
        (**self).load(archive)
    }
    fn images_in_use<'a>(
        &'a self,
        cluster: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<images::InUse, ExecutorError>> {
        (**self).images_in_use(cluster)
    }
    fn image_id<'a>(
        &'a self,
        name: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<Option<String>, ExecutorError>> {
        (**self).image_id(name)
    }
    fn tag<'a>(
        &'a self,
        id: &'a str,
        name: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<(), ExecutorError>> {
        (**self).tag(id, name)
    }
    fn held(
        &self,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<Vec<crate::state::records::HeldImage>, ExecutorError>,
    > {
        (**self).held()
    }
    fn save<'a>(
        &'a self,
        id: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<images::Archive, ExecutorError>> {
        (**self).save(id)
    }
    fn resolve<'a>(
        &'a self,
        reference: &'a str,
        auth: Option<RegistryAuth>,
    ) -> futures_util::future::BoxFuture<'a, Option<String>> {
        (**self).resolve(reference, auth)
    }
    fn remove_image<'a>(
        &'a self,
        id: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<(), ExecutorError>> {
        (**self).remove_image(id)
    }
}

impl<T: ContainerRuntime> ContainerRuntime for std::sync::Arc<T> {
    async fn list(&self, cluster: &str, node: &str) -> Result<Vec<Observed>, ExecutorError> {
        (**self).list(cluster, node).await
    }
    async fn has_image(&self, image: &str) -> Result<bool, ExecutorError> {
        (**self).has_image(image).await
    }
    async fn pull(&self, image: &str, auth: Option<RegistryAuth>) -> Result<(), ExecutorError> {
        (**self).pull(image, auth).await
    }
    async fn start(&self, spec: &ContainerSpec) -> Result<Started, ExecutorError> {
        (**self).start(spec).await
    }
    async fn remove(&self, id: &str) -> Result<(), ExecutorError> {
        (**self).remove(id).await
    }
    async fn prune_networks(&self, cluster: &str, node: &str) -> Result<(), ExecutorError> {
        (**self).prune_networks(cluster, node).await
    }
    async fn stops(
        &self,
        cluster: &str,
    ) -> Result<futures_util::stream::BoxStream<'static, ()>, ExecutorError> {
        (**self).stops(cluster).await
    }
    async fn guard_host(&self) -> Result<Option<firewall::Asserted>, firewall::FirewallError> {
        (**self).guard_host().await
    }
    async fn probe(
        &self,
        id: &str,
        ip: Option<&str>,
        kind: &crate::spec::ProbeKind,
    ) -> Result<(), String> {
        (**self).probe(id, ip, kind).await
    }
}

pub use crate::state::records::{Task, TaskState};

/// `shoal-<app>-<replica>-<8 hex>`, the hex from the version, the node and the cluster:
/// unique per version, so an update's new container can start before the old one goes, and
/// per node and cluster, so nodes (of one cluster or of several) sharing one Docker do not
/// collide. Containers are found by their labels, never by name.
pub fn container_name(cluster: &str, app: &str, replica: u32, version: &str, node: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(version.as_bytes());
    ctx.update(&[0]);
    ctx.update(node.as_bytes());
    ctx.update(&[0]);
    ctx.update(cluster.as_bytes());
    let d = ctx.finish();
    let hex: String = d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("shoal-{app}-{replica}-{hex}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn container_names_follow_the_version() {
        let a = super::container_name("c1", "web", 0, "1700000000000.0@n1", "n1");
        let b = super::container_name("c1", "web", 0, "1700000000001.0@n1", "n1");
        let c = super::container_name("c1", "web", 0, "1700000000000.0@n1", "n2");
        let d = super::container_name("c2", "web", 0, "1700000000000.0@n1", "n1");
        assert!(a.starts_with("shoal-web-0-") && a.len() == "shoal-web-0-".len() + 8);
        assert!(a != b && a != c && b != c && a != d);
    }
}
