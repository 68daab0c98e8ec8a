//! shoal-init as PID 1 of its own PID and mount namespaces (`unshare`), in test mode over a
//! scratch root, and loop devices for its disks: the fixtures of `tests/init.rs` and the
//! `init_boot` bench.

use crate::wait_for;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running shoal-init; killed (with its namespace) on drop.
pub struct Pid1 {
    pub unshare: Child,
    /// The scratch root (`SHOAL_INIT_ROOT`).
    pub root: PathBuf,
}

impl Pid1 {
    /// `bin` as PID 1 over `root` with the service table `services`, inside network namespace
    /// `netns` if given (and its own UTS namespace when `env` sets `SHOAL_INIT_UTS`); its
    /// console goes to `console` (or nowhere).
    pub fn spawn(
        bin: &Path,
        netns: Option<&str>,
        root: &Path,
        services: &Path,
        env: &[(&str, &str)],
        console: Option<&Path>,
    ) -> Pid1 {
        crate::netns::require_root();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unshare"]);
                c
            }
            None => Command::new("unshare"),
        };
        if env.iter().any(|(k, _)| *k == "SHOAL_INIT_UTS") {
            cmd.arg("--uts");
        }
        let (out, err) = match console {
            Some(p) => {
                let f = std::fs::File::create(p).unwrap();
                (Stdio::from(f.try_clone().unwrap()), Stdio::from(f))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let unshare = cmd
            .args(crate::UNSHARE_PID1)
            .arg(bin)
            .envs(env.iter().copied())
            .env("SHOAL_INIT_ROOT", root)
            .env("SHOAL_INIT_SERVICES", services)
            .stdout(out)
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Pid1 {
            unshare,
            root: root.to_path_buf(),
        }
    }

    /// shoal-init's pid as seen from here (unshare's only child).
    pub fn pid(&self) -> u32 {
        wait_for(Duration::from_secs(30), "shoal-init to start", || {
            let kids =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.unshare.id()))
                    .ok()?;
            kids.split_whitespace().next()?.parse().ok()
        })
    }

    /// A path under the root, as init's mount namespace sees it.
    pub fn inside(&self, p: &str) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.pid()))
            .join(self.root.join(p).strip_prefix("/").unwrap())
    }

    /// The boot report (`run/shoal/init.json`), or null before there is one.
    pub fn report(&self) -> serde_json::Value {
        std::fs::read(self.inside("run/shoal/init.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Pid1 {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// A loop device over a file (its name under /dev), detached on drop.
pub struct Loop(pub String);

impl Loop {
    pub fn new(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .trim_start_matches("/dev/")
                .to_string(),
        )
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .args(["-d", &format!("/dev/{}", self.0)])
            .status();
    }
}
