//! The reverse proxy behind `listen.http`: a request goes to a ready replica of the app its
//! Host names (`routes`), the least busy of two picked at random among this node's (power
//! of two choices on requests in flight), with the client's address and the original host
//! and scheme passed on (`X-Forwarded-For/Proto/Host`, `Forwarded`) and hop-by-hop headers
//! dropped both ways (RFC 9110 §7.6.1). A replica that refuses the connection is tried once
//! more elsewhere when the request is idempotent and has no body.
//!
//! An app with no ready replica here is reached through a node that has one: the request
//! goes on over the cluster's mutual TLS (HTTP/2 to that node's API listener, pooled), marked
//! with `x-shoal-hop` (the host it was for), its forwarding headers already written by the
//! first node so the client's address survives the hop. Only a member's connection may carry
//! the mark, and a hop is passed to this node's own replicas only: never on again.

use super::routes::{Route, Table};
use crate::http::{full, Body, Conn};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type UpBody = BoxBody<Bytes, BoxError>;

/// What one request may cost.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest request body passed on (413 beyond).
    pub max_body: u64,
    /// How long a replica has to start its answer (504 after).
    pub answer_within: Duration,
    /// Upgraded connections (WebSocket) open at once; beyond, 503.
    pub max_tunnels: usize,
    /// An upgraded connection that moves no byte either way this long is closed.
    pub tunnel_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 64 << 20,
            answer_within: Duration::from_secs(60),
            max_tunnels: 4096,
            tunnel_idle: Duration::from_secs(300),
        }
    }
}

/// Replicas whose requests in flight are counted at once, before idle ones are forgotten.
const MAX_TRACKED: usize = 4096;

/// The mark of a request another node passed on: the host it was for.
pub const HOP: &str = "x-shoal-hop";

/// The mark of a node's answer to a hop it has no replica for (never shown to a client).
const GONE: &str = "x-shoal-replica-gone";

type HopClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, UpBody>;

pub struct Proxy {
    table: watch::Receiver<Arc<Table>>,
    client: Client<HttpConnector, UpBody>,
    /// To other nodes' API listeners, as a member: HTTP/2, and HTTP/1.1 for upgrades.
    hop: Option<HopClient>,
    hop1: Option<HopClient>,
    /// Upgraded connections open.
    tunnels: Arc<Semaphore>,
    /// What this node knows of each replica it sends to.
    inflight: Mutex<HashMap<SocketAddr, Arc<Backend>>>,
    limits: Limits,
    /// The proxy's clock: ejections are kept in ms since this.
    epoch: tokio::time::Instant,
    /// What each app's requests did here (`/metrics`, and the load the autoscaler reads).
    pub stats: Arc<super::metrics::Registry>,
    /// Where a request for an app scaled to zero asks for a replica (the app's name).
    waker: Option<tokio::sync::mpsc::Sender<String>>,
    /// Requests held while their apps wake.
    held: Arc<Semaphore>,
    /// ACME HTTP-01 challenges this node answers: token → (host, key authorization,
    /// until when in ms since the epoch).
    challenges: std::sync::RwLock<HashMap<String, (String, String, u64)>>,
    /// Whether an address of this node is where its containers reach it (an app network's
    /// gateway): requests that arrive there come from the cluster's own apps.
    app_gateway: Option<AppGateway>,
}

/// Says whether an address of this node is an app network's gateway.
pub type AppGateway = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// Requests held at once on one node while apps scaled to zero start; beyond, 503.
const MAX_HELD: usize = 4096;
/// How often a held request asks again for its app to be woken (a wake can be lost to a
/// scale-down written at the same moment).
const WAKE_AGAIN: Duration = Duration::from_secs(2);

/// Failures in a row (connect errors, resets, timeouts, 502/503/504) that leave a replica out.
const EJECT_AFTER: u32 = 3;
/// How long a first ejection lasts; each one in a row doubles it, up to `EJECT_MAX_MS`.
const EJECT_BASE_MS: u64 = 2_000;
const EJECT_MAX_MS: u64 = 30_000;

/// What this node knows of one replica: requests in flight (for the choice between two) and
/// failures in a row (passive ejection: left out of new choices for a while, as Envoy's
/// outlier detection does, unless every replica is).
#[derive(Debug, Default)]
struct Backend {
    inflight: AtomicUsize,
    fails: AtomicU32,
    ejections: AtomicU32,
    /// Until when (proxy ms) it gets no new request; 0: it does.
    out_until: AtomicU64,
}

impl Backend {
    fn out(&self, now_ms: u64) -> bool {
        self.out_until.load(Relaxed) > now_ms
    }

    fn succeeded(&self) {
        if self.fails.load(Relaxed) != 0 {
            self.fails.store(0, Relaxed);
        }
        if self.ejections.load(Relaxed) != 0 {
            self.ejections.store(0, Relaxed);
        }
    }

