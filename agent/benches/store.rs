//! Store figures for BENCHMARKS.md, on the real sled backend:
//! - durable write throughput (flush per write, and group commit as the agent does it),
//!   against the disk's own ceiling: appending to a file with fdatasync per write;
//! - crash torture: a writer process SIGKILLed at random moments, N times; every reopen must
//!   succeed with every flushed write present;
//! - disk space after a day-equivalent of churn, against the live data size.
//!
//! `cargo bench -p shoal --bench store` (`-- quick` for 100 kills and a shorter churn).

use shoal::store::{Bytes, Key, NodeId, Replica, SledBackend};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "SHOAL_TORTURE_CHILD";

fn open(dir: &Path) -> Replica<SledBackend> {
    Replica::open(
        NodeId::new("bench").unwrap(),
        SledBackend::open(dir).unwrap(),
    )
    .unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn value(i: u64) -> Bytes {
    Bytes::from(format!(
        "{{\"name\":\"app{i}\",\"scale\":{{\"replicas\":{}}},\"pad\":\"{}\"}}",
        i % 7,
        "x".repeat(120)
    ))
}

fn throughput(dir: &Path, n: u64, group: u64) -> f64 {
    let mut r = open(dir);
    let t = Instant::now();
    for i in 0..n {
        r.write(
            now_ms(),
            Key::parse(&format!("apps/k{}", i % 1000)).unwrap(),
            Some(value(i)),
        )
        .unwrap();
        if (i + 1) % group == 0 {
            r.flush().unwrap();
        }
    }
    r.flush().unwrap();
    n as f64 / t.elapsed().as_secs_f64()
}

fn raw_fdatasync(dir: &Path, n: u64) -> f64 {
    let mut f = std::fs::File::create(dir.join("append.log")).unwrap();
    let t = Instant::now();
    for i in 0..n {
        f.write_all(&value(i)).unwrap();
        f.sync_data().unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// The child: writes numbered keys from `start`, printing each number once it is flushed.
fn child(dir: &Path, start: u64) -> ! {
    let mut r = open(dir);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    let mut i = start;
    loop {
        r.write(
            now_ms(),
            Key::parse(&format!("apps/t{i}")).unwrap(),
            Some(value(i)),
        )
        .unwrap();
        if i % 4 == 0 {
            r.flush().unwrap();
            writeln!(out, "{i}").unwrap();
            out.flush().unwrap();
        }
        i += 1;
    }
}

fn torture(dir: &Path, kills: usize) -> (usize, u64, Duration) {
    let exe = std::env::current_exe().unwrap();
    let mut acked: u64 = 0;
    let mut next: u64 = 0;
    let mut rng: u64 = 0x5eed;
    let mut failures = 0;
    let t = Instant::now();
    for k in 0..kills {
        let mut c = Command::new(&exe)
            .env(CHILD_ENV, format!("{}:{}", dir.display(), next))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = c.stdout.take().unwrap();
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_micros(2_000 + (rng >> 33) % 60_000);
        let reader = std::thread::spawn(move || {
            let mut last = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(n) = line.parse::<u64>() {
                    last = Some(n);
                }
            }
            last
        });
        std::thread::sleep(delay);
        c.kill().unwrap();
        c.wait().unwrap();
        if let Some(n) = reader.join().unwrap() {
            acked = acked.max(n);
        }
        // Reopen: must succeed and hold every flushed write so far (checked in full at the
        // end, and a sample of 64 plus the newest every round).
        let r = match std::panic::catch_unwind(|| open(dir)) {
            Ok(r) => r,
            Err(_) => {
                failures += 1;
                eprintln!("kill {k}: reopen failed");
                continue;
            }
        };
        let check = |i: u64| {
            r.get(&Key::parse(&format!("apps/t{i}")).unwrap())
                .unwrap()
                .is_some()
        };
        let mut probe: Vec<u64> = (0..64)
            .map(|j| (rng >> 7).wrapping_add(j * 7919) % (acked + 1))
            .collect();
        probe.push(acked);
        if acked > 0 && probe.iter().any(|&i| !check(i)) {
            failures += 1;
            eprintln!("kill {k}: a flushed write is missing");
        }
        if k + 1 == kills {
            let missing = (0..=acked).filter(|&i| !check(i)).count();
            if missing > 0 {
                failures += 1;
                eprintln!("final check: {missing} flushed writes missing");
            }
        }
        next = r
            .digest()
            .watermarks
            .values()
            .next()
            .map(|_| acked + 1)
            .unwrap_or(0)
            .max(next);
        drop(r);
    }
    (failures, acked, t.elapsed())
}

fn du(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() { du(&e.path()) } else { m.len() };
    }
    total
}

/// A day of a 10-node cluster's observed state: every node rewrites its record, 10 task
/// states and 5 metrics every 10 s (86 400 s / 10 s x 10 nodes x 16 keys = 1.38 M writes),
/// flushed as the agent flushes (group commit, here every 16 writes).
fn churn(dir: &Path, scale: f64) -> (u64, u64, u64, f64) {
    let mut r = open(dir);
    let keys: Vec<Key> = (0..10)
        .flat_map(|n| {
            let mut v = vec![format!("apps/node-record-{n}")];
            v.extend((0..10).map(|t| format!("apps/task-{n}-{t}")));
            v.extend((0..5).map(|m| format!("apps/metric-{n}-{m}")));
            v
        })
        .map(|k| Key::parse(&k).unwrap())
        .collect();
    let writes = (1_382_400.0 * scale) as u64;
    let t = Instant::now();
    for i in 0..writes {
        r.write(
            now_ms(),
            keys[(i % keys.len() as u64) as usize].clone(),
            Some(value(i)),
        )
        .unwrap();
        if i % 16 == 15 {
            r.flush().unwrap();
        }
    }
    r.flush().unwrap();
    let secs = t.elapsed().as_secs_f64();
    drop(r);
    let live: u64 = keys
        .iter()
        .map(|k| k.as_str().len() as u64 + value(0).len() as u64 + 40)
        .sum();
    (writes, live, du(dir), secs)
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let (dir, start) = spec.rsplit_once(':').unwrap();
        child(Path::new(dir), start.parse().unwrap());
    }
    let quick = std::env::args().any(|a| a == "quick");
    let tmp = tempfile::tempdir_in(
        std::env::var("SHOAL_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )
    .unwrap();
    let sub = |n: &str| {
        let p = tmp.path().join(n);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    println!("## Durable local writes (sled, 1 000 keys, ~180-byte values)");
    println!("| mode | writes/s |\n|---|---|");
    println!(
        "| raw file append + fdatasync per write (the disk's ceiling) | {:.0} |",
        raw_fdatasync(&sub("raw"), 2_000)
    );
    println!(
        "| shoal store, flush per write | {:.0} |",
        throughput(&sub("w1"), 2_000, 1)
    );
    println!(
        "| shoal store, group commit of 16 | {:.0} |",
        throughput(&sub("w16"), 20_000, 16)
    );
    println!(
        "| shoal store, group commit of 256 | {:.0} |",
        throughput(&sub("w256"), 100_000, 256)
    );

    let kills = if quick { 100 } else { 1000 };
    let (failures, acked, took) = torture(&sub("torture"), kills);
    println!("\n## Crash torture\n- {kills} SIGKILLs at random moments (2-62 ms into each run) of a write load; {acked} flushed writes in all; {failures} failed reopens or missing flushed writes; {:.0} s", took.as_secs_f64());

    let (writes, live, disk, secs) = churn(&sub("churn"), if quick { 0.1 } else { 1.0 });
    println!(
        "\n## Disk space after churn\n- {writes} overwrites of 160 keys ({live} bytes live) in {secs:.0} s: {disk} bytes on disk = {:.1}x the live data",
        disk as f64 / live as f64
    );
}
