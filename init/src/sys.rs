//! What PID 1 asks of the kernel and of other programs, behind one trait: mounts, the host
//! name, signals and reaping, sync and reboot, the clock, helper programs (`modprobe`,
//! `mkfs.ext4`, `fsck.ext4`, `mount -o loop`, `sfdisk`) and rtnetlink. `Real` does it; the
//! tests' `fake::Recording` records every call, answers what the test scripted and never
//! touches the machine, so the boot order, degraded stages and the shutdown sequence are
//! tested without root (`boot::tests`, `pid1::tests`).
//!
//! Reads of files under the root (sysfs, procfs, the data disk) are not here: a test gives
//! them a scratch root. Sockets (DHCP, SNTP, metadata) are not here either: their tests run
//! the real protocols against real servers in network namespaces.

use crate::net::netlink::{Links, Netlink, NetlinkError};
use nix::errno::Errno;
pub use nix::mount::{MntFlags, MsFlags};
pub use nix::sys::reboot::RebootMode;
pub use nix::sys::signal::Signal;
pub use nix::sys::wait::{WaitPidFlag, WaitStatus};
pub use nix::unistd::Pid;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

pub trait Sys: Send + Sync {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno>;
    fn umount(&self, target: &Path, flags: MntFlags) -> Result<(), Errno>;
    fn sethostname(&self, name: &str) -> Result<(), Errno>;
    fn kill(&self, pid: Pid, sig: Signal) -> Result<(), Errno>;
    fn waitpid(&self, pid: Pid, flags: Option<WaitPidFlag>) -> Result<WaitStatus, Errno>;
    fn sync(&self);
    /// Returns only when the kernel refused.
    fn reboot(&self, mode: RebootMode) -> Errno;
    fn set_clock(&self, t: SystemTime) -> Result<(), Errno>;
    /// Runs a helper program to completion: `input` on its stdin (else none), its stdout and
    /// stderr captured.
    fn run(&self, cmd: &mut Command, input: Option<&[u8]>) -> std::io::Result<Output>;
    /// A netlink connection for the network stage and the lease keepers.
    fn netlink(&self) -> Result<Box<dyn Links + '_>, NetlinkError>;
    fn now(&self) -> Instant;
    fn sleep(&self, d: Duration);
}

/// The machine itself.
///
/// PID 1 reaps every child (`waitpid(-1)`), and a background boot stage may be running a
/// helper at that moment: `Real` remembers its helpers' pids, so the reaper keeps a helper's
/// exit for `run` instead of taking it as an orphan's.
#[derive(Default)]
pub struct Real {
    /// Helpers running, with their exit once the reaper took it.
    helpers: std::sync::Mutex<std::collections::HashMap<i32, Option<WaitStatus>>>,
}

impl Real {
    fn helpers(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<i32, Option<WaitStatus>>> {
        self.helpers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for helper `pid`, whoever reaps it.
    fn wait_helper(&self, pid: i32) -> std::io::Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(Some(st)) = self.helpers().get(&pid) {
                break *st;
            }
            match nix::sys::wait::waitpid(Pid::from_raw(pid), None) {
                Ok(st) => break st,
                Err(Errno::EINTR) => continue,
                // ECHILD: the reaper took it; its record follows at once.
                Err(e) if Instant::now() > deadline => {
                    self.helpers().remove(&pid);
                    return Err(e.into());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        self.helpers().remove(&pid);
        Ok(std::process::ExitStatus::from_raw(match status {
            WaitStatus::Exited(_, code) => (code & 0xff) << 8,
            WaitStatus::Signaled(_, sig, core) => sig as i32 | if core { 0x80 } else { 0 },
            _ => 0,
        }))
    }
}

impl Sys for Real {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        nix::mount::mount(source, target, fstype, flags, data)
    }
    fn umount(&self, target: &Path, flags: MntFlags) -> Result<(), Errno> {
        nix::mount::umount2(target, flags)
    }
    fn sethostname(&self, name: &str) -> Result<(), Errno> {
        nix::unistd::sethostname(name)
    }
    fn kill(&self, pid: Pid, sig: Signal) -> Result<(), Errno> {
        nix::sys::signal::kill(pid, sig)
    }
    fn waitpid(&self, pid: Pid, flags: Option<WaitPidFlag>) -> Result<WaitStatus, Errno> {
        loop {
            let st = nix::sys::wait::waitpid(pid, flags)?;
            let Some(p) = st.pid() else { return Ok(st) };
            let mut helpers = self.helpers();
            match helpers.get_mut(&p.as_raw()) {
                // A helper's exit is `run`'s to take; look for the next one.
                Some(slot) => *slot = Some(st),
                None => return Ok(st),
            }
        }
    }
    fn sync(&self) {
        nix::unistd::sync()
    }
    fn reboot(&self, mode: RebootMode) -> Errno {
        match nix::sys::reboot::reboot(mode) {
            Err(e) => e,
            Ok(never) => match never {},
        }
    }
    fn set_clock(&self, t: SystemTime) -> Result<(), Errno> {
        let d = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| Errno::EINVAL)?;
        let ts = nix::sys::time::TimeSpec::new(d.as_secs() as i64, i64::from(d.subsec_nanos()));
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
    }
    fn run(&self, cmd: &mut Command, input: Option<&[u8]>) -> std::io::Result<Output> {
        use std::process::Stdio;
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        // Registered before it can exit, so the reaper never takes it for an orphan.
        let mut helpers = self.helpers();
        let mut child = cmd.spawn()?;
        let pid = child.id() as i32;
        helpers.insert(pid, None);
        drop(helpers);
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            use std::io::Write;
            // A helper that exits without reading all of it answers through its status.
            let _ = stdin.write_all(text);
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let stderr = child.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut e = Vec::new();
            if let Some(mut s) = stderr {
                use std::io::Read;
                let _ = s.read_to_end(&mut e);
            }
            e
        });
        if let Some(mut s) = child.stdout.take() {
            use std::io::Read;
            let _ = s.read_to_end(&mut out);
        }
        if let Ok(e) = reader.join() {
            err = e;
        }
        let status = self.wait_helper(pid)?;
        Ok(Output {
            status,
            stdout: out,
            stderr: err,
        })
    }
    fn netlink(&self) -> Result<Box<dyn Links + '_>, NetlinkError> {
        Ok(Box::new(Netlink::open()?))
    }
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

