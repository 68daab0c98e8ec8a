//! The image's boot under QEMU TCG against a stock Debian cloud-style image with systemd
//! (image/stock/mkosi.conf: systemd, udev, cloud-init, OpenSSH, networkd, containerd, Docker),
//! built by the same mkosi from the same sources and booted the same way in the same run: the
//! same QEMU command, kernel and boot initramfs (which mounts each root), the same NoCloud seed.
//!
//! The stock system's console gets systemd's status lines (unit names only, so nothing is
//! shortened) and no login prompt (a getty on the console would silence systemd's status);
//! its first-boot wizard is off, as a cloud image ships it.
//!
//! Every console line is stamped on arrival; the split is
//! - firmware: QEMU start to the kernel's first line;
//! - kernel: the kernel's own clock when the initramfs started (shoal-init prints it);
//! - userspace: from there to "Docker answers" (shoal: dockerd's "API listen on" line; stock:
//!   systemd's "Started docker.service", a Type=notify unit) and to "ready" (shoal: the agent's
//!   /healthz through the forwarded port; stock: multi-user.target reached).
//!
//! Needs root, build/image (image/build) and build/stock (image/build-stock; built here when
//! missing). `cargo bench -p shoal-e2e --bench image_boot` (SHOAL_BENCH_RUNS, default 3;
//! SHOAL_BENCH_KINDS=shoal boots shoal only; SHOAL_BENCH_WARM=1 keeps shoal's data disk from
//! one boot to the next, so every boot after the first is a reboot). Each shoal boot also
//! prints shoal-init's stages from the boot report on /v1/status.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Shoal,
    Stock,
}

