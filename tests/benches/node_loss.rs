//! Node loss → replacement ready, for BENCHMARKS.md: N release agents on loopback with their
//! default settings, sharing this machine's dockerd, run an app of N replicas probed by TCP.
//! Each round SIGKILLs one agent that runs a replica and removes its containers at the same
//! instant (a machine gone), then times, from another node's `/v1/tasks`, until N replicas
//! are ready again on live nodes; the killed agent is started again before the next round.
//!
//! `cargo bench -p shoal-e2e --bench node_loss` (root, dockerd running; SHOAL_BENCH_NODES,
//! default 3; SHOAL_BENCH_RUNS, default 20)

use serde_json::Value;
use shoal_e2e::docker::Cleanup;
use shoal_e2e::{busybox_image, run, use_release_bin, wait_for, Agent, BUSYBOX};
use std::process::Command;
use std::time::{Duration, Instant};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// The app's tasks as `a` sees them.
fn tasks(a: &Agent) -> Vec<Value> {
    a.get("/v1/tasks")
        .ok()
        .and_then(|r| r.json().as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t["app"] == "web")
        .collect()
}

/// Replicas (by index: a replica briefly run twice counts once) ready on live nodes other
/// than `gone`.
fn ready_without(a: &Agent, gone: &str) -> usize {
    tasks(a)
        .iter()
        .filter(|t| t["ready"] == true && t["node_state"] == "alive" && t["node"] != gone)
        .filter_map(|t| t["replica"].as_u64())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

fn main() {
    shoal_e2e::netns::require_root();
    use_release_bin();
    let n = env("SHOAL_BENCH_NODES", 3).max(2);
    let runs = env("SHOAL_BENCH_RUNS", 20);
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let ids: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
    let mut nodes: Vec<Agent> = ids
        .iter()
        .map(|id| Agent::configure(root.path(), id, &[], "[docker]\nenabled = true\n"))
        .collect();
    let ports: Vec<u16> = nodes.iter().map(|a| a.api_port).collect();
    for a in &mut nodes {
        a.set_peers(&ports);
        a.spawn();
    }
    let all_up = |nodes: &[Agent]| {
        nodes
            .iter()
            .all(|a| a.alive_members() == n - 1 && a.list("/v1/nodes").len() == n)
    };
    wait_for(Duration::from_secs(60), "every member alive", || {
        all_up(&nodes).then_some(())
    });
    let tar = std::fs::read(busybox_image()).unwrap();
    let auth = format!("Bearer {}", nodes[0].token);
    let r = nodes[0]
        .api(
            "POST",
            "/v1/images",
            &[("Authorization", &auth)],
            &tar,
            None,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let spec = format!(
        "name = \"web\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nport = 8080\n[scale]\nreplicas = {n}\n[resources]\nmemory = \"16Mi\"\n"
    );
    let r = nodes[0].put_app("web", &spec).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    wait_for(Duration::from_secs(120), "every replica ready", || {
        (ready_without(&nodes[0], "") == n).then_some(())
    });
    let cluster = nodes[0].cluster_id();

    let mut times = Vec::new();
    for round in 0..runs {
        // Settled first: each replica ready on exactly one node (a node that came back may
        // briefly run one beside its stand-in, and killing it then loses nothing).
        wait_for(
            Duration::from_secs(120),
            "one ready copy of each replica",
            || {
                let t: Vec<Value> = tasks(&nodes[0])
                    .into_iter()
                    .filter(|t| t["node_state"] == "alive")
                    .collect();
                (t.len() == n
                    && t.iter().all(|t| t["ready"] == true)
                    && ready_without(&nodes[0], "") == n)
                    .then_some(())
            },
        );
        // A node that runs a replica, watched from another.
        let t = tasks(&nodes[0]);
        let victim = (0..n)
            .filter(|i| {
                t.iter()
                    .any(|t| t["node"] == ids[*i].as_str() && t["ready"] == true)
            })
            .max_by_key(|i| (*i + round) % n)
            .unwrap();
        let watcher = (victim + 1) % n;
        let t0 = Instant::now();
        nodes[victim].kill9();
        let labelled = run(Command::new("docker").args([
            "ps",
            "-q",
            "--filter",
            &format!("label=shoal.cluster={cluster}"),
            "--filter",
            &format!("label=shoal.node={}", ids[victim]),
        ]));
        for id in labelled.lines() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
        wait_for(Duration::from_secs(120), "the replacement ready", || {
            (ready_without(&nodes[watcher], &ids[victim]) == n).then_some(())
        });
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        println!(
            "round {round}: {} killed, {ms:.0} ms to {n} ready",
            ids[victim]
        );
        times.push(ms);
        nodes[victim].spawn();
        wait_for(Duration::from_secs(60), "the node back", || {
            all_up(&nodes).then_some(())
        });
    }
    println!(
        "node loss -> replacement ready, {n} nodes, {runs} kills: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        quantile(&mut times, 0.5),
        quantile(&mut times, 0.99),
        quantile(&mut times, 1.0)
    );
}
