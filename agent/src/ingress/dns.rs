//! The resolver apps' containers ask (Docker's embedded DNS passes it every name that is not
//! a container's): `<app>.internal` is answered with the address the question came to — the
//! gateway of the container's network, where this node's ingress listens — so
//! `http://<app>.internal/` reaches the app through the ingress like external traffic,
//! wherever its replicas run. Every other name goes on to the node's own resolvers
//! (`/etc/resolv.conf`), the answer passed back as it came.
//!
//! One UDP socket and one TCP listener per gateway (`listen`), made when the executor first
//! starts a container on that network; over TCP (RFC 7766: what a client asks again on when
//! an answer came truncated) each message is length-prefixed and a connection may carry
//! several, one after another, and the node's resolvers are asked over TCP too. Bounded: at
//! most `MAX_FORWARDS` questions forwarded at once, each given `FORWARD_WITHIN` per
//! resolver; at most `MAX_TCP_CONNS` TCP connections per gateway, each closed after
//! `TCP_IDLE` without a whole question.

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// The names apps reach each other by: `<app>.internal`.
pub const SUFFIX: &str = "internal";
/// How long an answer for an app's name may be cached.
const TTL: u32 = 5;
const MAX_FORWARDS: usize = 256;
const FORWARD_WITHIN: Duration = Duration::from_secs(2);
/// The largest message taken or passed on (EDNS allows more over UDP than 512 bytes).
const MAX_MESSAGE: usize = 4096;
/// TCP connections open at once on one gateway; more are closed at once.
const MAX_TCP_CONNS: usize = 64;
/// A TCP connection with no whole question for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What one question gets.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// Answered here (the encoded message).
    Here(Vec<u8>),
    /// Not an app's name: ask the node's resolvers.
    Forward,
    /// Not a question at all: nothing is sent back.
    Drop,
}

/// The answer to `query` asked on `local`.
pub fn reply(query: &[u8], local: Ipv4Addr) -> Reply {
    let Ok(q) = Message::from_vec(query) else {
        return Reply::Drop;
    };
    if q.metadata.message_type != MessageType::Query {
        return Reply::Drop;
    }
    let mut r = Message::response(q.metadata.id, q.metadata.op_code);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    let [question] = q.queries.as_slice() else {
        r.metadata.response_code = ResponseCode::FormErr;
        return encoded(&r);
    };
    let name = question.name().to_lowercase();
    let labels: Vec<String> = name
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    if labels.last().map(String::as_str) != Some(SUFFIX) {
        return Reply::Forward;
    }
    r.add_query(question.clone());
    r.metadata.authoritative = true;
    if q.metadata.op_code != OpCode::Query {
        r.metadata.response_code = ResponseCode::NotImp;
        return encoded(&r);
    }
    // `<app>.internal`: one label before the suffix, a name an app may have.
    let app_name = labels.len() == 2 && crate::spec::valid_name(&labels[0]);
    if !app_name {
        r.metadata.response_code = ResponseCode::NXDomain;
        return encoded(&r);
    }
    if question.query_type() == RecordType::A {
        r.add_answer(Record::from_rdata(
            question.name().clone(),
            TTL,
            RData::A(A(local)),
        ));
    }
    // Other types (AAAA among them): the name is there, with no such record.
    encoded(&r)
}

fn encoded(m: &Message) -> Reply {
    m.to_vec().map_or(Reply::Drop, Reply::Here)
}

/// The node's own resolvers, from resolv.conf's text.
pub fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next()?.parse::<IpAddr>().ok())
                .flatten()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .take(3)
        .collect()
}

/// This node's resolver for containers: a socket per gateway it serves.
pub struct Resolver {
    upstream: Vec<SocketAddr>,
    sockets: Mutex<HashMap<Ipv4Addr, tokio::task::AbortHandle>>,
    forwards: Arc<Semaphore>,
    /// `TCP_IDLE`, shorter in tests.
    tcp_idle: Duration,
}

impl Resolver {
    pub fn new(upstream: Vec<SocketAddr>) -> Arc<Resolver> {
        Resolver::with_tcp_idle(upstream, TCP_IDLE)
    }

