//! Placement throughput (`scheduler::place`): 10 000 replicas over 1 000 nodes with declared
//! cpu and memory, constraints on node labels and spread over zones, from scratch and with
//! every replica already running (the steady state every executor pass computes), plus the
//! 1 000-node cluster losing one node. Run: `cargo bench -p shoal --bench placement`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shoal::scheduler::{place, App, Capacity, Node, Running};
use shoal::spec::AppSpec;
use std::collections::BTreeMap;

const NODES: usize = 1000;
const APPS: usize = 100;
const REPLICAS: u32 = 100;

/// 100 apps of 100 replicas: a third constrained to a zone, a third spread over zones, all
/// declaring cpu and memory.
fn apps() -> Vec<AppSpec> {
    (0..APPS)
        .map(|i| {
            let extra = match i % 3 {
                0 => format!("constraints = [\"zone=z{}\"]\n", i % 5),
                1 => "spread = \"zone\"\n".to_string(),
                _ => String::new(),
            };
            AppSpec::parse(&format!(
                "name = \"app{i}\"\n[scale]\nreplicas = {REPLICAS}\n{extra}[resources]\ncpu = 0.1\nmemory = \"128Mi\"\n"
            ))
            .unwrap()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let specs = apps();
    let apps: Vec<App> = specs
        .iter()
        .map(|s| App {
            name: &s.name,
            spec: s,
            replicas: s.replicas(),
        })
        .collect();
    let ids: Vec<String> = (0..NODES).map(|i| format!("node-{i:04}")).collect();
    let labels: Vec<BTreeMap<String, String>> = (0..NODES)
        .map(|i| BTreeMap::from([("zone".to_string(), format!("z{}", i % 5))]))
        .collect();
    let nodes: Vec<Node> = ids
        .iter()
        .zip(&labels)
        .map(|(id, labels)| Node {
            id,
            capacity: Some(Capacity {
                cpu_milli: 8000,
                memory_bytes: 16 << 30,
            }),
            labels,
            takes_new: true,
        })
        .collect();
    let placed = place(&apps, &nodes, &[]);
    assert_eq!(placed.placements.len(), APPS * REPLICAS as usize);
    assert!(placed.unplaced.is_empty());
    let running: Vec<Running> = placed
        .placements
        .iter()
        .map(|p| Running {
            app: &p.app,
            replica: p.replica,
            node: &p.node,
            since_ms: 1,
            ready: true,
            pinned: false,
        })
        .collect();

    let mut g = c.benchmark_group("placement");
    g.sample_size(10);
    g.throughput(Throughput::Elements(APPS as u64 * REPLICAS as u64));
    g.bench_function("10k replicas on 1k nodes, from scratch", |b| {
        b.iter(|| place(&apps, &nodes, &[]))
    });
    g.bench_function("10k replicas on 1k nodes, all running", |b| {
        b.iter(|| place(&apps, &nodes, &running))
    });
    g.bench_function("10k replicas on 1k nodes, one node lost", |b| {
        b.iter_batched(
            || nodes[1..].to_vec(),
            |rest| place(&apps, &rest, &running),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
