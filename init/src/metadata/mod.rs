//! Cloud metadata, first match wins, each source time-bounded:
//! - before the network: NoCloud from the kernel command line (`ds=nocloud;s=file:///...`) or a
//!   volume labelled `cidata` (vfat or iso9660), OpenStack's config drive (`config-2`);
//! - after it: NoCloud over HTTP (`ds=nocloud-net;s=http://...`), EC2 (IMDSv2: a session token
//!   from `PUT /latest/api/token`, then every read with it), GCE (`Metadata-Flavor: Google`),
//!   OpenStack's metadata service.
//!
//! Without any, the machine boots in dev mode. The agent itself never calls a metadata service.

pub mod http;
pub mod seedfs;
pub mod userdata;
pub mod volume;

use crate::cmdline::Cmdline;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

pub const LINK_LOCAL: &str = "169.254.169.254";

#[derive(Debug, Clone, Default, Serialize)]
pub struct Metadata {
    pub source: String,
    pub instance_id: Option<String>,
    pub hostname: Option<String>,
    #[serde(skip)]
    pub user_data: Option<Vec<u8>>,
    #[serde(skip)]
    pub network_config: Option<String>,
}

/// `ds=nocloud;s=<seed>;h=<hostname>;i=<instance-id>` → (seed, hostname, instance id).
pub fn nocloud_ds(cmdline: &Cmdline) -> Option<(String, Option<String>, Option<String>)> {
    let ds = cmdline.get("ds")?;
    let mut parts = ds.split(';');
    let kind = parts.next()?;
    if !matches!(kind, "nocloud" | "nocloud-net") {
        return None;
    }
    let (mut seed, mut h, mut i) = (None, None, None);
    for p in parts {
        match p.split_once('=') {
            Some(("s" | "seedfrom", v)) => seed = Some(v.to_string()),
            Some(("h" | "local-hostname", v)) => h = Some(v.to_string()),
            Some(("i" | "instance-id", v)) => i = Some(v.to_string()),
            _ => {}
        }
    }
    Some((seed.unwrap_or_default(), h, i))
}

/// Reads `meta-data` (YAML or JSON): instance id and hostname.
fn meta_data(text: &str) -> (Option<String>, Option<String>) {
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).unwrap_or_default();
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
    (
        s("instance-id"),
        s("local-hostname").or_else(|| s("hostname")),
    )
}

/// The files of a NoCloud seed, by name.
pub const NOCLOUD_FILES: [&str; 3] = ["meta-data", "user-data", "network-config"];
/// The files of an OpenStack config drive.
pub const CONFIG_DRIVE_FILES: [&str; 2] = [
    "openstack/latest/meta_data.json",
    "openstack/latest/user_data",
];

/// A NoCloud seed from its files.
pub fn nocloud_files(files: &BTreeMap<String, Vec<u8>>, source: &str) -> Option<Metadata> {
    let md = String::from_utf8_lossy(files.get("meta-data")?).into_owned();
    let (instance_id, hostname) = meta_data(&md);
    Some(Metadata {
        source: source.into(),
        instance_id,
        hostname,
        user_data: files.get("user-data").cloned(),
        network_config: files
            .get("network-config")
            .map(|b| String::from_utf8_lossy(b).into_owned()),
    })
}

/// A NoCloud seed in a directory (a `file://` seed).
pub fn nocloud_dir(dir: &Path, source: &str) -> Option<Metadata> {
    let files: BTreeMap<String, Vec<u8>> = NOCLOUD_FILES
        .iter()
        .filter_map(|n| Some((n.to_string(), std::fs::read(dir.join(n)).ok()?)))
        .collect();
    nocloud_files(&files, source)
}

/// Why a metadata service gave no metadata.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("{what}: HTTP {status}")]
    Status { what: String, status: u16 },
    #[error("{what}: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("{0} answered without an instance id")]
    NoInstanceId(&'static str),
    #[error("not a GCE metadata server (no Metadata-Flavor: Google)")]
    NotGce,
}

type Result<T> = std::result::Result<T, MetadataError>;

fn status(what: impl Into<String>, status: u16) -> MetadataError {
    MetadataError::Status {
        what: what.into(),
        status,
    }
}

fn get(url: &str, headers: &[(&str, &str)], timeout: Duration) -> Result<http::Response> {
    Ok(http::request("GET", url, headers, timeout)?)
}

/// A NoCloud seed over HTTP.
pub fn nocloud_http(seed: &str, timeout: Duration) -> Result<Metadata> {
    let base = if seed.ends_with('/') {
        seed.to_string()
    } else {
        format!("{seed}/")
    };
    let md = get(&format!("{base}meta-data"), &[], timeout)?;
    if md.status != 200 {
        return Err(status(format!("{base}meta-data"), md.status));
    }
    let (instance_id, hostname) = meta_data(&String::from_utf8_lossy(&md.body));
    let fetch = |name: &str| {
        get(&format!("{base}{name}"), &[], timeout)
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.body)
    };
    Ok(Metadata {
        source: format!("nocloud-net ({base})"),
        instance_id,
        hostname,
        user_data: fetch("user-data"),
        network_config: fetch("network-config").map(|b| String::from_utf8_lossy(&b).into_owned()),
    })
}

