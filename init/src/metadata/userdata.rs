//! user-data: `#cloud-config` (gzip accepted), so Terraform templates work unchanged. The
//! `shoal:` key becomes the agent's `/run/shoal/node.json`; of cloud-init's own keys a safe
//! subset is applied (`hostname`, `fqdn`, `write_files` into writable places, `ntp`), commands
//! (`bootcmd`, `runcmd`, scripts) are refused with a clear message, and anything else is
//! reported as unknown. Nothing here is fatal to the boot.

use base64::Engine;
use serde::Serialize;
use std::io::Read;
use std::path::{Component, Path};

const MAX_USER_DATA: u64 = 16 << 20;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Applied {
    /// The `shoal:` mapping as JSON (written to node.json; holds secrets, never reported).
    #[serde(skip)]
    pub shoal: Option<serde_json::Value>,
    pub hostname: Option<String>,
    pub ntp: Vec<String>,
    pub files_written: Vec<String>,
    pub refused: Vec<String>,
    pub unknown_keys: Vec<String>,
    /// Top-level keys with a fingerprint of their value, to tell what changed between boots.
    pub fingerprints: std::collections::BTreeMap<String, String>,
}

/// FNV-1a, 64 bits: a stable fingerprint for "did this key change since the last boot".
fn fingerprint(b: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Un-gzips when the data starts with the gzip magic.
/// Why user-data was not applied at all (what is refused key by key goes in `Applied::refused`).
#[derive(Debug, thiserror::Error)]
pub enum UserDataError {
    #[error("gzip user-data: {0}")]
    Gzip(#[source] std::io::Error),
    #[error("user-data is larger than 16 MiB")]
    TooLarge,
    #[error("user-data is not UTF-8")]
    NotUtf8,
    #[error("user-data is a script: shoal does not run scripts from user-data; use #cloud-config with a shoal: key")]
    Script,
    #[error("user-data must start with #cloud-config")]
    NotCloudConfig,
    #[error("user-data YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("user-data must be a YAML mapping")]
    NotMapping,
}

/// Why one `write_files` entry was refused.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("it resolves (through links) outside /var and /run, or into /run/shoal")]
    Outside,
    #[error("it is a link: write_files follows none")]
    Link,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub fn decompress(raw: &[u8]) -> Result<Vec<u8>, UserDataError> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw)
            .take(MAX_USER_DATA + 1)
            .read_to_end(&mut out)
            .map_err(UserDataError::Gzip)?;
        if out.len() as u64 > MAX_USER_DATA {
            return Err(UserDataError::TooLarge);
        }
        return Ok(out);
    }
    Ok(raw.to_vec())
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Where `write_files` may write: the data disk, the runtime tmpfs and `/etc/docker` (kept on
/// the data disk, `system::writable_etc`: the engine's `daemon.json`, a registry's CA under
/// `certs.d/`), nothing with `..`.
fn writable(path: &str) -> bool {
    let p = Path::new(path);
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && (p.starts_with("/var/") || p.starts_with("/run/") || p.starts_with("/etc/docker/"))
        && !p.starts_with("/run/shoal/")
}

fn write_file(root: &Path, item: &serde_yaml_ng::Value, out: &mut Applied) {
    let path = item.get("path").and_then(|v| v.as_str()).unwrap_or("");
    if !writable(path) {
        out.refused.push(format!(
            "write_files {path:?}: only paths under /var/, /run/ (not /run/shoal/) or /etc/docker/ can be written; the root is read-only"
        ));
        return;
    }
    let content = item.get("content").and_then(|v| v.as_str()).unwrap_or("");
    let encoding = item
        .get("encoding")
        .and_then(|v| v.as_str())
        .unwrap_or("text");
    let bytes = match encoding {
        "text" | "" => content.as_bytes().to_vec(),
        "b64" | "base64" => {
            match base64::engine::general_purpose::STANDARD.decode(content.trim()) {
                Ok(b) => b,
                Err(e) => {
                    out.refused
                        .push(format!("write_files {path}: bad base64: {e}"));
                    return;
                }
            }
        }
        "gzip+b64" | "gz+b64" | "gzip+base64" | "gz+base64" => {
            let gz = match base64::engine::general_purpose::STANDARD.decode(content.trim()) {
                Ok(b) => b,
                Err(e) => {
                    out.refused
                        .push(format!("write_files {path}: bad base64: {e}"));
                    return;
                }
            };
            match decompress(&gz) {
                Ok(b) => b,
                Err(e) => {
                    out.refused.push(format!("write_files {path}: {e}"));
                    return;
                }
            }
        }
        other => {
            out.refused.push(format!(
                "write_files {path}: encoding {other:?} not supported"
            ));
            return;
        }
    };
    let mode = item
        .get("permissions")
        .and_then(|v| {
            v.as_str()
                .map(String::from)
                .or_else(|| v.as_u64().map(|n| format!("{n:o}")))
        })
        .and_then(|p| u32::from_str_radix(p.trim_start_matches("0o"), 8).ok())
        .unwrap_or(0o644)
        & 0o7777;
    let target = root.join(path.trim_start_matches('/'));
    match write_resolved(root, &target, &bytes, mode) {
        Ok(()) => out.files_written.push(path.to_string()),
        Err(e) => out.refused.push(format!("write_files {path}: {e}")),
    }
}

/// Where `p` really is: its deepest existing ancestor resolved through links, plus the rest.
fn resolved(p: &Path) -> std::io::Result<std::path::PathBuf> {
    let mut existing = p;
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize()?;
    out.extend(rest.iter().rev());
    Ok(out)
}

/// Writes `target` (under `root`) only where it really lands under `/var`, `/run` or
/// `/etc/docker` and not under `/run/shoal`, following no link at the last step: `/var/run` is a link to `/run`, so
/// `/var/run/shoal/node.json` must be refused like `/run/shoal/node.json`.
fn write_resolved(root: &Path, target: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = target.parent().ok_or(WriteError::Outside)?;
    let allowed = [
        resolved(&root.join("var")),
        resolved(&root.join("run")),
        resolved(&root.join("etc/docker")),
    ];
    let forbidden = resolved(&root.join("run/shoal"))?;
    let ok = |real: &Path| {
        allowed
            .iter()
            .flatten()
            .any(|a| real.starts_with(a) && real != a.as_path())
            && !real.starts_with(&forbidden)
    };
    // Before anything is made (a link among the existing directories), and after (none can
    // have appeared: PID 1 is the only writer at this stage, but check what was made).
    let real = resolved(dir)?;
    if !ok(&real.join("x")) {
        return Err(WriteError::Outside);
    }
    std::fs::create_dir_all(dir)?;
    let real = dir.canonicalize()?;
    let file = real.join(target.file_name().ok_or(WriteError::Outside)?);
    if !ok(&file) {
        return Err(WriteError::Outside);
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&file)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == nix::errno::Errno::ELOOP as i32 => WriteError::Link,
            _ => e.into(),
        })?;
    f.write_all(bytes)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Processes user-data; `root` is where `write_files` lands.
