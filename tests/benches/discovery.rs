//! Discovery and trust figures for BENCHMARKS.md, with the release `shoal` binary:
//! - mDNS formation: three fresh agents in three network namespaces on one bridge, holding
//!   only the bundle, from process start to every agent seeing the two others alive; next to
//!   the same formation on loopback with a static peer list (the reference);
//! - join time: a node with only the join secret (TLS bootstrap: CSR, HMAC, signature) from
//!   process start to the seed seeing it alive, next to a node holding the whole bundle;
//! - TLS handshakes per sync round: handshakes completed on the API ports of a settled
//!   3-agent cluster over 20 s, divided by the anti-entropy rounds in that time.
//!
//! Needs root (network namespaces). `cargo bench -p shoal-e2e --bench discovery`

use shoal_e2e::netns::Lan;
use shoal_e2e::{bundle, get, get_at, metric, use_release_bin, wait_for, Agent};
use std::time::{Duration, Instant};

const RUNS: usize = 5;
const T: Duration = Duration::from_secs(60);

fn alive_at(ip: &str) -> usize {
    get_at(ip, 7070, "/v1/status")
        .ok()
        .and_then(|r| {
            r.json()["members"]
                .as_array()
                .map(|m| m.iter().filter(|m| m["state"] == "alive").count())
        })
        .unwrap_or(0)
}

fn summary(name: &str, v: &mut [f64]) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{name}: median {:.3} s, min {:.3} s, max {:.3} s over {} runs",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1],
        v.len()
    );
}

fn mdns_formation() -> f64 {
    let lan = Lan::new(3);
    let root = tempfile::tempdir().unwrap();
    let b = bundle(&root.path().join("bundle"), "bench");
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| Agent::configure_in(&lan.hosts[i], root.path(), &format!("m{i}"), &b, &[]))
        .collect();
    let t0 = Instant::now();
    for a in agents.iter_mut() {
        a.spawn_detached();
    }
    wait_for(T, "three members over mDNS", || {
        lan.hosts.iter().all(|h| alive_at(&h.ip) == 2).then_some(())
    });
    t0.elapsed().as_secs_f64()
}

fn static_formation() -> f64 {
    let root = tempfile::tempdir().unwrap();
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| Agent::configure(root.path(), &format!("s{i}"), &[], ""))
        .collect();
    let ports: Vec<u16> = agents.iter().map(|a| a.api_port).collect();
    let t0 = Instant::now();
    for a in agents.iter_mut() {
        a.set_peers(&ports);
        a.spawn_detached();
    }
    wait_for(T, "three members from static peers", || {
        agents.iter().all(|a| a.alive_members() == 2).then_some(())
    });
    t0.elapsed().as_secs_f64()
}

/// Seconds from the joiner's start to the seed seeing it alive.
fn join_time(only_secret: bool) -> f64 {
    let root = tempfile::tempdir().unwrap();
    let seed = Agent::start(root.path(), "seed", &[], "");
    let dir = if only_secret {
        let d = root.path().join("join-only");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(seed.bundle.join("join.secret"), d.join("join.secret")).unwrap();
        d
    } else {
        seed.bundle.clone()
    };
    let mut j = Agent::configure_with_bundle(root.path(), "joiner", &[seed.api_port], &dir, "");
    let t0 = Instant::now();
    j.spawn_detached();
    wait_for(T, "the seed to see the joiner", || {
        (seed.alive_members() == 1).then_some(())
    });
    t0.elapsed().as_secs_f64()
}

fn handshakes_per_round() {
    let root = tempfile::tempdir().unwrap();
    let agents = shoal_e2e::cluster(root.path(), 3);
    wait_for(T, "membership", || {
        agents.iter().all(|a| a.alive_members() == 2).then_some(())
    });
    let sample = |a: &Agent| {
        let hs = metric(&a.metrics(), "shoal_peer_tls_handshakes_total").unwrap_or(0.0);
        let rounds = a.status()["sync"]["stats"]["sync_rounds"]
            .as_f64()
            .unwrap_or(0.0);
        (hs, rounds)
    };
    let before: Vec<(f64, f64)> = agents.iter().map(sample).collect();
    std::thread::sleep(Duration::from_secs(20)); // measuring a steady state, not waiting on one
    let after: Vec<(f64, f64)> = agents.iter().map(sample).collect();
    let hs: f64 = after.iter().zip(&before).map(|(a, b)| a.0 - b.0).sum();
    let rounds: f64 = after.iter().zip(&before).map(|(a, b)| a.1 - b.1).sum();
    let total_hs: f64 = after.iter().map(|a| a.0).sum();
    println!(
        "steady state, 3 agents, 20 s: {rounds} anti-entropy rounds, {hs} TLS handshakes ({:.4} per round); {total_hs} handshakes since start",
        if rounds > 0.0 { hs / rounds } else { f64::NAN }
    );
    let _ = get(agents[0].status_port, "/healthz");
}

fn main() {
    println!("binary: {}", use_release_bin().display());
    let mut v: Vec<f64> = (0..RUNS).map(|_| mdns_formation()).collect();
    summary(
        "3 fresh agents -> 3-member cluster over mDNS (netns bridge)",
        &mut v,
    );
    let mut v: Vec<f64> = (0..RUNS).map(|_| static_formation()).collect();
    summary(
        "3 fresh agents -> 3-member cluster from static peers (loopback, reference)",
        &mut v,
    );
    let mut v: Vec<f64> = (0..RUNS).map(|_| join_time(true)).collect();
    summary(
        "join with the join secret (TLS bootstrap), start -> alive on the seed",
        &mut v,
    );
    let mut v: Vec<f64> = (0..RUNS).map(|_| join_time(false)).collect();
    summary(
        "join with the whole bundle (self-issued certificate), start -> alive on the seed",
        &mut v,
    );
    handshakes_per_round();
}
