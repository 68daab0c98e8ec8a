//! The serve loop every listener of the agent shares (status, API, ingress): HTTP/1.1 and
//! HTTP/2 (h2 over TLS by ALPN, h2c with prior knowledge in the clear), upgrades allowed,
//! graceful shutdown.
//!
//! Every client may be hostile, so a listener holds at most `Limits::max_conns` connections
//! (beyond: a plain 503, or a closed TLS connection), closes a connection that has moved no
//! byte for `Limits::idle` while no request is being handled (idle keep-alive, a client that
//! never sends its first byte or never finishes its TLS handshake or headers), and counts both.

use crate::state::{ConnCounters, Counters};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// At most the first 120 bytes of a client's text, for log fields: every line of a request's
/// span repeats them.
pub fn short(s: &str) -> &str {
    let mut end = s.len().min(120);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Who is on the other end of a request's connection.
#[derive(Debug, Clone)]
pub struct Conn {
    pub remote: SocketAddr,
    /// The address the client connected to (on a wildcard listener, which of the node's).
    pub local: Option<SocketAddr>,
    /// The node id of a verified cluster client certificate, if one was presented.
    pub peer: Option<Arc<str>>,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// TLS for a listener, and where its refusals are counted.
#[derive(Clone)]
pub struct TlsListener {
    pub acceptor: TlsAcceptor,
    pub counters: Arc<Counters>,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one listener holds at most.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_conns: usize,
    /// A connection that moves no byte this long, with no request being handled, is closed.
    pub idle: Duration,
    /// Sources (load balancers) whose connections start with a PROXY protocol header (v1 or
    /// v2) naming the client: the client's address is taken from it. Such a connection
    /// without a valid header is closed. Empty: no one's is read.
    pub proxy_from: &'static [ipnet::IpNet],
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conns: 1024,
            idle: Duration::from_secs(30),
            proxy_from: &[],
        }
    }
}

/// The PROXY protocol header at the start of a connection from a load balancer: the client's
/// address, or `None` for a connection the balancer made itself (`LOCAL`, `UNKNOWN`: its own
/// address stands). Reads the header and not a byte more.
pub async fn read_proxy_header<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> Result<Option<SocketAddr>, String> {
    use tokio::io::AsyncReadExt;
    const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    // The longest v1 header (RFC-less, HAProxy's spec: 107 bytes); v2's addresses and TLVs
    // are bounded here, far above what balancers send.
    const V1_MAX: usize = 107;
    const V2_MAX: usize = 16 + 1024;
    let mut buf = vec![0u8; 12];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    if buf.as_slice() == V2_SIGNATURE {
        buf.resize(16, 0);
        s.read_exact(&mut buf[12..])
            .await
            .map_err(|e| e.to_string())?;
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if 16 + len > V2_MAX {
            return Err(format!("a PROXY v2 header of {} bytes", 16 + len));
        }
        buf.resize(16 + len, 0);
        s.read_exact(&mut buf[16..])
            .await
            .map_err(|e| e.to_string())?;
        let h = ppp::v2::Header::try_from(buf.as_slice()).map_err(|e| e.to_string())?;
        return Ok(match (h.command, h.addresses) {
            (ppp::v2::Command::Local, _) => None,
            (_, ppp::v2::Addresses::IPv4(a)) => Some((a.source_address, a.source_port).into()),
            (_, ppp::v2::Addresses::IPv6(a)) => Some((a.source_address, a.source_port).into()),
            _ => None,
        });
    }
    if !buf.starts_with(b"PROXY ") {
        return Err("no PROXY protocol header".into());
    }
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX {
            return Err("a PROXY v1 header over 107 bytes".into());
        }
        buf.push(s.read_u8().await.map_err(|e| e.to_string())?);
    }
    let h = ppp::v1::Header::try_from(buf.as_slice()).map_err(|e| e.to_string())?;
    Ok(match h.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
        ppp::v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
        ppp::v1::Addresses::Unknown => None,
    })
}

/// When a connection last moved a byte, and how many of its requests are being handled.
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: crate::clock::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    pub(crate) fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Relaxed))
    }
}

