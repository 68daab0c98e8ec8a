//! The API listener (:7443, TLS): peer traffic under `/peer/`, which needs a client
//! certificate from the cluster CA (except the join request, authenticated by the join
//! secret), and writes, which need the admin token (`Authorization: Bearer ...`, compared in
//! constant time).

use super::{error, json, Body, Conn};
use crate::identity::cert::sign_request;
use crate::identity::join::{JoinReply, JoinRequest, JOIN_PATH};
use crate::identity::vouch::OperatorKey;
use crate::peer::{CONTENT_TYPE, IDENTITY_PATH, MSG_PATH};
use crate::spec::{valid_name, valid_secret_name};
use crate::state::{Counters, Handle};
use crate::store::replica::read_entry;
use crate::store::NodeId;
use crate::store::{keys, Bytes, Key};
use crate::sync::message::{decode, MAX_MESSAGE_BYTES};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json as j;
use std::sync::Arc;

const MAX_SECRET_BYTES: usize = 64 * 1024;

/// What the API listener works with: the node's state, and its runtime's images when it
/// runs containers.
#[derive(Clone)]
pub struct Api {
    pub h: Handle,
    pub images: Option<Arc<dyn crate::executor::images::Images>>,
    /// Places for image transfers to peers (`images::serve`): each reads a whole image.
    pub exports: Arc<tokio::sync::Semaphore>,
    /// Transfers under way, which a peer asking for the same image joins.
    pub shared: Arc<super::exports::Exports>,
    /// The node's ingress, for requests other nodes pass on.
    pub ingress: Option<Arc<crate::ingress::proxy::Proxy>>,
}

impl Api {
    pub fn new(h: Handle, images: Option<Arc<dyn crate::executor::images::Images>>) -> Api {
        Api {
            h,
            images,
            exports: Arc::new(tokio::sync::Semaphore::new(super::images::MAX_EXPORTS)),
            shared: Default::default(),
            ingress: None,
        }
    }
}

