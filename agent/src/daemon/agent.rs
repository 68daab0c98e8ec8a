//! `shoal agent`: binds the listeners, starts the core, the endpoints and discovery, and on
//! shutdown stops them in order within a deadline.

use super::{bootstrap, start, DaemonError, Security};
use crate::api;
use crate::clock::wall_ms;
use crate::config::AgentConfig;
use crate::discovery::{self, mdns::Mdns};
use crate::executor::docker::Docker;
use crate::executor::ContainerRuntime;
use crate::identity::cert::{pem_to_der, NodeIdentity};
use crate::identity::secrets::SecretKey;
use crate::identity::vouch::{NodeSigner, Vouchers};
use crate::identity::{cluster_hash, Credentials, IdentityError, Trust};
use crate::state::records::NodeRecord;
use crate::state::{Counters, Handle};
use crate::tls::{MemberCheck, Tls};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
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

/// The kernel's queue of connections not yet accepted. At the usual 128, a burst of clients
/// (or of hostile connects) backs up in SYN retries although the agent accepts at once.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    let err = |source| DaemonError::Listen { addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

/// The addresses a new certificate names: the advertised one and every interface's.
/// The IP of an advertised `ip:port` (none for a `host:port`).
fn advertised_ip(advertise: &str) -> Vec<IpAddr> {
    advertise
        .parse::<SocketAddr>()
        .map(|a| vec![a.ip()])
        .unwrap_or_default()
}

fn cert_addrs(advertise: &str) -> Vec<IpAddr> {
    let mut ips = advertised_ip(advertise);
    if let Ok(ifs) = if_addrs::get_if_addrs() {
        ips.extend(ifs.into_iter().map(|i| i.ip()));
    }
    ips.sort();
    ips.dedup();
    ips
}

fn unix_now() -> i64 {
    (wall_ms() / 1000) as i64
}

/// This node's certificate: the stored one while it is good, else a new one, issued here when
/// the node holds the bundle, or obtained from a member with the join secret.
async fn node_identity(
    cfg: &AgentConfig,
    id: &str,
    creds: &Credentials,
    advertise: &str,
    mdns: Option<&Mdns>,
    shutdown: &CancellationToken,
) -> Result<NodeIdentity, DaemonError> {
    let advertised = advertised_ip(advertise);
    let ca = match creds {
        Credentials::Bundle(b) => Some(b.ca_cert.as_str()),
        Credentials::JoinSecret { .. } => None,
    };
    // A renewal in the same cluster, for the same id, keeps the key: everything the node
    // signed with it stays verifiable on every node, including ones that join later.
    let mut keep_key: Option<String> = None;
    if let Some(stored) = NodeIdentity::load(&cfg.state_dir)? {
        let foreign = match creds {
            Credentials::JoinSecret {
                cluster: Some(c), ..
            } if c.id != stored.cluster.id => Some("it is from another cluster".to_string()),
            _ => None,
        };
        let same_cluster = foreign.is_none()
            && ca.is_none_or(|ca| pem_to_der(ca).ok() == pem_to_der(&stored.ca_pem).ok());
        let same_node = stored.info().is_ok_and(|i| i.common_name == id);
        match foreign.or_else(|| stored.stale_because(ca, id, &advertised, unix_now())) {
            None => return Ok(stored),
            Some(why) => {
                tracing::info!(reason = %why, keeps_key = same_cluster && same_node, "replacing this node's certificate")
            }
        }
        if same_cluster && same_node {
            keep_key = Some(stored.key_pem.clone());
        }
    }
    let addrs = cert_addrs(advertise);
    let fresh = match creds {
        Credentials::Bundle(b) => NodeIdentity::issue_with_key(
            &b.cluster,
            &b.ca_cert,
            &b.ca_key,
            id,
            &addrs,
            keep_key.as_deref(),
        )?,
        Credentials::JoinSecret {
            secret, cluster, ..
        } => {
            tracing::info!(
                "this node holds the join secret only: asking a member for a certificate"
            );
            let hash = cluster.as_ref().map(|c| cluster_hash(&c.id));
            let peers = cfg.peers.clone();
            let candidates = || {
                let mut v = peers.clone();
                for s in mdns.map(|m| m.seen()).unwrap_or_default() {
                    let ours = hash.as_ref().is_none_or(|h| *h == s.cluster_hash);
                    if s.id != id && ours {
                        v.extend(s.addrs.iter().map(|a| a.to_string()));
                    }
                }
                v
            };
            bootstrap::obtain(
                secret,
                cluster.as_ref(),
                id,
                &addrs,
                keep_key.as_deref(),
                candidates,
                shutdown,
            )
            .await?
        }
    };
    fresh.save(&cfg.state_dir)?;
    tracing::info!(cluster = %fresh.cluster.name, "this node's certificate is stored");
    Ok(fresh)
}

