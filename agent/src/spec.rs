//! The app spec (`shoal.toml`): what a user declares about an app. Parsed from text, strictly:
//! unknown keys are errors naming the key.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    pub name: String,
    /// `"service"` (the default: kept running) or `"job"` (run to completion, `[job]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
    #[serde(default)]
    pub source: Source,
    #[serde(default)]
    pub build: Build,
    #[serde(default)]
    pub run: Run,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub scale: Scale,
    #[serde(default)]
    pub update: Update,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub expose: Expose,
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub git: Option<String>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    pub image: Option<String>,
    /// The app secret holding the registry login for `image`, as `user:password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    /// What `image` named when it was deployed, by content (`sha256:<id>`, or
    /// `repo@sha256:<digest>` from its registry): set by the agent that took the spec, so every
    /// replica of a revision runs the same bytes even when the tag moves. A spec may name it
    /// itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
}

impl Source {
    /// The reference replicas run: the pinned one, else the image as named.
    pub fn run_image(&self) -> Option<&str> {
        self.pinned.as_deref().or(self.image.as_deref())
    }
}

/// An image reference as Docker reads it: with the `:latest` it assumes when it names
/// neither a tag nor a digest (pulling a bare name would fetch every tag).
pub fn tagged(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') || is_image_id(image) {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

/// Whether `s` is an image id, `sha256:<64 lowercase hex>`.
pub fn is_image_id(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Whether `s` names an image by content: an id, or `repo@sha256:<64 hex>`.
pub fn is_pinned(s: &str) -> bool {
    is_image_id(s)
        || s.split_once('@')
            .is_some_and(|(repo, d)| !repo.is_empty() && is_image_id(d))
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    pub dockerfile: Option<String>,
    #[serde(default)]
    pub test: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    #[serde(default)]
    pub command: Vec<String>,
    pub port: Option<u16>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub secrets: Vec<String>,
}

/// `[health]`: how the node that runs a replica knows it is ready for traffic, and when it
/// is so unwell it must be restarted. One of `http` (a path, GET on the replica's port: any
/// 2xx or 3xx is healthy), `tcp` (a port that accepts a connection) or `exec` (a command in
/// the container that exits 0). Without one, a replica with a `run.port` is probed by TCP on
/// it, and one without is ready once it runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub http: Option<String>,
    pub tcp: Option<u16>,
    pub exec: Option<Vec<String>>,
    /// The port `http` asks on (default `run.port`).
    pub port: Option<u16>,
    /// Between probes once ready (default "2s"; until then at most every 250 ms).
    pub interval: Option<String>,
    /// One probe's time limit (default "1s").
    pub timeout: Option<String>,
    /// Failures in this time after a start count for nothing (default "0s").
    pub start_period: Option<String>,
    /// Consecutive successes that make a replica ready (default 1).
    pub success_threshold: Option<u32>,
    /// Consecutive failures that make it unready (default 3).
    pub failure_threshold: Option<u32>,
    /// Consecutive failures that restart it, with the executor's backoff (default 10; 0:
    /// never).
    pub restart_threshold: Option<u32>,
}

/// What a probe asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    Http {
        port: u16,
        path: String,
    },
    Tcp {
        port: u16,
    },
    Exec(Vec<String>),
    /// Ready once running.
    None,
}

/// `[health]` resolved: the probe and its timing, every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    pub start_period: std::time::Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
    pub restart_threshold: u32,
}

/// `"250ms"`, `"2s"`, `"1m"`, `"1h"` (a whole number and a unit).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(std::time::Duration::from_millis(ms))
}

/// `[job]`: a replica of a job runs once to completion.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Runs again after a non-zero exit, with the restart backoff (default 3).
    pub retries: Option<u32>,
}

/// `[update]`: how a new version replaces the running one (`rollout`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// Replicas of the new version started beyond the count asked for (default 1).
    pub surge: Option<u32>,
    /// Replicas that may be short of ready while they are replaced (default 0).
    pub unavailable: Option<u32>,
    /// How long a replica of the new version may take to be ready (default "5m").
    pub deadline: Option<String>,
    /// Failures of one replica of the new version that fail the rollout (default 3).
    pub max_failures: Option<u32>,
    /// How long every new replica must have been ready before the rollout is complete: a
    /// failure until then fails it (default "5s").
    pub monitor: Option<String>,
    /// Whether a failed rollout restores the previous version (default true).
    pub rollback: Option<bool>,
}

/// `[scale]` of an app the autoscaler sizes, every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscalePolicy {
    pub min: u32,
    pub max: u32,
    pub target_rps: Option<f64>,
    pub target_inflight: Option<f64>,
    pub up_window: std::time::Duration,
    pub down_window: std::time::Duration,
    pub wake_timeout: std::time::Duration,
}

impl AutoscalePolicy {
    /// Whether the app stops when idle, and its first request wakes it.
    pub fn to_zero(&self) -> bool {
        self.min == 0
    }
}

