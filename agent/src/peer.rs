//! The client side of the peer protocol: one pool of HTTP/2 connections over mutual TLS to
//! all peers, messages sent fire-and-forget with a deadline (the protocol tolerates loss and
//! reordering). A peer must present a certificate from the cluster CA; so must we.

use crate::clock::ClockWatch;
use crate::membership::Member;
use crate::state::Counters;
use crate::sync::message::{encode, Envelope};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;

pub const MSG_PATH: &str = "/peer/v1/msg";
pub const IDENTITY_PATH: &str = "/peer/v1/identity";
/// Images by id: `GET /peer/v1/images/sha256:<64 hex>`.
pub const IMAGES_PATH: &str = "/peer/v1/images/";
pub const CONTENT_TYPE: &str = "application/x-shoal-peer";
/// An image archive as it arrives from a peer.
pub type ImageStream = futures_util::stream::BoxStream<
    'static,
    Result<Bytes, Box<dyn std::error::Error + Send + Sync>>,
>;
const SEND_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct PeerClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    me: Member,
    counters: Arc<Counters>,
    inflight: TaskTracker,
    /// Where peers' `Date`s go (`clock`).
    clock: Arc<ClockWatch>,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer request failed: {0}")]
    Request(String),
    #[error("peer answered {0}")]
    Status(hyper::StatusCode),
    #[error("peer did not answer in time")]
    Timeout,
    #[error("peer sent a bad identity: {0}")]
    BadIdentity(String),
}

impl PeerClient {
    pub fn new(
        me: Member,
        counters: Arc<Counters>,
        tls: &crate::tls::Tls,
        clock: Arc<ClockWatch>,
    ) -> PeerClient {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls.client).clone())
            .https_only()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .build(https);
        PeerClient {
            client,
            me,
            counters,
            inflight: TaskTracker::new(),
            clock,
        }
    }

    /// Sends one message in the background.
    pub fn send(&self, addr: &str, env: &Envelope) {
        let body = Bytes::from(encode(env));
        let req = Request::post(format!("https://{addr}{MSG_PATH}"))
            .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(Full::new(body));
        let Ok(req) = req else {
            tracing::warn!(%addr, "cannot address peer");
            return;
        };
        let client = self.client.clone();
        let counters = self.counters.clone();
        let clock = self.clock.clone();
        let kind = env.msg.kind();
        let to = addr.to_string();
        self.inflight.spawn(async move {
            let sent = crate::clock::wall_ms();
            let r = tokio::time::timeout(SEND_TIMEOUT, client.request(req)).await;
            if let Ok(Ok(resp)) = &r {
                if let Some(date) = resp
                    .headers()
                    .get(hyper::header::DATE)
                    .and_then(|d| d.to_str().ok())
                {
                    clock.record(&to, date, sent, crate::clock::wall_ms());
                }
            }
            let ok = match r {
                Ok(Ok(resp)) if resp.status().is_success() => true,
                Ok(Ok(resp)) => {
                    tracing::debug!(peer = %to, kind, status = %resp.status(), "peer refused message");
                    false
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %to, kind, err = %crate::error_chain(&e), "peer send failed");
                    false
                }
                Err(_) => false,
            };
            if !ok {
                Counters::inc(&counters.peer_sends_failed);
            }
        });
    }

    /// A GET whose answer (headers) comes within `SEND_TIMEOUT` and says success.
    async fn get(&self, url: &str) -> Result<hyper::Response<hyper::body::Incoming>, PeerError> {
        let req = Request::get(url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| PeerError::Request(e.to_string()))?;
        let resp = tokio::time::timeout(SEND_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| PeerError::Timeout)?
            .map_err(|e| PeerError::Request(crate::error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(PeerError::Status(resp.status()));
        }
        Ok(resp)
    }

    /// Asks whoever listens at `addr` who it is.
    pub async fn identity(&self, addr: &str) -> Result<Member, PeerError> {
        let resp = self.get(&format!("https://{addr}{IDENTITY_PATH}")).await?;
        let body = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| PeerError::BadIdentity(e.to_string()))?
            .to_bytes();
        let m: Member =
            serde_json::from_slice(&body).map_err(|e| PeerError::BadIdentity(e.to_string()))?;
        if m.id == self.me.id {
            return Err(PeerError::BadIdentity("that is this node".into()));
        }
        Ok(m)
    }

    /// Image `id` from the peer at `addr`, as a stream of its `docker save` archive (the
    /// caller checks what it got: content addressed).
    pub async fn image(&self, addr: &str, id: &str) -> Result<ImageStream, PeerError> {
        use futures_util::StreamExt;
        let resp = self
            .get(&format!("https://{addr}{IMAGES_PATH}{id}"))
            .await?;
        Ok(http_body_util::BodyStream::new(resp.into_body())
            .filter_map(|f| async move {
                match f {
                    Ok(frame) => frame.into_data().ok().map(Ok),
                    Err(e) => Some(Err(Box::<dyn std::error::Error + Send + Sync>::from(e))),
                }
            })
            .boxed())
    }

    /// Waits up to `limit` for messages still being sent.
    pub async fn drain(&self, limit: Duration) {
        self.inflight.close();
        let _ = tokio::time::timeout(limit, self.inflight.wait()).await;
    }
}
