//! Steady client load through an ingress, counting answers: for tests that something
//! (a rollout, a scale-down, a replica killed, an autoscaler) loses no request.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A GET of `path` through the ingress at 127.0.0.1:`port` for `host`, on a fresh
/// connection: the status (0 when it failed outright) and the body.
pub fn get(port: u16, host: &str, path: &str) -> (u16, String) {
    get_from(&format!("127.0.0.1:{port}"), host, path)
}

/// `get` through the ingress at `addr` (`ip:port`).
pub fn get_from(addr: &str, host: &str, path: &str) -> (u16, String) {
    let Some(addr) = addr.parse::<std::net::SocketAddr>().ok() else {
        return (0, String::new());
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    // HTTP/1.0: the answer's body ends with the connection, never chunked.
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    let mut out = Vec::new();
    if s.write_all(req.as_bytes()).is_err() || s.read_to_end(&mut out).is_err() {
        return (0, String::new());
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

/// `threads` clients sending GETs of `path` for `host` in turn (paced to `rps_each` a
/// second each, or as fast as answered with 0), until `finish`.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    /// Answers other than 200, with their status and body.
    failed: Arc<Mutex<Vec<(u16, String)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, host: &str, path: &str, threads: usize, rps_each: u64) -> Load {
        Load::start_at(&format!("127.0.0.1:{port}"), host, path, threads, rps_each)
    }

    /// `start` through the ingress at `addr` (`ip:port`).
    pub fn start_at(addr: &str, host: &str, path: &str, threads: usize, rps_each: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, failed, host, path, addr) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    host.to_string(),
                    path.to_string(),
                    addr.to_string(),
                );
                std::thread::spawn(move || {
                    let pace = match rps_each {
                        0 => Duration::ZERO,
                        n => Duration::from_millis(1000 / n),
                    };
                    while !stop.load(Relaxed) {
                        let t = Instant::now();
                        match get_from(&addr, &host, &path) {
                            (200, _) => {
                                ok.fetch_add(1, Relaxed);
                            }
                            other => failed.lock().unwrap().push(other),
                        }
                        // Pacing the load, not waiting for anything.
                        std::thread::sleep(pace.saturating_sub(t.elapsed()));
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            threads,
        }
    }

    /// Answered 200 so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Relaxed)
    }

    /// Stops the clients: the count answered 200, and every other answer.
    pub fn finish(self) -> (u64, Vec<(u16, String)>) {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failed = std::mem::take(&mut *self.failed.lock().unwrap());
        (self.ok.load(Relaxed), failed)
    }
}

/// An app `name` of busybox httpd whose `/cgi-bin/slow` answers after 300 ms with the
/// app's version (`v=VERSION`): requests long enough in flight for a rollout, a drain or a
/// killed replica to catch some. Ready once it accepts connections; `extra` is more TOML
/// (it may add to `[scale]`, which comes last).
pub fn slow_app(name: &str, version: &str, replicas: u32, extra: &str) -> String {
    format!(
        r#"name = "{name}"
[source]
image = "{image}"
[run]
command = ["sh", "-c", "mkdir -p /www/cgi-bin && printf '#!/bin/sh\nsleep 0.3\necho Content-Type: text/plain\necho\necho v=$VERSION\n' > /www/cgi-bin/slow && chmod +x /www/cgi-bin/slow && exec httpd -f -p 8080 -h /www"]
port = 8080
env = {{ VERSION = "{version}" }}
[health]
tcp = 8080
interval = "300ms"
[update]
monitor = "1s"
[scale]
replicas = {replicas}
{extra}"#,
        image = crate::BUSYBOX
    )
}