pub fn process(root: &Path, raw: &[u8]) -> Result<Applied, UserDataError> {
    let data = decompress(raw)?;
    let text = String::from_utf8(data).map_err(|_| UserDataError::NotUtf8)?;
    let first = text.lines().next().unwrap_or("").trim_end();
    if first.starts_with("#!") {
        return Err(UserDataError::Script);
    }
    if first != "#cloud-config" {
        return Err(UserDataError::NotCloudConfig);
    }
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)?;
    let Some(map) = doc.as_mapping() else {
        return Err(UserDataError::NotMapping);
    };
    let mut out = Applied::default();
    for (k, v) in map {
        let key = k.as_str().unwrap_or("?").to_string();
        let raw_v = serde_yaml_ng::to_string(v).unwrap_or_default();
        out.fingerprints
            .insert(key.clone(), fingerprint(raw_v.as_bytes()));
        match key.as_str() {
            "shoal" => {
                if !v.is_mapping() {
                    out.refused.push("shoal: must be a mapping".into());
                    continue;
                }
                match serde_json::to_value(v) {
                    Ok(j) => out.shoal = Some(j),
                    Err(e) => out.refused.push(format!("shoal: {e}")),
                }
            }
            "hostname" | "fqdn" => match v.as_str() {
                Some(h) if valid_hostname(h) => {
                    // fqdn wins over hostname for the full name; the kernel gets the first label.
                    if key == "fqdn" || out.hostname.is_none() {
                        out.hostname = Some(h.to_string());
                    }
                }
                _ => out.refused.push(format!("{key}: not a valid host name")),
            },
            "write_files" => match v.as_sequence() {
                Some(items) => {
                    for item in items {
                        write_file(root, item, &mut out);
                    }
                }
                None => out.refused.push("write_files: must be a list".into()),
            },
            "ntp" => {
                for list in ["servers", "pools"] {
                    if let Some(s) = v.get(list).and_then(|x| x.as_sequence()) {
                        out.ntp.extend(s.iter().filter_map(|x| x.as_str().map(String::from)));
                    }
                }
            }
            "bootcmd" | "runcmd" | "packages" | "package_update" | "package_upgrade" | "users"
            | "ssh_authorized_keys" | "chpasswd" => out.refused.push(format!(
                "{key}: shoal machines run no commands, packages or logins from user-data (immutable image, no SSH); deploy apps through the API instead"
            )),
            _ => out.unknown_keys.push(key),
        }
    }
    Ok(out)
}

