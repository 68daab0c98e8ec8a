//! The apps' side of the end-to-end tests against the host's real dockerd: what runs, as
//! Docker and the agents report it, polled with deadlines, and a guard that removes a test
//! cluster's containers.

use crate::{busybox_image, run, Agent, Resp};
use serde_json::Value;
use std::path::PathBuf;
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

/// Writes app `name`'s spec, which must be accepted; the revision it got.
pub fn put_app(a: &Agent, name: &str, spec: &str) -> String {
    let r = a.put_app(name, spec).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["revision"].as_str().unwrap().to_string()
}

/// App `app`'s state as the status port says it.
pub fn app_status(a: &Agent, app: &str) -> Value {
    a.get(&format!("/v1/apps/{app}")).unwrap().json()["status"].clone()
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
    let nodes = join(
        ["n1", "n2"]
            .iter()
            .map(|id| Agent::configure(root, id, &[], DOCKER_ON))
            .collect(),
    );
    load(&nodes[0], &busybox_image());
    nodes
}

/// Running containers on the host's dockerd, quick to react.
pub const DOCKER_ON: &str = "[docker]\nenabled = true\nreconcile_ms = 300\n";

/// Configured agents started as one cluster, each given the others as peers: once each
/// sees the others alive and every node's record.
pub fn join(mut nodes: Vec<Agent>) -> Vec<Agent> {
    let ports: Vec<u16> = nodes.iter().map(|a| a.api_port).collect();
    for a in &mut nodes {
        a.set_peers(&ports);
        a.spawn();
    }
    let all: Vec<&Agent> = nodes.iter().collect();
    let n = nodes.len();
    converge(&all, "every member and its record", || {
        nodes
            .iter()
            .all(|a| a.alive_members() == n - 1 && a.list("/v1/nodes").len() == n)
            .then_some(())
    });
    nodes
}

/// Loads an image archive into `a`'s engine.
pub fn load(a: &Agent, archive: &std::path::Path) {
    let r = write(a, "POST", "/v1/images", &std::fs::read(archive).unwrap());
    assert_eq!(r.status, 200, "{}", r.text());
}

/// One agent running containers on the host's dockerd, the test image loaded; `extra` is
/// more of its config.
pub fn one_node(root: &std::path::Path, extra: &str) -> Agent {
    let a = Agent::start(root, "n1", &[], &format!("{DOCKER_ON}{extra}"));
    load(&a, &busybox_image());
    a
}

/// A Docker engine of its own beside the host's: own data root, exec root, socket,
/// containerd namespace and default bridge, no iptables rules (its app networks are plain
/// bridges with their own address pool, `10.(200+n).0.0/16`). What it holds is what a node on
/// it holds: an agent given its socket (`[docker] socket`) has none of the host engine's
/// images. Started in a host's network namespace, it is that host's engine: its bridges and
/// containers are there, reached from the test through the host (`Lan::route`). Stopped, its
/// containers removed and its data deleted when dropped.
pub struct Engine {
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    /// Its API socket.
    pub socket: PathBuf,
    /// Its default bridge, made for it.
    bridge: String,
    /// The network namespace it runs in, if not the test's.
    netns: Option<String>,
    /// Its containerd namespace (on the host's containerd).
    containerd_ns: String,
    /// The address pool of its app networks.
    pub pool: String,
}

impl Engine {
    /// `n` picks the engine's containerd namespace and address pool (one per engine at a
    /// time).
    pub fn start(n: u8) -> Engine {
        Engine::launch(n, None)
    }

    /// An engine in `host`'s network namespace, trusting plain-HTTP registries on the LAN
    /// (`10.213.0.0/16`, where the test's end of the LAN is).
    pub fn start_in(n: u8, host: &crate::netns::Host) -> Engine {
        Engine::launch(n, Some(host.ns.clone()))
    }

