//! The agent's HTTP endpoints: `status` (read-only, :7070) and `control` (peers and authenticated
//! writes, :7443), served by `crate::http`'s loop (connection caps, idle deadlines, graceful
//! shutdown).

pub mod apps;
pub mod certs;
pub mod control;
pub mod exports;
pub mod images;
pub mod metrics;
pub mod nodes;
pub mod status;

pub use crate::http::{full, serve, short, Body, Conn, Limits, TlsListener};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

pub fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full("")))
}

/// An error as JSON: `{"error": "..."}`, with a message that says what to do.
pub fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response<Body> {
    json(status, &serde_json::json!({ "error": msg.to_string() }))
}

/// Reads a request body of at most `limit` bytes; the error says why it could not.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, String> {
    http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string())
}

pub fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full("")))
}
