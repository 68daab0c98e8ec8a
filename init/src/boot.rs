//! The boot sequence, as a table: each stage a function over what the earlier ones found
//! (`Boot`), timed, bounded, panic-guarded and recorded in the boot report. Every stage
//! degrades rather than fails the boot; PID 1 goes on to supervise whatever it got.

use crate::env::InitEnv;
use crate::report::{run_stage, Stage};
use crate::report::{Outcome, Report};
use crate::supervisor::Table;
use crate::sys::Sys;
use crate::{clock, cmdline, initrd, metadata, mounts, net, power, system};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the stages found, for the stages after them and for PID 1.
pub struct Boot<'a> {
    pub env: &'a InitEnv,
    pub sys: Arc<dyn Sys>,
    pub cmdline: cmdline::Cmdline,
    pub meta: Option<metadata::Metadata>,
    pub applied: Option<metadata::userdata::Applied>,
    pub net: Arc<Mutex<net::NetState>>,
    pub clock: Arc<Mutex<clock::Kept>>,
    pub buttons: Option<power::Buttons>,
    pub table: Table,
    /// The kernel's uptime once `/proc` is there (right after the mounts stage).
    pub uptime_at_start_ms: u64,
    /// Stages still running on their own threads, recorded as they end (`pid1`).
    pub background: Vec<Background>,
}

/// A stage running on its own thread.
pub struct Background {
    pub name: &'static str,
    pub thread: std::thread::JoinHandle<Stage>,
}

impl Background {
    /// Waits for the stage; a thread that died (`run_stage` catches panics, so it should not)
    /// is a failed stage.
    pub fn join(self) -> Stage {
        let name = self.name;
        self.thread.join().unwrap_or_else(|_| Stage {
            name: name.into(),
            started_ms: 0,
            ended_ms: 0,
            outcome: Outcome::Failed,
            detail: vec!["its thread died".into()],
        })
    }
}

