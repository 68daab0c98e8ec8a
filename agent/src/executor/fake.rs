//! A container runtime in memory, for the executor's tests in virtual time: it records what it
//! is asked, can be told to be down, to lack an image or to fail starts, and crashes a
//! container on demand (reported on `stops`, as Docker's events are). Not used by the agent.

use super::firewall::{Asserted, FirewallError};
use super::images::{Archive, Images, InUse};
use super::{ContainerRuntime, ContainerSpec, ExecutorError, Observed, RegistryAuth};
use super::{LABEL_APP, LABEL_CLUSTER, LABEL_NODE, LABEL_REPLICA, LABEL_VERSION};
use crate::state::records::HeldImage;
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use tokio::sync::broadcast;
use tokio::time::Instant;

/// A container the fake holds.
#[derive(Debug, Clone)]
pub struct FakeContainer {
    pub spec: ContainerSpec,
    pub running: bool,
    pub exit_code: Option<i64>,
}

/// A start the fake was asked for: when (virtual time), which app and replica.
#[derive(Debug, Clone)]
pub struct Start {
    pub at: Instant,
    pub app: String,
    pub replica: u32,
    pub ok: bool,
}

#[derive(Default)]
struct Inner {
    containers: BTreeMap<String, FakeContainer>,
    images: BTreeSet<String>,
    down: bool,
    fail_starts: u32,
    next_id: u64,
    starts: Vec<Start>,
    removed: Vec<String>,
    /// Images whose containers fail their probes.
    unhealthy: BTreeSet<String>,
    /// Images a pull finds (`set_registry`), and the login it needs if any.
    registry: BTreeMap<String, Option<RegistryAuth>>,
    /// Every pull asked for.
    pulls: Vec<String>,
}

pub struct FakeRuntime {
    inner: Mutex<Inner>,
    stopped: broadcast::Sender<()>,
}

impl Default for FakeRuntime {
    fn default() -> Self {
        FakeRuntime {
            inner: Mutex::default(),
            stopped: broadcast::channel(64).0,
        }
    }
}

fn down() -> ExecutorError {
    ExecutorError::Load("the fake runtime is down".into())
}

impl FakeRuntime {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An image a pull can fetch, behind a login when `auth` is given.
    pub fn set_registry(&self, image: &str, auth: Option<RegistryAuth>) {
        self.lock().registry.insert(image.to_string(), auth);
    }

    /// Every pull asked for, in order.
    pub fn pulls(&self) -> Vec<String> {
        self.lock().pulls.clone()
    }

    pub fn add_image(&self, image: &str) {
        self.lock().images.insert(image.to_string());
    }

    /// While down, every call fails as an unreachable runtime's would.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Probes of the containers of `image` fail, or pass again.
    pub fn set_healthy(&self, image: &str, healthy: bool) {
        let mut inner = self.lock();
        if healthy {
            inner.unhealthy.remove(image);
        } else {
            inner.unhealthy.insert(image.to_string());
        }
    }

    /// The next `n` starts fail.
    pub fn fail_starts(&self, n: u32) {
        self.lock().fail_starts = n;
    }

    /// A container that exists already (made by an earlier run of the agent).
    pub fn seed(&self, id: &str, spec: ContainerSpec) {
        self.lock().containers.insert(
            id.to_string(),
            FakeContainer {
                spec,
                running: true,
                exit_code: None,
            },
        );
    }

    /// Container `id` exits with `code`, and the runtime says so.
    pub fn crash(&self, id: &str, code: i64) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            c.running = false;
            c.exit_code = Some(code);
        }
        let _ = self.stopped.send(());
    }

    /// Running containers: (id, app, replica).
    pub fn running(&self) -> Vec<(String, String, u32)> {
        self.lock()
            .containers
            .iter()
            .filter(|(_, c)| c.running)
            .map(|(id, c)| {
                let l = &c.spec.labels;
                let replica = l.get(LABEL_REPLICA).and_then(|r| r.parse().ok());
                (
                    id.clone(),
                    l.get(LABEL_APP).cloned().unwrap_or_default(),
                    replica.unwrap_or(0),
                )
            })
            .collect()
    }

    /// Every start asked for, in order.
    pub fn starts(&self) -> Vec<Start> {
        self.lock().starts.clone()
    }

    /// Every container removed, in order.
    pub fn removed(&self) -> Vec<String> {
        self.lock().removed.clone()
    }
}

