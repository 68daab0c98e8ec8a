//! Fixtures for the end-to-end tests: the real `shoal` binary run as agent processes on
//! loopback, a small HTTP client, and polling with deadlines (never sleeps as synchronisation).

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

pub mod acme;
pub mod agent;
pub mod bins;
pub mod docker;
pub mod http;
pub mod images;
pub mod load;
pub mod netns;
pub mod pid1;
pub mod registry;

pub use agent::*;
pub use bins::*;
pub use http::*;
pub use images::*;

/// Runs a command to success, or fails the test with its output.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `limit` with `what`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
