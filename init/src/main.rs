//! shoal-init, the PID 1 of a shoal machine: mounts, then supervises containerd, dockerd and
//! the agent, reaps every zombie, and on SIGTERM/SIGINT (reboot) or SIGUSR2/SIGPWR (power off)
//! stops the services in reverse order, syncs, unmounts and calls reboot(2). It never exits:
//! errors are reported and retried, a panic in the main loop is caught and the loop resumes.
//!
//! Test mode: `SHOAL_INIT_ROOT=DIR` puts every path (mounts, report, logs) under a scratch
//! root, and `SHOAL_INIT_SERVICES=FILE` replaces the service table. It still must be PID 1
//! (run it under `unshare --pid --fork --mount`): it signals every process it can see.

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use report::{Outcome, Report};
use shoal_init::{
    clock, cmdline, console, console_nonblocking, dmi_dir, initrd, metadata, mounts, net, power,
    report, signals, supervisor, system,
};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use supervisor::{Supervisor, Table};

#[derive(Debug, Clone, Copy)]
enum Action {
    Reboot,
    PowerOff,
}

struct Init {
    root: PathBuf,
    test: bool,
    report: Report,
    /// What the clock keeper last did.
    clock: Arc<Mutex<clock::Kept>>,
    sup: Supervisor,
    signals: signals::Signals,
    written: String,
    net: Arc<Mutex<net::NetState>>,
    buttons: power::Buttons,
}

impl Init {
    fn report_path(&self) -> PathBuf {
        self.root.join("run/shoal/init.json")
    }

    fn write_report(&mut self) {
        self.report.services = self.sup.report();
        if let Ok(n) = self.net.lock() {
            self.report.network = serde_json::to_value(&*n).unwrap_or_default();
        }
        if let Ok(k) = self.clock.lock() {
            self.report.clock = k.clone();
        }
        let now = serde_json::to_string(&self.report).unwrap_or_default();
        if now != self.written {
            self.report.write(&self.report_path());
            self.written = now;
        }
    }

    /// Reaps every exited child: services are handed to the supervisor, the rest are orphans
    /// re-parented to us.
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    if !self.sup.exited(pid, status, Instant::now()) {
                        self.report.orphans_reaped += 1;
                    }
                }
            }
        }
    }

    /// Waits up to `timeout` for a signal or service output; returns a shutdown request.
    fn wait(&mut self, timeout: Duration) -> Option<Action> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let ms = timeout.as_millis().min(1000) as u16;
        let (sig_ready, ready_pipes, ready_buttons) = {
            let pipes = self.sup.pipes();
            let buttons = self.buttons.fds();
            let mut fds = vec![PollFd::new(self.signals.fd(), PollFlags::POLLIN)];
            fds.extend(
                pipes
                    .iter()
                    .map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN)),
            );
            fds.extend(buttons.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)));
            let _ = poll(&mut fds, PollTimeout::from(ms));
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let sig = ready(&fds[0]);
            let p: Vec<usize> = pipes
                .iter()
                .zip(&fds[1..])
                .filter(|(_, f)| ready(f))
                .map(|((i, _), _)| *i)
                .collect();
            let b: Vec<usize> = (0..buttons.len())
                .filter(|i| ready(&fds[1 + pipes.len() + i]))
                .collect();
            (sig, p, b)
        };
        for i in ready_buttons {
            if self.buttons.read(i) {
                console("power button pressed");
                return Some(Action::PowerOff);
            }
        }
        for i in ready_pipes {
            self.sup.drain_output(i);
        }
        let mut action = None;
        if sig_ready {
            for sig in self.signals.pending() {
                match Signal::try_from(sig) {
                    Ok(Signal::SIGCHLD) => self.reap(),
                    Ok(Signal::SIGTERM) | Ok(Signal::SIGINT) => action = Some(Action::Reboot),
                    Ok(Signal::SIGUSR2) | Ok(Signal::SIGPWR) => action = Some(Action::PowerOff),
                    _ => {}
                }
            }
        }
        // A SIGCHLD can be coalesced with others: reap anyway.
        self.reap();
        action
    }

    fn run(&mut self) -> Action {
        loop {
            let now = Instant::now();
            let next = self.sup.tick(now);
            self.write_report();
            let timeout = next
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(1));
            if let Some(a) = self.wait(timeout) {
                return a;
            }
        }
    }

    fn shutdown(&mut self, action: Action) -> ! {
        console(&format!("{action:?} requested: stopping services"));
        self.report.shutdown = Some(format!("{action:?}").to_lowercase());
        self.write_report();
        self.sup.stop_all(|sup, d| {
            // Reap while waiting; signals other than SIGCHLD are ignored from here on.
            let _ = nix::poll::poll(&mut [], nix::poll::PollTimeout::from(d.as_millis() as u16));
            let _ = self.signals.pending();
            // Keep showing what the services say while they stop.
            let pipes: Vec<usize> = sup.pipes().iter().map(|(i, _)| *i).collect();
            for i in pipes {
                sup.drain_output(i);
            }
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(status) => {
                        if let Some(pid) = status.pid() {
                            sup.exited(pid, status, Instant::now());
                        }
                    }
                }
            }
        });
        self.write_report();
        // Whatever is left (orphans, services' own children): TERM, a grace period, KILL.
        let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Err(_) => break, // ECHILD: nobody left
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
                Ok(_) => {}
            }
        }
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        while waitpid(Pid::from_raw(-1), None).is_ok() {}
        nix::unistd::sync();
        console("services stopped, file systems synced");
        self.write_report();
        mounts::unmount_all(&self.root);
        if !self.test {
            let _ = nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
                None::<&str>,
            );
        }
        nix::unistd::sync();
        use nix::sys::reboot::{reboot, RebootMode};
        let mode = match action {
            Action::Reboot => RebootMode::RB_AUTOBOOT,
            Action::PowerOff => RebootMode::RB_POWER_OFF,
        };
        let err = reboot(mode).err();
        console(&format!("reboot(2) failed: {err:?}; staying up"));
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

