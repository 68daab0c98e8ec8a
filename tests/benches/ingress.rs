//! The ingress against nginx as a reverse proxy, for BENCHMARKS.md: the same upstream (an
//! nginx container serving static files, built from the host's nginx binary and libraries,
//! deployed by the agent), the same client (`wrk`, keep-alive, 64 connections; `h2load` for
//! HTTP/2 in the clear), the same run, rounds alternating. Then the extra latency of a
//! request a node passes to the replica's node (two agents on loopback) against one served
//! by the replica's node itself.
//!
//! `cargo bench -p shoal-e2e --bench ingress` (root, dockerd, nginx, wrk and h2load
//! installed; SHOAL_BENCH_SECS per measurement, default 10; SHOAL_BENCH_RUNS rounds,
//! default 3)

use shoal_e2e::{free_port, host_image, run, use_release_bin, Agent};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The upstream: nginx in a container, `worker_processes auto`, static files.
fn upstream_image() -> (String, std::path::PathBuf) {
    let conf = "user nobody nogroup;\nworker_processes auto;\ndaemon off;\nerror_log stderr warn;\npid /tmp/nginx.pid;\nevents { worker_connections 4096; }\nhttp {\n  access_log off;\n  keepalive_requests 1000000;\n  server {\n    listen 8080 backlog=4096;\n    root /www;\n  }\n}\n";
    let big: Vec<u8> = (0..64 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    host_image(
        "nginx",
        &[(Path::new("/usr/sbin/nginx"), "/usr/sbin/nginx")],
        &[
            ("/etc/nginx/bench.conf", conf.as_bytes()),
            ("/etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
            ("/www/small", b"hello from nginx\n"),
            ("/www/64k", &big),
            ("/var/lib/nginx/.keep", b""),
            ("/var/log/nginx/.keep", b""),
        ],
    )
}

/// nginx on the host as a reverse proxy to `upstream`, on loopback `port` (HTTP/1.1) and
/// `h2_port` (h2c), upstream keep-alive.
struct NginxProxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl NginxProxy {
    fn start(upstream: &str, port: u16, h2_port: u16) -> NginxProxy {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            "worker_processes auto;\ndaemon off;\nerror_log {dir}/error.log warn;\npid {dir}/nginx.pid;\n\
events {{ worker_connections 4096; }}\n\
http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
  upstream app {{ server {upstream}; keepalive 1024; }}\n\
  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    listen 127.0.0.1:{h2_port} http2;\n\
    location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n\
      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
      proxy_set_header X-Forwarded-Proto $scheme;\n    }}\n  }}\n}}\n",
            dir = dir.path().display()
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            .spawn()
            .expect("nginx (apt install nginx-light)");
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "nginx did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        NginxProxy { child, _dir: dir }
    }
}

impl Drop for NginxProxy {
    fn drop(&mut self) {
        // SIGQUIT: graceful; the master takes its workers along.
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// One `wrk` measurement: requests/s, p99 latency (ms), non-2xx/3xx answers and errors.
#[derive(Debug, Clone, Copy, Default)]
struct Wrk {
    rps: f64,
    p99_ms: f64,
    mean_ms: f64,
    bad: u64,
}

fn ms(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

fn wrk(port: u16, host: &str, path: &str, conns: u32, secs: u64) -> Wrk {
    let out = run(Command::new("wrk")
        .args([
            &format!("-t{}", conns.min(2)),
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
        ])
        .args(["-H", &format!("Host: {host}")])
        .arg(format!("http://127.0.0.1:{port}{path}")));
    let mut w = Wrk::default();
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => w.rps = v.parse().unwrap_or(0.0),
            ["99%", v] => w.p99_ms = ms(v),
            ["Latency", mean, ..] if !ms(mean).is_nan() => w.mean_ms = ms(mean),
            ["Non-2xx", "or", "3xx", "responses:", n] => w.bad += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                w.bad += rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    w
}

/// One `h2load` measurement (h2c, prior knowledge): requests/s, mean time per request (ms),
/// failed requests.
fn h2load(port: u16, host: &str, path: &str, secs: u64) -> Wrk {
    let out = run(Command::new("h2load")
        .args(["-c", "64", "-m", "10", "-t", "2", "-D", &secs.to_string()])
        .args(["-H", &format!(":authority: {host}")])
        .arg(format!("http://127.0.0.1:{port}{path}")));
    let mut w = Wrk::default();
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["finished", "in", _, rps, "req/s,", ..] => w.rps = rps.parse().unwrap_or(0.0),
            ["requests:", _, "total,", _, "started,", _, "done,", _, "succeeded,", failed, "failed,", ..] => {
                w.bad = failed.parse().unwrap_or(0)
            }
            ["time", "for", "request:", _min, _max, mean, ..] => w.mean_ms = ms(mean),
            _ => {}
        }
    }
    w
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Alternating rounds of `ours` and `theirs`: the medians of each.
fn compare(
    what: &str,
    rounds: usize,
    mut ours: impl FnMut() -> Wrk,
    mut theirs: impl FnMut() -> Wrk,
) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        if i % 2 == 0 {
            a.push(ours());
            b.push(theirs());
        } else {
            b.push(theirs());
            a.push(ours());
        }
    }
    let med = |v: &[Wrk], f: fn(&Wrk) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
    let (ra, rb) = (med(&a, |w| w.rps), med(&b, |w| w.rps));
    let (pa, pb) = (med(&a, |w| w.p99_ms), med(&b, |w| w.p99_ms));
    let (ma, mb) = (med(&a, |w| w.mean_ms), med(&b, |w| w.mean_ms));
    let bad: u64 = a.iter().chain(&b).map(|w| w.bad).sum();
    println!("{what}");
    println!(
        "  shoal  {ra:>9.0} req/s   mean {ma:>6.2} ms   p99 {pa:>6.2} ms   (rounds: {})",
        a.iter()
            .map(|w| format!("{:.0}", w.rps))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  nginx  {rb:>9.0} req/s   mean {mb:>6.2} ms   p99 {pb:>6.2} ms   (rounds: {})",
        b.iter()
            .map(|w| format!("{:.0}", w.rps))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  ratio  req/s {:.2}   p99 {:.2}   (failed answers: {bad})",
        ra / rb,
        pa / pb
    );
}

