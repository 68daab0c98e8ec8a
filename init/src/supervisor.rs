//! Supervision: a small ordered table of services. Each starts once the service it comes
//! `after` is ready (its `ready` path exists, or it runs if it has none); an exited service
//! restarts with exponential backoff and jitter, and one that exits 5 times within a minute is
//! shown as crash-looping (it keeps being restarted). Output goes to the console with a prefix
//! and to a size-capped log under `/var/log/shoal/`. A run that printed the mark of known
//! damage to its service's state (`Repair`) has that file moved aside before the next start.

use crate::report::ServiceReport;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A service that ran this long is healthy again: its backoff starts over.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
const LOOP_WINDOW: Duration = Duration::from_secs(60);
const LOOP_EXITS: usize = 5;
const LOG_CAP: u64 = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub ready: Option<PathBuf>,
    /// Boot stages still running in the background that must end before this starts (Docker's
    /// modules for dockerd). A name no stage holds is no wait.
    #[serde(default)]
    pub needs: Vec<String>,
    #[serde(default = "default_stop_ms")]
    pub stop_timeout_ms: u64,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Damage a service cannot get past by itself, and what clears it.
    #[serde(default)]
    pub repair: Vec<Repair>,
}

/// A known failure that makes a service exit at every start until a file of its state is
/// moved aside: when a run that exited printed `seen`, `move_aside` is renamed to
/// `<name>.broken` (replacing an older one) before the next start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repair {
    pub seen: String,
    pub move_aside: PathBuf,
    /// Said on the console when it is done.
    pub why: String,
}

/// dockerd 20.10 (Debian 12's) panics at every start when a network's removal was cut
/// short (power lost, killed) between releasing its addresses and forgetting it
/// (moby/moby#45057, fixed in later releases): its network store then holds a network it
/// cannot restore. The agent makes its networks again; Docker makes its default ones.
fn dockerd_repairs() -> Vec<Repair> {
    vec![Repair {
        seen: "libnetwork.(*controller).reservePools".into(),
        move_aside: "/var/lib/docker/network/files/local-kv.db".into(),
        why: "its network store holds a network whose removal was cut short (moby#45057)".into(),
    }]
}

fn default_stop_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    #[serde(default)]
    pub service: Vec<ServiceSpec>,
}

impl Table {
    /// The machine's services: containerd, then dockerd on its socket; the agent starts at
    /// once with containerd (membership, the store and the API do not need Docker, and under
    /// emulation dockerd takes seconds; what runs containers waits for dockerd's socket).
    /// They stop in the reverse order: the agent first.
    pub fn default_table() -> Table {
        let s =
            |name: &str, command: &[&str], after: Option<&str>, ready: Option<&str>| ServiceSpec {
                name: name.into(),
                command: command.iter().map(|c| c.to_string()).collect(),
                after: after.map(String::from),
                ready: ready.map(PathBuf::from),
                needs: if name == "dockerd" {
                    vec!["docker-modules".into()]
                } else {
                    vec![]
                },
                // The agent leaves the cluster and flushes; dockerd stops its containers.
                stop_timeout_ms: if name == "containerd" {
                    default_stop_ms()
                } else {
                    20_000
                },
                env: BTreeMap::new(),
                repair: if name == "dockerd" {
                    dockerd_repairs()
                } else {
                    vec![]
                },
            };
        Table {
            service: vec![
                s(
                    "containerd",
                    &["/usr/bin/containerd"],
                    None,
                    Some("/run/containerd/containerd.sock"),
                ),
                s(
                    "dockerd",
                    &[
                        "/usr/sbin/dockerd",
                        "--containerd=/run/containerd/containerd.sock",
                    ],
                    Some("containerd"),
                    Some("/run/docker.sock"),
                ),
                s("agent", &["/usr/bin/shoal", "agent"], None, None),
            ],
        }
    }

    pub fn parse(text: &str) -> Result<Table, TableError> {
        let t: Table = toml::from_str(text)?;
        for (i, s) in t.service.iter().enumerate() {
            if s.command.is_empty() {
                return Err(TableError::EmptyCommand(s.name.clone()));
            }
            if let Some(a) = &s.after {
                if !t.service[..i].iter().any(|p| &p.name == a) {
                    return Err(TableError::AfterUnlisted {
                        service: s.name.clone(),
                        after: a.clone(),
                    });
                }
            }
        }
        Ok(t)
    }
}

