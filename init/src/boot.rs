//! The boot sequence, as a table: each stage a function over what the earlier ones found
//! (`Boot`), timed, bounded, panic-guarded and recorded in the boot report. Every stage
//! degrades rather than fails the boot; PID 1 goes on to supervise whatever it got.

use crate::env::InitEnv;
use crate::report::{Outcome, Report};
use crate::supervisor::Table;
use crate::{clock, cmdline, initrd, metadata, mounts, net, power, system};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the stages found, for the stages after them and for PID 1.
pub struct Boot<'a> {
    pub env: &'a InitEnv,
    pub cmdline: cmdline::Cmdline,
    pub meta: Option<metadata::Metadata>,
    pub applied: Option<metadata::userdata::Applied>,
    pub net: Arc<Mutex<net::NetState>>,
    pub clock: Arc<Mutex<clock::Kept>>,
    pub buttons: Option<power::Buttons>,
    pub table: Table,
    /// The kernel's uptime once `/proc` is there (right after the mounts stage).
    pub uptime_at_start_ms: u64,
}

type Stage = fn(&mut Boot<'_>, &mut Vec<String>) -> Outcome;

/// The stages, in order.
pub const STAGES: [(&str, Stage); 14] = [
    ("mounts", stage_mounts),
    ("modules", stage_modules),
    ("data-disk", stage_data_disk),
    ("machine-id", |b, d| system::machine_id(&b.env.root, d)),
    ("sysctls", stage_sysctls),
    ("cmdline", stage_cmdline),
    ("metadata-local", stage_metadata_local),
    ("network", stage_network),
    ("metadata", stage_metadata),
    ("user-data", stage_user_data),
    ("hostname", stage_hostname),
    ("clock", stage_clock),
    ("power-button", |b, d| {
        let e = b.env;
        b.buttons = Some(power::Buttons::open(&e.root, e.input.as_deref(), e.test, d));
        Outcome::Ok
    }),
    ("services", |b, d| {
        let (t, o) = load_table(b.env, d);
        b.table = t;
        o
    }),
];

/// Runs every stage into `report`; what they found.
pub fn run<'a>(env: &'a InitEnv, report: &mut Report) -> Boot<'a> {
    let mut boot = Boot {
        env,
        cmdline: cmdline::Cmdline::default(),
        meta: None,
        applied: None,
        net: Arc::new(Mutex::new(net::NetState::default())),
        clock: Arc::new(Mutex::new(clock::Kept::default())),
        buttons: None,
        table: Table { service: vec![] },
        uptime_at_start_ms: 0,
    };
    for (name, stage) in STAGES {
        report.stage(name, |d| stage(&mut boot, d));
    }
    // What the report carries besides the stages (the initramfs left its own under /run).
    if !env.test {
        report.uptime_at_start_ms = boot.uptime_at_start_ms;
        report.initrd = std::fs::read("/run/shoal/initrd.json")
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
    }
    report.metadata = serde_json::json!({
        "source": boot.meta.as_ref().map(|m| m.source.clone()),
        "instance_id": boot.meta.as_ref().and_then(|m| m.instance_id.clone()),
        "user_data": boot.applied,
    });
    let every = env.ntp_interval.unwrap_or(clock::INTERVAL);
    clock::keep(ntp_servers(&boot), every, env.test, boot.clock.clone());
    boot
}

fn stage_mounts(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    let ok = mounts::mount_all(&b.env.root, d);
    if !b.env.test {
        b.uptime_at_start_ms = initrd::uptime_ms();
        if let Some(r) = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|mi| mounts::describe_root(&mi))
        {
            d.push(r);
        }
    }
    if ok {
        Outcome::Ok
    } else {
        Outcome::Degraded
    }
}

fn stage_modules(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    if b.env.test {
        d.push("skipped in test mode".into());
        return Outcome::Ok;
    }
    system::modules(&b.env.root, d)
}

fn stage_data_disk(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    if b.env.test && b.env.disks.is_none() {
        d.push("skipped in test mode (no SHOAL_INIT_DISKS)".into());
        return Outcome::Ok;
    }
    system::data_disk(b.env, d)
}

fn stage_sysctls(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    // Network sysctls belong to the network namespace; a test has its own only when it
    // names interfaces.
    if b.env.test && b.env.net_ifaces.is_none() {
        d.push("skipped in test mode".into());
        return Outcome::Ok;
    }
    if b.env.test {
        d.push("network sysctls only in test mode".into());
    }
    system::sysctls(&b.env.root, b.env.test, d)
}

fn stage_cmdline(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    // A test must not pick up the host's command line.
    let text = match &b.env.cmdline {
        Some(t) => t.clone(),
        None => std::fs::read_to_string(b.env.path("proc/cmdline")).unwrap_or_default(),
    };
    let c = cmdline::Cmdline::parse(&text);
    if let Some(ip) = c.get("ip") {
        d.push(format!("ip={ip}"));
    }
    b.cmdline = c;
    Outcome::Ok
}

