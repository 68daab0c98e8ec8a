//! Real-process figures for BENCHMARKS.md, with the release `shoal` binary on loopback:
//! - propagation: p50/p99 latency of a write on one agent reaching 3 other agents, observed
//!   on their `/v1/events` streams, next to the writer's own acknowledgement latency;
//! - failure detection: SIGKILL one of 3 agents, time until both others report it dead;
//! - idle agent memory (RSS) after 10 s idle in a 3-node cluster.
//!
//! `cargo bench -p shoal-e2e --bench real_cluster`

use shoal_e2e::{cluster, get, rss_kib, use_release_bin, wait_for, Agent};
use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Streams `(app name, arrival)` for every app put seen on `a`'s event stream.
fn follow(a: &Agent, tx: mpsc::Sender<(usize, String, Instant)>, idx: usize) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", a.status_port)).unwrap();
    write!(s, "GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(s).lines().map_while(Result::ok) {
            if let Some(d) = line.strip_prefix("data: ") {
                let now = Instant::now();
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(d) {
                    if let Some(k) = v["key"].as_str().and_then(|k| k.strip_prefix("apps/")) {
                        if tx.send((idx, k.to_string(), now)).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
}

/// PUTs an app through curl; the milliseconds from the request's start (TLS done) to the
/// answer, from curl's own timers.
fn timed_put(a: &Agent, name: &str) -> f64 {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-X", "PUT", "--cacert"])
        .arg(a.dir.join("tls/ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {}", a.token)])
        .args(["--data-binary", &format!("name = \"{name}\"\n")])
        .args(["-w", "%{http_code} %{time_appconnect} %{time_total}"])
        .arg(format!("https://127.0.0.1:{}/v1/apps/{name}", a.api_port))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(v.first(), Some(&"200"), "{text}");
    let (tls, total): (f64, f64) = (v[1].parse().unwrap(), v[2].parse().unwrap());
    (total - tls) * 1000.0
}

fn main() {
    let bin = use_release_bin();
    println!("binary: {}", bin.display());
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 4);
    for a in &agents {
        wait_for(Duration::from_secs(30), "membership", || {
            (a.alive_members() == 3).then_some(())
        });
    }
    let (tx, rx) = mpsc::channel();
    // The writer's own stream too: propagation is measured from the moment the write is
    // durable and visible on the writer, so the HTTP client's own cost is not in it.
    for (i, a) in agents.iter().enumerate() {
        follow(a, tx.clone(), i);
    }
    std::thread::sleep(Duration::from_millis(300));
    let writes = 300;
    let mut sent = std::collections::HashMap::new();
    let mut acks = Vec::new();
    for i in 0..writes {
        let name = format!("p{i}");
        sent.insert(name.clone(), ());
        acks.push(timed_put(&agents[0], &name));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut at_writer = std::collections::HashMap::new();
    let mut at_peers = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while at_peers.len() < writes * 3 && Instant::now() < end {
        if let Ok((idx, name, at)) = rx.recv_timeout(Duration::from_millis(100)) {
            if !sent.contains_key(&name) {
                continue;
            }
            if idx == 0 {
                at_writer.insert(name, at);
            } else {
                at_peers.push((name, at));
            }
        }
    }
    let mut lat: Vec<f64> = at_peers
        .iter()
        .filter_map(|(name, at)| {
            let w = at_writer.get(name)?;
            Some(at.saturating_duration_since(*w).as_secs_f64() * 1000.0)
        })
        .collect();
    println!("## Real propagation (4 agents on loopback, {writes} writes at 20 ms intervals)");
    println!(
        "- write acknowledged by the writer (flushed; curl's request time after the TLS handshake): p50 {:.2} ms, p99 {:.2} ms",
        quantile(&mut acks, 0.5),
        quantile(&mut acks, 0.99)
    );
    println!(
        "- write seen on each of 3 peers after it is on the writer's own event stream ({} samples): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        quantile(&mut lat, 0.5),
        quantile(&mut lat, 0.99),
        quantile(&mut lat, 1.0)
    );

    println!("\n## Idle memory");
    std::thread::sleep(Duration::from_secs(10));
    for a in &agents {
        println!(
            "- {}: RSS {} KiB after 10 s idle in a 4-node cluster",
            a.id,
            rss_kib(a.pid().unwrap())
        );
    }
    drop(agents);

    println!("\n## Real failure detection (3 agents, SIGKILL one)");
    let root = tempfile::tempdir().unwrap();
    let mut agents = cluster(root.path(), 3);
    for trial in 0..5 {
        for a in &agents {
            wait_for(Duration::from_secs(30), "membership", || {
                (a.alive_members() == 2).then_some(())
            });
        }
        let victim = agents[2].id.clone();
        let t0 = Instant::now();
        agents[2].kill9();
        let dead_on = |a: &Agent| {
            get(a.status_port, "/v1/status").ok().is_some_and(|r| {
                r.json()["members"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|m| m["id"] == victim.as_str() && m["state"] == "dead")
                })
            })
        };
        wait_for(
            Duration::from_secs(30),
            "both survivors to see the victim dead",
            || (dead_on(&agents[0]) && dead_on(&agents[1])).then_some(()),
        );
        println!(
            "- trial {trial}: {:.2} s from SIGKILL to 'dead' on both survivors",
            t0.elapsed().as_secs_f64()
        );
        agents[2].spawn();
    }
}
