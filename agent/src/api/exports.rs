//! One `docker save` for every peer that asks for the same image at about the same time. A
//! deploy makes every node that lacks an image ask for it within moments of each other, and
//! each save costs the holder's engine as much CPU as a load costs the receiver: the first
//! request starts an export, later ones read the same bytes while its start is still held.
//!
//! An export holds at most `WINDOW` bytes: until the first time it would hold more, a new
//! reader can still start from the beginning; after that, what every reader has passed is
//! dropped, and the export reads on only as fast as its slowest reader (the others are at
//! most `WINDOW` ahead). A reader that goes away holds nobody back; an export nobody reads
//! any more stops.

use crate::executor::images::{Archive, BoxError};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// The most an export holds in memory.
pub const WINDOW: usize = 16 << 20;
/// The most peers reading one export.
const MAX_READERS: usize = 16;

/// The exports running on this node, by image id.
#[derive(Default)]
pub struct Exports {
    running: Mutex<HashMap<String, Arc<Export>>>,
}

struct Export {
    state: Mutex<State>,
    /// Bumped at every change: readers wait for bytes, the reading task for room.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    chunks: VecDeque<Bytes>,
    /// The number (in the archive) of `chunks[0]`.
    base: u64,
    held: usize,
    /// The first chunk was dropped: a new reader could not start at the beginning.
    trimmed: bool,
    /// Each reader's next chunk.
    readers: BTreeMap<u64, u64>,
    next_reader: u64,
    /// How the archive ended, once it did.
    end: Option<Result<(), String>>,
}

impl Exports {
    /// A reader of the export of `id` under way, if it can still start from the beginning.
    pub fn join(self: &Arc<Self>, id: &str) -> Option<Archive> {
        let export = self.lock().get(id).cloned()?;
        let reader = {
            let mut st = export.lock();
            if st.trimmed
                || st.readers.len() >= MAX_READERS
                || st.end.as_ref().is_some_and(|e| e.is_err())
            {
                return None;
            }
            st.add_reader()
        };
        Some(self.reader(id, export, reader))
    }

    /// Starts exporting `archive` as image `id` (read by a task of its own, which holds
    /// `place` until it ends); its first reader.
    pub fn start<P: Send + 'static>(
        self: &Arc<Self>,
        id: &str,
        archive: Archive,
        place: P,
    ) -> Archive {
        let export = Arc::new(Export {
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
        });
        let reader = export.lock().add_reader();
        self.lock().insert(id.to_string(), export.clone());
        tokio::spawn(fill(
            self.clone(),
            id.to_string(),
            export.clone(),
            archive,
            place,
        ));
        self.reader(id, export, reader)
    }

    /// How many exports run now.
    pub fn running(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Export>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets `export` (if it is still the one under `id`).
    fn forget(&self, id: &str, export: &Arc<Export>) {
        let mut running = self.lock();
        if running.get(id).is_some_and(|e| Arc::ptr_eq(e, export)) {
            running.remove(id);
        }
    }

    fn reader(self: &Arc<Self>, id: &str, export: Arc<Export>, reader: u64) -> Archive {
        let seen = export.changed.subscribe();
        let guard = Reader {
            exports: self.clone(),
            id: id.to_string(),
            export,
            reader,
        };
        futures_util::stream::unfold((guard, seen, false), |(guard, mut seen, done)| async move {
            if done {
                return None;
            }
            loop {
                let next = {
                    let mut st = guard.export.lock();
                    let at = st.readers.get(&guard.reader).copied().unwrap_or(u64::MAX);
                    match st.chunk(at) {
                        Some(c) => {
                            st.readers.insert(guard.reader, at + 1);
                            Some(Ok(c))
                        }
                        None => match &st.end {
                            Some(Ok(())) => return None,
                            Some(Err(e)) => Some(Err(BoxError::from(e.clone()))),
                            None => None,
                        },
                    }
                };
                match next {
                    Some(item) => {
                        // The reading task may have room now.
                        guard.export.changed.send_modify(|g| *g += 1);
                        let failed = item.is_err();
                        return Some((item, (guard, seen, failed)));
                    }
                    None => {
                        if seen.changed().await.is_err() {
                            return None;
                        }
                    }
                }
            }
        })
        .boxed()
    }
}

impl Export {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn add_reader(&mut self) -> u64 {
        let r = self.next_reader;
        self.next_reader += 1;
        self.readers.insert(r, 0);
        r
    }

    fn chunk(&self, at: u64) -> Option<Bytes> {
        let i = usize::try_from(at.checked_sub(self.base)?).ok()?;
        self.chunks.get(i).cloned()
    }

    /// Drops what every reader has passed, if the export holds `WINDOW` or more.
    fn trim(&mut self) {
        if self.held < WINDOW {
            return;
        }
        let slowest = self.readers.values().copied().min().unwrap_or(u64::MAX);
        while self.base < slowest {
            let Some(c) = self.chunks.pop_front() else {
                break;
            };
            self.held -= c.len();
            self.base += 1;
            self.trimmed = true;
        }
    }
}

