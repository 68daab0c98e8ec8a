//! Sizing apps by their traffic (`[scale] min, max, target_rps, target_inflight`).
//!
//! Every node's ingress writes what it saw of each app over the last interval
//! (`metrics/<node>/ingress`: requests a second, in flight, held). The app's rendezvous
//! owner sums the fresh records and recommends `ceil(observed / target)` replicas (the
//! larger of the two targets' answers), held within `min` and `max`; a load within 10 % of
//! what the current count is sized for changes nothing. The recommendation is stabilised as
//! Kubernetes' HPA does: the app grows to the lowest count recommended over `up_window`,
//! and shrinks to the highest recommended over `down_window`, and only once the count has
//! stood that long and the owner has watched for that long. So it never flaps under steady
//! load. The count goes to `scale/<app>`, which placement reads (`View::replicas`).
//!
//! An app with `min = 0` stops when idle. A request to it is held by the ingress, which asks
//! for a replica by writing a count of one (`wake`); the owner keeps it while requests wait.

use crate::rollout::View;
use crate::spec::AutoscalePolicy;
use crate::state::records::{self, LoadRecord, ScaleRecord};
use crate::state::Handle;
use crate::store::{keys, Keyspace};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A load within this fraction of what the current count is sized for changes nothing.
pub const TOLERANCE: f64 = 0.1;

/// The load of one app summed over the nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observed {
    pub rps: f64,
    pub inflight: f64,
    /// Requests held for a replica (the app is scaled to zero).
    pub waiting: u64,
}

/// Sums the records fresh at `now_ms` (written within three of their intervals: a node gone
/// quiet or down says nothing of now).
pub fn observe(loads: &BTreeMap<String, LoadRecord>, app: &str, now_ms: u64) -> Observed {
    let mut o = Observed::default();
    for r in loads.values() {
        let fresh = r.at_ms.saturating_add(3 * r.interval_ms.clamp(100, 60_000)) >= now_ms;
        if let (true, Some(l)) = (fresh, r.apps.get(app)) {
            if l.rps.is_finite() && l.rps >= 0.0 {
                o.rps += l.rps;
            }
            o.inflight += l.inflight as f64;
            // Another node's numbers: nothing it writes may overflow the sum.
            o.waiting = o.waiting.saturating_add(l.waiting);
        }
    }
    o
}

/// The count the load asks for now, before stabilisation.
pub fn recommend(p: &AutoscalePolicy, current: u32, o: &Observed) -> u32 {
    let mut ratio: f64 = 0.0;
    for (target, seen) in [(p.target_rps, o.rps), (p.target_inflight, o.inflight)] {
        if let Some(t) = target.filter(|t| *t > 0.0) {
            ratio = ratio.max(seen / t);
        }
    }
    let mut want = if current > 0 && (ratio / current as f64 - 1.0).abs() <= TOLERANCE {
        current
    } else {
        ratio.ceil().min(u32::MAX as f64) as u32
    };
    if o.waiting > 0 {
        want = want.max(1);
    }
    want.clamp(p.min, p.max)
}

/// An app's recommendations over the windows, kept by its owner.
#[derive(Debug, Default)]
pub struct Stabilizer {
    /// (ms, recommended count), oldest first.
    seen: VecDeque<(u64, u32)>,
    /// When this owner started watching the app.
    since_ms: Option<u64>,
}

