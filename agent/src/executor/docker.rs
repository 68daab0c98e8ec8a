//! `ContainerRuntime` for dockerd, through bollard. The connection is made on first use and
//! the API version negotiated then (Debian 12's Docker speaks 1.41): the agent starts before
//! dockerd answers, so a missing socket is an error of the moment, not of the agent.

use super::images::Archive;
use super::{ContainerRuntime, ContainerSpec, ExecutorError, Observed};
use super::{LABEL_APP, LABEL_CLUSTER, LABEL_NODE, LABEL_REPLICA, LABEL_VERSION};
use crate::state::records::HeldImage;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HostConfig, HostConfigLogConfig, Mount,
    MountType, MountVolumeOptions, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, ImportImageOptions, InspectContainerOptions,
    ListContainersOptions, RemoveContainerOptions, StopContainerOptions,
};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::Mutex;

/// Requests other than image loads; a load may take as long as its upload.
const TIMEOUT_S: u64 = 120;
/// A whole image upload, however slow the client: 2 GiB (the default cap) at 2.4 MB/s.
const LOAD_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Seconds between SIGTERM and SIGKILL when a container is stopped.
const STOP_GRACE_S: i32 = 10;
/// The default cap on an uploaded image archive.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 2 << 30;
/// At most this many processes per container: a fork bomb stays inside it.
const PIDS_LIMIT: i64 = 4096;
/// What a container may do as root inside it: enough to drop privileges, own its files and
/// bind low ports; none of Docker's other defaults (raw sockets, mknod, chroot, setfcap,
/// audit writes...).
pub const CAPABILITIES: [&str; 8] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "NET_BIND_SERVICE",
];

/// The network of one app on one node: `shoal-<first 12 of the cluster id>-<node>-<app>`.
/// Per node, because nodes sharing one Docker (tests, a development machine) would otherwise
/// race to create it, and Docker takes two networks of one name.
pub fn network_name(cluster: &str, node: &str, app: &str) -> String {
    let c: String = cluster.chars().take(12).collect();
    format!("shoal-{c}-{node}-{app}")
}

/// A replica's named volume: one per (cluster, app, replica, volume name) on an engine.
pub fn volume_name(cluster: &str, app: &str, replica: u32, name: &str) -> String {
    let c: String = cluster.chars().take(12).collect();
    format!("shoal-{c}-{app}-{replica}-{name}")
}

/// The label of a network made ahead of need (`Nets`).
pub const LABEL_SPARE: &str = "shoal.spare";
/// How many unused networks a node keeps made: each holds one of Docker's address pools
/// (about 30 by default), so one, enough for one deploy at a time.
const SPARES: usize = 1;

pub struct Docker {
    socket: String,
    client: Mutex<Option<bollard::Docker>>,
    max_image_bytes: u64,
    nets: std::sync::Arc<std::sync::Mutex<Nets>>,
    /// Makes a resolver answer on an app network's gateway (`with_resolver`).
    resolver: Option<Resolve>,
    /// App networks' gateways, by Docker network.
    gateways: std::sync::Mutex<HashMap<String, std::net::Ipv4Addr>>,
}

/// Has a DNS resolver answer on the address; whether one does.
pub type Resolve = std::sync::Arc<dyn Fn(std::net::Ipv4Addr) -> bool + Send + Sync>;

/// App networks made ahead of need: an app's first replica on a node takes a spare rather
/// than waiting for `docker network create` (100 ms and more, most of it iptables), and a new
/// spare is made in the background. Docker can neither rename nor relabel a network, so
/// which app a spare now serves is kept here, and found again after a restart from the
/// containers on it (`list`). A network no container uses any more is removed
/// (`prune_networks`), spares aside.
#[derive(Debug, Default)]
struct Nets {
    /// Found from the containers once, at the first `list`.
    recovered: bool,
    /// App network (`network_name`) → the Docker network serving it, when that is a spare
    /// it took (an app's network made on the spot carries the app network's own name).
    serving: HashMap<String, String>,
    /// Made and unused.
    spare: Vec<String>,
    /// A spare is being made.
    making: bool,
}

