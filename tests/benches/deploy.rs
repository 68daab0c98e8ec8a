//! Deploy latency for BENCHMARKS.md, with the release `shoal` binary and the host's dockerd:
//! from the `PUT /v1/apps/{name}` request to its container started (as the agent reports it) and
//! to its replica ready (the agent's TCP probe on its port passed, and the port answers this
//! bench), next to `docker run -d` of the same image and command in the same run, returning and
//! answering on its port; and the time from a `docker kill` to the replacement running.
//!
//! `cargo bench -p shoal-e2e --bench deploy` (root, dockerd running; SHOAL_BENCH_RUNS, default 20)

use shoal_e2e::{busybox_image, run, use_release_bin, Agent, BUSYBOX};
use std::process::Command;
use std::time::{Duration, Instant};

const CMD: [&str; 6] = ["httpd", "-f", "-p", "8080", "-h", "/www"];

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn running_ids(label: &str) -> Vec<String> {
    run(Command::new("docker").args(["ps", "-q", "--filter", &format!("label={label}")]))
        .lines()
        .map(String::from)
        .collect()
}

/// Polls `f` every millisecond until it holds (never longer than 60 s).
fn until(mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < end, "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether something accepts a TCP connection at `ip:8080`.
fn answers(ip: &str) -> bool {
    let addr: std::net::SocketAddr = format!("{ip}:8080").parse().unwrap();
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok()
}

/// The IP of a container on its (first) network.
fn ip_of(id: &str) -> String {
    run(Command::new("docker").args([
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        id,
    ]))
    .trim()
    .to_string()
}

/// `app`'s replica as the agent reports it: whether its container was started, and its IP
/// once it is ready.
fn replica(a: &Agent, app: &str) -> (bool, Option<String>) {
    let Some(tasks) = a.get("/v1/tasks").ok().map(|r| r.json()) else {
        return (false, None);
    };
    let Some(t) = tasks
        .as_array()
        .and_then(|t| t.iter().find(|t| t["app"] == app))
    else {
        return (false, None);
    };
    let ip = (t["ready"] == true)
        .then(|| t["ip"].as_str().map(String::from))
        .flatten();
    (t["container"].is_string(), ip)
}

fn curl_write(a: &Agent, method: &str, path: &str, body: &[u8]) {
    let auth = format!("Bearer {}", a.token);
    let r = a
        .api(method, path, &[("Authorization", &auth)], body, None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

fn report(what: &str, v: &mut [f64]) {
    println!(
        "{what:<44} p50 {:>7.1} ms   p90 {:>7.1} ms   max {:>7.1} ms   (n={})",
        quantile(v, 0.5),
        quantile(v, 0.9),
        quantile(v, 1.0),
        v.len()
    );
}

fn main() {
    shoal_e2e::netns::require_root();
    let runs: usize = std::env::var("SHOAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    use_release_bin();
    let archive = busybox_image();
    let root = tempfile::tempdir().unwrap();
    let a = Agent::start(root.path(), "n1", &[], "[docker]\nenabled = true\n");
    curl_write(&a, "POST", "/v1/images", &std::fs::read(archive).unwrap());
    let cluster = format!("shoal.cluster={}", a.cluster_id());

    let mut shoal_ms = Vec::new();
    let mut shoal_ready_ms = Vec::new();
    let mut docker_ms = Vec::new();
    let mut docker_answers_ms = Vec::new();
    let mut restart_ms = Vec::new();
    for i in 0..runs {
        // shoal: PUT → the container runs.
        let name = format!("bench{i}");
        let spec = format!(
            "name = \"{name}\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = {CMD:?}\nport = 8080\n"
        );
        let label = format!("shoal.app={name}");
        // Timed from the agent's own record, not `docker ps`: a CLI run every millisecond
        // would take CPU from the start it times (the `docker run` below has no such poll).
        let t0 = Instant::now();
        curl_write(&a, "PUT", &format!("/v1/apps/{name}"), spec.as_bytes());
        let mut started = None;
        until(|| {
            let (running, ip) = replica(&a, &name);
            if running && started.is_none() {
                started = Some(t0.elapsed());
            }
            ip.as_deref().is_some_and(answers)
        });
        shoal_ready_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        shoal_ms.push(started.unwrap_or_else(|| t0.elapsed()).as_secs_f64() * 1000.0);

        // The replacement of a killed container.
        let id = running_ids(&label).remove(0);
        let t0 = Instant::now();
        run(Command::new("docker").args(["kill", &id]));
        until(|| running_ids(&label).iter().any(|x| *x != id));
        restart_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        curl_write(&a, "DELETE", &format!("/v1/apps/{name}"), b"");

        // docker run -d of the same image and command, with the same options.
        let t0 = Instant::now();
        run(Command::new("docker")
            .args([
                "run",
                "-d",
                "--init",
                "--name",
                &format!("bench-docker-{i}"),
            ])
            .args([
                "--security-opt",
                "no-new-privileges:true",
                "--pids-limit",
                "4096",
            ])
            .args(["--label", "shoal.bench=1", BUSYBOX])
            .args(CMD));
        docker_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        let ip = ip_of(&format!("bench-docker-{i}"));
        until(|| answers(&ip));
        docker_answers_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        run(Command::new("docker").args(["rm", "-f", &format!("bench-docker-{i}")]));
        until(|| running_ids(&cluster).is_empty());
    }
    println!("deploy latency, {runs} runs (host dockerd, busybox httpd)");
    report("shoal: PUT /v1/apps → container started", &mut shoal_ms);
    report(
        "shoal: PUT /v1/apps → ready, port answers",
        &mut shoal_ready_ms,
    );
    report("docker run -d (returns when started)", &mut docker_ms);
    report("docker run -d → port answers", &mut docker_answers_ms);
    report("shoal: docker kill → replacement running", &mut restart_ms);
}
