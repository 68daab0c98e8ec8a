//! The cost of mutual TLS between members: one full handshake (TLS 1.3, ECDSA P-256 member
//! certificates, client certificate verified against the cluster CA), in memory, so the figure
//! is CPU only. The agent keeps one HTTP/2 connection per peer, so this is paid once per peer
//! connection, not per sync round; `tests/benches/discovery.rs` counts handshakes per round
//! on real agents.
//!
//! `cargo bench -p shoal --bench tls`

use criterion::{criterion_group, criterion_main, Criterion};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};
use shoal::identity::cert::{NodeIdentity, MEMBER_NAME};
use shoal::identity::Bundle;
use shoal::tls::Tls;
use std::sync::Arc;

fn pump(
    from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
) {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets().unwrap();
    }
}

fn handshake(client: &Arc<rustls::ClientConfig>, server: &Arc<rustls::ServerConfig>) {
    let name = ServerName::try_from(MEMBER_NAME).unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    while c.is_handshaking() || s.is_handshaking() {
        pump(&mut c, &mut s);
        pump(&mut s, &mut c);
    }
    assert!(s.peer_certificates().is_some());
}

fn bench(c: &mut Criterion) {
    let b = Bundle::generate("bench", 0).unwrap();
    let ip = "10.0.0.1".parse().unwrap();
    let a = NodeIdentity::issue(&b.cluster, &b.ca_cert, &b.ca_key, "a", &[ip]).unwrap();
    let z = NodeIdentity::issue(&b.cluster, &b.ca_cert, &b.ca_key, "z", &[ip]).unwrap();
    let (ta, tz) = (Tls::new(&a).unwrap(), Tls::new(&z).unwrap());
    let mut client = (*ta.client).clone();
    client.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(client);
    c.bench_function("mtls_full_handshake", |bch| {
        bch.iter(|| handshake(&client, &tz.server))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
