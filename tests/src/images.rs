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

/// An image built `FROM` the test image holding host executables (at `dest`, with the
/// shared libraries `ldd` says they load, at the paths it names) and extra files: for apps
/// busybox cannot be (a WebSocket server, nginx). Tagged `shoal-e2e/NAME:<hash of what it
/// holds>`; answers the tag and its `docker save` archive. Safe to call from tests at once.
pub fn host_image(
    name: &str,
    bins: &[(&Path, &str)],
    files: &[(&str, &[u8])],
) -> (String, PathBuf) {
    use std::hash::{Hash, Hasher};
    let base = busybox_image();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(&base).unwrap().len().hash(&mut h);
    let mut libs = std::collections::BTreeSet::new();
    for (src, dest) in bins {
        std::fs::read(src)
            .unwrap_or_else(|e| panic!("{}: {e}", src.display()))
            .hash(&mut h);
        dest.hash(&mut h);
        let ldd = run(Command::new("ldd").arg(src));
        for l in ldd.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux….so.2 (0x…)"
            let path = l.split("=>").last().unwrap_or("").split_whitespace().next();
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.insert(p.to_string());
            }
        }
    }
    for (dest, bytes) in files {
        dest.hash(&mut h);
        bytes.hash(&mut h);
    }
    let tag = format!("shoal-e2e/{name}:{:016x}", h.finish());
    let dir = base.parent().unwrap().to_path_buf();
    let archive = dir.join(format!("{name}-{:016x}.tar", h.finish()));
    if archive.exists() {
        return (tag, archive);
    }
    let lock = std::fs::File::create(dir.join(format!("{name}.lock"))).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    if archive.exists() {
        return (tag, archive);
    }
    let work = tempfile::tempdir_in(&dir).unwrap();
    let root = work.path().join("root");
    let put = |dest: &str, bytes: &[u8], mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        let to = root.join(dest.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(&to, bytes).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    for lib in &libs {
        put(lib, &std::fs::read(lib).unwrap(), 0o755);
    }
    for (src, dest) in bins {
        put(dest, &std::fs::read(src).unwrap(), 0o755);
    }
    for (dest, bytes) in files {
        put(dest, bytes, 0o644);
    }
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        work.path().join("Dockerfile"),
        format!("FROM {BUSYBOX}\nCOPY root/ /\n"),
    )
    .unwrap();
    run(Command::new("docker")
        .args(["build", "-q", "-t", &tag])
        .arg(work.path()));
    let saved = work.path().join("image.tar");
    run(Command::new("docker")
        .args(["save", "-o"])
        .arg(&saved)
        .arg(&tag));
    std::fs::rename(&saved, &archive).unwrap();
    (tag, archive)
}

/// The WebSocket echo app (`ws-echo PORT`, this crate's binary) as an image: its tag and archive.
pub fn ws_echo_image(bin: &Path) -> (String, PathBuf) {
    host_image("ws-echo", &[(bin, "/bin/ws-echo")], &[])
}
