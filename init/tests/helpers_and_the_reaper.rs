//! PID 1 reaps every child while a background boot stage may be running a helper: the helper's
//! exit must reach the stage, not be taken for an orphan's. Its own test binary with one
//! test: the reaper here takes every child of the process.

use shoal_init::sys::{Pid, Real, Sys, WaitPidFlag, WaitStatus};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn a_helper_keeps_its_exit_while_the_reaper_runs() {
    let sys = Arc::new(Real::default());
    let stop = Arc::new(AtomicBool::new(false));
    // The PID 1 loop's reaping, as fast as it can go.
    let reaper = {
        let (sys, stop) = (sys.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut orphans = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match sys.waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => {
                        std::thread::sleep(Duration::from_micros(200))
                    }
                    Ok(st) => orphans.push(st),
                }
            }
            orphans
        })
    };
    for i in 0..50 {
        let code = i % 7;
        let out = sys
            .run(
                Command::new("/bin/sh")
                    .args(["-c", &format!("echo out{i}; echo err >&2; exit {code}")]),
                None,
            )
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "run {i}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("out{i}\n"));
        assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    }
    // Input reaches the helper (sfdisk's script).
    let out = sys
        .run(Command::new("/bin/cat").arg("-"), Some(b", +\n"))
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b", +\n");
    // A real orphan still goes to the reaper.
    // Not waited for here: reaping it is the reaper's job.
    #[allow(clippy::zombie_processes)]
    let orphan = Command::new("/bin/true").spawn().unwrap();
    let pid = orphan.id() as i32;
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let orphans = reaper.join().unwrap();
    assert_eq!(
        orphans
            .iter()
            .filter_map(|s| s.pid())
            .map(|p| p.as_raw())
            .collect::<Vec<_>>(),
        vec![pid],
        "the reaper took a helper, or missed the orphan"
    );
}
