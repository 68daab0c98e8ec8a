//! The CLI's side of the API: where to connect and with what (flags, environment, a bundle
//! directory), and one HTTPS request at a time, verified against the cluster CA.

use crate::identity::cert::MEMBER_NAME;
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::path::PathBuf;
use std::time::Duration;

/// The most of an answer the CLI reads.
const MAX_ANSWER: usize = 16 << 20;

/// How to reach a cluster: flags first, then `SHOAL_*` variables, then the bundle directory
/// for what is still missing (its CA certificate and admin token).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Connect {
    /// A node's API address, host:port (default 127.0.0.1:7443).
    #[arg(long, env = "SHOAL_ADDR", global = true)]
    pub addr: Option<String>,
    /// The bearer token (an admin token).
    #[arg(long, env = "SHOAL_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// A bundle directory from `shoal gen cluster`: its ca.crt and admin.token are used.
    #[arg(long, env = "SHOAL_BUNDLE", global = true)]
    pub bundle: Option<PathBuf>,
    /// The cluster CA certificate (PEM), when not taken from a bundle.
    #[arg(long, env = "SHOAL_CA", global = true)]
    pub ca: Option<PathBuf>,
}

/// A resolved connection.
pub struct Client {
    addr: String,
    token: String,
    ca_pem: String,
}

/// An answer: status and body.
pub struct Answer {
    pub status: hyper::StatusCode,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (null when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The server's message for a refusal.
    pub fn message(&self) -> String {
        let v = self.json();
        let msg = v
            .get("error")
            .map(|e| match e {
                serde_json::Value::String(s) => s.clone(),
                other => other
                    .get("message")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| other.to_string()),
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string());
        format!("{}: {msg}", self.status)
    }
}

impl Connect {
    pub fn client(&self) -> anyhow::Result<Client> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let addr = self.addr.clone().unwrap_or_else(|| "127.0.0.1:7443".into());
        let addr = addr
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let token = match (&self.token, &self.bundle) {
            (Some(t), _) => t.trim().to_string(),
            (None, Some(dir)) => read(&dir.join("admin.token"))?.trim().to_string(),
            (None, None) => bail!(
                "no token: pass --bundle DIR (from `shoal gen cluster`), or --token / SHOAL_TOKEN"
            ),
        };
        let ca_pem = match (&self.ca, &self.bundle) {
            (Some(p), _) => read(p)?,
            (None, Some(dir)) => read(&dir.join("ca.crt"))?,
            (None, None) => {
                bail!("no cluster CA: pass --bundle DIR, or --ca FILE / SHOAL_CA")
            }
        };
        Ok(Client {
            addr,
            token,
            ca_pem,
        })
    }
}

impl Client {
    /// One request; an answer whatever its status, an error only when there is none.
    pub fn request(&self, method: &str, path: &str, body: Vec<u8>) -> anyhow::Result<Answer> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        rt.block_on(self.send(method, path, body))
    }

    async fn send(&self, method: &str, path: &str, body: Vec<u8>) -> anyhow::Result<Answer> {
        let config = crate::tls::operator_client(&self.ca_pem)?;
        let within =
            |what: &'static str, secs| move |_| anyhow!("{what}: no answer within {secs} s");
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&self.addr),
        )
        .await
        .map_err(within("connecting", 10))?
        .with_context(|| format!("connecting to {}", self.addr))?;
        let name = ServerName::try_from(MEMBER_NAME)?.to_owned();
        let tls = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(within("TLS handshake", 10))?
        .with_context(|| {
            format!(
                "TLS handshake with {} (is it a node of the cluster whose CA was given?)",
                self.addr
            )
        })?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(
                hyper::header::USER_AGENT,
                concat!("shoal/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body)))?;
        let answer = async {
            let resp = send.send_request(req).await?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| anyhow!("reading the answer: {e}"))?
                .to_bytes();
            anyhow::Ok(Answer { status, body })
        };
        tokio::time::timeout(Duration::from_secs(120), answer)
            .await
            .map_err(within("the request", 120))?
    }
}
