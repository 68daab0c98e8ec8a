//! Simulated cluster figures for BENCHMARKS.md: dissemination time and bandwidth, partition
//! healing, failure detection, false 'dead' verdicts under loss, and clock skew. Everything
//! runs the real node code in virtual time (`shoal::sim`), so the figures are reproducible
//! from the seeds printed here.
//!
//! `cargo bench -p shoal --bench cluster_sim` (add `-- quick` for a shorter run).

// Benchmarks time the real thing with the real clocks.
#![allow(clippy::disallowed_methods)]

use shoal::sim::{Sim, SimConfig};
use shoal::store::{Bytes, Key};
use std::time::Instant;

/// `SHOAL_BENCH_MEMBERSHIP` may hold TOML overriding membership settings, to compare tunings.
fn tuned(mut cfg: SimConfig) -> SimConfig {
    if let Ok(t) = std::env::var("SHOAL_BENCH_MEMBERSHIP") {
        cfg.node.membership =
            toml::from_str(&t).expect("SHOAL_BENCH_MEMBERSHIP is not valid membership TOML");
    }
    cfg
}

fn key(s: &str) -> Key {
    Key::parse(s).unwrap()
}

fn quantile(mut v: Vec<u64>, q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let idx = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[idx]
}

/// One write at node 0 of an `n`-node cluster with 200 ms gossip rounds: time until 99.99 %
/// of the other nodes hold it, and bytes sent per node per second over the next 10 s.
fn dissemination(n: usize, loss: f64, immediate: bool, seed: u64) -> (Option<f64>, f64, f64) {
    let mut cfg = SimConfig::new(n, seed);
    cfg.swim = false;
    cfg.loss = loss;
    cfg.node.sync.forward_immediately = immediate;
    let mut sim = Sim::new(cfg);
    sim.run_for_ms(3_000);
    let idle0: u64 = sim.bytes_sent.iter().sum();
    sim.run_for_ms(5_000);
    let idle = (sim.bytes_sent.iter().sum::<u64>() - idle0) as f64 / n as f64 / 5.0;
    let k = key("apps/probe");
    sim.watch(&k);
    let before: u64 = sim.bytes_sent.iter().sum();
    let t0 = sim.now_ms() * 1000;
    sim.write(
        0,
        k.clone(),
        Some(Bytes::from_static(
            b"{\"name\":\"probe\",\"scale\":{\"replicas\":3}}",
        )),
    );
    let need = ((n - 1) as f64 * 0.9999).ceil() as usize;
    sim.run_until(30_000, 10, |s| {
        s.seen(&k).iter().skip(1).filter(|t| t.is_some()).count() >= need
    });
    let times: Vec<u64> = sim
        .seen(&k)
        .iter()
        .skip(1)
        .filter_map(|t| t.map(|t| t - t0))
        .collect();
    let reached =
        (times.len() >= need).then(|| quantile(times, need as f64 / (n - 1) as f64) as f64 / 1e6);
    let elapsed_ms = sim.now_ms() - t0 / 1000;
    sim.run_for_ms(10_000u64.saturating_sub(elapsed_ms));
    let bytes = (sim.bytes_sent.iter().sum::<u64>() - before) as f64 / n as f64 / 10.0;
    (reached, bytes, idle)
}

fn partition_heal(n: usize, seed: u64) -> Option<f64> {
    let mut sim = Sim::new(SimConfig::new(n, seed));
    sim.run_until(60_000, 100, |s| {
        (0..n).all(|i| s.live_view(i).len() == n - 1)
    })?;
    let left: Vec<usize> = (0..n / 2).collect();
    let right: Vec<usize> = (n / 2..n).collect();
    sim.partition(&[&left, &right]);
    for round in 0..200 {
        let writer = (round * 7919) % n;
        sim.write(
            writer,
            key(&format!("apps/k{}", round % 50)),
            Some(Bytes::from(format!("v{round}"))),
        );
        sim.run_for_ms(100);
    }
    sim.run_for_ms(10_000);
    sim.heal();
    sim.run_until(120_000, 50, |s| s.converged())
        .map(|us| us as f64 / 1e6)
}

/// Time from a crash to every other member declaring the node down; several trials.
fn detection(n: usize, trials: usize, seed: u64) -> Vec<f64> {
    let mut sim = Sim::new(tuned(SimConfig::new(n, seed)));
    if sim
        .run_until(300_000, 250, |s| {
            (0..n).all(|i| s.live_view(i).len() == n - 1)
        })
        .is_none()
    {
        eprintln!("  membership of {n} did not form");
        return Vec::new();
    }
    let mut out = Vec::new();
    for t in 0..trials {
        let victim = 1 + (t * 37) % (n - 1);
        let vid = shoal::store::NodeId::new(&format!("n{victim}")).unwrap();
        let start_downs = sim.downs.len();
        let t0 = sim.now_ms() * 1000;
        sim.crash(victim);
        let took = sim.run_until(60_000, 20, |s| {
            let mut seen = vec![false; n];
            for (_, obs, m) in &s.downs[start_downs..] {
                if *m == vid {
                    seen[*obs] = true;
                }
            }
            (0..n)
                .filter(|&i| i != victim && s.is_up(i))
                .all(|i| seen[i])
        });
        match took {
            Some(_) => out.push((sim.now_ms() * 1000 - t0) as f64 / 1e6),
            None => eprintln!("  trial {t}: not detected everywhere within 60 s"),
        }
        sim.restart(victim);
        sim.run_until(60_000, 250, |s| {
            (0..n).all(|i| s.live_view(i).len() == n - 1)
        });
    }
    out
}