    fn launch(n: u8, netns: Option<String>) -> Engine {
        // Short: the exec root holds unix sockets (108 bytes at most).
        let dir = tempfile::Builder::new()
            .prefix("e2e-dk")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        let config = if netns.is_some() {
            r#"{"insecure-registries": ["10.213.0.0/16"]}"#
        } else {
            "{}"
        };
        std::fs::write(d.join("daemon.json"), config).unwrap();
        let socket = d.join("sock");
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let containerd_ns = format!("shoal-e2e-{n}-{}", std::process::id());
        let bridge = format!("e2e-dk{n}");
        let pool = format!("10.{}.0.0/16", 200 + n);
        let ip = |args: &[&str]| {
            let mut c = Command::new("ip");
            if let Some(ns) = &netns {
                c.args(["-n", ns]);
            }
            c.args(args).output()
        };
        let _ = ip(&["link", "del", &bridge]);
        for args in [
            vec!["link", "add", &bridge, "type", "bridge"],
            vec![
                "addr",
                "add",
                &format!("10.{}.255.1/24", 200 + n),
                "dev",
                &bridge,
            ],
            vec!["link", "set", &bridge, "up"],
        ] {
            let out = ip(&args).expect("running ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Only the network namespace changes (nsenter --net, not `ip netns exec`): with a
        // mount namespace of its own, the layers dockerd mounts would not be seen by the
        // host's containerd, which starts the containers.
        let mut cmd = match &netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("dockerd");
                c
            }
            None => Command::new("dockerd"),
        };
        let child = cmd
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("root"))
            .arg("--exec-root")
            .arg(d.join("x"))
            .arg("--pidfile")
            .arg(d.join("pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            // A default bridge of its own: with none, dockerd deletes the host's docker0.
            .args(["--bridge", &bridge, "--iptables=false", "--ip6tables=false"])
            .args(["--default-address-pool"])
            .arg(format!("base={pool},size=24"))
            .args(["--containerd", "/run/containerd/containerd.sock"])
            .args(["--containerd-namespace", &containerd_ns])
            .args([
                "--containerd-plugins-namespace",
                &format!("{containerd_ns}-p"),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd (Debian's docker.io)");
        let e = Engine {
            child: Some(child),
            dir,
            socket,
            bridge,
            netns,
            containerd_ns,
            pool,
        };
        crate::wait_for(Duration::from_secs(60), "a second dockerd", || {
            e.try_docker(&["info"]).ok()
        });
        e
    }

    /// The arguments that point the docker CLI at this engine.
    pub fn host_args(&self) -> [String; 2] {
        ["-H".into(), format!("unix://{}", self.socket.display())]
    }

    fn try_docker(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("docker")
            .args(self.host_args())
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `docker ARGS` against this engine; stdout. Panics on failure.
    pub fn docker(&self, args: &[&str]) -> String {
        self.try_docker(args)
            .unwrap_or_else(|e| panic!("docker {args:?} on {}: {e}", self.socket.display()))
    }

    /// The id of the image `name` names here, if any.
    pub fn image_id(&self, name: &str) -> Option<String> {
        self.try_docker(&["image", "inspect", "--format", "{{.Id}}", name])
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Ids of this engine's containers of `app` in `cluster` (stopped ones too when `all`).
    pub fn containers(&self, cluster: &str, app: &str, all: bool) -> Vec<String> {
        let mut args = vec![
            "ps".to_string(),
            "-q".into(),
            "--no-trunc".into(),
            "--filter".into(),
            format!("label=shoal.cluster={cluster}"),
            "--filter".into(),
            format!("label=shoal.app={app}"),
        ];
        if all {
            args.push("-a".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match self.try_docker(&args) {
            Ok(out) => out.lines().map(String::from).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The `[docker]` settings of an agent on this engine.
    pub fn agent_settings(&self) -> String {
        format!(
            "[docker]\nenabled = true\nreconcile_ms = 300\nsocket = \"{}\"\n",
            self.socket.display()
        )
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// The machine dies: dockerd and every container it started are SIGKILLed at once (the
    /// containers through containerd, which outlives dockerd).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for task in self.ctr(&["tasks", "ls", "-q"]).lines() {
            self.ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", task]);
        }
    }

    fn ctr(&self, args: &[&str]) -> String {
        Command::new("ctr")
            .args(["-n", &self.containerd_ns])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Its default bridge, and the bridges of its networks (a stopped dockerd leaves them,
    /// and with them routes to its pool that would shadow another test's).
    fn remove_bridge(&self) {
        let ip = || {
            let mut c = Command::new("ip");
            if let Some(ns) = &self.netns {
                c.args(["-n", ns]);
            }
            c
        };
        let _ = ip().args(["link", "del", &self.bridge]).output();
        let prefix = format!(
            "{}.",
            self.pool.split('.').take(2).collect::<Vec<_>>().join(".")
        );
        let addrs = ip()
            .args(["-o", "-4", "addr", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for l in addrs.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if let [_, dev, "inet", addr, ..] = f.as_slice() {
                if dev.starts_with("br-") && addr.starts_with(&prefix) {
                    let _ = ip().args(["link", "del", dev]).output();
                }
            }
        }
    }

    /// What a killed engine leaves in containerd: its dead tasks and its containers.
    fn remove_leftovers(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let tasks = self.ctr(&["tasks", "ls", "-q"]);
            if tasks.trim().is_empty() || std::time::Instant::now() > deadline {
                break;
            }
            for task in tasks.lines() {
                self.ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", task]);
                self.ctr(&["tasks", "rm", "-f", task]);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for c in self.ctr(&["containers", "ls", "-q"]).lines() {
            self.ctr(&["containers", "rm", c]);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Ok(ids) = self.try_docker(&["ps", "-aq"]) {
            for id in ids.lines() {
                let _ = self.try_docker(&["rm", "-f", id]);
            }
            let _ = self.try_docker(&["network", "prune", "-f"]);
        }
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.remove_leftovers();
        self.remove_bridge();
        // Mounts a killed dockerd left (its exec root's network namespaces, layers) keep
        // the directory from being deleted.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {0}[^ ]*' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l",
                self.dir.path().display()
            ))
            .output();
    }
}