/// Says loudly when peers' clocks put this node out of bounds, and when it is back.
async fn watch_clock(h: Handle, shutdown: CancellationToken) {
    let mut skewed = false;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let v = h.clock.view(wall_ms());
        if v.skewed != skewed {
            skewed = v.skewed;
            if skewed {
                tracing::error!(
                    offset_s = v.offset_ms / 1000,
                    peers = v.peers,
                    "this node's clock is out of bounds with its peers': its writes would be refused, so the API answers 503; fix its time (NTP)"
                );
            } else {
                tracing::info!(
                    offset_s = v.offset_ms / 1000,
                    "this node's clock agrees with its peers' again"
                );
            }
        }
    }
}

/// Joins peers as discovery finds them: configured peers and DNS names, and mDNS (advertising
/// this node) when it runs.
fn discover(
    h: &Handle,
    cfg: &AgentConfig,
    mdns: Option<&Arc<Mdns>>,
    advertise: &str,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let every = Duration::from_millis(cfg.discovery.retry_join_ms.max(100));
    tracker.spawn(discovery::retry_join(
        h.clone(),
        cfg.peers.clone(),
        every,
        shutdown.clone(),
    ));
    if let Some(m) = mdns {
        let port = advertise
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(cfg.listen.api.port());
        let ips = advertised_ip(advertise);
        match m.advertise(
            h.me.id.as_str(),
            &h.trust.cluster_hash,
            port,
            crate::VERSION,
            &ips,
        ) {
            Ok(()) => tracing::info!(service = discovery::mdns::SERVICE_TYPE, "mDNS: advertising"),
            Err(e) => tracing::warn!(err = %e, "mDNS: cannot advertise"),
        }
        tracker.spawn(discovery::mdns_join(
            h.clone(),
            m.clone(),
            every,
            Duration::from_millis(cfg.discovery.mdns_window_ms),
            shutdown.clone(),
        ));
    }
}

/// What this node trusts and presents: its certificate and key, the CA, the operator key,
/// the data key (wrapped in the user-data, else as the member that admitted it wrapped it,
/// else derived from the join secret in a cluster made before wrapping).
fn security(
    cfg: &AgentConfig,
    creds: &Credentials,
    identity: &NodeIdentity,
) -> Result<Security, DaemonError> {
    let ca_key = match &creds {
        Credentials::Bundle(b) => Some(b.ca_key.clone()),
        Credentials::JoinSecret { .. } => None,
    };
    // The operator key: from the bundle, else as the join reply (authenticated by the join
    // secret) named it.
    let operator_key = match &creds {
        Credentials::Bundle(b) => b.cluster.operator_key.clone(),
        Credentials::JoinSecret { cluster, .. } => {
            cluster.as_ref().and_then(|c| c.operator_key.clone())
        }
    }
    .or_else(|| identity.cluster.operator_key.clone());
    let mut cluster = identity.cluster.clone();
    cluster.operator_key = operator_key;
    let bad_identity = |reason: String| {
        DaemonError::Identity(IdentityError::Read {
            path: cfg.bundle_dir().display().to_string(),
            reason,
        })
    };
    let given = match &creds {
        Credentials::Bundle(b) => Some(b.data_key.as_str()),
        Credentials::JoinSecret { data_key, .. } => data_key.as_deref(),
    };
    let data_key = SecretKey::first_of(
        &[given, identity.data_key.as_deref()],
        creds.join_secret(),
        &cluster.id,
    )
    .map_err(|e| {
        bad_identity(format!(
            "the cluster's data key does not open with this node's join secret ({e}): give the node user-data from the same bundle"
        ))
    })?;
    let trust = Trust::new(
        cluster,
        identity.ca_pem.clone(),
        ca_key,
        creds.join_secret().to_string(),
        data_key,
        identity.info().map(|i| i.not_after_unix).unwrap_or(0),
    )
    .map_err(|e| bad_identity(e.to_string()))?;
    if trust.operator.is_none() {
        tracing::warn!("no operator key (cluster.json operator_key): this node takes no writes and refuses every app and secret from peers");
    }
    let signer = NodeSigner::new(&identity.key_pem, &identity.cert_pem)
        .map_err(|e| bad_identity(e.to_string()))?;
    let vouch = Vouchers::new(
        Arc::new(MemberCheck::new(&identity.ca_pem)?),
        trust.operator.into_iter().collect(),
    );
    let tls = Tls::new(identity)?;
    Ok(Security {
        tls,
        trust: Arc::new(trust),
        signer: Arc::new(signer),
        vouch: Box::new(vouch),
    })
}