    /// Counts a failure; answers how long the replica is now left out for, if it just was.
    fn failed(&self, now_ms: u64) -> Option<u64> {
        // Answers to requests sent before it was left out do not stretch it.
        if self.out(now_ms) || self.fails.fetch_add(1, Relaxed) + 1 < EJECT_AFTER {
            return None;
        }
        self.fails.store(0, Relaxed);
        let n = self.ejections.fetch_add(1, Relaxed).min(10);
        let ms = (EJECT_BASE_MS << n).min(EJECT_MAX_MS);
        self.out_until.store(now_ms + ms, Relaxed);
        Some(ms)
    }
}

impl Proxy {
    /// A proxy reading `table`; with `tls` (this node's member client configuration), it
    /// reaches replicas on other nodes too.
    pub fn new(
        table: watch::Receiver<Arc<Table>>,
        limits: Limits,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Proxy {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(http.clone());
        http.enforce_http(false);
        let hop = tls.as_ref().map(|tls| {
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((**tls).clone())
                .https_only()
                .enable_http2()
                .wrap_connector(http.clone());
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .http2_only(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .build(https)
        });
        // An upgrade is HTTP/1.1's: its own connection, never pooled after.
        let hop1 = tls.map(|tls| {
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((*tls).clone())
                .https_only()
                .enable_http1()
                .wrap_connector(http);
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_max_idle_per_host(0)
                .build(https)
        });
        Proxy {
            table,
            client,
            hop,
            hop1,
            tunnels: Arc::new(Semaphore::new(limits.max_tunnels.max(1))),
            inflight: Mutex::new(HashMap::new()),
            limits,
            epoch: crate::clock::now(),
            stats: Arc::default(),
            waker: None,
            held: Arc::new(Semaphore::new(MAX_HELD)),
            challenges: Default::default(),
            app_gateway: None,
        }
    }

    /// Requests that arrive at an address `is_gateway` names come from this node's
    /// containers: only they (and members' hops) reach `<app>.internal`.
    pub fn with_app_gateways(mut self, is_gateway: AppGateway) -> Proxy {
        self.app_gateway = Some(is_gateway);
        self
    }

    /// Whether a connection came from one of this node's containers.
    fn inside(&self, conn: &Conn) -> bool {
        match (&self.app_gateway, conn.local) {
            (Some(f), Some(local)) => f(local.ip()),
            _ => false,
        }
    }

    /// Answers exactly these ACME challenges from now on.
    pub fn set_challenges(&self, c: HashMap<String, (String, String, u64)>) {
        *self.challenges.write().unwrap_or_else(|p| p.into_inner()) = c;
    }

    /// The key authorization to answer a challenge's `token` with, when asked for `host`.
    pub fn challenge(&self, token: &str, host: &str) -> Option<String> {
        let host = super::routes::normalize(host)?;
        let c = self.challenges.read().unwrap_or_else(|p| p.into_inner());
        let (for_host, answer, until) = c.get(token)?;
        (*for_host == host && crate::clock::wall_ms() <= *until).then(|| answer.clone())
    }

    /// Asks another node's ingress for `path` on `host`, as a member passing a request on
    /// (the hop): its status and the start of its body. How the ACME client sees that a
    /// node answers a challenge before it asks the CA to look.
    pub async fn ask_node(
        &self,
        addr: &str,
        host: &str,
        path: &str,
    ) -> Option<(StatusCode, Bytes)> {
        let hop = self.hop.as_ref()?;
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *req.uri_mut() = format!("https://{addr}{path}").parse().ok()?;
        req.headers_mut().insert(
            HeaderName::from_static(HOP),
            HeaderValue::from_str(host).ok()?,
        );
        let asked = async {
            let resp = hop.request(req).await.ok()?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), 4096).collect().await.ok()?;
            Some((status, body.to_bytes()))
        };
        tokio::time::timeout(Duration::from_secs(5), asked)
            .await
            .ok()?
    }

    /// Requests for apps scaled to zero are held and their names sent to `waker`, whose
    /// reader starts a replica.
    pub fn with_waker(mut self, waker: tokio::sync::mpsc::Sender<String>) -> Proxy {
        self.waker = Some(waker);
        self
    }

