//! Images on the API port: an archive an operator loads (`POST /v1/images`), and an image a
//! peer fetches from this node (`GET /peer/v1/images/<id>`, mutual TLS: a member's certificate),
//! streamed from the runtime as `docker save` writes it.

use super::control::{drain_then, Api};
use super::{error, json, Body};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json as j;

pub use crate::peer::IMAGES_PATH as PEER_PATH;

/// Bytes sent on in one piece (Docker's stream comes in pieces of a few KiB).
const COALESCE: usize = 256 * 1024;

/// Image transfers to peers at once: each reads a whole image from disk.
pub const MAX_EXPORTS: usize = 4;

/// `GET /peer/v1/images/<id>`: image `id` as a `docker save` archive, for a member that
/// lacks it. Ids only (content addressed: the receiver checks what it got); 404 when this
/// node does not hold it, 503 while every transfer place is taken.
pub async fn serve(id: &str, peer: &str, api: &Api) -> Response<Body> {
    use futures_util::StreamExt;
    let Some(images) = api.images.clone() else {
        return error(StatusCode::NOT_FOUND, "this node runs no containers");
    };
    if crate::store::NodeId::new(peer).is_ok_and(|n| api.h.is_revoked(&n)) {
        return error(StatusCode::FORBIDDEN, "evicted nodes fetch nothing");
    }
    if !crate::spec::is_image_id(id) {
        return error(
            StatusCode::BAD_REQUEST,
            "ask for an image by id: sha256:<64 hex>",
        );
    }
    match images.image_id(id).await {
        Ok(Some(found)) if found == id => {}
        Ok(_) => return error(StatusCode::NOT_FOUND, format!("no image {id} here")),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, crate::error_chain(&e)),
    }
    // A peer that asks while another's transfer of it starts shares its `docker save`.
    let (archive, joined) = match api.shared.join(id) {
        Some(a) => (a, true),
        None => {
            let Ok(place) = api.exports.clone().try_acquire_owned() else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "every image transfer place is taken: try another node or later",
                );
            };
            let archive = match images.save(id).await {
                Ok(a) => a,
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, crate::error_chain(&e)),
            };
            // Docker's stream comes in pieces of a few KiB; the place is held until the
            // last byte is read or every peer reading it went away.
            let archive = crate::executor::images::coalesce(archive, COALESCE);
            (api.shared.start(id, archive, place), false)
        }
    };
    tracing::info!(image = %id, %peer, joined, "sending an image to a peer");
    // Read on a task of its own (the stream is not `Sync`, as a body must be).
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, String>>(8);
    let mut archive = archive;
    tokio::spawn(async move {
        while let Some(chunk) = archive.next().await {
            let failed = chunk.is_err();
            if tx.send(chunk.map_err(|e| e.to_string())).await.is_err() || failed {
                return;
            }
        }
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((
            chunk
                .map(hyper::body::Frame::data)
                .map_err(std::io::Error::other),
            rx,
        ))
    });
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(frames));
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/x-tar")
        .body(body)
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "cannot answer"))
}

/// Loads a `docker save` archive into this node's runtime, streamed as it arrives: no
/// registry is needed to run an image. Answers the names loaded. An archive over the cap is
/// cut off (413); one that would move a name this cluster's running replicas use to another
/// image is refused (409): the name is put back where it was, the running replicas keep theirs.
pub async fn load(req: Request<Incoming>, api: &Api) -> Response<Body> {
    use crate::executor::images::{load_checked, LoadError};
    use futures_util::StreamExt;
    let Some(images) = api.images.clone() else {
        return drain_then(
            req,
            error(
                StatusCode::CONFLICT,
                "this node runs no containers (docker.enabled = false)",
            ),
        )
        .await;
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > images.max_image_bytes()) {
        return drain_then(req, too_large(images.max_image_bytes())).await;
    }
    let archive = http_body_util::BodyStream::new(req.into_body())
        .filter_map(|f| async move {
            match f {
                Ok(frame) => frame.into_data().ok().map(Ok),
                Err(e) => Some(Err(crate::executor::images::BoxError::from(e))),
            }
        })
        .boxed();
    let cluster = &api.h.trust.cluster.id;
    match load_checked(&*images, cluster, declared, archive).await {
        Ok((loaded, bytes)) => {
            tracing::info!(images = ?loaded, bytes, "images loaded");
            // Peers and deploys see it at once, not at the executor's next look.
            crate::executor::distribute::publish_now(&api.h, &*images).await;
            json(StatusCode::OK, &j!({ "loaded": loaded }))
        }
        Err(LoadError::TooLarge(cap)) => too_large(cap),
        Err(LoadError::Bad(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(LoadError::Unavailable(e)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, crate::error_chain(&e))
        }
        Err(LoadError::InUse(clashes)) => {
            let clashes: Vec<_> = clashes
                .into_iter()
                .map(|(image, app)| j!({ "image": image, "app": app }))
                .collect();
            tracing::warn!(clashes = %j!(clashes), "image load refused: it would retag images running replicas use");
            json(
                StatusCode::CONFLICT,
                &j!({
                    "error": "the archive names images that running replicas use, as other images: load it under a new tag and point the app at it",
                    "in_use": clashes,
                }),
            )
        }
    }
}

fn too_large(cap: u64) -> Response<Body> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the archive is over this node's image size cap ({cap} bytes, docker.max_image_bytes)"
        ),
    )
}
