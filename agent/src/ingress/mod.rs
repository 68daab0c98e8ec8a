//! The ingress: every node a front door for every app (`listen.http`, and `listen.https`
//! with the certificates `certs` chooses by SNI). `routes` decides which app answers a Host
//! and where its ready replicas are, from the replicated state alone; `proxy` passes
//! requests on. The table is rebuilt when apps, tasks or members change, and read by every
//! request; the certificates when `certs/` or `acme/` change. `acme` orders certificates
//! for the hosts of apps that ask, and every node answers its challenges.

pub mod acme;
pub mod certs;
pub mod dns;
pub mod metrics;
pub mod proxy;
pub mod routes;

use crate::state::records::{self, TaskState};
use crate::state::{ConnCounters, Handle};
use crate::store::entry::Keyspace;
use routes::Table;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{broadcast::error::RecvError, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the ingress of one node needs besides the node's state.
pub struct Ingress {
    pub listener: TcpListener,
    /// `listen.https`, and where its TLS refusals are counted.
    pub tls_listener: Option<(TcpListener, Arc<crate::state::Counters>)>,
    /// Apps answer to `<app>.<domain>` besides their `expose.hosts`.
    pub domain: String,
    pub limits: proxy::Limits,
    pub conns: crate::http::Limits,
    pub counters: Arc<ConnCounters>,
    /// How often this node's load goes to the store (`[autoscale] interval_ms`).
    pub load_interval: std::time::Duration,
    /// The ACME CA to order certificates from (`[acme]`), for the hosts this node owns.
    pub acme: Option<acme::Acme>,
    /// Which of this node's addresses its containers reach it at (`dns::Resolver::serves`).
    pub app_gateways: Option<proxy::AppGateway>,
}

/// Serves the ingress until `shutdown`; the proxy, which also serves the requests other
/// nodes pass on (`proxy::handle_hop`, from the API listener).
pub fn start(
    i: Ingress,
    h: Handle,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Arc<proxy::Proxy> {
    let (tx, rx) = watch::channel(Arc::new(Table::default()));
    let (wake_tx, wake_rx) = tokio::sync::mpsc::channel(256);
    let mut p =
        proxy::Proxy::new(rx.clone(), i.limits, Some(h.tls.client.clone())).with_waker(wake_tx);
    if let Some(g) = i.app_gateways {
        p = p.with_app_gateways(g);
    }
    let p = Arc::new(p);
    tracker.spawn(crate::autoscale::wake(h.clone(), wake_rx));
    tracker.spawn(publish(
        h.clone(),
        p.stats.clone(),
        rx,
        i.load_interval,
        shutdown.clone(),
    ));
    if let Some(a) = i.acme {
        tracker.spawn(acme::run(h.clone(), a, p.clone(), shutdown.clone()));
    }
    let mut served = None;
    if let Some((listener, tls_counters)) = i.tls_listener {
        let made = certs::Certs::new(&i.domain).and_then(|c| {
            let c = Arc::new(c);
            let config = c.server_config().map_err(|e| e.to_string())?;
            Ok((c, config))
        });
        match made {
            Ok((c, config)) => {
                served = Some(c);
                let serving = p.clone();
                tracker.spawn(crate::http::serve(
                    listener,
                    Some(crate::http::TlsListener {
                        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
                        counters: tls_counters,
                    }),
                    i.conns,
                    i.counters.clone(),
                    move |req, conn| proxy::handle(req, conn, serving.clone()),
                    shutdown.clone(),
                    tracker.clone(),
                ));
            }
            Err(e) => tracing::error!(err = %e, "the ingress serves no TLS"),
        }
    }
    tracker.spawn(keep_certs(h.clone(), served, p.clone(), shutdown.clone()));
    tracker.spawn(keep_table(h, i.domain, tx, shutdown.clone()));
    let serving = p.clone();
    tracker.spawn(crate::http::serve(
        i.listener,
        None,
        i.conns,
        i.counters,
        move |req, conn| proxy::handle(req, conn, serving.clone()),
        shutdown.clone(),
        tracker.clone(),
    ));
    p
}

/// Writes this node's ingress load every `interval` (and once more after it goes quiet),
/// and forgets the counters of apps no longer routed.
pub async fn publish(
    h: Handle,
    stats: Arc<metrics::Registry>,
    table: watch::Receiver<Arc<Table>>,
    interval: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Ok(key) = crate::store::keys::load(h.me.id.as_str()) else {
        return;
    };
    // Nothing is written until there is something to say.
    let mut quiet = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        {
            let t = table.borrow();
            stats.retain(|app| t.has_app(app));
        }
        let r = stats.load(
            crate::clock::now(),
            crate::clock::wall_ms(),
            interval.as_millis() as u64,
        );
        if r.apps.is_empty() && quiet {
            continue;
        }
        quiet = r.apps.is_empty();
        let Ok(v) = serde_json::to_vec(&r) else {
            continue;
        };
        if let Err(e) = h
            .write(vec![(key.clone(), Some(bytes::Bytes::from(v)))])
            .await
        {
            tracing::debug!(err = %e, "cannot record the ingress load");
        }
    }
}

/// Opens a sealed certificate record kept at `key`.
fn open_cert(
    h: &Handle,
    key: &str,
    c: &records::CertRecord,
) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    crate::identity::join::unhex(&c.key_sealed)
        .ok_or_else(|| "the sealed key is not hex".to_string())
        .and_then(|sealed| {
            h.trust
                .secrets
                .open(key, &sealed)
                .map_err(|e| e.to_string())
        })
        .and_then(|pem| String::from_utf8(pem).map_err(|e| e.to_string()))
        .and_then(|pem| certs::load(&c.chain_pem, &pem))
}

