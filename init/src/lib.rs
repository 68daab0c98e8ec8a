//! shoal-init as a library: everything PID 1 is made of (mounts, network, metadata, user-data,
//! clock, supervision, the boot report), so that the binary (`main.rs`) stays the boot
//! sequence and the decoders can be fuzzed (`fuzz/`) and tested on their own.

pub mod boot;
pub mod clock;
pub mod cmdline;
pub mod env;
pub mod fuzzing;
pub mod initrd;
pub mod metadata;
pub mod mounts;
pub mod net;
pub mod pid1;
pub mod power;
pub mod report;
pub mod signals;
pub mod supervisor;
pub mod sys;
pub mod system;

/// The kernel starts init with no PATH; every command and service gets this one.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A command with a PATH (the caller's, or `PATH` when init has none).
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    if std::env::var_os("PATH").is_none() {
        c.env("PATH", PATH);
    }
    c
}

/// A line on the console (init's stdout).
pub fn console(msg: &str) {
    console_bytes(format!("shoal-init: {msg}\n").as_bytes());
}

/// Bytes the console could not take, not yet reported.
static CONSOLE_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Writes to the console without ever waiting on it: a slow serial line or a stopped reader
/// must not stall PID 1. What does not fit now is dropped, counted, and said at the next write
/// that fits. (stdout is made non-blocking at start.)
pub fn console_bytes(b: &[u8]) {
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering;
    let out = std::io::stdout();
    let fd = out.as_fd();
    let dropped = CONSOLE_DROPPED.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        let note = format!("shoal-init: [console: {dropped} bytes dropped]\n");
        let n = write_or_drop(fd, note.as_bytes());
        if n < note.len() {
            CONSOLE_DROPPED.fetch_add(dropped, Ordering::Relaxed);
        }
    }
    let n = write_or_drop(fd, b);
    if n < b.len() {
        CONSOLE_DROPPED.fetch_add((b.len() - n) as u64, Ordering::Relaxed);
    }
}

/// Writes what `fd` takes without blocking (it must be non-blocking); returns how much.
pub fn write_or_drop(fd: std::os::fd::BorrowedFd<'_>, mut b: &[u8]) -> usize {
    let total = b.len();
    while !b.is_empty() {
        match nix::unistd::write(fd, b) {
            Ok(0) => break,
            Ok(n) => b = &b[n..],
            Err(nix::errno::Errno::EINTR) => continue,
            // EAGAIN (full), EIO (console gone): drop the rest.
            Err(_) => break,
        }
    }
    total - b.len()
}

/// Makes stdout non-blocking, for `console_bytes`.
pub fn console_nonblocking() {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsFd;
    let out = std::io::stdout();
    if let Ok(flags) = fcntl(out.as_fd(), FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        let _ = fcntl(out.as_fd(), FcntlArg::F_SETFL(flags));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_full_console_drops_instead_of_blocking() {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        use std::os::fd::AsFd;
        let (r, w) = nix::unistd::pipe().unwrap();
        fcntl(w.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
        // Nobody reads: the pipe fills (64 KiB) and the rest is dropped, at once.
        let big = vec![b'x'; 1 << 20];
        let t = Instant::now();
        let n = write_or_drop(w.as_fd(), &big);
        assert!(n > 0 && n < big.len(), "wrote {n}");
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(r);
    }
}
