//! Where the replica's bytes live: an ordered key-value space with atomic batches and an
//! explicit flush. `SledBackend` is the real one; `MemBackend` keeps the last flushed state
//! apart so the simulation can crash a node and lose exactly what was not flushed.

use super::StoreError;
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

/// The sled engine under the state directory. sled reclaims space from overwritten values
/// only partly, so `maybe_compact` rewrites the live data into a fresh database when the files
/// grow past a multiple of it; every clone shares the swap.
#[derive(Clone)]
pub struct SledBackend {
    inner: Arc<RwLock<SledInner>>,
    dir: PathBuf,
}

struct SledInner {
    db: sled::Db,
    tree: sled::Tree,
    /// Size on disk right after the last compaction (or open).
    baseline: u64,
}

/// Smallest store size worth compacting: below it sled's fixed segments dominate.
const COMPACT_FLOOR: u64 = 1 << 20;

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn io_err(op: &'static str) -> impl Fn(std::io::Error) -> StoreError {
    move |e| StoreError::Engine {
        op,
        source: Box::new(e),
    }
}

fn open_db(dir: &Path) -> Result<(sled::Db, sled::Tree), StoreError> {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(8 << 20)
        .flush_every_ms(Some(500))
        .mode(sled::Mode::LowSpace)
        .segment_size(64 << 10)
        .open()
        .map_err(engine("open"))?;
    let tree = db.open_tree("replica").map_err(engine("open tree"))?;
    Ok((db, tree))
}

impl SledBackend {
    /// Opens (creating if needed) the store at `dir`, first finishing or undoing a compaction
    /// that a crash interrupted. The page cache is kept small: the memory belongs to workloads.
    pub fn open(dir: &Path) -> Result<SledBackend, StoreError> {
        let (next, old) = (sibling(dir, ".next"), sibling(dir, ".old"));
        if !dir.exists() && next.exists() && old.exists() {
            // Crashed between the two renames: the copy in `next` was complete and flushed.
            std::fs::rename(&next, dir).map_err(io_err("finish compaction"))?;
        }
        if next.exists() {
            std::fs::remove_dir_all(&next).map_err(io_err("drop partial compaction"))?;
        }
        if old.exists() && dir.exists() {
            std::fs::remove_dir_all(&old).map_err(io_err("drop compacted store"))?;
        }
        let (db, tree) = open_db(dir)?;
        let baseline = db.size_on_disk().unwrap_or(0);
        Ok(SledBackend {
            inner: Arc::new(RwLock::new(SledInner { db, tree, baseline })),
            dir: dir.to_path_buf(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, SledInner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn was_recovered(&self) -> bool {
        self.read().db.was_recovered()
    }

    /// Bytes of live keys and values, indexes included: what the files would hold with no
    /// garbage and no engine overhead.
    pub fn logical_size(&self) -> u64 {
        self.read()
            .tree
            .iter()
            .flatten()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum()
    }

    /// Rewrites the store if its files exceed `ratio` times the live data (and 1 MiB, and a
    /// quarter more than right after the previous compaction, so that a store whose fresh copy
    /// is already near `ratio` is not rewritten over and over). Returns whether it did.
    pub fn maybe_compact(&self, ratio: f64) -> Result<bool, StoreError> {
        let logical = self.logical_size();
        let size = self.size_on_disk();
        {
            let g = self.read();
            if size < COMPACT_FLOOR
                || (size as f64) < ratio * logical as f64
                || size < g.baseline + g.baseline / 4
            {
                return Ok(false);
            }
        }
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let (next, old) = (sibling(&self.dir, ".next"), sibling(&self.dir, ".old"));
        if next.exists() {
            std::fs::remove_dir_all(&next).map_err(io_err("clear compaction target"))?;
        }
        let (db, tree) = open_db(&next)?;
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in g.tree.iter() {
            let (k, v) = item.map_err(engine("compaction read"))?;
            batch.insert(k, v);
            n += 1;
            if n % 4096 == 0 {
                tree.apply_batch(std::mem::take(&mut batch))
                    .map_err(engine("compaction write"))?;
            }
        }
        tree.apply_batch(batch)
            .map_err(engine("compaction write"))?;
        db.flush().map_err(engine("compaction flush"))?;
        drop((tree, db));
        g.db.flush().map_err(engine("flush"))?;
        // Swap under the write lock; `open` repairs a crash at any point of these steps.
        std::fs::rename(&self.dir, &old).map_err(io_err("retire old store"))?;
        std::fs::rename(&next, &self.dir).map_err(io_err("install compacted store"))?;
        let (db, tree) = open_db(&self.dir)?;
        let baseline = db.size_on_disk().unwrap_or(0);
        *g = SledInner { db, tree, baseline };
        drop(g);
        std::fs::remove_dir_all(&old).map_err(io_err("remove old store"))?;
        tracing::info!(
            before = size,
            after = baseline,
            live = logical,
            "store compacted"
        );
        Ok(true)
    }
}

fn engine(op: &'static str) -> impl Fn(sled::Error) -> StoreError {
    move |e| StoreError::Engine {
        op,
        source: Box::new(e),
    }
}

impl Backend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .read()
            .tree
            .get(key)
            .map_err(engine("get"))?
            .map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        start: &[u8],
        after: bool,
        end: &[u8],
        limit: usize,
    ) -> Result<Pairs, StoreError> {
        let range = (lower(start, after), Bound::Excluded(end.to_vec()));
        let mut out = Vec::new();
        for item in self.read().tree.range::<Vec<u8>, _>(range).take(limit) {
            let (k, v) = item.map_err(engine("scan"))?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        self.read().tree.apply_batch(b).map_err(engine("apply"))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.read().db.flush().map(|_| ()).map_err(engine("flush"))
    }

    fn size_on_disk(&self) -> u64 {
        self.read().db.size_on_disk().unwrap_or(0)
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
