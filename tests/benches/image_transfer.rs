//! Image distribution for BENCHMARKS.md: one node holds a ~200 MiB image, two nodes on
//! Docker engines of their own lack it; the time from `PUT /v1/apps/{name}` (an app on both)
//! until both engines hold the image (fetched from the holder over mutual TLS), next to
//! `docker save | docker load` into the same two engines at once, in the same run.
//!
//! `cargo bench -p shoal-e2e --bench image_transfer` (root, dockerd running; SHOAL_BENCH_RUNS,
//! default 3; SHOAL_BENCH_MIB, default 200)

use shoal_e2e::docker::Engine;
use shoal_e2e::{busybox_image, run, use_release_bin, AgentBuilder, BUSYBOX};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIG: &str = "shoal-e2e/big:1";

/// Polls `f` every 10 ms until it holds (never longer than 10 min).
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(600);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `docker save BIG | docker -H ENGINE load`, into each engine at once.
fn save_load(engines: &[&Engine]) {
    let mut pipes = Vec::new();
    for e in engines {
        let mut save = Command::new("docker")
            .args(["save", BIG])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let load = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", e.socket.display()))
            .args(["load", "-q"])
            .stdin(save.stdout.take().unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        pipes.push((save, load));
    }
    for (mut s, mut l) in pipes {
        assert!(s.wait().unwrap().success() && l.wait().unwrap().success());
    }
}

fn main() {
    shoal_e2e::netns::require_root();
    let runs: usize = std::env::var("SHOAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mib: usize = std::env::var("SHOAL_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    use_release_bin();

    // The image: busybox and a layer of random bytes (incompressible, as real layers mostly are).
    busybox_image();
    let ctx = tempfile::tempdir().unwrap();
    run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none"])
        .arg(format!("count={mib}"))
        .arg(format!("of={}", ctx.path().join("blob").display())));
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {BUSYBOX}\nCOPY blob /blob\n"),
    )
    .unwrap();
    run(Command::new("docker")
        .args(["build", "-q", "-t", BIG])
        .arg(ctx.path()));
    let id = run(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", BIG]))
        .trim()
        .to_string();

    let root = tempfile::tempdir().unwrap();
    let _cleanup = shoal_e2e::docker::Cleanup::for_agents_in(root.path());
    let (e2, e3) = (Engine::start(2), Engine::start(3));
    let mut nodes = vec![AgentBuilder::new(root.path(), "n1")
        .extra("[docker]\nenabled = true\n")
        .build()];
    for (id, e) in [("n2", &e2), ("n3", &e3)] {
        nodes.push(
            AgentBuilder::new(root.path(), id)
                .extra(&format!(
                    "labels = {{ fetches = \"yes\" }}\n{}image_grace_ms = 100\n",
                    e.agent_settings()
                ))
                .build(),
        );
    }
    let ports: Vec<u16> = nodes.iter().map(|a| a.api_port).collect();
    for a in &mut nodes {
        a.set_peers(&ports);
        a.spawn();
    }
    let n1 = &nodes[0];
    until("three members, each with n1's image record", || {
        nodes.iter().all(|a| {
            a.alive_members() == 2
                && a.list("/v1/nodes").iter().any(|n| {
                    n["id"] == "n1"
                        && n["images"]
                            .as_array()
                            .is_some_and(|i| i.iter().any(|i| i["id"] == id.as_str()))
                })
        })
    });
    let holds = |e: &Engine| e.image_id(&id).is_some();
    let auth = format!("Bearer {}", n1.token);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let spec = format!(
            "name = \"big{i}\"\n[source]\nimage = \"{BIG}\"\n[run]\ncommand = [\"sleep\", \"3600\"]\n[scale]\nplacement = \"every-node\"\nconstraints = [\"fetches=yes\"]\n[resources]\nmemory = \"16Mi\"\n"
        );
        let t0 = Instant::now();
        let r = n1
            .api(
                "PUT",
                &format!("/v1/apps/big{i}"),
                &[("Authorization", &auth)],
                spec.as_bytes(),
                None,
            )
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        until("both engines holding the image", || {
            holds(&e2) && holds(&e3)
        });
        ours.push(t0.elapsed().as_secs_f64());
        if std::env::var("SHOAL_BENCH_VERBOSE").is_ok() {
            println!("run {i}: shoal {:.2} s", ours[i]);
        }
        let r = n1
            .api(
                "DELETE",
                &format!("/v1/apps/big{i}"),
                &[("Authorization", &auth)],
                b"",
                None,
            )
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        // The fetched copies go once no app needs them.
        until("the fetched copies removed", || !holds(&e2) && !holds(&e3));

        let t0 = Instant::now();
        save_load(&[&e2, &e3]);
        theirs.push(t0.elapsed().as_secs_f64());
        for e in [&e2, &e3] {
            e.docker(&["rmi", "-f", &id]);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (o, t) = (median(&mut ours), median(&mut theirs));
    let mb = mib as f64 * 1.048576;
    println!("image of {mib} MiB to two nodes, median of {runs} runs");
    println!(
        "  shoal (PUT -> both engines hold it)      {o:>6.2} s  ({:>5.0} MB/s to each)",
        mb / o
    );
    println!(
        "  docker save | docker load, both at once  {t:>6.2} s  ({:>5.0} MB/s to each)",
        mb / t
    );
    println!(
        "  throughput ratio shoal / docker           {:>6.2}x",
        t / o
    );
    if std::env::var("SHOAL_BENCH_VERBOSE").is_ok() {
        for a in &nodes[1..] {
            for l in a
                .log()
                .lines()
                .filter(|l| l.contains("bringing a missing image") || l.contains("image fetched"))
            {
                println!("{}: {l}", a.id);
            }
        }
    }
    let _ = run(Command::new("docker").args(["rmi", BIG]));
}
