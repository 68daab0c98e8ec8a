//! Cluster identity: the bundle `shoal gen cluster` writes (cluster id, CA, join secret, admin
//! token, ready user-data), what a node holds of it (`Credentials`), its own certificate
//! (`cert`), TLS bootstrap with the join secret (`join`) and sealed app secrets (`secrets`).

pub mod cert;
pub mod join;
pub mod secrets;
pub mod vouch;

use crate::spec::valid_name;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cluster name {0:?}: use 1-63 lowercase letters, digits and '-'")]
    BadName(String),
    #[error("cannot create the cluster CA")]
    Ca(#[from] rcgen::Error),
    #[error("{0} already holds a cluster bundle; pass --force to replace it (every node must then get the new one)")]
    Exists(String),
    #[error("{0} exists and holds other files: give a new or empty directory for the bundle")]
    NotEmpty(String),
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no cluster bundle or join secret in {0}: create a cluster with `shoal gen cluster --name NAME --out DIR` and point `bundle` at DIR, or put the cluster's join.secret there")]
    NoCredentials(String),
    #[error("cannot read the bundle in {path}: {reason}")]
    Read { path: String, reason: String },
}

/// What identifies a cluster publicly. The id is random; mDNS advertises only a hash of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterInfo {
    pub name: String,
    pub id: String,
    pub created_at_ms: u64,
    /// The public half of the operator key derived from the admin token (hex): what nodes
    /// check operators' writes against. Public, and carried wherever the cluster is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_key: Option<String>,
}

/// A cluster's material. `ca_key`, `join_secret` and `admin_token` are secrets. The operator's
/// bundle (`shoal gen cluster`) holds everything; what a node is given holds less: no admin
/// token ever (the operator key in `cluster` stands for it), and the CA key only on the nodes
/// that sign joiners' certificates (empty strings stand for what is left out).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub cluster: ClusterInfo,
    pub ca_cert: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca_key: String,
    pub join_secret: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub admin_token: String,
    /// The cluster's data key (what app secrets are sealed with), wrapped under the join
    /// secret (`secrets::SecretKey::wrap`). Empty in bundles made before wrapping: their data
    /// key is derived from the join secret (`SecretKey::legacy`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data_key: String,
}

impl std::fmt::Debug for Bundle {
    // Never print secrets, not even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// Replaces `dir/name` atomically with `body`: a temporary file with the final mode (0600 for a
/// secret, else 0644), synced, then renamed over it.
pub fn write_file(dir: &Path, name: &str, body: &str, secret: bool) -> Result<(), IdentityError> {
    let werr = |p: &Path| {
        let path = p.display().to_string();
        move |source| IdentityError::Write { path, source }
    };
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(werr(&tmp))?;
    f.write_all(body.as_bytes()).map_err(werr(&tmp))?;
    f.sync_all().map_err(werr(&tmp))?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(werr(&path))
}

/// 32 random bytes as lowercase hex.
pub fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The files of a bundle directory, and whether each is secret (written 0600).
/// `user-data.yaml` is for member nodes (no CA key, no admin token); `user-data-signer.yaml`
/// adds the CA key, for the nodes that admit new ones (one is enough; more for availability).
pub const FILES: [(&str, bool); 8] = [
    ("cluster.json", false),
    ("ca.crt", false),
    ("ca.key", true),
    ("join.secret", true),
    ("admin.token", true),
    ("user-data.yaml", true),
    ("user-data-signer.yaml", true),
    (DATA_KEY_FILE, true),
];

/// The wrapped data key, in a bundle directory and beside a node's certificate.
pub const DATA_KEY_FILE: &str = "data-key.sealed";

/// The `shoal:` key of user-data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDataShoal {
    pub bundle: Bundle,
    #[serde(default)]
    pub peers: Vec<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct UserData {
    shoal: UserDataShoal,
}

impl Bundle {
    /// A new cluster: random id and secrets, and a self-signed CA (ECDSA P-256).
    pub fn generate(name: &str, now_ms: u64) -> Result<Bundle, IdentityError> {
        if !valid_name(name) {
            return Err(IdentityError::BadName(name.into()));
        }
        let id = random_secret()[..32].to_string();
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("shoal cluster {name} CA"),
        );
        params.distinguished_name.push(
            rcgen::DnType::OrganizationalUnitName,
            format!("cluster {id}"),
        );
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let admin_token = random_secret();
        let join_secret = random_secret();
        let data_key = secrets::SecretKey::random()
            .and_then(|k| k.wrap(&join_secret, &id))
            .map_err(|e| IdentityError::Read {
                path: "the new data key".into(),
                reason: e.to_string(),
            })?;
        let operator_key = vouch::OperatorKey::from_token(&admin_token, &id)
            .public()
            .hex();
        Ok(Bundle {
            cluster: ClusterInfo {
                name: name.into(),
                id,
                created_at_ms: now_ms,
                operator_key: Some(operator_key),
            },
            ca_cert: cert.pem(),
            ca_key: key.serialize_pem(),
            join_secret,
            admin_token,
            data_key,
        })
    }

