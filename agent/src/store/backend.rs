//! Where the replica's bytes live: an ordered key-value space with atomic batches and an
//! explicit flush. `SledBackend` is the real one; `MemBackend` keeps the last flushed state
//! apart so the simulation can crash a node and lose exactly what was not flushed.

use super::StoreError;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::rc::Rc;

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

/// The sled engine under the state directory.
#[derive(Clone)]
pub struct SledBackend {
    db: sled::Db,
    tree: sled::Tree,
}

impl SledBackend {
    /// Opens (creating if needed) the store at `dir`. The page cache is kept small: the agent's
    /// whole state is small and the memory belongs to the workloads.
    pub fn open(dir: &Path) -> Result<SledBackend, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(8 << 20)
            .flush_every_ms(Some(500))
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|e| StoreError::Engine {
                op: "open",
                source: Box::new(e),
            })?;
        let tree = db.open_tree("replica").map_err(engine("open tree"))?;
        Ok(SledBackend { db, tree })
    }

    pub fn was_recovered(&self) -> bool {
        self.db.was_recovered()
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
        for item in self.tree.range::<Vec<u8>, _>(range).take(limit) {
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
        self.tree.apply_batch(b).map_err(engine("apply"))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(engine("flush"))
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
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
