//! PID 1 after boot: supervises the services, reaps every zombie, writes the boot report as
//! things change, and on SIGTERM/SIGINT (reboot), SIGUSR2/SIGPWR or the power button (power
//! off) stops the services in reverse order, syncs, unmounts and calls reboot(2).

use crate::report::Report;
use crate::supervisor::Supervisor;
use crate::sys::{MsFlags, Pid, RebootMode, Signal, Sys, WaitPidFlag, WaitStatus};
use crate::{clock, console, mounts, net, power, signals};
use nix::errno::Errno;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reboot,
    PowerOff,
}

/// What wakes the PID 1 loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Signal(Signal),
    /// A service wrote to its stdout or stderr (its index in the supervisor).
    Output(usize),
    PowerButton,
}

/// What PID 1 does about an event: a shutdown for the signals and the button that ask for
/// one; reaping for SIGCHLD (the loop reaps after every wake anyway: signals coalesce).
pub fn action(e: Event) -> Option<Action> {
    match e {
        Event::Signal(Signal::SIGTERM | Signal::SIGINT) => Some(Action::Reboot),
        Event::Signal(Signal::SIGUSR2 | Signal::SIGPWR) | Event::PowerButton => {
            Some(Action::PowerOff)
        }
        Event::Signal(_) | Event::Output(_) => None,
    }
}

pub struct Init {
    pub sys: Arc<dyn Sys>,
    pub root: PathBuf,
    pub test: bool,
    pub report: Report,
    /// What the clock keeper last did.
    pub clock: Arc<Mutex<clock::Kept>>,
    pub sup: Supervisor,
    pub signals: signals::Signals,
    pub written: String,
    pub net: Arc<Mutex<net::NetState>>,
    pub buttons: power::Buttons,
    /// Boot stages still running; the services that need them wait (`Supervisor::hold`).
    pub background: Vec<crate::boot::Background>,
}

impl Init {
    fn report_path(&self) -> PathBuf {
        self.root.join("run/shoal/init.json")
    }