fn local_metadata(
    root: &std::path::Path,
    cmdline: &cmdline::Cmdline,
    d: &mut Vec<String>,
) -> Option<metadata::Metadata> {
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
        let Some((dev, probe)) = metadata::volume::find(root, label) else {
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

fn load_table(detail: &mut Vec<String>) -> (Table, Outcome) {
    let Ok(path) = std::env::var("SHOAL_INIT_SERVICES") else {
        return (Table::default_table(), Outcome::Ok);
    };
    match std::fs::read_to_string(&path)
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

fn main() {
    let test_root = std::env::var_os("SHOAL_INIT_ROOT").map(PathBuf::from);
    if std::process::id() != 1 {
        eprintln!(
            "shoal-init must run as PID 1 (for a test, run it under `unshare --pid --fork --mount` with SHOAL_INIT_ROOT=DIR)"
        );
        std::process::exit(2);
    }
    // From here on, never exit.
    console_nonblocking();
    if test_root.is_none() && initrd::active(std::path::Path::new("/")) {
        initrd::run();
    }
    let root = test_root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let test = test_root.is_some();
    let signals = loop {
        match signals::Signals::install() {
            Ok(s) => break s,
            Err(e) => {
                console(&format!("cannot install signal handlers ({e}); retrying"));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    if !test {
        // Ctrl-Alt-Del becomes SIGINT to us instead of an immediate reboot.
        let _ = nix::sys::reboot::set_cad_enabled(false);
    }
    console(&format!(
        "shoal-init {} starting{}",
        env!("CARGO_PKG_VERSION"),
        if test {
            format!(" (test mode, root {})", root.display())
        } else {
            String::new()
        }
    ));
    let mut report = Report {
        version: env!("CARGO_PKG_VERSION"),
        started_ms: report::now_ms(),
        test_mode: test,
        ..Default::default()
    };
    report.stage("mounts", |d| {
        let ok = mounts::mount_all(&root, d);
        if !test {
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
    });
    if !test {
        report.uptime_at_start_ms = initrd::uptime_ms();
        report.initrd = std::fs::read("/run/shoal/initrd.json")
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
    }
    report.stage("modules", |d| {
        if test {
            d.push("skipped in test mode".into());
            return Outcome::Ok;
        }
        system::modules(&root, d)
    });
    report.stage("data-disk", |d| {
        if test && std::env::var_os("SHOAL_INIT_DISKS").is_none() {
            d.push("skipped in test mode (no SHOAL_INIT_DISKS)".into());
            return Outcome::Ok;
        }
        system::data_disk(&root, d)
    });
    report.stage("machine-id", |d| system::machine_id(&root, d));
    report.stage("sysctls", |d| {
        // Network sysctls belong to the network namespace; a test has its own only when it
        // names interfaces.
        if test && std::env::var_os("SHOAL_INIT_NET_IFACES").is_none() {
            d.push("skipped in test mode".into());
            return Outcome::Ok;
        }
        if test {
            d.push("network sysctls only in test mode".into());
        }
        system::sysctls(&root, test, d)
    });
    let mut cmdline = cmdline::Cmdline::default();
    report.stage("cmdline", |d| {
        // A test must not pick up the host's command line.
        let text = if test {
            std::env::var("SHOAL_INIT_CMDLINE").unwrap_or_default()
        } else {
            std::fs::read_to_string(root.join("proc/cmdline")).unwrap_or_default()
        };
        let c = cmdline::Cmdline::parse(&text);
        if let Some(ip) = c.get("ip") {
            d.push(format!("ip={ip}"));
        }
        cmdline = c;
        Outcome::Ok
    });
    // Metadata that needs no network: a NoCloud seed named on the command line or on a
    // `cidata` volume, or an OpenStack config drive.
    let mut meta: Option<metadata::Metadata> = None;
    report.stage("metadata-local", |d| {
        meta = local_metadata(&root, &cmdline, d);
        if let Some(m) = &meta {
            d.push(format!("source: {}", m.source));
        }
        Outcome::Ok
    });
    let net_state = Arc::new(Mutex::new(net::NetState::default()));
    report.stage("network", |d| {
        // A test touches only the interfaces it names, in its own network namespace.
        if test && std::env::var_os("SHOAL_INIT_NET_IFACES").is_none() {
            d.push("skipped in test mode (no SHOAL_INIT_NET_IFACES)".into());
            return Outcome::Ok;
        }
        let nc = meta.as_ref().and_then(|m| m.network_config.as_deref());
        let (cfg, source) = net::choose(&cmdline, nc, d);
        net::apply(&root, &cfg, &source, &net_state, d)
    });
    report.stage("metadata", |d| {
        if meta.is_none() {
            let host = if test {
                std::env::var("SHOAL_INIT_METADATA_HOST").ok()
            } else {
                Some(metadata::LINK_LOCAL.to_string())
            };
            let allowed = metadata::platform(&cmdline, &dmi_dir(test));
            if let Some(host) = host {
                meta = metadata::remote(&cmdline, &host, &allowed, Duration::from_secs(5), d);
            }
        }
        match &meta {
            Some(m) => {
                d.push(format!("source: {}", m.source));
                Outcome::Ok
            }
            None => {
                d.push("no metadata source: dev mode".into());
                Outcome::Degraded
            }
        }
    });
    let mut applied: Option<metadata::userdata::Applied> = None;
    report.stage("user-data", |d| {
        user_data(&root, meta.as_ref(), &mut applied, d)
    });
    report.metadata = serde_json::json!({
        "source": meta.as_ref().map(|m| m.source.clone()),
        "instance_id": meta.as_ref().and_then(|m| m.instance_id.clone()),
        "user_data": applied,
    });
    report.stage("hostname", |d| {
        let from_net = net_state.lock().ok().and_then(|n| n.hostname.clone());
        let name = applied
            .as_ref()
            .and_then(|a| a.hostname.clone())
            .or_else(|| meta.as_ref().and_then(|m| m.hostname.clone()))
            .or(from_net)
            .unwrap_or_else(|| derived_hostname(&root));
        let short = name.split('.').next().unwrap_or(&name).to_string();
        d.push(short.clone());
        report_hostname(&root, &short);
        if test && std::env::var_os("SHOAL_INIT_UTS").is_none() {
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
    });
    let kept = Arc::new(Mutex::new(clock::Kept::default()));
    let dmi = dmi_dir(test);
    // The servers: user-data's, DHCP's (read again at every check: renewals may change them),
    // then the cloud's own where the platform is named (as for metadata).
    let ntp_servers = {
        let user: Vec<String> = applied.as_ref().map(|a| a.ntp.clone()).unwrap_or_default();
        let cloud: Vec<String> = metadata::platform(&cmdline, &dmi)
            .into_iter()
            .filter_map(|p| match p {
                "ec2" => Some("169.254.169.123".to_string()),
                "gce" => Some(metadata::LINK_LOCAL.to_string()),
                _ => None,
            })
            .collect();
        let net = net_state.clone();
        move || {
            let mut v = user.clone();
            if let Ok(n) = net.lock() {
                v.extend(n.ntp.iter().cloned());
            }
            v.extend(cloud.iter().cloned());
            v.dedup();
            v
        }
    };
    report.stage("clock", |d| {
        let wrong = clock::obviously_wrong(std::time::SystemTime::now())
            || (test && std::env::var_os("SHOAL_INIT_CLOCK_WRONG").is_some());
        let mut k = clock::Kept::default();
        let r = clock::check(&ntp_servers(), test, &mut k);
        if let Ok(mut g) = kept.lock() {
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
    });
    let every = match std::env::var("SHOAL_INIT_NTP_INTERVAL_MS") {
        Ok(ms) if test => ms
            .parse()
            .map(Duration::from_millis)
            .unwrap_or(clock::INTERVAL),
        _ => clock::INTERVAL,
    };
    clock::keep(ntp_servers, every, test, kept.clone());
    let mut buttons = None;
    report.stage("power-button", |d| {
        buttons = Some(power::Buttons::open(&root, test, d));
        Outcome::Ok
    });
    let mut table = Table { service: vec![] };
    report.stage("services", |d| {
        let (t, o) = load_table(d);
        table = t;
        o
    });
    let mut init = Init {
        clock: kept,
        sup: Supervisor::new(&root, table),
        root,
        test,
        report,
        signals,
        written: String::new(),
        net: net_state,
        buttons: buttons.unwrap_or_else(power::Buttons::none),
    };
    loop {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| init.run()));
        match r {
            Ok(action) => init.shutdown(action),
            Err(_) => {
                init.report.panics += 1;
                console("panic in the main loop caught; resuming");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_stage_fails_and_the_next_one_runs() {
        let mut report = Report::default();
        report.stage("boom", |_| panic!("bad seed"));
        report.stage("after", |_| Outcome::Ok);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["stages"][0]["outcome"], "failed");
        assert!(json["stages"][0]["detail"][0]
            .as_str()
            .unwrap()
            .contains("panicked: bad seed"));
        assert_eq!(json["stages"][1]["outcome"], "ok");
    }
}