fn refused(what: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> ExecutorError {
    let what = what.into();
    move |source| ExecutorError::Docker { what, source }
}

fn not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl Docker {
    pub fn new(socket: &str) -> Docker {
        Docker {
            socket: socket.to_string(),
            client: Mutex::new(None),
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            nets: Default::default(),
            resolver: None,
            gateways: Default::default(),
        }
    }

    /// Containers ask the resolver `resolve` starts on their network's gateway for names
    /// (Docker's embedded DNS passes it what is not a container's name): where
    /// `<app>.internal` resolves.
    pub fn with_resolver(mut self, resolve: Resolve) -> Docker {
        self.resolver = Some(resolve);
        self
    }

    /// The gateway of Docker network `network` (cached), with a resolver answering there.
    async fn resolver_on(&self, c: &bollard::Docker, network: &str) -> Option<String> {
        let resolve = self.resolver.as_ref()?;
        let known = self.gateways.lock().ok()?.get(network).copied();
        let gw = match known {
            Some(gw) => gw,
            None => {
                let n = c
                    .inspect_network(
                        network,
                        None::<bollard::query_parameters::InspectNetworkOptions>,
                    )
                    .await
                    .ok()?;
                let gw: std::net::Ipv4Addr = n
                    .ipam?
                    .config?
                    .into_iter()
                    .find_map(|c| c.gateway?.parse().ok())?;
                let mut known = self.gateways.lock().ok()?;
                // Networks come and go (spares have new names): a cache, not a record.
                if known.len() >= 1024 {
                    known.clear();
                }
                known.insert(network.to_string(), gw);
                gw
            }
        };
        resolve(gw).then(|| gw.to_string())
    }

    /// The largest image archive `POST /v1/images` takes.
    pub fn with_max_image_bytes(mut self, n: u64) -> Docker {
        self.max_image_bytes = n;
        self
    }

    pub fn max_image_bytes(&self) -> u64 {
        self.max_image_bytes
    }

    pub fn socket(&self) -> &str {
        &self.socket
    }

    async fn client(&self) -> Result<bollard::Docker, ExecutorError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let connect = |source| ExecutorError::Connect {
            socket: self.socket.clone(),
            source,
        };
        let c = bollard::Docker::connect_with_unix(
            &self.socket,
            TIMEOUT_S,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(connect)?
        .negotiate_version()
        .await
        .map_err(connect)?;
        tracing::info!(socket = %self.socket, api = %c.client_version(), "connected to docker");
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Loads a `docker save` archive (tar, optionally gzip-compressed); returns the names
    /// (or ids) Docker reports loading.
    pub async fn load_image<S, E>(&self, archive: S) -> Result<Vec<String>, ExecutorError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        let c = self.client().await?.with_timeout(LOAD_TIMEOUT);
        let mut out = c.import_image_stream(ImportImageOptions::default(), archive, None);
        let mut loaded = Vec::new();
        while let Some(item) = out.next().await {
            match item {
                Ok(info) => {
                    let line = info.stream.unwrap_or_default();
                    let name = line
                        .trim()
                        .strip_prefix("Loaded image: ")
                        .or_else(|| line.trim().strip_prefix("Loaded image ID: "));
                    if let Some(n) = name {
                        loaded.push(n.to_string());
                    }
                }
                Err(bollard::errors::Error::DockerStreamError { error }) => {
                    return Err(ExecutorError::Load(error))
                }
                Err(bollard::errors::Error::DockerResponseServerError { message, .. }) => {
                    return Err(ExecutorError::Load(message))
                }
                Err(source) => {
                    return Err(ExecutorError::Docker {
                        what: "load an image".into(),
                        source,
                    })
                }
            }
        }
        if loaded.is_empty() {
            return Err(ExecutorError::Load(
                "the archive held no image (make it with `docker save`)".into(),
            ));
        }
        Ok(loaded)
    }
}

impl super::images::Images for Docker {
    fn max_image_bytes(&self) -> u64 {
        Docker::max_image_bytes(self)
    }
    fn load(
        &self,
        archive: super::images::Archive,
    ) -> BoxFuture<'_, Result<Vec<String>, ExecutorError>> {
        Box::pin(self.load_image(archive))
    }
    fn images_in_use<'a>(
        &'a self,
        cluster: &'a str,
    ) -> BoxFuture<'a, Result<super::images::InUse, ExecutorError>> {
        Box::pin(Docker::images_in_use(self, cluster))
    }
    fn image_id<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, ExecutorError>> {
        Box::pin(Docker::image_id(self, name))
    }
    fn tag<'a>(&'a self, id: &'a str, name: &'a str) -> BoxFuture<'a, Result<(), ExecutorError>> {
        Box::pin(Docker::tag(self, id, name))
    }
    fn held(&self) -> BoxFuture<'_, Result<Vec<HeldImage>, ExecutorError>> {
        Box::pin(async move {
            let list = self
                .client()
                .await?
                .list_images(None::<bollard::query_parameters::ListImagesOptions>)
                .await
                .map_err(refused("list images"))?;
            let none = |n: &String| !n.starts_with("<none>");
            Ok(list
                .into_iter()
                .map(|i| HeldImage {
                    id: i.id,
                    tags: i.repo_tags.into_iter().filter(none).collect(),
                    digests: i.repo_digests.into_iter().filter(none).collect(),
                    size: u64::try_from(i.size).unwrap_or(0),
                })
                .collect())
        })
    }
    fn save<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Archive, ExecutorError>> {
        Box::pin(async move {
            let c = self.client().await?.with_timeout(LOAD_TIMEOUT);
            Ok(c.export_image(id)
                .map(|r| r.map_err(|e| super::images::BoxError::from(e.to_string())))
                .boxed())
        })
    }
    fn resolve<'a>(
        &'a self,
        reference: &'a str,
        auth: Option<super::RegistryAuth>,
    ) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let c = self.client().await.ok()?;
            let credentials = auth.map(|a| bollard::auth::DockerCredentials {
                username: Some(a.username),
                password: Some(a.password),
                ..Default::default()
            });
            let tagged = crate::spec::tagged(reference);
            let asked = c.inspect_registry_image(&tagged, credentials);
            let found = match tokio::time::timeout(RESOLVE_TIMEOUT, asked).await {
                Ok(Ok(d)) => d.descriptor.digest?,
                Ok(Err(e)) => {
                    tracing::debug!(image = %reference, err = %e, "the registry does not resolve it");
                    return None;
                }
                Err(_) => return None,
            };
            // `repo:tag` (the tag after the last `/`) becomes `repo@digest`.
            let repo = match tagged.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => r.to_string(),
                _ => tagged.clone(),
            };
            let pinned = format!("{repo}@{found}");
            crate::spec::is_pinned(&pinned).then_some(pinned)
        })
    }
    fn remove_image<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ExecutorError>> {
        Box::pin(async move {
            let c = self.client().await?;
            // Any container made from it, of this cluster or not, running or stopped, keeps
            // it (a forced removal would not ask).
            let users = c
                .list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: Some(HashMap::from([(
                        "ancestor".to_string(),
                        vec![id.to_string()],
                    )])),
                    ..Default::default()
                }))
                .await
                .map_err(refused("list containers"))?;
            if !users.is_empty() {
                return Err(ExecutorError::Load(format!(
                    "image {id} is used by {} container(s)",
                    users.len()
                )));
            }
            let options = bollard::query_parameters::RemoveImageOptions {
                force: true,
                ..Default::default()
            };
            match c.remove_image(id, Some(options), None).await {
                Ok(_) => Ok(()),
                Err(e) if not_found(&e) => Ok(()),
                Err(e) => Err(refused(format!("remove image {id}"))(e)),
            }
        })
    }
}

