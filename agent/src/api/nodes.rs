//! Operator writes about nodes on the API port: drain and uncordon. A drain mark
//! (`cluster/drain/<id>`) keeps new replicas off the node and moves its replicas elsewhere,
//! each stopped only once its replacement is ready (`rollout::View::handoffs`); the node's
//! entry on `/v1/nodes` says `draining` with the replicas left, then `drained`.

use super::{error, json, Body};
use crate::identity::vouch::OperatorKey;
use crate::state::records::DrainMark;
use crate::state::{Counters, Handle};
use crate::store::replica::read_entry;
use crate::store::{keys, Bytes, NodeId};
use hyper::{Response, StatusCode};
use serde_json::json as j;
use std::sync::Arc;

/// The node's id, if it is a node this cluster knows.
#[allow(clippy::result_large_err)]
pub(super) fn known(id: &str, h: &Handle) -> Result<NodeId, Response<Body>> {
    let id = NodeId::new(id).map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    let key = keys::node(&id).map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    match read_entry(&h.store, key.as_str()) {
        Ok(Some((e, _))) if !e.is_tombstone() => Ok(id),
        Ok(_) => Err(error(
            StatusCode::NOT_FOUND,
            format!("no node {id} is known here"),
        )),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

fn is_drained(id: &NodeId, h: &Handle) -> bool {
    keys::drain(id.as_str())
        .ok()
        .and_then(|k| read_entry(&h.store, k.as_str()).ok().flatten())
        .is_some_and(|(e, _)| !e.is_tombstone())
}

/// `POST /v1/nodes/{id}/drain`.
pub async fn drain(id: &str, h: &Handle, op: Arc<OperatorKey>) -> Response<Body> {
    let id = match known(id, h) {
        Ok(id) => id,
        Err(r) => return r,
    };
    if is_drained(&id, h) {
        return json(
            StatusCode::OK,
            &j!({ "node": id, "drained": true, "already": true }),
        );
    }
    let Ok(key) = keys::drain(id.as_str()) else {
        return error(StatusCode::BAD_REQUEST, "bad node id");
    };
    let mark = DrainMark {
        at_ms: crate::clock::wall_ms(),
    };
    let value = Bytes::from(serde_json::to_vec(&mark).unwrap_or_default());
    match h.write_as(vec![(key, Some(value))], op).await {
        Ok(_) => {
            Counters::inc(&h.counters.writes);
            tracing::info!(node = %id, "node drained on request");
            json(StatusCode::OK, &j!({ "node": id, "drained": true }))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// `POST /v1/nodes/{id}/uncordon`: the node takes replicas again (those that moved stay
/// where they went).
pub async fn uncordon(id: &str, h: &Handle, op: Arc<OperatorKey>) -> Response<Body> {
    let id = match known(id, h) {
        Ok(id) => id,
        Err(r) => return r,
    };
    if !is_drained(&id, h) {
        return json(
            StatusCode::OK,
            &j!({ "node": id, "drained": false, "already": true }),
        );
    }
    let Ok(key) = keys::drain(id.as_str()) else {
        return error(StatusCode::BAD_REQUEST, "bad node id");
    };
    match h.write_as(vec![(key, None)], op).await {
        Ok(_) => {
            Counters::inc(&h.counters.writes);
            tracing::info!(node = %id, "node uncordoned on request");
            json(StatusCode::OK, &j!({ "node": id, "drained": false }))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}
