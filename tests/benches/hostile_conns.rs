//! 10 000 connections attempted against one listener of a release agent, none of them sending
//! a byte: what the agent holds (RSS, descriptors), how many it takes before its cap sheds
//! the rest, and how long until its idle deadline has closed them all.
//!
//! `cargo bench -p shoal-e2e --bench hostile_conns` (the open-file limit must allow 10 000 sockets)

use shoal_e2e::{metric, rss_kib, use_release_bin, wait_for, Agent};
use std::io::Read;
use std::time::{Duration, Instant};

const N: usize = 10_000;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn main() {
    use_release_bin();
    let root = tempfile::tempdir().unwrap();
    let b = shoal_e2e::bundle(&root.path().join("bundle"), "bench");
    let mut a = Agent::configure_listen(root.path(), "busy", &[], &b, "", "");
    a.spawn();
    let pid = a.pid().unwrap();
    wait_for(Duration::from_secs(30), "the agent", || {
        a.get("/healthz").ok().filter(|r| r.status == 200)
    });
    let (rss0, fd0) = (rss_kib(pid), fds(pid));
    let t0 = Instant::now();
    let mut held = Vec::with_capacity(N);
    let mut failed = 0;
    for _ in 0..N {
        match std::net::TcpStream::connect(("127.0.0.1", a.status_port)) {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    let opened = t0.elapsed();
    // Until the agent has accepted what it will: its cap, or all of them.
    let full = fd0 + N.min(4096);
    wait_for(Duration::from_secs(10), "the agent to accept", || {
        (fds(pid) >= full).then_some(())
    });
    let (rss1, fd1) = (rss_kib(pid), fds(pid));
    // (The status port is full now: its metrics are read once the connections are gone.)
    let last_byte = Instant::now();
    wait_for(Duration::from_secs(120), "every connection closed", || {
        let m = a.metrics();
        (metric(&m, "shoal_api_connections_open{listener=\"status\"}")? <= 1.0).then_some(())
    });
    let shed_after = last_byte.elapsed();
    let (rss2, fd2) = (rss_kib(pid), fds(pid));
    let m = a.metrics();
    let shed = metric(&m, "shoal_api_connections_shed_total{listener=\"status\"}").unwrap_or(-1.0);
    let idle = metric(
        &m,
        "shoal_api_connections_idle_closed_total{listener=\"status\"}",
    )
    .unwrap_or(-1.0);
    let mut closed = 0;
    for mut s in held {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        if s.read_to_end(&mut buf).is_ok() {
            closed += 1;
        }
    }
    println!("## {N} silent connections to :7070 (listen.max_connections 4096, idle_timeout_ms 30000, the defaults)");
    println!(
        "- connects: {} made in {:.2} s, {failed} failed",
        N - failed,
        opened.as_secs_f64()
    );
    println!("- {shed} shed at the cap (503 and close), {idle} closed on the idle deadline");
    println!("- agent RSS {rss0} KiB idle -> {rss1} KiB holding them -> {rss2} KiB after");
    println!("- agent descriptors {fd0} idle -> {fd1} holding them -> {fd2} after");
    println!(
        "- all closed {:.2} s after the last connection; {closed} of {} saw end of stream",
        shed_after.as_secs_f64(),
        N - failed
    );
}
