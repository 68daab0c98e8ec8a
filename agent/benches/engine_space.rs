//! Evidence for the storage-engine choice: the replica's row layout (a value row, an origin
//! index row and a change-log row per key) written into redb, with the same day-equivalent
//! churn as `benches/store.rs` (160 hot keys overwritten, 16 writes per durable commit).
//! Compare its ratio with the sled rows of `store`.
//!
//! `cargo bench -p shoal --bench engine_space` (`-- quick` for a tenth of the churn).

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::HashMap;
use std::time::Instant;

const T: TableDefinition<&[u8], &[u8]> = TableDefinition::new("replica");

fn idx(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(&seq.to_be_bytes());
    v
}

fn write(
    db: &Database,
    keys: &[String],
    seq: &mut u64,
    cur: &mut HashMap<String, u64>,
    val: &[u8],
) {
    let mut tx = db.begin_write().unwrap();
    tx.set_durability(Durability::Immediate).unwrap();
    {
        let mut t = tx.open_table(T).unwrap();
        for k in keys {
            *seq += 1;
            if let Some(old) = cur.insert(k.clone(), *seq) {
                t.remove(idx(b"onode-1\0", old).as_slice()).unwrap();
                t.remove(idx(b"c", old).as_slice()).unwrap();
            }
            t.insert(format!("k{k}").as_bytes(), val).unwrap();
            t.insert(idx(b"onode-1\0", *seq).as_slice(), k.as_bytes())
                .unwrap();
            t.insert(idx(b"c", *seq).as_slice(), k.as_bytes()).unwrap();
        }
    }
    tx.commit().unwrap();
}

fn logical(db: &Database) -> u64 {
    let r = db.begin_read().unwrap();
    let t = r.open_table(T).unwrap();
    t.iter()
        .unwrap()
        .flatten()
        .map(|(k, v)| (k.value().len() + v.value().len()) as u64)
        .sum()
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let churn: u64 = if quick { 138_240 } else { 1_382_400 };
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let val = vec![b'x'; 220];
    println!("## redb, same rows and churn as the sled store ({churn} overwrites of 160 keys)");
    println!(
        "| live keys | live bytes | file bytes | ratio | durable writes/s |\n|---|---|---|---|---|"
    );
    for extra in [0usize, 5_000, 20_000, 60_000] {
        let p = dir.path().join(format!("redb-{extra}"));
        let db = Database::create(&p).unwrap();
        let (mut seq, mut cur) = (0u64, HashMap::new());
        let base: Vec<String> = (0..extra).map(|i| format!("apps/spec-{i}")).collect();
        for chunk in base.chunks(256) {
            write(&db, chunk, &mut seq, &mut cur, &val);
        }
        let hot: Vec<String> = (0..160).map(|i| format!("apps/hot-{i}")).collect();
        let t0 = Instant::now();
        for i in 0..churn / 16 {
            let ks: Vec<String> = (0..16)
                .map(|j| hot[((i * 16 + j) % 160) as usize].clone())
                .collect();
            write(&db, &ks, &mut seq, &mut cur, &val);
        }
        let rate = churn as f64 / t0.elapsed().as_secs_f64();
        let live = logical(&db);
        let size = std::fs::metadata(&p).unwrap().len();
        println!(
            "| {} | {live} | {size} | {:.1}x | {rate:.0} |",
            160 + extra,
            size as f64 / live as f64
        );
    }
}