#[tracing::instrument(name = "api", skip_all, fields(method = %req.method(), path = super::short(req.uri().path()), remote = %conn.remote))]
pub async fn handle(req: Request<Incoming>, conn: Conn, api: Api) -> Response<Body> {
    let h = &api.h;
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    if path == JOIN_PATH && method == Method::POST {
        return join(req, &conn, h).await;
    }
    // A request another node's ingress passed on: only a member may, and it goes to this
    // node's replicas, whatever its path.
    if req.headers().contains_key(crate::ingress::proxy::HOP) {
        let (Some(peer), Some(proxy)) = (conn.peer.as_deref(), api.ingress.clone()) else {
            return drain_then(
                req,
                error(StatusCode::FORBIDDEN, "only a member passes requests on"),
            )
            .await;
        };
        if NodeId::new(peer).is_ok_and(|n| h.is_revoked(&n)) {
            return drain_then(
                req,
                error(StatusCode::FORBIDDEN, "evicted nodes pass nothing on"),
            )
            .await;
        }
        return crate::ingress::proxy::handle_hop(req, proxy).await;
    }
    if path.starts_with("/peer/") {
        let Some(peer) = conn.peer.clone() else {
            h.counters.refused(crate::tls::Refusal::NoClientCertificate);
            tracing::warn!(remote = %conn.remote, %path, "peer request without a cluster client certificate refused");
            let r = error(
                StatusCode::UNAUTHORIZED,
                "peer paths need a client certificate from the cluster CA",
            );
            return drain_then(req, r).await;
        };
        return match (method, path.as_str()) {
            (Method::POST, MSG_PATH) => peer_message(req, &conn, &peer, h).await,
            (Method::GET, IDENTITY_PATH) => json(StatusCode::OK, &h.me),
            (Method::GET, p) if p.starts_with(super::images::PEER_PATH) => {
                super::images::serve(&p[super::images::PEER_PATH.len()..], &peer, &api).await
            }
            _ => error(
                StatusCode::NOT_FOUND,
                format!("no such peer endpoint: {path}"),
            ),
        };
    }
    match (method, parts.as_slice()) {
        (Method::PUT, ["v1", "apps", app, "secrets", name]) => {
            let (app, name) = (app.to_string(), name.to_string());
            let op = match authorize(&req, h) {
                Ok(op) => op,
                Err(r) => return drain_then(req, r).await,
            };
            put_secret(req, &app, &name, h, op).await
        }
        (Method::DELETE, ["v1", "apps", app, "secrets", name]) => {
            let op = match authorize(&req, h) {
                Ok(op) => op,
                Err(r) => return drain_then(req, r).await,
            };
            delete_secret(app, name, h, op).await
        }
        (_, ["v1", "apps", _, "secrets", _]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "use PUT or DELETE")
        }
        (Method::PUT, ["v1", "apps", name]) => {
            let name = name.to_string();
            let op = match authorize(&req, h) {
                Ok(op) => op,
                Err(r) => return drain_then(req, r).await,
            };
            super::apps::put(req, &name, &api, op).await
        }
        (Method::DELETE, ["v1", "apps", name]) => {
            let op = match authorize(&req, h) {
                Ok(op) => op,
                Err(r) => return drain_then(req, r).await,
            };
            super::apps::delete(name, h, op).await
        }
        (_, ["v1", "apps", _]) => error(StatusCode::METHOD_NOT_ALLOWED, "use PUT or DELETE"),
        (Method::POST, ["v1", "apps", name, "rollback"]) => {
            let op = match authorize(&req, h) {
                Ok(op) => op,
                Err(r) => return drain_then(req, r).await,
            };
            super::apps::rollback(name, req.uri().query(), h, op).await
        }
        (_, ["v1", "apps", _, "rollback"]) => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (Method::GET, ["v1", "apps", name, "history"]) => match authorize(&req, h) {
            Ok(_) => super::apps::history(name, h),
            Err(r) => r,
        },
        (_, ["v1", "apps", _, "history"]) => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (Method::POST, ["v1", "images"]) => {
            if let Err(r) = authorize(&req, h) {
                return drain_then(req, r).await;
            }
            super::images::load(req, &api).await
        }
        (_, ["v1", "images"]) => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (Method::DELETE, ["v1", "nodes", id]) => {
            let op = match authorize(&req, h) {
                Ok(op) => op,
                Err(r) => return drain_then(req, r).await,
            };
            evict(id, h, op).await
        }
        (Method::POST, ["v1", "nodes", id, verb @ ("drain" | "uncordon")]) => {
            let op = match authorize(&req, h) {
                Ok(op) => op,
                Err(r) => return drain_then(req, r).await,
            };
            if *verb == "drain" {
                super::nodes::drain(id, h, op).await
            } else {
                super::nodes::uncordon(id, h, op).await
            }
        }
        (_, ["v1", "nodes", _, "drain" | "uncordon"]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "use POST")
        }
        (Method::PUT, ["v1", "certs", host]) => {
            let host = host.to_string();
            let op = match authorize(&req, h) {
                Ok(op) => op,
                Err(r) => return drain_then(req, r).await,
            };
            super::certs::put(req, &host, h, op).await
        }
        (Method::DELETE, ["v1", "certs", host]) => {
            let op = match authorize(&req, h) {
                Ok(op) => op,
                Err(r) => return drain_then(req, r).await,
            };
            super::certs::delete(host, h, op).await
        }
        (_, ["v1", "certs", _]) => error(StatusCode::METHOD_NOT_ALLOWED, "use PUT or DELETE"),
        (Method::GET, ["v1", "certs"]) => match authorize(&req, h) {
            Ok(_) => super::certs::list(h),
            Err(r) => r,
        },
        (_, ["v1", "certs"]) => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (Method::PUT, ["v1", "cluster", "join-secret"]) => {
            let op = match authorize(&req, h) {
                Ok(op) => op,
                Err(r) => return drain_then(req, r).await,
            };
            rotate_join_secret(req, h, op).await
        }
        (_, ["v1", "cluster", "join-secret"]) => error(StatusCode::METHOD_NOT_ALLOWED, "use PUT"),
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// Puts a new join secret in force cluster-wide: `cluster/join`, sealed with the data key.
/// From then on every member admits only holders of the new secret; nodes already in keep
/// their certificates and sealed secrets stay readable (the data key does not change). The
/// answer carries the data key wrapped for the new secret, for new nodes' user-data.
async fn rotate_join_secret(
    req: Request<Incoming>,
    h: &Handle,
    op: Arc<OperatorKey>,
) -> Response<Body> {
    let body = match super::read_body(req, 4096).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the join secret (4 KiB at most): {e}"),
            )
        }
    };
    let text = String::from_utf8_lossy(&body);
    let secret = match crate::identity::join::check_join_secret(&text) {
        Ok(s) => s.to_string(),
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let id = &h.trust.cluster.id;
    let record = crate::identity::join::JoinSecretRecord::new(
        &h.trust.secrets,
        &secret,
        id,
        crate::clock::wall_ms(),
    );
    let (record, data_key) = match (record, h.trust.secrets.wrap(&secret, id)) {
        (Ok(r), Ok(k)) => (r, k),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let Ok(key) = keys::join_secret() else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "bad key");
    };
    let fingerprint = record.fingerprint.clone();
    let value = serde_json::to_vec(&record).unwrap_or_default();
    tracing::warn!(%fingerprint, "the join secret was rotated: only the new one admits nodes");
    write_one(
        h,
        op,
        key,
        Some(Bytes::from(value)),
        j!({ "join_secret_fingerprint": fingerprint, "data_key": data_key }),
    )
    .await
}

