//! Writes to apps on the API port: a spec (with the one it replaces kept in the app's
//! history, in the same batch), a deletion, a rollback to an earlier spec, and the history
//! itself. Every write is the operator's, signed with the key the bearer token derives.

use super::{error, json, Body};
use crate::identity::vouch::OperatorKey;
use crate::spec::{valid_name, AppSpec};
use crate::state::records::{self, AppRecord, Previous, HISTORY_LEN};
use crate::state::{Counters, Handle};
use crate::store::replica::read_entry;
use crate::store::{keys, Bytes, Key};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json as j;
use std::sync::Arc;

const MAX_SPEC_BYTES: usize = 1 << 20;

fn bad_name(name: &str) -> Option<Response<Body>> {
    (!valid_name(name)).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            format!("app name {name:?}: use 1-63 lowercase letters, digits and '-'"),
        )
    })
}

/// `PUT /v1/apps/{name}`: a TOML or JSON spec.
pub async fn put(
    req: Request<Incoming>,
    name: &str,
    h: &Handle,
    op: Arc<OperatorKey>,
) -> Response<Body> {
    // The body is read first: refusing with it unread resets HTTP/2 streams.
    let body = match super::read_body(req, MAX_SPEC_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the spec: {e}"),
            )
        }
    };
    if let Some(r) = bad_name(name) {
        return r;
    }
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
    let history = records::history(&h.store, name);
    write_spec(h, op, spec, records::app(&h.store, name), history).await
}

/// Writes `spec` as the app's record and, when it changes what containers run, keeps the
/// spec it replaces first in the history: one batch, so no spec is ever lost between them.
async fn write_spec(
    h: &Handle,
    op: Arc<OperatorKey>,
    spec: AppSpec,
    current: Option<AppRecord>,
    mut history: Vec<Previous>,
) -> Response<Body> {
    let name = spec.name.clone();
    let revision = spec.revision();
    let (Ok(app_key), Ok(history_key)) = (keys::app(&name), keys::history(&name)) else {
        return error(StatusCode::BAD_REQUEST, "bad app name");
    };
    let mut ops: Vec<(Key, Option<Bytes>)> = vec![(
        app_key,
        Some(Bytes::from(serde_json::to_vec(&spec).unwrap_or_default())),
    )];
    let replaced = current.as_ref().map(|c| c.revision.clone());
    if let Some(c) = current.filter(|c| c.revision != revision) {
        history.retain(|p| p.revision != c.revision && p.revision != revision);
        history.insert(
            0,
            Previous {
                revision: c.revision,
                spec: c.spec,
                replaced_ms: crate::clock::wall_ms(),
            },
        );
        history.truncate(HISTORY_LEN);
        // Large specs keep fewer earlier ones: the list is one store value, and values are
        // capped.
        let mut value = serde_json::to_vec(&history).unwrap_or_default();
        while value.len() > crate::store::entry::MAX_VALUE_LEN && history.len() > 1 {
            history.pop();
            value = serde_json::to_vec(&history).unwrap_or_default();
        }
        ops.push((history_key, Some(Bytes::from(value))));
    }
    match h.write_as(ops, op).await {
        Ok(v) => {
            Counters::inc(&h.counters.writes);
            json(
                StatusCode::OK,
                &j!({
                    "name": name,
                    "version": v.first().map(|v| v.to_string()),
                    "revision": revision,
                    "replaces": replaced,
                }),
            )
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// `DELETE /v1/apps/{name}`: the app and its history.
pub async fn delete(name: &str, h: &Handle, op: Arc<OperatorKey>) -> Response<Body> {
    let (key, history_key) = match (keys::app(name), keys::history(name)) {
        (Ok(k), Ok(hk)) => (k, hk),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let exists = |k: &Key| {
        read_entry(&h.store, k.as_str()).map(|e| e.is_some_and(|(e, _)| !e.is_tombstone()))
    };
    match exists(&key) {
        Ok(true) => {}
        Ok(false) => return error(StatusCode::NOT_FOUND, format!("no app named {name:?}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
    let mut ops = vec![(key, None)];
    if exists(&history_key).unwrap_or(false) {
        ops.push((history_key, None));
    }
    match h.write_as(ops, op).await {
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

/// `POST /v1/apps/{name}/rollback[?to=REVISION]`: writes an earlier spec back as the app's
/// record, keeping the current one in the history: the revision named, or the newest earlier
/// one that did not fail its rollout (after an automatic rollback, the one running). The
/// rollout that follows is an ordinary one.
pub async fn rollback(
    name: &str,
    query: Option<&str>,
    h: &Handle,
    op: Arc<OperatorKey>,
) -> Response<Body> {
    if let Some(r) = bad_name(name) {
        return r;
    }
    let to = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("to="));
    let Some(current) = records::app(&h.store, name) else {
        return error(StatusCode::NOT_FOUND, format!("no app named {name:?}"));
    };
    let history = records::history(&h.store, name);
    let view = crate::rollout::View {
        apps: vec![current.clone()],
        history: std::collections::BTreeMap::from([(name.to_string(), history.clone())]),
        outcomes: records::rollouts(&h.store),
        ..Default::default()
    };
    let chosen = match to {
        Some(rev) => history.iter().find(|p| p.revision == rev),
        None => view.rollback_target(&current),
    };
    let Some(chosen) = chosen.cloned() else {
        let why = match to {
            Some(rev) => format!(
                "app {name:?} has no earlier revision {rev:?} (GET /v1/apps/{name}/history lists them)"
            ),
            None => format!("app {name:?} has no earlier revision to roll back to"),
        };
        return error(StatusCode::CONFLICT, why);
    };
    if chosen.revision == current.revision {
        return error(
            StatusCode::CONFLICT,
            format!("app {name:?} already runs revision {}", chosen.revision),
        );
    }
    tracing::info!(app = %name, from = %current.revision, to = %chosen.revision, "rolling back on request");
    write_spec(h, op, chosen.spec, Some(current), history).await
}

/// `GET /v1/apps/{name}/history`: the current spec and the earlier ones, newest first.
pub fn history(name: &str, h: &Handle) -> Response<Body> {
    if let Some(r) = bad_name(name) {
        return r;
    }
    let Some(current) = records::app(&h.store, name) else {
        return error(StatusCode::NOT_FOUND, format!("no app named {name:?}"));
    };
    let previous = records::history(&h.store, name);
    json(
        StatusCode::OK,
        &j!({
            "name": name,
            "current": { "revision": current.revision, "version": current.record, "spec": current.spec },
            "previous": previous,
        }),
    )
}
