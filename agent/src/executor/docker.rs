//! `ContainerRuntime` for dockerd, through bollard. The connection is made on first use and
//! the API version negotiated then (Debian 12's Docker speaks 1.41): the agent starts before
//! dockerd answers, so a missing socket is an error of the moment, not of the agent.

use super::{ContainerRuntime, ContainerSpec, ExecutorError, Observed};
use super::{LABEL_APP, LABEL_CLUSTER, LABEL_NODE, LABEL_REPLICA, LABEL_VERSION};
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HostConfig, HostConfigLogConfig, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, ImportImageOptions, InspectContainerOptions,
    ListContainersOptions, RemoveContainerOptions, StopContainerOptions,
};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::Mutex;

/// Requests other than image loads; a load may take as long as its upload.
const TIMEOUT_S: u64 = 120;
const LOAD_TIMEOUT: Duration = Duration::from_secs(3600);
/// Seconds between SIGTERM and SIGKILL when a container is stopped.
const STOP_GRACE_S: i32 = 10;
/// At most this many processes per container: a fork bomb stays inside it.
const PIDS_LIMIT: i64 = 4096;

pub struct Docker {
    socket: String,
    client: Mutex<Option<bollard::Docker>>,
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
        }
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

impl ContainerRuntime for Docker {
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

    async fn start(&self, spec: &ContainerSpec) -> Result<String, ExecutorError> {
        let c = self.client().await?;
        let host = HostConfig {
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
            cap_drop: Some(vec!["NET_RAW".into()]),
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
            .map_err(refused(format!("create container {}", spec.name)))?;
        if let Err(e) = c.start_container(&created.id, None).await {
            // Leave nothing half made behind.
            let _ = self.remove(&created.id).await;
            return Err(refused(format!("start container {}", spec.name))(e));
        }
        Ok(created.id)
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