async fn peer_message(
    req: Request<Incoming>,
    conn: &Conn,
    peer: &str,
    h: &Handle,
) -> Response<Body> {
    Counters::inc(&h.counters.peer_messages);
    let remote = conn.remote;
    let refuse = |status, msg: String| {
        Counters::inc(&h.counters.peer_messages_refused);
        tracing::warn!(%remote, %peer, err = %msg, "peer message refused");
        error(status, msg)
    };
    let content_type = req.headers().get(hyper::header::CONTENT_TYPE).cloned();
    let body = match super::read_body(req, MAX_MESSAGE_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read message: {e}"),
            )
        }
    };
    if content_type.as_ref().and_then(|v| v.to_str().ok()) != Some(CONTENT_TYPE) {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("peer messages are {CONTENT_TYPE}"),
        );
    }
    if let Ok(id) = NodeId::new(peer) {
        if h.is_revoked(&id) {
            return refuse(
                StatusCode::FORBIDDEN,
                format!("node {id} was evicted from this cluster"),
            );
        }
    }
    match decode(&body) {
        // A member speaks only for itself: its certificate names the node it is.
        Ok(env) if env.from.id.as_str() != peer => refuse(
            StatusCode::FORBIDDEN,
            format!(
                "message signed as {:?} on a connection certified for {peer:?}",
                env.from.id.as_str()
            ),
        ),
        Ok(env) => match h.deliver(env).await {
            Ok(()) => Response::builder()
                .status(StatusCode::ACCEPTED)
                .body(super::full(""))
                .unwrap_or_else(|_| Response::new(super::full(""))),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        Err(e) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// TLS bootstrap: signs a certificate for a node that proves it holds the join secret.
async fn join(req: Request<Incoming>, conn: &Conn, h: &Handle) -> Response<Body> {
    Counters::inc(&h.counters.join_requests);
    let body = match super::read_body(req, 64 * 1024).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the request: {e}"),
            )
        }
    };
    let jr: JoinRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a join request: {e}")),
    };
    // Checked before anything is logged: the id is the caller's text, and a log line must not
    // carry what it likes (newlines, 64 KiB).
    let id = match NodeId::new(&jr.node_id) {
        Ok(id) => id,
        Err(e) => {
            Counters::inc(&h.counters.join_refused);
            tracing::warn!(remote = %conn.remote, err = %e, "join refused: invalid node id");
            return error(StatusCode::BAD_REQUEST, e);
        }
    };
    let secret = h.join_secret();
    if !jr.verify(&secret) {
        Counters::inc(&h.counters.join_refused);
        tracing::warn!(
            remote = %conn.remote,
            node = %jr.node_id,
            "join refused: the request is not signed with this cluster's join secret"
        );
        return error(
            StatusCode::FORBIDDEN,
            "the request is not signed with this cluster's join secret",
        );
    }
    if jr.addrs.len() > 64 {
        return error(StatusCode::BAD_REQUEST, "at most 64 addresses");
    }
    // An evicted id stays out, and a live node's id cannot be taken over: its holder would
    // speak for it.
    if h.is_revoked(&id) {
        Counters::inc(&h.counters.join_refused);
        tracing::warn!(remote = %conn.remote, node = %id, "join refused: that node was evicted");
        return error(
            StatusCode::FORBIDDEN,
            format!("node {id} was evicted from this cluster: join with another id"),
        );
    }
    let live = id == h.me.id
        || h.snapshot().await.is_ok_and(|s| {
            s.members
                .iter()
                .any(|m| m.id == id && m.state == crate::membership::MemberState::Alive)
        });
    if live {
        Counters::inc(&h.counters.join_refused);
        tracing::warn!(remote = %conn.remote, node = %id, "join refused: a live member has that id");
        return error(
            StatusCode::CONFLICT,
            format!("node {id} is a live member: a joining node needs an id of its own"),
        );
    }
    let Some(ca_key) = &h.trust.ca_key else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node cannot sign certificates (it joined with the join secret): ask a node that holds the cluster bundle",
        );
    };
    let cert = match sign_request(&h.trust.ca_pem, ca_key, &jr.csr, &jr.node_id, &jr.addrs) {
        Ok(c) => c,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot sign that request: {e}"),
            )
        }
    };
    tracing::info!(remote = %conn.remote, node = %jr.node_id, "signed a certificate for a joining node");
    let data_key = match h.trust.secrets.wrap(&secret, &h.trust.cluster.id) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let reply = JoinReply::new(
        &secret,
        &jr,
        &h.trust.cluster,
        &h.trust.ca_pem,
        &cert,
        &data_key,
    );
    json(StatusCode::OK, &reply)
}