    /// Requests in flight to replicas at `ip` (any port); `None` when this node never sent
    /// one there (or forgot it, idle).
    pub fn inflight_to(&self, ip: IpAddr) -> Option<usize> {
        let m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = false;
        let n = m
            .iter()
            .filter(|(a, _)| a.ip() == ip)
            .inspect(|_| seen = true)
            .map(|(_, b)| b.inflight.load(Relaxed))
            .sum();
        seen.then_some(n)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn backend(&self, addr: SocketAddr) -> Arc<Backend> {
        let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        // Replicas come and go with new addresses: forget those no request holds.
        if m.len() >= MAX_TRACKED && !m.contains_key(&addr) {
            m.retain(|_, c| Arc::strong_count(c) > 1);
        }
        m.entry(addr).or_default().clone()
    }

    /// Whether every replica of the route on this node is left out for its failures.
    fn all_out(&self, route: &Route) -> bool {
        let now = self.now_ms();
        route.local.iter().all(|a| self.backend(*a).out(now))
    }

    /// The less busy of two replicas picked at random (the only one, if one), none of
    /// `not`; replicas left out for their failures only when every one is.
    fn pick(&self, route: &Route, not: &[SocketAddr]) -> Option<(SocketAddr, Arc<Backend>)> {
        let now = self.now_ms();
        let all: Vec<(SocketAddr, Arc<Backend>)> = route
            .local
            .iter()
            .filter(|a| !not.contains(a))
            .map(|a| (*a, self.backend(*a)))
            .collect();
        let mut choices: Vec<&(SocketAddr, Arc<Backend>)> =
            all.iter().filter(|(_, b)| !b.out(now)).collect();
        if choices.is_empty() {
            choices = all.iter().collect();
        }
        let chosen = match choices.len() {
            0 => return None,
            1 => choices[0],
            n => {
                let i = rand::random_range(0..n);
                let j = (i + rand::random_range(1..n)) % n;
                let (a, b) = (choices[i], choices[j]);
                if a.1.inflight.load(Relaxed) <= b.1.inflight.load(Relaxed) {
                    a
                } else {
                    b
                }
            }
        };
        Some(chosen.clone())
    }

    /// Notes how a request to a replica went.
    fn outcome(&self, app: &str, addr: SocketAddr, b: &Backend, ok: bool) {
        if ok {
            b.succeeded();
        } else if let Some(ms) = b.failed(self.now_ms()) {
            tracing::info!(%app, replica = %addr, for_ms = ms, "replica left out after failures in a row");
        }
    }
}

/// A plain-text answer of the proxy's own.
fn plain(status: StatusCode, msg: impl std::fmt::Display) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(format!("{msg}\n")))
        .unwrap_or_else(|_| Response::new(full("")))
}

/// The host a request is for: the URI's authority (HTTP/2, absolute form), else its one
/// Host header.
fn host_of(req: &Request<Incoming>) -> Result<String, &'static str> {
    if let Some(a) = req.uri().authority() {
        return Ok(a.as_str().to_string());
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(h), None) => h
            .to_str()
            .map(str::to_string)
            .map_err(|_| "the Host header is not text"),
        (None, _) => Err("the request names no host (Host header)"),
        (Some(_), Some(_)) => Err("the request has more than one Host header"),
    }
}

/// Drops the headers that concern one connection only: the fixed set and those `Connection`
/// lists.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        h.remove(n);
    }
}

