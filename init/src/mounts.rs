//! The pseudo and scratch file systems every shoal machine needs. The root stays read-only;
//! everything writable is tmpfs or (later stages) the data disk.

use crate::sys::{MntFlags, MsFlags, Sys};
use std::path::Path;

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
}

fn table() -> Vec<Mount> {
    let nsd = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let nsde = nsd | MsFlags::MS_NOEXEC;
    vec![
        Mount {
            source: "proc",
            target: "proc",
            fstype: "proc",
            flags: nsde,
            data: "",
        },
        Mount {
            source: "sysfs",
            target: "sys",
            fstype: "sysfs",
            flags: nsde,
            data: "",
        },
        Mount {
            source: "devtmpfs",
            target: "dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: "mode=0755",
        },
        Mount {
            source: "devpts",
            target: "dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: "gid=5,mode=620,ptmxmode=666",
        },
        Mount {
            source: "shm",
            target: "dev/shm",
            fstype: "tmpfs",
            flags: nsd,
            data: "mode=1777",
        },
        Mount {
            source: "run",
            target: "run",
            fstype: "tmpfs",
            flags: nsd,
            data: "mode=0755",
        },
        Mount {
            source: "tmp",
            target: "tmp",
            fstype: "tmpfs",
            flags: nsd,
            data: "mode=1777",
        },
        Mount {
            source: "cgroup2",
            target: "sys/fs/cgroup",
            fstype: "cgroup2",
            flags: nsde,
            data: "nsdelegate",
        },
    ]
}

/// Mounts the table under `root`. A target already mounted (EBUSY) counts as done; a failure
/// is reported and the next mount is still tried.
pub fn mount_all(sys: &dyn Sys, root: &Path, detail: &mut Vec<String>) -> bool {
    let mut ok = true;
    for m in table() {
        let target = root.join(m.target);
        if let Err(e) = std::fs::create_dir_all(&target) {
            // A read-only root has its mount points already; only report real trouble.
            if !target.is_dir() {
                detail.push(format!("{}: cannot create mount point: {e}", m.target));
                ok = false;
                continue;
            }
        }
        if is_mount_point(&target) {
            // The initramfs moved /dev and /run here already (with its record in /run).
            detail.push(format!("/{} already mounted", m.target));
            continue;
        }
        let data = (!m.data.is_empty()).then_some(m.data);
        let source = Some(Path::new(m.source));
        match sys.mount(source, &target, Some(m.fstype), m.flags, data) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) => detail.push(format!("/{} already mounted", m.target)),
            Err(e) => {
                // cgroup2 with nsdelegate refuses outside the initial namespace: retry without.
                if m.fstype == "cgroup2"
                    && sys
                        .mount(source, &target, Some(m.fstype), m.flags, None)
                        .is_ok()
                {
                    continue;
                }
                detail.push(format!("/{}: {e}", m.target));
                ok = false;
            }
        }
    }
    ok
}

/// Whether `p` is the root of a mounted file system (its device differs from its parent's).
pub fn is_mount_point(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(p), p.parent().map(std::fs::metadata)) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

/// Unmounts the table under `root` in reverse order (lazily: a busy file system is detached
/// and goes once its last user does).
pub fn unmount_all(sys: &dyn Sys, root: &Path) {
    // The store's file system first (its loop device writes into /var), then the data disk:
    // written out now, not by the lazy detach below. Busy ones stay for the detach.
    for p in [crate::system::STORE_DIR, "var"] {
        let _ = sys.umount(&root.join(p), MntFlags::empty());
        sys.sync();
    }
    for m in table().iter().rev() {
        let _ = sys.umount(&root.join(m.target), MntFlags::MNT_DETACH);
    }
}

/// What `/` is, from a mountinfo text: "root SOURCE FSTYPE ro|rw" for the last mount on `/`.
pub fn describe_root(mountinfo: &str) -> Option<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split_whitespace().collect();
            let post: Vec<&str> = post.split_whitespace().collect();
            if pre.get(4) != Some(&"/") || post.len() < 2 {
                return None;
            }
            let ro = pre.get(5).is_some_and(|o| o.split(',').any(|x| x == "ro"));
            Some(format!(
                "root {} {} {}",
                post[1],
                post[0],
                if ro { "ro" } else { "rw" }
            ))
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_from_mountinfo() {
        let mi = "22 1 0:21 / / rw,relatime - rootfs rootfs rw\n\
                  25 22 254:2 / / ro,nodev,relatime - squashfs /dev/vda2 ro,errors=continue\n\
                  26 25 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw\n";
        assert_eq!(
            super::describe_root(mi).as_deref(),
            Some("root /dev/vda2 squashfs ro")
        );
        assert_eq!(super::describe_root("garbage\n"), None);
    }
}