    /// This cluster's data key, as a holder of this bundle's join secret opens it.
    pub fn secret_key(&self) -> Result<secrets::SecretKey, secrets::SealError> {
        let wrapped = Some(self.data_key.as_str()).filter(|w| !w.trim().is_empty());
        secrets::SecretKey::resolve(wrapped, &self.join_secret, &self.cluster.id)
    }

    /// The same cluster with a new join secret: the data key is re-wrapped for it, so every
    /// sealed secret stays readable. The old secret stops admitting nodes once the cluster is
    /// told (`PUT /v1/cluster/join-secret`).
    pub fn rotate_join(&self) -> Result<Bundle, secrets::SealError> {
        let key = self.secret_key()?;
        let join_secret = random_secret();
        Ok(Bundle {
            data_key: key.wrap(&join_secret, &self.cluster.id)?,
            join_secret,
            ..self.clone()
        })
    }

    /// What a node is given: no admin token, and the CA key only for a signing node.
    pub fn for_node(&self, signer: bool) -> Bundle {
        Bundle {
            ca_key: if signer {
                self.ca_key.clone()
            } else {
                String::new()
            },
            admin_token: String::new(),
            ..self.clone()
        }
    }

    /// `#cloud-config` user-data carrying what a node needs under the `shoal:` key, ready for
    /// Terraform's `user_data` or `cloud-localds`: a member's, or (`signer`) one that also
    /// signs joiners' certificates.
    pub fn user_data(&self, peers: &[String], signer: bool) -> String {
        let doc = UserData {
            shoal: UserDataShoal {
                bundle: self.for_node(signer),
                peers: peers.to_vec(),
                labels: Default::default(),
            },
        };
        // Plain data always serializes.
        let yaml = serde_yaml_ng::to_string(&doc).unwrap_or_default();
        let what = if signer {
            "a signing node (it holds the CA key)"
        } else {
            "member nodes"
        };
        format!(
            "#cloud-config\n# shoal cluster {} ({}), for {what}. Contains secrets: keep it private.\n{yaml}",
            self.cluster.name, self.cluster.id
        )
    }

