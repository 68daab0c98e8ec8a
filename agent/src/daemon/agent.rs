//! `shoal agent`: binds the listeners, starts the core, the endpoints and discovery, and on
//! shutdown stops them in order within a deadline.

use super::{retry_join, start, wall_ms, Counters, DaemonError, Handle};
use crate::api;
use crate::config::AgentConfig;
use crate::store::{Bytes, Key};
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The address peers should use: configured, the API listen address, or the first
/// non-loopback interface address when the API listens on every address.
pub fn advertise_addr(cfg: &AgentConfig) -> String {
    if let Some(a) = &cfg.advertise {
        return a.clone();
    }
    let api = cfg.listen.api;
    if !api.ip().is_unspecified() {
        return api.to_string();
    }
    let ip = if_addrs::get_if_addrs()
        .ok()
        .and_then(|ifs| {
            ifs.into_iter()
                .map(|i| i.ip())
                .find(|ip| matches!(ip, IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_link_local()))
        })
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, api.port()).to_string()
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen { addr, source })
}

fn read_admin_token(cfg: &AgentConfig) -> Option<Arc<str>> {
    let path = cfg.bundle_dir().join("admin.token");
    let t = std::fs::read_to_string(&path).ok()?;
    let t = t.trim();
    if t.is_empty() {
        tracing::warn!(path = %path.display(), "admin token file is empty: writes are disabled");
        return None;
    }
    Some(t.into())
}

/// Publishes this node's own record (observed state, written only by us).
async fn publish_node_record(h: &Handle, cfg: &AgentConfig) -> Result<(), DaemonError> {
    let key = Key::join(crate::store::Keyspace::Nodes, &[h.me.id.as_str()])
        .map_err(DaemonError::Write)?;
    let record = json!({
        "id": h.me.id,
        "addr": h.me.addr,
        "version": api::status::VERSION,
        "started_at_ms": h.started_ms,
        "labels": cfg.labels,
    });
    h.write(vec![(key, Some(Bytes::from(record.to_string())))])
        .await?;
    Ok(())
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let machine_id = std::fs::read_to_string("/etc/machine-id").ok();
    let id = cfg.resolve_node_id(machine_id.as_deref())?;
    let advertise = advertise_addr(&cfg);
    let token = read_admin_token(&cfg);
    let status_listener = bind(cfg.listen.status).await?;
    let api_listener = bind(cfg.listen.api).await?;
    let counters = Arc::new(Counters::default());
    let core_stop = CancellationToken::new();
    let core = start(
        &cfg,
        id.clone(),
        advertise.clone(),
        token.clone(),
        counters,
        core_stop.clone(),
    )?;
    let h = core.handle.clone();
    tracing::info!(
        node = %id,
        %advertise,
        status = %cfg.listen.status,
        api = %cfg.listen.api,
        writes = token.is_some(),
        "agent started"
    );

    // Our own record is durable before anything answers, so "healthy" implies "announced".
    if let Err(e) = publish_node_record(&h, &cfg).await {
        tracing::error!(err = %e, "cannot publish this node's record");
    }

    let tracker = TaskTracker::new();
    let status_h = h.clone();
    tracker.spawn(api::serve(
        status_listener,
        move |req, remote| api::status::handle(req, remote, status_h.clone()),
        shutdown.clone(),
        tracker.clone(),
    ));
    let api_h = h.clone();
    tracker.spawn(api::serve(
        api_listener,
        move |req, remote| api::control::handle(req, remote, api_h.clone()),
        shutdown.clone(),
        tracker.clone(),
    ));
    tracker.spawn(retry_join(
        h.clone(),
        cfg.peers.clone(),
        Duration::from_millis(cfg.discovery.retry_join_ms.max(100)),
        shutdown.clone(),
    ));

    shutdown.cancelled().await;
    let t0 = wall_ms();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("endpoints did not stop within 5 s");
    }
    // The core goes last: it announces our departure and flushes the store.
    core_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), core.task).await;
    tracing::info!(took_ms = wall_ms() - t0, "agent stopped");
    Ok(())
}