type Run = fn(&mut Boot<'_>, &mut Vec<String>) -> Outcome;
/// Takes what a background stage needs out of `Boot`; the stage itself runs on its own thread.
type Spawn = fn(&Boot<'_>) -> Job;
type Job = Box<dyn FnOnce(&mut Vec<String>) -> Outcome + Send>;

/// One step of the boot.
#[derive(Clone, Copy)]
pub enum Step {
    /// A stage, in order.
    Run(&'static str, Run),
    /// A stage started on its own thread, beside the stages after it; it is recorded when it
    /// ends, and a service that `needs` it waits for it.
    Spawn(&'static str, Spawn),
}

/// The boot, in order. Docker's modules (~100 ms a modprobe under emulation, and their
/// sysctls) are needed by dockerd alone: they load beside the stages after them. The CPU's
/// drivers (crypto self-tests: seconds under emulation) are needed by nothing at boot: they
/// load once the services start.
pub const STEPS: [Step; 16] = [
    Step::Run("mounts", stage_mounts),
    Step::Run("modules", stage_modules),
    Step::Spawn("docker-modules", |b| {
        background(b, |sys, root, d| system::docker_modules(sys, root, d))
    }),
    Step::Run("data-disk", stage_data_disk),
    Step::Run("machine-id", |b, d| {
        system::machine_id(&*b.sys, &b.env.root, d)
    }),
    Step::Run("sysctls", stage_sysctls),
    Step::Run("cmdline", stage_cmdline),
    Step::Run("metadata-local", stage_metadata_local),
    Step::Run("network", stage_network),
    Step::Run("metadata", stage_metadata),
    Step::Run("user-data", stage_user_data),
    Step::Run("hostname", stage_hostname),
    Step::Run("clock", stage_clock),
    Step::Run("power-button", |b, d| {
        let e = b.env;
        b.buttons = Some(power::Buttons::open(&e.root, e.input.as_deref(), e.test, d));
        Outcome::Ok
    }),
    Step::Run("services", |b, d| {
        let (t, o) = load_table(b.env, d);
        b.table = t;
        o
    }),
    // Last: its self-tests would take the CPU from the stages above (under emulation the
    // data disk's fsck took twice as long beside them).
    Step::Spawn("cpu-modules", |b| {
        background(b, |sys, root, d| system::cpu_modules(sys, root, d))
    }),
];

/// Runs every step into `report`; what the stages found, and the stages still running.
pub fn run<'a>(env: &'a InitEnv, sys: Arc<dyn Sys>, report: &mut Report) -> Boot<'a> {
    let mut boot = Boot {
        env,
        sys,
        cmdline: cmdline::Cmdline::default(),
        meta: None,
        applied: None,
        net: Arc::new(Mutex::new(net::NetState::default())),
        clock: Arc::new(Mutex::new(clock::Kept::default())),
        buttons: None,
        table: Table { service: vec![] },
        uptime_at_start_ms: 0,
        background: Vec::new(),
    };
    for step in STEPS {
        match step {
            Step::Run(name, stage) => report.stage(name, |d| stage(&mut boot, d)),
            Step::Spawn(name, spawn) => {
                let job = spawn(&boot);
                match std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || run_stage(name, job))
                {
                    Ok(thread) => boot.background.push(Background { name, thread }),
                    // No thread: in line, then (the job went with the failed spawn).
                    Err(e) => report.stage(name, |d| {
                        d.push(format!("run in line: no thread ({e})"));
                        spawn(&boot)(d)
                    }),
                }
            }
        }
    }
    // What the report carries besides the stages (the initramfs left its own under /run).
    if !env.test {
        report.uptime_at_start_ms = boot.uptime_at_start_ms;
        report.initrd = std::fs::read(env.path("run/shoal/initrd.json"))
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
    clock::keep(
        boot.sys.clone(),
        ntp_servers(&boot),
        every,
        env.test,
        boot.clock.clone(),
    );
    boot
}

/// A job for a background stage over the machine: skipped in test mode (modules belong to the
/// host).
fn background(b: &Boot<'_>, f: fn(&dyn Sys, &std::path::Path, &mut Vec<String>) -> Outcome) -> Job {
    let (sys, root, test) = (b.sys.clone(), b.env.root.clone(), b.env.test);
    Box::new(move |d| {
        if test {
            d.push("skipped in test mode".into());
            return Outcome::Ok;
        }
        f(&*sys, &root, d)
    })
}

fn stage_mounts(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    let ok = mounts::mount_all(&*b.sys, &b.env.root, d);
    if !b.env.test {
        b.uptime_at_start_ms = initrd::uptime_ms(&b.env.root);
        if let Some(r) = std::fs::read_to_string(b.env.path("proc/self/mountinfo"))
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
    system::modules(&*b.sys, &b.env.root, d)
}

fn stage_data_disk(b: &mut Boot<'_>, d: &mut Vec<String>) -> Outcome {
    if b.env.test && b.env.disks.is_none() {
        d.push("skipped in test mode (no SHOAL_INIT_DISKS)".into());
        return Outcome::Ok;
    }
    system::data_disk(&*b.sys, b.env, d)
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
    let which: Vec<(&str, &str)> = system::SYSCTLS
        .into_iter()
        .filter(|(k, _)| !b.env.test || k.starts_with("net/"))
        .collect();
    system::sysctls(&b.env.root, &which, d)
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
    net::apply(&b.sys, &b.env.root, only, &cfg, &source, &b.net, d)
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
    match b.sys.sethostname(&short) {
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
    let r = clock::check(&*b.sys, &ntp_servers(b)(), b.env.test, &mut k);
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
            d.push(e.to_string());
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
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            detail.push(format!("{path}: {e}; running no services"));
            return (Table { service: vec![] }, Outcome::Failed);
        }
    };
    match Table::parse(&text) {
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

#[cfg(test)]
mod tests {
    //! The boot of a real (not test-mode) machine, through the recording `Sys`: a scratch root
    //! stands in for what the kernel shows, and nothing is mounted, loaded or configured.

    use super::*;
    use crate::sys::fake::{Call, Recording};
    use nix::errno::Errno;
    use std::path::Path;

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// A machine with no data disk, no metadata and one NIC without a device (so no DHCP).
    fn machine() -> (tempfile::TempDir, InitEnv) {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        put(
            r,
            "proc/sys/kernel/random/uuid",
            "0f5e1d2c-3b4a-4958-8776-655443322110\n",
        );
        for (k, _) in system::SYSCTLS.iter().chain(&system::BRIDGE_SYSCTLS) {
            put(r, &format!("proc/sys/{k}"), "0\n");
        }
        std::fs::create_dir_all(r.join("sys/module/loop")).unwrap();
        let env = InitEnv {
            root: r.to_path_buf(),
            test: false,
            services: None,
            disks: None,
            net_ifaces: None,
            input: None,
            uts: false,
            cmdline: Some(String::new()),
            metadata_host: None,
            clock_wrong: false,
            ntp_interval: None,
            dmi: r.join("sys/class/dmi/id"),
        };
        (dir, env)
    }

    /// Boots, then waits for the background stages (recorded after the others).
    fn boot(env: &InitEnv, sys: &Arc<Recording>) -> (Report, Vec<String>) {
        let mut report = Report::default();
        let b = run(env, sys.clone(), &mut report);
        let services = b.table.service.iter().map(|s| s.name.clone()).collect();
        for bg in b.background {
            report.stages.push(bg.join());
        }
        (report, services)
    }

    fn stage<'r>(report: &'r Report, name: &str) -> &'r Stage {
        report
            .stages
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no stage {name}"))
    }

    fn position(calls: &[Call], what: impl Fn(&Call) -> bool) -> usize {
        calls
            .iter()
            .position(what)
            .unwrap_or_else(|| panic!("not called: {calls:#?}"))
    }

    fn mount_of(target: &str) -> impl Fn(&Call) -> bool + '_ {
        move |c| matches!(c, Call::Mount { target: t, .. } if t == target)
    }

    #[test]
    fn the_stages_run_in_order_and_a_machine_without_a_data_disk_still_boots() {
        let (dir, env) = machine();
        let sys = Arc::new(Recording::new(dir.path()));
        let (report, services) = boot(&env, &sys);

        // Every stage in the table's order; the background ones once they end.
        let names: Vec<&str> = report.stages.iter().map(|s| s.name.as_str()).collect();
        let mut expected: Vec<&str> = STEPS
            .iter()
            .filter_map(|s| match s {
                Step::Run(n, _) => Some(*n),
                Step::Spawn(..) => None,
            })
            .collect();
        expected.extend(["docker-modules", "cpu-modules"]);
        assert_eq!(names, expected);

        // The pseudo file systems first, in order; the data disk's stand-in after them; the
        // host name once the machine id is known.
        let calls = sys.calls();
        let firsts: Vec<String> = calls
            .iter()
            .filter_map(|c| match c {
                Call::Mount { target, .. } => Some(target.clone()),
                _ => None,
            })
            .take(8)
            .collect();
        assert_eq!(
            firsts,
            [
                "/proc",
                "/sys",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/run",
                "/tmp",
                "/sys/fs/cgroup"
            ]
        );
        let var = position(&calls, mount_of("/var"));
        assert!(matches!(&calls[var], Call::Mount { fstype: Some(f), .. } if f == "tmpfs"));
        let data = stage(&report, "data-disk");
        assert_eq!(data.outcome, Outcome::Degraded);
        assert!(
            data.detail.iter().any(|d| d.contains("NO DATA DISK")),
            "{data:?}"
        );
        let host = position(
            &calls,
            |c| matches!(c, Call::SetHostname(h) if h == "shoal-0f5e1d2c"),
        );
        assert!(host > var);
        // Loopback is brought up; the NIC without a device gets no DHCP.
        assert!(calls.contains(&Call::LinkUp(1)));
        assert!(!calls.contains(&Call::LinkUp(2)));
        assert_eq!(stage(&report, "network").outcome, Outcome::Degraded);
        // Docker's modules were asked for (the fake loads nothing, so they are reported).
        assert!(calls.iter().any(
            |c| matches!(c, Call::Run(argv) if argv[0] == "modprobe" && argv.contains(&"overlay".to_string()))
        ));
        let docker = stage(&report, "docker-modules");
        assert_eq!(docker.outcome, Outcome::Degraded);
        assert!(docker.detail.iter().any(|d| d == "overlay: not loaded"));
        // Whatever degraded, the services are there to supervise.
        assert_eq!(stage(&report, "services").outcome, Outcome::Ok);
        assert_eq!(services, ["containerd", "dockerd", "agent"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("run/machine-id")).unwrap(),
            "0f5e1d2c3b4a49588776655443322110\n"
        );
    }

    #[test]
    fn a_mount_the_kernel_refuses_degrades_its_stage_and_the_boot_goes_on() {
        let (dir, env) = machine();
        let sys = Arc::new(Recording::new(dir.path()));
        sys.fail(|c| mount_of("/sys/fs/cgroup")(c).then_some(Errno::EPERM));
        let (report, services) = boot(&env, &sys);
        let mounts = stage(&report, "mounts");
        assert_eq!(mounts.outcome, Outcome::Degraded);
        assert!(
            mounts
                .detail
                .iter()
                .any(|d| d.starts_with("/sys/fs/cgroup: EPERM")),
            "{mounts:?}"
        );
        // Tried with nsdelegate and again without it.
        let tries = sys
            .calls()
            .iter()
            .filter(|c| mount_of("/sys/fs/cgroup")(c))
            .count();
        assert_eq!(tries, 2);
        assert_eq!(stage(&report, "machine-id").outcome, Outcome::Ok);
        assert_eq!(services.len(), 3);
    }

    #[test]
    fn docker_modules_that_load_and_their_sysctls_make_the_stage_ok() {
        let (dir, env) = machine();
        for m in system::DOCKER_MODULES {
            std::fs::create_dir_all(dir.path().join("sys/module").join(m)).unwrap();
        }
        let sys = Arc::new(Recording::new(dir.path()));
        let (report, _) = boot(&env, &sys);
        assert_eq!(stage(&report, "docker-modules").outcome, Outcome::Ok);
        // Nothing to load, so no modprobe for them.
        assert!(!sys
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Run(argv) if argv.contains(&"overlay".to_string()))));
        let set = std::fs::read_to_string(
            dir.path()
                .join("proc/sys/net/bridge/bridge-nf-call-iptables"),
        )
        .unwrap();
        assert_eq!(set, "1");
    }
}