impl Images for FakeRuntime {
    fn max_image_bytes(&self) -> u64 {
        1 << 20
    }
    fn load(&self, mut archive: Archive) -> BoxFuture<'_, Result<Vec<String>, ExecutorError>> {
        Box::pin(async move {
            // The fake's archives hold the image's name (what `save` writes).
            let mut held = Vec::new();
            while let Some(chunk) = archive.next().await {
                held.extend_from_slice(&chunk.map_err(|e| ExecutorError::Load(e.to_string()))?);
            }
            let name = match String::from_utf8(held) {
                Ok(n) if !n.is_empty() => n,
                _ => "loaded:latest".to_string(),
            };
            self.add_image(&name);
            Ok(vec![name])
        })
    }
    fn images_in_use<'a>(
        &'a self,
        cluster: &'a str,
    ) -> BoxFuture<'a, Result<InUse, ExecutorError>> {
        Box::pin(async move {
            Ok(self
                .lock()
                .containers
                .values()
                .filter(|c| {
                    c.running
                        && c.spec.labels.get(LABEL_CLUSTER).map(String::as_str) == Some(cluster)
                })
                .map(|c| {
                    let app = c.spec.labels.get(LABEL_APP).cloned().unwrap_or_default();
                    (
                        super::images::full_name(&c.spec.image),
                        (format!("id:{}", c.spec.image), app),
                    )
                })
                .collect())
        })
    }
    fn image_id<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, ExecutorError>> {
        Box::pin(async move {
            let held = self.lock().images.contains(name);
            Ok(held.then(|| {
                if crate::spec::is_image_id(name) {
                    name.to_string()
                } else {
                    format!("id:{name}")
                }
            }))
        })
    }
    fn tag<'a>(&'a self, _id: &'a str, _name: &'a str) -> BoxFuture<'a, Result<(), ExecutorError>> {
        Box::pin(async { Ok(()) })
    }
    fn held(&self) -> BoxFuture<'_, Result<Vec<HeldImage>, ExecutorError>> {
        Box::pin(async move {
            Ok(self
                .lock()
                .images
                .iter()
                .map(|name| HeldImage {
                    id: format!("id:{name}"),
                    tags: vec![super::images::full_name(name)],
                    digests: Vec::new(),
                    size: 0,
                })
                .collect())
        })
    }
    fn save<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Archive, ExecutorError>> {
        Box::pin(async move {
            let chunk = bytes::Bytes::from(id.to_string());
            Ok(futures_util::stream::iter([Ok(chunk)]).boxed())
        })
    }
    fn resolve<'a>(
        &'a self,
        _reference: &'a str,
        _auth: Option<RegistryAuth>,
    ) -> BoxFuture<'a, Option<String>> {
        Box::pin(async { None })
    }
    fn remove_image<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ExecutorError>> {
        Box::pin(async move {
            let name = id.strip_prefix("id:").unwrap_or(id).to_string();
            self.lock().images.remove(&name);
            Ok(())
        })
    }
}

impl ContainerRuntime for FakeRuntime {
    async fn list(&self, cluster: &str, node: &str) -> Result<Vec<Observed>, ExecutorError> {
        let inner = self.lock();
        if inner.down {
            return Err(down());
        }
        Ok(inner
            .containers
            .iter()
            .filter(|(_, c)| {
                let l = &c.spec.labels;
                l.get(LABEL_CLUSTER).map(String::as_str) == Some(cluster)
                    && l.get(LABEL_NODE).map(String::as_str) == Some(node)
            })
            .map(|(id, c)| {
                let l = &c.spec.labels;
                Observed {
                    id: id.clone(),
                    app: l.get(LABEL_APP).cloned().unwrap_or_default(),
                    replica: l
                        .get(LABEL_REPLICA)
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0),
                    version: l.get(LABEL_VERSION).cloned().unwrap_or_default(),
                    running: c.running,
                    exit_code: c.exit_code,
                    ip: c.running.then(|| "10.0.0.2".to_string()),
                    ready: false,
                }
            })
            .collect())
    }

    async fn has_image(&self, image: &str) -> Result<bool, ExecutorError> {
        let inner = self.lock();
        if inner.down {
            return Err(down());
        }
        Ok(inner.images.contains(image))
    }

    async fn pull(&self, image: &str, auth: Option<RegistryAuth>) -> Result<(), ExecutorError> {
        let mut inner = self.lock();
        if inner.down {
            return Err(down());
        }
        inner.pulls.push(image.to_string());
        let why = match inner.registry.get(image) {
            None => "not found in the registry",
            Some(Some(need)) if auth.as_ref() != Some(need) => "unauthorized",
            Some(_) => {
                inner.images.insert(image.to_string());
                return Ok(());
            }
        };
        Err(ExecutorError::Pull {
            image: image.to_string(),
            why: why.into(),
        })
    }

    async fn start(&self, spec: &ContainerSpec) -> Result<super::Started, ExecutorError> {
        let mut inner = self.lock();
        if inner.down {
            return Err(down());
        }
        let ok = inner.fail_starts == 0;
        inner.starts.push(Start {
            at: crate::clock::now(),
            app: spec.labels.get(LABEL_APP).cloned().unwrap_or_default(),
            replica: spec
                .labels
                .get(LABEL_REPLICA)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0),
            ok,
        });
        if !ok {
            inner.fail_starts -= 1;
            return Err(ExecutorError::Load("the fake refused to start it".into()));
        }
        inner.next_id += 1;
        let id = format!("c{}", inner.next_id);
        inner.containers.insert(
            id.clone(),
            FakeContainer {
                spec: spec.clone(),
                running: true,
                exit_code: None,
            },
        );
        Ok(super::Started {
            id,
            ip: Some("10.0.0.2".into()),
        })
    }

    async fn remove(&self, id: &str) -> Result<(), ExecutorError> {
        let mut inner = self.lock();
        if inner.down {
            return Err(down());
        }
        inner.containers.remove(id);
        inner.removed.push(id.to_string());
        Ok(())
    }

    async fn prune_networks(&self, _cluster: &str, _node: &str) -> Result<(), ExecutorError> {
        Ok(())
    }

    async fn stops(&self, _cluster: &str) -> Result<BoxStream<'static, ()>, ExecutorError> {
        let rx = self.stopped.subscribe();
        Ok(futures_util::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(()) => return Some(((), rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed())
    }

    async fn guard_host(&self) -> Result<Option<Asserted>, FirewallError> {
        Ok(None)
    }

    async fn probe(
        &self,
        id: &str,
        _ip: Option<&str>,
        _kind: &crate::spec::ProbeKind,
    ) -> Result<(), String> {
        let inner = self.lock();
        let c = inner
            .containers
            .get(id)
            .filter(|c| c.running)
            .ok_or_else(|| "no such container running".to_string())?;
        match inner.unhealthy.contains(&c.spec.image) {
            true => Err("the fake says unhealthy".into()),
            false => Ok(()),
        }
    }
}
