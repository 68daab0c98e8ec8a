//! Machine setup stages: the data disk, the persistent machine id, kernel modules, sysctls.

use crate::metadata::volume;
use crate::report::Outcome;
use std::path::Path;

pub const DATA_LABEL: &str = "SHOAL_DATA";

/// Mounts the data disk at `/var`: the volume labelled `SHOAL_DATA`, else a blank disk
/// formatted once (ext4, labelled), else a tmpfs — said loudly: state is lost at power-off.
pub fn data_disk(root: &Path, d: &mut Vec<String>) -> Outcome {
    let outcome = mount_data(root, d);
    // /var/run and /var/lock are the runtime tmpfs, as everywhere (Docker's socket path).
    for (link, to) in [("var/run", "../run"), ("var/lock", "../run/lock")] {
        let p = root.join(link);
        if std::fs::symlink_metadata(&p).is_err() {
            if let Err(e) = std::os::unix::fs::symlink(to, &p) {
                d.push(format!("/{link}: {e}"));
            }
        }
    }
    outcome
}

fn mount_data(root: &Path, d: &mut Vec<String>) -> Outcome {
    let var = root.join("var");
    let _ = std::fs::create_dir_all(&var);
    let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV;
    let mount_ext4 = |dev: &Path| {
        nix::mount::mount(Some(dev), &var, Some("ext4"), flags, None::<&str>)
            .map_err(|e| format!("mount {} on /var: {e}", dev.display()))
    };
    if let Some((dev, p)) = volume::find(root, DATA_LABEL) {
        if p.fstype != "ext4" {
            d.push(format!(
                "{} is labelled {DATA_LABEL} but is {}, not ext4",
                dev.display(),
                p.fstype
            ));
        } else {
            // Check before mounting: after a clean power-off this is a no-op.
            match crate::command("fsck.ext4").arg("-p").arg(&dev).output() {
                Ok(o) => match o.status.code() {
                    Some(0) => d.push("fsck: clean".into()),
                    Some(1) => d.push("fsck: errors corrected".into()),
                    c => d.push(format!(
                        "fsck: exit {c:?}: {}",
                        String::from_utf8_lossy(&o.stdout).trim()
                    )),
                },
                Err(e) => d.push(format!("fsck.ext4: {e}")),
            }
            match mount_ext4(&dev) {
                Ok(()) => {
                    d.push(format!("{} mounted at /var", dev.display()));
                    return Outcome::Ok;
                }
                Err(e) => d.push(e),
            }
        }
    } else if let Some(dev) = volume::devices(root).into_iter().find(|dev| {
        let name = dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A whole disk, not partitioned, never written to.
        let partitioned = std::fs::read_dir(root.join("sys/class/block").join(&name))
            .map(|e| {
                e.filter_map(|x| x.ok())
                    .any(|x| x.file_name().to_string_lossy().starts_with(&name))
            })
            .unwrap_or(false);
        let is_partition = root
            .join("sys/class/block")
            .join(&name)
            .join("partition")
            .exists();
        !partitioned
            && !is_partition
            && volume::read_head(dev).is_some_and(|h| h.len() >= 65536 && volume::blank(&h))
    }) {
        d.push(format!(
            "formatting blank disk {} as ext4 ({DATA_LABEL})",
            dev.display()
        ));
        let out = crate::command("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-L",
                DATA_LABEL,
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
            ])
            .arg(&dev)
            .output();
        match out {
            Ok(o) if o.status.success() => match mount_ext4(&dev) {
                Ok(()) => {
                    d.push(format!("{} mounted at /var", dev.display()));
                    return Outcome::Ok;
                }
                Err(e) => d.push(e),
            },
            Ok(o) => d.push(format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => d.push(format!("mkfs.ext4: {e}")),
        }
    } else {
        d.push(format!("no disk labelled {DATA_LABEL} and no blank disk"));
    }
    let _ = nix::mount::mount(Some("var"), &var, Some("tmpfs"), flags, Some("mode=0755"));
    d.push("NO DATA DISK: /var is a tmpfs and everything in it is lost at power-off".into());
    Outcome::Degraded
}