/// What the agent runs on. `run` makes them from the config on a real machine; a test
/// hands in its own (listeners it bound, a machine id, a fake runtime).
pub struct Parts<R> {
    pub status_listener: TcpListener,
    pub api_listener: TcpListener,
    /// The ingress (`listen.http`, and `listen.https` for TLS).
    pub http_listener: TcpListener,
    pub https_listener: TcpListener,
    /// `/etc/machine-id`'s text, which names the node when the config does not.
    pub machine_id: Option<String>,
    pub mdns: Option<Arc<Mdns>>,
    /// The container runtime, when this node runs containers.
    pub runtime: Option<Arc<R>>,
    /// The resolver on the runtime's app networks: where the ingress tells the cluster's
    /// own apps from outside clients.
    pub resolver: Option<Arc<crate::ingress::dns::Resolver>>,
}

/// Runs the agent on this machine until `shutdown` is cancelled: binds the configured
/// listeners (a port conflict is reported before anything else happens), reads the machine
/// id, starts mDNS and connects the configured Docker, then `run_with` them.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let status_listener = bind(cfg.listen.status).await?;
    let api_listener = bind(cfg.listen.api).await?;
    let http_listener = bind(cfg.listen.http).await?;
    let https_listener = bind(cfg.listen.https).await?;
    let mdns = if cfg.discovery.mdns {
        match Mdns::start() {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                tracing::warn!(err = %e, "mDNS is unavailable: only configured peers are joined");
                None
            }
        }
    } else {
        None
    };
    let resolver = cfg
        .docker
        .enabled
        .then(crate::ingress::dns::Resolver::from_system);
    let runtime = resolver.clone().map(|r| {
        tracing::info!(socket = %cfg.docker.socket.display(), "containers run on this Docker");
        Arc::new(
            Docker::new(&cfg.docker.socket.to_string_lossy())
                .with_max_image_bytes(cfg.docker.max_image_bytes)
                .with_resolver(Arc::new(move |ip| r.listen(ip))),
        )
    });
    let parts = Parts {
        status_listener,
        api_listener,
        http_listener,
        https_listener,
        machine_id: std::fs::read_to_string("/etc/machine-id").ok(),
        mdns,
        runtime,
        resolver,
    };
    run_with(cfg, parts, shutdown).await
}