/// A stream that records its activity.
pub(crate) struct Tracked<S> {
    pub(crate) inner: S,
    pub(crate) act: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.act.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.act.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connections lingering at once; beyond, a connection is closed at once.
const MAX_LINGERING: usize = 1024;
/// How long, and how much, a closed connection is read for at most.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;
static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// A client connection that, once the server is done with it, says so (FIN) and reads what
/// the client still sends for a moment before closing, as nginx's lingering close does:
/// closing with bytes unread resets the connection, and a client still sending (a body the
/// answer refused, a request after the last one) could lose the answer it was sent.
pub(crate) struct Lingering(Option<tokio::net::TcpStream>);

impl Lingering {
    fn get(&mut self) -> std::io::Result<&mut tokio::net::TcpStream> {
        self.0
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get() {
            Ok(s) => Pin::new(s).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get() {
            Ok(s) => Pin::new(s).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get() {
            Ok(s) => Pin::new(s).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get() {
            Ok(s) => Pin::new(s).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut s) = self.0.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if LINGERING.fetch_add(1, Relaxed) >= MAX_LINGERING {
            LINGERING.fetch_sub(1, Relaxed);
            return;
        }
        rt.spawn(async move {
            use tokio::io::AsyncReadExt;
            let _ = s.shutdown().await;
            let mut buf = vec![0u8; 16 << 10];
            let mut seen = 0;
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(n) = s.read(&mut buf).await {
                    seen += n;
                    if n == 0 || seen > LINGER_BYTES {
                        break;
                    }
                }
            })
            .await;
            LINGERING.fetch_sub(1, Relaxed);
        });
    }
}

/// Resolves once the connection has moved no byte for `idle` with nothing in flight.
pub(crate) async fn idled(act: &Activity, idle: Duration) {
    loop {
        let due = act.last() + idle;
        if crate::clock::now() >= due && act.in_flight.load(Relaxed) == 0 {
            return;
        }
        // While a request is in hand past the deadline, look again once a second.
        tokio::time::sleep_until(due.max(crate::clock::now() + Duration::from_secs(1))).await;
    }
}

/// The answer to a plain connection over the listener's cap.
fn overloaded() -> Vec<u8> {
    let body = "{\"error\": \"too many connections to this listener; try again later\"}\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Accepts connections until `shutdown`, serving HTTP/1.1 and HTTP/2 with `handler`: in TLS
/// (ALPN h2 or http/1.1) when `tls` is given, else in the clear (also h2c with prior knowledge).
#[allow(clippy::too_many_arguments)]
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsListener>,
    limits: Limits,
    counters: Arc<ConnCounters>,
    handler: H,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) where
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_conns));
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
        let local = stream.local_addr().ok();
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            counters.shed.fetch_add(1, Relaxed);
            if tls.is_none() {
                // A plain client is told; a TLS one would first cost us a handshake.
                tracker.spawn(async move {
                    let mut stream = stream;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        stream.write_all(&overloaded()),
                    )
                    .await;
                });
            }
            continue;
        };
        let h = handler.clone();
        let stop = shutdown.clone();
        let tls = tls.clone();
        let counters = counters.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let (mut stream, mut remote) = (stream, remote);
            if limits.proxy_from.iter().any(|n| n.contains(&remote.ip())) {
                let read =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, read_proxy_header(&mut stream)).await;
                match read {
                    Ok(Ok(Some(client))) => remote = client,
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, err = %e, "a balancer's connection without a valid PROXY header: closed");
                        return;
                    }
                    Err(_) => return,
                }
            }
            counters.open.fetch_add(1, Relaxed);
            let act = Activity::new();
            act.touch();
            let stream = Tracked {
                inner: Lingering(Some(stream)),
                act: act.clone(),
            };
            let ctx = ConnCtx {
                stop,
                act,
                idle: limits.idle,
                counters: counters.clone(),
            };
            let Some(tls) = tls else {
                let conn = Conn {
                    remote,
                    local,
                    peer: None,
                    tls: false,
                };
                serve_conn(TokioIo::new(stream), h, conn, ctx).await;
                counters.open.fetch_sub(1, Relaxed);
                return;
            };
            let accepted =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(stream)).await;
            counters.open.fetch_sub(1, Relaxed);
            let stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let reason = crate::tls::Refusal::of(&e);
                    tls.counters.refused(reason);
                    tracing::warn!(
                        %remote,
                        reason = reason.label(),
                        err = %e,
                        "TLS connection refused"
                    );
                    return;
                }
                Err(_) => {
                    tls.counters.refused(crate::tls::Refusal::Other);
                    tracing::warn!(%remote, "TLS connection refused: no handshake within 5 s");
                    return;
                }
            };
            Counters::inc(&tls.counters.tls_handshakes);
            let peer = crate::tls::peer_node_id(stream.get_ref().1.peer_certificates());
            let conn = Conn {
                remote,
                local,
                peer: peer.map(Arc::from),
                tls: true,
            };
            counters.open.fetch_add(1, Relaxed);
            serve_conn(TokioIo::new(stream), h, conn, ctx).await;
            counters.open.fetch_sub(1, Relaxed);
        });
    }
}