/// How long a registry may take to say what a tag names, when a spec is deployed.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

impl Docker {
    /// The image names this cluster's running containers on this Docker were made from, each
    /// with the image id it runs and an app that runs it.
    pub async fn images_in_use(
        &self,
        cluster: &str,
    ) -> Result<HashMap<String, (String, String)>, ExecutorError> {
        let c = self.client().await?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_CLUSTER}={cluster}")],
        )]);
        let running = c
            .list_containers(Some(ListContainersOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(refused("list containers"))?;
        // Containers run by id (a pinned revision) use every name that points at that id.
        let tags: HashMap<String, Vec<String>> = c
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .map_err(refused("list images"))?
            .into_iter()
            .map(|i| (i.id, i.repo_tags))
            .collect();
        let mut out = HashMap::new();
        for s in running {
            let (Some(app), Some(id)) = (
                s.labels.as_ref().and_then(|l| l.get(LABEL_APP)).cloned(),
                s.image_id,
            ) else {
                continue;
            };
            let mut names: Vec<String> = tags.get(&id).cloned().unwrap_or_default();
            names.extend(s.image.filter(|i| !crate::spec::is_image_id(i)));
            for n in names.into_iter().filter(|n| !n.starts_with("<none>")) {
                out.insert(super::images::full_name(&n), (id.clone(), app.clone()));
            }
        }
        Ok(out)
    }

    /// The id `name` points at now, if it names an image.
    pub async fn image_id(&self, name: &str) -> Result<Option<String>, ExecutorError> {
        match self.client().await?.inspect_image(name).await {
            Ok(i) => Ok(i.id),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(refused(format!("inspect image {name}"))(e)),
        }
    }

    /// Points `name` (`repo:tag`) at image `id`.
    pub async fn tag(&self, id: &str, name: &str) -> Result<(), ExecutorError> {
        let (repo, tag) = name.rsplit_once(':').unwrap_or((name, "latest"));
        self.client()
            .await?
            .tag_image(
                id,
                Some(bollard::query_parameters::TagImageOptions {
                    repo: Some(repo.to_string()),
                    tag: Some(tag.to_string()),
                }),
            )
            .await
            .map_err(refused(format!("tag image {name}")))
    }

    /// The Docker network serving the app's network `spec.network`: the one it already has,
    /// else a spare (and another made in the background), else one made now under the app
    /// network's name.
    async fn ensure_network(
        &self,
        c: &bollard::Docker,
        spec: &ContainerSpec,
    ) -> Result<String, ExecutorError> {
        use bollard::query_parameters::InspectNetworkOptions;
        if let Some(n) = self.nets().serving.get(&spec.network) {
            return Ok(n.clone());
        }
        match c
            .inspect_network(&spec.network, None::<InspectNetworkOptions>)
            .await
        {
            Ok(_) => return Ok(spec.network.clone()),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(refused(format!("inspect network {}", spec.network))(e)),
        }
        let taken = {
            let mut nets = self.nets();
            let n = nets.spare.pop();
            if let Some(n) = &n {
                nets.serving.insert(spec.network.clone(), n.clone());
            }
            n
        };
        if let (Some(cluster), Some(node)) =
            (spec.labels.get(LABEL_CLUSTER), spec.labels.get(LABEL_NODE))
        {
            self.make_spares(c, cluster, node);
        }
        if let Some(n) = taken {
            tracing::info!(network = %spec.network, docker_network = %n, "app network taken from the spares");
            return Ok(n);
        }
        let labels: HashMap<String, String> = [LABEL_CLUSTER, LABEL_NODE, LABEL_APP]
            .into_iter()
            .filter_map(|l| Some((l.to_string(), spec.labels.get(l)?.clone())))
            .collect();
        match create_network(c, &spec.network, labels).await {
            Ok(()) => {
                tracing::info!(network = %spec.network, "app network created");
                Ok(spec.network.clone())
            }
            // Made meanwhile by another start.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(spec.network.clone()),
            Err(e) => Err(refused(format!("create network {}", spec.network))(e)),
        }
    }

    fn nets(&self) -> std::sync::MutexGuard<'_, Nets> {
        self.nets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes spares in the background until there are `SPARES`, one at a time.
    fn make_spares(&self, c: &bollard::Docker, cluster: &str, node: &str) {
        {
            let mut nets = self.nets();
            if nets.making || nets.spare.len() >= SPARES {
                return;
            }
            nets.making = true;
        }
        let (c, nets) = (c.clone(), self.nets.clone());
        let (cluster, node) = (cluster.to_string(), node.to_string());
        tokio::spawn(async move {
            loop {
                let name = format!(
                    "{}-spare-{:08x}",
                    network_name(&cluster, &node, "").trim_end_matches('-'),
                    rand::random::<u32>()
                );
                let mut labels = network_labels(&cluster, &node);
                labels.insert(LABEL_SPARE.to_string(), "1".to_string());
                let made = create_network(&c, &name, labels).await;
                let mut n = nets.lock().unwrap_or_else(|p| p.into_inner());
                match made {
                    Ok(()) => n.spare.push(name),
                    Err(e) => {
                        tracing::debug!(err = %e, "cannot make a spare network");
                        n.making = false;
                        return;
                    }
                }
                if n.spare.len() >= SPARES {
                    n.making = false;
                    return;
                }
            }
        });
    }

    /// Finds, once, which spare networks serve which app (from `containers`, all of this
    /// node's) and which are unused; makes spares up to `SPARES`.
    async fn recover_nets(
        &self,
        c: &bollard::Docker,
        cluster: &str,
        node: &str,
        containers: &[bollard::models::ContainerSummary],
    ) {
        use bollard::query_parameters::ListNetworksOptions;
        if self.nets().recovered {
            return;
        }
        let mut filters = network_labels(cluster, node)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>();
        filters.push(LABEL_SPARE.to_string());
        let Ok(spares) = c
            .list_networks(Some(ListNetworksOptions {
                filters: Some(HashMap::from([("label".to_string(), filters)])),
            }))
            .await
        else {
            return;
        };
        let spares: Vec<String> = spares.into_iter().filter_map(|n| n.name).collect();
        let mut serving = HashMap::new();
        for s in containers {
            let Some(app) = s.labels.as_ref().and_then(|l| l.get(LABEL_APP)) else {
                continue;
            };
            let on = s
                .network_settings
                .as_ref()
                .and_then(|n| n.networks.as_ref())
                .into_iter()
                .flat_map(|n| n.keys());
            for n in on.filter(|n| spares.contains(n)) {
                serving.insert(network_name(cluster, node, app), n.clone());
            }
        }
        let mut unused: Vec<String> = spares
            .into_iter()
            .filter(|n| !serving.values().any(|s| s == n))
            .collect();
        // More than are kept: leftovers of a smaller setting.
        for n in unused.split_off(unused.len().min(SPARES)) {
            let _ = c.remove_network(&n).await;
        }
        {
            let mut nets = self.nets();
            if nets.recovered {
                return;
            }
            nets.serving = serving;
            nets.spare = unused;
            nets.recovered = true;
        }
        self.make_spares(c, cluster, node);
    }
}

