//! The agent's configuration: one typed value, parsed from text (TOML for `--config`, JSON for
//! init's `/run/shoal/node.json`), validated once, then passed by reference.

use crate::membership::MembershipConfig;
use crate::node::NodeConfig;
use crate::store::NodeId;
use crate::sync::SyncConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    pub status: SocketAddr,
    pub api: SocketAddr,
    pub http: SocketAddr,
    pub https: SocketAddr,
    /// Connections each listener holds at most; beyond, new ones are shed (503 in the clear).
    pub max_connections: usize,
    /// A connection that moves no byte this long, with no request in hand, is closed.
    pub idle_timeout_ms: u64,
}

impl Default for Listen {
    fn default() -> Self {
        let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
        Listen {
            status: any(7070),
            api: any(7443),
            http: any(80),
            https: any(443),
            max_connections: 4096,
            idle_timeout_ms: 30_000,
        }
    }
}

/// `[ingress]`: the front door on `listen.http`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ingress {
    /// Apps answer to `<app>.<domain>` besides their `expose.hosts`. The default,
    /// `localhost`, resolves to this machine in curl and browsers (RFC 6761): on a node
    /// started by `qemu/run`, `http://APP.localhost:8080/`.
    pub domain: String,
    /// The largest request body passed to an app (413 beyond).
    pub max_body_bytes: u64,
    /// How long a replica has to start its answer (504 after).
    pub answer_timeout_ms: u64,
    /// An upgraded connection (WebSocket) that moves no byte either way this long is closed.
    pub tunnel_idle_timeout_ms: u64,
    /// Load balancers in front (addresses or CIDR blocks) whose connections to the ingress
    /// start with a PROXY protocol header (v1 or v2): the client's address is taken from it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_protocol_from: Vec<String>,
}

impl Ingress {
    /// `proxy_protocol_from`, parsed.
    pub fn proxy_sources(&self) -> Result<Vec<ipnet::IpNet>, String> {
        self.proxy_protocol_from
            .iter()
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        format!(
                            "ingress.proxy_protocol_from: {s:?} is not an address or a CIDR block"
                        )
                    })
            })
            .collect()
    }
}

impl Default for Ingress {
    fn default() -> Self {
        Ingress {
            domain: "localhost".into(),
            max_body_bytes: 64 << 20,
            answer_timeout_ms: 60_000,
            tunnel_idle_timeout_ms: 300_000,
            proxy_protocol_from: Vec::new(),
        }
    }
}

/// `[autoscale]`: how often each node's ingress load goes to the store, and the apps this
/// node owns are sized from the cluster's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Autoscale {
    pub interval_ms: u64,
}

impl Default for Autoscale {
    fn default() -> Self {
        Autoscale { interval_ms: 5_000 }
    }
}

/// `[acme]`: the CA that certifies the hosts of apps with `[expose] acme = true`
/// (RFC 8555). Every node should say the same: whichever is the host's owner orders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Acme {
    /// The CA's directory URL (https). Enabling `acme` on an app agrees to its terms.
    pub directory: String,
    /// Contact URIs for the account (`mailto:ops@example.com`).
    pub contact: Vec<String>,
    /// PEM roots the directory's TLS is checked against; default: Mozilla's (webpki-roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// A certificate is renewed once less than this much of its life is left, or a third of
    /// it for short-lived ones.
    pub renew_before_days: u64,
    /// How often the owner looks for certificates to order (besides when apps change).
    pub check_interval_ms: u64,
    /// How long an order may take, from the new order to the certificate.
    pub order_timeout_ms: u64,
}