/// What one connection's serving needs besides its stream and handler.
struct ConnCtx {
    stop: CancellationToken,
    act: Arc<Activity>,
    idle: Duration,
    counters: Arc<ConnCounters>,
}

async fn serve_conn<I, H, F>(io: I, h: H, conn: Conn, ctx: ConnCtx)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let ConnCtx {
        stop,
        act,
        idle,
        counters,
    } = ctx;
    let in_service = act.clone();
    let svc = hyper::service::service_fn(move |req| {
        let h = h.clone();
        let conn = conn.clone();
        let act = in_service.clone();
        async move {
            // A handler that takes its time (a long image load) keeps its connection.
            act.in_flight.fetch_add(1, Relaxed);
            let resp = h(req, conn).await;
            act.in_flight.fetch_sub(1, Relaxed);
            act.touch();
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder.http2().timer(TokioTimer::new());
    // Upgrades (WebSocket through the ingress) are handed to the handler.
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = idled(&act, idle) => {
            counters.idle_closed.fetch_add(1, Relaxed);
        }
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend((addresses.len() as u16).to_be_bytes());
        h.extend(addresses);
        h
    }

    /// The header read from `bytes`, and what was left unread.
    async fn read(bytes: Vec<u8>) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let mut r = std::io::Cursor::new(bytes);
        let got = read_proxy_header(&mut r).await;
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        (got, rest)
    }

    #[tokio::test]
    async fn a_proxy_header_names_the_client_and_nothing_after_it_is_read() {
        // v2, TCP over IPv4: 203.0.113.7:5555 → 10.0.0.1:80.
        let mut addrs = vec![203, 0, 113, 7, 10, 0, 0, 1];
        addrs.extend(5555u16.to_be_bytes());
        addrs.extend(80u16.to_be_bytes());
        let mut bytes = v2(1, 0x11, &addrs);
        bytes.extend(b"GET / HTTP/1.1\r\n");
        let (got, rest) = read(bytes).await;
        assert_eq!(got, Ok(Some("203.0.113.7:5555".parse().unwrap())));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        // v2 LOCAL (the balancer's own health check): no client.
        let (got, rest) = read(v2(0, 0x00, &[])).await;
        assert_eq!((got, rest), (Ok(None), vec![]));
        // v1, IPv6 and IPv4.
        let (got, rest) =
            read(b"PROXY TCP6 2001:db8::9 2001:db8::1 4444 443\r\n\x16\x03".to_vec()).await;
        assert_eq!(got, Ok(Some("[2001:db8::9]:4444".parse().unwrap())));
        assert_eq!(rest, b"\x16\x03");
        let (got, _) = read(b"PROXY TCP4 198.51.100.9 10.0.0.1 4444 80\r\n".to_vec()).await;
        assert_eq!(got, Ok(Some("198.51.100.9:4444".parse().unwrap())));
        let (got, _) = read(b"PROXY UNKNOWN\r\n".to_vec()).await;
        assert_eq!(got, Ok(None));
    }

    #[tokio::test]
    async fn anything_else_from_a_balancer_is_refused() {
        for bad in [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n".to_vec(),
            [b"PROXY TCP4 ".to_vec(), vec![b'1'; 200]].concat(),
            v2(1, 0x11, &[0; 2000]),
            v2(1, 0x11, &[1, 2, 3]),
            b"PROXY".to_vec(),
        ] {
            let (got, _) = read(bad.clone()).await;
            assert!(got.is_err(), "{:?}: {got:?}", String::from_utf8_lossy(&bad));
        }
    }
}