/// The labels of this node's networks.
fn network_labels(cluster: &str, node: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_CLUSTER.to_string(), cluster.to_string()),
        (LABEL_NODE.to_string(), node.to_string()),
    ])
}

/// A bridge network whose containers reach each other.
async fn create_network(
    c: &bollard::Docker,
    name: &str,
    labels: HashMap<String, String>,
) -> Result<(), bollard::errors::Error> {
    let req = bollard::models::NetworkCreateRequest {
        name: name.to_string(),
        driver: Some("bridge".into()),
        labels: Some(labels),
        options: Some(HashMap::from([(
            "com.docker.network.bridge.enable_icc".to_string(),
            "true".to_string(),
        )])),
        ..Default::default()
    };
    c.create_network(req).await.map(drop)
}

/// At most this much of a probe's answer is read (its status line is all that counts).
const PROBE_READ_LIMIT: usize = 64 * 1024;

/// `GET path` on `ip:port`: any 2xx or 3xx answer is healthy.
async fn probe_http(ip: &str, port: u16, path: &str) -> Result<(), String> {
    use http_body_util::{BodyExt, Empty};
    let addr = format!("{ip}:{port}");
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, &addr)
        .header(hyper::header::USER_AGENT, "shoal-probe")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let answer = send.send_request(req).await;
    let out = match answer {
        Ok(resp) => {
            let status = resp.status();
            // Drain a little of the body so the app sees a clean close, no more.
            let _ = http_body_util::Limited::new(resp.into_body(), PROBE_READ_LIMIT)
                .collect()
                .await;
            if status.is_success() || status.is_redirection() {
                Ok(())
            } else {
                Err(format!("GET {path}: HTTP {}", status.as_u16()))
            }
        }
        Err(e) => Err(format!("GET {path}: {e}")),
    };
    conn.abort();
    out
}