/// Evicts a node: `revoked/<id>`, signed by the operator, tells every node to refuse its
/// connections, its entries and its id at the join door. Ids are not reused after eviction.
async fn evict(id: &str, h: &Handle, op: Arc<OperatorKey>) -> Response<Body> {
    let id = match super::nodes::known(id, h) {
        Ok(id) => id,
        Err(r) => return r,
    };
    if id == h.me.id {
        return error(
            StatusCode::CONFLICT,
            format!("node {id} is the node answering: evict it through another node"),
        );
    }
    if h.is_revoked(&id) {
        return json(
            StatusCode::OK,
            &j!({ "node": id, "evicted": true, "already": true }),
        );
    }
    let Ok(key) = keys::revoked(&id) else {
        return error(StatusCode::BAD_REQUEST, "bad node id");
    };
    let value = j!({
        "node": id,
        "evicted_at_ms": crate::clock::wall_ms(),
        "by": h.me.id,
    });
    tracing::warn!(node = %id, "evicting a node: its identity is revoked cluster-wide");
    write_one(
        h,
        op,
        key,
        Some(Bytes::from(value.to_string())),
        j!({ "node": id, "evicted": true }),
    )
    .await
}

#[allow(clippy::result_large_err)]
fn secret_key(app: &str, name: &str) -> Result<Key, Response<Body>> {
    if !valid_name(app) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("app name {app:?}: use 1-63 lowercase letters, digits and '-'"),
        ));
    }
    if !valid_secret_name(name) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("secret name {name:?}: use upper-case letters, digits and '_', not starting with a digit"),
        ));
    }
    keys::secret(app, name).map_err(|e| error(StatusCode::BAD_REQUEST, e))
}