/// Metadata that needs no network: a NoCloud seed named on the command line or on a
/// `cidata` volume, or an OpenStack config drive.
fn stage_metadata_local(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    b.meta = local_metadata(b.env, &b.cmdline, d);
    if let Some(m) = &b.meta {
        d.push(format!("source: {}", m.source));
    }
    Outcome::Ok
}

fn stage_network(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    // A test touches only the interfaces it names, in its own network namespace.
    if b.env.test && b.env.net_ifaces.is_none() {
        d.push("skipped in test mode (no SHOAL_INIT_NET_IFACES)".into());
        return Outcome::Ok;
    }
    let nc = b.meta.as_ref().and_then(|m| m.network_config.as_deref());
    let (cfg, source) = net::choose(&b.cmdline, nc, d);
    let only = b.env.net_ifaces.as_deref();
    net::apply(&b.env.root, only, &cfg, &source, &b.net, d)
}

fn stage_metadata(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    if b.meta.is_none() {
        let allowed = metadata::platform(&b.cmdline, &b.env.dmi);
        if let Some(host) = &b.env.metadata_host {
            b.meta = metadata::remote(&b.cmdline, host, &allowed, Duration::from_secs(5), d);
        }
    }
    match &b.meta {
        Some(m) => {
            d.push(format!("source: {}", m.source));
            Outcome::Ok
        }
        None => {
            d.push("no metadata source: dev mode".into());
            Outcome::Degraded
        }
    }
}

fn stage_user_data(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    user_data(&b.env.root, b.meta.as_ref(), &mut b.applied, d)
}

fn stage_hostname(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    let root = &b.env.root;
    let from_net = b.net.lock().ok().and_then(|n| n.hostname.clone());
    let name = b
        .applied
        .as_ref()
        .and_then(|a| a.hostname.clone())
        .or_else(|| b.meta.as_ref().and_then(|m| m.hostname.clone()))
        .or(from_net)
        .unwrap_or_else(|| derived_hostname(root));
    let short = name.split('.').next().unwrap_or(&name).to_string();
    d.push(short.clone());
    report_hostname(root, &short);
    if b.env.test && !b.env.uts {
        d.push("not set in test mode (no SHOAL_INIT_UTS)".into());
        return Outcome::Ok;
    }
    match nix::unistd::sethostname(&short) {
        Ok(()) => Outcome::Ok,
        Err(e) => {
            d.push(format!("sethostname: {e}"));
            Outcome::Degraded
        }
    }
}