fn write_ok(a: &Agent, method: &str, path: &str, body: &[u8]) {
    let auth = format!("Bearer {}", a.token);
    let r = a
        .api(method, path, &[("Authorization", &auth)], body, None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The ready replica of `app` as `a` reports it: its node and IP.
fn ready(a: &Agent, app: &str) -> Option<(String, String)> {
    let tasks = a.get("/v1/tasks").ok()?.json();
    let t = tasks
        .as_array()?
        .iter()
        .find(|t| t["app"] == app && t["ready"] == true)?
        .clone();
    Some((
        t["node"].as_str()?.to_string(),
        t["ip"].as_str()?.to_string(),
    ))
}

fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() {
    shoal_e2e::netns::require_root();
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let secs = env("SHOAL_BENCH_SECS", 10);
    let rounds = env("SHOAL_BENCH_RUNS", 3) as usize;
    use_release_bin();
    let (tag, archive) = upstream_image();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = shoal_e2e::docker::Cleanup::for_agents_in(root.path());
    let mut n1 = Agent::configure(root.path(), "n1", &[], "[docker]\nenabled = true\n");
    let mut n2 = Agent::configure(root.path(), "n2", &[], "[docker]\nenabled = false\n");
    let ports = [n1.api_port, n2.api_port];
    n1.set_peers(&ports);
    n2.set_peers(&ports);
    n1.spawn();
    n2.spawn();
    write_ok(&n1, "POST", "/v1/images", &std::fs::read(&archive).unwrap());
    let spec = format!(
        "name = \"bench\"\n[source]\nimage = \"{tag}\"\n[run]\ncommand = [\"/usr/sbin/nginx\", \"-c\", \"/etc/nginx/bench.conf\"]\nport = 8080\n"
    );
    write_ok(&n1, "PUT", "/v1/apps/bench", spec.as_bytes());
    let (_, ip) = until("the upstream ready", || ready(&n1, "bench"));
    let upstream = format!("{ip}:8080");
    let host = "bench.localhost";
    until("the ingress routing to it", || {
        (wrk(n1.http_port, host, "/small", 1, 1).rps > 0.0
            && wrk(n2.http_port, host, "/small", 1, 1).rps > 0.0)
            .then_some(())
    });
    let (np, nh2) = (free_port(), free_port());
    let _nginx = NginxProxy::start(&upstream, np, nh2);
    let direct = wrk_direct(&upstream, secs);
    println!(
        "ingress vs nginx as a reverse proxy, same upstream (nginx container), {secs} s per \
         measurement, median of {rounds} alternating rounds, 2 cores shared by client, proxy and upstream"
    );
    println!("upstream alone: {:.0} req/s (wrk -c64, /small)", direct.rps);
    for (what, path) in [
        ("HTTP/1.1 keep-alive, wrk -t2 -c64, 17-byte body", "/small"),
        ("HTTP/1.1 keep-alive, wrk -t2 -c64, 64 KiB body", "/64k"),
    ] {
        compare(
            what,
            rounds,
            || wrk(n1.http_port, host, path, 64, secs),
            || wrk(np, host, path, 64, secs),
        );
    }
    compare(
        "HTTP/2 h2c, h2load -c64 -m10, 17-byte body (p99: not reported by h2load)",
        rounds,
        || h2load(n1.http_port, host, "/small", secs),
        || h2load(nh2, host, "/small", secs),
    );

    // One client in turn: the replica's node vs a node that passes the request on.
    let local = wrk(n1.http_port, host, "/small", 1, secs);
    let remote = wrk(n2.http_port, host, "/small", 1, secs);
    println!("one connection, sequential requests (wrk -c1):");
    println!(
        "  via the replica's node      mean {:>6.3} ms   p99 {:>6.3} ms   {:>7.0} req/s",
        local.mean_ms, local.p99_ms, local.rps
    );
    println!(
        "  via another node (hop)      mean {:>6.3} ms   p99 {:>6.3} ms   {:>7.0} req/s",
        remote.mean_ms, remote.p99_ms, remote.rps
    );
    println!(
        "  extra latency of the hop    mean {:>6.3} ms   p99 {:>6.3} ms",
        remote.mean_ms - local.mean_ms,
        remote.p99_ms - local.p99_ms
    );
    let hop64 = wrk(n2.http_port, host, "/small", 64, secs);
    println!(
        "  via another node, wrk -c64  {:>7.0} req/s   p99 {:.2} ms",
        hop64.rps, hop64.p99_ms
    );
    write_ok(&n1, "DELETE", "/v1/apps/bench", b"");
    drop(n2);
    drop(n1);
}

/// The upstream asked directly (no proxy), for scale.
fn wrk_direct(upstream: &str, secs: u64) -> Wrk {
    let (ip, port) = upstream.split_once(':').unwrap();
    let out = run(Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{}s", secs.min(5)), "--latency"])
        .arg(format!("http://{ip}:{port}/small")));
    let mut w = Wrk::default();
    for l in out.lines() {
        if let ["Requests/sec:", v] = l.split_whitespace().collect::<Vec<_>>().as_slice() {
            w.rps = v.parse().unwrap_or(0.0);
        }
    }
    w
}