/// Stores an app secret sealed with the cluster's secret key; the value is never logged,
/// echoed, or readable through any endpoint.
async fn put_secret(
    req: Request<Incoming>,
    app: &str,
    name: &str,
    h: &Handle,
    op: Arc<OperatorKey>,
) -> Response<Body> {
    let value = match super::read_body(req, MAX_SECRET_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the secret (64 KiB at most): {e}"),
            )
        }
    };
    let key = match secret_key(app, name) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let sealed = match h.trust.secrets.seal(key.as_str(), &value) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    write_one(
        h,
        op,
        key,
        Some(Bytes::from(sealed)),
        j!({ "app": app, "secret": name }),
    )
    .await
}

async fn delete_secret(app: &str, name: &str, h: &Handle, op: Arc<OperatorKey>) -> Response<Body> {
    let key = match secret_key(app, name) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let missing = format!("app {app:?} has no secret {name:?}");
    delete_one(h, op, key, missing, j!({ "app": app, "secret": name })).await
}

/// Reads and discards (a bounded amount of) the request body before answering a refusal:
/// HTTP/2 clients such as curl report a reset stream instead of the answer when the body is
/// left unread. Bounded in bytes and time, and nothing is kept, so a refused upload costs
/// little.
pub(super) async fn drain_then(req: Request<Incoming>, r: Response<Body>) -> Response<Body> {
    use http_body_util::BodyExt;
    const DRAIN_BYTES: usize = 64 << 20;
    let mut body = req.into_body();
    let drain = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DRAIN_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
    r
}

/// Checks the bearer token against the cluster's operator key (this node keeps only its
/// public half) and answers the key derived from it, which signs the request's writes.
#[allow(clippy::result_large_err)]
fn authorize(req: &Request<Incoming>, h: &Handle) -> Result<Arc<OperatorKey>, Response<Body>> {
    let Some(public) = h.trust.operator else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "this node knows no operator key (cluster.json has no operator_key): writes are disabled",
        ));
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given.and_then(|g| public.accepts(g, &h.trust.cluster.id)) {
        Some(key) => {
            // A write from a node whose clock its peers disagree with goes nowhere: say so.
            let clock = h.clock.view(crate::clock::wall_ms());
            if clock.skewed {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "this node's clock is {} s off its peers' ({} heard), more than the {} s the cluster allows: its writes would be refused; fix its time (NTP) and retry",
                        -clock.offset_ms / 1000,
                        clock.peers,
                        crate::store::replica::MAX_DRIFT_MS / 1000
                    ),
                ));
            }
            Ok(Arc::new(key))
        }
        None => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong admin token: send Authorization: Bearer <admin.token>",
            );
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            Err(r)
        }
    }
}

/// Writes one key; answers `body` with the write's version added, or 503.
pub(super) async fn write_one(
    h: &Handle,
    op: Arc<OperatorKey>,
    key: Key,
    value: Option<Bytes>,
    mut body: serde_json::Value,
) -> Response<Body> {
    match h.write_as(vec![(key, value)], op).await {
        Ok(v) => {
            Counters::inc(&h.counters.writes);
            body["version"] = j!(v.first().map(|v| v.to_string()));
            json(StatusCode::OK, &body)
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// Deletes a key that holds a value; 404 with `missing` when it does not.
pub(super) async fn delete_one(
    h: &Handle,
    op: Arc<OperatorKey>,
    key: Key,
    missing: String,
    mut body: serde_json::Value,
) -> Response<Body> {
    match read_entry(&h.store, key.as_str()) {
        Ok(Some((e, _))) if !e.is_tombstone() => {}
        Ok(_) => return error(StatusCode::NOT_FOUND, missing),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
    body["deleted"] = j!(true);
    write_one(h, op, key, None, body).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn secret_names_are_environment_names() {
        for ok in ["API_KEY", "A", "_X1"] {
            assert!(crate::spec::valid_secret_name(ok), "{ok}");
        }
        for bad in ["", "api_key", "1A", "A-B", "A B", "A/B"] {
            assert!(!crate::spec::valid_secret_name(bad), "{bad}");
        }
    }
}