#[derive(Debug, Default, Clone)]
struct Run {
    firmware: f64,
    kernel: f64,
    docker: f64,
    ready: f64,
    /// shoal-init's own stages (the boot report): first start to the services stage's end,
    /// and each stage's time.
    init_ms: u64,
    stages: Vec<(String, u64)>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn sh(cmd: &mut Command) {
    let st = cmd.status().unwrap();
    assert!(st.success(), "{cmd:?} failed");
}

fn boot(kind: Kind, seed: &Path, scratch: &Path) -> Run {
    let r = repo();
    let img = r.join("build/image");
    let port = shoal_e2e::free_port();
    let mut args: Vec<String> = [
        "-accel",
        "tcg",
        "-machine",
        "q35",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "2048",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        "virtio-rng-pci",
        "-device",
        "virtio-net-pci,netdev=n0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push("-kernel".into());
    args.push(img.join("shoal.vmlinuz").display().to_string());
    args.push("-initrd".into());
    args.push(img.join("shoal.initrd").display().to_string());
    args.push("-netdev".into());
    args.push(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:7070"));
    let drive =
        |file: &Path, extra: &str| format!("file={},if=virtio,format=raw{extra}", file.display());
    match kind {
        Kind::Shoal => {
            // A blank data disk every boot (the first boot formats it), unless
            // SHOAL_BENCH_WARM=1: then the later boots find it made, as a rebooted node does.
            let data = scratch.join("data.img");
            let warm = std::env::var("SHOAL_BENCH_WARM").is_ok_and(|v| v == "1");
            if !(warm && data.exists()) {
                let _ = std::fs::remove_file(&data);
                sh(Command::new("truncate").args(["-s", "4G"]).arg(&data));
            }
            args.extend([
                "-append".into(),
                "console=ttyS0 panic=-1 shoal.root=PARTLABEL=shoal-a".into(),
                "-drive".into(),
                drive(&img.join("shoal.raw"), ",readonly=on"),
                "-drive".into(),
                drive(&data, ""),
            ]);
        }
        Kind::Stock => {
            args.extend([
                "-append".into(),
                "console=ttyS0 panic=-1 shoal.root=/dev/vda shoal.rootfstype=ext4 rw systemd.show_status=1 systemd.status_unit_format=name systemd.firstboot=off systemd.mask=serial-getty@ttyS0.service COLUMNS=200".into(),
                "-drive".into(),
                drive(&r.join("build/stock/root.ext4"), ",snapshot=on"),
            ]);
        }
    }
    args.extend(["-drive".into(), drive(seed, ",readonly=on")]);

    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines: Arc<Mutex<Vec<(f64, String)>>> = Arc::default();
    let out = qemu.stdout.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).split(b'\n').map_while(Result::ok) {
            let l = strip_ansi(&String::from_utf8_lossy(&l));
            sink.lock()
                .unwrap()
                .push((start.elapsed().as_secs_f64(), l));
        }
    });
    let seen = |needle: &str| -> Option<f64> {
        lines
            .lock()
            .unwrap()
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    };
    let mut ready = None;
    let docker_mark = match kind {
        Kind::Shoal => "API listen on /var/run/docker.sock",
        Kind::Stock => "Started docker.service",
    };
    let deadline = start + LIMIT;
    loop {
        if ready.is_none() {
            ready = match kind {
                Kind::Shoal => shoal_e2e::get(port, "/healthz")
                    .ok()
                    .filter(|r| r.status == 200)
                    .map(|_| start.elapsed().as_secs_f64()),
                Kind::Stock => seen("Reached target multi-user.target"),
            };
        }
        if ready.is_some() && seen(docker_mark).is_some() {
            break;
        }
        if Instant::now() > deadline || qemu.try_wait().ok().flatten().is_some() {
            let text: Vec<String> = lines
                .lock()
                .unwrap()
                .iter()
                .map(|(_, l)| l.clone())
                .collect();
            panic!("boot did not finish:\n{}", text.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (init_ms, stages) = match kind {
        Kind::Shoal => init_stages(port),
        Kind::Stock => (0, vec![]),
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    let firmware = seen("Linux version").unwrap_or(0.0);
    let kernel_ms: f64 = lines
        .lock()
        .unwrap()
        .iter()
        .find_map(|(_, l)| {
            let rest = l.split("initrd: root ").nth(1)?;
            let n = rest.split(", ").nth(1)?.split(" ms").next()?;
            n.trim().parse().ok()
        })
        .expect("the initramfs says when it started");
    let kernel = kernel_ms / 1000.0;
    Run {
        firmware,
        kernel,
        docker: seen(docker_mark).unwrap() - firmware - kernel,
        ready: ready.unwrap() - firmware - kernel,
        init_ms,
        stages,
    }
}

/// shoal-init's stages from the boot report the agent serves on /v1/status.
fn init_stages(port: u16) -> (u64, Vec<(String, u64)>) {
    let status: serde_json::Value = shoal_e2e::get(port, "/v1/status")
        .ok()
        .and_then(|r| serde_json::from_slice(&r.body).ok())
        .unwrap_or_default();
    let stages = status["boot"]["stages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ms = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap_or(0);
    let first = stages
        .iter()
        .map(|s| ms(s, "started_ms"))
        .min()
        .unwrap_or(0);
    let last = stages
        .iter()
        .find(|s| s["name"] == "services")
        .map(|s| ms(s, "ended_ms"))
        .unwrap_or(first);
    let each = stages
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("?").to_string(),
                ms(s, "ended_ms") - ms(s, "started_ms"),
            )
        })
        .collect();
    (last - first, each)
}

/// The line without terminal escapes (systemd colours its unit names).
fn strip_ansi(l: &str) -> String {
    let mut out = String::with_capacity(l.len());
    let mut chars = l.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-letter
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    shoal_e2e::netns::require_root();
    let r = repo();
    sh(Command::new(r.join("qemu/run"))
        .arg("build")
        .current_dir(&r));
    // SHOAL_BENCH_KINDS=shoal boots only shoal (no stock image needed).
    let kinds: Vec<Kind> = match std::env::var("SHOAL_BENCH_KINDS").as_deref() {
        Ok("shoal") => vec![Kind::Shoal],
        _ => vec![Kind::Shoal, Kind::Stock],
    };
    if kinds.contains(&Kind::Stock) && !r.join("build/stock/root.ext4").exists() {
        sh(Command::new(r.join("image/build-stock")).current_dir(&r));
    }
    let scratch = tempfile::tempdir().unwrap();
    // One seed for both: the cluster bundle's user-data (cloud-init ignores the shoal key);
    // the signer's, which starts the cluster alone (a member's would wait for one to join).
    let bundle = r.join("build/qemu/bundle");
    if !bundle.join("user-data-signer.yaml").exists() {
        sh(Command::new(shoal_e2e::shoal_bin())
            .args(["gen", "cluster", "--name", "qemu", "--out"])
            .arg(&bundle));
    }
    let md = scratch.path().join("meta-data");
    std::fs::write(&md, "instance-id: bench\nlocal-hostname: bench\n").unwrap();
    let seed = scratch.path().join("seed.img");
    sh(Command::new("cloud-localds")
        .arg(&seed)
        .arg(bundle.join("user-data-signer.yaml"))
        .arg(&md));

    let runs: usize = std::env::var("SHOAL_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut results: Vec<(Kind, Run)> = Vec::new();
    for i in 0..runs {
        for &kind in &kinds {
            let run = boot(kind, &seed, scratch.path());
            println!(
                "run {i} {:5}: firmware {:.1} s, kernel {:.1} s, userspace to Docker {:.1} s, to ready {:.1} s",
                if kind == Kind::Shoal { "shoal" } else { "stock" },
                run.firmware,
                run.kernel,
                run.docker,
                run.ready
            );
            if kind == Kind::Shoal {
                let each: Vec<String> = run
                    .stages
                    .iter()
                    .map(|(n, ms)| format!("{n} {ms}"))
                    .collect();
                println!(
                    "      shoal-init's stages: {} ms to the services ({} ms each)",
                    run.init_ms,
                    each.join(", ")
                );
            }
            results.push((kind, run));
        }
    }
    let pick = |k: Kind, f: fn(&Run) -> f64| {
        median(
            results
                .iter()
                .filter(|(x, _)| *x == k)
                .map(|(_, r)| f(r))
                .collect(),
        )
    };
    println!("\nmedian of {runs} boots each, QEMU TCG, 2 vCPU, 2 GiB:");
    println!("                      shoal    stock (systemd)   stock/shoal");
    for (name, f) in [
        ("firmware", (|r: &Run| r.firmware) as fn(&Run) -> f64),
        ("kernel", |r: &Run| r.kernel),
        ("userspace to Docker", |r: &Run| r.docker),
        ("userspace to ready", |r: &Run| r.ready),
        ("init's stages", |r: &Run| r.init_ms as f64 / 1000.0),
    ] {
        let (a, b) = (pick(Kind::Shoal, f), pick(Kind::Stock, f));
        println!("  {name:20} {a:6.1} s {b:10.1} s {:14.1}x", b / a);
    }
    let size = |p: &str| {
        std::fs::metadata(r.join(p))
            .map(|m| m.len() as f64 / 1048576.0)
            .unwrap_or(0.0)
    };
    println!(
        "\nroot file system, squashfs zstd-19: shoal {:.1} MiB, stock {:.1} MiB",
        size("build/image/root.squashfs"),
        size("build/stock/root.squashfs")
    );
}