/// The NTP servers: user-data's, DHCP's (read again at every check: renewals may change
/// them), then the cloud's own where the platform is named (as for metadata).
fn ntp_servers(b: &Boot<'_>) -> impl Fn() -> Vec<String> + Send + 'static {
    let user: Vec<String> = b
        .applied
        .as_ref()
        .map(|a| a.ntp.clone())
        .unwrap_or_default();
    let cloud: Vec<String> = metadata::platform(&b.cmdline, &b.env.dmi)
        .into_iter()
        .filter_map(|p| match p {
            "ec2" => Some("169.254.169.123".to_string()),
            "gce" => Some(metadata::LINK_LOCAL.to_string()),
            _ => None,
        })
        .collect();
    let net = b.net.clone();
    move || {
        let mut v = user.clone();
        if let Ok(n) = net.lock() {
            v.extend(n.ntp.iter().cloned());
        }
        v.extend(cloud.iter().cloned());
        v.dedup();
        v
    }
}

fn stage_clock(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    let wrong = clock::obviously_wrong(std::time::SystemTime::now()) || b.env.clock_wrong;
    let mut k = clock::Kept::default();
    let r = clock::check(&ntp_servers(b)(), b.env.test, &mut k);
    if let Ok(mut g) = b.clock.lock() {
        *g = k;
    }
    match r {
        Ok(said) => {
            d.push(said);
            Outcome::Ok
        }
        Err(e) if wrong => {
            d.push(format!("clock is obviously wrong: {e}"));
            Outcome::Degraded
        }
        Err(e) => {
            d.push(format!("clock is plausible; not checked: {e}"));
            Outcome::Ok
        }
    }
}

fn local_metadata(
    env: &InitEnv,
    cmdline: &cmdline::Cmdline,
    d: &mut Vec<String>,
) -> Option<metadata::Metadata> {
    let root = env.root.as_path();
    if let Some((seed, h, i)) = metadata::nocloud_ds(cmdline) {
        if let Some(path) = seed.strip_prefix("file://") {
            match metadata::nocloud_dir(std::path::Path::new(path), &format!("nocloud ({seed})")) {
                Some(mut m) => {
                    m.hostname = h.or(m.hostname);
                    m.instance_id = i.or(m.instance_id);
                    return Some(m);
                }
                None => d.push(format!("{seed}: no meta-data there")),
            }
        }
    }
    // Read in user space (ISO 9660 with Joliet, or FAT): no kernel module, nothing mounted.
    for label in ["cidata", "config-2"] {
        let Some((dev, probe)) = metadata::volume::find(root, env.disks.as_deref(), label) else {
            continue;
        };
        let wanted: &[&str] = if label == "cidata" {
            &metadata::NOCLOUD_FILES
        } else {
            &metadata::CONFIG_DRIVE_FILES
        };
        let files = match metadata::seedfs::files(&dev, probe.fstype, wanted) {
            Ok(f) => f,
            Err(e) => {
                d.push(format!("{}: {e}", dev.display()));
                continue;
            }
        };
        let m = if label == "cidata" {
            metadata::nocloud_files(&files, &format!("nocloud ({} {label})", dev.display()))
        } else {
            metadata::config_drive_files(&files)
        };
        if m.is_some() {
            return m;
        }
        d.push(format!(
            "{}: labelled {label} but holds no metadata",
            dev.display()
        ));
    }
    None
}

/// Applies user-data and writes the agent's `node.json` (0600: it holds the bundle).
fn user_data(
    root: &std::path::Path,
    meta: Option<&metadata::Metadata>,
    applied: &mut Option<metadata::userdata::Applied>,
    d: &mut Vec<String>,
) -> Outcome {
    let Some(raw) = meta.and_then(|m| m.user_data.as_ref()) else {
        d.push("no user-data".into());
        return Outcome::Ok;
    };
    let a = match metadata::userdata::process(root, raw) {
        Ok(a) => a,
        Err(e) => {
            d.push(e);
            return Outcome::Failed;
        }
    };
    let mut outcome = Outcome::Ok;
    for r in &a.refused {
        d.push(format!("refused {r}"));
        outcome = Outcome::Degraded;
    }
    if !a.unknown_keys.is_empty() {
        d.push(format!(
            "unknown keys (ignored): {}",
            a.unknown_keys.join(", ")
        ));
    }
    // The same user-data gives the same machine: record what changed since the last boot.
    let state = root.join("var/lib/shoal/init/user-data.json");
    let before: Option<std::collections::BTreeMap<String, String>> = std::fs::read(&state)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    match before {
        Some(b) => {
            let c = metadata::userdata::changes(&b, &a.fingerprints);
            if c.is_empty() {
                d.push("user-data unchanged since the last boot".into());
            } else {
                d.push(format!(
                    "user-data changed since the last boot: {}",
                    c.join(", ")
                ));
            }
        }
        None => d.push("first boot with this user-data".into()),
    }
    if let Some(dir) = state.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(
        &state,
        serde_json::to_vec(&a.fingerprints).unwrap_or_default(),
    );
    if let Some(shoal) = &a.shoal {
        let path = root.join("run/shoal/node.json");
        let body = serde_json::to_vec_pretty(shoal).unwrap_or_default();
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let w = std::fs::create_dir_all(root.join("run/shoal")).and_then(|_| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(&body)
        });
        match w {
            Ok(()) => d.push("node.json written".into()),
            Err(e) => {
                d.push(format!("node.json: {e}"));
                outcome = Outcome::Failed;
            }
        }
    }
    *applied = Some(a);
    outcome
}

/// `shoal-` and the first 8 hex digits of the machine id.
fn derived_hostname(root: &std::path::Path) -> String {
    let id = std::fs::read_to_string(root.join("etc/machine-id"))
        .or_else(|_| std::fs::read_to_string(root.join("run/machine-id")))
        .unwrap_or_default();
    let id = id.trim();
    if id.len() >= 8 {
        format!("shoal-{}", &id[..8])
    } else {
        "shoal".into()
    }
}

fn report_hostname(root: &std::path::Path, name: &str) {
    let _ = std::fs::create_dir_all(root.join("run/shoal"));
    let _ = std::fs::write(root.join("run/shoal/hostname"), format!("{name}\n"));
}

fn load_table(env: &InitEnv, detail: &mut Vec<String>) -> (Table, Outcome) {
    let Some(file) = &env.services else {
        return (Table::default_table(), Outcome::Ok);
    };
    let path = file.display();
    match std::fs::read_to_string(file)
        .map_err(|e| e.to_string())
        .and_then(|t| Table::parse(&t))
    {
        Ok(t) => {
            detail.push(format!("{} services from {path}", t.service.len()));
            (t, Outcome::Ok)
        }
        Err(e) => {
            detail.push(format!("{path}: {e}; running no services"));
            (Table { service: vec![] }, Outcome::Failed)
        }
    }
}