/// The certificates served by SNI, their keys opened, and the ACME challenges answered:
/// rebuilt whenever `certs/`, `acme/` or the apps change. An uploaded certificate wins over
/// an ACME one; an ACME one is served only for a host an app asks it for.
async fn keep_certs(
    h: Handle,
    served: Option<Arc<certs::Certs>>,
    proxy: Arc<proxy::Proxy>,
    shutdown: CancellationToken,
) {
    let mut changes = h.subscribe();
    loop {
        if let Some(served) = &served {
            let mut by_name = std::collections::HashMap::new();
            for (host, c) in records::certs(&h.store) {
                match open_cert(&h, &format!("certs/{host}"), &c) {
                    Ok(k) => {
                        by_name.insert(host, k);
                    }
                    Err(e) => {
                        tracing::warn!(%host, err = %e, "cannot serve an uploaded certificate")
                    }
                }
            }
            let wanted = acme::wanted(&records::apps(&h.store));
            for (host, c) in records::acme::<records::AcmeCert>(&h.store, "certs") {
                if !wanted.contains(&host) || by_name.contains_key(&host) {
                    continue;
                }
                match open_cert(&h, &format!("acme/certs/{host}"), &c.cert) {
                    Ok(k) => {
                        by_name.insert(host, k);
                    }
                    Err(e) => tracing::warn!(%host, err = %e, "cannot serve an ACME certificate"),
                }
            }
            tracing::debug!(certificates = by_name.len(), "ingress certificates loaded");
            served.replace(by_name);
        }
        let challenges = records::acme::<records::AcmeChallenge>(&h.store, "challenges")
            .into_iter()
            .map(|(token, c)| (token, (c.host, c.key_authorization, c.expires_ms)))
            .collect();
        proxy.set_challenges(challenges);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                c = changes.recv() => match c {
                    Ok(c) if !matches!(
                        c.entry.key.keyspace(),
                        Keyspace::Certs | Keyspace::Acme | Keyspace::Apps
                    ) => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        while changes.try_recv().is_ok() {}
                        break;
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }
}

/// The route table as this node sees the cluster now.
async fn table(h: &Handle, domain: &str) -> Option<Table> {
    let members = h.snapshot().await.ok()?.members;
    let live = |n: &str| {
        members
            .iter()
            .any(|m| m.id.as_str() == n && m.state.is_live())
    };
    let apps = records::apps(&h.store);
    // A task recorded by an earlier run of its node's agent says nothing about now.
    let nodes = records::nodes(&h.store);
    let started: std::collections::HashMap<&str, u64> = nodes
        .iter()
        .map(|n| (n.id.as_str(), n.started_at_ms))
        .collect();
    let addrs: std::collections::BTreeMap<String, String> = nodes
        .iter()
        .map(|n| (n.id.clone(), n.addr.clone()))
        .collect();
    let mut tasks = records::tasks(&h.store, "");
    tasks.retain(|t| {
        t.ready
            && t.state == TaskState::Running
            && started.get(t.node.as_str()) == Some(&t.agent_started_ms)
    });
    Some(routes::build(
        &apps,
        &tasks,
        h.me.id.as_str(),
        domain,
        live,
        &addrs,
    ))
}

/// Rebuilds the table whenever apps, tasks, nodes or members change.
async fn keep_table(
    h: Handle,
    domain: String,
    tx: watch::Sender<Arc<Table>>,
    shutdown: CancellationToken,
) {
    let mut changes = h.subscribe();
    let mut members = h.members.clone();
    let mut clashes = Vec::new();
    loop {
        if let Some(t) = table(&h, &domain).await {
            if t.clashes != clashes {
                for (host, keeper, others) in &t.clashes {
                    tracing::warn!(%host, %keeper, others = ?others, "more than one app claims a host: the first by name keeps it");
                }
                clashes = t.clashes.clone();
            }
            tx.send_replace(Arc::new(t));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            m = members.changed() => if m.is_err() {
                return;
            },
            c = changes.recv() => match c {
                Ok(c) if !matches!(
                    c.entry.key.keyspace(),
                    Keyspace::Apps | Keyspace::Tasks | Keyspace::Nodes
                ) => continue,
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    // Everything already queued makes one rebuild.
                    while changes.try_recv().is_ok() {}
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}