/// `[update]` resolved, every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdatePolicy {
    pub surge: u32,
    pub unavailable: u32,
    pub deadline: std::time::Duration,
    pub max_failures: u32,
    pub monitor: std::time::Duration,
    pub rollback: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    pub replicas: Option<u32>,
    pub min: Option<u32>,
    pub max: Option<u32>,
    /// Requests a second each replica is sized for: the autoscaler keeps the app between
    /// `min` and `max` replicas at about this load (`autoscale`).
    pub target_rps: Option<f64>,
    /// Requests in flight each replica is sized for (with or instead of `target_rps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_inflight: Option<f64>,
    /// How long a higher count must be asked for before the app grows (default "0s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_window: Option<String>,
    /// How long a lower count must be asked for, and the app left unchanged, before it
    /// shrinks (default "5m").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_window: Option<String>,
    /// With `min = 0`: how long the ingress holds a request to an app scaled to zero while a
    /// replica starts (default "60s"; 503 after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_timeout: Option<String>,
    /// `"every-node"` runs one replica per node.
    pub placement: Option<String>,
    /// Node labels a node must have to run a replica: `"zone=a"`, `"disk!=hdd"`, `"gpu"`
    /// (present), `"!spot"` (absent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    /// A node label to spread replicas over: no value holds two before every value holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
}

/// One of `[scale] constraints`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    Equals(String, String),
    Differs(String, String),
    Present(String),
    Absent(String),
}