/// What is wrong with a service table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("service {0:?} has an empty command")]
    EmptyCommand(String),
    #[error("service {service:?} comes after {after:?}, which is not listed before it")]
    AfterUnlisted { service: String, after: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Backoff,
    Stopped,
}

struct Service {
    spec: ServiceSpec,
    state: State,
    pid: Option<Pid>,
    restarts: u32,
    failures: u32,
    last_exit: Option<String>,
    started: Option<Instant>,
    started_ms: Option<u64>,
    next_start: Option<Instant>,
    exits: VecDeque<Instant>,
    output: Option<OwnedFd>,
    pending: Vec<u8>,
    log: PathBuf,
    /// The repairs this run's output called for (`ServiceSpec::repair`, by index).
    damaged: Vec<usize>,
}

pub struct Supervisor {
    root: PathBuf,
    services: Vec<Service>,
    seed: u64,
    pub stopping: bool,
    /// Boot stages still running (`ServiceSpec::needs`).
    held: std::collections::BTreeSet<String>,
}

fn exit_text(status: nix::sys::wait::WaitStatus) -> String {
    use nix::sys::wait::WaitStatus as W;
    match status {
        W::Exited(_, code) => format!("exited with status {code}"),
        W::Signaled(_, sig, core) => format!(
            "killed by {sig:?}{}",
            if core { " (core dumped)" } else { "" }
        ),
        other => format!("{other:?}"),
    }
}

impl Supervisor {
    pub fn new(root: &Path, table: Table) -> Supervisor {
        let services = table
            .service
            .into_iter()
            .map(|spec| Service {
                log: root
                    .join("var/log/shoal")
                    .join(format!("{}.log", spec.name)),
                spec,
                state: State::Waiting,
                pid: None,
                restarts: 0,
                failures: 0,
                last_exit: None,
                started: None,
                started_ms: None,
                next_start: None,
                exits: VecDeque::new(),
                output: None,
                pending: Vec::new(),
                damaged: Vec::new(),
            })
            .collect();
        Supervisor {
            root: root.to_path_buf(),
            services,
            seed: crate::report::now_ms() ^ u64::from(std::process::id()),
            stopping: false,
            held: Default::default(),
        }
    }

    /// A boot stage is running: services that need it wait.
    pub fn hold(&mut self, stage: &str) {
        self.held.insert(stage.into());
    }

    /// The stage ended: what needed it may start at the next tick.
    pub fn release(&mut self, stage: &str) {
        self.held.remove(stage);
    }

    fn jitter(&mut self, d: Duration) -> Duration {
        // xorshift: enough to spread restarts, no crate needed.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let f = 0.8 + (self.seed % 401) as f64 / 1000.0; // 0.8 ..= 1.2
        d.mul_f64(f)
    }

    /// `p` (an absolute path of the machine) under this supervisor's root.
    fn under_root(&self, p: &Path) -> PathBuf {
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }

    fn is_ready(&self, name: &str) -> bool {
        self.services
            .iter()
            .find(|s| s.spec.name == name)
            .is_some_and(|s| {
                s.state == State::Running
                    && s.spec
                        .ready
                        .as_ref()
                        .is_none_or(|p| self.under_root(p).exists())
            })
    }