/// Adds who asked, for what host, over what scheme: `X-Forwarded-For` extended with the
/// client's address, `X-Forwarded-Host` and `-Proto` set (a client cannot claim them),
/// `Forwarded` extended (RFC 7239).
pub fn add_forwarded(h: &mut HeaderMap, client: IpAddr, host: &str, proto: &str) {
    let xff = match h
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
    {
        before if before.is_empty() => client.to_string(),
        before => format!("{}, {client}", before.join(", ")),
    };
    let node = match client {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    let quoted_host: String = host
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
        .collect();
    let this = format!("for={node};host=\"{quoted_host}\";proto={proto}");
    let forwarded = match h
        .get_all(header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
    {
        before if before.is_empty() => this,
        before => format!("{}, {this}", before.join(", ")),
    };
    for (name, value) in [
        ("x-forwarded-for", xff),
        ("x-forwarded-host", quoted_host.clone()),
        ("x-forwarded-proto", proto.to_string()),
        ("forwarded", forwarded),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The protocol a request asks to switch to (HTTP/1.1 `Connection: upgrade` + `Upgrade`,
/// e.g. WebSocket).
fn upgrade_of(h: &HeaderMap) -> Option<HeaderValue> {
    let asked = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asked.then(|| h.get(header::UPGRADE).cloned()).flatten()
}

/// An upgrade asked of a replica: what the client's side needs once the replica agrees.
struct Upgrade {
    client: hyper::upgrade::OnUpgrade,
    _slot: OwnedSemaphorePermit,
}

/// Serves one request received on the ingress.
pub async fn handle(req: Request<Incoming>, conn: Conn, proxy: Arc<Proxy>) -> Response<Body> {
    let host = match host_of(&req) {
        Ok(h) => h,
        Err(why) => return plain(StatusCode::BAD_REQUEST, why),
    };
    if let Some(r) = challenge_answer(&proxy, req.uri(), &host) {
        return r;
    }
    let route = proxy.table.borrow().route(&host, || proxy.inside(&conn));
    let Some(mut route) = route else {
        return no_app(&host);
    };
    if !conn.tls && route.force_https && !req.uri().path().starts_with(ACME_CHALLENGE) {
        return to_https(&host, req.uri());
    }
    let start = crate::clock::now();
    let meter = proxy.stats.of(&route.app).map(|s| s.begin());
    if route.local.is_empty() && route.remote.is_empty() {
        if let Some(timeout) = route.wake {
            route = match wake(&proxy, &host, route, timeout, meter.as_ref()).await {
                Ok(r) => r,
                Err(resp) => return resp,
            };
        }
    }
    let (mut parts, body) = req.into_parts();
    // The mark is the nodes' own: a client's never reaches an app.
    parts.headers.remove(HOP);
    let proto = if conn.tls { "https" } else { "http" };
    add_forwarded(&mut parts.headers, conn.remote.ip(), &host, proto);
    let Some(meter) = meter else {
        return pass(parts, body, host, route, &proxy, true).await;
    };
    let counted = meter.stats().clone();
    let body = body.map_frame(move |f| {
        if let Some(d) = f.data_ref() {
            counted.bytes_in(d.len());
        }
        f
    });
    let resp = pass(parts, body, host, route, &proxy, true).await;
    meter
        .stats()
        .answered(resp.status().as_u16(), start.elapsed());
    let (parts, body) = resp.into_parts();
    let body = body
        .map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                meter.stats().bytes_out(d.len());
            }
            f
        })
        .boxed();
    Response::from_parts(parts, body)
}

fn no_app(host: &str) -> Response<Body> {
    plain(
        StatusCode::NOT_FOUND,
        format!("no app answers to {}", crate::http::short(host)),
    )
}

/// Holds a request for an app with no replica anywhere that wakes on traffic (scaled to
/// zero) until one is ready somewhere, asking for one meanwhile; 503 after `timeout`.
async fn wake(
    proxy: &Proxy,
    host: &str,
    route: Arc<Route>,
    timeout: Duration,
    meter: Option<&super::metrics::InFlight>,
) -> Result<Arc<Route>, Response<Body>> {
    let (Some(waker), Ok(_slot)) = (&proxy.waker, proxy.held.clone().try_acquire_owned()) else {
        return Err(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{} has no ready replica", route.app),
        ));
    };
    let _waiting = meter.map(|m| m.stats().hold());
    let deadline = crate::clock::now() + timeout;
    let mut table = proxy.table.clone();
    loop {
        let _ = waker.try_send(route.app.clone());
        let changed = tokio::time::timeout_at(
            deadline.min(crate::clock::now() + WAKE_AGAIN),
            table.changed(),
        )
        .await;
        if let Ok(Err(_)) = changed {
            break;
        }
        // The host was routed once already: where the request came from is settled.
        let now = table.borrow_and_update().route(host, || true);
        match now {
            None => return Err(no_app(host)),
            Some(r) if !r.local.is_empty() || !r.remote.is_empty() => {
                // Ready may mean only running (no health check): a replica just started may
                // not listen yet, and a refused first request would undo the wait.
                if let Some(addr) = r.local.first() {
                    loop {
                        let up =
                            tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr))
                                .await;
                        if matches!(up, Ok(Ok(_)) | Err(_)) || crate::clock::now() >= deadline {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                return Ok(r);
            }
            Some(_) if crate::clock::now() >= deadline => break,
            Some(_) => {}
        }
    }
    Err(plain(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "{} is scaled to zero and no replica was ready within {timeout:?}",
            route.app
        ),
    ))
}

/// Where ACME's HTTP-01 challenges are asked (RFC 8555 §8.3): never redirected.
pub const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// A permanent redirect to the same host (default port) and target over TLS; 308 keeps the
/// method and body.
fn to_https(host: &str, uri: &Uri) -> Response<Body> {
    let name = match host.rsplit_once(':') {
        Some((n, p)) if p.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => host,
    };
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = format!("https://{name}{target}");
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            let mut r = plain(StatusCode::PERMANENT_REDIRECT, &location);
            r.headers_mut().insert(header::LOCATION, v);
            r
        }
        Err(_) => plain(StatusCode::BAD_REQUEST, "the host is not text"),
    }
}

/// Serves a request another node passed on (marked `HOP`, on a member's connection): to
/// this node's replicas only, its forwarding headers as that node wrote them.
pub async fn handle_hop(req: Request<Incoming>, proxy: Arc<Proxy>) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let host = match parts
        .headers
        .remove(HOP)
        .map(|v| v.to_str().map(str::to_string))
    {
        Some(Ok(h)) => h,
        _ => return plain(StatusCode::BAD_REQUEST, "a hop names the host it is for"),
    };
    if let Some(r) = challenge_answer(&proxy, &parts.uri, &host) {
        return r;
    }
    // The node that passed it on checked where it came from.
    let route = proxy.table.borrow().route(&host, || true);
    let Some(route) = route else {
        return no_app(&host);
    };
    pass(parts, body, host, route, &proxy, false).await
}

/// The answer to an ACME HTTP-01 challenge this cluster set (RFC 8555 §8.3): the key
/// authorization, whatever the app behind the host would say. `None` for any other request
/// (an app may run its own ACME client).
fn challenge_answer(proxy: &Proxy, uri: &Uri, host: &str) -> Option<Response<Body>> {
    let token = uri.path().strip_prefix(ACME_CHALLENGE)?;
    let answer = proxy.challenge(token, host)?;
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(answer))
        .ok()
}