impl Docker {
    /// Runs `cmd` in container `id`; its exit code.
    async fn exec(&self, id: &str, cmd: &[String]) -> Result<i64, String> {
        use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
        use futures_util::StreamExt;
        let c = self.client().await.map_err(|e| e.to_string())?;
        let created = c
            .create_exec(
                id,
                CreateExecOptions {
                    cmd: Some(cmd.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("exec: {e}"))?;
        let started = c
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: Some(PROBE_READ_LIMIT),
                }),
            )
            .await
            .map_err(|e| format!("exec: {e}"))?;
        if let StartExecResults::Attached { mut output, .. } = started {
            // Its output is not kept; reading it to the end is waiting for the command.
            let mut read = 0usize;
            while let Some(chunk) = output.next().await {
                read += chunk.map(|c| c.into_bytes().len()).unwrap_or(0);
                if read > PROBE_READ_LIMIT {
                    break;
                }
            }
        }
        let inspected = c
            .inspect_exec(&created.id)
            .await
            .map_err(|e| format!("exec: {e}"))?;
        inspected
            .exit_code
            .ok_or_else(|| "exec: no exit code".to_string())
    }
}

impl ContainerRuntime for Docker {
    async fn probe(
        &self,
        id: &str,
        ip: Option<&str>,
        kind: &crate::spec::ProbeKind,
    ) -> Result<(), String> {
        use crate::spec::ProbeKind;
        let need_ip = || ip.ok_or_else(|| "the container has no address".to_string());
        match kind {
            ProbeKind::None => Ok(()),
            ProbeKind::Tcp { port } => {
                let addr = format!("{}:{port}", need_ip()?);
                tokio::net::TcpStream::connect(&addr)
                    .await
                    .map(drop)
                    .map_err(|e| format!("{addr}: {e}"))
            }
            ProbeKind::Http { port, path } => probe_http(need_ip()?, *port, path).await,
            ProbeKind::Exec(cmd) => match self.exec(id, cmd).await? {
                0 => Ok(()),
                code => Err(format!("{} exited with {code}", cmd[0])),
            },
        }
    }

