//! The boot initramfs stage (shoal.raw under UEFI, and QEMU direct boot): the same binary,
//! started by the kernel from a small initramfs marked by `/etc/initrd-release`. It loads the
//! drivers that reach the root (listed by image/build, dependencies first), waits for the root
//! slot named by `shoal.root=` (`PARTLABEL=shoal-a` by default, or a `/dev/` path), mounts it
//! read-only, moves `/dev` and `/run` into it, empties the initramfs and executes the root's
//! `/sbin/init` as PID 1. What it did goes to `/run/shoal/initrd.json` for the boot report.
//! It never exits: while the root cannot be found or mounted it says why and tries again.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::Serialize;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The file that marks an initramfs (the systemd convention).
pub const MARKER: &str = "etc/initrd-release";
/// Module paths (relative to `/usr/lib/modules/<release>/`), in load order.
const MODULES: &str = "etc/shoal/initrd-modules";
const SYSROOT: &str = "/sysroot";
/// How long one attempt waits for the root device before saying so and trying again.
const DEVICE_WAIT: Duration = Duration::from_secs(30);

/// Why the initramfs cannot find or mount the root.
#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    #[error("bad partition label {0:?}")]
    BadLabel(String),
    #[error("shoal.root={0:?}: expected PARTLABEL=<name> or /dev/<device>")]
    BadRoot(String),
    #[error("no device {spec} after {secs} s")]
    NoDevice { spec: RootSpec, secs: u64 },
    #[error("{SYSROOT}: {0}")]
    Sysroot(#[source] std::io::Error),
    #[error("mount {dev} ({fstype}): {source}")]
    Mount {
        dev: String,
        fstype: String,
        source: nix::errno::Errno,
    },
    #[error("{0} has no /sbin/init")]
    NoInit(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSpec {
    PartLabel(String),
    Path(PathBuf),
}

impl RootSpec {
    /// `PARTLABEL=name` or `/dev/...`; anything else is refused with the reason.
    pub fn parse(s: &str) -> Result<RootSpec, InitrdError> {
        if let Some(l) = s.strip_prefix("PARTLABEL=") {
            if l.is_empty() || l.len() > 36 || l.contains('/') {
                return Err(InitrdError::BadLabel(l.into()));
            }
            return Ok(RootSpec::PartLabel(l.to_string()));
        }
        if s.starts_with("/dev/") && !s.contains("..") {
            return Ok(RootSpec::Path(PathBuf::from(s)));
        }
        Err(InitrdError::BadRoot(s.into()))
    }
}

impl std::fmt::Display for RootSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootSpec::PartLabel(l) => write!(f, "PARTLABEL={l}"),
            RootSpec::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, Default, Serialize)]
struct Record {
    /// Seconds since the kernel started when the initramfs stage began (the kernel's share).
    uptime_at_start_ms: u64,
    root: String,
    device: String,
    fstype: String,
    modules_loaded: usize,
    /// Drivers for hardware this machine does not have (ENODEV, or a symbol from such a driver).
    modules_absent: Vec<String>,
    module_errors: Vec<String>,
    attempts: u32,
    ms: u64,
}

pub fn active(root: &Path) -> bool {
    root.join(MARKER).exists()
}