async fn pass(
    mut parts: hyper::http::request::Parts,
    body: impl hyper::body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + 'static,
    host: String,
    route: Arc<Route>,
    proxy: &Proxy,
    may_hop: bool,
) -> Response<Body> {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > proxy.limits.max_body) {
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {} bytes", proxy.limits.max_body),
        );
    }
    let bodiless =
        declared.unwrap_or(0) == 0 && !parts.headers.contains_key(header::TRANSFER_ENCODING);
    let retry = bodiless && idempotent(&parts.method);
    let protocol = upgrade_of(&parts.headers);
    let mut upgrade = None;
    if let Some(p) = &protocol {
        // Only HTTP/1.1 hands over its connection (hyper puts the handle there).
        if let Some(client) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() {
            let Ok(slot) = proxy.tunnels.clone().try_acquire_owned() else {
                return plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many upgraded connections on this node; try again later",
                );
            };
            upgrade = Some(Upgrade {
                client,
                _slot: slot,
            });
            strip_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, p.clone());
        } else {
            strip_hop_by_hop(&mut parts.headers);
        }
    } else {
        strip_hop_by_hop(&mut parts.headers);
    }
    if let Ok(v) = HeaderValue::from_str(&host) {
        parts.headers.insert(header::HOST, v);
    }
    let body: UpBody = Limited::new(body, proxy.limits.max_body as usize).boxed();
    // Replicas here all left out for their failures: another node's, while there is one.
    let skip_here = may_hop && !route.remote.is_empty() && proxy.all_out(&route);
    let Some(first) = (!skip_here).then(|| proxy.pick(&route, &[])).flatten() else {
        return elsewhere(parts, body, &host, &route, proxy, upgrade, retry, may_hop).await;
    };
    let mut body = Some(body);
    let (mut to, mut backend) = first;
    let mut tried = Vec::new();
    loop {
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri: Uri = match format!("http://{to}{path}").parse() {
            Ok(u) => u,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "the request target is not a path"),
        };
        let mut up = Request::new(
            body.take()
                .unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed()),
        );
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.headers_mut() = parts.headers.clone();
        backend.inflight.fetch_add(1, Relaxed);
        let held = InFlight(backend.clone());
        let sent = tokio::time::timeout(proxy.limits.answer_within, proxy.client.request(up)).await;
        match sent {
            Ok(Ok(resp)) => {
                let failing = matches!(
                    resp.status(),
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                );
                proxy.outcome(&route.app, to, &backend, !failing);
                return answer(resp, Some(held), upgrade, proxy);
            }
            Ok(Err(e)) if over_limit(&e) => {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body is over {} bytes", proxy.limits.max_body),
                );
            }
            Ok(Err(e)) => {
                drop(held);
                proxy.outcome(&route.app, to, &backend, false);
                tried.push(to);
                // Refused, or no answer at all: a request that may be sent twice (idempotent,
                // bodiless; RFC 9110 §9.2.2) goes to another replica here, else to another
                // node; any other is the replica's failure to tell.
                if !retry {
                    tracing::debug!(app = %route.app, replica = %to, err = %crate::error_chain(&e), "no answer from the replica");
                    return plain(
                        StatusCode::BAD_GATEWAY,
                        format!("{}: the replica did not answer", route.app),
                    );
                }
                tracing::debug!(app = %route.app, replica = %to, err = %crate::error_chain(&e), "no answer from the replica: trying another");
                match proxy.pick(&route, &tried) {
                    Some(n) => (to, backend) = n,
                    None if may_hop && route.remote.is_empty() => {
                        return plain(
                            StatusCode::BAD_GATEWAY,
                            format!("{}: no replica answered", route.app),
                        );
                    }
                    None => {
                        let body = Empty::new().map_err(|never| match never {}).boxed();
                        return elsewhere(
                            parts, body, &host, &route, proxy, upgrade, retry, may_hop,
                        )
                        .await;
                    }
                }
            }
            Err(_) => {
                proxy.outcome(&route.app, to, &backend, false);
                return plain(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "{}: no answer within {:?}",
                        route.app, proxy.limits.answer_within
                    ),
                );
            }
        }
    }
}

/// A request no replica on this node can take: on to a node that runs one, when this node
/// took it from a client; back to the node that passed it on, marked `GONE` so that node
/// may try another, when it is a hop.
#[allow(clippy::too_many_arguments)]
async fn elsewhere(
    parts: hyper::http::request::Parts,
    body: UpBody,
    host: &str,
    route: &Route,
    proxy: &Proxy,
    upgrade: Option<Upgrade>,
    retry: bool,
    may_hop: bool,
) -> Response<Body> {
    let hop = match upgrade {
        Some(_) => &proxy.hop1,
        None => &proxy.hop,
    };
    match (hop, route.remote.is_empty() || !may_hop) {
        (Some(hop), false) => hop_on(parts, body, host, route, hop, proxy, upgrade, retry).await,
        _ if may_hop => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{} has no ready replica", route.app),
        ),
        _ => {
            // A hop to a node whose replica just went (its record not yet everywhere):
            // marked, so the node that sent it may try another.
            let mut r = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{} has no ready replica on this node", route.app),
            );
            r.headers_mut()
                .insert(HeaderName::from_static(GONE), HeaderValue::from_static("1"));
            r
        }
    }
}

/// Whether a request failed because its body went over `Limits::max_body` (a chunked body
/// declares no length up front).
fn over_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if x.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = x.source();
    }
    false
}