    async fn guard_host(
        &self,
    ) -> Result<Option<super::firewall::Asserted>, super::firewall::FirewallError> {
        tokio::task::spawn_blocking(super::firewall::assert_rules)
            .await
            .map_err(|e| super::firewall::FirewallError::Spawn(std::io::Error::other(e)))?
            .map(Some)
    }

    async fn prune_networks(&self, cluster: &str, node: &str) -> Result<(), ExecutorError> {
        use bollard::query_parameters::PruneNetworksOptions;
        let c = self.client().await?;
        // Spares are kept; those serving an app are tried one by one (Docker refuses to
        // remove a network with containers on it).
        let filters = HashMap::from([
            (
                "label".to_string(),
                vec![
                    format!("{LABEL_CLUSTER}={cluster}"),
                    format!("{LABEL_NODE}={node}"),
                ],
            ),
            ("label!".to_string(), vec![LABEL_SPARE.to_string()]),
        ]);
        c.prune_networks(Some(PruneNetworksOptions {
            filters: Some(filters),
        }))
        .await
        .map_err(refused("prune app networks"))?;
        let serving: Vec<(String, String)> = self.nets().serving.clone().into_iter().collect();
        for (app_net, n) in serving {
            match c.remove_network(&n).await {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(_) => continue,
            }
            tracing::debug!(network = %app_net, docker_network = %n, "app network removed");
            let mut nets = self.nets();
            if nets.serving.get(&app_net) == Some(&n) {
                nets.serving.remove(&app_net);
            }
        }
        Ok(())
    }