impl Stabilizer {
    /// The count to run given this recommendation: up to the lowest recommended over
    /// `up_window`, down to the highest over `down_window` once the current count is that
    /// old (`changed_ms`) and this owner has watched that long.
    pub fn decide(
        &mut self,
        p: &AutoscalePolicy,
        now_ms: u64,
        current: u32,
        changed_ms: u64,
        recommended: u32,
    ) -> u32 {
        let since = *self.since_ms.get_or_insert(now_ms);
        self.seen.push_back((now_ms, recommended));
        let up = p.up_window.as_millis() as u64;
        let down = p.down_window.as_millis() as u64;
        let keep = up.max(down);
        while self
            .seen
            .front()
            .is_some_and(|(t, _)| now_ms.saturating_sub(*t) > keep)
        {
            self.seen.pop_front();
        }
        let within = |w: u64| {
            self.seen
                .iter()
                .filter(move |(t, _)| now_ms.saturating_sub(*t) <= w)
                .map(|(_, r)| *r)
        };
        if recommended > current {
            // Grown only as far as every recommendation over the window asked.
            let floor = within(up).min().unwrap_or(recommended);
            return floor.max(current);
        }
        if recommended < current {
            let watched = now_ms.saturating_sub(since) >= down;
            let settled = now_ms.saturating_sub(changed_ms) >= down;
            if !(watched && settled) {
                return current;
            }
            let ceiling = within(down).max().unwrap_or(recommended);
            return ceiling.min(current);
        }
        current
    }
}

/// Sizes the apps this node owns every `interval` until `shutdown`.
pub async fn run(h: Handle, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stable: HashMap<String, Stabilizer> = HashMap::new();
    let mut changes = h.subscribe();
    loop {
        // A new load record is looked at when it lands (at most twice a second), not a
        // whole interval later: a load step is met within about one interval.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            c = changes.recv() => match c {
                Ok(c) if c.entry.key.keyspace() != Keyspace::Metrics => continue,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    while changes.try_recv().is_ok() {}
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
        // Nothing to size and nothing to clean up: no need to read the whole state.
        if !records::apps(&h.store).iter().any(|a| a.spec.autoscaled())
            && records::scales(&h.store).is_empty()
        {
            stable.clear();
            continue;
        }
        let Ok(snap) = h.snapshot().await else {
            continue;
        };
        let me = h.me.id.as_str();
        let view = View::read_as(&h.store, me, |id| {
            snap.members
                .iter()
                .any(|m| m.id.as_str() == id && m.state.is_live())
        });
        let loads = records::loads(&h.store);
        let now = crate::clock::wall_ms();
        let mut ops = Vec::new();
        let mut owned = std::collections::HashSet::new();
        for app in &view.apps {
            let name = app.spec.name.as_str();
            let Some(p) = app.spec.autoscale_policy() else {
                continue;
            };
            if view.owner(name) != Some(me) {
                continue;
            }
            owned.insert(name.to_string());
            let o = observe(&loads, name, now);
            let current = view.replicas(app);
            let changed = view.scale.get(name).map_or(0, |s| s.at_ms);
            let rec = recommend(&p, current, &o);
            let new = stable
                .entry(name.to_string())
                .or_default()
                .decide(&p, now, current, changed, rec);
            if new == current {
                continue;
            }
            let reason = format!(
                "{:.1} req/s and {} in flight across the cluster ({} waiting); target {}",
                o.rps,
                o.inflight,
                o.waiting,
                [
                    p.target_rps.map(|t| format!("{t} req/s")),
                    p.target_inflight.map(|t| format!("{t} in flight")),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" and ")
            );
            tracing::info!(app = %name, from = current, to = new, %reason, "autoscaling");
            ops.extend(record(name, new, now, me, reason));
        }
        // Counts of apps that are gone, by whoever would own them.
        for name in view.scale.keys() {
            if !view.apps.iter().any(|a| a.spec.name == *name) && view.owner(name) == Some(me) {
                ops.extend(keys::scale(name).ok().map(|k| (k, None)));
            }
        }
        stable.retain(|name, _| owned.contains(name));
        if !ops.is_empty() {
            if let Err(e) = h.write(ops).await {
                tracing::warn!(err = %e, "cannot record a replica count");
            }
        }
    }
}