/// Time since the kernel started (`/proc/uptime`), in milliseconds.
/// The kernel's uptime from `root`'s /proc.
pub fn uptime_ms(root: &Path) -> u64 {
    std::fs::read_to_string(root.join("proc/uptime"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

/// Runs the initramfs stage and executes the real init; returns only if that exec failed,
/// and then never: PID 1 stays and says so.
pub fn run() -> ! {
    let started = Instant::now();
    let mut rec = Record::default();
    for (src, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("run", "/run", "tmpfs"),
    ] {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(
            Some(src),
            target,
            Some(fstype),
            MsFlags::MS_NOSUID,
            None::<&str>,
        ) {
            crate::console(&format!("initrd: mount {target}: {e}"));
        }
    }
    rec.uptime_at_start_ms = uptime_ms(Path::new("/"));
    let cmdline = crate::cmdline::Cmdline::parse(
        &std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
    );
    let spec = cmdline.get("shoal.root").unwrap_or("PARTLABEL=shoal-a");
    let fstype = cmdline
        .get("shoal.rootfstype")
        .unwrap_or("squashfs")
        .to_string();
    crate::console(&format!(
        "initrd: root {spec} ({fstype}), {} ms after the kernel started",
        rec.uptime_at_start_ms
    ));
    (rec.modules_loaded, rec.modules_absent, rec.module_errors) = load_modules(Path::new("/"));
    crate::console(&format!(
        "initrd: {} drivers loaded; not for this machine: {}",
        rec.modules_loaded,
        if rec.modules_absent.is_empty() {
            "none".to_string()
        } else {
            rec.modules_absent.join(", ")
        }
    ));
    for e in &rec.module_errors {
        crate::console(&format!("initrd: {e}"));
    }
    let spec = match RootSpec::parse(spec) {
        Ok(s) => s,
        Err(e) => {
            crate::console(&format!("initrd: {e}; using PARTLABEL=shoal-a"));
            RootSpec::PartLabel("shoal-a".into())
        }
    };
    rec.root = spec.to_string();
    rec.fstype = fstype.clone();
    loop {
        rec.attempts += 1;
        match mount_root(&spec, &fstype) {
            Ok(dev) => {
                rec.device = dev.display().to_string();
                break;
            }
            Err(e) => {
                crate::console(&format!(
                    "initrd: cannot mount the root ({e}); trying again"
                ));
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
    rec.ms = started.elapsed().as_millis() as u64;
    crate::console(&format!(
        "initrd: {} mounted read-only at {SYSROOT} in {} ms; switching root",
        rec.device, rec.ms
    ));
    let _ = std::fs::create_dir_all("/run/shoal");
    if let Ok(body) = serde_json::to_vec_pretty(&rec) {
        let _ = std::fs::write("/run/shoal/initrd.json", body);
    }
    let err = switch_root();
    loop {
        crate::console(&format!(
            "initrd: cannot start the root's init: {err}; the machine stays up but does nothing"
        ));
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Loads the listed modules with finit_module(2), in order; a module already there (or built
/// in) is fine. Returns how many loaded, the drivers whose hardware is absent, and errors.
fn load_modules(root: &Path) -> (usize, Vec<String>, Vec<String>) {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = root.join("usr/lib/modules").join(&release);
    let list = std::fs::read_to_string(root.join(MODULES)).unwrap_or_default();
    let mut loaded = 0;
    let mut errors = Vec::new();
    let mut absent = Vec::new();
    let empty = CString::default();
    for rel in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(rel);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                errors.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        match nix::kmod::finit_module(&f, &empty, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) => loaded += 1,
            Err(nix::errno::Errno::EEXIST) => {}
            // A driver's init refuses without its hardware (ENODEV); a driver that needs
            // symbols from such a driver fails to link (ENOENT).
            Err(nix::errno::Errno::ENODEV | nix::errno::Errno::ENOENT) => {
                let name = Path::new(rel).file_stem().unwrap_or_default();
                absent.push(name.to_string_lossy().into_owned());
            }
            Err(e) => errors.push(format!("{rel}: {e}")),
        }
    }
    (loaded, absent, errors)
}

/// The block device whose GPT partition name is `label`, from sysfs (`PARTNAME=` in uevent).
pub fn find_partlabel(sys_block: &Path, label: &str) -> Option<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(sys_block).ok()?.flatten() {
        let uevent = std::fs::read_to_string(e.path().join("uevent")).unwrap_or_default();
        let mut name = None;
        let mut dev = None;
        for l in uevent.lines() {
            if let Some(v) = l.strip_prefix("PARTNAME=") {
                name = Some(v.to_string());
            }
            if let Some(v) = l.strip_prefix("DEVNAME=") {
                dev = Some(v.to_string());
            }
        }
        if name.as_deref() == Some(label) {
            if let Some(d) = dev {
                found.push(PathBuf::from("/dev").join(d));
            }
        }
    }
    // Deterministic when two disks carry the label (an installer stick and the disk).
    found.sort();
    found.into_iter().next()
}

fn mount_root(spec: &RootSpec, fstype: &str) -> Result<PathBuf, InitrdError> {
    let deadline = Instant::now() + DEVICE_WAIT;
    let dev = loop {
        let dev = match spec {
            RootSpec::PartLabel(l) => find_partlabel(Path::new("/sys/class/block"), l),
            RootSpec::Path(p) => p.exists().then(|| p.clone()),
        };
        if let Some(d) = dev.filter(|d| d.exists()) {
            break d;
        }
        if Instant::now() > deadline {
            return Err(InitrdError::NoDevice {
                spec: spec.clone(),
                secs: DEVICE_WAIT.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::fs::create_dir_all(SYSROOT).map_err(InitrdError::Sysroot)?;
    mount(
        Some(&dev),
        SYSROOT,
        Some(fstype),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|source| InitrdError::Mount {
        dev: dev.display().to_string(),
        fstype: fstype.into(),
        source,
    })?;
    // An absolute symlink (systemd-sysv's /sbin/init) only resolves after the switch.
    if std::fs::symlink_metadata(Path::new(SYSROOT).join("sbin/init")).is_err() {
        let _ = umount2(SYSROOT, MntFlags::MNT_DETACH);
        return Err(InitrdError::NoInit(dev.display().to_string()));
    }
    Ok(dev)
}

/// Removes the initramfs' own files (they hold RAM), never crossing into another file system.
fn empty_dir(dir: &Path, rootdev: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p == Path::new(SYSROOT) {
            continue;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.dev() != rootdev {
            continue;
        }
        if md.is_dir() {
            empty_dir(&p, rootdev);
            let _ = std::fs::remove_dir(&p);
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Moves `/dev` and `/run` into the new root, detaches `/proc` and `/sys`, empties the
/// initramfs, makes the new root `/` and executes its init. Returns only on failure.
fn switch_root() -> String {
    for m in ["/dev", "/run"] {
        let to = format!("{SYSROOT}{m}");
        if let Err(e) = mount(
            Some(m),
            to.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        ) {
            crate::console(&format!("initrd: move {m}: {e}"));
        }
    }
    for m in ["/proc", "/sys"] {
        let _ = umount2(m, MntFlags::MNT_DETACH);
    }
    if let Ok(md) = std::fs::metadata("/") {
        empty_dir(Path::new("/"), md.dev());
    }
    if let Err(e) = std::env::set_current_dir(SYSROOT) {
        return format!("chdir {SYSROOT}: {e}");
    }
    if let Err(e) = mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>) {
        return format!("move {SYSROOT} to /: {e}");
    }
    if let Err(e) = nix::unistd::chroot(".") {
        return format!("chroot: {e}");
    }
    let _ = std::env::set_current_dir("/");
    let init = CString::new("/sbin/init").unwrap_or_default();
    match nix::unistd::execv(&init, std::slice::from_ref(&init)) {
        Ok(never) => match never {},
        Err(e) => format!("exec /sbin/init: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_spec() {
        assert_eq!(
            RootSpec::parse("PARTLABEL=shoal-b").unwrap(),
            RootSpec::PartLabel("shoal-b".into())
        );
        assert_eq!(
            RootSpec::parse("/dev/vda2").unwrap(),
            RootSpec::Path("/dev/vda2".into())
        );
        for bad in [
            "",
            "PARTLABEL=",
            "PARTLABEL=a/b",
            "UUID=x",
            "vda2",
            "/dev/../etc",
        ] {
            assert!(RootSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn partlabel_from_sysfs() {
        let d = tempfile::tempdir().unwrap();
        for (n, body) in [
            ("vda", "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n"),
            (
                "vda2",
                "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\nPARTN=2\nPARTNAME=shoal-a\n",
            ),
            (
                "vda3",
                "MAJOR=254\nMINOR=3\nDEVNAME=vda3\nDEVTYPE=partition\nPARTN=3\nPARTNAME=shoal-b\n",
            ),
        ] {
            std::fs::create_dir(d.path().join(n)).unwrap();
            std::fs::write(d.path().join(n).join("uevent"), body).unwrap();
        }
        assert_eq!(
            find_partlabel(d.path(), "shoal-b"),
            Some(PathBuf::from("/dev/vda3"))
        );
        assert_eq!(find_partlabel(d.path(), "shoal"), None);
        assert_eq!(find_partlabel(&d.path().join("none"), "shoal-a"), None);
    }
}
