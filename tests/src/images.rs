//! The test image: busybox-static from Debian, no registry.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::run;

/// The test image: a busybox-static root file system (Debian's `busybox-static`) imported
/// into the host's dockerd as `shoal-e2e/busybox:1`, and its `docker save` archive, whose path
/// this returns. There is no registry here: images come from local files. Safe to call from
/// tests running at once (one builds under a file lock, the archive lands by rename).
pub fn busybox_image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
            let dir = root.join("target/e2e-images");
            // Named after what it holds: a changed recipe gets a new file.
            let archive = dir.join("busybox-2.tar");
            if archive.exists() {
                return archive;
            }
            std::fs::create_dir_all(&dir).unwrap();
            // One test process builds it while the others wait: two imports at once would
            // give the name two different images (an import's id covers its time).
            let lock = std::fs::File::create(dir.join("busybox.lock")).unwrap();
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
            if archive.exists() {
                return archive;
            }
            let work = tempfile::tempdir_in(&dir).unwrap();
            let rootfs = work.path().join("rootfs");
            for d in ["bin", "tmp", "etc", "www"] {
                std::fs::create_dir_all(rootfs.join(d)).unwrap();
            }
            std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
                .expect("/bin/busybox (install busybox-static)");
            // Relative links: `busybox --install` would point them at this host's path.
            let applets = run(Command::new("/bin/busybox").arg("--list"));
            for a in applets.lines().filter(|a| *a != "busybox") {
                std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
            }
            std::fs::write(
                rootfs.join("etc/passwd"),
                "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
            )
            .unwrap();
            std::fs::write(rootfs.join("www/index.html"), "hello from busybox\n").unwrap();
            let tar = work.path().join("rootfs.tar");
            run(Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."));
            run(Command::new("docker")
                .args(["import", "-c", "CMD [\"/bin/sh\"]", "-c", "ENV PATH=/bin"])
                .arg(&tar)
                .arg(BUSYBOX));
            let saved = work.path().join("busybox.tar");
            run(Command::new("docker")
                .args(["save", "-o"])
                .arg(&saved)
                .arg(BUSYBOX));
            std::fs::rename(&saved, &archive).unwrap();
            archive
        })
        .clone()
}

/// The name `busybox_image` gives the test image.
pub const BUSYBOX: &str = "shoal-e2e/busybox:1";
