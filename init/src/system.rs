//! Machine setup stages: the data disk, the persistent machine id, kernel modules, sysctls.

use crate::metadata::volume;
use crate::report::Outcome;
use crate::sys::{check, MntFlags, MsFlags, RunError, Sys};
use nix::errno::Errno;
use std::path::{Path, PathBuf};

/// Why a disk step did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Kernel { what: String, source: Errno },
    #[error("{avail_mib} MiB free on a {total_mib} MiB disk is too little to reserve")]
    NoRoom { avail_mib: u64, total_mib: u64 },
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> SystemError {
    let what = what.to_string();
    move |source| SystemError::Io { what, source }
}

fn kernel(what: impl std::fmt::Display) -> impl FnOnce(Errno) -> SystemError {
    let what = what.to_string();
    move |source| SystemError::Kernel { what, source }
}

/// `fsck.ext4 -p`: what it did, or why it could not (exit 2 and above).
fn fsck(sys: &dyn Sys, dev: &Path) -> Result<&'static str, SystemError> {
    let o = sys
        .run(crate::command("fsck.ext4").arg("-p").arg(dev), None)
        .map_err(|source| RunError::Spawn {
            program: "fsck.ext4".into(),
            source,
        })?;
    match o.status.code() {
        Some(0) => Ok("clean"),
        Some(1) => Ok("errors corrected"),
        code => Err(RunError::Failed {
            program: "fsck.ext4".into(),
            code,
            said: String::from_utf8_lossy(&o.stdout).trim().to_string(),
        }
        .into()),
    }
}

pub const DATA_LABEL: &str = "SHOAL_DATA";
/// The GPT partition name of shoal.raw's data partition (blank in the image).
pub const DATA_PARTITION: &str = "shoal-data";

