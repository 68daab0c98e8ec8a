//! A small HTTP(S) client for the tests: plain HTTP by hand, HTTPS through curl (OpenSSL, an
//! independent TLS peer), and Prometheus text.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A response: status code, headers (lower-cased names) and body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection to 127.0.0.1:`port`.
pub fn http(
    method: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp> {
    http_at("127.0.0.1", method, port, path, headers, body)
}

/// One HTTP/1.1 request on a fresh connection to `ip:port`.
pub fn http_at(
    ip: &str,
    method: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp> {
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("bad status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body)?;
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol])?.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        let start = eol + 2;
        if b.len() < start + size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&b[start..start + size]);
        b = &b[start + size + 2..];
    }
}

/// Client credentials for `https`: a certificate and its key (PEM files).
#[derive(Debug, Clone, Copy)]
pub struct ClientCert<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// One HTTPS request through curl (an independent TLS stack: OpenSSL), verifying the server
/// against `ca`, presenting `client` if given. `Err` when curl cannot complete the exchange
/// (a refused handshake, for one), with curl's message.
pub fn https(
    method: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    ca: &Path,
    client: Option<ClientCert<'_>>,
) -> Result<Resp> {
    curl(
        None,
        method,
        &format!("https://127.0.0.1:{port}{path}"),
        headers,
        body,
        Some(ca),
        client,
    )
}

/// One request through curl, inside network namespace `netns` if given.
pub fn curl(
    netns: Option<&str>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    ca: Option<&Path>,
    client: Option<ClientCert<'_>>,
) -> Result<Resp> {
    let tmp = tempfile::tempdir()?;
    let (req_body, resp_body, resp_head) = (
        tmp.path().join("req"),
        tmp.path().join("resp"),
        tmp.path().join("head"),
    );
    std::fs::write(&req_body, body)?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    cmd.args(["-sS", "--max-time", "20", "-X", method])
        .arg("-o")
        .arg(&resp_body)
        .arg("-D")
        .arg(&resp_head)
        .args(["-w", "%{http_code}"]);
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    if !body.is_empty() || method == "PUT" || method == "POST" {
        cmd.arg("--data-binary")
            .arg(format!("@{}", req_body.display()));
    }
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    if let Some(c) = client {
        cmd.arg("--cert").arg(c.cert).arg("--key").arg(c.key);
    }
    cmd.arg(url);
    let out = cmd.output().context("running curl")?;
    if !out.status.success() {
        bail!(
            "curl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let status: u16 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    let head = std::fs::read_to_string(&resp_head).unwrap_or_default();
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Resp {
        status,
        headers,
        body: std::fs::read(&resp_body).unwrap_or_default(),
    })
}

/// The value of a Prometheus sample (`name` with its labels, as written) in `/metrics` text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

pub fn get(port: u16, path: &str) -> Result<Resp> {
    http("GET", port, path, &[], b"")
}

/// A GET to `ip:port` (a namespace's address) on a fresh connection.
pub fn get_at(ip: &str, port: u16, path: &str) -> Result<Resp> {
    http_at(ip, "GET", port, path, &[], b"")
}