impl Constraint {
    pub fn parse(s: &str) -> Option<Constraint> {
        let label = |l: &str| {
            (!l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)))
            .then(|| l.to_string())
        };
        let value = |v: &str| {
            (v.len() <= 63 && v.bytes().all(|b| b.is_ascii_graphic())).then(|| v.to_string())
        };
        if let Some((k, v)) = s.split_once("!=") {
            return Some(Constraint::Differs(label(k)?, value(v)?));
        }
        if let Some((k, v)) = s.split_once('=') {
            return Some(Constraint::Equals(label(k)?, value(v)?));
        }
        if let Some(k) = s.strip_prefix('!') {
            return Some(Constraint::Absent(label(k)?));
        }
        Some(Constraint::Present(label(s)?))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Constraint::Equals(k, v) => labels.get(k) == Some(v),
            Constraint::Differs(k, v) => labels.get(k) != Some(v),
            Constraint::Present(k) => labels.contains_key(k),
            Constraint::Absent(k) => !labels.contains_key(k),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub cpu: Option<f64>,
    pub memory: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expose {
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Requests in the clear get a permanent redirect to `https://` (308: method and body
    /// kept), except ACME's HTTP-01 challenges.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_https: bool,
    /// Certificates for `hosts` from the cluster's ACME CA (`[acme]` in the agent config),
    /// validated over HTTP-01 on any node and renewed before they expire.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub acme: bool,
    /// Reachable only from the cluster's own apps, at `<app>.internal`: no outside name
    /// (not even `<app>.<domain>`), so no client outside the cluster reaches it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub internal: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid app spec: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("invalid app spec: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid app spec: {0}")]
    Invalid(String),
}

/// Bounds on every list and number in a spec: a spec is written once and read by every
/// node's scheduler and executor, so one spec must not stall or bloat them all.
pub const MAX_REPLICAS: u32 = 1000;
const MAX_ARGS: usize = 256;
const MAX_ARG_BYTES: usize = 4096;
const MAX_ENV: usize = 256;
const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
const MAX_SECRETS: usize = 64;
const MAX_HOSTS: usize = 64;
const MAX_VOLUMES: usize = 32;
const MAX_TARGET_RPS: f64 = 10_000_000.0;

/// Secret names are environment variable names: `API_KEY`.
pub fn valid_secret_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && !n.as_bytes()[0].is_ascii_digit()
        && n.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// App names are DNS labels: they become host names and container names.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl AppSpec {
    /// Parses TOML, or JSON when the text starts with `{`.
    pub fn parse(text: &str) -> Result<AppSpec, SpecError> {
        let spec: AppSpec = if text.trim_start().starts_with('{') {
            serde_json::from_str(text)?
        } else {
            toml::from_str(text)?
        };
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::Invalid(m));
        if !valid_name(&self.name) {
            return bad(format!(
                "name {:?}: use 1-63 lowercase letters, digits and '-'",
                self.name
            ));
        }
        match self.kind.as_deref() {
            None | Some("service") | Some("job") => {}
            Some(k) => return bad(format!("kind {k:?}: \"service\" or \"job\"")),
        }
        if self.job.is_some() && !self.is_job() {
            return bad("[job] is for kind = \"job\"".into());
        }
        if self
            .job
            .as_ref()
            .and_then(|j| j.retries)
            .is_some_and(|r| r > 100)
        {
            return bad("job.retries: at most 100".into());
        }
        if let Some(c) = &self.source.credentials {
            if !valid_secret_name(c) || self.source.image.is_none() {
                return bad(format!(
                    "source.credentials {c:?}: the name of one of the app's secrets (like REGISTRY_LOGIN), with source.image"
                ));
            }
        }
        if let Some(p) = &self.source.pinned {
            if !is_pinned(p) || self.source.image.is_none() {
                return bad(format!(
                    "source.pinned {p:?}: an image id (sha256:<64 hex>) or repo@sha256:<64 hex>, with source.image"
                ));
            }
        }
        if self.source.git.is_some() && self.source.image.is_some() {
            return bad("source: give git or image, not both".into());
        }
        self.validate_scale()?;
        self.validate_run()?;
        self.validate_health()?;
        self.validate_update()?;
        self.validate_sizes()
    }

    /// `[update]`: something may move (surge or unavailable), a deadline in bounds.
    fn validate_update(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::Invalid(m));
        let u = &self.update;
        for (what, v) in [("surge", u.surge), ("unavailable", u.unavailable)] {
            if v.is_some_and(|n| n > MAX_REPLICAS) {
                return bad(format!("update.{what}: at most {MAX_REPLICAS}"));
            }
        }
        if u.surge == Some(0) && u.unavailable.unwrap_or(0) == 0 {
            return bad(
                "update: surge 0 needs unavailable of 1 or more, or no replica could ever be replaced"
                    .into(),
            );
        }
        let secs = std::time::Duration::from_secs;
        for (what, v, min) in [
            ("deadline", &u.deadline, secs(1)),
            ("monitor", &u.monitor, secs(0)),
        ] {
            let Some(v) = v else { continue };
            if !parse_duration(v).is_some_and(|d| d >= min && d <= secs(86_400)) {
                return bad(format!(
                    "update.{what} {v:?}: a duration like \"90s\" or \"10m\", from {min:?} to 24h"
                ));
            }
        }
        if u.max_failures.is_some_and(|n| n == 0 || n > 1000) {
            return bad("update.max_failures: from 1 to 1000".into());
        }
        Ok(())
    }

    /// `[update]` with its defaults: surge 1, unavailable 0, 5 minutes to be ready, 3
    /// failures, 5 s of watching, rollback on. `validate` has checked it.
    pub fn update_policy(&self) -> UpdatePolicy {
        let u = &self.update;
        UpdatePolicy {
            surge: u.surge.unwrap_or(1),
            unavailable: u.unavailable.unwrap_or(0),
            deadline: u
                .deadline
                .as_deref()
                .and_then(parse_duration)
                .unwrap_or(std::time::Duration::from_secs(300)),
            max_failures: u.max_failures.unwrap_or(3),
            monitor: u
                .monitor
                .as_deref()
                .and_then(parse_duration)
                .unwrap_or(std::time::Duration::from_secs(5)),
            rollback: u.rollback.unwrap_or(true),
        }
    }

    /// The revision of what the app's containers run: a hash of the spec without the parts
    /// that change no container (`[scale]`, `[update]`, `[expose]`). Containers are labelled
    /// with it, so scaling or re-applying the same spec restarts nothing, and a rollback to
    /// an earlier spec finds that spec's containers still running.
    pub fn revision(&self) -> String {
        let mut s = self.clone();
        s.scale = Scale::default();
        s.update = Update::default();
        s.expose = Expose::default();
        let bytes = serde_json::to_vec(&s).unwrap_or_default();
        let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
        d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `[scale]`: bounds and the placements there are.
    fn validate_scale(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::Invalid(m));
        if let (Some(min), Some(max)) = (self.scale.min, self.scale.max) {
            if min > max {
                return bad(format!("scale: min {min} is above max {max}"));
            }
        }
        for (what, n) in [
            ("replicas", self.scale.replicas),
            ("min", self.scale.min),
            ("max", self.scale.max),
        ] {
            if n.is_some_and(|n| n > MAX_REPLICAS) {
                return bad(format!("scale.{what}: at most {MAX_REPLICAS} replicas"));
            }
        }
        for (what, t) in [
            ("target_rps", self.scale.target_rps),
            ("target_inflight", self.scale.target_inflight),
        ] {
            if t.is_some_and(|r| !(r > 0.0 && r <= MAX_TARGET_RPS)) {
                return bad(format!(
                    "scale.{what} must be above 0 and at most {MAX_TARGET_RPS}"
                ));
            }
        }
        for (what, v) in [
            ("up_window", &self.scale.up_window),
            ("down_window", &self.scale.down_window),
            ("wake_timeout", &self.scale.wake_timeout),
        ] {
            if let Some(v) = v {
                if parse_duration(v).is_none_or(|d| d > std::time::Duration::from_secs(86_400)) {
                    return bad(format!(
                        "scale.{what} {v:?}: a duration up to a day, like \"30s\" or \"5m\""
                    ));
                }
            }
        }
        if self.autoscaled() {
            if self.scale.replicas.is_some() {
                return bad("scale: replicas fixes the count; min, max and a target scale it: give one or the other".into());
            }
            if self.scale.max.is_none() {
                return bad(
                    "scale: an app scaled by target_rps or target_inflight needs max".into(),
                );
            }
            if self.every_node() {
                return bad("scale: an every-node app is not scaled by its load".into());
            }
            if self.is_job() {
                return bad("scale: a job is not scaled by its load".into());
            }
            if self.run.port.is_none() {
                return bad("scale: an app scaled by its load needs run.port (its load is the requests the ingress passes it)".into());
            }
        } else if self.scale.min == Some(0) && self.scale.replicas.is_none() {
            // Without a target nothing would ever start it again.
            return bad("scale: min = 0 needs target_rps or target_inflight (scale to zero wakes on traffic)".into());
        }
        if self.scale.constraints.len() > 32 {
            return bad("scale.constraints: at most 32".into());
        }
        if let Some(c) = self
            .scale
            .constraints
            .iter()
            .find(|c| Constraint::parse(c).is_none())
        {
            return bad(format!(
                "scale.constraints {c:?}: use \"label=value\", \"label!=value\", \"label\" or \"!label\""
            ));
        }
        if let Some(l) = &self.scale.spread {
            if Constraint::parse(l) != Some(Constraint::Present(l.clone())) {
                return bad(format!("scale.spread {l:?}: a node label name"));
            }
        }
        if let Some(p) = &self.scale.placement {
            if p != "every-node" {
                return bad(format!(
                    "scale.placement {p:?}: the only placement is \"every-node\""
                ));
            }
        }
        Ok(())
    }

    /// The probe `[health]` describes, defaults filled in. `validate` has checked it.
    pub fn probe(&self) -> Probe {
        let h = &self.health;
        let d = |v: &Option<String>, default: u64| {
            v.as_deref()
                .and_then(parse_duration)
                .unwrap_or(std::time::Duration::from_millis(default))
        };
        let kind = if let Some(path) = &h.http {
            match h.port.or(self.run.port) {
                Some(port) => ProbeKind::Http {
                    port,
                    path: path.clone(),
                },
                None => ProbeKind::None,
            }
        } else if let Some(port) = h.tcp {
            ProbeKind::Tcp { port }
        } else if let Some(cmd) = &h.exec {
            ProbeKind::Exec(cmd.clone())
        } else if let Some(port) = self.run.port {
            ProbeKind::Tcp { port }
        } else {
            ProbeKind::None
        };
        Probe {
            kind,
            interval: d(&h.interval, 2000),
            timeout: d(&h.timeout, 1000),
            start_period: d(&h.start_period, 0),
            success_threshold: h.success_threshold.unwrap_or(1),
            failure_threshold: h.failure_threshold.unwrap_or(3),
            restart_threshold: h.restart_threshold.unwrap_or(10),
        }
    }

    /// `[health]`: one probe, a port to ask on, durations and thresholds in bounds.
    fn validate_health(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::Invalid(m));
        let h = &self.health;
        let kinds = [h.http.is_some(), h.tcp.is_some(), h.exec.is_some()];
        if kinds.iter().filter(|k| **k).count() > 1 {
            return bad("health: give one of http, tcp or exec".into());
        }
        if let Some(path) = &h.http {
            if !path.starts_with('/')
                || path.len() > 1024
                || path
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            {
                return bad(format!(
                    "health.http {path:?}: a path starting with '/', without spaces, at most 1024 bytes"
                ));
            }
            if h.port.or(self.run.port).is_none() {
                return bad("health.http: give health.port or run.port to ask on".into());
            }
        }
        if h.tcp == Some(0) || h.port == Some(0) {
            return bad("health: 0 is not a port".into());
        }
        if let Some(cmd) = &h.exec {
            if cmd.is_empty()
                || cmd.len() > MAX_ARGS
                || cmd
                    .iter()
                    .any(|a| a.len() > MAX_ARG_BYTES || a.contains('\0'))
            {
                return bad(format!(
                    "health.exec: a command of 1 to {MAX_ARGS} arguments of at most {MAX_ARG_BYTES} bytes, without NUL"
                ));
            }
        }
        let ms = std::time::Duration::from_millis;
        for (what, v, min, max) in [
            ("interval", &h.interval, ms(50), ms(3_600_000)),
            ("timeout", &h.timeout, ms(10), ms(60_000)),
            ("start_period", &h.start_period, ms(0), ms(3_600_000)),
        ] {
            if let Some(v) = v {
                match parse_duration(v) {
                    Some(d) if d >= min && d <= max => {}
                    _ => {
                        return bad(format!(
                            "health.{what} {v:?}: a duration like \"500ms\", \"2s\" or \"1m\", from {min:?} to {max:?}"
                        ))
                    }
                }
            }
        }
        for (what, v, min) in [
            ("success_threshold", h.success_threshold, 1),
            ("failure_threshold", h.failure_threshold, 1),
            ("restart_threshold", h.restart_threshold, 0),
        ] {
            if v.is_some_and(|n| n < min || n > 1000) {
                return bad(format!("health.{what}: from {min} to 1000"));
            }
        }
        Ok(())
    }

    /// `[run]` and `[build] test`: what reaches the container runtime.
    fn validate_run(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::Invalid(m));
        if self.run.port == Some(0) {
            return bad("run.port: 0 is not a port".into());
        }
        for (what, args) in [
            ("run.command", &self.run.command),
            ("build.test", &self.build.test),
        ] {
            if args.len() > MAX_ARGS || args.iter().any(|a| a.len() > MAX_ARG_BYTES) {
                return bad(format!(
                    "{what}: at most {MAX_ARGS} arguments of at most {MAX_ARG_BYTES} bytes"
                ));
            }
        }
        if self.run.env.len() > MAX_ENV
            || self
                .run
                .env
                .values()
                .any(|v| v.len() > MAX_ENV_VALUE_BYTES || v.contains('\0'))
        {
            return bad(format!(
                "run.env: at most {MAX_ENV} variables, values of at most {MAX_ENV_VALUE_BYTES} bytes without NUL"
            ));
        }
        if self.run.secrets.len() > MAX_SECRETS {
            return bad(format!("run.secrets: at most {MAX_SECRETS}"));
        }
        if self.run.command.iter().any(|a| a.contains('\0')) {
            return bad("run.command: arguments cannot hold NUL bytes".into());
        }
        if let Some(k) = self
            .run
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return bad(format!("run.env: {k:?} is not a variable name"));
        }
        Ok(())
    }

    /// Everything else with a size: hosts, volumes, resources, the image reference.
    fn validate_sizes(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::Invalid(m));
        if self.expose.hosts.len() > MAX_HOSTS || self.expose.hosts.iter().any(|h| h.len() > 253) {
            return bad(format!(
                "expose.hosts: at most {MAX_HOSTS} names of at most 253 bytes"
            ));
        }
        if self.expose.internal
            && (!self.expose.hosts.is_empty() || self.expose.acme || self.expose.force_https)
        {
            return bad(
                "expose.internal: an internal app has no outside name: no hosts, acme or force_https"
                    .into(),
            );
        }
        if self.expose.acme {
            if self.expose.hosts.is_empty() {
                return bad("expose.acme: needs expose.hosts, the names to certify".into());
            }
            // HTTP-01 proves one name at a time: a wildcard needs DNS-01.
            if let Some(h) = self.expose.hosts.iter().find(|h| {
                h.starts_with("*.") || crate::ingress::routes::normalize(h).as_deref() != Some(h)
            }) {
                return bad(format!(
                    "expose.acme: {h:?} is not a lowercase DNS name an HTTP-01 challenge can prove (no wildcards, no port)"
                ));
            }
        }
        if self.volumes.len() > MAX_VOLUMES {
            return bad(format!("volumes: at most {MAX_VOLUMES}"));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut paths = std::collections::BTreeSet::new();
        for v in &self.volumes {
            if !valid_name(&v.name) || v.name.len() > 32 {
                return bad(format!(
                    "volumes: name {:?}: 1-32 lowercase letters, digits and '-'",
                    v.name
                ));
            }
            let path_ok = v.path.starts_with('/')
                && v.path != "/"
                && v.path.len() <= 256
                && !v.path.split('/').any(|c| c == ".." || c == ".")
                && v.path.bytes().all(|b| b.is_ascii_graphic());
            if !path_ok {
                return bad(format!(
                    "volumes: path {:?}: an absolute path in the container, not /, without '..'",
                    v.path
                ));
            }
            if !names.insert(&v.name) || !paths.insert(&v.path) {
                return bad(format!(
                    "volumes: {:?} at {:?} repeats a name or a path",
                    v.name, v.path
                ));
            }
        }
        if self
            .resources
            .cpu
            .is_some_and(|c| !(c > 0.0 && c <= 1024.0))
        {
            return bad("resources.cpu must be above 0".into());
        }
        if let Err(e) = self.resources.memory_bytes() {
            return bad(e);
        }
        if let Some(img) = &self.source.image {
            if img.is_empty() || img.len() > 255 || img.bytes().any(|b| b.is_ascii_whitespace()) {
                return bad(format!("source.image {img:?} is not an image reference"));
            }
        }
        Ok(())
    }

    /// How many replicas run when nothing scales the app: `replicas`, else `min`, else 1.
    pub fn replicas(&self) -> u32 {
        self.scale.replicas.or(self.scale.min).unwrap_or(1)
    }

    /// Whether the autoscaler sizes the app (`[scale] target_rps` or `target_inflight`).
    pub fn autoscaled(&self) -> bool {
        self.scale.target_rps.is_some() || self.scale.target_inflight.is_some()
    }

    /// `[scale]` for the autoscaler, every default filled in; `None` unless `autoscaled`.
    pub fn autoscale_policy(&self) -> Option<AutoscalePolicy> {
        let s = &self.scale;
        let dur = |v: &Option<String>, default: u64| {
            v.as_deref()
                .and_then(parse_duration)
                .unwrap_or(std::time::Duration::from_secs(default))
        };
        self.autoscaled().then(|| AutoscalePolicy {
            min: s.min.unwrap_or(1),
            max: s.max.unwrap_or(1).max(s.min.unwrap_or(1)),
            target_rps: s.target_rps,
            target_inflight: s.target_inflight,
            up_window: dur(&s.up_window, 0),
            down_window: dur(&s.down_window, 300),
            wake_timeout: dur(&s.wake_timeout, 60),
        })
    }

    /// Whether replicas run once to completion (`kind = "job"`).
    pub fn is_job(&self) -> bool {
        self.kind.as_deref() == Some("job")
    }

    /// A job's retries after a failed run (default 3); `None` for a service.
    pub fn job_retries(&self) -> Option<u32> {
        self.is_job()
            .then(|| self.job.as_ref().and_then(|j| j.retries).unwrap_or(3))
    }

    /// `[scale] constraints`, parsed (`validate` has checked them).
    pub fn constraints(&self) -> Vec<Constraint> {
        self.scale
            .constraints
            .iter()
            .filter_map(|c| Constraint::parse(c))
            .collect()
    }

    pub fn every_node(&self) -> bool {
        self.scale.placement.as_deref() == Some("every-node")
    }
}

