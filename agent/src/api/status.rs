//! The read-only status endpoint (:7070): plain HTTP, GET and HEAD only. It never shows a
//! secret: secret values stay out of every listing and event.

use super::{error, full, json, text, Body};
use crate::rollout::View;
use crate::state::{Handle, Snapshot};
use crate::store::replica::{changes_since, scan_keyspace};
use crate::store::{keys, Change, Keyspace, NodeId};
use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json as j, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed as Rel};
use std::sync::Arc;
use tokio::sync::broadcast;

#[tracing::instrument(name = "status", skip_all, fields(path = super::short(req.uri().path())))]
pub async fn handle(
    req: Request<Incoming>,
    _conn: super::Conn,
    h: Handle,
    ingress: Option<Arc<crate::ingress::metrics::Registry>>,
) -> Response<Body> {
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
    let resp = route(&req, &h, ingress.as_deref()).await;
    if head {
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, full(Bytes::new()));
    }
    resp
}

async fn route(
    req: &Request<Incoming>,
    h: &Handle,
    ingress: Option<&crate::ingress::metrics::Registry>,
) -> Response<Body> {
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
        ["v1", "apps"] => match h.snapshot().await {
            Ok(s) => {
                let view = view(h, &s);
                let placed = view.place();
                let loads = crate::state::records::loads(&h.store);
                let apps: Vec<Value> = view
                    .apps
                    .iter()
                    .map(|a| app(h, &view, &placed, &loads, a))
                    .collect();
                json(StatusCode::OK, &apps)
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        ["v1", "apps", name] => {
            if let Err(e) = keys::app(name) {
                return error(StatusCode::BAD_REQUEST, e);
            }
            match h.snapshot().await {
                Ok(s) => {
                    let view = view(h, &s);
                    match view.apps.iter().find(|a| a.spec.name == *name) {
                        Some(a) => json(
                            StatusCode::OK,
                            &app(
                                h,
                                &view,
                                &view.place(),
                                &crate::state::records::loads(&h.store),
                                a,
                            ),
                        ),
                        None => error(StatusCode::NOT_FOUND, format!("no app named {name:?}")),
                    }
                }
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        ["v1", "tasks"] => match h.snapshot().await {
            Ok(s) => json(StatusCode::OK, &tasks(h, &s)),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        ["v1", "events"] => events(req, h),
        ["metrics"] => metrics(h, ingress).await,
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// The replicated state as this node's executor reads it.
fn view(h: &Handle, s: &Snapshot) -> View {
    View::read_as(&h.store, s.me.id.as_str(), |id| {
        s.members
            .iter()
            .any(|m| m.id.as_str() == id && m.state.is_live())
    })
}

/// An app as the status port shows it: its spec (`public_app`), with its state (`status`)
/// beside.
fn app(
    h: &Handle,
    view: &View,
    placed: &crate::scheduler::Placed,
    loads: &std::collections::BTreeMap<String, crate::state::records::LoadRecord>,
    a: &crate::state::records::AppRecord,
) -> Value {
    let mut v = public_app(serde_json::to_value(&a.spec).unwrap_or(Value::Null));
    if let Value::Object(o) = &mut v {
        o.insert("status".into(), j!(view.status(a, placed)));
        // The cluster's load on it: what every node's ingress saw over its last interval.
        let load = crate::autoscale::observe(loads, &a.spec.name, crate::clock::wall_ms());
        o.insert(
            "load".into(),
            j!({"rps": load.rps, "inflight": load.inflight, "waiting": load.waiting}),
        );
        if a.spec.autoscaled() {
            o.insert(
                "autoscale".into(),
                j!({
                    "replicas": view.replicas(a),
                    "last": view.scale.get(&a.spec.name),
                }),
            );
        }
        if a.spec.expose.acme {
            o.insert(
                "certificates".into(),
                crate::ingress::acme::status(&h.store, &a.spec.expose.hosts),
            );
        }
    }
    v
}

/// An app spec as the status port shows it: `run.env` lists the variables' names only. The
/// port is plain HTTP and unauthenticated (and reachable from containers on a host that lets
/// them): values may be credentials a user put there instead of in secrets.
fn public_app(mut app: Value) -> Value {
    if let Some(env) = app.pointer_mut("/run/env") {
        if let Some(map) = env.as_object() {
            *env = Value::Array(map.keys().map(|k| Value::String(k.clone())).collect());
        }
    }
    app
}

fn value_of(v: &Option<Bytes>) -> Value {
    v.as_ref()
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or(Value::Null)
}

/// How far behind us each peer was at its last exchange, in ms of HLC time, at worst.
/// Origins that live peer has not heard of at all are not a lag in time: they are counted
/// by `sync_unseen_origins` instead.
pub(super) fn sync_lag_ms(s: &Snapshot) -> u64 {
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
        .filter(|m| m.state.is_live())
        .filter_map(|m| s.peer_digests.get(&m.id))
        .flat_map(|d| {
            s.digest
                .watermarks
                .iter()
                .map(move |(o, w)| (*w, d.watermark(o)))
        })
}

fn status(h: &Handle, s: &Snapshot) -> Value {
    let now = crate::clock::wall_ms();
    // Kept by the replica as entries change: a status request scans nothing.
    let keys = j!(s.keys);
    j!({
        "node_id": s.me.id,
        "version": crate::VERSION,
        "addr": s.me.addr,
        "started_at_ms": h.started_ms,
        "uptime_s": now.saturating_sub(h.started_ms) / 1000,
        "cluster": {
            "name": h.trust.cluster.name,
            "hash": h.trust.cluster_hash,
            "signs_joins": h.trust.ca_key.is_some(),
        },
        "members": s.members,
        // Peers' clocks against ours (theirs minus ours); skewed: writes answer 503.
        "clock": h.clock.view(now),
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
fn nodes(h: &Handle, s: &Snapshot) -> Value {
    let records = scan_keyspace(&h.store, Keyspace::Nodes, "", 100_000).unwrap_or_default();
    let view = view(h, s);
    let mut held = crate::state::records::held_images(&h.store);
    let mut out = Vec::new();
    for e in records {
        let id = e.key.name().to_string();
        let state = member_state(s, &id);
        let evicted = NodeId::new(&id).is_ok_and(|n| h.is_revoked(&n));
        let mut v = value_of(&e.value);
        if let Value::Object(o) = &mut v {
            o.insert("state".into(), j!(if evicted { "evicted" } else { state }));
            // Drained: `draining` while replicas still run there, then `drained`.
            let drain = view.draining(&id).map(|left| {
                j!({ "state": if left == 0 { "drained" } else { "draining" }, "replicas_left": left })
            });
            o.insert("drain".into(), j!(drain));
            // What it holds, as its image record says (content addressed).
            o.insert("images".into(), j!(held.remove(&id).unwrap_or_default()));
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
        .map(|m| m.state.name())
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

const REPLAY_PAGE: usize = 512;
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(15);

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
    let Ok(permit) = h.event_streams.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many event streams on this node; try again later",
        );
    };
    // Subscribe before replaying, so nothing falls between the two.
    let rx = h.subscribe();
    // The replay is read page by page as the client takes it: a client asking for everything
    // (`since=0`) costs one page of memory, not the whole store.
    if let Some(n) = since {
        if let Err(e) = changes_since(&h.store, n, 1) {
            return error(StatusCode::GONE, e);
        }
    }
    let store = h.store.clone();
    // How far the replay got: the live part skips what it already sent.
    let replayed = Arc::new(AtomicU64::new(since.unwrap_or(0)));
    let progress = replayed.clone();
    let replay = stream::unfold(since, move |next| {
        let store = store.clone();
        let progress = progress.clone();
        async move {
            let n = next?;
            let page = changes_since(&store, n, REPLAY_PAGE).ok()?;
            let last = page.last()?.seq;
            progress.store(last, Rel);
            let more = (page.len() == REPLAY_PAGE).then_some(last);
            let bytes: Vec<u8> = page.iter().flat_map(|c| change_event(c).to_vec()).collect();
            Some((Ok(Frame::data(Bytes::from(bytes))), more))
        }
    });
    let first = stream::iter(std::iter::once(Ok(Frame::data(Bytes::from_static(
        b": shoal events\n\n",
    )))));
    // Live changes, with a comment every 15 s so idle streams stay open through proxies and
    // the listener's idle timeout, and dead clients are found. `last` skips what the replay
    // already sent.
    let beat = tokio::time::interval_at(crate::clock::now() + HEARTBEAT, HEARTBEAT);
    let live = stream::unfold(
        (rx, None, beat, permit),
        move |(mut rx, last, mut beat, permit)| {
            let replayed = replayed.clone();
            async move {
                // Read when the live part starts, that is, after the replay ended.
                let last = last.unwrap_or_else(|| replayed.load(Rel));
                loop {
                    tokio::select! {
                        r = rx.recv() => match r {
                            Ok(c) if c.seq <= last => continue,
                            Ok(c) => {
                                let seq = c.seq;
                                return Some((Ok(Frame::data(change_event(&c))), (rx, Some(seq), beat, permit)));
                            }
                            // Too slow a reader: end the stream; it reconnects with Last-Event-ID.
                            Err(broadcast::error::RecvError::Lagged(_)) => return None,
                            Err(broadcast::error::RecvError::Closed) => return None,
                        },
                        _ = beat.tick() => {
                            return Some((Ok(Frame::data(Bytes::from_static(b": ping\n\n"))), (rx, Some(last), beat, permit)));
                        }
                    }
                }
            }
        },
    );
    let body = BodyExt::boxed(StreamBody::new(futures_util::StreamExt::chain(
        futures_util::StreamExt::chain(first, replay),
        live,
    )));
    Response::builder()
        .header(hyper::header::CONTENT_TYPE, "text/event-stream")
        .header(hyper::header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| Response::new(full("")))
}

async fn metrics(
    h: &Handle,
    ingress: Option<&crate::ingress::metrics::Registry>,
) -> Response<Body> {
    let mut out = super::metrics::render(h).await;
    if let Some(i) = ingress {
        i.render(&mut out);
    }
    text(StatusCode::OK, "text/plain; version=0.0.4", out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_port_shows_env_names_not_values() {
        let app = j!({"name": "web", "run": {"env": {"DB_PASSWORD": "hunter2", "MODE": "prod"}, "port": 8080}});
        let shown = public_app(app);
        assert_eq!(shown["run"]["env"], j!(["DB_PASSWORD", "MODE"]));
        assert_eq!(shown["run"]["port"], 8080);
        assert!(!shown.to_string().contains("hunter2"));
        // A spec without env is unchanged.
        assert_eq!(public_app(j!({"name": "x"})), j!({"name": "x"}));
    }
}
