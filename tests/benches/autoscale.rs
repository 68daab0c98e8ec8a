//! Autoscaling for BENCHMARKS.md, with the release `shoal` binary and the host's dockerd:
//!
//! - cold start: an app scaled to zero (`min = 0`), from a request sent through the ingress
//!   to its answer, against `docker run -d` of the same image and command to its first HTTP
//!   answer, in the same run, rounds alternating;
//! - load step: an app at one replica sized for 20 req/s gets ~60 req/s at once; the time
//!   until a second replica answers requests, with the default `[autoscale] interval_ms`.
//!
//! `cargo bench -p shoal-e2e --bench autoscale` (root, dockerd running; SHOAL_BENCH_RUNS,
//! default 10)

use shoal_e2e::{busybox_image, run, use_release_bin, Agent, BUSYBOX};
use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HTTPD: &str = "mkdir -p /www/cgi-bin && echo hello > /www/index.html && printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\nhostname\\n' > /www/cgi-bin/who && chmod +x /www/cgi-bin/who && exec httpd -f -p 8080 -h /www";

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn report(what: &str, v: &mut [f64]) {
    println!(
        "{what:<48} p50 {:>8.1} ms   p90 {:>8.1} ms   max {:>8.1} ms   (n={})",
        quantile(v, 0.5),
        quantile(v, 0.9),
        quantile(v, 1.0),
        v.len()
    );
}

/// A GET of `path` at `addr` for `host` on a fresh connection: status and body.
fn get(addr: &str, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(90))).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|b| b.1.to_string())?;
    Some((status, body))
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many replicas of `app` have a task record (any state).
fn tasks(a: &Agent, app: &str) -> usize {
    a.list("/v1/tasks")
        .iter()
        .filter(|t| t["app"] == app)
        .count()
}

fn ready(a: &Agent, app: &str) -> usize {
    a.list("/v1/tasks")
        .iter()
        .filter(|t| t["app"] == app && t["ready"] == true && t["state"] == "running")
        .count()
}

fn curl_write(a: &Agent, method: &str, path: &str, body: &[u8]) {
    let auth = format!("Bearer {}", a.token);
    let r = a
        .api(method, path, &[("Authorization", &auth)], body, None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

fn main() {
    shoal_e2e::netns::require_root();
    let runs: usize = std::env::var("SHOAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    use_release_bin();
    let root = tempfile::tempdir().unwrap();
    let a = Agent::start(root.path(), "n1", &[], "[docker]\nenabled = true\n");
    curl_write(
        &a,
        "POST",
        "/v1/images",
        &std::fs::read(busybox_image()).unwrap(),
    );
    let ingress = format!("127.0.0.1:{}", a.http_port);
    let spec = |name: &str, scale: &str| {
        format!(
            "name = \"{name}\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"sh\", \"-c\", {HTTPD:?}]\nport = 8080\n[scale]\n{scale}"
        )
    };

    // Cold start.
    curl_write(
        &a,
        "PUT",
        "/v1/apps/cold",
        spec(
            "cold",
            "min = 0\nmax = 1\ntarget_rps = 1000\ndown_window = \"1s\"\n",
        )
        .as_bytes(),
    );
    let mut cold_ms = Vec::new();
    let mut docker_ms = Vec::new();
    for _ in 0..runs {
        until("cold scaled to zero", || tasks(&a, "cold") == 0);
        let t0 = Instant::now();
        let (status, body) = get(&ingress, "cold.localhost", "/").expect("an answer");
        assert_eq!((status, body.as_str()), (200, "hello\n"));
        cold_ms.push(t0.elapsed().as_secs_f64() * 1000.0);

        let t0 = Instant::now();
        let id =
            run(Command::new("docker").args(["run", "-d", "--rm", BUSYBOX, "sh", "-c", HTTPD]))
                .trim()
                .to_string();
        let ip = run(Command::new("docker").args([
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &id,
        ]))
        .trim()
        .to_string();
        let addr = format!("{ip}:8080");
        until("docker's container answering", || {
            get(&addr, "x", "/").is_some_and(|(s, _)| s == 200)
        });
        docker_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        run(Command::new("docker").args(["rm", "-f", &id]));
    }
    report("cold start: shoal, request held → answered", &mut cold_ms);
    report("cold start: docker run -d → first answer", &mut docker_ms);
    curl_write(&a, "DELETE", "/v1/apps/cold", b"");

    // Load step.
    curl_write(
        &a,
        "PUT",
        "/v1/apps/step",
        spec(
            "step",
            "min = 1\nmax = 2\ntarget_rps = 20\ndown_window = \"1s\"\n",
        )
        .as_bytes(),
    );
    let mut step_ms = Vec::new();
    for _ in 0..runs.min(5) {
        let end = Instant::now() + Duration::from_secs(120);
        while !(tasks(&a, "step") == 1 && ready(&a, "step") == 1) {
            if Instant::now() > end {
                let log = a.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "step not back at one replica: {:#?}\n{:#?}\n{}",
                    a.list("/v1/apps"),
                    a.list("/v1/tasks"),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<(Duration, String)>>> = Arc::default();
        let t0 = Instant::now();
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let (stop, seen, ingress) = (stop.clone(), seen.clone(), ingress.clone());
                std::thread::spawn(move || {
                    while !stop.load(Relaxed) {
                        let t = Instant::now();
                        if let Some((200, who)) = get(&ingress, "step.localhost", "/cgi-bin/who") {
                            seen.lock().unwrap().push((t0.elapsed(), who));
                        }
                        // 20 req/s a client: pacing the load.
                        std::thread::sleep(Duration::from_millis(50).saturating_sub(t.elapsed()));
                    }
                })
            })
            .collect();
        until("a second replica answering", || {
            let s = seen.lock().unwrap();
            let first = s.first().map(|f| f.1.clone());
            s.iter().any(|(_, who)| Some(who) != first.as_ref())
        });
        let s = seen.lock().unwrap().clone();
        let first = s[0].1.clone();
        let at = s.iter().find(|(_, w)| *w != first).unwrap().0;
        step_ms.push(at.as_secs_f64() * 1000.0);
        stop.store(true, Relaxed);
        for c in clients {
            c.join().unwrap();
        }
    }
    report(
        "load step: 3x the target → 2nd replica answers",
        &mut step_ms,
    );
    curl_write(&a, "DELETE", "/v1/apps/step", b"");
}