impl Resources {
    /// `memory` in bytes: a number with an optional suffix (`k`, `M`, `G`, `Ki`, `Mi`, `Gi`).
    pub fn memory_bytes(&self) -> Result<Option<i64>, String> {
        let Some(m) = &self.memory else {
            return Ok(None);
        };
        let m = m.trim();
        let split = m.find(|c: char| !c.is_ascii_digit()).unwrap_or(m.len());
        let (num, unit) = m.split_at(split);
        let mult: i64 = match unit {
            "" => 1,
            "k" | "K" => 1000,
            "M" => 1000 * 1000,
            "G" => 1000 * 1000 * 1000,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            _ => {
                return Err(format!(
                    "resources.memory {m:?}: use a number with k, M, G, Ki, Mi or Gi"
                ))
            }
        };
        let bytes = num
            .parse::<i64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .filter(|b| *b >= 6 * 1024 * 1024)
            .ok_or_else(|| format!("resources.memory {m:?}: give at least 6Mi (Docker's floor)"))?;
        Ok(Some(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_resolves_to_one_probe_with_defaults() {
        let p = |extra: &str| AppSpec::parse(&format!("name = \"a\"\n{extra}")).map(|s| s.probe());
        let http = p("[run]\nport = 8080\n[health]\nhttp = \"/ready\"\ninterval = \"500ms\"\nfailure_threshold = 2\n").unwrap();
        assert_eq!(
            http.kind,
            ProbeKind::Http {
                port: 8080,
                path: "/ready".into()
            }
        );
        assert_eq!(http.interval, std::time::Duration::from_millis(500));
        assert_eq!(
            (
                http.success_threshold,
                http.failure_threshold,
                http.restart_threshold
            ),
            (1, 2, 10)
        );
        // A port and no [health]: TCP on it. Nothing: ready once running.
        assert_eq!(
            p("[run]\nport = 80\n").unwrap().kind,
            ProbeKind::Tcp { port: 80 }
        );
        assert_eq!(p("").unwrap().kind, ProbeKind::None);
        assert_eq!(
            p("[health]\nexec = [\"test\", \"-f\", \"/ok\"]\n")
                .unwrap()
                .kind,
            ProbeKind::Exec(vec!["test".into(), "-f".into(), "/ok".into()])
        );
        for bad in [
            "[health]\nhttp = \"/x\"\n",                 // no port to ask on
            "[run]\nport = 1\n[health]\nhttp = \"x\"\n", // not a path
            "[health]\ntcp = 1\nexec = [\"x\"]\n",       // two probes
            "[health]\ntcp = 0\n",
            "[health]\nexec = []\n",
            "[health]\ntcp = 1\ninterval = \"2 s\"\n",
            "[health]\ntcp = 1\ninterval = \"1ms\"\n",
            "[health]\ntcp = 1\ntimeout = \"2h\"\n",
            "[health]\ntcp = 1\nsuccess_threshold = 0\n",
            "[health]\ntcp = 1\nfailure_threshold = 1001\n",
            "[health]\ntcp = 1\nbogus = 1\n",
        ] {
            assert!(p(bad).is_err(), "accepted: {bad}");
        }
        assert_eq!(
            parse_duration("1m"),
            Some(std::time::Duration::from_secs(60))
        );
        assert_eq!(parse_duration("18446744073709551615h"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn every_number_and_list_in_a_spec_is_bounded() {
        let base = "name = \"a\"\n";
        let ok = |extra: &str| AppSpec::parse(&format!("{base}{extra}")).is_ok();
        assert!(ok("[scale]\nreplicas = 1000\n"));
        for bad in [
            "[scale]\nreplicas = 1001\n".to_string(),
            "[scale]\nreplicas = 4294967295\n".into(),
            "[scale]\nmax = 5000\n".into(),
            "[scale]\ntarget_rps = -1.0\n".into(),
            "[scale]\ntarget_rps = nan\n".into(),
            "[run]\nport = 0\n".into(),
            format!("[run]\ncommand = [{}]\n", vec!["\"x\""; 257].join(",")),
            format!("[run]\ncommand = [\"{}\"]\n", "x".repeat(4097)),
            format!("[run]\nenv = {{ A = \"{}\" }}\n", "x".repeat(32 * 1024 + 1)),
            format!("[expose]\nhosts = [{}]\n", vec!["\"h\""; 65].join(",")),
        ] {
            assert!(!ok(&bad), "accepted: {}", &bad[..bad.len().min(80)]);
        }
    }

    #[test]
    fn acme_asks_for_names_an_http_01_challenge_can_prove() {
        let p = |expose: &str| AppSpec::parse(&format!("name = \"a\"\n[expose]\n{expose}"));
        let s = p("hosts = [\"a.example.com\", \"b.example.com\"]\nacme = true\n").unwrap();
        assert!(s.expose.acme);
        for (bad, says) in [
            ("acme = true\n", "needs expose.hosts"),
            (
                "hosts = [\"*.example.com\"]\nacme = true\n",
                "*.example.com",
            ),
            (
                "hosts = [\"A.example.com\"]\nacme = true\n",
                "A.example.com",
            ),
            (
                "hosts = [\"a.example.com:8443\"]\nacme = true\n",
                "a.example.com:8443",
            ),
            ("hosts = [\"10.0.0.1\"]\nacme = true\n", "10.0.0.1"),
        ] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        // Without acme, the same hosts are fine: only certificates need provable names.
        assert!(p("hosts = [\"*.example.com\"]\n").is_ok());
        assert!(p("internal = true\n").unwrap().expose.internal);
        for bad in [
            "internal = true\nhosts = [\"a.example.com\"]\n",
            "internal = true\nforce_https = true\n",
        ] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains("expose.internal"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_thousand_replicas_on_a_hundred_nodes_place_evenly() {
        use crate::scheduler::{place, App, Node};
        let s = AppSpec::parse("name = \"a\"\n[scale]\nreplicas = 1000\n").unwrap();
        let names: Vec<String> = (0..100).map(|i| format!("n{i}")).collect();
        let nodes: Vec<Node> = names.iter().map(|n| Node::bare(n)).collect();
        let p = place(
            &[App {
                name: "a",
                spec: &s,
                replicas: s.replicas(),
            }],
            &nodes,
            &[],
        )
        .placements;
        assert_eq!(p.len(), 1000);
        for n in &names {
            assert_eq!(p.iter().filter(|p| p.node == *n).count(), 10);
        }
    }

    #[test]
    fn the_documented_spec_parses() {
        let s = AppSpec::parse(
            r#"
name = "hello"
[source]
git = "https://github.com/acme/hello.git"
ref = "main"
[build]
dockerfile = "Dockerfile"
test = ["python", "-m", "pytest", "-q"]
[run]
command = ["python", "app.py"]
port = 8080
env = { GREETING = "hi" }
secrets = ["API_KEY"]
[health]
http = "/ready"
[scale]
replicas = 2
[resources]
cpu = 0.5
memory = "256Mi"
[expose]
hosts = ["hello.example.com"]
[[volumes]]
name = "data"
path = "/data"
"#,
        )
        .unwrap();
        assert_eq!(s.run.port, Some(8080));
        assert_eq!(s.source.git_ref.as_deref(), Some("main"));
        assert_eq!(s.volumes.len(), 1);
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let e = AppSpec::parse("name = \"x\"\nreplicas = 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("replicas"), "{e}");
        assert!(AppSpec::parse("name = \"Hello World\"").is_err());
        assert!(AppSpec::parse("name = \"a\"\n[source]\ngit = \"x\"\nimage = \"y\"").is_err());
        assert!(AppSpec::parse("{\"name\": \"ok\"}").is_ok());
        let e = AppSpec::parse("name = \"a\"\n[resources]\nmemory = \"lots\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("resources.memory"), "{e}");
        assert!(AppSpec::parse("name = \"a\"\n[source]\nimage = \"a b\"").is_err());
    }

    #[test]
    fn update_placement_jobs_and_volumes_are_checked() {
        let refused = |extra: &str, says: &str| {
            let e = AppSpec::parse(&format!("name = \"a\"\n{extra}"))
                .err()
                .unwrap_or_else(|| panic!("accepted: {extra}"))
                .to_string();
            assert!(e.contains(says), "{extra}: {e}");
        };
        refused("[update]\nsurge = 0\n", "surge 0 needs unavailable");
        refused("[update]\ndeadline = \"0s\"\n", "update.deadline");
        refused("[update]\nmonitor = \"soon\"\n", "update.monitor");
        refused("[update]\nmax_failures = 0\n", "update.max_failures");
        refused("[scale]\nconstraints = [\"=a\"]\n", "scale.constraints");
        refused("[scale]\nspread = \"zone=a\"\n", "scale.spread");
        refused("kind = \"cron\"\n", "kind \"cron\"");
        refused("[job]\nretries = 1\n", "[job] is for kind");
        refused("kind = \"job\"\n[job]\nretries = 101\n", "job.retries");
        refused(
            "[[volumes]]\nname = \"d\"\npath = \"data\"\n",
            "volumes: path",
        );
        refused(
            "[[volumes]]\nname = \"d\"\npath = \"/a/../etc\"\n",
            "volumes: path",
        );
        refused(
            "[[volumes]]\nname = \"D\"\npath = \"/d\"\n",
            "volumes: name",
        );
        refused(
            "[[volumes]]\nname = \"d\"\npath = \"/d\"\n[[volumes]]\nname = \"d\"\npath = \"/e\"\n",
            "repeats",
        );
        let s = AppSpec::parse(
            "name = \"a\"\nkind = \"job\"\n[update]\nsurge = 0\nunavailable = 2\n[scale]\nconstraints = [\"zone=a\", \"!spot\", \"gpu\", \"disk!=hdd\"]\nspread = \"zone\"\n",
        )
        .unwrap();
        assert_eq!(s.job_retries(), Some(3));
        assert_eq!(s.update_policy().unavailable, 2);
        assert_eq!(s.constraints().len(), 4);
        // The revision follows what reaches the container, not scale or update.
        let base = AppSpec::parse("name = \"a\"\n[run]\ncommand = [\"x\"]\n").unwrap();
        let scaled = AppSpec::parse(
            "name = \"a\"\n[run]\ncommand = [\"x\"]\n[scale]\nreplicas = 5\n[update]\nsurge = 2\n",
        )
        .unwrap();
        let changed = AppSpec::parse("name = \"a\"\n[run]\ncommand = [\"y\"]\n").unwrap();
        assert_eq!(base.revision(), scaled.revision());
        assert_ne!(base.revision(), changed.revision());
        assert_eq!(base.revision().len(), 16);
    }

    #[test]
    fn memory_sizes() {
        let r = |m: &str| {
            Resources {
                cpu: None,
                memory: Some(m.into()),
            }
            .memory_bytes()
        };
        assert_eq!(r("256Mi"), Ok(Some(256 << 20)));
        assert_eq!(r("1Gi"), Ok(Some(1 << 30)));
        assert_eq!(r("64M"), Ok(Some(64_000_000)));
        assert_eq!(r("10000000"), Ok(Some(10_000_000)));
        for bad in [
            "",
            "1Mi",
            "x",
            "5 Mi",
            "-1Gi",
            "99999999999999999999Gi",
            "1Ti",
        ] {
            assert!(r(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_references_by_content() {
        let id = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(tagged("busybox"), "busybox:latest");
        assert_eq!(tagged("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(tagged("localhost:5000/app:v2"), "localhost:5000/app:v2");
        assert_eq!(tagged(&format!("app@{id}")), format!("app@{id}"));
        assert_eq!(tagged(&id), id);
        assert!(is_image_id(&id) && is_pinned(&id));
        assert!(is_pinned(&format!("localhost:5000/app@{id}")));
        assert!(!is_pinned("app:latest") && !is_pinned(&format!("@{id}")));
        assert!(!is_image_id(&id.to_uppercase()) && !is_image_id("sha256:abc"));
        let spec = |pinned: &str| {
            AppSpec::parse(&format!(
                "name = \"a\"\n[source]\nimage = \"app:1\"\npinned = \"{pinned}\""
            ))
        };
        let s = spec(&id).unwrap();
        assert_eq!(s.source.run_image(), Some(id.as_str()));
        let e = spec("app:2").unwrap_err().to_string();
        assert!(e.contains("source.pinned"), "{e}");
        // The pin is part of what reaches the container: a new pin is a new revision.
        let other = spec(&format!("sha256:{}", "cd".repeat(32))).unwrap();
        assert_ne!(s.revision(), other.revision());
    }
}