    /// Writes the bundle into `dir`: secrets 0600, the directory 0700. Refuses to replace an
    /// existing bundle unless `force`.
    pub fn write(&self, dir: &Path, peers: &[String], force: bool) -> Result<(), IdentityError> {
        let werr = |p: &Path| {
            let path = p.display().to_string();
            move |source| IdentityError::Write { path, source }
        };
        if dir.join("cluster.json").exists() && !force {
            return Err(IdentityError::Exists(dir.display().to_string()));
        }
        // A directory made here is 0700; one that exists keeps its mode (`--out /tmp` must not
        // lock everybody out of /tmp) and must be empty or hold a bundle already.
        match std::fs::read_dir(dir) {
            Ok(mut entries) => {
                if !dir.join("cluster.json").exists() && entries.next().is_some() {
                    return Err(IdentityError::NotEmpty(dir.display().to_string()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(werr(parent))?;
                }
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(dir)
                    .map_err(werr(dir))?;
            }
            Err(e) => return Err(werr(dir)(e)),
        }
        let cluster = serde_json::to_string_pretty(&self.cluster).unwrap_or_default() + "\n";
        let contents = [
            cluster,
            self.ca_cert.clone(),
            self.ca_key.clone(),
            self.join_secret.clone() + "\n",
            self.admin_token.clone() + "\n",
            self.user_data(peers, false),
            self.user_data(peers, true),
            self.data_key.clone(),
        ];
        for ((name, secret), body) in FILES.iter().zip(contents) {
            if *name == DATA_KEY_FILE && body.is_empty() {
                continue;
            }
            write_file(dir, name, &body, *secret)?;
        }
        Ok(())
    }

    /// Writes what a node was given (inline in its config) into `dir`, replacing what is
    /// there: the admin token and, unless given, the CA key are removed, so taking the CA key
    /// out of a node's user-data takes it off the node at the next start.
    pub fn write_node(&self, dir: &Path) -> Result<(), IdentityError> {
        let werr = |p: &Path| {
            let path = p.display().to_string();
            move |source| IdentityError::Write { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(werr(dir))?;
        // User-data made before operator keys carried the admin token instead: keep what it
        // stands for (the public key), not the token.
        let mut cluster = self.cluster.clone();
        if cluster.operator_key.is_none() && !self.admin_token.is_empty() {
            cluster.operator_key = Some(
                vouch::OperatorKey::from_token(&self.admin_token, &cluster.id)
                    .public()
                    .hex(),
            );
        }
        let files = [
            (
                "cluster.json",
                serde_json::to_string_pretty(&cluster).unwrap_or_default() + "\n",
                false,
            ),
            ("ca.crt", self.ca_cert.clone(), false),
            ("join.secret", self.join_secret.clone() + "\n", true),
            ("ca.key", self.ca_key.clone(), true),
            (DATA_KEY_FILE, self.data_key.clone(), true),
        ];
        for (name, body, secret) in files {
            let path = dir.join(name);
            if body.trim().is_empty() {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(werr(&path)(e))
                    }
                    _ => continue,
                }
            }
            write_file(dir, name, &body, secret)?;
        }
        let token = dir.join("admin.token");
        match std::fs::remove_file(&token) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(werr(&token)(e)),
            _ => Ok(()),
        }
    }

    /// Reads a bundle directory written by `write`.
    pub fn load(dir: &Path) -> Result<Bundle, IdentityError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| IdentityError::Read {
                path: dir.display().to_string(),
                reason: format!("{name}: {e}"),
            })
        };
        let mut cluster: ClusterInfo =
            serde_json::from_str(&read("cluster.json")?).map_err(|e| IdentityError::Read {
                path: dir.display().to_string(),
                reason: format!("cluster.json: {e}"),
            })?;
        // Nodes need no admin token: the operator key in cluster.json is what they check.
        let admin_token = std::fs::read_to_string(dir.join("admin.token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        if cluster.operator_key.is_none() && !admin_token.is_empty() {
            // A bundle written before operator keys: derive it from the token.
            cluster.operator_key = Some(
                vouch::OperatorKey::from_token(&admin_token, &cluster.id)
                    .public()
                    .hex(),
            );
        }
        Ok(Bundle {
            cluster,
            ca_cert: read("ca.crt")?,
            ca_key: read("ca.key")?,
            join_secret: read("join.secret")?.trim().to_string(),
            admin_token,
            data_key: read_data_key(dir),
        })
    }
}

/// The wrapped data key in `dir`, or empty (a bundle made before wrapping).
fn read_data_key(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(DATA_KEY_FILE))
        .map(|t| t.trim().to_string())
        .unwrap_or_default()
}

/// What mDNS advertises instead of the cluster id: the first 16 hex digits of
/// SHA-256("shoal cluster v1" || id). It tells members apart without naming the cluster.
pub fn cluster_hash(cluster_id: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("shoal cluster v1\0{cluster_id}").as_bytes(),
    );
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What a node holds of its cluster's bundle directory.
#[derive(Clone)]
pub enum Credentials {
    /// The whole bundle: the node issues its own certificate and signs joiners'.
    Bundle(Bundle),
    /// Only the join secret (and perhaps `cluster.json`, `ca.crt`): the node asks a member.
    JoinSecret {
        secret: String,
        cluster: Option<ClusterInfo>,
        /// The data key wrapped for `secret`, when the user-data carried it.
        data_key: Option<String>,
    },
}