/// What changed since the fingerprints of the previous boot.
pub fn changes(
    before: &std::collections::BTreeMap<String, String>,
    now: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in now {
        match before.get(k) {
            None => out.push(format!("{k}: added")),
            Some(b) if b != v => out.push(format!("{k}: changed")),
            _ => {}
        }
    }
    for k in before.keys().filter(|k| !now.contains_key(*k)) {
        out.push(format!("{k}: removed"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    const UD: &str = "#cloud-config\nhostname: web-1\nfqdn: web-1.example.internal\nshoal:\n  peers: [\"10.0.0.2:7443\"]\n  labels: {zone: a}\nntp:\n  servers: [10.0.0.1]\nwrite_files:\n  - path: /var/lib/app/config.txt\n    content: hello\n    permissions: '0600'\n  - path: /etc/passwd\n    content: x\n  - path: /var/../etc/x\n    content: x\n  - path: /run/b64\n    encoding: b64\n    content: aGk=\nruncmd: [\"rm -rf /\"]\npower_state: {mode: reboot}\n";

    #[test]
    fn write_files_follows_no_link_out_of_var_and_run() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["var/lib", "run/shoal", "etc"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("run/shoal/node.json"), "{}").unwrap();
        std::fs::write(root.join("etc/passwd"), "root").unwrap();
        // As on the machine: /var/run is a link to /run. And two planted links.
        std::os::unix::fs::symlink("../run", root.join("var/run")).unwrap();
        std::os::unix::fs::symlink(root.join("etc"), root.join("var/lib/etc")).unwrap();
        std::os::unix::fs::symlink("../../run/shoal/node.json", root.join("var/lib/cfg")).unwrap();
        std::fs::create_dir_all(root.join("etc/docker")).unwrap();
        let ud = "#cloud-config\nwrite_files:\n  - {path: /etc/docker/daemon.json, content: '{}'}\n  - {path: /etc/dockerx/a, content: evil}\n  - {path: /var/run/shoal/node.json, content: evil}\n  - {path: /var/run/shoal/new/x, content: evil}\n  - {path: /var/lib/etc/passwd, content: evil}\n  - {path: /var/lib/cfg, content: evil}\n  - {path: /var/run/ok.txt, content: fine}\n  - {path: /var/lib/app/ok.txt, content: fine}\n";
        let a = process(root, ud.as_bytes()).unwrap();
        assert_eq!(
            a.files_written,
            vec![
                "/etc/docker/daemon.json",
                "/var/run/ok.txt",
                "/var/lib/app/ok.txt"
            ]
        );
        assert_eq!(a.refused.len(), 5, "{:?}", a.refused);
        assert!(!root.join("etc/dockerx").exists());
        assert_eq!(
            std::fs::read_to_string(root.join("run/shoal/node.json")).unwrap(),
            "{}"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/passwd")).unwrap(),
            "root"
        );
        assert!(!root.join("run/shoal/new").exists());
        assert_eq!(
            std::fs::read_to_string(root.join("run/ok.txt")).unwrap(),
            "fine"
        );
        assert!(
            a.refused.iter().any(|r| r.contains("link")),
            "{:?}",
            a.refused
        );
    }

    #[test]
    fn applies_the_safe_subset_and_says_what_it_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = process(dir.path(), UD.as_bytes()).unwrap();
        assert_eq!(a.hostname.as_deref(), Some("web-1.example.internal"));
        assert_eq!(a.ntp, vec!["10.0.0.1".to_string()]);
        assert_eq!(a.shoal.as_ref().unwrap()["labels"]["zone"], "a");
        assert_eq!(
            a.files_written,
            vec![
                "/var/lib/app/config.txt".to_string(),
                "/run/b64".to_string()
            ]
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("run/b64")).unwrap(),
            "hi"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("var/lib/app/config.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.path().join("etc/passwd").exists() && !dir.path().join("etc/x").exists());
        assert_eq!(a.refused.len(), 3, "{:?}", a.refused);
        assert!(a.refused.iter().any(|r| r.starts_with("runcmd")));
        assert_eq!(a.unknown_keys, vec!["power_state".to_string()]);

        // gzip is accepted; scripts and plain text are refused.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(UD.as_bytes()).unwrap();
        let z = process(dir.path(), &gz.finish().unwrap()).unwrap();
        assert_eq!(z.hostname, a.hostname);
        assert!(matches!(
            process(dir.path(), b"#!/bin/sh\necho hi\n"),
            Err(UserDataError::Script)
        ));
        assert!(process(dir.path(), b"hostname: x\n").is_err());

        // The same user-data gives the same fingerprints; a changed key is named.
        let b = process(dir.path(), UD.replace("zone: a", "zone: b").as_bytes()).unwrap();
        assert_eq!(
            changes(&a.fingerprints, &a.fingerprints),
            Vec::<String>::new()
        );
        assert_eq!(
            changes(&a.fingerprints, &b.fingerprints),
            vec!["shoal: changed".to_string()]
        );
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,300}") {
            let dir = tempfile::tempdir().unwrap();
            let _ = process(dir.path(), format!("#cloud-config\n{s}").as_bytes());
            let _ = process(dir.path(), s.as_bytes());
        }
    }
}