    async fn list(&self, cluster: &str, node: &str) -> Result<Vec<Observed>, ExecutorError> {
        let c = self.client().await?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_CLUSTER}={cluster}"),
                format!("{LABEL_NODE}={node}"),
            ],
        )]);
        let summaries = c
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(refused("list containers"))?;
        self.recover_nets(&c, cluster, node, &summaries).await;
        let mut out = Vec::new();
        for s in summaries {
            let (Some(id), Some(labels)) = (s.id, s.labels) else {
                continue;
            };
            // A container with our cluster label but not our other labels is not ours to
            // manage (or was made by hand): it is left alone.
            let (Some(app), Some(replica), Some(version)) = (
                labels.get(LABEL_APP),
                labels.get(LABEL_REPLICA).and_then(|r| r.parse().ok()),
                labels.get(LABEL_VERSION),
            ) else {
                continue;
            };
            let running = s.state == Some(ContainerSummaryStateEnum::RUNNING);
            let ip = s
                .network_settings
                .and_then(|n| n.networks)
                .and_then(|n| n.into_values().find_map(|e| e.ip_address))
                .filter(|ip| !ip.is_empty());
            let exit_code = if running {
                None
            } else {
                c.inspect_container(&id, None::<InspectContainerOptions>)
                    .await
                    .ok()
                    .and_then(|i| i.state)
                    .and_then(|s| s.exit_code)
            };
            out.push(Observed {
                id,
                app: app.clone(),
                replica,
                version: version.clone(),
                running,
                exit_code,
                ip: if running { ip } else { None },
                ready: false,
            });
        }
        Ok(out)
    }

    async fn has_image(&self, image: &str) -> Result<bool, ExecutorError> {
        match self.client().await?.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(refused(format!("inspect image {image}"))(e)),
        }
    }

    async fn pull(
        &self,
        image: &str,
        auth: Option<super::RegistryAuth>,
    ) -> Result<(), ExecutorError> {
        use futures_util::StreamExt;
        let c = self.client().await?;
        let reference = crate::spec::tagged(image);
        let options = bollard::query_parameters::CreateImageOptions {
            from_image: Some(reference.clone()),
            ..Default::default()
        };
        let credentials = auth.map(|a| bollard::auth::DockerCredentials {
            username: Some(a.username),
            password: Some(a.password),
            ..Default::default()
        });
        let fail = |why: String| ExecutorError::Pull {
            image: reference.clone(),
            why,
        };
        let mut progress = c.create_image(Some(options), None, credentials);
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) => {
                    if let Some(e) = info.error_detail.and_then(|d| d.message) {
                        return Err(fail(e));
                    }
                }
                Err(bollard::errors::Error::DockerStreamError { error }) => {
                    return Err(fail(error))
                }
                Err(bollard::errors::Error::DockerResponseServerError { message, .. }) => {
                    return Err(fail(message))
                }
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        // A reference with a tag is found by that name; a bare one by `:latest`.
        if self.has_image(&reference).await? {
            Ok(())
        } else {
            Err(fail("the engine does not have it after the pull".into()))
        }
    }

    async fn start(&self, spec: &ContainerSpec) -> Result<super::Started, ExecutorError> {
        let c = self.client().await?;
        let network = self.ensure_network(&c, spec).await?;
        let dns = self.resolver_on(&c, &network).await;
        let host = HostConfig {
            dns: dns.map(|gw| vec![gw]),
            memory: spec.memory_bytes,
            // No swap beyond the memory limit.
            memory_swap: spec.memory_bytes,
            nano_cpus: spec.nano_cpus,
            pids_limit: Some(PIDS_LIMIT),
            // A small init (Docker's, tini) as PID 1: the app gets SIGTERM on stop even when
            // it installs no handler, and its orphans are reaped.
            init: Some(true),
            // No privileges beyond Docker's defaults, and none gained through setuid files.
            privileged: Some(false),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(CAPABILITIES.iter().map(|c| c.to_string()).collect()),
            network_mode: Some(network.clone()),
            // Named volumes, made by the mount when missing, labelled like the container.
            mounts: (!spec.volumes.is_empty()).then(|| {
                spec.volumes
                    .iter()
                    .map(|(name, path)| Mount {
                        target: Some(path.clone()),
                        source: Some(name.clone()),
                        typ: Some(MountType::VOLUME),
                        read_only: Some(false),
                        volume_options: Some(MountVolumeOptions {
                            labels: Some(
                                spec.labels
                                    .iter()
                                    .filter(|(k, _)| {
                                        *k == super::LABEL_APP || *k == super::LABEL_CLUSTER
                                    })
                                    .map(|(k, v)| (k.clone(), v.clone()))
                                    .collect(),
                            ),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect()
            }),
            // The executor restarts failed replicas itself (with backoff, recorded in the task).
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".into(), "10m".into()),
                    ("max-file".into(), "3".into()),
                ])),
            }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            exposed_ports: spec.port.map(|p| vec![format!("{p}/tcp")]),
            host_config: Some(host),
            ..Default::default()
        };
        let created = c
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(spec.name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| {
                // A network removed behind our back is found again (or made) next time.
                if not_found(&e) {
                    self.nets().serving.remove(&spec.network);
                }
                refused(format!("create container {}", spec.name))(e)
            })?;
        if let Err(e) = c.start_container(&created.id, None).await {
            // Leave nothing half made behind.
            let _ = self.remove(&created.id).await;
            return Err(refused(format!("start container {}", spec.name))(e));
        }
        // Its address, so probing starts now (a failed look only waits for the next pass).
        let ip = c
            .inspect_container(&created.id, None::<InspectContainerOptions>)
            .await
            .ok()
            .and_then(|i| i.network_settings?.networks?.remove(&network)?.ip_address)
            .filter(|ip| !ip.is_empty());
        Ok(super::Started { id: created.id, ip })
    }

    async fn stops(
        &self,
        cluster: &str,
    ) -> Result<futures_util::stream::BoxStream<'static, ()>, ExecutorError> {
        let c = self.client().await?;
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("event".to_string(), vec!["die".to_string()]),
            (
                "label".to_string(),
                vec![format!("{LABEL_CLUSTER}={cluster}")],
            ),
        ]);
        let events = c.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        Ok(events
            .take_while(|e| futures_util::future::ready(e.is_ok()))
            .map(|_| ())
            .boxed())
    }

    async fn remove(&self, id: &str) -> Result<(), ExecutorError> {
        let c = self.client().await?;
        match c
            .stop_container(
                id,
                Some(StopContainerOptions {
                    t: Some(STOP_GRACE_S),
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => {}
            // Already stopped (304 is not an error to bollard) or already gone.
            Err(e) if not_found(&e) => return Ok(()),
            Err(e) => {
                tracing::warn!(container = %id, err = %e, "cannot stop container: removing it by force")
            }
        }
        match c
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(refused(format!("remove container {id}"))(e)),
        }
    }
}
