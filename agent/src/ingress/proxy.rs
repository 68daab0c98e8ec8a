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
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type UpBody = BoxBody<Bytes, BoxError>;

/// What one request may cost.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest request body passed on (413 beyond).
    pub max_body: u64,
    /// How long a replica has to start its answer (504 after).
    pub answer_within: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 64 << 20,
            answer_within: Duration::from_secs(60),
        }
    }
}

/// Replicas whose requests in flight are counted at once, before idle ones are forgotten.
const MAX_TRACKED: usize = 4096;

/// The mark of a request another node passed on: the host it was for.
pub const HOP: &str = "x-shoal-hop";

type HopClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, UpBody>;

pub struct Proxy {
    table: watch::Receiver<Arc<Table>>,
    client: Client<HttpConnector, UpBody>,
    /// To other nodes' API listeners, as a member.
    hop: Option<HopClient>,
    /// Requests in flight per replica, for the choice between two.
    inflight: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
    limits: Limits,
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
        let hop = tls.map(|tls| {
            http.enforce_http(false);
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((*tls).clone())
                .https_only()
                .enable_http2()
                .wrap_connector(http);
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .http2_only(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .build(https)
        });
        Proxy {
            table,
            client,
            hop,
            inflight: Mutex::new(HashMap::new()),
            limits,
        }
    }

    fn counter(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        // Replicas come and go with new addresses: forget those no request holds.
        if m.len() >= MAX_TRACKED && !m.contains_key(&addr) {
            m.retain(|_, c| Arc::strong_count(c) > 1);
        }
        m.entry(addr).or_default().clone()
    }

