//! A minimal HTTP/1.1 client for link-local metadata services: plain HTTP, one request per
//! connection, strict time limits, bounded bodies. (The services are on the local link and
//! speak plain HTTP; TLS and redirects are out of scope on purpose.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

const MAX_BODY: usize = 16 << 20;

/// Why a metadata request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}: only http:// is supported")]
    Scheme(String),
    #[error("{host}: no address")]
    NoAddress { host: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{url}: no complete answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{0}: the answer is too large")]
    TooLarge(String),
    #[error("{0}: malformed HTTP response")]
    Malformed(String),
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> HttpError {
    let what = what.to_string();
    move |source| HttpError::Io { what, source }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `method` on `url` (`http://host[:port]/path`) with extra `headers`, all of it (connect,
/// send, every byte of the answer) within `timeout`: a server that dribbles cannot stretch it.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Response, HttpError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| HttpError::Scheme(url.into()))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let with_port = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let addr: SocketAddr = with_port
        .to_socket_addrs()
        .map_err(io(hostport))?
        .next()
        .ok_or_else(|| HttpError::NoAddress {
            host: hostport.into(),
        })?;
    let deadline = std::time::Instant::now() + timeout;
    let left = || {
        let l = deadline.saturating_duration_since(std::time::Instant::now());
        (!l.is_zero())
            .then_some(l)
            .ok_or_else(|| HttpError::Timeout {
                url: url.into(),
                timeout,
            })
    };
    let mut s = TcpStream::connect_timeout(&addr, left()?).map_err(io(addr))?;
    s.set_write_timeout(Some(left()?)).map_err(io(addr))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nUser-Agent: shoal-init\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "PUT" || method == "POST" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(io(url))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        s.set_read_timeout(Some(left()?)).map_err(io(url))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_BODY + 65536 {
                    return Err(HttpError::TooLarge(url.into()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(url)(e)),
        }
    }
    parse(&raw).ok_or_else(|| HttpError::Malformed(url.into()))
}

/// Parses a whole HTTP/1.x response (Content-Length, chunked, or until close).
pub fn parse(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    if !status_line.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let eol = body.windows(2).position(|w| w == b"\r\n")?;
            let size_text = std::str::from_utf8(&body[..eol]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                break out;
            }
            let start = eol + 2;
            let end = start.checked_add(size)?;
            if body.len() < end || out.len() + size > MAX_BODY {
                return None;
            }
            out.extend_from_slice(&body[start..end]);
            body = body.get(end + 2..)?;
        }
    } else {
        match headers.iter().find(|(k, _)| k == "content-length") {
            Some((_, v)) => {
                let n: usize = v.parse().ok()?;
                if n > MAX_BODY {
                    return None;
                }
                body.get(..n)?.to_vec()
            }
            None => body.to_vec(),
        }
    };
    Some(Response {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_length_chunked_and_close_delimited() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhelloextra").unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), r.header("x-a")),
            (200, &b"hello"[..], Some("b"))
        );
        let r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.body, b"abcde");
        let r = parse(b"HTTP/1.0 404 Not Found\r\n\r\nnope").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"nope"[..]));
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort").is_none());
        assert!(parse(b"garbage").is_none());
    }

    #[test]
    fn a_dribbling_server_cannot_stretch_the_deadline() {
        // One byte every 300 ms, forever: each read is quick, the whole is not.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = l.accept() {
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
                while c.write_all(b"x").is_ok() {
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        });
        let t = std::time::Instant::now();
        let r = request(
            "GET",
            &format!("http://127.0.0.1:{port}/"),
            &[],
            Duration::from_secs(2),
        );
        assert!(r.is_err(), "{r:?}");
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "took {:?}",
            t.elapsed()
        );
    }

    proptest! {
        #[test]
        fn never_panics(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse(&raw);
            let mut with_head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            with_head.extend_from_slice(&raw);
            let _ = parse(&with_head);
        }
    }
}