/// Passes the request to a node that runs a ready replica (one picked at random). A
/// bodiless idempotent request that node cannot serve (no answer at all, or its replica
/// gone: `GONE`) goes to the next such node, each tried once.
#[allow(clippy::too_many_arguments)]
async fn hop_on(
    mut parts: hyper::http::request::Parts,
    body: UpBody,
    host: &str,
    route: &Route,
    hop: &HopClient,
    proxy: &Proxy,
    upgrade: Option<Upgrade>,
    retry: bool,
) -> Response<Body> {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let Ok(mark) = HeaderValue::from_str(host) else {
        return plain(StatusCode::BAD_REQUEST, "the host is not text");
    };
    parts.headers.insert(HeaderName::from_static(HOP), mark);
    // The connection to the node names its own host (`:authority`, or Host from the URI);
    // the mark carries the app's.
    parts.headers.remove(header::HOST);
    let n = route.remote.len();
    let first = rand::random_range(0..n);
    let tries = if retry && upgrade.is_none() { n } else { 1 };
    let mut body = Some(body);
    let mut last = None;
    for k in 0..tries {
        let (node, addr) = &route.remote[(first + k) % n];
        let Ok(uri) = format!("https://{addr}{path}").parse::<Uri>() else {
            return plain(StatusCode::BAD_REQUEST, "the request target is not a path");
        };
        let mut up = Request::new(
            body.take()
                .unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed()),
        );
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.headers_mut() = parts.headers.clone();
        let sent = tokio::time::timeout(proxy.limits.answer_within, hop.request(up)).await;
        let more = k + 1 < tries;
        match sent {
            Ok(Ok(resp)) if more && resp.headers().contains_key(GONE) => {
                tracing::debug!(app = %route.app, %node, "the node's replica is gone: trying another");
                last = Some(format!("{}: {node} no longer runs it", route.app));
            }
            Ok(Ok(mut resp)) => {
                resp.headers_mut().remove(GONE);
                return answer(resp, None, upgrade, proxy);
            }
            Ok(Err(e)) if over_limit(&e) => {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body is over {} bytes", proxy.limits.max_body),
                )
            }
            Ok(Err(e)) => {
                tracing::debug!(app = %route.app, %node, err = %crate::error_chain(&e), "the node with the replica did not answer");
                last = Some(format!(
                    "{}: {node}, which runs it, did not answer",
                    route.app
                ));
            }
            Err(_) => {
                return plain(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "{}: no answer within {:?}",
                        route.app, proxy.limits.answer_within
                    ),
                )
            }
        }
    }
    plain(
        StatusCode::BAD_GATEWAY,
        last.unwrap_or_else(|| format!("{}: no node answered", route.app)),
    )
}

/// The replica's answer, its hop-by-hop headers dropped; the request counts as in flight
/// until its body is sent. A replica that agrees to an upgrade (101) gets the client's
/// connection joined to its own, until either closes or both idle past `tunnel_idle`.
fn answer(
    mut resp: Response<Incoming>,
    held: Option<InFlight>,
    upgrade: Option<Upgrade>,
    proxy: &Proxy,
) -> Response<Body> {
    if let (StatusCode::SWITCHING_PROTOCOLS, Some(u)) = (resp.status(), upgrade) {
        let replica = hyper::upgrade::on(&mut resp);
        let protocol = resp.headers().get(header::UPGRADE).cloned();
        let (mut parts, _) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(p) = protocol {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, p);
        }
        tokio::spawn(tunnel(u, replica, held, proxy.limits.tunnel_idle));
        return Response::from_parts(parts, Empty::new().map_err(|never| match never {}).boxed());
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = body
        .map_frame(move |f| {
            let _ = &held;
            f
        })
        .map_err(std::io::Error::other)
        .boxed();
    Response::from_parts(parts, body)
}

/// Joins an upgraded client connection to the replica's (or the node's that runs it).
async fn tunnel(
    u: Upgrade,
    replica: hyper::upgrade::OnUpgrade,
    _held: Option<InFlight>,
    idle: Duration,
) {
    let Upgrade { client, _slot } = u;
    let (client, replica) = match tokio::join!(client, replica) {
        (Ok(c), Ok(r)) => (c, r),
        (c, r) => {
            tracing::debug!(
                client = c.is_ok(),
                replica = r.is_ok(),
                "an upgrade fell through"
            );
            return;
        }
    };
    let act = crate::http::Activity::new();
    act.touch();
    let mut client = crate::http::Tracked {
        inner: hyper_util::rt::TokioIo::new(client),
        act: act.clone(),
    };
    let mut replica = hyper_util::rt::TokioIo::new(replica);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut replica) => {}
        _ = crate::http::idled(&act, idle) => {
            tracing::debug!("an upgraded connection idled out");
        }
    }
}

