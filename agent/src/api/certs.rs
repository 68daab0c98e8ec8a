//! Certificates for the ingress's TLS (`listen.https`): `PUT /v1/certs/{host}` takes a PEM
//! with the chain (leaf first) and its private key, checks that they go together, name the
//! host and are in date, and stores them at `certs/<host>` with the key sealed like a
//! secret; `DELETE` removes one; `GET /v1/certs` lists them (names and expiry, never keys).
//! `host` may be a wildcard, `*.example.com`.

use super::{error, json, Body};
use crate::identity::vouch::OperatorKey;
use crate::ingress::{certs, routes};
use crate::state::records::{self, CertRecord};
use crate::state::Handle;
use crate::store::{keys, Bytes, Key};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json as j;
use std::sync::Arc;

/// The largest PEM a `PUT` takes: a chain of a few certificates and a key.
const MAX_PEM_BYTES: usize = 256 << 10;

/// The store key for a host as given, or why it is not one.
#[allow(clippy::result_large_err)]
fn key_of(host: &str) -> Result<Key, Response<Body>> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if routes::normalize(name).as_deref() != Some(name) || name.contains(':') {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!(
                "{:?} is not a host name: lowercase DNS labels, or *. and one",
                crate::http::short(host)
            ),
        ));
    }
    keys::cert(host).map_err(|e| error(StatusCode::BAD_REQUEST, e))
}

pub async fn put(
    req: Request<Incoming>,
    host: &str,
    h: &Handle,
    op: Arc<OperatorKey>,
) -> Response<Body> {
    let key = match key_of(host) {
        Ok(k) => k,
        Err(r) => return super::control::drain_then(req, r).await,
    };
    let pem = match super::read_body(req, MAX_PEM_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "cannot read the PEM ({} KiB at most): {e}",
                    MAX_PEM_BYTES >> 10
                ),
            )
        }
    };
    // A wildcard upload must cover the wildcard itself.
    let parsed = match certs::parse(&pem, host, crate::clock::wall_ms()) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let sealed = match h
        .trust
        .secrets
        .seal(key.as_str(), parsed.key_pem.as_bytes())
    {
        Ok(s) => s,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let record = CertRecord {
        chain_pem: parsed.chain_pem,
        key_sealed: crate::identity::join::hex(&sealed),
        names: parsed.names.clone(),
        not_after_ms: parsed.not_after_ms,
    };
    let value = match serde_json::to_vec(&record) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    super::control::write_one(
        h,
        op,
        key,
        Some(Bytes::from(value)),
        j!({ "host": host, "names": parsed.names, "not_after_ms": parsed.not_after_ms }),
    )
    .await
}

pub async fn delete(host: &str, h: &Handle, op: Arc<OperatorKey>) -> Response<Body> {
    let key = match key_of(host) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let missing = format!("no certificate was uploaded for {host}");
    super::control::delete_one(h, op, key, missing, j!({ "host": host })).await
}

pub fn list(h: &Handle) -> Response<Body> {
    let out: Vec<serde_json::Value> = records::certs(&h.store)
        .into_iter()
        .map(|(host, c)| j!({ "host": host, "names": c.names, "not_after_ms": c.not_after_ms }))
        .collect();
    json(StatusCode::OK, &out)
}