/// The machine id: kept on the data disk, generated once, exposed at `/run/machine-id` and
/// bind-mounted over `/etc/machine-id` when the image has that file.
pub fn machine_id(root: &Path, d: &mut Vec<String>) -> Outcome {
    let kept = root.join("var/lib/shoal/machine-id");
    let id = match std::fs::read_to_string(&kept) {
        Ok(s) if s.trim().len() == 32 => s.trim().to_string(),
        _ => {
            let uuid = std::fs::read_to_string(root.join("proc/sys/kernel/random/uuid"))
                .unwrap_or_default();
            let id: String = uuid.trim().chars().filter(|c| *c != '-').collect();
            if id.len() != 32 {
                d.push("cannot generate a machine id".into());
                return Outcome::Failed;
            }
            let _ = std::fs::create_dir_all(root.join("var/lib/shoal"));
            if let Err(e) = std::fs::write(&kept, format!("{id}\n")) {
                d.push(format!("cannot keep the machine id: {e}"));
            }
            d.push("new machine id".into());
            id
        }
    };
    let run = root.join("run/machine-id");
    let _ = std::fs::write(&run, format!("{id}\n"));
    let etc = root.join("etc/machine-id");
    if etc.is_file() {
        if let Err(e) = nix::mount::mount(
            Some(&run),
            &etc,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        ) {
            d.push(format!("bind /etc/machine-id: {e}"));
            return Outcome::Degraded;
        }
    }
    d.push(id);
    Outcome::Ok
}

/// What Docker needs from the kernel.
pub const MODULES: [&str; 9] = [
    "overlay",
    "br_netfilter",
    "nf_nat",
    "nf_conntrack",
    "veth",
    "bridge",
    "ip_tables",
    "iptable_nat",
    "iptable_filter",
];

/// Every `modalias` of every device under `/sys/devices` (what udev would load drivers for).
fn modaliases(dir: &Path, depth: usize, out: &mut std::collections::BTreeSet<String>) {
    if depth > 12 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_symlink() {
            continue;
        }
        if ft.is_dir() {
            modaliases(&e.path(), depth + 1, out);
        } else if e.file_name() == "modalias" {
            if let Ok(a) = std::fs::read_to_string(e.path()) {
                let a = a.trim();
                if !a.is_empty() {
                    out.insert(a.to_string());
                }
            }
        }
    }
}

/// Loads drivers for the hardware present (coldplug, in passes: a bus driver makes new
/// devices appear), then what Docker needs.
pub fn modules(root: &Path, d: &mut Vec<String>) -> Outcome {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let mut now = std::collections::BTreeSet::new();
        modaliases(&root.join("sys/devices"), 0, &mut now);
        let new: Vec<String> = now.difference(&seen).cloned().collect();
        if new.is_empty() {
            break;
        }
        for chunk in new.chunks(256) {
            let _ = crate::command("modprobe")
                .args(["-q", "-a", "-b"])
                .args(chunk)
                .status();
        }
        seen.extend(new);
    }
    d.push(format!("{} device aliases", seen.len()));
    let mut outcome = Outcome::Ok;
    // One modprobe for all of them (each process costs ~100 ms under emulation), then a
    // look at /sys/module for what did not load.
    if let Err(e) = crate::command("modprobe")
        .args(["-q", "-a"])
        .args(MODULES)
        .status()
    {
        d.push(format!("modprobe: {e}"));
        return Outcome::Degraded;
    }
    let builtin = nix::sys::utsname::uname()
        .ok()
        .and_then(|u| {
            std::fs::read_to_string(
                root.join("usr/lib/modules")
                    .join(u.release())
                    .join("modules.builtin"),
            )
            .ok()
        })
        .unwrap_or_default();
    for m in MODULES {
        let loaded =
            root.join("sys/module").join(m).exists() || builtin.contains(&format!("/{m}.ko"));
        if !loaded {
            d.push(format!("{m}: not loaded"));
            outcome = Outcome::Degraded;
        }
    }
    outcome
}

pub const SYSCTLS: [(&str, &str); 5] = [
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
    ("net/bridge/bridge-nf-call-iptables", "1"),
    ("net/bridge/bridge-nf-call-ip6tables", "1"),
    ("fs/inotify/max_user_instances", "8192"),
];

pub fn sysctls(root: &Path, net_only: bool, d: &mut Vec<String>) -> Outcome {
    let mut outcome = Outcome::Ok;
    for (k, v) in SYSCTLS {
        if net_only && !k.starts_with("net/") {
            continue;
        }
        if let Err(e) = std::fs::write(root.join("proc/sys").join(k), v) {
            d.push(format!("{k}: {e}"));
            outcome = Outcome::Degraded;
        }
    }
    outcome
}
