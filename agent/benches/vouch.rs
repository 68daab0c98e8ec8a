//! The cost of proofs (`store::vouch`, `identity::vouch`): signing a write and checking a
//! peer's entry, with the node key (ECDSA P-256, the certificate cached after the first
//! check) and the operator key (Ed25519). Run: `cargo bench -p shoal --bench vouch`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shoal::identity::cert::NodeIdentity;
use shoal::identity::vouch::{NodeSigner, OperatorKey, OperatorPublic, Vouchers};
use shoal::identity::Bundle;
use shoal::store::vouch::Vouch;
use shoal::store::{Bytes, Entry, Hlc, Key, NodeId, Proof, Sign, Version};
use std::sync::Arc;

fn entry(key: &str) -> Entry {
    Entry {
        key: Key::parse(key).unwrap(),
        version: Version {
            hlc: Hlc::from_millis(1_800_000_000_000),
            origin: NodeId::new("n1").unwrap(),
        },
        // A task record's usual size.
        value: Some(Bytes::from(vec![b'x'; 300])),
        proof: Proof::default(),
    }
}

fn bench(c: &mut Criterion) {
    let bundle = Bundle::generate("bench", 1).unwrap();
    let id =
        NodeIdentity::issue(&bundle.cluster, &bundle.ca_cert, &bundle.ca_key, "n1", &[]).unwrap();
    let node = NodeSigner::new(&id.key_pem, &id.cert_pem).unwrap();
    let op = OperatorKey::from_token(&bundle.admin_token, &bundle.cluster.id);
    let public = OperatorPublic::parse(bundle.cluster.operator_key.as_deref().unwrap()).unwrap();
    let mut vouch = Vouchers::new(
        Arc::new(shoal::tls::MemberCheck::new(&bundle.ca_cert).unwrap()),
        vec![public],
    );
    let mut record = entry("nodes/n1");
    record.proof = node.prove(&record);
    let mut task = entry("tasks/n1/web/0");
    task.proof = node.prove(&task);
    let mut app = entry("apps/web");
    app.proof = op.prove(&app);
    let mut lookup = |k: &Key| (k.as_str() == "nodes/n1").then(|| record.clone());

    let mut g = c.benchmark_group("vouch");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign node entry (ECDSA P-256)", |b| {
        b.iter(|| node.prove(&task))
    });
    g.bench_function("sign operator entry (Ed25519)", |b| {
        b.iter(|| op.prove(&app))
    });
    g.bench_function("check node entry (ECDSA P-256, cert cached)", |b| {
        b.iter(|| vouch.check(&task, &mut lookup).unwrap())
    });
    g.bench_function("check operator entry (Ed25519)", |b| {
        b.iter(|| vouch.check(&app, &mut lookup).unwrap())
    });
    g.bench_function("token check on a write (HKDF + Ed25519 key)", |b| {
        b.iter(|| {
            public
                .accepts(&bundle.admin_token, &bundle.cluster.id)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