    fn with_tcp_idle(upstream: Vec<SocketAddr>, tcp_idle: Duration) -> Arc<Resolver> {
        Arc::new(Resolver {
            upstream,
            sockets: Mutex::new(HashMap::new()),
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
            tcp_idle,
        })
    }

    /// With the node's resolvers from `/etc/resolv.conf`.
    pub fn from_system() -> Arc<Resolver> {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        Resolver::new(upstreams(&text))
    }

    /// Answers on `ip:port` from now on (once per address); whether it does.
    pub fn listen_on(self: &Arc<Self>, ip: Ipv4Addr, port: u16) -> bool {
        let Ok(mut sockets) = self.sockets.lock() else {
            return false;
        };
        if sockets.get(&ip).is_some_and(|h| !h.is_finished()) {
            return true;
        }
        let bound = std::net::UdpSocket::bind((ip, port))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(UdpSocket::from_std);
        let socket = match bound {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::warn!(%ip, port, err = %e, "cannot answer containers' DNS questions here: <app>.internal does not resolve on this network");
                return false;
            }
        };
        // TCP beside it, for answers too big for a datagram; UDP alone still serves.
        let tcp = std::net::TcpListener::bind((ip, port))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(TcpListener::from_std)
            .map_err(|e| tracing::warn!(%ip, port, err = %e, "containers' DNS questions over TCP are not answered here"))
            .ok();
        tracing::info!(%ip, port, tcp = tcp.is_some(), "answering containers' DNS questions (<app>.internal)");
        let me = self.clone();
        let task = tokio::spawn(async move {
            match tcp {
                Some(tcp) => {
                    tokio::join!(me.clone().serve(socket, ip), me.serve_tcp(tcp, ip));
                }
                None => me.serve(socket, ip).await,
            }
        });
        sockets.insert(ip, task.abort_handle());
        true
    }

    /// Whether this resolver answers at `ip`: an app network's gateway on this node.
    pub fn serves(&self, ip: std::net::IpAddr) -> bool {
        let std::net::IpAddr::V4(ip) = ip.to_canonical() else {
            return false;
        };
        self.sockets
            .lock()
            .is_ok_and(|s| s.get(&ip).is_some_and(|h| !h.is_finished()))
    }

    /// Answers on `ip:53`.
    pub fn listen(self: &Arc<Self>, ip: Ipv4Addr) -> bool {
        self.listen_on(ip, 53)
    }

    async fn serve(self: Arc<Self>, socket: Arc<UdpSocket>, local: Ipv4Addr) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(err = %e, "a DNS question could not be read");
                    // An error that repeats must not spin the loop.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let query = &buf[..n];
            match reply(query, local) {
                Reply::Here(answer) => {
                    let _ = socket.send_to(&answer, from).await;
                }
                Reply::Drop => {}
                Reply::Forward => {
                    let Ok(slot) = self.forwards.clone().try_acquire_owned() else {
                        continue;
                    };
                    let (socket, query, upstream) =
                        (socket.clone(), query.to_vec(), self.upstream.clone());
                    tokio::spawn(async move {
                        let _slot = slot;
                        let answer = match forward(&query, &upstream).await {
                            Some(a) => Some(a),
                            None => servfail(&query),
                        };
                        if let Some(answer) = answer {
                            let _ = socket.send_to(&answer, from).await;
                        }
                    });
                }
            }
        }
    }

    /// Accepts TCP connections on a gateway, each served on its own (at most
    /// `MAX_TCP_CONNS` at once; they end with this task).
    async fn serve_tcp(self: Arc<Self>, listener: TcpListener, local: Ipv4Addr) {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!(err = %e, "a DNS connection could not be accepted");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            while conns.try_join_next().is_some() {}
            if conns.len() >= MAX_TCP_CONNS {
                continue;
            }
            let me = self.clone();
            conns.spawn(async move { me.tcp_conn(stream, local).await });
        }
    }

    /// Questions on one TCP connection, answered in turn, until it closes, idles or sends
    /// something that is not a question.
    async fn tcp_conn(&self, mut s: TcpStream, local: Ipv4Addr) {
        loop {
            let Some(query) = read_framed(&mut s, self.tcp_idle).await else {
                return;
            };
            let answer = match reply(&query, local) {
                Reply::Here(a) => a,
                Reply::Drop => return,
                Reply::Forward => {
                    let Ok(_slot) = self.forwards.try_acquire() else {
                        return;
                    };
                    match forward_tcp(&query, &self.upstream).await {
                        Some(a) => a,
                        None => match servfail(&query) {
                            Some(a) => a,
                            None => return,
                        },
                    }
                }
            };
            if !write_framed(&mut s, &answer).await {
                return;
            }
        }
    }
}