/// EC2 with IMDSv2: every read carries a session token obtained by PUT.
pub fn ec2(host: &str, timeout: Duration) -> Result<Metadata> {
    let base = format!("http://{host}");
    let t = http::request(
        "PUT",
        &format!("{base}/latest/api/token"),
        &[("X-aws-ec2-metadata-token-ttl-seconds", "300")],
        timeout,
    )?;
    if t.status != 200 {
        return Err(status("IMDSv2 token", t.status));
    }
    let token = String::from_utf8_lossy(&t.body).trim().to_string();
    let h = [("X-aws-ec2-metadata-token", token.as_str())];
    let read = |path: &str| -> Result<Option<Vec<u8>>> {
        let r = get(&format!("{base}{path}"), &h, timeout)?;
        match r.status {
            200 => Ok(Some(r.body)),
            404 => Ok(None),
            s => Err(status(path, s)),
        }
    };
    let text = |b: Option<Vec<u8>>| b.map(|b| String::from_utf8_lossy(&b).trim().to_string());
    let instance_id = text(read("/latest/meta-data/instance-id")?);
    if instance_id.is_none() {
        return Err(MetadataError::NoInstanceId("IMDS"));
    }
    Ok(Metadata {
        source: "ec2 (IMDSv2)".into(),
        instance_id,
        hostname: text(read("/latest/meta-data/local-hostname")?),
        user_data: read("/latest/user-data")?,
        network_config: None,
    })
}

/// GCE: reads need `Metadata-Flavor: Google`, and answers carry it back.
pub fn gce(host: &str, timeout: Duration) -> Result<Metadata> {
    let base = format!("http://{host}/computeMetadata/v1/instance");
    let h = [("Metadata-Flavor", "Google")];
    let read = |path: &str| -> Result<Option<Vec<u8>>> {
        let r = get(&format!("{base}{path}"), &h, timeout)?;
        if r.header("metadata-flavor") != Some("Google") {
            return Err(MetadataError::NotGce);
        }
        match r.status {
            200 => Ok(Some(r.body)),
            404 => Ok(None),
            s => Err(status(path, s)),
        }
    };
    let text = |b: Option<Vec<u8>>| b.map(|b| String::from_utf8_lossy(&b).trim().to_string());
    let instance_id = text(read("/id")?);
    if instance_id.is_none() {
        return Err(MetadataError::NoInstanceId("the GCE metadata server"));
    }
    Ok(Metadata {
        source: "gce".into(),
        instance_id,
        hostname: text(read("/hostname")?)
            .map(|h| h.split('.').next().unwrap_or_default().to_string()),
        user_data: read("/attributes/user-data")?,
        network_config: None,
    })
}

/// OpenStack's metadata service (JSON meta_data plus user_data).
pub fn openstack(host: &str, timeout: Duration) -> Result<Metadata> {
    let base = format!("http://{host}/openstack/latest");
    let md = get(&format!("{base}/meta_data.json"), &[], timeout)?;
    if md.status != 200 {
        return Err(status("meta_data.json", md.status));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&md.body).map_err(|source| MetadataError::Json {
            what: "meta_data.json",
            source,
        })?;
    let ud = get(&format!("{base}/user_data"), &[], timeout)?;
    Ok(Metadata {
        source: "openstack".into(),
        instance_id: v["uuid"].as_str().map(String::from),
        hostname: v["hostname"]
            .as_str()
            .map(|h| h.split('.').next().unwrap_or_default().to_string()),
        user_data: (ud.status == 200).then_some(ud.body),
        network_config: None,
    })
}

/// OpenStack's config drive, from its files.
pub fn config_drive_files(files: &BTreeMap<String, Vec<u8>>) -> Option<Metadata> {
    let v: serde_json::Value = serde_json::from_slice(files.get(CONFIG_DRIVE_FILES[0])?).ok()?;
    Some(Metadata {
        source: "openstack (config drive)".into(),
        instance_id: v["uuid"].as_str().map(String::from),
        hostname: v["hostname"]
            .as_str()
            .map(|h| h.split('.').next().unwrap_or_default().to_string()),
        user_data: files.get(CONFIG_DRIVE_FILES[1]).cloned(),
        network_config: None,
    })
}