    /// The less busy of two replicas picked at random (the only one, if one), but `not`.
    fn pick(&self, route: &Route, not: Option<SocketAddr>) -> Option<SocketAddr> {
        let choices: Vec<SocketAddr> = route
            .local
            .iter()
            .copied()
            .filter(|a| Some(*a) != not)
            .collect();
        match choices.len() {
            0 => None,
            1 => Some(choices[0]),
            n => {
                let i = rand::random_range(0..n);
                let j = (i + rand::random_range(1..n)) % n;
                let (a, b) = (choices[i], choices[j]);
                Some(
                    if self.counter(a).load(Relaxed) <= self.counter(b).load(Relaxed) {
                        a
                    } else {
                        b
                    },
                )
            }
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

/// Serves one request received on the ingress.
pub async fn handle(req: Request<Incoming>, conn: Conn, proxy: Arc<Proxy>) -> Response<Body> {
    let host = match host_of(&req) {
        Ok(h) => h,
        Err(why) => return plain(StatusCode::BAD_REQUEST, why),
    };
    let (mut parts, body) = req.into_parts();
    // The mark is the nodes' own: a client's never reaches an app.
    parts.headers.remove(HOP);
    add_forwarded(&mut parts.headers, conn.remote.ip(), &host, "http");
    pass(parts, body, host, &proxy, true).await
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
    pass(parts, body, host, &proxy, false).await
}

async fn pass(
    mut parts: hyper::http::request::Parts,
    body: Incoming,
    host: String,
    proxy: &Proxy,
    may_hop: bool,
) -> Response<Body> {
    let route = proxy.table.borrow().route(&host);
    let Some(route) = route else {
        return plain(
            StatusCode::NOT_FOUND,
            format!("no app answers to {}", crate::http::short(&host)),
        );
    };
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
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(v) = HeaderValue::from_str(&host) {
        parts.headers.insert(header::HOST, v);
    }
    let body: UpBody = Limited::new(body, proxy.limits.max_body as usize).boxed();
    let Some(first) = proxy.pick(&route, None) else {
        return match (&proxy.hop, route.remote.is_empty() || !may_hop) {
            (Some(hop), false) => hop_on(parts, body, &host, &route, hop, proxy).await,
            _ if route.remote.is_empty() => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{} has no ready replica", route.app),
            ),
            _ => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{} has no ready replica on this node", route.app),
            ),
        };
    };
    let mut body = Some(body);
    let mut to = first;
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
        let counter = proxy.counter(to);
        counter.fetch_add(1, Relaxed);
        let sent = tokio::time::timeout(proxy.limits.answer_within, proxy.client.request(up)).await;
        match sent {
            Ok(Ok(resp)) => return answer(resp, Some(counter)),
            Ok(Err(e)) => {
                counter.fetch_sub(1, Relaxed);
                let again = retry && e.is_connect();
                let next = again.then(|| proxy.pick(&route, Some(to))).flatten();
                match next {
                    Some(n) => {
                        tracing::debug!(app = %route.app, replica = %to, err = %crate::error_chain(&e), "replica refused: trying another");
                        to = n;
                    }
                    None => {
                        tracing::debug!(app = %route.app, replica = %to, err = %crate::error_chain(&e), "no answer from the replica");
                        return plain(
                            StatusCode::BAD_GATEWAY,
                            format!("{}: the replica did not answer", route.app),
                        );
                    }
                }
            }
            Err(_) => {
                counter.fetch_sub(1, Relaxed);
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

/// Passes the request to a node that runs a ready replica (one picked at random).
async fn hop_on(
    mut parts: hyper::http::request::Parts,
    body: UpBody,
    host: &str,
    route: &Route,
    hop: &HopClient,
    proxy: &Proxy,
) -> Response<Body> {
    let (node, addr) = &route.remote[rand::random_range(0..route.remote.len())];
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let Ok(uri) = format!("https://{addr}{path}").parse::<Uri>() else {
        return plain(StatusCode::BAD_REQUEST, "the request target is not a path");
    };
    let Ok(mark) = HeaderValue::from_str(host) else {
        return plain(StatusCode::BAD_REQUEST, "the host is not text");
    };
    parts.headers.insert(HeaderName::from_static(HOP), mark);
    // HTTP/2 names the host in `:authority`; the mark carries the app's.
    parts.headers.remove(header::HOST);
    let mut up = Request::new(body);
    *up.method_mut() = parts.method;
    *up.uri_mut() = uri;
    *up.headers_mut() = parts.headers;
    match tokio::time::timeout(proxy.limits.answer_within, hop.request(up)).await {
        Ok(Ok(resp)) => answer(resp, None),
        Ok(Err(e)) => {
            tracing::debug!(app = %route.app, %node, err = %crate::error_chain(&e), "the node with the replica did not answer");
            plain(
                StatusCode::BAD_GATEWAY,
                format!("{}: {node}, which runs it, did not answer", route.app),
            )
        }
        Err(_) => plain(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "{}: no answer within {:?}",
                route.app, proxy.limits.answer_within
            ),
        ),
    }
}

/// The replica's answer, its hop-by-hop headers dropped; the request counts as in flight
/// until its body is sent.
fn answer(resp: Response<Incoming>, counter: Option<Arc<AtomicUsize>>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let done = counter.map(InFlight);
    let body = body
        .map_frame(move |f| {
            let _ = &done;
            f
        })
        .map_err(std::io::Error::other)
        .boxed();
    Response::from_parts(parts, body)
}

/// One request in flight to a replica, until dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counters_of_replicas_no_request_holds_are_forgotten_past_the_bound() {
        let (_tx, rx) = watch::channel(Arc::new(Table::default()));
        let p = Proxy::new(rx, Limits::default(), None);
        let held = p.counter("10.0.0.1:80".parse().unwrap());
        for i in 0..MAX_TRACKED as u32 + 10 {
            let a = SocketAddr::from((std::net::Ipv4Addr::from(0x0b00_0000 + i), 80));
            drop(p.counter(a));
        }
        let m = p.inflight.lock().unwrap();
        assert!(m.len() < MAX_TRACKED, "{}", m.len());
        assert!(Arc::ptr_eq(&m[&"10.0.0.1:80".parse().unwrap()], &held));
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
}