/// Runs the agent on `parts` until `shutdown` is cancelled: the composition root.
pub async fn run_with<R: ContainerRuntime + 'static>(
    cfg: AgentConfig,
    parts: Parts<R>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let Parts {
        status_listener,
        api_listener,
        http_listener,
        https_listener,
        machine_id,
        mdns,
        runtime,
        resolver,
    } = parts;
    let id = cfg.resolve_node_id(machine_id.as_deref())?;
    let acme =
        crate::ingress::acme::Acme::new(&cfg.acme).map_err(crate::config::ConfigError::Invalid)?;
    let advertise = advertise_addr(&cfg);
    if let Some(crate::config::BundleSource::Inline(b)) = &cfg.bundle {
        // From user-data (init's node.json): the same bundle on every boot, kept where a
        // directory bundle would be.
        b.write_node(&cfg.bundle_dir())?;
    }
    let creds = Credentials::load(&cfg.bundle_dir())?;
    let counters = Arc::new(Counters::default());
    let identity = node_identity(
        &cfg,
        id.as_str(),
        &creds,
        &advertise,
        mdns.as_deref(),
        &shutdown,
    )
    .await?;
    let security = security(&cfg, &creds, &identity)?;
    let acceptor = TlsAcceptor::from(security.tls.server.clone());
    let core_stop = CancellationToken::new();
    let core = start(
        &cfg,
        id.clone(),
        advertise.clone(),
        security,
        counters.clone(),
        core_stop.clone(),
    )?;
    let h = core.handle.clone();
    tracing::info!(
        node = %id,
        cluster = %h.trust.cluster.name,
        %advertise,
        status = %cfg.listen.status,
        api = %cfg.listen.api,
        writes = h.trust.operator.is_some(),
        signs_joins = h.trust.ca_key.is_some(),
        mdns = mdns.is_some(),
        "agent started"
    );

    // Our own record is durable before anything answers, so "healthy" implies "announced".
    let capacity = machine_capacity();
    if let Err(e) = NodeRecord::publish(&h, cfg.labels.clone(), runtime.is_some(), capacity).await {
        tracing::error!(err = %e, "cannot publish this node's record");
    }

    let tracker = TaskTracker::new();
    let api_ctx = api::control::Api::new(
        h.clone(),
        runtime
            .clone()
            .map(|r| r as Arc<dyn crate::executor::images::Images>),
    );
    let endpoints = Endpoints {
        status: status_listener,
        api: api_listener,
        acceptor,
        limits: api::Limits {
            max_conns: cfg.listen.max_connections.max(1),
            idle: Duration::from_millis(cfg.listen.idle_timeout_ms.max(100)),
            proxy_from: &[],
        },
    };
    let conn_limits = endpoints.limits;
    let proxy = crate::ingress::start(
        crate::ingress::Ingress {
            listener: http_listener,
            tls_listener: Some((https_listener, counters.clone())),
            domain: cfg.ingress.domain.clone(),
            limits: crate::ingress::proxy::Limits {
                max_body: cfg.ingress.max_body_bytes,
                answer_within: Duration::from_millis(cfg.ingress.answer_timeout_ms.max(1)),
                max_tunnels: cfg.listen.max_connections.max(1),
                tunnel_idle: Duration::from_millis(cfg.ingress.tunnel_idle_timeout_ms.max(100)),
            },
            conns: crate::http::Limits {
                // Read once per process, kept for its life.
                proxy_from: Box::leak(
                    cfg.ingress
                        .proxy_sources()
                        .unwrap_or_default()
                        .into_boxed_slice(),
                ),
                ..conn_limits
            },
            counters: counters.ingress_conns.clone(),
            load_interval: Duration::from_millis(cfg.autoscale.interval_ms.max(100)),
            acme: Some(acme),
            app_gateways: resolver
                .map(|r| -> crate::ingress::proxy::AppGateway { Arc::new(move |ip| r.serves(ip)) }),
        },
        h.clone(),
        &tracker,
        &shutdown,
    );
    let mut api_ctx = api_ctx;
    let drains = proxy.clone();
    api_ctx.ingress = Some(proxy);
    endpoints.serve(api_ctx, &counters, &tracker, &shutdown);
    tracker.spawn(watch_clock(h.clone(), shutdown.clone()));
    tracker.spawn(crate::autoscale::run(
        h.clone(),
        Duration::from_millis(cfg.autoscale.interval_ms.max(100)),
        shutdown.clone(),
    ));
    discover(&h, &cfg, mdns.as_ref(), &advertise, &tracker, &shutdown);

    if let Some(rt) = &runtime {
        tracing::info!("executor started");
        let peers =
            crate::peer::PeerClient::new(h.me.clone(), h.counters.clone(), &h.tls, h.clock.clone());
        let options = crate::executor::run::Options {
            every: Duration::from_millis(cfg.docker.reconcile_ms),
            image_grace: Duration::from_millis(cfg.docker.image_grace_ms),
            peers: Some(Arc::new(peers)),
            inflight: Some(Arc::new(move |ip| drains.inflight_to(ip))),
            drain_deadline: Duration::from_millis(cfg.docker.drain_timeout_ms),
        };
        tracker.spawn(crate::executor::run::run(
            rt.clone(),
            h.clone(),
            options,
            shutdown.clone(),
        ));
    }

    shutdown.cancelled().await;
    stop(mdns.as_deref(), tracker, core_stop, core).await;
    Ok(())
}

/// The two HTTP endpoints: status (plain, read-only) and API (mutual TLS).
struct Endpoints {
    status: tokio::net::TcpListener,
    api: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    limits: api::Limits,
}

impl Endpoints {
    fn serve(
        self,
        api_ctx: api::control::Api,
        counters: &Arc<Counters>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let status_h = api_ctx.h.clone();
        let stats = api_ctx.ingress.as_ref().map(|p| p.stats.clone());
        tracker.spawn(api::serve(
            self.status,
            None,
            self.limits,
            counters.status_conns.clone(),
            move |req, conn| api::status::handle(req, conn, status_h.clone(), stats.clone()),
            shutdown.clone(),
            tracker.clone(),
        ));
        tracker.spawn(api::serve(
            self.api,
            Some(api::TlsListener {
                acceptor: self.acceptor,
                counters: counters.clone(),
            }),
            self.limits,
            counters.api_conns.clone(),
            move |req, conn| api::control::handle(req, conn, api_ctx.clone()),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
}

/// Stops mDNS and the endpoints (5 s at most), then the core, which announces our departure
/// and flushes the store.
async fn stop(
    mdns: Option<&Mdns>,
    tracker: TaskTracker,
    core_stop: CancellationToken,
    core: super::Core,
) {
    let t0 = wall_ms();
    if let Some(m) = mdns {
        m.stop().await;
    }
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("endpoints did not stop within 5 s");
    }
    core_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), core.task).await;
    tracing::info!(took_ms = wall_ms() - t0, "agent stopped");
}

/// This machine's CPUs and memory, from the kernel: what the scheduler may place here.
fn machine_capacity() -> Option<crate::scheduler::Capacity> {
    let cpus = std::thread::available_parallelism().ok()?.get() as u64;
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(crate::scheduler::Capacity {
        cpu_milli: cpus * 1000,
        memory_bytes: kib * 1024,
    })
}
