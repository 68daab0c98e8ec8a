//! Signals without blocking them: a blocked mask would be inherited by every service (exec
//! keeps it, and std's spawn does not clear it), leaving the agent deaf to SIGTERM. Instead
//! each signal sets a flag and writes to a self-pipe (signal-hook) that the main loop polls;
//! handlers, unlike masks, are reset by exec.

use nix::sys::signal::Signal;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub const HANDLED: [i32; 6] = [
    Signal::SIGCHLD as i32,
    Signal::SIGTERM as i32,
    Signal::SIGINT as i32,
    Signal::SIGUSR2 as i32,
    Signal::SIGPWR as i32,
    Signal::SIGHUP as i32,
];

pub struct Signals {
    read: UnixStream,
    flags: Vec<(i32, Arc<AtomicBool>)>,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let mut flags = Vec::new();
        for sig in HANDLED {
            let f = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(sig, f.clone())?;
            signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
            flags.push((sig, f));
        }
        Ok(Signals { read, flags })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// The signals that arrived since the last call.
    pub fn pending(&mut self) -> Vec<i32> {
        let mut buf = [0u8; 256];
        while matches!((&self.read).read(&mut buf), Ok(n) if n > 0) {}
        self.flags
            .iter()
            .filter(|(_, f)| f.swap(false, Ordering::SeqCst))
            .map(|(s, _)| *s)
            .collect()
    }
}
