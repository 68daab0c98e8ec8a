//! PID 1 after boot: supervises the services, reaps every zombie, writes the boot report as
//! things change, and on SIGTERM/SIGINT (reboot), SIGUSR2/SIGPWR or the power button (power
//! off) stops the services in reverse order, syncs, unmounts and calls reboot(2).

use crate::report::Report;
use crate::supervisor::Supervisor;
use crate::{clock, console, mounts, net, power, signals};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub enum Action {
    Reboot,
    PowerOff,
}

pub struct Init {
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

    /// Supervises until a shutdown is asked for.
    pub fn run(&mut self) -> Action {
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

    /// Stops the services in reverse order, syncs, unmounts and reboots or powers off.
    pub fn shutdown(&mut self, action: Action) -> ! {
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