impl Credentials {
    /// Reads `dir`: a bundle if it holds the CA key, else a join secret if it holds one.
    pub fn load(dir: &Path) -> Result<Credentials, IdentityError> {
        if dir.join("ca.key").exists() {
            return Bundle::load(dir).map(Credentials::Bundle);
        }
        let secret = dir.join("join.secret");
        match std::fs::read_to_string(&secret) {
            Ok(s) if !s.trim().is_empty() => {
                let cluster = std::fs::read_to_string(dir.join("cluster.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
                Ok(Credentials::JoinSecret {
                    secret: s.trim().to_string(),
                    cluster,
                    data_key: Some(read_data_key(dir)).filter(|k| !k.is_empty()),
                })
            }
            Ok(_) => Err(IdentityError::Read {
                path: secret.display().to_string(),
                reason: "the join secret is empty".into(),
            }),
            Err(_) => Err(IdentityError::NoCredentials(dir.display().to_string())),
        }
    }

    pub fn join_secret(&self) -> &str {
        match self {
            Credentials::Bundle(b) => &b.join_secret,
            Credentials::JoinSecret { secret, .. } => secret,
        }
    }
}

/// What the running agent knows about its cluster, shared by the endpoints.
pub struct Trust {
    pub cluster: ClusterInfo,
    pub cluster_hash: String,
    pub ca_pem: String,
    /// Present only on nodes holding the whole bundle: they sign joiners' certificates.
    pub ca_key: Option<String>,
    /// The join secret this node was given. Joins are checked against the one in force
    /// (`Handle::join_secret`), which an operator may have rotated since.
    pub join_secret: String,
    /// The cluster's data key: seals and opens app secrets and the rotated join secret.
    pub secrets: secrets::SecretKey,
    /// When this node's certificate expires (Unix seconds); renewed at start within 30 days.
    pub cert_not_after: i64,
    /// What operators' writes are checked against (from `cluster.operator_key`); without it
    /// this node takes no writes through its API.
    pub operator: Option<vouch::OperatorPublic>,
}

impl std::fmt::Debug for Credentials {
    // Never print secrets, not even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Bundle(b) => f.debug_tuple("Bundle").field(b).finish(),
            Credentials::JoinSecret { cluster, .. } => f
                .debug_struct("JoinSecret")
                .field("cluster", cluster)
                .finish_non_exhaustive(),
        }
    }
}

impl std::fmt::Debug for Trust {
    // Never print secrets, not even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("cluster", &self.cluster)
            .field("signs_certificates", &self.ca_key.is_some())
            .field("cert_not_after", &self.cert_not_after)
            .finish_non_exhaustive()
    }
}

