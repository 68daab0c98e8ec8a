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
    api: &super::control::Api,
    op: Arc<OperatorKey>,
) -> Response<Body> {
    let h = &api.h;
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
    let mut spec = spec;
    if let Err(r) = pin(&mut spec, h, api.images.as_deref()).await {
        return r;
    }
    let history = records::history(&h.store, name);
    write_spec(h, op, spec, records::app(&h.store, name), history).await
}

/// Pins the spec's image to what it names now, by content (`source.pinned`), so every
/// replica of this revision runs the same bytes: a registry's digest for a reference that
/// names its registry (`host[:port]/…`), else the image id the live nodes hold under that
/// name (this node's runtime asked directly), else Docker Hub's digest. Nodes that hold
/// different images under the name are a conflict (409): the operator names a digest. A
/// reference nothing resolves stays as written (a node pulls it by name when it runs it).
async fn pin(
    spec: &mut AppSpec,
    h: &Handle,
    images: Option<&dyn crate::executor::images::Images>,
) -> Result<(), Response<Body>> {
    let Some(image) = spec.source.image.clone() else {
        return Ok(());
    };
    if spec.source.pinned.is_some() || crate::spec::is_pinned(&image) {
        return Ok(());
    }
    let auth = spec.source.credentials.as_ref().and_then(|c| {
        let key = keys::secret(&spec.name, c).ok()?;
        let (e, _) = read_entry(&h.store, key.as_str()).ok()??;
        let login = h.trust.secrets.open(key.as_str(), e.value.as_ref()?).ok()?;
        let login = String::from_utf8(login).ok()?;
        let (user, password) = login.split_once(':').unwrap_or((login.as_str(), ""));
        Some(crate::executor::RegistryAuth {
            username: user.to_string(),
            password: password.to_string(),
        })
    });
    let names_registry = image
        .split_once('/')
        .is_some_and(|(host, _)| host.contains('.') || host.contains(':') || host == "localhost");
    if names_registry {
        if let Some(p) = match images {
            Some(i) => i.resolve(&image, auth.clone()).await,
            None => None,
        } {
            spec.source.pinned = Some(p);
            return Ok(());
        }
    }
    // What the live nodes hold under the name, this node's runtime asked directly.
    let live: Vec<String> = match h.snapshot().await {
        Ok(s) => s
            .members
            .iter()
            .filter(|m| m.state.is_live())
            .map(|m| m.id.to_string())
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut held = records::held_images(&h.store);
    held.retain(|node, _| live.contains(node) || *node == h.me.id.as_str());
    if let Some(i) = images {
        if let Ok(mine) = i.held().await {
            held.insert(h.me.id.to_string(), mine);
        }
    }
    let mut ids: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (node, list) in &held {
        for img in list.iter().filter(|i| i.answers_to(&image)) {
            ids.entry(img.id.clone()).or_default().push(node.clone());
        }
    }
    match ids.len() {
        0 => {}
        1 => {
            spec.source.pinned = ids.into_keys().next();
            return Ok(());
        }
        _ => {
            return Err(json(
                StatusCode::CONFLICT,
                &j!({
                    "error": format!("nodes hold different images named {image}: load the same image on every node, or name one by digest (image@sha256:…) or set source.pinned"),
                    "held": ids,
                }),
            ))
        }
    }
    if !names_registry {
        if let Some(i) = images {
            spec.source.pinned = i.resolve(&image, auth).await;
        }
    }
    Ok(())
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
            let mut answer = j!({
                "name": name,
                "version": v.first().map(|v| v.to_string()),
                "revision": revision,
                "replaces": replaced,
                "image": spec.source.run_image(),
            });
            if let Some(w) = unpinned(&spec) {
                answer["warning"] = j!(w);
            }
            json(StatusCode::OK, &answer)
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// What the deploy's answer says when nothing pinned the image by content: the write stands
/// (a registry may be down for a moment, an image may be loaded later), but replicas that
/// pull the name at different times may run different bytes.
fn unpinned(spec: &AppSpec) -> Option<String> {
    let image = spec.source.image.as_deref()?;
    if spec.source.pinned.is_some() || crate::spec::is_pinned(image) {
        return None;
    }
    Some(format!(
        "{image} is not pinned by content: no registry answered for it and no live node holds it now; each replica pulls the name when it starts, so replicas may run different bytes (name a digest, or deploy again once it resolves)"
    ))
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