/// Whether a helper's run succeeded; its stderr (or stdout) as the reason when not.
pub fn check(program: &str, out: std::io::Result<Output>) -> Result<Output, RunError> {
    let out = out.map_err(|source| RunError::Spawn {
        program: program.into(),
        source,
    })?;
    if out.status.success() {
        return Ok(out);
    }
    let said = if out.stderr.is_empty() {
        &out.stdout
    } else {
        &out.stderr
    };
    Err(RunError::Failed {
        program: program.into(),
        code: out.status.code(),
        said: String::from_utf8_lossy(said).trim().to_string(),
    })
}

/// A helper program that could not run, or said no.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed (exit {code:?}): {said}")]
    Failed {
        program: String,
        code: Option<i32>,
        said: String,
    },
}

#[cfg(test)]
pub mod fake {
    //! A `Sys` that records every call in order and answers what the test scripted: errors
    //! for the calls a predicate picks, a list of links, children still alive for a while.
    //! Its clock starts at the real now and moves only when something sleeps.

    use super::*;
    use crate::net::netlink::Link;
    use std::collections::VecDeque;
    use std::net::{IpAddr, Ipv4Addr};
    use std::os::unix::process::ExitStatusExt;
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Mount {
            target: String,
            fstype: Option<String>,
            remount: bool,
        },
        Umount(String),
        SetHostname(String),
        Kill(i32, Signal),
        Sync,
        Reboot(RebootMode),
        SetClock,
        /// The program and its arguments.
        Run(Vec<String>),
        LinkUp(u32),
        AddAddr(u32, IpAddr, u8),
        AddRoute(u32, Ipv4Addr, u8, Ipv4Addr),
        Sleep(Duration),
    }

    type Rule = Box<dyn Fn(&Call) -> Option<Errno> + Send + Sync>;

    pub struct Recording {
        root: std::path::PathBuf,
        calls: Mutex<Vec<Call>>,
        rules: Mutex<Vec<Rule>>,
        links: Vec<Link>,
        /// What `waitpid(-1, WNOHANG)` answers before "no child left".
        alive: Mutex<VecDeque<WaitStatus>>,
        clock: Mutex<Instant>,
    }

    impl Recording {
        /// Paths in the calls are shown relative to `root` ("/proc", "/var").
        pub fn new(root: &Path) -> Recording {
            Recording {
                root: root.to_path_buf(),
                calls: Mutex::new(Vec::new()),
                rules: Mutex::new(Vec::new()),
                links: vec![
                    Link {
                        index: 1,
                        name: "lo".into(),
                        mac: None,
                        loopback: true,
                    },
                    Link {
                        index: 2,
                        name: "eth0".into(),
                        mac: Some("52:54:00:12:34:56".into()),
                        loopback: false,
                    },
                ],
                alive: Mutex::new(VecDeque::new()),
                clock: Mutex::new(Instant::now()),
            }
        }

        /// Fails every call `pick` returns an error for.
        pub fn fail(&self, pick: impl Fn(&Call) -> Option<Errno> + Send + Sync + 'static) {
            self.rules.lock().unwrap().push(Box::new(pick));
        }

        /// `waitpid(-1, WNOHANG)` answers StillAlive `n` times before the children are gone.
        pub fn children_alive_for(&self, n: usize) {
            let mut a = self.alive.lock().unwrap();
            a.extend(std::iter::repeat_n(WaitStatus::StillAlive, n));
        }

        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        fn rel(&self, p: &Path) -> String {
            match p.strip_prefix(&self.root) {
                Ok(r) => format!("/{}", r.display()),
                Err(_) => p.display().to_string(),
            }
        }

        fn record(&self, c: Call) -> Result<(), Errno> {
            let err = self.rules.lock().unwrap().iter().find_map(|r| r(&c));
            self.calls.lock().unwrap().push(c);
            err.map_or(Ok(()), Err)
        }
    }

    impl Sys for Recording {
        fn mount(
            &self,
            _source: Option<&Path>,
            target: &Path,
            fstype: Option<&str>,
            flags: MsFlags,
            _data: Option<&str>,
        ) -> Result<(), Errno> {
            self.record(Call::Mount {
                target: self.rel(target),
                fstype: fstype.map(String::from),
                remount: flags.contains(MsFlags::MS_REMOUNT),
            })
        }
        fn umount(&self, target: &Path, _flags: MntFlags) -> Result<(), Errno> {
            self.record(Call::Umount(self.rel(target)))
        }
        fn sethostname(&self, name: &str) -> Result<(), Errno> {
            self.record(Call::SetHostname(name.into()))
        }
        fn kill(&self, pid: Pid, sig: Signal) -> Result<(), Errno> {
            self.record(Call::Kill(pid.as_raw(), sig))
        }
        fn waitpid(&self, _pid: Pid, flags: Option<WaitPidFlag>) -> Result<WaitStatus, Errno> {
            let nohang = flags.is_some_and(|f| f.contains(WaitPidFlag::WNOHANG));
            match self.alive.lock().unwrap().pop_front() {
                Some(s) if nohang => Ok(s),
                _ => Err(Errno::ECHILD),
            }
        }
        fn sync(&self) {
            let _ = self.record(Call::Sync);
        }
        fn reboot(&self, mode: RebootMode) -> Errno {
            self.record(Call::Reboot(mode))
                .err()
                .unwrap_or(Errno::EPERM)
        }
        fn set_clock(&self, _t: SystemTime) -> Result<(), Errno> {
            self.record(Call::SetClock)
        }
        fn run(&self, cmd: &mut Command, _input: Option<&[u8]>) -> std::io::Result<Output> {
            let mut argv = vec![cmd.get_program().to_string_lossy().into_owned()];
            argv.extend(cmd.get_args().map(|a| self.rel(Path::new(a))));
            let r = self.record(Call::Run(argv));
            Ok(Output {
                status: std::process::ExitStatus::from_raw(if r.is_ok() { 0 } else { 1 << 8 }),
                stdout: vec![],
                stderr: r.err().map(|e| e.desc().into()).unwrap_or_default(),
            })
        }
        fn netlink(&self) -> Result<Box<dyn Links + '_>, NetlinkError> {
            Ok(Box::new(FakeLinks {
                sys: self,
                links: self.links.clone(),
            }))
        }
        fn now(&self) -> Instant {
            *self.clock.lock().unwrap()
        }
        fn sleep(&self, d: Duration) {
            *self.clock.lock().unwrap() += d;
            let _ = self.record(Call::Sleep(d));
        }
    }

    struct FakeLinks<'a> {
        sys: &'a Recording,
        links: Vec<Link>,
    }

    fn refused(e: Errno) -> NetlinkError {
        NetlinkError::Io(std::io::Error::from(e))
    }

    impl Links for FakeLinks<'_> {
        fn links(&self) -> Result<Vec<Link>, NetlinkError> {
            Ok(self.links.clone())
        }
        fn up(&self, index: u32, _mtu: Option<u32>) -> Result<(), NetlinkError> {
            self.sys.record(Call::LinkUp(index)).map_err(refused)
        }
        fn add_addr(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<(), NetlinkError> {
            self.sys
                .record(Call::AddAddr(index, ip, prefix))
                .map_err(refused)
        }
        fn add_route(
            &self,
            index: u32,
            dst: Ipv4Addr,
            prefix: u8,
            gw: Ipv4Addr,
        ) -> Result<(), NetlinkError> {
            self.sys
                .record(Call::AddRoute(index, dst, prefix, gw))
                .map_err(refused)
        }
    }
}