/// A reader's hold on its export: when it goes, so does its place in the line.
struct Reader {
    exports: Arc<Exports>,
    id: String,
    export: Arc<Export>,
    reader: u64,
}

impl Drop for Reader {
    fn drop(&mut self) {
        let last = {
            let mut st = self.export.lock();
            st.readers.remove(&self.reader);
            st.readers.is_empty()
        };
        if last {
            // Nobody reads it: no new reader may join what is about to stop.
            self.exports.forget(&self.id, &self.export);
        }
        self.export.changed.send_modify(|g| *g += 1);
    }
}

/// Reads `archive` into `export` while someone reads it and there is room.
async fn fill<P>(
    exports: Arc<Exports>,
    id: String,
    export: Arc<Export>,
    mut archive: Archive,
    place: P,
) {
    let _place = place;
    let mut seen = export.changed.subscribe();
    loop {
        // Room, or nobody left to read.
        loop {
            {
                let mut st = export.lock();
                if st.readers.is_empty() {
                    exports.forget(&id, &export);
                    return;
                }
                st.trim();
                if st.held < WINDOW {
                    break;
                }
            }
            if seen.changed().await.is_err() {
                return;
            }
        }
        let item = archive.next().await;
        let mut st = export.lock();
        match item {
            Some(Ok(c)) => {
                st.held += c.len();
                st.chunks.push_back(c);
            }
            Some(Err(e)) => st.end = Some(Err(e.to_string())),
            None => st.end = Some(Ok(())),
        }
        let ended = st.end.is_some();
        drop(st);
        export.changed.send_modify(|g| *g += 1);
        if ended {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// `n` chunks of `size` bytes (chunk i filled with i), counting how many were read.
    fn source(n: usize, size: usize, read: Arc<AtomicUsize>) -> Archive {
        futures_util::stream::iter(0..n)
            .map(move |i| {
                read.fetch_add(1, Ordering::SeqCst);
                Ok(Bytes::from(vec![i as u8; size]))
            })
            .boxed()
    }

    async fn all(a: Archive) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let mut a = a;
        while let Some(c) = a.next().await {
            out.extend_from_slice(&c.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn readers_that_join_in_time_share_one_read_of_the_archive() {
        let exports = Arc::new(Exports::default());
        let read = Arc::new(AtomicUsize::new(0));
        let size = 1 << 20;
        let n = 3 * WINDOW / size;
        let first = exports.start("img", source(n, size, read.clone()), ());
        let second = exports.join("img").expect("joins while the start is held");
        let (a, b) = tokio::join!(all(first), all(second));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.len(), n * size);
        assert_eq!(a, b);
        assert!(a
            .chunks(size)
            .enumerate()
            .all(|(i, c)| c.iter().all(|x| *x == i as u8)));
        assert_eq!(read.load(Ordering::SeqCst), n, "the archive was read once");
        assert_eq!(exports.running(), 0, "a finished export is forgotten");
    }

    #[tokio::test]
    async fn a_late_reader_starts_its_own_and_a_slow_one_bounds_what_is_held() {
        let exports = Arc::new(Exports::default());
        let read = Arc::new(AtomicUsize::new(0));
        let size = 1 << 20;
        let n = 4 * WINDOW / size;
        let mut fast = exports.start("img", source(n, size, read.clone()), ());
        let mut slow = exports.join("img").unwrap();
        // The fast reader gets at most a window ahead of the slow one, which has read nothing.
        let mut got = 0;
        while let Ok(Some(c)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), fast.next()).await
        {
            got += c.unwrap().len();
        }
        assert!(got <= WINDOW + size, "{got}");
        assert!(read.load(Ordering::SeqCst) * size <= WINDOW + 2 * size);
        // Once past the window, nobody new starts from the beginning.
        let first = slow.next().await.unwrap().unwrap();
        assert!(first.iter().all(|x| *x == 0));
        while got < WINDOW + 4 * size {
            // Let the fast one run, with the slow one following.
            got += fast.next().await.unwrap().unwrap().len();
            slow.next().await.unwrap().unwrap();
        }
        assert!(
            exports.join("img").is_none(),
            "joined after its start was dropped"
        );
        // A reader that goes away holds the other back no longer.
        drop(slow);
        let rest = all(fast).await.unwrap();
        assert_eq!(got + rest.len(), n * size);
    }

    #[tokio::test]
    async fn an_export_nobody_reads_stops_and_an_error_reaches_every_reader() {
        let exports = Arc::new(Exports::default());
        let read = Arc::new(AtomicUsize::new(0));
        let size = 1 << 20;
        let r = exports.start("img", source(1000, size, read.clone()), ());
        drop(r);
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while exports.running() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the export stops");
        assert!(read.load(Ordering::SeqCst) * size <= WINDOW + 2 * size);
        assert!(exports.join("img").is_none());

        let broken: Archive = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Err(BoxError::from("the engine went away")),
        ])
        .boxed();
        let a = exports.start("bad", broken, ());
        let b = exports.join("bad").unwrap();
        let (a, b) = tokio::join!(all(a), all(b));
        assert!(a.unwrap_err().contains("went away"));
        assert!(b.unwrap_err().contains("went away"));
        assert!(exports.join("bad").is_none());
    }
}