    /// Starts what may start now; returns when to look again.
    pub fn tick(&mut self, now: Instant) -> Option<Instant> {
        if self.stopping {
            return None;
        }
        let mut next: Option<Instant> = None;
        for i in 0..self.services.len() {
            let s = &self.services[i];
            let due = match s.state {
                State::Waiting => true,
                State::Backoff => s.next_start.is_none_or(|t| t <= now),
                _ => false,
            };
            if !due {
                if let Some(t) = s.next_start.filter(|_| s.state == State::Backoff) {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
                continue;
            }
            let held = s.spec.needs.iter().any(|n| self.held.contains(n));
            if held || s.spec.after.as_ref().is_some_and(|dep| !self.is_ready(dep)) {
                // Readiness is a path appearing (or a stage ending): look again shortly.
                let t = now + Duration::from_millis(10);
                next = Some(next.map_or(t, |n| n.min(t)));
                continue;
            }
            self.spawn(i);
            if self.services[i].state != State::Running {
                let t = self.services[i].next_start.unwrap_or(now);
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        // A running service with a ready path not there yet keeps us looking.
        if self.services.iter().any(|s| s.state == State::Waiting) {
            let t = now + Duration::from_millis(10);
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        next
    }

    fn spawn(&mut self, i: usize) {
        let root = self.root.clone();
        let s = &mut self.services[i];
        let result = (|| -> std::io::Result<(std::process::Child, OwnedFd)> {
            let (rd, wr) = nix::unistd::pipe().map_err(std::io::Error::from)?;
            nix::fcntl::fcntl(
                &rd,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .map_err(std::io::Error::from)?;
            let wr2 = wr.try_clone()?;
            let child = crate::command(&s.spec.command[0])
                .args(&s.spec.command[1..])
                .envs(&s.spec.env)
                .current_dir(&root)
                .stdin(std::process::Stdio::null())
                .stdout(wr)
                .stderr(wr2)
                .process_group(0)
                .spawn()?;
            Ok((child, rd))
        })();
        match result {
            Ok((child, rd)) => {
                let pid = child.id() as i32;
                // The child is reaped by the main loop's waitpid(-1), not through `Child`.
                drop(child);
                s.pid = Some(Pid::from_raw(pid));
                s.state = State::Running;
                s.started = Some(Instant::now());
                s.started_ms = Some(crate::report::now_ms());
                s.output = Some(rd);
                s.damaged.clear();
                crate::console(&format!("service {}: started, pid {pid}", s.spec.name));
            }
            Err(e) => {
                s.last_exit = Some(format!("cannot start: {e}"));
                crate::console(&format!("service {}: cannot start: {e}", s.spec.name));
                self.schedule_restart(i, Instant::now());
            }
        }
    }

    fn schedule_restart(&mut self, i: usize, now: Instant) {
        let s = &mut self.services[i];
        if s.started
            .is_some_and(|t| now.duration_since(t) >= HEALTHY_AFTER)
        {
            s.failures = 0;
        }
        let exp = s.failures.min(16);
        s.failures += 1;
        let base = BACKOFF_BASE
            .saturating_mul(1u32 << exp.min(10))
            .min(BACKOFF_MAX);
        let wait = self.jitter(base);
        let s = &mut self.services[i];
        s.state = State::Backoff;
        s.next_start = Some(now + wait);
        s.restarts += 1;
        s.exits.push_back(now);
        while s
            .exits
            .front()
            .is_some_and(|t| now.duration_since(*t) > LOOP_WINDOW)
        {
            s.exits.pop_front();
        }
    }

    /// A child exited: returns false when it was none of ours (an orphan).
    pub fn exited(&mut self, pid: Pid, status: nix::sys::wait::WaitStatus, now: Instant) -> bool {
        let Some(i) = self.services.iter().position(|s| s.pid == Some(pid)) else {
            return false;
        };
        self.drain_output(i);
        let text = exit_text(status);
        let s = &mut self.services[i];
        s.pid = None;
        s.output = None;
        s.last_exit = Some(text.clone());
        if self.stopping {
            s.state = State::Stopped;
            crate::console(&format!("service {}: stopped ({text})", s.spec.name));
            return true;
        }
        crate::console(&format!(
            "service {}: {text}; restarting with backoff",
            s.spec.name
        ));
        self.repair(i);
        self.schedule_restart(i, now);
        true
    }

    /// Clears what the run that just ended said was damaged (`ServiceSpec::repair`).
    fn repair(&mut self, i: usize) {
        let damaged = std::mem::take(&mut self.services[i].damaged);
        let s = &self.services[i];
        for r in damaged {
            let Some(r) = s.spec.repair.get(r) else {
                continue;
            };
            let path = self.under_root(&r.move_aside);
            let mut aside = path.clone().into_os_string();
            aside.push(".broken");
            match std::fs::rename(&path, &aside) {
                Ok(()) => crate::console(&format!(
                    "service {}: {}: moved {} aside to {}",
                    s.spec.name,
                    r.why,
                    r.move_aside.display(),
                    Path::new(&aside).display()
                )),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => crate::console(&format!(
                    "service {}: {}: cannot move {} aside: {e}",
                    s.spec.name,
                    r.why,
                    r.move_aside.display()
                )),
            }
        }
    }

    /// The output pipes to poll.
    pub fn pipes(&self) -> Vec<(usize, BorrowedFd<'_>)> {
        self.services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.output.as_ref().map(|fd| (i, fd.as_fd())))
            .collect()
    }

    /// Reads what service `i` wrote; console and log get whole lines.
    pub fn drain_output(&mut self, i: usize) {
        let s = &mut self.services[i];
        let Some(fd) = &s.output else { return };
        let mut buf = [0u8; 8192];
        loop {
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) => {
                    s.output = None;
                    break;
                }
                Ok(n) => s.pending.extend_from_slice(&buf[..n]),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break, // EAGAIN: all read for now
            }
            if s.pending.len() > 64 * 1024 {
                break;
            }
        }
        let cut = match s.pending.iter().rposition(|b| *b == b'\n') {
            Some(p) => p + 1,
            None if s.pending.len() >= 8192 || s.output.is_none() => s.pending.len(),
            None => return,
        };
        let chunk: Vec<u8> = s.pending.drain(..cut).collect();
        let text = String::from_utf8_lossy(&chunk);
        for (n, r) in s.spec.repair.iter().enumerate() {
            if !s.damaged.contains(&n) && text.contains(r.seen.as_str()) {
                s.damaged.push(n);
            }
        }
        let mut console = String::new();
        for line in text.lines() {
            console.push_str(&format!("[{}] {line}\n", s.spec.name));
        }
        crate::console_bytes(console.as_bytes());
        append_capped(&s.log, &chunk);
    }

    /// Sends SIGTERM to every service in reverse order, waiting for each up to its stop
    /// timeout (reaping with `reap`), then SIGKILL.
    pub fn stop_all(&mut self, mut reap: impl FnMut(&mut Supervisor, Duration)) {
        self.stopping = true;
        for i in (0..self.services.len()).rev() {
            let Some(pid) = self.services[i].pid else {
                self.services[i].state = State::Stopped;
                continue;
            };
            let name = self.services[i].spec.name.clone();
            crate::console(&format!("service {name}: stopping (SIGTERM)"));
            let _ = kill(pid, Signal::SIGTERM);
            let deadline =
                Instant::now() + Duration::from_millis(self.services[i].spec.stop_timeout_ms);
            while self.services[i].pid.is_some() && Instant::now() < deadline {
                reap(self, Duration::from_millis(20));
            }
            if let Some(pid) = self.services[i].pid {
                crate::console(&format!("service {name}: did not stop in time: SIGKILL"));
                let _ = kill(pid, Signal::SIGKILL);
                while self.services[i].pid.is_some() {
                    reap(self, Duration::from_millis(20));
                }
            }
        }
    }

    pub fn report(&self) -> Vec<ServiceReport> {
        self.services
            .iter()
            .map(|s| {
                let looping = s.exits.len() >= LOOP_EXITS && s.state != State::Running;
                let state = match s.state {
                    State::Waiting => "waiting",
                    State::Running => "running",
                    State::Backoff if looping => "crash-looping",
                    State::Backoff => "restarting",
                    State::Stopped => "stopped",
                };
                ServiceReport {
                    name: s.spec.name.clone(),
                    state: state.into(),
                    pid: s.pid.map(|p| p.as_raw()),
                    restarts: s.restarts,
                    last_exit: s.last_exit.clone(),
                    started_ms: s.started_ms,
                }
            })
            .collect()
    }
}

/// Appends to a log, moving it to `.1` (replacing the older one) past the cap.
fn append_capped(path: &Path, bytes: &[u8]) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() + bytes.len() as u64 > LOG_CAP) {
        let _ = std::fs::rename(path, path.with_extension("log.1"));
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_checked() {
        let t = Table::parse("[[service]]\nname = \"a\"\ncommand = [\"/bin/true\"]\n[[service]]\nname = \"b\"\ncommand = [\"x\"]\nafter = \"a\"\nready = \"/run/b.sock\"\n").unwrap();
        assert_eq!(t.service.len(), 2);
        assert!(matches!(
            Table::parse("[[service]]\nname = \"a\"\ncommand = []\n"),
            Err(TableError::EmptyCommand(_))
        ));
        assert!(matches!(
            Table::parse("[[service]]\nname = \"b\"\ncommand = [\"x\"]\nafter = \"a\"\n"),
            Err(TableError::AfterUnlisted { .. })
        ));
        assert!(
            Table::parse("[[service]]\nname = \"a\"\ncommand = [\"x\"]\nrestart = 1\n").is_err()
        );
        assert_eq!(Table::default_table().service.len(), 3);
    }

    #[test]
    fn a_service_waits_for_the_boot_stage_it_needs() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Supervisor::new(
            dir.path(),
            Table::parse(
                "[[service]]\nname = \"d\"\ncommand = [\"/bin/sleep\", \"5\"]\nneeds = [\"mods\"]\n[[service]]\nname = \"free\"\ncommand = [\"/bin/sleep\", \"5\"]\nneeds = [\"nobody-holds-this\"]\n",
            )
            .unwrap(),
        );
        s.hold("mods");
        let now = Instant::now();
        let next = s.tick(now);
        assert_eq!(s.services[0].state, State::Waiting, "started while held");
        assert_eq!(s.services[1].state, State::Running);
        assert!(next.is_some_and(|t| t <= now + Duration::from_millis(10)));
        s.release("mods");
        s.tick(now);
        assert_eq!(s.services[0].state, State::Running);
        for svc in &s.services {
            if let Some(pid) = svc.pid {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(pid, None);
            }
        }
        assert_eq!(
            Table::default_table().service[1].needs,
            vec!["docker-modules".to_string()]
        );
    }