/// Membership verdicts about live nodes over `secs` of virtual time at `loss`.
fn false_dead(n: usize, loss: f64, secs: u64, seed: u64) -> (usize, u64) {
    let mut cfg = tuned(SimConfig::new(n, seed));
    cfg.loss = loss;
    let mut sim = Sim::new(cfg);
    sim.run_until(120_000, 250, |s| {
        (0..n).all(|i| s.live_view(i).len() == n - 1)
    });
    let start = sim.downs.len();
    let msgs0 = sim.messages_sent;
    sim.run_for_ms(secs * 1000);
    (sim.downs.len() - start, sim.messages_sent - msgs0)
}

/// Writes that follow each other in real time from random nodes whose clocks are up to
/// `skew_ms` off: how many causally later writes lose, with our HLC versions (measured) and
/// with wall-clock last-writer-wins (computed from the same writers' clocks).
fn skew(skew_ms: u64, writes: usize, seed: u64) -> (usize, usize) {
    let n = 5;
    let mut cfg = SimConfig::new(n, seed);
    cfg.max_skew_ms = skew_ms;
    let mut sim = Sim::new(cfg);
    sim.run_until(60_000, 100, |s| {
        (0..n).all(|i| s.live_view(i).len() == n - 1)
    });
    let k = key("apps/contended");
    let mut lost_hlc = 0;
    let mut lost_wall = 0;
    let mut prev_wall: Option<i64> = None;
    let mut rng_state = seed;
    for w in 0..writes {
        rng_state = rng_state.wrapping_mul(6364136223846793005).wrapping_add(1);
        let node = (rng_state >> 33) as usize % n;
        let value = Bytes::from(format!("w{w}"));
        sim.write(node, k.clone(), Some(value.clone())).unwrap();
        let wall = sim.wall_clock_of(node) as i64;
        if prev_wall.is_some_and(|p| wall <= p) {
            lost_wall += 1;
        }
        prev_wall = Some(prev_wall.map_or(wall, |p| p.max(wall)));
        let ok = sim.run_until(10_000, 5, |s| {
            (0..n).all(|i| s.read(i, &k).and_then(|e| e.value).as_ref() == Some(&value))
        });
        if ok.is_none() {
            lost_hlc += 1;
        }
    }
    (lost_hlc, lost_wall)
}

fn membership(quick: bool) {
    println!("\n## Failure detection (SWIM via foca; default settings)");
    for (n, trials) in [(10, 5), (100, 5), (1000, if quick { 1 } else { 3 })] {
        let d = detection(n, trials, 99);
        if d.is_empty() {
            continue;
        }
        let max = d.iter().cloned().fold(0.0, f64::max);
        let mean = d.iter().sum::<f64>() / d.len() as f64;
        println!("- {n} nodes: death to 'dead' on every member: mean {mean:.2} s, max {max:.2} s over {} trials", d.len());
    }
    let secs = if quick { 600 } else { 3600 };
    let (downs, msgs) = false_dead(100, 0.1, secs, 5);
    println!("- 100 nodes, 10 % loss, {secs} s simulated: {downs} false 'dead' verdicts ({msgs} messages)");
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let only_membership = std::env::args().any(|a| a == "membership");
    let t = Instant::now();
    if only_membership {
        membership(quick);
        return;
    }
    println!("## Dissemination (one write, 200 ms gossip rounds, fanout 3, latency 0.5-5 ms)");
    println!("| nodes | loss | forwarding | time to 99.99 % | bytes/node/s (10 s after the write) | idle bytes/node/s |");
    println!("|---|---|---|---|---|---|");
    let sizes: &[usize] = if quick {
        &[10, 100, 1000]
    } else {
        &[10, 100, 1000, 10_000]
    };
    for &n in sizes {
        for loss in [0.0, 0.1] {
            for immediate in [true, false] {
                if n == 10_000 && !immediate {
                    continue;
                }
                let (reach, bytes, idle) = dissemination(n, loss, immediate, 42);
                println!(
                    "| {n} | {:.0} % | {} | {} | {bytes:.0} | {idle:.0} |",
                    loss * 100.0,
                    if immediate {
                        "on receipt"
                    } else {
                        "rounds only"
                    },
                    reach
                        .map(|s| format!("{s:.3} s"))
                        .unwrap_or_else(|| "not reached in 30 s".into()),
                );
            }
        }
    }
    println!("\n## Convergence after a partition heals (two halves, 20 s apart, 200 writes)");
    for n in [10, 100] {
        match partition_heal(n, 7) {
            Some(s) => println!("- {n} nodes: {s:.2} s from heal to identical state everywhere"),
            None => println!("- {n} nodes: did not converge within 120 s"),
        }
    }
    membership(quick);
    println!("\n## Clock skew (5 nodes, clocks up to ±60 s off, 200 causally ordered writes)");
    let (hlc, wall) = skew(60_000, 200, 3);
    println!("- hybrid logical clocks (shoal): {hlc} causally later writes lost");
    println!(
        "- wall-clock last-writer-wins on the same writers' clocks: {wall} lost ({:.0} %)",
        wall as f64 / 2.0
    );
    println!("\n(ran in {:.0} s)", t.elapsed().as_secs_f64());
}