/// The plain-HTTP metadata services this machine's platform names: from the kernel command
/// line (`ds=ec2`, `ds=gce`, `ds=openstack`), else from the firmware's DMI strings (`dmi` is
/// `/sys/class/dmi/id`). None elsewhere: on bare metal or a LAN, whoever answers at the
/// link-local address (a rogue DHCP server's route, a neighbour) must not hand the machine its
/// user-data.
pub fn platform(cmdline: &Cmdline, dmi: &Path) -> Vec<&'static str> {
    if let Some(ds) = cmdline.get("ds") {
        let kind = ds
            .split(';')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match kind.as_str() {
            "ec2" => return vec!["ec2"],
            "gce" | "gcp" => return vec!["gce"],
            "openstack" => return vec!["openstack"],
            _ => {}
        }
    }
    let read = |f: &str| {
        std::fs::read_to_string(dmi.join(f))
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    };
    let strings = [
        read("sys_vendor"),
        read("product_name"),
        read("bios_vendor"),
        read("bios_version"),
        read("chassis_asset_tag"),
    ];
    let any = |needles: &[&str]| {
        strings
            .iter()
            .any(|s| needles.iter().any(|n| s.contains(n)))
    };
    let mut out = Vec::new();
    if any(&["amazon ec2", "amazon"]) {
        out.push("ec2");
    }
    if any(&["google compute engine", "google"]) {
        out.push("gce");
    }
    if any(&["openstack"]) {
        out.push("openstack");
    }
    out
}

/// The link-local services the platform names (`platform`), in turn, within `budget`
/// overall. A missing service fails fast (no route, refused); a silent one costs at most its
/// share of the budget.
pub fn remote(
    cmdline: &Cmdline,
    host: &str,
    allowed: &[&str],
    budget: Duration,
    detail: &mut Vec<String>,
) -> Option<Metadata> {
    let end = Instant::now() + budget;
    let left = || {
        end.saturating_duration_since(Instant::now())
            .min(Duration::from_secs(2))
    };
    if let Some((seed, h, i)) = nocloud_ds(cmdline) {
        if seed.starts_with("http://") {
            match nocloud_http(&seed, left()) {
                Ok(mut m) => {
                    m.hostname = h.or(m.hostname);
                    m.instance_id = i.or(m.instance_id);
                    return Some(m);
                }
                Err(e) => detail.push(format!("nocloud-net: {e}")),
            }
        }
    }
    type Probe = fn(&str, Duration) -> Result<Metadata>;
    let probes: [(&str, Probe); 3] = [("ec2", ec2), ("gce", gce), ("openstack", openstack)];
    if allowed.is_empty() {
        detail.push(
            "no cloud platform named (DMI, ds=): no plain-HTTP metadata service probed".into(),
        );
        return None;
    }
    for (name, probe) in probes {
        if !allowed.contains(&name) {
            continue;
        }
        if left().is_zero() {
            detail.push("metadata: time budget spent".into());
            break;
        }
        match probe(host, left()) {
            Ok(m) => return Some(m),
            Err(e) => detail.push(format!("{name}: {e}")),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dmi(vendor: &str, product: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("sys_vendor"), format!("{vendor}\n")).unwrap();
        std::fs::write(d.path().join("product_name"), format!("{product}\n")).unwrap();
        d
    }

    #[test]
    fn only_a_named_platform_gets_probed_over_plain_http() {
        let none = Cmdline::parse("console=ttyS0");
        for (vendor, product, want) in [
            ("Amazon EC2", "t3.micro", vec!["ec2"]),
            ("Google", "Google Compute Engine", vec!["gce"]),
            ("OpenStack Foundation", "OpenStack Nova", vec!["openstack"]),
            ("QEMU", "Standard PC (Q35 + ICH9, 2009)", vec![]),
            ("Dell Inc.", "PowerEdge R640", vec![]),
        ] {
            let d = dmi(vendor, product);
            assert_eq!(platform(&none, d.path()), want, "{vendor} {product}");
        }
        // Missing DMI (a container, odd firmware): nothing.
        assert!(platform(&none, Path::new("/nonexistent")).is_empty());
        // The kernel command line names it outright.
        let bare = dmi("Dell Inc.", "PowerEdge R640");
        assert_eq!(
            platform(&Cmdline::parse("ds=ec2"), bare.path()),
            vec!["ec2"]
        );
        assert_eq!(
            platform(&Cmdline::parse("ds=openstack"), bare.path()),
            vec!["openstack"]
        );
    }

    #[test]
    fn nothing_named_means_nothing_probed() {
        // A server that would answer as any cloud: never asked.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = l.local_addr().unwrap().to_string();
        l.set_nonblocking(true).unwrap();
        let mut detail = Vec::new();
        let m = remote(
            &Cmdline::parse(""),
            &host,
            &[],
            Duration::from_secs(2),
            &mut detail,
        );
        assert!(m.is_none());
        assert!(l.accept().is_err(), "a connection was made");
        assert!(detail[0].contains("no cloud platform named"), "{detail:?}");
    }
}
