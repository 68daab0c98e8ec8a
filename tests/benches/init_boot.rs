//! shoal-init's figures for BENCHMARKS.md, with the image's binary (`--profile pid1`) as PID 1 of fresh PID,
//! mount and network namespaces (test mode, scratch root): a NoCloud seed on a loop device
//! (user-data from `shoal gen cluster`, a static network-config v2), a blank data disk that is
//! found by label after the first boot, and a service table whose last service stands in for
//! the agent (ready at once), so the figure is init's own userspace time.
//! - time from init start to the "agent" started, split by stage (median of 5 boots);
//! - init's RSS once booted; the binary's size.
//!
//! Needs root. `cargo bench -p shoal-e2e --bench init_boot`

use shoal_e2e::netns::Lan;
use shoal_e2e::pid1::{Loop, Pid1};
use shoal_e2e::wait_for;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const SERVICES: &str = r#"
[[service]]
name = "containerd"
command = ["/bin/sh", "-c", "touch $SHOAL_INIT_ROOT/run/containerd.sock; exec sleep 1000"]
ready = "/run/containerd.sock"
[[service]]
name = "dockerd"
after = "containerd"
command = ["/bin/sh", "-c", "touch $SHOAL_INIT_ROOT/run/docker.sock; exec sleep 1000"]
ready = "/run/docker.sock"
[[service]]
name = "agent"
after = "dockerd"
command = ["/bin/sleep", "1000"]
"#;

fn build_init() -> PathBuf {
    shoal_e2e::workspace_bin("shoal-init", "shoal-init", "pid1")
}

fn main() {
    let init = build_init();
    let size = std::fs::metadata(&init).unwrap().len();
    let dir = tempfile::tempdir().unwrap();
    let b = shoal_e2e::bundle(&dir.path().join("bundle"), "bench");
    std::fs::write(
        dir.path().join("meta-data"),
        "instance-id: iid-bench\nlocal-hostname: bench\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("network-config"), "version: 2\nethernets:\n  eth0:\n    addresses: [10.82.0.7/24]\n    routes: [{to: default, via: 10.82.0.1}]\n").unwrap();
    let seed = dir.path().join("seed.img");
    assert!(Command::new("cloud-localds")
        .arg("-N")
        .arg(dir.path().join("network-config"))
        .arg(&seed)
        .arg(b.join("user-data.yaml"))
        .arg(dir.path().join("meta-data"))
        .status()
        .unwrap()
        .success());
    let data = dir.path().join("data.img");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let (seed_dev, data_dev) = (Loop::new(&seed), Loop::new(&data));
    let disks = format!("{},{}", seed_dev.0, data_dev.0);
    let table = dir.path().join("services.toml");
    std::fs::write(&table, SERVICES).unwrap();

    let mut lan = Lan::new(0);
    let ns = lan.add_bare_host().ns.clone();
    let mut totals = Vec::new();
    let mut per_stage: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let mut rss = 0;
    let mut rollup = String::new();
    for run in 0..6 {
        let root = dir.path().join(format!("root{run}"));
        std::fs::create_dir_all(&root).unwrap();
        let mut pid1 = Pid1::spawn(
            &init,
            Some(&ns),
            &root,
            &table,
            &[
                ("SHOAL_INIT_NET_IFACES", "eth0"),
                ("SHOAL_INIT_DISKS", &disks),
            ],
            None,
        );
        let pid = pid1.pid();
        let report: serde_json::Value =
            wait_for(Duration::from_secs(30), "the agent started", || {
                let r = pid1.report();
                let agent = r["services"]
                    .as_array()?
                    .iter()
                    .find(|s| s["name"] == "agent")?
                    .clone();
                agent["started_ms"].as_u64().map(|_| r)
            });
        rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.split_whitespace().next().unwrap().parse::<u64>().unwrap())
            })
            .unwrap();
        rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.starts_with("Shared_Clean")
                    || l.starts_with("Private_Clean")
                    || l.starts_with("Private_Dirty")
                    || l.starts_with("Anonymous")
            })
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join(", ");
        let start = report["started_ms"].as_u64().unwrap();
        let agent = report["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "agent")
            .unwrap()["started_ms"]
            .as_u64()
            .unwrap();
        // The first boot formats the data disk; the figures are for the boots after it.
        if run > 0 {
            totals.push(agent - start);
            for s in report["stages"].as_array().unwrap() {
                per_stage
                    .entry(s["name"].as_str().unwrap().to_string())
                    .or_default()
                    .push(s["ended_ms"].as_u64().unwrap() - s["started_ms"].as_u64().unwrap());
            }
        }
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = pid1.unshare.wait();
    }
    let median = |v: &mut Vec<u64>| {
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "shoal-init binary (profile pid1): {} bytes ({:.2} MiB)",
        size,
        size as f64 / 1048576.0
    );
    println!(
        "init start -> agent started: median {} ms over {} boots (each: {:?})",
        median(&mut totals.clone()),
        totals.len(),
        totals
    );
    for (name, mut v) in per_stage {
        println!("  stage {name}: median {} ms", median(&mut v));
    }
    println!("init RSS after boot: {rss} KiB ({rollup})");
}