impl Trust {
    pub fn new(
        cluster: ClusterInfo,
        ca_pem: String,
        ca_key: Option<String>,
        join_secret: String,
        secrets: secrets::SecretKey,
        cert_not_after: i64,
    ) -> Result<Trust, String> {
        let operator = match cluster.operator_key.as_deref() {
            Some(k) => Some(vouch::OperatorPublic::parse(k).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(Trust {
            cluster_hash: cluster_hash(&cluster.id),
            cluster,
            ca_pem,
            ca_key,
            join_secret,
            secrets,
            cert_not_after,
            operator,
        })
    }
}

/// Parses the `shoal:` key out of `#cloud-config` user-data.
pub fn parse_user_data(text: &str) -> Result<UserDataShoal, String> {
    if !text.starts_with("#cloud-config") {
        return Err("user-data must start with #cloud-config".into());
    }
    #[derive(Deserialize)]
    struct Doc {
        shoal: Option<UserDataShoal>,
    }
    let doc: Doc = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    doc.shoal
        .ok_or_else(|| "user-data has no shoal: key".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_bundle_goes_only_into_a_new_or_empty_directory_whose_mode_it_keeps() {
        let b = Bundle::generate("prod", 1_700_000_000_000).unwrap();
        let root = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // A directory that holds other things is refused, untouched.
        let busy = root.path().join("busy");
        std::fs::create_dir(&busy).unwrap();
        std::fs::set_permissions(&busy, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(busy.join("notes.txt"), "mine").unwrap();
        assert!(matches!(
            b.write(&busy, &[], false),
            Err(IdentityError::NotEmpty(_))
        ));
        assert!(matches!(
            b.write(&busy, &[], true),
            Err(IdentityError::NotEmpty(_))
        ));
        assert_eq!(mode(&busy), 0o755);
        assert!(!busy.join("ca.key").exists());
        // An empty one is used and keeps its mode; a new one is made 0700.
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o755)).unwrap();
        b.write(&empty, &[], false).unwrap();
        assert_eq!(mode(&empty), 0o755);
        let new = root.path().join("a/new");
        b.write(&new, &[], false).unwrap();
        assert_eq!(mode(&new), 0o700);
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let b = Bundle::generate("prod", 1_700_000_000_000).unwrap();
        let trust = Trust::new(
            b.cluster.clone(),
            b.ca_cert.clone(),
            Some(b.ca_key.clone()),
            b.join_secret.clone(),
            b.secret_key().unwrap(),
            0,
        )
        .unwrap();
        let creds = [
            Credentials::Bundle(b.clone()),
            Credentials::JoinSecret {
                secret: b.join_secret.clone(),
                cluster: Some(b.cluster.clone()),
                data_key: Some(b.data_key.clone()),
            },
        ];
        let shown = format!("{trust:?} {creds:?} {b:?} {:#?}", trust);
        for secret in [&b.join_secret, &b.admin_token] {
            assert!(!shown.contains(secret.as_str()), "{shown}");
        }
        // Not the key, not a line of it.
        let key_line = b.ca_key.lines().nth(1).unwrap();
        assert!(!shown.contains(key_line), "{shown}");
        assert!(shown.contains("prod"));
    }

    #[test]
    fn rotating_the_join_secret_keeps_the_data_key() {
        let b = Bundle::generate("prod", 1).unwrap();
        let key = b.secret_key().unwrap();
        let sealed = key.seal("secrets/web/K", b"v").unwrap();
        let r = b.rotate_join().unwrap();
        assert_ne!(r.join_secret, b.join_secret);
        assert_ne!(r.data_key, b.data_key);
        assert_eq!(
            (&r.cluster, &r.ca_key, &r.admin_token),
            (&b.cluster, &b.ca_key, &b.admin_token)
        );
        assert_eq!(
            r.secret_key()
                .unwrap()
                .open("secrets/web/K", &sealed)
                .unwrap(),
            b"v"
        );
        // Through the disk, and the user-data nodes are given.
        let dir = tempfile::tempdir().unwrap();
        r.write(dir.path(), &[], false).unwrap();
        let back = Bundle::load(dir.path()).unwrap();
        assert_eq!(back, r);
        let ud = parse_user_data(&r.user_data(&[], false)).unwrap();
        assert_eq!(ud.bundle.data_key, r.data_key);
        // A bundle from before wrapping: its first rotation wraps the derived key.
        let mut legacy = b.clone();
        legacy.data_key.clear();
        let sealed = legacy
            .secret_key()
            .unwrap()
            .seal("secrets/web/K", b"old")
            .unwrap();
        let r = legacy.rotate_join().unwrap();
        assert!(!r.data_key.is_empty());
        assert_eq!(
            r.secret_key()
                .unwrap()
                .open("secrets/web/K", &sealed)
                .unwrap(),
            b"old"
        );
    }

    #[test]
    fn a_bundle_round_trips_through_disk_and_user_data() {
        let b = Bundle::generate("prod", 1_700_000_000_000).unwrap();
        assert!(b.ca_cert.starts_with("-----BEGIN CERTIFICATE-----"));
        rcgen::KeyPair::from_pem(&b.ca_key).unwrap();
        assert_ne!(b.join_secret, b.admin_token);
        assert_eq!(b.admin_token.len(), 64);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bundle");
        b.write(&out, &["10.0.0.2:7443".into()], false).unwrap();
        assert_eq!(Bundle::load(&out).unwrap(), b);
        for (name, secret) in FILES {
            let mode = std::fs::metadata(out.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, if secret { 0o600 } else { 0o644 }, "{name}");
        }
        // Members' user-data: no CA key, no admin token; a signer's adds the CA key only.
        let ud = std::fs::read_to_string(out.join("user-data.yaml")).unwrap();
        let parsed = parse_user_data(&ud).unwrap();
        assert_eq!(parsed.bundle, b.for_node(false));
        assert!(parsed.bundle.ca_key.is_empty() && parsed.bundle.admin_token.is_empty());
        assert_eq!(parsed.bundle.cluster.operator_key, b.cluster.operator_key);
        assert!(!ud.contains(&b.admin_token) && !ud.contains("PRIVATE KEY"));
        assert_eq!(parsed.peers, vec!["10.0.0.2:7443".to_string()]);
        let sud = std::fs::read_to_string(out.join("user-data-signer.yaml")).unwrap();
        let signer = parse_user_data(&sud).unwrap().bundle;
        assert_eq!(signer.ca_key, b.ca_key);
        assert!(signer.admin_token.is_empty() && !sud.contains(&b.admin_token));
        // A second write without --force refuses and changes nothing.
        let other = Bundle::generate("prod", 1).unwrap();
        assert!(matches!(
            other.write(&out, &[], false),
            Err(IdentityError::Exists(_))
        ));
        assert_eq!(Bundle::load(&out).unwrap(), b);
        other.write(&out, &[], true).unwrap();
        assert_eq!(Bundle::load(&out).unwrap(), other);
    }

    #[test]
    fn a_node_keeps_only_what_it_was_given() {
        let b = Bundle::generate("prod", 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("bundle");
        // A signer first (and a stray admin token left there by hand)...
        b.for_node(true).write_node(&d).unwrap();
        std::fs::write(d.join("admin.token"), &b.admin_token).unwrap();
        assert!(matches!(
            Credentials::load(&d).unwrap(),
            Credentials::Bundle(_)
        ));
        // ...then a member's user-data: the CA key and the token are gone from the disk.
        b.for_node(false).write_node(&d).unwrap();
        assert!(!d.join("ca.key").exists() && !d.join("admin.token").exists());
        match Credentials::load(&d).unwrap() {
            Credentials::JoinSecret {
                secret,
                cluster,
                data_key,
            } => {
                assert_eq!(secret, b.join_secret);
                assert_eq!(cluster.unwrap().operator_key, b.cluster.operator_key);
                // The data key is wrapped for this secret and opens.
                assert_eq!(data_key.as_deref(), Some(b.data_key.as_str()));
                secrets::SecretKey::unwrap(&b.data_key, &secret, &b.cluster.id).unwrap();
            }
            other => panic!("a member with the CA key: {other:?}"),
        }
        let mode = std::fs::metadata(d.join("join.secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Old user-data (the whole bundle, no operator key): the key is kept, the token not.
        let mut old = b.clone();
        old.cluster.operator_key = None;
        old.write_node(&d).unwrap();
        assert!(!d.join("admin.token").exists());
        match Credentials::load(&d).unwrap() {
            Credentials::Bundle(nb) => {
                assert_eq!(nb.cluster.operator_key, b.cluster.operator_key);
                assert!(nb.admin_token.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn debug_output_and_names() {
        let b = Bundle::generate("a", 0).unwrap();
        let shown = format!("{b:?}");
        assert!(
            !shown.contains(&b.admin_token)
                && !shown.contains(&b.join_secret)
                && !shown.contains("PRIVATE")
        );
        assert!(matches!(
            Bundle::generate("Bad Name", 0),
            Err(IdentityError::BadName(_))
        ));
        assert!(parse_user_data("shoal: {}").is_err());
        assert!(parse_user_data("#cloud-config\nhostname: x\n").is_err());
    }
}
