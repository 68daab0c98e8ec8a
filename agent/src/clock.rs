//! How this node's clock compares with its peers'. Every peer answers with an HTTP `Date`;
//! the offset (theirs minus ours, at the middle of the exchange) is kept per peer. When most
//! peers heard lately are off by more than the cluster's drift bound (`MAX_DRIFT_MS`) in the
//! same direction, this node is the one that is wrong: its writes would be refused by every
//! peer (too far ahead) or it refuses theirs (too far behind). It then says so — status,
//! metric, a warning — and its API answers 503 instead of accepting writes that go nowhere.

//!
//! Also the agent's one reading of the wall clock (`wall_ms`): everything else gets the time
//! from here, so the sans-IO core reads none.

use crate::store::replica::MAX_DRIFT_MS;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;

/// Wall-clock milliseconds since the epoch.
#[allow(clippy::disallowed_methods)] // The one place the agent reads the wall clock.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Monotonic time, for deadlines and backoffs: tokio's, so tests in virtual time
/// (`start_paused`) control it.
#[allow(clippy::disallowed_methods)] // The one place the agent reads the monotonic clock.
pub fn now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// Offsets older than this no longer count.
const FRESH_MS: u64 = 5 * 60 * 1000;
/// Most peers remembered (a cluster larger than this samples the latest ones).
const MAX_PEERS: usize = 1024;

#[derive(Debug, Default)]
pub struct ClockWatch {
    peers: Mutex<HashMap<String, (i64, u64)>>,
}

/// What the peers' clocks say about ours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClockView {
    /// Peers heard within the last five minutes.
    pub peers: usize,
    /// The median of their offsets (theirs minus ours), in ms.
    pub offset_ms: i64,
    /// Whether most of them are off by more than the drift bound the same way.
    pub skewed: bool,
}

impl ClockWatch {
    /// Records a peer's `Date` for an exchange sent at `sent_ms` and answered at `recv_ms`
    /// (this node's wall clock). An unreadable date is ignored.
    pub fn record(&self, peer: &str, date: &str, sent_ms: u64, recv_ms: u64) {
        let Ok(t) = httpdate::parse_http_date(date) else {
            return;
        };
        let Ok(theirs) = t.duration_since(std::time::UNIX_EPOCH) else {
            return;
        };
        // The Date header has whole seconds: theirs is within [t, t + 1 s).
        let theirs = theirs.as_millis() as i64 + 500;
        let ours = (sent_ms / 2 + recv_ms / 2) as i64;
        let mut p = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() >= MAX_PEERS && !p.contains_key(peer) {
            // Forget the stalest.
            if let Some(k) = p
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                p.remove(&k);
            }
        }
        p.insert(peer.to_string(), (theirs - ours, recv_ms));
    }

    pub fn view(&self, now_ms: u64) -> ClockView {
        let p = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut offsets: Vec<i64> = p
            .values()
            .filter(|(_, at)| now_ms.saturating_sub(*at) <= FRESH_MS)
            .map(|(o, _)| *o)
            .collect();
        view_of(&mut offsets)
    }
}

/// The view from a set of offsets.
pub fn view_of(offsets: &mut [i64]) -> ClockView {
    if offsets.is_empty() {
        return ClockView::default();
    }
    offsets.sort_unstable();
    let n = offsets.len();
    let bound = MAX_DRIFT_MS as i64;
    let behind = offsets.iter().filter(|o| **o > bound).count();
    let ahead = offsets.iter().filter(|o| **o < -bound).count();
    ClockView {
        peers: n,
        offset_ms: offsets[n / 2],
        skewed: 2 * behind.max(ahead) > n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i64 = 60 * 1000;

    #[test]
    fn the_node_that_differs_from_most_is_the_skewed_one() {
        assert!(!view_of(&mut []).skewed);
        // Two honest peers and one 30 min ahead: the honest node is not skewed...
        assert!(!view_of(&mut [0, 30 * M]).skewed);
        // ...the one ahead sees both others 30 min behind: it is.
        let v = view_of(&mut [-30 * M, -30 * M]);
        assert!(v.skewed && v.offset_ms == -30 * M);
        // Within the bound is fine; a majority beyond it either way is not.
        assert!(!view_of(&mut [14 * M, 14 * M, 14 * M]).skewed);
        assert!(view_of(&mut [16 * M, 16 * M, 0]).skewed);
    }

    #[test]
    fn offsets_come_from_peers_dates() {
        let w = ClockWatch::default();
        let now = 1_800_000_000_000u64;
        // A peer 20 minutes ahead, heard just now.
        let theirs = std::time::UNIX_EPOCH + std::time::Duration::from_millis(now + 20 * 60_000);
        w.record("p1", &httpdate::fmt_http_date(theirs), now - 10, now);
        let v = w.view(now);
        assert_eq!(v.peers, 1);
        assert!((v.offset_ms - 20 * M).abs() < 1500, "{v:?}");
        assert!(v.skewed);
        // Garbage is ignored; old readings stop counting.
        w.record("p2", "yesterday", now, now);
        assert_eq!(w.view(now).peers, 1);
        assert_eq!(w.view(now + FRESH_MS + 1).peers, 0);
    }
}