impl Default for Acme {
    fn default() -> Self {
        Acme {
            directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
            contact: Vec::new(),
            ca: None,
            renew_before_days: 30,
            check_interval_ms: 3_600_000,
            order_timeout_ms: 120_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Docker {
    pub socket: PathBuf,
    /// Whether this node runs containers. A node that does not still replicates, routes and
    /// answers; the scheduler places nothing on it.
    pub enabled: bool,
    /// How often the executor looks at the containers even when nothing in the store changed
    /// (crashed containers, images loaded since, members gone).
    pub reconcile_ms: u64,
    /// The largest image archive `POST /v1/images` takes (bytes).
    pub max_image_bytes: u64,
    /// How long an image this node pulled or fetched stays once no version of any app needs
    /// it (images an operator loaded stay).
    pub image_grace_ms: u64,
    /// How long a replica leaving (replaced, scaled away, moved) may finish the requests it
    /// has in flight, out of the routes, before it is stopped anyway.
    pub drain_timeout_ms: u64,
}

impl Default for Docker {
    fn default() -> Self {
        Docker {
            socket: "/var/run/docker.sock".into(),
            enabled: true,
            reconcile_ms: 2000,
            max_image_bytes: crate::executor::docker::DEFAULT_MAX_IMAGE_BYTES,
            image_grace_ms: 600_000,
            drain_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Discovery {
    pub mdns: bool,
    /// How often static peers and DNS names are tried again.
    pub retry_join_ms: u64,
    /// How long mDNS looks for members before this node starts the cluster alone.
    pub mdns_window_ms: u64,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            mdns: true,
            retry_join_ms: 5_000,
            mdns_window_ms: 3_000,
        }
    }
}

/// Where the cluster bundle comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BundleSource {
    Dir(PathBuf),
    /// Written to `<state_dir>/bundle` at every start (secrets 0600), then used from there.
    Inline(Box<crate::identity::Bundle>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Default: derived from /etc/machine-id.
    pub node_id: Option<String>,
    pub state_dir: PathBuf,
    /// The cluster bundle: a directory (`shoal gen cluster`), or the bundle itself inline (as
    /// in user-data's `shoal:` key). Default: `<state_dir>/bundle`.
    pub bundle: Option<BundleSource>,
    /// `host:port` of peers to join; DNS names are resolved again on every try.
    pub peers: Vec<String>,
    /// The `host:port` peers reach this node's API at. Default: the API listen address, or
    /// the first non-loopback address when that is unspecified.
    pub advertise: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub listen: Listen,
    pub docker: Docker,
    pub ingress: Ingress,
    pub autoscale: Autoscale,
    pub acme: Acme,
    pub discovery: Discovery,
    pub sync: SyncConfig,
    pub membership: MembershipConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node_id: None,
            state_dir: "/var/lib/shoal".into(),
            bundle: None,
            peers: Vec::new(),
            advertise: None,
            labels: BTreeMap::new(),
            listen: Listen::default(),
            docker: Docker::default(),
            ingress: Ingress::default(),
            autoscale: Autoscale::default(),
            acme: Acme::default(),
            discovery: Discovery::default(),
            sync: SyncConfig::default(),
            membership: MembershipConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid config: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("invalid node config: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AgentConfig {
    pub fn from_toml(text: &str) -> Result<AgentConfig, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_json(text: &str) -> Result<AgentConfig, ConfigError> {
        let cfg: AgentConfig = serde_json::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a config file: JSON if it ends in `.json`, TOML otherwise.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        if path.extension().is_some_and(|e| e == "json") {
            AgentConfig::from_json(&text)
        } else {
            AgentConfig::from_toml(&text)
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.node_id {
            NodeId::new(id).map_err(|e| ConfigError::Invalid(format!("node_id: {e}")))?;
        }
        for p in &self.peers {
            if p.rsplit_once(':')
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .is_none()
            {
                return Err(ConfigError::Invalid(format!("peer {p:?} is not host:port")));
            }
        }
        if self.docker.reconcile_ms < 100 {
            return Err(ConfigError::Invalid(
                "docker.reconcile_ms must be at least 100".into(),
            ));
        }
        if self.docker.socket.to_str().is_none() {
            return Err(ConfigError::Invalid("docker.socket must be UTF-8".into()));
        }
        let d = &self.ingress.domain;
        if crate::ingress::routes::normalize(d).as_ref() != Some(d) || d.contains(':') {
            return Err(ConfigError::Invalid(format!(
                "ingress.domain {d:?}: a lowercase DNS name (apps answer to <app>.<domain>)"
            )));
        }
        if self.sync.fanout == 0 {
            return Err(ConfigError::Invalid(
                "sync.fanout must be at least 1".into(),
            ));
        }
        self.ingress.proxy_sources().map_err(ConfigError::Invalid)?;
        if !self.acme.directory.starts_with("https://")
            || self.acme.directory.parse::<hyper::Uri>().is_err()
        {
            return Err(ConfigError::Invalid(format!(
                "acme.directory {:?}: an https:// URL",
                self.acme.directory
            )));
        }
        if let Some(c) = self.acme.contact.iter().find(|c| !c.contains(':')) {
            return Err(ConfigError::Invalid(format!(
                "acme.contact {c:?}: a URI such as mailto:ops@example.com"
            )));
        }
        if self.acme.check_interval_ms < 1000 || self.acme.order_timeout_ms < 1000 {
            return Err(ConfigError::Invalid(
                "acme.check_interval_ms and acme.order_timeout_ms: at least 1000".into(),
            ));
        }
        if self.membership.probe_rtt_ms >= self.membership.probe_period_ms {
            return Err(ConfigError::Invalid(
                "membership.probe_rtt_ms must be below membership.probe_period_ms".into(),
            ));
        }
        Ok(())
    }

    pub fn node_config(&self) -> NodeConfig {
        NodeConfig {
            sync: self.sync.clone(),
            membership: self.membership.clone(),
        }
    }

    pub fn bundle_dir(&self) -> PathBuf {
        match &self.bundle {
            Some(BundleSource::Dir(d)) => d.clone(),
            Some(BundleSource::Inline(_)) | None => self.state_dir.join("bundle"),
        }
    }

    /// The node id: configured, or derived from the machine id.
    pub fn resolve_node_id(&self, machine_id: Option<&str>) -> Result<NodeId, ConfigError> {
        if let Some(id) = &self.node_id {
            return NodeId::new(id).map_err(|e| ConfigError::Invalid(e.to_string()));
        }
        let mid = machine_id
            .map(str::trim)
            .filter(|m| m.len() >= 8)
            .ok_or_else(|| {
                ConfigError::Invalid(
                    "no node_id configured and no /etc/machine-id to derive one from".into(),
                )
            })?;
        NodeId::new(&format!("node-{}", &mid[..12.min(mid.len())]))
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let cfg = AgentConfig::from_toml(
            r#"
node_id = "n1"
state_dir = "/var/lib/shoal"
bundle = "/var/lib/shoal/bundle"
peers = ["10.0.0.2:7443", "shoal.example.internal:7443"]
labels = { zone = "a" }
[listen]
status = "0.0.0.0:7070"
api = "0.0.0.0:7443"
http = "0.0.0.0:80"
https = "0.0.0.0:443"
[docker]
socket = "/var/run/docker.sock"
[discovery]
mdns = true
"#,
        )
        .unwrap();
        assert_eq!(cfg.node_id.as_deref(), Some("n1"));
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(cfg.labels["zone"], "a");
        assert_eq!(cfg.listen.status.port(), 7070);
    }

    #[test]
    fn every_key_has_a_default() {
        let cfg = AgentConfig::from_toml("").unwrap();
        assert_eq!(cfg.listen.api.port(), 7443);
        assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/shoal"));
        assert_eq!(cfg.bundle_dir(), PathBuf::from("/var/lib/shoal/bundle"));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = AgentConfig::from_toml("node_idd = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("node_idd"), "{e}");
        let e = AgentConfig::from_toml("[listen]\nstatuss = \"0.0.0.0:1\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("statuss"), "{e}");
        let e = AgentConfig::from_json(r#"{"peerz": []}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("peerz"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(AgentConfig::from_toml("node_id = \"a b\"").is_err());
        assert!(AgentConfig::from_toml("peers = [\"nohost\"]").is_err());
        assert!(AgentConfig::from_toml("[listen]\napi = \"nope\"").is_err());
        for d in [
            "bad domain",
            "Example.com",
            "10.0.0.1",
            "a..b",
            "x.com:80",
            "",
        ] {
            let e = AgentConfig::from_toml(&format!("[ingress]\ndomain = {d:?}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("ingress.domain"), "{d}: {e}");
        }
        assert!(AgentConfig::from_toml("[ingress]\ndomain = \"apps.example.com\"").is_ok());
        let e = AgentConfig::from_toml("[ingress]\nproxy_protocol_from = [\"10.0.0.0/8\", \"lb\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy_protocol_from: \"lb\""), "{e}");
        let c = AgentConfig::from_toml(
            "[ingress]\nproxy_protocol_from = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]",
        )
        .unwrap();
        assert_eq!(c.ingress.proxy_sources().unwrap().len(), 3);
        assert!(
            AgentConfig::from_toml("[membership]\nprobe_rtt_ms = 900\nprobe_period_ms = 500")
                .is_err()
        );
        for (acme, says) in [
            ("directory = \"http://ca/dir\"", "acme.directory"),
            ("directory = \"https://\"", "acme.directory"),
            ("contact = [\"ops@example.com\"]", "acme.contact"),
            ("check_interval_ms = 5", "acme.check_interval_ms"),
        ] {
            let e = AgentConfig::from_toml(&format!("[acme]\n{acme}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{acme}: {e}");
        }
        let c = AgentConfig::from_toml(
            "[acme]\ndirectory = \"https://127.0.0.1:14000/dir\"\ncontact = [\"mailto:ops@example.com\"]\nca = \"/etc/ca.pem\"",
        )
        .unwrap();
        assert_eq!(c.acme.renew_before_days, 30);
        // The CA file is read when the agent starts: one that is not there stops it, named.
        let e = crate::ingress::acme::Acme::new(&c.acme).err().unwrap();
        assert!(e.contains("acme.ca /etc/ca.pem"), "{e}");
    }

    #[test]
    fn node_id_derives_from_machine_id() {
        let cfg = AgentConfig::default();
        assert_eq!(
            cfg.resolve_node_id(Some("0123456789abcdef0123456789abcdef\n"))
                .unwrap()
                .as_str(),
            "node-0123456789ab"
        );
        assert!(cfg.resolve_node_id(None).is_err());
    }

    #[test]
    fn user_data_shoal_key_is_a_valid_node_json() {
        // What init writes to node.json: the `shoal:` mapping of `shoal gen cluster`'s
        // user-data, as JSON.
        let b = crate::identity::Bundle::generate("c", 1).unwrap();
        for signer in [false, true] {
            let ud = b.user_data(&["10.0.0.2:7443".into()], signer);
            let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&ud).unwrap();
            let json = serde_json::to_string(&doc["shoal"]).unwrap();
            let cfg = AgentConfig::from_json(&json).unwrap();
            let given = b.for_node(signer);
            assert!(matches!(&cfg.bundle, Some(BundleSource::Inline(inline)) if **inline == given));
        }
        let ud = b.user_data(&["10.0.0.2:7443".into()], false);
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&ud).unwrap();
        let cfg = AgentConfig::from_json(&serde_json::to_string(&doc["shoal"]).unwrap()).unwrap();
        assert_eq!(cfg.bundle_dir(), PathBuf::from("/var/lib/shoal/bundle"));
        assert_eq!(cfg.peers, vec!["10.0.0.2:7443".to_string()]);
        let dir: AgentConfig = AgentConfig::from_json(r#"{"bundle": "/b"}"#).unwrap();
        assert_eq!(dir.bundle_dir(), PathBuf::from("/b"));
    }
}