/// Mounts the data disk at `/var`: the volume labelled `SHOAL_DATA`, else a blank disk
/// formatted once (ext4, labelled), else a tmpfs — said loudly: state is lost at power-off.
pub fn data_disk(sys: &dyn Sys, env: &crate::env::InitEnv, d: &mut Vec<String>) -> Outcome {
    let root = env.root.as_path();
    let mut outcome = mount_data(sys, root, env.disks.as_deref(), d);
    if outcome == Outcome::Ok {
        outcome = store_volume(sys, root, d);
    }
    writable_etc(sys, root, d);
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

fn mount_data(sys: &dyn Sys, root: &Path, only: Option<&[String]>, d: &mut Vec<String>) -> Outcome {
    let var = root.join("var");
    let _ = std::fs::create_dir_all(&var);
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let mount_ext4 = |dev: &Path| {
        sys.mount(Some(dev), &var, Some("ext4"), flags, None)
            .map_err(kernel(format!("mount {} on /var", dev.display())))
    };
    let mounted = if let Some((dev, p)) = volume::find(root, only, DATA_LABEL) {
        if p.fstype != "ext4" {
            Err(format!(
                "{} is labelled {DATA_LABEL} but is {}, not ext4",
                dev.display(),
                p.fstype
            ))
        } else {
            // Check before mounting: after a clean power-off this is a no-op.
            match fsck(sys, &dev) {
                Ok(said) => d.push(format!("fsck: {said}")),
                Err(e) => d.push(format!("fsck: {e}")),
            }
            mount_ext4(&dev).map(|()| dev).map_err(|e| e.to_string())
        }
    } else if let Some((dev, kind)) = blank_target(root, only) {
        if kind == "partition" {
            grow_last_partition(sys, root, &dev, d);
        }
        d.push(format!(
            "formatting blank {kind} {} as ext4 ({DATA_LABEL})",
            dev.display()
        ));
        let mut mkfs = crate::command("mkfs.ext4");
        mkfs.args(["-q", "-F", "-L", DATA_LABEL])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg(&dev);
        check("mkfs.ext4", sys.run(&mut mkfs, None))
            .map_err(SystemError::from)
            .and_then(|_| mount_ext4(&dev))
            .map(|()| dev)
            .map_err(|e| e.to_string())
    } else {
        Err(format!(
            "no disk labelled {DATA_LABEL}, no blank disk and no blank {DATA_PARTITION} partition"
        ))
    };
    match mounted {
        Ok(dev) => {
            d.push(format!("{} mounted at /var", dev.display()));
            return Outcome::Ok;
        }
        Err(e) => d.push(e),
    }
    let _ = sys.mount(
        Some(Path::new("var")),
        &var,
        Some("tmpfs"),
        flags,
        Some("mode=0755"),
    );
    d.push("NO DATA DISK: /var is a tmpfs and everything in it is lost at power-off".into());
    Outcome::Degraded
}

/// The agent's state (`/var/lib/shoal`: the store, the node's identity) lives on a file system
/// of its own: an ext4 image on the data disk, written in full when made, loop-mounted. Images, containers'
/// writes and logs may fill the data disk; they never take the store's space, so the store
/// always has room to commit (and to record that the disk is full).
pub const STORE_IMAGE: &str = "var/lib/shoal-store.img";
pub const STORE_DIR: &str = "var/lib/shoal";
pub const STORE_LABEL: &str = "SHOAL_STORE";

const MIB: u64 = 1 << 20;

/// How large the store's file system is made on a data disk of `total` bytes with `avail`
/// free: a thirty-second of the disk, 64 MiB to 1 GiB (the store holds state, not data), at
/// most half of what is free; `None` when that leaves less than 32 MiB.
pub fn store_volume_size(total: u64, avail: u64) -> Option<u64> {
    let size = (total / 32).clamp(64 * MIB, 1024 * MIB).min(avail / 2);
    let size = size / MIB * MIB;
    (size >= 32 * MIB).then_some(size)
}

/// Makes (once) and mounts the store's file system at `/var/lib/shoal`, moving what an older
/// node kept there onto it.
fn store_volume(sys: &dyn Sys, root: &Path, d: &mut Vec<String>) -> Outcome {
    let img = root.join(STORE_IMAGE);
    let dir = root.join(STORE_DIR);
    if !img.exists() {
        match make_store_image(sys, root, &img) {
            Ok(size) => d.push(format!(
                "made the store's file system: {} MiB, reserved on the data disk",
                size / MIB
            )),
            Err(e) => {
                d.push(format!(
                    "the store shares the data disk's space (a full disk can stop its writes): {e}"
                ));
                return Outcome::Degraded;
            }
        }
    }
    match fsck(sys, &img) {
        Ok(said) => d.push(format!("store fsck: {said}")),
        Err(e) => d.push(format!("store fsck: {e}")),
    }
    // What an older node kept on the data disk itself moves in first (copied, then removed).
    let has_old = std::fs::read_dir(&dir).is_ok_and(|mut e| e.next().is_some());
    if has_old && !crate::mounts::is_mount_point(&dir) {
        let staging = root.join("var/lib/.shoal-store-new");
        let moved = (|| -> Result<(), SystemError> {
            let _ = std::fs::create_dir_all(&staging);
            loop_mount(sys, &img, &staging)?;
            let copied = copy_tree(&dir, &staging).map_err(io("copying"));
            let synced = std::fs::File::open(&staging)
                .and_then(|f| f.sync_all())
                .map_err(io("sync"));
            let _ = sys.umount(&staging, MntFlags::empty());
            copied.and(synced)?;
            let old = root.join("var/lib/.shoal-before-volume");
            std::fs::rename(&dir, &old).map_err(io("moving the old directory"))?;
            let _ = std::fs::remove_dir_all(&old);
            Ok(())
        })();
        let _ = std::fs::remove_dir(&staging);
        match moved {
            Ok(()) => d.push("moved /var/lib/shoal onto the store's file system".into()),
            Err(e) => {
                d.push(format!(
                    "cannot move /var/lib/shoal onto its own file system: {e}"
                ));
                return Outcome::Degraded;
            }
        }
    }
    if crate::mounts::is_mount_point(&dir) {
        return Outcome::Ok;
    }
    let _ = std::fs::create_dir_all(&dir);
    match loop_mount(sys, &img, &dir) {
        Ok(()) => {
            d.push(format!("{} mounted at /{STORE_DIR}", img.display()));
            Outcome::Ok
        }
        Err(e) => {
            d.push(format!("the store shares the data disk's space: {e}"));
            Outcome::Degraded
        }
    }
}

fn make_store_image(sys: &dyn Sys, root: &Path, img: &Path) -> Result<u64, SystemError> {
    let vfs = nix::sys::statvfs::statvfs(&root.join("var")).map_err(kernel("statvfs"))?;
    let frag = vfs.fragment_size();
    let total = vfs.blocks() * frag;
    let avail = vfs.blocks_available() * frag;
    let size = store_volume_size(total, avail).ok_or(SystemError::NoRoom {
        avail_mib: avail / MIB,
        total_mib: total / MIB,
    })?;
    let _ = std::fs::create_dir_all(img.parent().unwrap_or(root));
    let tmp = img.with_extension("img.tmp");
    let made = (|| -> Result<(), SystemError> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)
            .map_err(io(tmp.display()))?;
        // Written, not just allocated: fallocate's extents are "unwritten", and the first
        // write to one can need a new block of the data disk's — which a full disk does not
        // have (the store then fails with ENOSPC, as a test showed). Zeros written once (and
        // never punched out again) make every later write an overwrite in place.
        zero_fill(&f, size).map_err(io(tmp.display()))?;
        drop(f);
        let mut mkfs = crate::command("mkfs.ext4");
        // No discard: on a file, mke2fs's discard punches holes, and the image would be
        // sparse again.
        mkfs.args(["-q", "-F", "-m", "0", "-E", "nodiscard", "-L", STORE_LABEL])
            .arg(&tmp);
        check("mkfs.ext4", sys.run(&mut mkfs, None))?;
        std::fs::rename(&tmp, img).map_err(io(img.display()))
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made.map(|()| size)
}

/// Writes `size` bytes of zeros to `f` and makes them durable.
fn zero_fill(f: &std::fs::File, size: u64) -> std::io::Result<()> {
    use std::io::Write;
    let chunk = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        (&*f).write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

/// Mounts an ext4 image through a loop device that goes away with the mount
/// (util-linux `mount -o loop` sets autoclear).
fn loop_mount(sys: &dyn Sys, img: &Path, target: &Path) -> Result<(), SystemError> {
    let mut mount = crate::command("mount");
    mount
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev"])
        .arg(img)
        .arg(target);
    check("mount -o loop", sys.run(&mut mount, None))?;
    Ok(())
}

/// Copies a directory tree (files, directories, symbolic links) with its modes.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_dir() {
            std::fs::create_dir_all(&dst)?;
            copy_tree(&src, &dst)?;
        } else if t.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
            continue;
        } else if t.is_file() {
            std::fs::copy(&src, &dst)?;
        } else {
            continue;
        }
        let mode = e.metadata()?.permissions().mode();
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Where a data file system may be made, first match wins: a blank whole disk (an attached
/// volume: it is what the user gave us for state), else shoal.raw's own blank `shoal-data`
/// partition. Never a disk that has partitions, never anything written to.
fn blank_target(
    root: &Path,
    only: Option<&[String]>,
) -> Option<(std::path::PathBuf, &'static str)> {
    let sys = root.join("sys/class/block");
    let is_blank =
        |dev: &Path| volume::read_head(dev).is_some_and(|h| h.len() >= 65536 && volume::blank(&h));
    let devices = volume::devices(root, only);
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
        let listed = only.is_none() || devices.contains(&dev);
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
fn grow_last_partition(sys: &dyn Sys, root: &Path, dev: &Path, d: &mut Vec<String>) {
    let Some(name) = dev.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let Some((disk, number, free)) = growth(&root.join("sys/class/block"), &name) else {
        return;
    };
    let disk_dev = root.join("dev").join(&disk);
    let run = |args: &[&str], input: Option<&[u8]>| -> Result<(), RunError> {
        let mut c = crate::command(args[0]);
        c.args(&args[1..]).arg(&disk_dev);
        check(&args.join(" "), sys.run(&mut c, input)).map(drop)
    };
    let n = number.to_string();
    let grow = || -> Result<(), RunError> {
        run(&["sfdisk", "-q", "--relocate", "gpt-bak-std"], None)?;
        run(
            &["sfdisk", "-q", "--no-reread", "--no-tell-kernel", "-N", &n],
            Some(b", +\n"),
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
pub fn writable_etc(sys: &dyn Sys, root: &Path, d: &mut Vec<String>) {
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
        match sys.mount(Some(&kept), &target, None, MsFlags::MS_BIND, None) {
            Ok(()) => d.push(format!("/etc/{name} kept on the data disk")),
            Err(e) => d.push(format!("/etc/{name}: bind mount: {e}")),
        }
    }
}

/// The machine id: kept on the data disk, generated once, exposed at `/run/machine-id` and
/// bind-mounted over `/etc/machine-id` when the image has that file.
pub fn machine_id(sys: &dyn Sys, root: &Path, d: &mut Vec<String>) -> Outcome {
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
        if let Err(e) = sys.mount(Some(&run), &etc, None, MsFlags::MS_BIND, None) {
            d.push(format!("bind /etc/machine-id: {e}"));
            return Outcome::Degraded;
        }
    }
    d.push(id);
    Outcome::Ok
}

/// What the boot itself needs beyond the hardware's drivers: the store's file system is an
/// image on the data disk (`store_volume`, the next stage).
pub const BOOT_MODULES: [&str; 1] = ["loop"];

/// What Docker needs from the kernel; loaded beside the later stages (`docker_modules`).
pub const DOCKER_MODULES: [&str; 9] = [
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

/// Every device's `modalias`, through `/sys/bus/*/devices/*` and `/sys/class/*/*` (the
/// devices udev's coldplug triggers: class devices such as the power button's input device,
/// whose alias loads `evdev`, are on no bus), and the CPU's
/// (`/sys/devices/system/cpu/modalias`): one directory a bus or class, no walk of the whole
/// device tree (which costs ~100 ms a pass under emulation).
fn modaliases(root: &Path) -> std::collections::BTreeSet<String> {
    let mut files = vec![root.join("sys/devices/system/cpu/modalias")];
    let dirs = |p: PathBuf| {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
    };
    for bus in dirs(root.join("sys/bus")) {
        files.extend(dirs(bus.join("devices")).map(|d| d.join("modalias")));
    }
    for class in dirs(root.join("sys/class")) {
        files.extend(dirs(class).map(|d| d.join("modalias")));
    }
    files
        .into_iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect()
}

/// Loads drivers for the devices present (coldplug), then `BOOT_MODULES`. The CPU's own
/// aliases (`cpu:…`: crypto and checksum acceleration, whose self-tests take seconds under
/// emulation) are `cpu_modules`'s: nothing at boot needs them.
pub fn modules(sys: &dyn Sys, root: &Path, d: &mut Vec<String>) -> Outcome {
    coldplug(sys, root, |a| !a.starts_with("cpu:"), &BOOT_MODULES, d);
    load(sys, root, &BOOT_MODULES, d)
}

/// Loads Docker's modules, then sets the sysctls that exist only once they are loaded (bridge
/// netfilter). A background stage: dockerd waits for it, nothing else does.
pub fn docker_modules(sys: &dyn Sys, root: &Path, d: &mut Vec<String>) -> Outcome {
    let loaded = load(sys, root, &DOCKER_MODULES, d);
    let set = sysctls(root, &BRIDGE_SYSCTLS, d);
    if loaded == Outcome::Ok {
        set
    } else {
        loaded
    }
}

/// The CPU's own drivers (`cpu:…` aliases). A background stage nothing waits for.
pub fn cpu_modules(sys: &dyn Sys, root: &Path, d: &mut Vec<String>) -> Outcome {
    coldplug(sys, root, |a| a.starts_with("cpu:"), &[], d);
    Outcome::Ok
}

/// Coldplug of the aliases `wanted` picks, in passes (a bus driver makes new devices
/// appear), one modprobe per pass, the first also loading `also` (one process fewer: ~100 ms
/// under emulation); how many aliases and how long, in `d`.
fn coldplug(
    sys: &dyn Sys,
    root: &Path,
    wanted: impl Fn(&str) -> bool,
    also: &[&str],
    d: &mut Vec<String>,
) {
    let mut seen = std::collections::BTreeSet::new();
    let mut passes = Vec::new();
    let mut also: Vec<String> = also.iter().map(|m| m.to_string()).collect();
    for _ in 0..4 {
        let new: Vec<String> = modaliases(root)
            .difference(&seen)
            .filter(|a| wanted(a))
            .cloned()
            .collect();
        if new.is_empty() && also.is_empty() {
            break;
        }
        let t = sys.now();
        let names: Vec<String> = std::mem::take(&mut also)
            .into_iter()
            .chain(new.clone())
            .collect();
        for chunk in names.chunks(256) {
            // An alias nothing matches is not an error (-b: the blacklist is honoured).
            let _ = sys.run(
                crate::command("modprobe")
                    .args(["-q", "-a", "-b"])
                    .args(chunk),
                None,
            );
        }
        let took = sys.now().saturating_duration_since(t);
        passes.push(format!("{} in {} ms", new.len(), took.as_millis()));
        seen.extend(new);
    }
    d.push(format!(
        "{} device aliases ({})",
        seen.len(),
        passes.join(", ")
    ));
}

/// Loads `names` with one modprobe (each process costs ~100 ms under emulation), then looks
/// in /sys/module (and the kernel's built-in list) for what did not load.
fn load(sys: &dyn Sys, root: &Path, names: &[&str], d: &mut Vec<String>) -> Outcome {
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
    let loaded =
        |m: &str| root.join("sys/module").join(m).exists() || builtin.contains(&format!("/{m}.ko"));
    let missing: Vec<&str> = names.iter().copied().filter(|m| !loaded(m)).collect();
    if missing.is_empty() {
        return Outcome::Ok;
    }
    let mut modprobe = crate::command("modprobe");
    modprobe.args(["-q", "-a"]).args(&missing);
    let t = sys.now();
    match check("modprobe", sys.run(&mut modprobe, None)) {
        Ok(_) => d.push(format!(
            "{} in {} ms",
            missing.join(" "),
            sys.now().saturating_duration_since(t).as_millis()
        )),
        Err(e) => d.push(e.to_string()),
    }
    let mut outcome = Outcome::Ok;
    for m in missing {
        if !loaded(m) {
            d.push(format!("{m}: not loaded"));
            outcome = Outcome::Degraded;
        }
    }
    outcome
}

pub const SYSCTLS: [(&str, &str); 3] = [
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
    ("fs/inotify/max_user_instances", "8192"),
];

/// These exist once `br_netfilter` is loaded (`docker_modules`).
pub const BRIDGE_SYSCTLS: [(&str, &str); 2] = [
    ("net/bridge/bridge-nf-call-iptables", "1"),
    ("net/bridge/bridge-nf-call-ip6tables", "1"),
];

/// Writes `which` under `root`'s /proc/sys.
pub fn sysctls(root: &Path, which: &[(&str, &str)], d: &mut Vec<String>) -> Outcome {
    let mut outcome = Outcome::Ok;
    for (k, v) in which {
        if let Err(e) = std::fs::write(root.join("proc/sys").join(k), v) {
            d.push(format!("{k}: {e}"));
            outcome = Outcome::Degraded;
        }
    }
    outcome
}

#[cfg(test)]
mod store_volume_tests {
    use super::*;

    #[test]
    fn the_store_gets_a_thirty_second_of_the_disk_within_bounds() {
        const GIB: u64 = 1 << 30;
        assert_eq!(store_volume_size(20 * GIB, 19 * GIB), Some(640 * MIB));
        assert_eq!(store_volume_size(200 * GIB, 190 * GIB), Some(GIB));
        assert_eq!(store_volume_size(256 * MIB, 240 * MIB), Some(64 * MIB));
        // At most half of what is free, and nothing below 32 MiB.
        assert_eq!(store_volume_size(20 * GIB, GIB), Some(512 * MIB));
        assert_eq!(store_volume_size(20 * GIB, 50 * MIB), None);
        assert_eq!(store_volume_size(0, 0), None);
    }
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

#[cfg(test)]
mod coldplug_tests {
    use super::*;
    use crate::sys::fake::{Call, Recording};

    fn alias(root: &Path, bus: &str, dev: &str, a: &str) {
        let d = root.join("sys/bus").join(bus).join("devices").join(dev);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("modalias"), format!("{a}\n")).unwrap();
    }

    fn modprobes(sys: &Recording) -> Vec<Vec<String>> {
        sys.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Run(argv) if argv[0] == "modprobe" => Some(argv[1..].to_vec()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn devices_get_one_modprobe_with_the_boot_modules_and_the_cpu_waits() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        alias(
            r,
            "pci",
            "0000:00:02.0",
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00",
        );
        alias(r, "virtio", "virtio0", "virtio:d00000001v00001AF4");
        alias(
            r,
            "cpu",
            "cpu0",
            "cpu:type:x86,ven0000fam0006mod003F:feature:,0000,0001",
        );
        // The power button's input device: a class device, on no bus (its alias loads evdev).
        let input = r.join("sys/class/input/input0");
        std::fs::create_dir_all(&input).unwrap();
        std::fs::write(
            input.join("modalias"),
            "input:b0019v0000p0001e0000-e0,1,k74,ramlsfw\n",
        )
        .unwrap();
        // A device without a modalias, and a bus without devices.
        std::fs::create_dir_all(r.join("sys/bus/pci/devices/0000:00:00.0")).unwrap();
        std::fs::create_dir_all(r.join("sys/bus/empty")).unwrap();
        std::fs::create_dir_all(r.join("sys/module/loop")).unwrap();

        let sys = Recording::new(r);
        let mut d = Vec::new();
        assert_eq!(modules(&sys, r, &mut d), Outcome::Ok);
        let runs = modprobes(&sys);
        assert_eq!(runs.len(), 1, "{runs:?}");
        let args = &runs[0];
        assert_eq!(&args[..4], ["-q", "-a", "-b", "loop"]);
        assert!(args.iter().any(|a| a.starts_with("pci:v00001AF4")));
        assert!(args.iter().any(|a| a.starts_with("virtio:")));
        assert!(
            args.iter().any(|a| a.starts_with("input:b0019")),
            "{args:?}"
        );
        assert!(!args.iter().any(|a| a.starts_with("cpu:")), "{args:?}");
        assert!(d[0].starts_with("3 device aliases"), "{d:?}");

        let sys = Recording::new(r);
        let mut d = Vec::new();
        cpu_modules(&sys, r, &mut d);
        let runs = modprobes(&sys);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].len(), 4);
        assert!(runs[0][3].starts_with("cpu:type:x86"));
    }
}
