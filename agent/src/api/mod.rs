//! The agent's HTTP endpoints: `status` (read-only, :7070) and `control` (peers and authenticated
//! writes, :7443), over one serve loop with graceful shutdown.

pub mod control;
pub mod status;

use crate::daemon::Counters;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

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

/// Who is on the other end of a request's connection.
#[derive(Debug, Clone)]
pub struct Conn {
    pub remote: SocketAddr,
    /// The node id of a verified cluster client certificate, if one was presented.
    pub peer: Option<Arc<str>>,
}

/// TLS for a listener, and where its refusals are counted.
#[derive(Clone)]
pub struct TlsListener {
    pub acceptor: TlsAcceptor,
    pub counters: Arc<Counters>,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections until `shutdown`, serving HTTP/1.1 and HTTP/2 with `handler`: in TLS
/// (ALPN h2 or http/1.1) when `tls` is given, else in the clear (also h2c with prior knowledge).
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsListener>,
    handler: H,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) where
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(err = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let stop = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let Some(tls) = tls else {
                let conn = Conn { remote, peer: None };
                serve_conn(TokioIo::new(stream), h, conn, stop).await;
                return;
            };
            let accepted =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(stream)).await;
            let stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let reason = crate::tls::refusal_reason(&e);
                    Counters::inc(&tls.counters.tls_refused[reason]);
                    tracing::warn!(
                        %remote,
                        reason = crate::tls::REFUSAL_REASONS[reason],
                        err = %e,
                        "TLS connection refused"
                    );
                    return;
                }
                Err(_) => {
                    Counters::inc(&tls.counters.tls_refused[crate::tls::OTHER]);
                    tracing::warn!(%remote, "TLS connection refused: no handshake within 5 s");
                    return;
                }
            };
            Counters::inc(&tls.counters.tls_handshakes);
            let peer = crate::tls::peer_node_id(stream.get_ref().1.peer_certificates());
            let conn = Conn {
                remote,
                peer: peer.map(Arc::from),
            };
            serve_conn(TokioIo::new(stream), h, conn, stop).await;
        });
    }
}

async fn serve_conn<I, H, F>(io: I, h: H, conn: Conn, stop: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let h = h.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(h(req, conn).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}