/// One request in flight to a replica, until dropped.
struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[tokio::test]
    async fn counters_of_replicas_no_request_holds_are_forgotten_past_the_bound() {
        let (_tx, rx) = watch::channel(Arc::new(Table::default()));
        let p = Proxy::new(rx, Limits::default(), None);
        let held = p.backend("10.0.0.1:80".parse().unwrap());
        for i in 0..MAX_TRACKED as u32 + 10 {
            let a = SocketAddr::from((std::net::Ipv4Addr::from(0x0b00_0000 + i), 80));
            drop(p.backend(a));
        }
        let m = p.inflight.lock().unwrap();
        assert!(m.len() < MAX_TRACKED, "{}", m.len());
        assert!(Arc::ptr_eq(&m[&"10.0.0.1:80".parse().unwrap()], &held));
    }

    #[tokio::test]
    async fn a_challenge_is_answered_for_its_host_until_it_expires_and_nothing_else_is() {
        let (_tx, rx) = watch::channel(Arc::new(Table::default()));
        let p = Proxy::new(rx, Limits::default(), None);
        let later = crate::clock::wall_ms() + 60_000;
        let mut c = HashMap::new();
        c.insert(
            "tok-1".to_string(),
            (
                "a.example.com".to_string(),
                "tok-1.thumb".to_string(),
                later,
            ),
        );
        c.insert(
            "old".to_string(),
            ("a.example.com".to_string(), "old.thumb".to_string(), 1),
        );
        p.set_challenges(c);
        // As a client writes the host: any case, a port, a trailing dot.
        for host in ["a.example.com", "A.Example.COM:5002", "a.example.com."] {
            assert_eq!(p.challenge("tok-1", host).as_deref(), Some("tok-1.thumb"));
        }
        assert_eq!(p.challenge("tok-1", "b.example.com"), None);
        assert_eq!(p.challenge("tok-2", "a.example.com"), None);
        assert_eq!(p.challenge("old", "a.example.com"), None);
        let uri: Uri = "/.well-known/acme-challenge/tok-1".parse().unwrap();
        let r = challenge_answer(&p, &uri, "a.example.com").unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"tok-1.thumb");
        // Another path, or a token this cluster did not set, is the app's.
        for path in ["/tok-1", "/.well-known/acme-challenge/tok-2"] {
            assert!(challenge_answer(&p, &path.parse().unwrap(), "a.example.com").is_none());
        }
        p.set_challenges(HashMap::new());
        assert_eq!(p.challenge("tok-1", "a.example.com"), None);
    }

    #[test]
    fn a_replica_failing_in_a_row_is_left_out_for_longer_each_time_until_it_answers() {
        let b = Backend::default();
        assert_eq!(b.failed(0), None);
        b.succeeded();
        // Failures must be in a row.
        assert_eq!((b.failed(0), b.failed(0)), (None, None));
        assert_eq!(b.failed(0), Some(EJECT_BASE_MS));
        assert!(b.out(EJECT_BASE_MS - 1) && !b.out(EJECT_BASE_MS));
        // Failures while out (requests already sent) do not stretch it.
        assert_eq!(
            (b.failed(10), b.failed(10), b.failed(10)),
            (None, None, None)
        );
        let t = EJECT_BASE_MS;
        b.failed(t);
        b.failed(t);
        assert_eq!(b.failed(t), Some(2 * EJECT_BASE_MS));
        for _ in 0..40 {
            b.failed(u64::MAX / 4);
        }
        assert!(b.out_until.load(Relaxed) <= u64::MAX / 4 + EJECT_MAX_MS);
        b.succeeded();
        b.failed(u64::MAX / 2);
        b.failed(u64::MAX / 2);
        assert_eq!(b.failed(u64::MAX / 2), Some(EJECT_BASE_MS));
    }

    #[tokio::test]
    async fn replicas_left_out_get_no_choice_unless_all_are() {
        let (_tx, rx) = watch::channel(Arc::new(Table::default()));
        let p = Proxy::new(rx, Limits::default(), None);
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let route = Route {
            app: "web".into(),
            local: vec![a, b],
            remote: vec![],
            force_https: false,
            wake: None,
        };
        for _ in 0..EJECT_AFTER {
            p.outcome("web", a, &p.backend(a), false);
        }
        for _ in 0..200 {
            assert_eq!(p.pick(&route, &[]).unwrap().0, b);
        }
        for _ in 0..EJECT_AFTER {
            p.outcome("web", b, &p.backend(b), false);
        }
        let picked: BTreeSet<SocketAddr> =
            (0..200).map(|_| p.pick(&route, &[]).unwrap().0).collect();
        assert_eq!(picked.len(), 2, "all out: all chosen again");
        assert_eq!(p.pick(&route, &[a]).unwrap().0, b);
    }

    #[test]
    fn hop_by_hop_headers_go_and_so_do_those_connection_names() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("x-app", "stays"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-app"], "stays");
    }

    #[test]
    fn the_clients_address_is_added_to_what_came_before_and_host_and_proto_are_ours() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        add_forwarded(
            &mut h,
            "10.0.0.9".parse().unwrap(),
            "web.example.com:8080",
            "http",
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "web.example.com:8080");
        assert_eq!(
            h["forwarded"],
            "for=10.0.0.9;host=\"web.example.com:8080\";proto=http"
        );
        let mut h = HeaderMap::new();
        h.insert(header::FORWARDED, HeaderValue::from_static("for=192.0.2.1"));
        add_forwarded(&mut h, "2001:db8::1".parse().unwrap(), "a\"b", "http");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.1, for=\"[2001:db8::1]\";host=\"ab\";proto=http"
        );
    }

    /// A node's API listener as a hop sees it: TLS with HTTP/2, answering every request with
    /// `status` (marked `GONE` if `gone`) and its name.
    async fn node(
        name: &'static str,
        status: u16,
        gone: bool,
        stop: &tokio_util::sync::CancellationToken,
    ) -> (String, rustls::pki_types::CertificateDer<'static>) {
        let certs = Arc::new(super::super::certs::Certs::new("localhost").unwrap());
        let cert = certs.lookup(None).cert[0].clone();
        let config = certs.server_config().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(crate::http::serve(
            listener,
            Some(crate::http::TlsListener {
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
                counters: Arc::default(),
            }),
            crate::http::Limits::default(),
            Arc::default(),
            move |_req, _conn| async move {
                let mut r = plain(StatusCode::from_u16(status).unwrap(), name);
                if gone {
                    r.headers_mut()
                        .insert(HeaderName::from_static(GONE), HeaderValue::from_static("1"));
                }
                r
            },
            stop.clone(),
            tokio_util::task::TaskTracker::new(),
        ));
        (format!("localhost:{port}"), cert)
    }

    /// A proxy with no route of its own whose hops trust `certs` (the test nodes').
    fn member_proxy(certs: Vec<rustls::pki_types::CertificateDer<'static>>) -> Proxy {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs {
            roots.add(c).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (_tx, rx) = watch::channel(Arc::new(Table::default()));
        Proxy::new(rx, Limits::default(), Some(Arc::new(client)))
    }

    #[tokio::test]
    async fn a_hop_whose_node_lost_its_replica_goes_on_to_the_next_node_when_it_may() {
        let stop = tokio_util::sync::CancellationToken::new();
        let (gone_at, gone_cert) = node("a", 503, true, &stop).await;
        let (ok_at, ok_cert) = node("b", 200, false, &stop).await;
        let p = member_proxy(vec![gone_cert, ok_cert]);
        let route = Route {
            app: "web".into(),
            local: vec![],
            remote: vec![("n1".into(), gone_at), ("n2".into(), ok_at)],
            force_https: false,
            wake: None,
        };
        let ask = |retry: bool| {
            let (p, route) = (&p, &route);
            async move {
                let (parts, ()) = Request::get("/x").body(()).unwrap().into_parts();
                let body: UpBody = Empty::new().map_err(|never| match never {}).boxed();
                let hop = p.hop.as_ref().unwrap();
                let r = hop_on(parts, body, "web.localhost", route, hop, p, None, retry).await;
                assert!(!r.headers().contains_key(GONE), "the mark reached a client");
                r.status()
            }
        };
        // A GET goes on to n2 whichever node is tried first.
        for _ in 0..16 {
            assert_eq!(ask(true).await, StatusCode::OK);
        }
        // A request that may not be sent twice is not: n1's 503 reaches the client.
        let mut seen = BTreeSet::new();
        for _ in 0..40 {
            seen.insert(ask(false).await);
        }
        assert_eq!(
            seen,
            BTreeSet::from([StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE])
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_request_no_replica_here_answers_goes_on_to_another_node_when_it_may() {
        let stop = tokio_util::sync::CancellationToken::new();
        let (ok_at, ok_cert) = node("b", 200, false, &stop).await;
        let p = member_proxy(vec![ok_cert]);
        // Two replicas here that died (nothing listens where they were).
        let dead: Vec<SocketAddr> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
            })
            .collect();
        let route = |remote: Vec<(String, String)>| {
            Arc::new(Route {
                app: "web".into(),
                local: dead.clone(),
                remote,
                force_https: false,
                wake: None,
            })
        };
        let ask = |method: Method, route: Arc<Route>, may_hop: bool| {
            let p = &p;
            async move {
                let (parts, ()) = Request::builder()
                    .method(method)
                    .uri("/x")
                    .body(())
                    .unwrap()
                    .into_parts();
                let body = Empty::<Bytes>::new().map_err(|never| match never {});
                let r = pass(parts, body, "web.localhost".into(), route, p, may_hop).await;
                (r.status(), r.headers().contains_key(GONE))
            }
        };
        // Taken from a client: both replicas tried, then the node that has one.
        let everywhere = route(vec![("n2".into(), ok_at)]);
        assert_eq!(
            ask(Method::GET, everywhere.clone(), true).await,
            (StatusCode::OK, false)
        );
        // A request that may not go twice gets the replica's silence.
        assert_eq!(
            ask(Method::POST, everywhere, true).await,
            (StatusCode::BAD_GATEWAY, false)
        );
        // A hop: sent back marked, so the node that passed it on tries another.
        assert_eq!(
            ask(Method::GET, route(vec![]), false).await,
            (StatusCode::SERVICE_UNAVAILABLE, true)
        );
        // No other node: the client is told no replica answered.
        assert_eq!(
            ask(Method::GET, route(vec![]), true).await,
            (StatusCode::BAD_GATEWAY, false)
        );
        stop.cancel();
    }
}
