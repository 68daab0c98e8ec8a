//! The read-only status endpoint (:7070): plain HTTP, GET and HEAD only. It never shows a
//! secret: secret values stay out of every listing and event.

use super::{error, full, json, text, Body};
use crate::daemon::{Handle, Snapshot};
use crate::store::replica::{changes_since, read_entry, scan_keyspace};
use crate::store::{Change, Keyspace};
use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json as j, Value};
use tokio::sync::broadcast;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub async fn handle(req: Request<Incoming>, _conn: super::Conn, h: Handle) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "the status endpoint is read-only: use GET or HEAD",
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let resp = route(&req, &h).await;
    if head {
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, full(Bytes::new()));
    }
    resp
}

async fn route(req: &Request<Incoming>, h: &Handle) -> Response<Body> {
    let path = req.uri().path();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["healthz"] => text(StatusCode::OK, "text/plain", "ok\n"),
        ["v1", "status"] => match h.snapshot().await {
            Ok(s) => json(StatusCode::OK, &status(h, &s)),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        ["v1", "nodes"] => match h.snapshot().await {
            Ok(s) => json(StatusCode::OK, &nodes(h, &s)),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        ["v1", "apps"] => match scan_keyspace(&h.store, Keyspace::Apps, "", 100_000) {
            Ok(es) => json(
                StatusCode::OK,
                &es.iter().map(|e| value_of(&e.value)).collect::<Vec<_>>(),
            ),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        ["v1", "apps", name] => match read_entry(&h.store, &format!("apps/{name}")) {
            Ok(Some((e, _))) if !e.is_tombstone() => json(StatusCode::OK, &value_of(&e.value)),
            Ok(_) => error(StatusCode::NOT_FOUND, format!("no app named {name:?}")),
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        ["v1", "tasks"] => match h.snapshot().await {
            Ok(s) => json(StatusCode::OK, &tasks(h, &s)),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        ["v1", "events"] => events(req, h),
        ["metrics"] => metrics(h).await,
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

fn value_of(v: &Option<Bytes>) -> Value {
    v.as_ref()
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or(Value::Null)
}

/// How far behind us each peer was at its last exchange, in ms of HLC time, at worst.
/// Origins that live peer has not heard of at all are not a lag in time: they are counted
/// by `sync_unseen_origins` instead.
fn sync_lag_ms(s: &Snapshot) -> u64 {
    live_peer_gaps(s)
        .filter(|(_, theirs)| theirs.0 > 0)
        .map(|(ours, theirs)| ours.millis().saturating_sub(theirs.millis()))
        .max()
        .unwrap_or(0)
}

fn sync_unseen_origins(s: &Snapshot) -> usize {
    live_peer_gaps(s)
        .filter(|(_, theirs)| theirs.0 == 0)
        .count()
}

/// For every live peer and every origin we know: (our watermark, the peer's last known).
fn live_peer_gaps(
    s: &Snapshot,
) -> impl Iterator<Item = (crate::store::Hlc, crate::store::Hlc)> + '_ {
    s.members
        .iter()
        .filter(|m| m.state != "dead")
        .filter_map(|m| s.peer_digests.get(&m.id))
        .flat_map(|d| {
            s.digest
                .watermarks
                .iter()
                .map(move |(o, w)| (*w, d.watermark(o)))
        })
}

fn status(h: &Handle, s: &Snapshot) -> Value {
    let now = crate::daemon::wall_ms();
    let keys = count(h);
    j!({
        "node_id": s.me.id,
        "version": VERSION,
        "addr": s.me.addr,
        "started_at_ms": h.started_ms,
        "uptime_s": now.saturating_sub(h.started_ms) / 1000,
        "cluster": {
            "name": h.trust.cluster.name,
            "hash": h.trust.cluster_hash,
            "signs_joins": h.trust.ca_key.is_some(),
        },
        "members": s.members,
        // shoal-init's boot report (stages, network, metadata, services), when there is one.
        "boot": std::fs::read("/run/shoal/init.json")
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok()),
        "store": {
            "keys": keys,
            "seq": s.seq,
            "bytes_on_disk": crate::store::Backend::size_on_disk(&h.store),
        },
        "sync": {
            "lag_ms": sync_lag_ms(s),
            "unseen_origins": sync_unseen_origins(s),
            "peers_seen": s.peer_digests.len(),
            "stats": s.sync,
        },
    })
}

/// Live keys per keyspace.
fn count(h: &Handle) -> Value {
    let mut out = serde_json::Map::new();
    for space in Keyspace::ALL {
        let n = scan_keyspace(&h.store, space, "", usize::MAX)
            .map(|v| v.len())
            .unwrap_or(0);
        out.insert(space.name().into(), j!(n));
    }
    Value::Object(out)
}

fn nodes(h: &Handle, s: &Snapshot) -> Value {
    let records = scan_keyspace(&h.store, Keyspace::Nodes, "", 100_000).unwrap_or_default();
    let mut out = Vec::new();
    for e in records {
        let id = e.key.name().to_string();
        let state = member_state(s, &id);
        let mut v = value_of(&e.value);
        if let Value::Object(o) = &mut v {
            o.insert("state".into(), j!(state));
        }
        out.push(v);
    }
    j!(out)
}

/// The state of a member as this node sees it: `alive` for itself.
fn member_state<'a>(s: &'a Snapshot, id: &str) -> &'a str {
    if id == s.me.id.as_str() {
        return "alive";
    }
    s.members
        .iter()
        .find(|m| m.id.as_str() == id)
        .map(|m| m.state)
        .unwrap_or("unknown")
}

/// Every task record, with the state of the node that wrote it: the record of a dead node
/// says what ran there when it was last heard of.
fn tasks(h: &Handle, s: &Snapshot) -> Value {
    let records = scan_keyspace(&h.store, Keyspace::Tasks, "", 100_000).unwrap_or_default();
    let mut out = Vec::new();
    for e in records {
        let mut v = value_of(&e.value);
        if let (Value::Object(o), Some(node)) = (&mut v, e.key.owner()) {
            o.insert("node_state".into(), j!(member_state(s, node)));
        }
        out.push(v);
    }
    j!(out)
}

fn change_event(c: &Change) -> Bytes {
    let e = &c.entry;
    let data = j!({
        "key": e.key,
        "keyspace": e.key.keyspace(),
        "version": e.version.to_string(),
        "deleted": e.is_tombstone(),
    });
    let kind = if e.is_tombstone() { "delete" } else { "put" };
    Bytes::from(format!("id: {}\nevent: {kind}\ndata: {data}\n\n", c.seq))
}

/// Server-sent events: every change from `?since=N` (or `Last-Event-ID`) on, then live.
fn events(req: &Request<Incoming>, h: &Handle) -> Response<Body> {
    let since = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("since=")))
        .map(str::to_string)
        .or_else(|| {
            req.headers()
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
    let since: Option<u64> = match since.map(|s| s.parse()) {
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "since must be a change number"),
        None => None,
    };
    // Subscribe before replaying, so nothing falls between the two.
    let rx = h.changes.subscribe();
    let (replay, last) = match since {
        Some(n) => match changes_since(&h.store, n, usize::MAX) {
            Ok(cs) => {
                let last = cs.last().map(|c| c.seq).unwrap_or(n);
                (cs, last)
            }
            Err(e) => return error(StatusCode::GONE, e),
        },
        None => (Vec::new(), 0),
    };
    let first: Vec<Result<Frame<Bytes>, std::io::Error>> =
        std::iter::once(Bytes::from_static(b": shoal events\n\n"))
            .chain(replay.iter().map(change_event))
            .map(|b| Ok(Frame::data(b)))
            .collect();
    let live = stream::unfold((rx, last), |(mut rx, last)| async move {
        loop {
            match rx.recv().await {
                Ok(c) if c.seq <= last => continue,
                Ok(c) => return Some((Ok(Frame::data(change_event(&c))), (rx, c.seq))),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow a reader: end the stream; it reconnects with Last-Event-ID.
                    return None;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let body = BodyExt::boxed(StreamBody::new(futures_util::StreamExt::chain(
        stream::iter(first),
        live,
    )));
    Response::builder()
        .header(hyper::header::CONTENT_TYPE, "text/event-stream")
        .header(hyper::header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| Response::new(full("")))
}

async fn metrics(h: &Handle) -> Response<Body> {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let mut m = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    let c = &h.counters;
    metric(
        "shoal_peer_messages_total",
        "counter",
        "Peer messages received.",
        c.peer_messages.load(Relaxed),
    );
    metric(
        "shoal_peer_messages_refused_total",
        "counter",
        "Peer messages refused as malformed or unauthorised.",
        c.peer_messages_refused.load(Relaxed),
    );
    metric(
        "shoal_peer_sends_failed_total",
        "counter",
        "Peer messages that could not be delivered.",
        c.peer_sends_failed.load(Relaxed),
    );
    metric(
        "shoal_store_writes_total",
        "counter",
        "Local writes acknowledged.",
        c.writes.load(Relaxed),
    );
    metric(
        "shoal_peer_tls_handshakes_total",
        "counter",
        "TLS handshakes completed on the API port.",
        c.tls_handshakes.load(Relaxed),
    );
    metric(
        "shoal_tls_certificate_expiry_timestamp_seconds",
        "gauge",
        "When this node's certificate expires; the agent renews it at start within 30 days.",
        h.trust.cert_not_after.max(0) as u64,
    );
    metric(
        "shoal_join_requests_total",
        "counter",
        "TLS bootstrap requests received.",
        c.join_requests.load(Relaxed),
    );
    metric(
        "shoal_join_refused_total",
        "counter",
        "TLS bootstrap requests refused (wrong join secret).",
        c.join_refused.load(Relaxed),
    );
    metric(
        "shoal_discovery_foreign_nodes_total",
        "counter",
        "Nodes of other clusters seen over mDNS and not admitted.",
        c.mdns_foreign.load(Relaxed),
    );
    if let Ok(s) = h.snapshot().await {
        let alive = s.members.iter().filter(|m| m.state != "dead").count() as u64;
        metric(
            "shoal_membership_live_members",
            "gauge",
            "Other members alive or suspect.",
            alive,
        );
        metric(
            "shoal_store_seq",
            "counter",
            "Changes applied to the local replica.",
            s.seq,
        );
        metric(
            "shoal_sync_lag_milliseconds",
            "gauge",
            "Worst peer lag at its last exchange.",
            sync_lag_ms(&s),
        );
        metric(
            "shoal_sync_refused_total",
            "counter",
            "Entry batches refused by the merge.",
            s.sync.refused,
        );
        metric(
            "shoal_sync_tombstones_collected_total",
            "counter",
            "Tombstones collected.",
            s.sync.tombstones_collected,
        );
        metric(
            "shoal_sync_reconciles_total",
            "counter",
            "Reconciles started (full comparisons with one peer).",
            s.sync.reconciles,
        );
        metric(
            "shoal_sync_reconcile_dropped_total",
            "counter",
            "Keys dropped because reconciles named them deleted elsewhere.",
            s.sync.reconcile_dropped,
        );
        metric(
            "shoal_sync_reconcile_held_total",
            "counter",
            "Keys a reconcile named deleted but kept (unconfirmed by a second peer, or over the bound).",
            s.sync.reconcile_held,
        );
        metric(
            "shoal_sync_reconcile_unconfirmed_total",
            "counter",
            "Reconciles whose named keys a second peer did not all confirm (the first peer is distrusted for a while).",
            s.sync.reconcile_unconfirmed,
        );
    }
    let _ = writeln!(
        m,
        "# HELP shoal_peer_tls_refused_total Connections to the API port refused at the TLS layer, by reason.\n# TYPE shoal_peer_tls_refused_total counter"
    );
    for (i, reason) in crate::tls::REFUSAL_REASONS.iter().enumerate() {
        let _ = writeln!(
            m,
            "shoal_peer_tls_refused_total{{reason=\"{reason}\"}} {}",
            c.tls_refused[i].load(Relaxed)
        );
    }
    text(StatusCode::OK, "text/plain; version=0.0.4", m)
}