/// The write of an app's count.
fn record(
    app: &str,
    replicas: u32,
    now_ms: u64,
    by: &str,
    reason: String,
) -> Option<(crate::store::Key, Option<Bytes>)> {
    let r = ScaleRecord {
        replicas,
        at_ms: now_ms,
        by: by.to_string(),
        reason,
    };
    let key = keys::scale(app).ok()?;
    Some((key, Some(Bytes::from(serde_json::to_vec(&r).ok()?))))
}

/// Starts apps scaled to zero that the ingress asks for: a count of one, unless one is
/// already asked for (the owner sizes it from there, and keeps it while requests wait).
pub async fn wake(h: Handle, mut asks: tokio::sync::mpsc::Receiver<String>) {
    let mut last: HashMap<String, tokio::time::Instant> = HashMap::new();
    while let Some(app) = asks.recv().await {
        let now = crate::clock::now();
        // Each held request asks every couple of seconds: one look a second is enough.
        if last
            .get(&app)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1))
        {
            continue;
        }
        last.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        last.insert(app.clone(), now);
        let Some(a) = records::app(&h.store, &app) else {
            continue;
        };
        if !a.spec.autoscale_policy().is_some_and(|p| p.to_zero()) {
            continue;
        }
        let current = records::scales(&h.store)
            .get(&app)
            .map_or(0, |s| s.replicas);
        if current > 0 {
            continue;
        }
        tracing::info!(%app, "a request woke an app scaled to zero");
        let w = record(
            &app,
            1,
            crate::clock::wall_ms(),
            h.me.id.as_str(),
            "a request arrived while it was scaled to zero".into(),
        );
        if let Err(e) = h.write(w.into_iter().collect()).await {
            tracing::warn!(%app, err = %e, "cannot wake an app");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::records::AppLoad;

    fn policy(min: u32, max: u32, rps: Option<f64>, inflight: Option<f64>) -> AutoscalePolicy {
        AutoscalePolicy {
            min,
            max,
            target_rps: rps,
            target_inflight: inflight,
            up_window: Duration::ZERO,
            down_window: Duration::from_secs(300),
            wake_timeout: Duration::from_secs(60),
        }
    }

    fn seen(rps: f64, inflight: f64) -> Observed {
        Observed {
            rps,
            inflight,
            waiting: 0,
        }
    }

    #[test]
    fn the_count_is_the_load_over_the_target_rounded_up_and_held_within_bounds() {
        let p = policy(1, 10, Some(10.0), None);
        assert_eq!(recommend(&p, 1, &seen(35.0, 0.0)), 4);
        assert_eq!(recommend(&p, 1, &seen(0.0, 0.0)), 1, "min");
        assert_eq!(recommend(&p, 1, &seen(1e9, 0.0)), 10, "max");
        // Within 10 % of what 4 replicas are sized for: stay.
        assert_eq!(recommend(&p, 4, &seen(43.0, 0.0)), 4);
        assert_eq!(recommend(&p, 4, &seen(37.0, 0.0)), 4);
        assert_eq!(recommend(&p, 4, &seen(45.0, 0.0)), 5);
        // The larger of two targets' answers.
        let both = policy(1, 10, Some(100.0), Some(2.0));
        assert_eq!(recommend(&both, 1, &seen(50.0, 7.0)), 4);
        // To zero and back.
        let zero = policy(0, 3, Some(5.0), None);
        assert_eq!(recommend(&zero, 1, &seen(0.0, 0.0)), 0);
        let waiting = Observed {
            waiting: 2,
            ..Observed::default()
        };
        assert_eq!(recommend(&zero, 0, &waiting), 1);
    }

    #[test]
    fn only_fresh_records_count() {
        let rec = |at_ms, rps, waiting| LoadRecord {
            at_ms,
            interval_ms: 1000,
            apps: [(
                "web".to_string(),
                AppLoad {
                    rps,
                    inflight: 1,
                    waiting,
                },
            )]
            .into(),
        };
        let loads: BTreeMap<String, LoadRecord> = [
            ("n1".to_string(), rec(10_000, 5.0, 0)),
            ("n2".to_string(), rec(9_000, 2.5, 1)),
            ("n3".to_string(), rec(5_000, 100.0, 0)),
            ("n4".to_string(), rec(10_000, f64::NAN, 0)),
        ]
        .into();
        let o = observe(&loads, "web", 10_500);
        assert_eq!(o.rps, 7.5, "n3's record is old and n4's not a number");
        assert_eq!(o.inflight, 3.0);
        assert_eq!(o.waiting, 1);
        assert_eq!(observe(&loads, "other", 10_500), Observed::default());
        // Hostile numbers do not overflow the sum.
        let huge: BTreeMap<String, LoadRecord> = [
            ("n1".to_string(), rec(10_000, 1.0, u64::MAX)),
            ("n2".to_string(), rec(10_000, 1.0, u64::MAX)),
        ]
        .into();
        assert_eq!(observe(&huge, "web", 10_500).waiting, u64::MAX);
    }

    #[test]
    fn it_grows_at_once_and_shrinks_only_after_the_window_to_the_highest_asked() {
        let p = policy(1, 10, Some(10.0), None);
        let mut s = Stabilizer::default();
        let min = 60_000;
        assert_eq!(s.decide(&p, 0, 1, 0, 5), 5, "up at once");
        // Load falls: nothing changes for five minutes after the change.
        assert_eq!(s.decide(&p, 60_000, 5, 0, 2), 5);
        assert_eq!(s.decide(&p, 4 * min, 5, 0, 3), 5);
        // Five minutes on: the highest recommendation within the window (3, at 4 min; the
        // 5 at 0 has left it).
        assert_eq!(s.decide(&p, 5 * min + 1, 5, 0, 1), 3);
        // Just changed: another five minutes.
        assert_eq!(s.decide(&p, 6 * min, 3, 5 * min + 1, 1), 3);
        assert_eq!(s.decide(&p, 10 * min + 2, 3, 5 * min + 1, 1), 1);
    }

    #[test]
    fn steady_load_that_wavers_within_the_tolerance_never_changes_the_count() {
        let p = policy(1, 10, Some(10.0), None);
        let mut s = Stabilizer::default();
        let mut n = 4;
        let mut changed = 0;
        for i in 0..2000u64 {
            // 36 … 44 req/s around 40: four replicas' worth.
            let rps = 40.0 + 4.0 * ((i as f64) * 0.7).sin();
            let rec = recommend(&p, n, &seen(rps, 0.0));
            let next = s.decide(&p, i * 5_000, n, changed, rec);
            assert_eq!(next, 4, "step {i}: {rps} req/s");
            if next != n {
                changed = i * 5_000;
                n = next;
            }
        }
    }

    #[test]
    fn a_new_owner_watches_a_whole_window_before_it_shrinks_an_app() {
        let p = policy(1, 10, Some(10.0), None);
        let mut s = Stabilizer::default();
        // The count was set long ago by an earlier owner.
        assert_eq!(s.decide(&p, 10_000_000, 6, 0, 1), 6);
        assert_eq!(s.decide(&p, 10_200_000, 6, 0, 1), 6);
        assert_eq!(s.decide(&p, 10_300_000, 6, 0, 1), 1);
    }

    #[test]
    fn an_up_window_grows_only_as_far_as_the_whole_window_asked() {
        let mut p = policy(1, 10, Some(10.0), None);
        p.up_window = Duration::from_secs(30);
        let mut s = Stabilizer::default();
        assert_eq!(s.decide(&p, 0, 1, 0, 1), 1);
        assert_eq!(s.decide(&p, 10_000, 1, 0, 6), 1, "1 was asked within 30 s");
        assert_eq!(s.decide(&p, 31_000, 1, 0, 8), 6, "6 and 8 asked since");
    }
}
