//! Readiness and liveness of one replica from its probe results, with no IO: the prober
//! (`probe`) reports each result and its time; the tracker says whether the replica is
//! ready for traffic and whether it must be restarted.
//!
//! A replica is ready after `success_threshold` consecutive successes, unready again after
//! `failure_threshold` consecutive failures, and restarted after `restart_threshold` of them
//! (0: never). Failures within `start_period` of its start count for nothing. A replica with
//! no probe is ready once it runs.

use crate::spec::{Probe, ProbeKind};

/// What one result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Unchanged,
    /// Ready became unready, or the reverse.
    Changed,
    /// Failing too long: restart it.
    Restart,
}

#[derive(Debug, Clone)]
pub struct Tracker {
    start_period_ms: u64,
    success_threshold: u32,
    failure_threshold: u32,
    restart_threshold: u32,
    started_ms: u64,
    successes: u32,
    failures: u32,
    ready: bool,
    ever_ready: bool,
    /// What the last probe said, when it failed.
    said: Option<String>,
}

impl Tracker {
    pub fn new(probe: &Probe, started_ms: u64) -> Tracker {
        Tracker {
            start_period_ms: probe.start_period.as_millis() as u64,
            success_threshold: probe.success_threshold.max(1),
            failure_threshold: probe.failure_threshold.max(1),
            restart_threshold: probe.restart_threshold,
            started_ms,
            successes: 0,
            failures: 0,
            ready: probe.kind == ProbeKind::None,
            ever_ready: probe.kind == ProbeKind::None,
            said: None,
        }
    }

    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Whether it was ready at some point (unready now means it fell ill, not that it is still
    /// starting).
    pub fn ever_ready(&self) -> bool {
        self.ever_ready
    }

    /// Why it is not ready (the last failed probe), if it said.
    pub fn said(&self) -> Option<&str> {
        self.said.as_deref()
    }

    pub fn observe(&mut self, now_ms: u64, result: Result<(), String>) -> Verdict {
        let was = self.ready;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.said = None;
                self.successes = self.successes.saturating_add(1);
                if self.successes >= self.success_threshold {
                    self.ready = true;
                    self.ever_ready = true;
                }
            }
            Err(e) => {
                self.successes = 0;
                self.said = Some(e);
                if now_ms < self.started_ms.saturating_add(self.start_period_ms) {
                    return Verdict::Unchanged;
                }
                self.failures = self.failures.saturating_add(1);
                if self.failures >= self.failure_threshold {
                    self.ready = false;
                }
                if self.restart_threshold > 0 && self.failures >= self.restart_threshold {
                    self.failures = 0;
                    self.ready = false;
                    return Verdict::Restart;
                }
            }
        }
        if was == self.ready {
            Verdict::Unchanged
        } else {
            Verdict::Changed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn probe(success: u32, failure: u32, restart: u32, start_period_ms: u64) -> Probe {
        Probe {
            kind: ProbeKind::Tcp { port: 80 },
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            start_period: Duration::from_millis(start_period_ms),
            success_threshold: success,
            failure_threshold: failure,
            restart_threshold: restart,
        }
    }

    const OK: Result<(), String> = Ok(());
    fn no() -> Result<(), String> {
        Err("refused".into())
    }

    #[test]
    fn thresholds_make_it_ready_unready_and_restarted() {
        let mut t = Tracker::new(&probe(2, 2, 4, 0), 0);
        assert!(!t.ready());
        assert_eq!(t.observe(1, OK), Verdict::Unchanged);
        assert_eq!(t.observe(2, OK), Verdict::Changed);
        assert!(t.ready());
        // One failure is not enough; a success in between starts the count over.
        assert_eq!(t.observe(3, no()), Verdict::Unchanged);
        assert_eq!(t.observe(4, OK), Verdict::Unchanged);
        assert_eq!(t.observe(5, no()), Verdict::Unchanged);
        assert_eq!(t.observe(6, no()), Verdict::Changed);
        assert!(!t.ready());
        assert_eq!(t.said(), Some("refused"));
        assert_eq!(t.observe(7, no()), Verdict::Unchanged);
        assert_eq!(t.observe(8, no()), Verdict::Restart);
    }

    #[test]
    fn failures_in_the_start_period_count_for_nothing() {
        let mut t = Tracker::new(&probe(1, 1, 2, 1000), 10_000);
        for ms in [10_100, 10_500, 10_999] {
            assert_eq!(t.observe(ms, no()), Verdict::Unchanged);
        }
        assert_eq!(t.observe(11_000, no()), Verdict::Unchanged);
        assert_eq!(t.observe(11_001, no()), Verdict::Restart);
    }

    #[test]
    fn no_probe_is_ready_at_once_and_restart_zero_never_restarts() {
        let mut none = probe(1, 1, 0, 0);
        none.kind = ProbeKind::None;
        assert!(Tracker::new(&none, 0).ready());
        let mut t = Tracker::new(&probe(1, 1, 0, 0), 0);
        for ms in 0..100 {
            assert_ne!(t.observe(ms, no()), Verdict::Restart);
        }
    }
}
