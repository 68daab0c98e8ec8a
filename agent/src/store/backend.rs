//! Where the replica's bytes live: an ordered key-value space with atomic batches and an
//! explicit flush. `DiskBackend` (redb) is the real one; `MemBackend` keeps the last flushed state
//! apart so the simulation can crash a node and lose exactly what was not flushed.

use super::StoreError;
use redb::ReadableDatabase;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, RwLock};

/// An atomic group of writes: `None` removes the key.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.ops.push((k, Some(v)));
    }

    pub fn remove(&mut self, k: Vec<u8>) {
        self.ops.push((k, None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered byte key-value space. Reads see every applied batch; only `flush` makes them
/// survive a crash.
pub trait Backend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` pairs with `start <= key < end` (exclusive `start` when `after` is set), in
    /// key order.
    fn scan(
        &self,
        start: &[u8],
        after: bool,
        end: &[u8],
        limit: usize,
    ) -> Result<Pairs, StoreError>;
    fn apply(&self, batch: Batch) -> Result<(), StoreError>;
    fn flush(&self) -> Result<(), StoreError>;
    /// Bytes used on disk (0 for memory).
    fn size_on_disk(&self) -> u64;
}

fn lower(start: &[u8], after: bool) -> Bound<Vec<u8>> {
    if after {
        Bound::Excluded(start.to_vec())
    } else {
        Bound::Included(start.to_vec())
    }
}

/// The on-disk engine: redb, a copy-on-write B-tree with crash-safe commits, in one file
/// under the state directory. `apply` commits without syncing; `flush` makes every earlier
/// commit durable with one synced commit (group commit). After a crash the file holds exactly
/// the state of the last flush.
///
/// (sled, the engine first chosen, survived the same crash torture but held 4-6x the live data
/// on disk after a day of churn, compaction included; redb holds under 3x with none. See
/// BENCHMARKS.md.)
#[derive(Clone)]
pub struct DiskBackend {
    db: Arc<RwLock<redb::Database>>,
    path: PathBuf,
}

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("replica");

/// Smallest file worth compacting: below it the engine's fixed pages dominate.
const COMPACT_FLOOR: u64 = 1 << 20;

fn engine<E: std::error::Error + Send + Sync + 'static>(
    op: &'static str,
) -> impl Fn(E) -> StoreError {
    move |e| StoreError::Engine {
        op,
        source: Box::new(e),
    }
}

impl DiskBackend {
    /// Opens (creating if needed) the store file `<dir>/replica.redb`.
    pub fn open(dir: &Path) -> Result<DiskBackend, StoreError> {
        std::fs::create_dir_all(dir).map_err(engine("create store directory"))?;
        let path = dir.join("replica.redb");
        let db = redb::Database::builder()
            .set_cache_size(4 << 20)
            .create(&path)
            .map_err(engine("open"))?;
        // Create the table up front so readers never meet a missing one.
        let tx = db.begin_write().map_err(engine("begin"))?;
        tx.open_table(TABLE).map_err(engine("create table"))?;
        tx.commit().map_err(engine("commit"))?;
        Ok(DiskBackend {
            db: Arc::new(RwLock::new(db)),
            path,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, redb::Database> {
        self.db.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of live keys and values, indexes included.
    pub fn logical_size(&self) -> u64 {
        let db = self.read();
        let Ok(tx) = db.begin_read() else { return 0 };
        let Ok(t) = tx.open_table(TABLE) else {
            return 0;
        };
        let Ok(iter) = redb::ReadableTable::iter(&t) else {
            return 0;
        };
        iter.flatten()
            .map(|(k, v)| (k.value().len() + v.value().len()) as u64)
            .sum()
    }

    /// Compacts the file if it exceeds `ratio` times the live data (and 1 MiB). redb reuses
    /// freed pages, so this matters only after the live data shrank a lot.
    pub fn maybe_compact(&self, ratio: f64) -> Result<bool, StoreError> {
        let size = self.size_on_disk();
        if size < COMPACT_FLOOR || (size as f64) < ratio * self.logical_size() as f64 {
            return Ok(false);
        }
        let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
        let done = db.compact().map_err(engine("compact"))?;
        drop(db);
        tracing::info!(
            before = size,
            after = self.size_on_disk(),
            "store compacted"
        );
        Ok(done)
    }
}

impl Backend for DiskBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.read();
        let tx = db.begin_read().map_err(engine("begin read"))?;
        let t = tx.open_table(TABLE).map_err(engine("open table"))?;
        let v = redb::ReadableTable::get(&t, key).map_err(engine("get"))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    fn scan(
        &self,
        start: &[u8],
        after: bool,
        end: &[u8],
        limit: usize,
    ) -> Result<Pairs, StoreError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let db = self.read();
        let tx = db.begin_read().map_err(engine("begin read"))?;
        let t = tx.open_table(TABLE).map_err(engine("open table"))?;
        let lo = if after {
            Bound::Excluded(start)
        } else {
            Bound::Included(start)
        };
        let range = redb::ReadableTable::range::<&[u8]>(&t, (lo, Bound::Excluded(end)))
            .map_err(engine("scan"))?;
        let mut out = Vec::new();
        for item in range.take(limit) {
            let (k, v) = item.map_err(engine("scan"))?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let db = self.read();
        let mut tx = db.begin_write().map_err(engine("begin write"))?;
        tx.set_durability(redb::Durability::None)
            .map_err(engine("set durability"))?;
        {
            let mut t = tx.open_table(TABLE).map_err(engine("open table"))?;
            for (k, v) in &batch.ops {
                match v {
                    Some(v) => {
                        t.insert(k.as_slice(), v.as_slice())
                            .map_err(engine("insert"))?;
                    }
                    None => {
                        t.remove(k.as_slice()).map_err(engine("remove"))?;
                    }
                }
            }
        }
        tx.commit().map_err(engine("commit"))
    }

    fn flush(&self) -> Result<(), StoreError> {
        let db = self.read();
        let mut tx = db.begin_write().map_err(engine("begin write"))?;
        tx.set_durability(redb::Durability::Immediate)
            .map_err(engine("set durability"))?;
        tx.commit().map_err(engine("durable commit"))
    }

    fn size_on_disk(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
}

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// An in-memory backend for the deterministic simulation. `durable` is what survives
/// `crash()`: the state as of the last `flush()`.
#[derive(Clone, Default)]
pub struct MemBackend {
    inner: Rc<RefCell<MemInner>>,
}

#[derive(Default)]
struct MemInner {
    live: Map,
    durable: Map,
    unflushed: Vec<Batch>,
}

fn apply_to(map: &mut Map, batch: &Batch) {
    for (k, v) in &batch.ops {
        match v {
            Some(v) => map.insert(k.clone(), v.clone()),
            None => map.remove(k),
        };
    }
}

impl MemBackend {
    pub fn new() -> MemBackend {
        MemBackend::default()
    }

    /// Forgets every batch applied since the last flush, as a power cut would.
    pub fn crash(&self) {
        let mut inner = self.inner.borrow_mut();
        inner.unflushed.clear();
        inner.live = inner.durable.clone();
    }

    pub fn len(&self) -> usize {
        self.inner.borrow().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Backend for MemBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.borrow().live.get(key).cloned())
    }

    fn scan(
        &self,
        start: &[u8],
        after: bool,
        end: &[u8],
        limit: usize,
    ) -> Result<Pairs, StoreError> {
        let inner = self.inner.borrow();
        let range = (lower(start, after), Bound::Excluded(end.to_vec()));
        Ok(inner
            .live
            .range::<Vec<u8>, _>(range)
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut inner = self.inner.borrow_mut();
        apply_to(&mut inner.live, &batch);
        inner.unflushed.push(batch);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        let mut inner = self.inner.borrow_mut();
        let pending = std::mem::take(&mut inner.unflushed);
        for b in &pending {
            apply_to(&mut inner.durable, b);
        }
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        0
    }
}