/// SERVFAIL for a question no resolver answered.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::error_msg(q.metadata.id, q.metadata.op_code, ResponseCode::ServFail);
    r.queries = q.queries;
    r.to_vec().ok()
}

/// One length-prefixed DNS message from a TCP stream, within `within`.
async fn read_framed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let read = async {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.ok()?;
        let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut m).await.ok()?;
        Some(m)
    };
    tokio::time::timeout(within, read).await.ok()?
}

/// Writes one length-prefixed DNS message; whether it went.
async fn write_framed(s: &mut TcpStream, m: &[u8]) -> bool {
    let Ok(len) = u16::try_from(m.len()) else {
        return false;
    };
    let mut out = Vec::with_capacity(m.len() + 2);
    out.extend(len.to_be_bytes());
    out.extend(m);
    matches!(
        tokio::time::timeout(TCP_IDLE, s.write_all(&out)).await,
        Ok(Ok(()))
    )
}

/// `forward` over TCP: each resolver in turn, the first answer with the question's id.
async fn forward_tcp(query: &[u8], upstream: &[SocketAddr]) -> Option<Vec<u8>> {
    let id = query.get(..2)?;
    for up in upstream {
        let asked = async {
            let mut s = TcpStream::connect(up).await.ok()?;
            if !write_framed(&mut s, query).await {
                return None;
            }
            loop {
                let m = read_framed(&mut s, FORWARD_WITHIN).await?;
                if m.get(..2) == Some(id) {
                    return Some(m);
                }
            }
        };
        if let Ok(Some(answer)) = tokio::time::timeout(FORWARD_WITHIN, asked).await {
            return Some(answer);
        }
    }
    None
}

impl Drop for Resolver {
    fn drop(&mut self) {
        if let Ok(s) = self.sockets.lock() {
            for h in s.values() {
                h.abort();
            }
        }
    }
}

