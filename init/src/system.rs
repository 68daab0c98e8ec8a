//! Machine setup stages: the data disk, the persistent machine id, kernel modules, sysctls.

use crate::metadata::volume;
use crate::report::Outcome;
use std::path::Path;

pub const DATA_LABEL: &str = "SHOAL_DATA";
/// The GPT partition name of shoal.raw's data partition (blank in the image).
pub const DATA_PARTITION: &str = "shoal-data";

/// Mounts the data disk at `/var`: the volume labelled `SHOAL_DATA`, else a blank disk
/// formatted once (ext4, labelled), else a tmpfs — said loudly: state is lost at power-off.
pub fn data_disk(root: &Path, d: &mut Vec<String>) -> Outcome {
    let outcome = mount_data(root, d);
    writable_etc(root, d);
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
    } else if let Some((dev, kind)) = blank_target(root) {
        if kind == "partition" {
            grow_last_partition(root, &dev, d);
        }
        d.push(format!(
            "formatting blank {kind} {} as ext4 ({DATA_LABEL})",
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
        d.push(format!(
            "no disk labelled {DATA_LABEL}, no blank disk and no blank {DATA_PARTITION} partition"
        ));
    }
    let _ = nix::mount::mount(Some("var"), &var, Some("tmpfs"), flags, Some("mode=0755"));
    d.push("NO DATA DISK: /var is a tmpfs and everything in it is lost at power-off".into());
    Outcome::Degraded
}

/// Where a data file system may be made, first match wins: a blank whole disk (an attached
/// volume: it is what the user gave us for state), else shoal.raw's own blank `shoal-data`
/// partition. Never a disk that has partitions, never anything written to.
fn blank_target(root: &Path) -> Option<(std::path::PathBuf, &'static str)> {
    let sys = root.join("sys/class/block");
    let is_blank =
        |dev: &Path| volume::read_head(dev).is_some_and(|h| h.len() >= 65536 && volume::blank(&h));
    let devices = volume::devices(root);
    let whole = devices.iter().find(|dev| {
        let name = dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let partitioned = std::fs::read_dir(sys.join(&name))
            .map(|e| {
                e.filter_map(|x| x.ok())
                    .any(|x| x.file_name().to_string_lossy().starts_with(&name))
            })
            .unwrap_or(false);
        let is_partition = sys.join(&name).join("partition").exists();
        !partitioned && !is_partition && is_blank(dev)
    });
    if let Some(dev) = whole {
        return Some((dev.clone(), "disk"));
    }
    {
        let dev = crate::initrd::find_partlabel(&sys, DATA_PARTITION)?;
        let dev = root.join(dev.strip_prefix("/").unwrap_or(&dev));
        // In test mode only the listed devices are candidates, as for whole disks.
        let listed = std::env::var_os("SHOAL_INIT_DISKS").is_none() || devices.contains(&dev);
        (listed && is_blank(&dev)).then_some((dev, "partition"))
    }
}

/// Sectors (512 bytes) from a sysfs number file.
fn sectors(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// How far the partition `name` may grow: the disk's sectors after its end, less the backup
/// GPT (33 sectors), when it is the disk's last partition and the gap is worth it (≥ 64 MiB:
/// the image is written to a larger disk, or a cloud volume is larger than the image).
pub fn growth(sys_block: &Path, name: &str) -> Option<(String, u32, u64)> {
    let part = sys_block.join(name);
    let number: u32 = std::fs::read_to_string(part.join("partition"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // The parent disk is the directory that holds this partition's entry.
    let disk = std::fs::read_link(&part).ok().and_then(|l| {
        l.parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
    })?;
    let (start, size) = (sectors(&part.join("start"))?, sectors(&part.join("size"))?);
    let disk_size = sectors(&sys_block.join(&disk).join("size"))?;
    let end = start + size;
    let later = std::fs::read_dir(sys_block.join(&disk))
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&disk))
        .any(|e| sectors(&e.path().join("start")).is_some_and(|s| s > start));
    let free = disk_size.saturating_sub(end + 33);
    (!later && free >= 64 * 2048).then_some((disk, number, free))
}

/// Grows the blank data partition over the rest of the disk before it is formatted: moves
/// the backup GPT to the disk's end, extends the partition, and tells the kernel (the disk is
/// in use: the root slot is on it, so only this partition is updated).
fn grow_last_partition(root: &Path, dev: &Path, d: &mut Vec<String>) {
    let Some(name) = dev.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let Some((disk, number, free)) = growth(&root.join("sys/class/block"), &name) else {
        return;
    };
    let disk_dev = root.join("dev").join(&disk);
    let run = |args: &[&str], input: Option<&str>| -> Result<(), String> {
        let mut c = crate::command(args[0]);
        c.args(&args[1..]).arg(&disk_dev);
        c.stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
        c.stdout(std::process::Stdio::null());
        c.stderr(std::process::Stdio::piped());
        let mut child = c.spawn().map_err(|e| format!("{}: {e}", args[0]))?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            use std::io::Write;
            let _ = stdin.write_all(text.as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let n = number.to_string();
    let grow = || -> Result<(), String> {
        run(&["sfdisk", "-q", "--relocate", "gpt-bak-std"], None)?;
        run(
            &["sfdisk", "-q", "--no-reread", "--no-tell-kernel", "-N", &n],
            Some(", +\n"),
        )?;
        run(&["partx", "-u", "--nr", &n], None)
    };
    match grow() {
        Ok(()) => d.push(format!(
            "grew {} by {} MiB to the end of /dev/{disk}",
            dev.display(),
            free / 2048
        )),
        Err(e) => d.push(format!("could not grow {}: {e}", dev.display())),
    }
}

/// Directories under `/etc` that programs write at run time, kept on the data disk and bound
/// over the read-only image's (dockerd 20.10 writes its engine key to /etc/docker).
pub fn writable_etc(root: &Path, d: &mut Vec<String>) {
    for name in ["docker"] {
        let target = root.join("etc").join(name);
        if !target.is_dir() {
            continue;
        }
        let kept = root.join("var/lib/shoal/etc").join(name);
        if let Err(e) = std::fs::create_dir_all(&kept) {
            d.push(format!("/var/lib/shoal/etc/{name}: {e}"));
            continue;
        }
        // Files the image ships there are copied once; the disk's copy wins afterwards.
        if let Ok(entries) = std::fs::read_dir(&target) {
            for e in entries.flatten() {
                let to = kept.join(e.file_name());
                if e.file_type().is_ok_and(|t| t.is_file()) && !to.exists() {
                    let _ = std::fs::copy(e.path(), &to);
                }
            }
        }
        match nix::mount::mount(
            Some(&kept),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        ) {
            Ok(()) => d.push(format!("/etc/{name} kept on the data disk")),
            Err(e) => d.push(format!("/etc/{name}: bind mount: {e}")),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::growth;
    use std::path::Path;

    /// A sysfs block tree: `class/block/X` links into `devices/vda/...`.
    fn disk(root: &Path, disk_sectors: u64, parts: &[(u32, u64, u64)]) {
        let dev = root.join("devices/pci0/virtio1/block/vda");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("size"), format!("{disk_sectors}\n")).unwrap();
        let class = root.join("class/block");
        std::fs::create_dir_all(&class).unwrap();
        std::os::unix::fs::symlink(&dev, class.join("vda")).unwrap();
        for (n, start, size) in parts {
            let p = dev.join(format!("vda{n}"));
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("partition"), format!("{n}\n")).unwrap();
            std::fs::write(p.join("start"), format!("{start}\n")).unwrap();
            std::fs::write(p.join("size"), format!("{size}\n")).unwrap();
            std::os::unix::fs::symlink(&p, class.join(format!("vda{n}"))).unwrap();
        }
    }

    const MIB: u64 = 2048;
    // shoal.raw: ESP at 1 MiB (128), A (1024), B (1024), data (512).
    const LAYOUT: [(u32, u64, u64); 4] = [
        (1, MIB, 128 * MIB),
        (2, 129 * MIB, 1024 * MIB),
        (3, 1153 * MIB, 1024 * MIB),
        (4, 2177 * MIB, 512 * MIB),
    ];

    #[test]
    fn the_last_partition_grows_over_a_larger_disk() {
        let d = tempfile::tempdir().unwrap();
        disk(d.path(), 8192 * MIB, &LAYOUT);
        let (disk_name, n, free) = growth(&d.path().join("class/block"), "vda4").unwrap();
        assert_eq!((disk_name.as_str(), n), ("vda", 4));
        assert_eq!(free, 8192 * MIB - 2689 * MIB - 33);
    }

    #[test]
    fn nothing_grows_on_a_disk_the_size_of_the_image_or_before_another_partition() {
        let d = tempfile::tempdir().unwrap();
        disk(d.path(), 2690 * MIB, &LAYOUT);
        assert_eq!(growth(&d.path().join("class/block"), "vda4"), None);
        let d = tempfile::tempdir().unwrap();
        disk(d.path(), 8192 * MIB, &LAYOUT);
        assert_eq!(growth(&d.path().join("class/block"), "vda3"), None);
        assert_eq!(growth(&d.path().join("class/block"), "vda"), None);
    }
}