    /// Runs service `d` of `table` under `root` once, to its exit.
    fn run_once(root: &Path, table: &str) -> Supervisor {
        let mut s = Supervisor::new(root, Table::parse(table).unwrap());
        let now = Instant::now();
        s.tick(now);
        let pid = s.services[0].pid.expect("started");
        let status = nix::sys::wait::waitpid(pid, None).unwrap();
        assert!(s.exited(pid, status, now));
        s
    }

    #[test]
    fn a_run_that_shows_known_damage_has_the_damaged_file_moved_aside_and_no_other_does() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("var/lib/d")).unwrap();
        let db = dir.path().join("var/lib/d/kv.db");
        let repair = "[[service.repair]]\nseen = \"(*controller).reservePools\"\nmove_aside = \"/var/lib/d/kv.db\"\nwhy = \"test\"\n";
        // Fails for another reason: the file stays.
        std::fs::write(&db, "bad").unwrap();
        let other = format!("[[service]]\nname = \"d\"\ncommand = [\"/bin/sh\", \"-c\", 'echo no space left; exit 1']\n{repair}");
        let s = run_once(dir.path(), &other);
        assert!(db.exists());
        assert!(s.services[0].damaged.is_empty());
        // dockerd's panic, as it prints it: the file goes aside, the next start is clean.
        let panics = format!("[[service]]\nname = \"d\"\ncommand = [\"/bin/sh\", \"-c\", 'test -e var/lib/d/kv.db || exit 0; echo \"panic: runtime error: index out of range [0] with length 0\"; echo; echo \"github.com/docker/libnetwork.(*controller).reservePools(0x5587c2b92e70?)\"; exit 2']\n{repair}");
        run_once(dir.path(), &panics);
        assert!(!db.exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("var/lib/d/kv.db.broken")).unwrap(),
            "bad"
        );
        let again = run_once(dir.path(), &panics);
        assert_eq!(
            again.services[0].last_exit.as_deref(),
            Some("exited with status 0")
        );
        // The machine's table carries dockerd's.
        let t = Table::default_table();
        assert_eq!(t.service[1].name, "dockerd");
        assert_eq!(
            t.service[1].repair[0].move_aside,
            Path::new("/var/lib/docker/network/files/local-kv.db")
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut s = Supervisor::new(
            Path::new("/nonexistent"),
            Table::parse("[[service]]\nname = \"a\"\ncommand = [\"/bin/true\"]\n").unwrap(),
        );
        let now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..12 {
            s.schedule_restart(0, now);
            waits.push(s.services[0].next_start.unwrap() - now);
        }
        assert!(waits[0] >= Duration::from_millis(200) && waits[0] <= Duration::from_millis(300));
        assert!(waits[3] > waits[1]);
        assert!(waits.iter().all(|w| *w <= BACKOFF_MAX.mul_f64(1.2)));
        assert_eq!(s.report()[0].state, "crash-looping");
    }

    #[test]
    fn logs_are_capped_with_one_older_generation() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log/svc.log");
        let line = vec![b'x'; 1000];
        for _ in 0..2500 {
            append_capped(&log, &line);
        }
        let cur = std::fs::metadata(&log).unwrap().len();
        let old = std::fs::metadata(log.with_extension("log.1"))
            .unwrap()
            .len();
        assert!(cur <= LOG_CAP && old <= LOG_CAP, "{cur} {old}");
        assert!(cur + old >= LOG_CAP, "recent output kept");
    }
}
