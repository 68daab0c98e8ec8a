//! The real `shoal` binary as agent processes: bundles, configs, the `Agent` fixture, clusters
//! of them, client certificates.

use anyhow::Result;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{curl, free_port, get, netns, shoal_bin, wait_for, ClientCert, Resp};
use shoal::config::{AgentConfig, BundleSource};

/// The id of the cluster whose bundle is in `bundle` (its `cluster.json`).
pub fn cluster_id(bundle: &Path) -> String {
    let b = std::fs::read_to_string(bundle.join("cluster.json")).unwrap();
    serde_json::from_str::<Value>(&b).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A cluster bundle made by the real CLI (`shoal gen cluster`) in `dir`, unless one is there.
/// The `shoal` CLI run with `args`: (success, stdout, stderr).
pub fn shoal_cli(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(shoal_bin())
        .args(args)
        .env_remove("SHOAL_ADDR")
        .env_remove("SHOAL_TOKEN")
        .env_remove("SHOAL_BUNDLE")
        .env_remove("SHOAL_CA")
        .output()
        .expect("running shoal");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

pub fn bundle(dir: &Path, name: &str) -> PathBuf {
    if !dir.join("ca.key").exists() {
        let out = Command::new(shoal_bin())
            .args(["gen", "cluster", "--name", name, "--out"])
            .arg(dir)
            .output()
            .expect("running shoal gen cluster");
        assert!(
            out.status.success(),
            "shoal gen cluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir.to_path_buf()
}

/// A `shoal agent` process with its own state directory and ports.
/// An agent's configuration, built as the agent's own `AgentConfig` and written as TOML: a
/// setting a test gets wrong (a typo, a wrong type) fails here and says which, instead of an
/// agent that exits at start. Defaults for tests: loopback listeners on free ports, no mDNS,
/// static peers retried every 500 ms, no containers (agents share the host's dockerd), the
/// bundle in `root/bundle` (made on first use). `extra` is TOML merged over all of that.
pub struct AgentBuilder {
    root: PathBuf,
    id: String,
    bundle: Option<PathBuf>,
    cfg: AgentConfig,
    ports: (u16, u16),
    netns: Option<String>,
    extra: Vec<String>,
}

impl AgentBuilder {
    pub fn new(root: &Path, id: &str) -> AgentBuilder {
        let (status, api) = (free_port(), free_port());
        let mut cfg = AgentConfig {
            node_id: Some(id.into()),
            state_dir: root.join(id),
            ..AgentConfig::default()
        };
        cfg.listen.status = ([127, 0, 0, 1], status).into();
        cfg.listen.api = ([127, 0, 0, 1], api).into();
        cfg.listen.http = ([127, 0, 0, 1], free_port()).into();
        cfg.listen.https = ([127, 0, 0, 1], free_port()).into();
        cfg.discovery.mdns = false;
        cfg.discovery.retry_join_ms = 500;
        cfg.docker.enabled = false;
        AgentBuilder {
            root: root.to_path_buf(),
            id: id.into(),
            bundle: None,
            cfg,
            ports: (status, api),
            netns: None,
            extra: Vec::new(),
        }
    }

    /// Peers by the API ports of agents on loopback.
    pub fn peers(self, ports: &[u16]) -> AgentBuilder {
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        self.peer_addrs(&addrs)
    }

    pub fn peer_addrs(mut self, addrs: &[String]) -> AgentBuilder {
        self.cfg.peers = addrs.to_vec();
        self
    }

    pub fn bundle(mut self, dir: &Path) -> AgentBuilder {
        self.bundle = Some(dir.to_path_buf());
        self
    }

    /// In network namespace `host.ns`: every address, the standard ports, mDNS on.
    pub fn in_netns(mut self, host: &netns::Host) -> AgentBuilder {
        self.cfg.listen.status = ([0, 0, 0, 0], 7070).into();
        self.cfg.listen.api = ([0, 0, 0, 0], 7443).into();
        self.cfg.listen.http = ([0, 0, 0, 0], 80).into();
        self.cfg.listen.https = ([0, 0, 0, 0], 443).into();
        self.ports = (7070, 7443);
        self.cfg.discovery.mdns = true;
        self.cfg.discovery.retry_join_ms = 1000;
        self.netns = Some(host.ns.clone());
        self
    }

    /// TOML merged over the configuration (tables merge key by key).
    pub fn extra(mut self, toml_text: &str) -> AgentBuilder {
        if !toml_text.trim().is_empty() {
            self.extra.push(toml_text.to_string());
        }
        self
    }

    /// Writes `root/id/agent.toml`; the agent is not started.
    pub fn build(mut self) -> Agent {
        let bundle = self
            .bundle
            .clone()
            .unwrap_or_else(|| crate::agent::bundle(&self.root.join("bundle"), "test"));
        self.cfg.bundle = Some(BundleSource::Dir(bundle.clone()));
        let mut value = toml::Value::try_from(&self.cfg).expect("the config serializes");
        for e in &self.extra {
            let over: toml::Value = toml::from_str(e)
                .unwrap_or_else(|err| panic!("agent {}: extra settings {e:?}: {err}", self.id));
            merge(&mut value, over);
        }
        let cfg: AgentConfig = value
            .try_into()
            .unwrap_or_else(|err| panic!("agent {}: not a valid agent config: {err}", self.id));
        let dir = self.root.join(&self.id);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("agent.toml");
        std::fs::write(&config, toml::to_string(&cfg).unwrap()).unwrap();
        let token = std::fs::read_to_string(bundle.join("admin.token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        Agent {
            id: self.id,
            dir,
            status_port: cfg.listen.status.port(),
            api_port: cfg.listen.api.port(),
            http_port: cfg.listen.http.port(),
            https_port: cfg.listen.https.port(),
            token,
            bundle,
            netns: self.netns,
            config,
            child: None,
            env: Vec::new(),
        }
    }
}

/// `over` into `base`, table by table.
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

pub struct Agent {
    pub id: String,
    pub dir: PathBuf,
    pub status_port: u16,
    pub api_port: u16,
    /// The ingress.
    pub http_port: u16,
    /// The ingress's TLS port (`listen.https`).
    pub https_port: u16,
    pub token: String,
    pub bundle: PathBuf,
    /// The network namespace the agent runs in, if any.
    pub netns: Option<String>,
    config: PathBuf,
    child: Option<Child>,
    /// Extra environment for the agent process (e.g. libfaketime's).
    pub env: Vec<(String, String)>,
}

impl Agent {
    /// Writes the config and starts the agent. `peers` are API ports of other agents.
    pub fn start(root: &Path, id: &str, peers: &[u16], extra: &str) -> Agent {
        let mut a = Agent::configure(root, id, peers, extra);
        a.spawn();
        a
    }

    /// Writes the config without starting the agent; the agent uses the cluster bundle in
    /// `root/bundle`, made on first use.
    pub fn configure(root: &Path, id: &str, peers: &[u16], extra: &str) -> Agent {
        AgentBuilder::new(root, id)
            .peers(peers)
            .extra(extra)
            .build()
    }

    /// Like `configure`, with the bundle directory given (a bundle, or a join secret alone).
    pub fn configure_with_bundle(
        root: &Path,
        id: &str,
        peers: &[u16],
        bundle: &Path,
        extra: &str,
    ) -> Agent {
        AgentBuilder::new(root, id)
            .peers(peers)
            .bundle(bundle)
            .extra(extra)
            .build()
    }

    /// Like `configure_with_bundle`, with `listen` lines added to the `[listen]` table.
    pub fn configure_listen(
        root: &Path,
        id: &str,
        peers: &[u16],
        bundle: &Path,
        extra: &str,
        listen: &str,
    ) -> Agent {
        AgentBuilder::new(root, id)
            .peers(peers)
            .bundle(bundle)
            .extra(extra)
            .extra(&format!("[listen]\n{listen}"))
            .build()
    }

    /// An agent in network namespace `host.ns`, listening on every address with the standard
    /// ports, discovering its peers over mDNS (no peer list) unless `peers` are given.
    pub fn configure_in(
        host: &netns::Host,
        root: &Path,
        id: &str,
        bundle: &Path,
        peers: &[String],
    ) -> Agent {
        AgentBuilder::new(root, id)
            .bundle(bundle)
            .peer_addrs(peers)
            .in_netns(host)
            .build()
    }

    /// Ids of the members this agent sees alive.
    pub fn alive_ids(&self) -> Vec<String> {
        self.status()["members"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter(|m| m["state"] == "alive")
                    .filter_map(|m| m["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Rewrites the peer list (used when a peer's port is only known after it started).
    pub fn set_peers(&mut self, peers: &[u16]) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let list: Vec<String> = peers.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("peers = ") {
                    format!("peers = [{}]", list.join(", "))
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&self.config, text).unwrap();
    }

    /// Starts the agent and waits until `/healthz` answers.
    pub fn spawn(&mut self) {
        self.spawn_detached();
        let end = Instant::now() + Duration::from_secs(30);
        while self
            .get("/healthz")
            .ok()
            .filter(|r| r.status == 200)
            .is_none()
        {
            if Instant::now() > end {
                let running = self.is_running();
                let log = self.log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "agent {} did not answer /healthz within 30 s (running: {running}); the end of its log:\n{}",
                    self.id,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the agent without waiting for anything.
    pub fn spawn_detached(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(shoal_bin());
                c
            }
            None => Command::new(shoal_bin()),
        };
        let child = cmd
            .args(["agent", "--config"])
            .arg(&self.config)
            // SHOAL_TEST_LOG=shoal::daemon=debug,info and the like, to see more in a failure.
            .env(
                "SHOAL_LOG",
                std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting shoal agent");
        self.child = Some(child);
    }

    /// Waits for the agent to exit by itself; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let c = self.child.as_mut()?;
        let code = wait_for(limit, "the agent to exit", || c.try_wait().ok().flatten());
        self.child = None;
        code.code()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            if Instant::now() > end {
                let _ = c.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn status(&self) -> Value {
        self.get("/v1/status")
            .map(|r| r.json())
            .unwrap_or(Value::Null)
    }

    /// Members this agent sees alive.
    pub fn alive_members(&self) -> usize {
        self.status()["members"]
            .as_array()
            .map(|m| m.iter().filter(|m| m["state"] == "alive").count())
            .unwrap_or(0)
    }

    /// An HTTPS request to this agent's API port, verified against the cluster CA.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        client: Option<ClientCert<'_>>,
    ) -> Result<Resp> {
        curl(
            self.netns.as_deref(),
            method,
            &format!("https://127.0.0.1:{}{path}", self.api_port),
            headers,
            body,
            Some(&self.dir.join("tls/ca.crt")),
            client,
        )
    }

    /// A GET on this agent's status port (from inside its namespace, if it has one).
    pub fn get(&self, path: &str) -> Result<Resp> {
        match &self.netns {
            Some(ns) => curl(
                Some(ns),
                "GET",
                &format!("http://127.0.0.1:{}{path}", self.status_port),
                &[],
                b"",
                None,
                None,
            ),
            None => get(self.status_port, path),
        }
    }

    /// This agent's own certificate and key, usable as a client certificate.
    pub fn cert(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("tls/node.crt"), self.dir.join("tls/node.key"))
    }

    /// Posts a join request (its JSON) to this agent's join door; the answer's status.
    pub fn post_join(&self, request: &str) -> u16 {
        self.api(
            "POST",
            "/peer/v1/join",
            &[("Content-Type", "application/json")],
            request.as_bytes(),
            None,
        )
        .unwrap()
        .status
    }

    pub fn put_app(&self, name: &str, spec: &str) -> Result<Resp> {
        let auth = format!("Bearer {}", self.token);
        self.api(
            "PUT",
            &format!("/v1/apps/{name}"),
            &[("Authorization", &auth)],
            spec.as_bytes(),
            None,
        )
    }

    pub fn delete_app(&self, name: &str) -> Result<Resp> {
        let auth = format!("Bearer {}", self.token);
        self.api(
            "DELETE",
            &format!("/v1/apps/{name}"),
            &[("Authorization", &auth)],
            b"",
            None,
        )
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").map(|r| r.text()).unwrap_or_default()
    }

    /// A JSON listing on the status port (empty when it does not answer).
    pub fn list(&self, path: &str) -> Vec<Value> {
        self.get(path)
            .map(|r| r.json())
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// App names this agent holds.
    pub fn apps(&self) -> Vec<String> {
        self.list("/v1/apps")
            .iter()
            .filter_map(|a| a["name"].as_str().map(String::from))
            .collect()
    }

    /// The id of this agent's cluster: the `shoal.cluster` label.
    pub fn cluster_id(&self) -> String {
        cluster_id(&self.bundle)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed test shows what each of its agents said last (its directory goes).
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(60);
            let members = self
                .child
                .is_some()
                .then(|| self.status()["members"].to_string());
            eprintln!(
                "---- agent {}: members {}; last {} log lines ----",
                self.id,
                members.as_deref().unwrap_or("(not running)"),
                lines.len() - from
            );
            for l in &lines[from..] {
                eprintln!("{l}");
            }
        }
        self.kill9();
    }
}

/// Starts `n` agents that know each other as static peers.
pub fn cluster(root: &Path, n: usize) -> Vec<Agent> {
    let mut agents: Vec<Agent> = (0..n)
        .map(|i| Agent::configure(root, &format!("n{}", i + 1), &[], ""))
        .collect();
    let ports: Vec<u16> = agents.iter().map(|a| a.api_port).collect();
    for a in &mut agents {
        a.set_peers(&ports);
        a.spawn();
    }
    agents
}

/// Writes a client certificate for `cn` into `dir`: signed by `ca` (cert and key PEM files),
/// or self-signed; valid now, or expired since 2021.
pub fn client_cert(dir: &Path, cn: &str, ca: Option<&Path>, expired: bool) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["node.shoal".to_string()]).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = match ca {
        Some(ca) => {
            let ca_key =
                rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.join("ca.key")).unwrap())
                    .unwrap();
            let issuer = rcgen::Issuer::from_ca_cert_pem(
                &std::fs::read_to_string(ca.join("ca.crt")).unwrap(),
                ca_key,
            )
            .unwrap();
            p.signed_by(&key, &issuer).unwrap()
        }
        None => p.self_signed(&key).unwrap(),
    };
    let (c, k) = (dir.join(format!("{cn}.crt")), dir.join(format!("{cn}.key")));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// The resident memory of a process, in KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
