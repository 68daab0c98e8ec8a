//! shoal-init, the PID 1 of a shoal machine: mounts, then supervises containerd, dockerd and
//! the agent, reaps every zombie, and on SIGTERM/SIGINT (reboot) or SIGUSR2/SIGPWR (power off)
//! stops the services in reverse order, syncs, unmounts and calls reboot(2). It never exits:
//! errors are reported and retried, a panic in the main loop is caught and the loop resumes.
//!
//! This file is the order of things; the boot stages are `boot`'s table, supervision and
//! shutdown are `pid1`, and what init runs against is `env::InitEnv`, parsed once here. Test
//! mode (`SHOAL_INIT_ROOT=DIR`) puts every path under a scratch root and takes the fixtures a
//! test names (`env`); it still must be PID 1 (run it under `unshare --pid --fork --mount`):
//! it signals every process it can see.

use report::Report;
use shoal_init::env::InitEnv;
use shoal_init::pid1::Init;
use shoal_init::supervisor::Supervisor;
use shoal_init::sys::{Real, Sys};
use shoal_init::{boot, console, console_nonblocking, initrd, power, report, signals};
use std::sync::Arc;
use std::time::Duration;

fn main() {
    let env = InitEnv::from_env();
    if std::process::id() != 1 {
        eprintln!(
            "shoal-init must run as PID 1 (for a test, run it under `unshare --pid --fork --mount` with SHOAL_INIT_ROOT=DIR)"
        );
        std::process::exit(2);
    }
    // From here on, never exit.
    console_nonblocking();
    if !env.test && initrd::active(std::path::Path::new("/")) {
        initrd::run();
    }
    let signals = loop {
        match signals::Signals::install() {
            Ok(s) => break s,
            Err(e) => {
                console(&format!("cannot install signal handlers ({e}); retrying"));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    if !env.test {
        // Ctrl-Alt-Del becomes SIGINT to us instead of an immediate reboot.
        let _ = nix::sys::reboot::set_cad_enabled(false);
    }
    console(&format!(
        "shoal-init {} starting{}",
        env!("CARGO_PKG_VERSION"),
        if env.test {
            format!(" (test mode, root {})", env.root.display())
        } else {
            String::new()
        }
    ));
    let mut report = Report {
        version: env!("CARGO_PKG_VERSION"),
        started_ms: report::now_ms(),
        test_mode: env.test,
        ..Default::default()
    };
    let sys: Arc<dyn Sys> = Arc::new(Real::default());
    let boot = boot::run(&env, sys.clone(), &mut report);
    let mut init = Init {
        sys,
        clock: boot.clock,
        sup: Supervisor::new(&env.root, boot.table),
        root: env.root.clone(),
        test: env.test,
        report,
        signals,
        written: String::new(),
        net: boot.net,
        buttons: boot.buttons.unwrap_or_else(power::Buttons::none),
        background: boot.background,
    };
    loop {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| init.run()));
        match r {
            Ok(action) => init.shutdown(action),
            Err(_) => {
                init.report.panics += 1;
                console("panic in the main loop caught; resuming");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
