//! The apps' side of the end-to-end tests against the host's real dockerd: what runs, as
//! Docker and the agents report it, polled with deadlines, and a guard that removes a test
//! cluster's containers.

use crate::{busybox_image, run, Agent, Resp};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

pub const CONVERGE: Duration = Duration::from_secs(60);

pub fn docker(args: &[&str]) -> String {
    run(Command::new("docker").args(args))
}

/// Ids of the containers carrying every label of `labels` (stopped ones too when `all`),
/// sorted.
pub fn labelled(labels: &[String], all: bool) -> Vec<String> {
    let mut args = vec!["ps".to_string(), "-q".into(), "--no-trunc".into()];
    for l in labels {
        args.extend(["--filter".to_string(), format!("label={l}")]);
    }
    if all {
        args.push("-a".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut ids: Vec<String> = docker(&args).lines().map(String::from).collect();
    ids.sort();
    ids
}

/// Ids of the containers of `cluster` for `app`.
pub fn containers(cluster: &str, app: &str, all: bool) -> Vec<String> {
    labelled(
        &[
            format!("shoal.cluster={cluster}"),
            format!("shoal.app={app}"),
        ],
        all,
    )
}

pub fn inspect(id: &str) -> Value {
    let v: Value = serde_json::from_str(&docker(&["inspect", id])).unwrap();
    v[0].clone()
}

pub fn tasks(a: &Agent, app: &str) -> Vec<Value> {
    a.list("/v1/tasks")
        .into_iter()
        .filter(|t| t["app"] == app)
        .collect()
}

/// Writes app `name`'s spec; the write must be accepted.
pub fn deploy(a: &Agent, name: &str, spec: &str) {
    let r = a.put_app(name, spec).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// `wait_for` that, on a timeout, shows what the agents report and log.
pub fn converge<T>(agents: &[&Agent], what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = std::time::Instant::now() + CONVERGE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if std::time::Instant::now() > end {
            let mut report = String::new();
            for a in agents {
                let log = a.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                report += &format!(
                    "\n== {} tasks: {}\n== {} log (last lines, newest first):\n{}",
                    a.id,
                    a.get("/v1/tasks").map(|r| r.text()).unwrap_or_default(),
                    a.id,
                    tail.join("\n")
                );
            }
            panic!("timed out after {CONVERGE:?} waiting for {what}{report}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn running(a: &Agent, app: &str, n: usize) -> Vec<Value> {
    converge(&[a], &format!("{n} running task(s) of {app}"), || {
        let t = tasks(a, app);
        (t.len() == n
            && t.iter()
                .all(|t| t["state"] == "running" && t["ip"].is_string()))
        .then_some(t)
    })
}

pub fn write(a: &Agent, method: &str, path: &str, body: &[u8]) -> Resp {
    let auth = format!("Bearer {}", a.token);
    a.api(method, path, &[("Authorization", &auth)], body, None)
        .unwrap()
}

/// Removes the cluster's containers when the test ends. Made before the agents, so it is
/// dropped after them: a live executor would recreate what it removes.
pub struct Cleanup(pub String);

impl Cleanup {
    /// The bundle `Agent::configure` uses under `root`, made now, and its guard.
    pub fn for_agents_in(root: &std::path::Path) -> Cleanup {
        Cleanup(crate::cluster_id(&crate::bundle(
            &root.join("bundle"),
            "test",
        )))
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=shoal.cluster={}", self.0),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for id in ids.lines() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
        // Volumes are labelled like their containers, and unused once those are gone.
        let _ = Command::new("docker")
            .args([
                "volume",
                "prune",
                "-f",
                "--filter",
                &format!("label=shoal.cluster={}", self.0),
            ])
            .output();
        let _ = Command::new("docker")
            .args([
                "network",
                "prune",
                "-f",
                "--filter",
                &format!("label=shoal.cluster={}", self.0),
            ])
            .output();
    }
}

/// Two agents on this machine's Docker, each knowing the other's record, the test image
/// loaded.
pub fn two_nodes(root: &std::path::Path) -> Vec<Agent> {
    let docker_on = "[docker]\nenabled = true\nreconcile_ms = 300\n";
    let mut nodes: Vec<Agent> = ["n1", "n2"]
        .iter()
        .map(|id| Agent::configure(root, id, &[], docker_on))
        .collect();
    let ports: Vec<u16> = nodes.iter().map(|a| a.api_port).collect();
    for a in &mut nodes {
        a.set_peers(&ports);
        a.spawn();
    }
    converge(
        &[&nodes[0], &nodes[1]],
        "two members and their records",
        || {
            nodes
                .iter()
                .all(|a| a.alive_members() == 1 && a.list("/v1/nodes").len() == 2)
                .then_some(())
        },
    );
    let tar = std::fs::read(busybox_image()).unwrap();
    assert_eq!(write(&nodes[0], "POST", "/v1/images", &tar).status, 200);
    nodes
}