    pub fn write_report(&mut self) {
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
            match self
                .sys
                .waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG))
            {
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

    /// Waits up to `timeout` (at most a second) for signals, service output or the power
    /// button; what came.
    fn events(&mut self, timeout: Duration) -> Vec<Event> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let ms = timeout.as_millis().min(1000) as u16;
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
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        let mut out: Vec<Event> = pipes
            .iter()
            .zip(&ready[1..])
            .filter(|(_, r)| **r)
            .map(|((i, _), _)| Event::Output(*i))
            .collect();
        let first_button = 1 + pipes.len();
        for i in (0..buttons.len()).filter(|i| ready[first_button + i]) {
            if self.buttons.read(i) {
                console("power button pressed");
                out.push(Event::PowerButton);
            }
        }
        if ready[0] {
            out.extend(
                self.signals
                    .pending()
                    .into_iter()
                    .filter_map(|s| Signal::try_from(s).ok())
                    .map(Event::Signal),
            );
        }
        out
    }

    /// Handles what woke the loop; a shutdown request, if one came.
    fn wait(&mut self, timeout: Duration) -> Option<Action> {
        let mut shutdown = None;
        for e in self.events(timeout) {
            if let Event::Output(i) = e {
                self.sup.drain_output(i);
            }
            shutdown = shutdown.or(action(e));
        }
        // A SIGCHLD can be coalesced with others: reap after every wake.
        self.reap();
        shutdown
    }

    /// Records the background stages that ended and lets what needed them start.
    fn finish_background(&mut self) {
        for b in &self.background {
            self.sup.hold(b.name);
        }
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.background)
            .into_iter()
            .partition(|b| b.thread.is_finished());
        self.background = running;
        for b in done {
            let name = b.name;
            self.report.stages.push(b.join());
            self.sup.release(name);
        }
    }

    /// Supervises until a shutdown is asked for.
    pub fn run(&mut self) -> Action {
        loop {
            self.finish_background();
            let now = Instant::now();
            let mut next = self.sup.tick(now);
            if !self.background.is_empty() {
                // Look again soon for the stages' ends.
                let soon = now + Duration::from_millis(20);
                next = Some(next.map_or(soon, |n| n.min(soon)));
            }
            self.write_report();
            let timeout = next
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(1));
            if let Some(a) = self.wait(timeout) {
                return a;
            }
        }
    }

    /// Stops the services in reverse order, syncs, unmounts and reboots or powers off; if the
    /// kernel refuses, stays up.
    pub fn shutdown(&mut self, action: Action) -> ! {
        let err = self.shutdown_sequence(action);
        console(&format!("reboot(2) failed: {err}; staying up"));
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }

    /// The shutdown up to reboot(2); what the kernel said when it refused.
    pub fn shutdown_sequence(&mut self, action: Action) -> Errno {
        console(&format!("{action:?} requested: stopping services"));
        self.report.shutdown = Some(format!("{action:?}").to_lowercase());
        self.write_report();
        let sys = self.sys.clone();
        self.sup.stop_all(|sup, d| {
            // Reap while waiting; signals other than SIGCHLD are ignored from here on.
            let _ = nix::poll::poll(&mut [], nix::poll::PollTimeout::from(d.as_millis() as u16));
            let _ = self.signals.pending();
            // Keep showing what the services say while they stop.
            let pipes: Vec<usize> = sup.pipes().iter().map(|(i, _)| *i).collect();
            for i in pipes {
                sup.drain_output(i);
            }
            while let Ok(status) = sys.waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                match status.pid() {
                    Some(pid) => {
                        sup.exited(pid, status, Instant::now());
                    }
                    None => break,
                }
            }
        });
        self.write_report();
        self.stop_the_rest();
        sys.sync();
        console("services stopped, file systems synced");
        self.write_report();
        mounts::unmount_all(&*sys, &self.root);
        if !self.test {
            let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            let _ = sys.mount(None, Path::new("/"), None, flags, None);
        }
        sys.sync();
        sys.reboot(match action {
            Action::Reboot => RebootMode::RB_AUTOBOOT,
            Action::PowerOff => RebootMode::RB_POWER_OFF,
        })
    }

    /// Whatever is left once the services stopped (orphans, services' own children): TERM, a
    /// grace period of 3 s, KILL, reaped.
    fn stop_the_rest(&mut self) {
        let (sys, all) = (&*self.sys, Pid::from_raw(-1));
        let _ = sys.kill(all, Signal::SIGTERM);
        let end = sys.now() + Duration::from_secs(3);
        while sys.now() < end {
            match sys.waitpid(all, Some(WaitPidFlag::WNOHANG)) {
                Err(_) => break, // ECHILD: nobody left
                Ok(WaitStatus::StillAlive) => sys.sleep(Duration::from_millis(20)),
                Ok(_) => {}
            }
        }
        let _ = sys.kill(all, Signal::SIGKILL);
        while sys.waitpid(all, None).is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::Table;
    use crate::sys::fake::{Call, Recording};

    fn init(root: &Path, sys: Arc<Recording>) -> Init {
        Init {
            sys,
            root: root.to_path_buf(),
            test: false,
            report: Report::default(),
            clock: Default::default(),
            sup: Supervisor::new(root, Table { service: vec![] }),
            signals: signals::Signals::install().unwrap(),
            written: String::new(),
            net: Default::default(),
            buttons: power::Buttons::none(),
            background: Vec::new(),
        }
    }

    #[test]
    fn signals_and_the_button_ask_for_the_right_shutdown() {
        assert_eq!(action(Event::Signal(Signal::SIGTERM)), Some(Action::Reboot));
        assert_eq!(action(Event::Signal(Signal::SIGINT)), Some(Action::Reboot));
        assert_eq!(
            action(Event::Signal(Signal::SIGPWR)),
            Some(Action::PowerOff)
        );
        assert_eq!(
            action(Event::Signal(Signal::SIGUSR2)),
            Some(Action::PowerOff)
        );
        assert_eq!(action(Event::PowerButton), Some(Action::PowerOff));
        assert_eq!(action(Event::Signal(Signal::SIGCHLD)), None);
        assert_eq!(action(Event::Output(0)), None);
    }

    #[test]
    fn shutdown_stops_everything_then_syncs_unmounts_and_powers_off_in_that_order() {
        let dir = tempfile::tempdir().unwrap();
        let sys = Arc::new(Recording::new(dir.path()));
        sys.children_alive_for(3);
        let mut i = init(dir.path(), sys.clone());
        let refused = i.shutdown_sequence(Action::PowerOff);
        assert_eq!(refused, Errno::EPERM, "the fake kernel refuses reboot(2)");
        let calls = sys.calls();
        let ms20 = Call::Sleep(Duration::from_millis(20));
        let mut expected = vec![
            Call::Kill(-1, Signal::SIGTERM),
            ms20.clone(),
            ms20.clone(),
            ms20,
        ];
        expected.extend([
            Call::Kill(-1, Signal::SIGKILL),
            Call::Sync,
            // The store, then the data disk, each written out; then the rest, lazily.
            Call::Umount("/var/lib/shoal".into()),
            Call::Sync,
            Call::Umount("/var".into()),
            Call::Sync,
        ]);
        for t in [
            "/sys/fs/cgroup",
            "/tmp",
            "/run",
            "/dev/shm",
            "/dev/pts",
            "/dev",
            "/sys",
            "/proc",
        ] {
            expected.push(Call::Umount(t.into()));
        }
        expected.extend([
            Call::Mount {
                target: "/".into(),
                fstype: None,
                remount: true,
            },
            Call::Sync,
            Call::Reboot(RebootMode::RB_POWER_OFF),
        ]);
        assert_eq!(calls, expected);
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("run/shoal/init.json")).unwrap())
                .unwrap();
        assert_eq!(written["shutdown"], "poweroff");
    }

    #[test]
    fn what_ignores_sigterm_gets_three_seconds_then_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let sys = Arc::new(Recording::new(dir.path()));
        sys.children_alive_for(100_000);
        let mut i = init(dir.path(), sys.clone());
        assert_eq!(i.shutdown_sequence(Action::Reboot), Errno::EPERM);
        let calls = sys.calls();
        let slept: Duration = calls
            .iter()
            .filter_map(|c| match c {
                Call::Sleep(d) => Some(*d),
                _ => None,
            })
            .sum();
        assert_eq!(slept, Duration::from_secs(3));
        let term = calls
            .iter()
            .position(|c| *c == Call::Kill(-1, Signal::SIGTERM));
        let kill = calls
            .iter()
            .position(|c| *c == Call::Kill(-1, Signal::SIGKILL));
        assert!(term < kill && term.is_some());
        assert_eq!(calls.last(), Some(&Call::Reboot(RebootMode::RB_AUTOBOOT)));
    }
}
