//! The joiner's side of TLS bootstrap (see `identity::join`): ask candidates, one after the
//! other, to sign a certificate, until one that holds the cluster's join secret does.
//! Until then the node is not a member of anything: no store traffic, no membership.

use super::DaemonError;
use crate::error_chain;
use crate::identity::cert::{self, NodeIdentity, MEMBER_NAME};
use crate::identity::join::{JoinReply, JoinRequest, JOIN_PATH};
use crate::identity::ClusterInfo;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::net::IpAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const STEP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Unreachable(String),
    #[error("join refused: {0}")]
    Refused(String),
    #[error("the answer is not from this cluster: {0}")]
    Forged(String),
}

async fn with_timeout<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, JoinError>>,
) -> Result<T, JoinError> {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .map_err(|_| JoinError::Unreachable(format!("{what}: no answer within 5 s")))?
}

/// One join attempt at `addr`.
#[tracing::instrument(name = "join", skip_all, fields(peer = addr, node = node_id))]
pub async fn join_once(
    addr: &str,
    secret: &str,
    node_id: &str,
    addrs: &[IpAddr],
    key: Option<&str>,
) -> Result<NodeIdentity, JoinError> {
    let (key_pem, csr) =
        cert::request_with_key(node_id, key).map_err(|e| JoinError::Unreachable(e.to_string()))?;
    let req = JoinRequest::new(secret, node_id, addrs, &csr);
    let (config, capture) =
        crate::tls::bootstrap_client().map_err(|e| JoinError::Unreachable(e.to_string()))?;
    let tcp = with_timeout("connect", async {
        tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| JoinError::Unreachable(format!("connect: {e}")))
    })
    .await?;
    let name = ServerName::try_from(MEMBER_NAME)
        .map_err(|e| JoinError::Unreachable(e.to_string()))?
        .to_owned();
    let tls = with_timeout("TLS handshake", async {
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| JoinError::Unreachable(format!("TLS handshake: {e}")))
    })
    .await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| JoinError::Unreachable(error_chain(&e)))?;
    tokio::spawn(conn);
    let body = serde_json::to_vec(&req).unwrap_or_default();
    let http_req = hyper::Request::post(JOIN_PATH)
        .header(hyper::header::HOST, addr)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| JoinError::Unreachable(e.to_string()))?;
    let resp = with_timeout("join request", async {
        send.send_request(http_req)
            .await
            .map_err(|e| JoinError::Unreachable(error_chain(&e)))
    })
    .await?;
    let status = resp.status();
    let body = with_timeout("join answer", async {
        Limited::new(resp.into_body(), 256 * 1024)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| JoinError::Unreachable(e.to_string()))
    })
    .await?;
    if !status.is_success() {
        let msg = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| status.to_string());
        return Err(if status == hyper::StatusCode::FORBIDDEN {
            JoinError::Refused(msg)
        } else {
            JoinError::Unreachable(format!("{status}: {msg}"))
        });
    }
    let reply: JoinReply = serde_json::from_slice(&body)
        .map_err(|e| JoinError::Forged(format!("unreadable answer: {e}")))?;
    if !reply.verify(secret, &req) {
        return Err(JoinError::Forged(
            "the answer is not signed with the join secret".into(),
        ));
    }
    // The member we talked to must itself hold a certificate from the CA it hands us.
    let seen = capture
        .seen()
        .ok_or_else(|| JoinError::Forged("no server certificate".into()))?;
    crate::tls::verify_member(&reply.ca, &seen)
        .map_err(|e| JoinError::Forged(format!("its certificate is not from that CA: {e}")))?;
    let info = cert::cert_info(&reply.cert).map_err(JoinError::Forged)?;
    if info.common_name != node_id {
        return Err(JoinError::Forged(format!(
            "the certificate names {:?}",
            info.common_name
        )));
    }
    Ok(NodeIdentity {
        cluster: reply.cluster,
        ca_pem: reply.ca,
        cert_pem: reply.cert,
        key_pem,
        data_key: Some(reply.data_key).filter(|k| !k.is_empty()),
    })
}

/// Asks candidates until one signs, backing off between rounds. `candidates` is called each
/// round (mDNS and DNS answers change). Every refusal is logged plainly.
pub async fn obtain(
    secret: &str,
    cluster: Option<&ClusterInfo>,
    node_id: &str,
    addrs: &[IpAddr],
    key: Option<&str>,
    mut candidates: impl FnMut() -> Vec<String>,
    shutdown: &CancellationToken,
) -> Result<NodeIdentity, DaemonError> {
    let mut wait = Duration::from_millis(500);
    loop {
        let list = candidates();
        if list.is_empty() {
            tracing::info!("join: no member to ask yet (no peers configured, none seen over mDNS)");
        }
        for addr in list {
            match join_once(&addr, secret, node_id, addrs, key).await {
                Ok(id) => {
                    if let Some(c) = cluster {
                        if c.id != id.cluster.id {
                            tracing::error!(peer = %addr, "join: that member belongs to cluster {:?}, not {:?}; not joining", id.cluster.name, c.name);
                            continue;
                        }
                    }
                    tracing::info!(peer = %addr, cluster = %id.cluster.name, "joined: certificate signed by a member");
                    return Ok(id);
                }
                Err(e @ JoinError::Refused(_)) => {
                    tracing::error!(peer = %addr, err = %e, "join refused: check that join.secret is this cluster's");
                }
                Err(e) => tracing::warn!(peer = %addr, err = %e, "join attempt failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(DaemonError::Stopped),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(15));
    }
}