/// Asks each resolver in turn; the first answer that matches the question's id.
async fn forward(query: &[u8], upstream: &[SocketAddr]) -> Option<Vec<u8>> {
    let id = query.get(..2)?;
    for up in upstream {
        let any: SocketAddr = if up.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(s) = UdpSocket::bind(any).await else {
            continue;
        };
        if s.connect(up).await.is_err() || s.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; MAX_MESSAGE];
        let deadline = crate::clock::now() + FORWARD_WITHIN;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.recv(&mut buf)).await {
            if buf.get(..2) == Some(id) {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn ask(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn parsed(r: Reply) -> Message {
        match r {
            Reply::Here(v) => Message::from_vec(&v).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_apps_name_is_the_address_it_was_asked_on() {
        let gw = Ipv4Addr::new(172, 18, 0, 1);
        let m = parsed(reply(&ask("Web.Internal.", RecordType::A), gw));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].data, RData::A(A(gw)));
        assert!(m.metadata.authoritative);
        // No IPv6 address: the name is there, with no record of that type.
        let m = parsed(reply(&ask("web.internal.", RecordType::AAAA), gw));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        // Not an app's name.
        for bad in ["a.b.internal.", "internal.", "a_b.internal."] {
            let m = parsed(reply(&ask(bad, RecordType::A), gw));
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{bad}");
        }
        // Anything else goes to the node's resolvers; garbage gets nothing.
        assert_eq!(
            reply(&ask("example.com.", RecordType::A), gw),
            Reply::Forward
        );
        assert_eq!(reply(b"\x00\x01garbage", gw), Reply::Drop);
        assert_eq!(reply(b"", gw), Reply::Drop);
    }

    #[test]
    fn resolvers_come_from_resolv_conf() {
        let text = "# made by init\nsearch lan\nnameserver 10.0.2.3\nnameserver  fd00::3 \nnameserver bogus\noptions edns0\n";
        assert_eq!(
            upstreams(text),
            vec![
                "10.0.2.3:53".parse::<SocketAddr>().unwrap(),
                "[fd00::3]:53".parse().unwrap()
            ]
        );
    }

    /// One A record for whatever was asked.
    fn answer_all(query: &[u8]) -> Vec<u8> {
        let q = Message::from_vec(query).unwrap();
        let mut r = Message::response(q.metadata.id, q.metadata.op_code);
        r.add_query(q.queries[0].clone());
        r.add_answer(Record::from_rdata(
            q.queries[0].name().clone(),
            60,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 8))),
        ));
        r.to_vec().unwrap()
    }

    #[tokio::test]
    async fn over_tcp_several_questions_go_on_one_connection_and_others_to_the_resolver_by_tcp() {
        // The node's resolver over TCP: a real listener answering length-prefixed questions.
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = upstream.accept().await {
                tokio::spawn(async move {
                    while let Some(q) = read_framed(&mut s, Duration::from_secs(5)).await {
                        write_framed(&mut s, &answer_all(&q)).await;
                    }
                });
            }
        });
        let r = Resolver::with_tcp_idle(vec![up_addr], Duration::from_millis(300));
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        assert!(r.listen_on(Ipv4Addr::LOCALHOST, port));
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        for (name, want) in [
            ("api.internal.", Ipv4Addr::LOCALHOST),
            ("example.com.", Ipv4Addr::new(192, 0, 2, 8)),
            ("web.internal.", Ipv4Addr::LOCALHOST),
        ] {
            assert!(write_framed(&mut s, &ask(name, RecordType::A)).await);
            let m = read_framed(&mut s, Duration::from_secs(5)).await.unwrap();
            let m = Message::from_vec(&m).unwrap();
            assert_eq!(m.answers[0].data, RData::A(A(want)), "{name}");
        }
        // Garbage ends the connection.
        assert!(write_framed(&mut s, b"\x00\x01garbage").await);
        assert!(read_framed(&mut s, Duration::from_secs(5)).await.is_none());
        // A connection that says nothing is not held past the idle bound, and a length with
        // no message behind it gets nothing.
        let mut idle = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        idle.write_all(&[0x10, 0x00, 1, 2]).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
            .await
            .expect("closed within the idle bound");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }

    #[tokio::test]
    async fn other_names_are_passed_to_the_nodes_resolver_and_back() {
        // A resolver of the node's: a real UDP socket that answers every question with
        // one A record.
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut r = Message::response(q.metadata.id, q.metadata.op_code);
                let name = q.queries[0].name().clone();
                r.add_query(q.queries[0].clone());
                r.add_answer(Record::from_rdata(
                    name,
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
                ));
                upstream.send_to(&r.to_vec().unwrap(), from).await.unwrap();
            }
        });
        let r = Resolver::new(vec![up_addr]);
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        assert!(r.listen_on(Ipv4Addr::LOCALHOST, port));
        assert!(
            r.listen_on(Ipv4Addr::LOCALHOST, port),
            "a second time is a no-op"
        );
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(("127.0.0.1", port)).await.unwrap();
        let mut buf = vec![0u8; 4096];
        for (name, want) in [
            ("example.com.", Ipv4Addr::new(192, 0, 2, 7)),
            ("api.internal.", Ipv4Addr::LOCALHOST),
        ] {
            client.send(&ask(name, RecordType::A)).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            let m = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(m.answers[0].data, RData::A(A(want)), "{name}");
        }
        // No resolver answers: SERVFAIL, not silence.
        let dead = Resolver::new(vec![]);
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        assert!(dead.listen_on(Ipv4Addr::LOCALHOST, port));
        client.connect(("127.0.0.1", port)).await.unwrap();
        client
            .send(&ask("example.com.", RecordType::A))
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }
}
