//! The API listener (:7443): peer traffic under `/peer/`, and writes, which need the admin
//! token (`Authorization: Bearer ...`, compared in constant time).

use super::{error, json, Body};
use crate::daemon::peer::{CONTENT_TYPE, IDENTITY_PATH, MSG_PATH};
use crate::daemon::{Command, Counters, Handle};
use crate::spec::{valid_name, AppSpec};
use crate::store::replica::read_entry;
use crate::store::{Bytes, Key};
use crate::sync::message::{decode, MAX_MESSAGE_BYTES};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json as j;
use std::net::SocketAddr;

const MAX_SPEC_BYTES: usize = 1 << 20;

pub async fn handle(req: Request<Incoming>, remote: SocketAddr, h: Handle) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (Method::POST, _) if path == MSG_PATH => peer_message(req, remote, &h).await,
        (Method::GET, _) if path == IDENTITY_PATH => json(StatusCode::OK, &h.me),
        (Method::PUT, ["v1", "apps", name]) => {
            let name = name.to_string();
            if let Err(r) = authorize(&req, &h) {
                return r;
            }
            put_app(req, &name, &h).await
        }
        (Method::DELETE, ["v1", "apps", name]) => {
            if let Err(r) = authorize(&req, &h) {
                return r;
            }
            delete_app(name, &h).await
        }
        (_, ["v1", "apps", _]) => error(StatusCode::METHOD_NOT_ALLOWED, "use PUT or DELETE"),
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

async fn peer_message(req: Request<Incoming>, remote: SocketAddr, h: &Handle) -> Response<Body> {
    Counters::inc(&h.counters.peer_messages);
    let refuse = |status, msg: String| {
        Counters::inc(&h.counters.peer_messages_refused);
        tracing::warn!(%remote, err = %msg, "peer message refused");
        error(status, msg)
    };
    if req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        != Some(CONTENT_TYPE)
    {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("peer messages are {CONTENT_TYPE}"),
        );
    }
    let body = match super::read_body(req, MAX_MESSAGE_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read message: {e}"),
            )
        }
    };
    match decode(&body) {
        Ok(env) => match h.send(Command::Envelope(env)).await {
            Ok(()) => Response::builder()
                .status(StatusCode::ACCEPTED)
                .body(super::full(""))
                .unwrap_or_else(|_| Response::new(super::full(""))),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        Err(e) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// Compares without an early exit, so timing says nothing about the token.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[allow(clippy::result_large_err)]
fn authorize(req: &Request<Incoming>, h: &Handle) -> Result<(), Response<Body>> {
    let Some(token) = &h.admin_token else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "this node has no admin token (bundle/admin.token): writes are disabled",
        ));
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if ct_eq(g.trim().as_bytes(), token.as_bytes()) => Ok(()),
        _ => {
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

async fn put_app(req: Request<Incoming>, name: &str, h: &Handle) -> Response<Body> {
    if !valid_name(name) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("app name {name:?}: use 1-63 lowercase letters, digits and '-'"),
        );
    }
    let body = match super::read_body(req, MAX_SPEC_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the spec: {e}"),
            )
        }
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the app spec must be UTF-8 TOML or JSON",
        );
    };
    let spec = match AppSpec::parse(text) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if spec.name != name {
        return error(
            StatusCode::BAD_REQUEST,
            format!("the spec names {:?} but the path names {name:?}", spec.name),
        );
    }
    let Ok(key) = Key::parse(&format!("apps/{name}")) else {
        return error(StatusCode::BAD_REQUEST, "bad app name");
    };
    let value = Bytes::from(serde_json::to_vec(&spec).unwrap_or_default());
    match h.write(vec![(key, Some(value))]).await {
        Ok(v) => {
            Counters::inc(&h.counters.writes);
            json(
                StatusCode::OK,
                &j!({ "name": name, "version": v.first().map(|v| v.to_string()) }),
            )
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn delete_app(name: &str, h: &Handle) -> Response<Body> {
    let key = match Key::parse(&format!("apps/{name}")) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match read_entry(&h.store, key.as_str()) {
        Ok(Some((e, _))) if !e.is_tombstone() => {}
        Ok(_) => return error(StatusCode::NOT_FOUND, format!("no app named {name:?}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
    match h.write(vec![(key, None)]).await {
        Ok(v) => {
            Counters::inc(&h.counters.writes);
            json(
                StatusCode::OK,
                &j!({ "name": name, "deleted": true, "version": v.first().map(|v| v.to_string()) }),
            )
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_compare() {
        assert!(super::ct_eq(b"abc", b"abc"));
        assert!(!super::ct_eq(b"abc", b"abd"));
        assert!(!super::ct_eq(b"abc", b"abcd"));
    }
}
