//! Store figures for BENCHMARKS.md, on the real disk backend (redb):
//! - durable write throughput (flush per write, and group commit as the agent does it),
//!   against the disk's own ceiling: appending to a file with fdatasync per write;
//! - crash torture: a writer process SIGKILLed at random moments, N times; every reopen must
//!   succeed with every flushed write present;
//! - disk space after a day-equivalent of churn, against the live data size.
//!
//! `cargo bench -p shoal --bench store` (`-- quick` for 100 kills and a shorter churn).

// Benchmarks time the real thing with the real clocks.
#![allow(clippy::disallowed_methods)]

use shoal::store::{Bytes, DiskBackend, Key, NodeId, Replica};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "SHOAL_TORTURE_CHILD";

fn open(dir: &Path) -> Replica<DiskBackend> {
    Replica::open(
        NodeId::new("bench").unwrap(),
        DiskBackend::open(dir).unwrap(),
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
        if i.is_multiple_of(4) {
            r.flush().unwrap();
            writeln!(out, "{i}").unwrap();
            out.flush().unwrap();
        }
        i += 1;
    }
}

fn torture(dir: &Path, kills: usize) -> (usize, u64, Duration) {
    let exe = std::env::current_exe().unwrap();
    // The highest key known flushed; every key up to it must survive.
    let mut acked: Option<u64> = None;
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
            acked = acked.max(Some(n));
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
        let Some(top) = acked else { continue };
        let mut probe: Vec<u64> = (0..64)
            .map(|j| (rng >> 7).wrapping_add(j * 7919) % (top + 1))
            .collect();
        probe.push(top);
        if probe.iter().any(|&i| !check(i)) {
            failures += 1;
            eprintln!("kill {k}: a flushed write is missing");
        }
        if k + 1 == kills {
            let missing = (0..=top).filter(|&i| !check(i)).count();
            if missing > 0 {
                failures += 1;
                eprintln!("final check: {missing} flushed writes missing");
            }
        }
        // Keys above `acked` may exist unflushed or lost; overwriting them is harmless.
        next = next.max(top + 1);
        drop(r);
    }
    (failures, acked.map_or(0, |a| a + 1), t.elapsed())
}

fn du(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() { du(&e.path()) } else { m.len() };
    }
    total
}

/// A day of a 10-node cluster's observed state (with the agent's once-a-minute compaction): every node rewrites its record, 10 task
/// states and 5 metrics every 10 s (86 400 s / 10 s x 10 nodes x 16 keys = 1.38 M writes),
/// flushed as the agent flushes (group commit, here every 16 writes).
fn churn(dir: &Path, scale: f64, extra_keys: usize) -> (u32, u64, u64, f64) {
    let mut r = open(dir);
    let mut keys: Vec<Key> = (0..10)
        .flat_map(|n| {
            let mut v = vec![format!("apps/node-record-{n}")];
            v.extend((0..10).map(|t| format!("apps/task-{n}-{t}")));
            v.extend((0..5).map(|m| format!("apps/metric-{n}-{m}")));
            v
        })
        .map(|k| Key::parse(&k).unwrap())
        .collect();
    // Desired state that is written once and stays (app specs, builds, ...).
    for i in 0..extra_keys {
        let k = Key::parse(&format!("apps/spec-{i}")).unwrap();
        r.write(now_ms(), k.clone(), Some(value(i as u64))).unwrap();
        keys.push(k);
    }
    r.flush().unwrap();
    let churned = 160;
    let writes = (1_382_400.0 * scale) as u64;
    let mut compactions = 0;
    let t = Instant::now();
    for i in 0..writes {
        r.write(
            now_ms(),
            keys[(i % churned) as usize].clone(),
            Some(value(i)),
        )
        .unwrap();
        if i % 16 == 15 {
            r.flush().unwrap();
        }
        // The agent checks once a minute: at 16 writes/s, every 960 writes.
        if i % 960 == 959 && r.backend().maybe_compact(3.0).unwrap() {
            compactions += 1;
        }
    }
    r.flush().unwrap();
    let secs = t.elapsed().as_secs_f64();
    // Live data: every byte of key and value the store holds now, indexes included.
    let live = r.backend().logical_size();
    drop(r);
    (compactions, live, du(dir), secs)
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
    println!("## Durable local writes (redb, 1 000 keys, ~180-byte values)");
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

    println!("\n## Disk space after a day-equivalent of churn (1.38 M overwrites of 160 observed-state keys)");
    println!("| live keys | live bytes (keys, values, indexes) | bytes on disk | ratio | compactions | time |\n|---|---|---|---|---|---|");
    let extras: &[usize] = if quick {
        &[0, 20_000]
    } else {
        &[0, 5_000, 20_000, 60_000]
    };
    for (i, &extra) in extras.iter().enumerate() {
        let (compactions, live, disk, secs) = churn(
            &sub(&format!("churn{i}")),
            if quick { 0.1 } else { 1.0 },
            extra,
        );
        println!(
            "| {} | {live} | {disk} | {:.1}x | {compactions} | {secs:.0} s |",
            160 + extra,
            disk as f64 / live as f64
        );
    }
}
