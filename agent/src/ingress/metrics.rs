//! What the ingress sees of each app: requests by status class, time to the answer's head,
//! requests in flight and bytes both ways, counted where the request entered (a request
//! passed on to another node is counted once, by the node the client reached). Rendered on
//! `/metrics`, and summed into a rate every interval for the store (`LoadRecord`), which the
//! autoscaler reads.

use crate::state::records::{AppLoad, LoadRecord};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The latency histogram's upper bounds, in seconds (Prometheus' default buckets).
pub const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Apps counted at once; beyond, requests are still served but not counted per app (only
/// apps in the route table are ever counted, so this bounds a cluster with very many apps).
const MAX_APPS: usize = 4096;

/// One app's counters on this node.
#[derive(Debug, Default)]
pub struct AppStats {
    /// Answers by status class: 1xx … 5xx.
    classes: [AtomicU64; 5],
    inflight: AtomicU64,
    /// Of those, held while the app wakes from zero.
    waiting: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Non-cumulative bucket counts; the last is above every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    latency_us: AtomicU64,
}

impl AppStats {
    /// A request entered: in flight until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    /// A request held while the app wakes, until the guard is dropped.
    pub fn hold(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Relaxed);
        Waiting(self.clone())
    }

    /// The answer's head went out after `took`.
    pub fn answered(&self, status: u16, took: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.classes[class].fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        let b = BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(BUCKETS.len());
        self.buckets[b].fetch_add(1, Relaxed);
        self.latency_us
            .fetch_add(took.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    pub fn bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Relaxed);
    }

    pub fn bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Relaxed);
    }

    fn requests(&self) -> u64 {
        self.classes.iter().map(|c| c.load(Relaxed)).sum()
    }
}

/// A request in flight, until dropped (with the answer's body, once it is sent).
pub struct InFlight(Arc<AppStats>);

impl InFlight {
    pub fn stats(&self) -> &Arc<AppStats> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}

/// A request held for an app scaled to zero, until dropped.
pub struct Waiting(Arc<AppStats>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Relaxed);
    }
}

/// Every app's counters on this node, and the totals at the last interval (for rates).
#[derive(Debug, Default)]
pub struct Registry {
    apps: RwLock<HashMap<String, Arc<AppStats>>>,
    /// (when, requests so far) per app at the last `load`.
    last: Mutex<(Option<tokio::time::Instant>, HashMap<String, u64>)>,
}

impl Registry {
    /// The counters of `app` (made on its first request); `None` past `MAX_APPS`.
    pub fn of(&self, app: &str) -> Option<Arc<AppStats>> {
        if let Some(s) = self.apps.read().ok()?.get(app) {
            return Some(s.clone());
        }
        let mut apps = self.apps.write().ok()?;
        if apps.len() >= MAX_APPS && !apps.contains_key(app) {
            return None;
        }
        Some(apps.entry(app.to_string()).or_default().clone())
    }

    /// Forgets the apps `keep` says are gone (nothing in flight for them).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut apps) = self.apps.write() {
            apps.retain(|name, s| keep(name) || s.inflight.load(Relaxed) > 0);
        }
    }

    fn sorted(&self) -> Vec<(String, Arc<AppStats>)> {
        let mut v: Vec<(String, Arc<AppStats>)> = self
            .apps
            .read()
            .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The rates since the last call (or since the first request, on the first), for the
    /// store: apps with nothing to say are left out.
    pub fn load(&self, now: tokio::time::Instant, at_ms: u64, interval_ms: u64) -> LoadRecord {
        let Ok(mut last) = self.last.lock() else {
            return LoadRecord::default();
        };
        let secs = last
            .0
            .map_or(interval_ms as f64 / 1000.0, |t| {
                now.duration_since(t).as_secs_f64()
            })
            .max(0.001);
        let mut apps = BTreeMap::new();
        let mut seen = HashMap::new();
        for (name, s) in self.sorted() {
            let total = s.requests();
            let before = last.1.get(&name).copied().unwrap_or(0);
            seen.insert(name.clone(), total);
            let l = AppLoad {
                rps: total.saturating_sub(before) as f64 / secs,
                inflight: s.inflight.load(Relaxed),
                waiting: s.waiting.load(Relaxed),
            };
            if l.rps > 0.0 || l.inflight > 0 || l.waiting > 0 {
                apps.insert(name, l);
            }
        }
        *last = (Some(now), seen);
        LoadRecord {
            at_ms,
            interval_ms,
            apps,
        }
    }

    /// The Prometheus text of every app's counters.
    pub fn render(&self, out: &mut String) {
        let apps = self.sorted();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            out,
            "shoal_ingress_requests_total",
            "counter",
            "Requests that entered at this node's ingress, by app and status class.",
        );
        for (app, s) in &apps {
            for (i, c) in s.classes.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "shoal_ingress_requests_total{{app=\"{app}\",class=\"{}xx\"}} {}",
                    i + 1,
                    c.load(Relaxed)
                );
            }
        }
        head(
            out,
            "shoal_ingress_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its answer's head, by app.",
        );
        for (app, s) in &apps {
            let mut cumulative = 0;
            for (i, b) in s.buckets.iter().enumerate() {
                cumulative += b.load(Relaxed);
                let le = BUCKETS
                    .get(i)
                    .map_or("+Inf".to_string(), |le| le.to_string());
                let _ = writeln!(
                    out,
                    "shoal_ingress_request_duration_seconds_bucket{{app=\"{app}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "shoal_ingress_request_duration_seconds_sum{{app=\"{app}\"}} {}\nshoal_ingress_request_duration_seconds_count{{app=\"{app}\"}} {cumulative}",
                s.latency_us.load(Relaxed) as f64 / 1e6
            );
        }
        type Read = fn(&AppStats) -> u64;
        let gauges: [(&str, &str, &str, Read); 4] = [
            (
                "shoal_ingress_requests_in_flight",
                "gauge",
                "Requests entered at this node and not yet answered in full, by app.",
                |s| s.inflight.load(Relaxed),
            ),
            (
                "shoal_ingress_requests_waiting",
                "gauge",
                "Requests held while an app scaled to zero starts, by app.",
                |s| s.waiting.load(Relaxed),
            ),
            (
                "shoal_ingress_request_bytes_total",
                "counter",
                "Request body bytes passed to apps, by app.",
                |s| s.bytes_in.load(Relaxed),
            ),
            (
                "shoal_ingress_response_bytes_total",
                "counter",
                "Answer body bytes passed to clients, by app.",
                |s| s.bytes_out.load(Relaxed),
            ),
        ];
        for (name, kind, help, read) in gauges {
            head(out, name, kind, help);
            for (app, s) in &apps {
                let _ = writeln!(out, "{name}{{app=\"{app}\"}} {}", read(s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_class_and_bucket_and_rated_per_interval() {
        let r = Registry::default();
        let web = r.of("web").unwrap();
        for (status, ms) in [(200, 3), (204, 40), (404, 700), (502, 20_000)] {
            let g = web.begin();
            web.answered(status, Duration::from_millis(ms));
            drop(g);
        }
        let held = web.begin();
        let t0 = crate::clock::now();
        let first = r.load(t0, 1_000, 2_000);
        assert_eq!(
            first.apps["web"].rps, 2.0,
            "4 requests over the 2 s interval"
        );
        assert_eq!(first.apps["web"].inflight, 1);
        let mut text = String::new();
        r.render(&mut text);
        for line in [
            "shoal_ingress_requests_total{app=\"web\",class=\"2xx\"} 2",
            "shoal_ingress_requests_total{app=\"web\",class=\"4xx\"} 1",
            "shoal_ingress_requests_total{app=\"web\",class=\"5xx\"} 1",
            "shoal_ingress_request_duration_seconds_bucket{app=\"web\",le=\"0.005\"} 1",
            "shoal_ingress_request_duration_seconds_bucket{app=\"web\",le=\"0.05\"} 2",
            "shoal_ingress_request_duration_seconds_bucket{app=\"web\",le=\"1\"} 3",
            "shoal_ingress_request_duration_seconds_bucket{app=\"web\",le=\"10\"} 3",
            "shoal_ingress_request_duration_seconds_bucket{app=\"web\",le=\"+Inf\"} 4",
            "shoal_ingress_request_duration_seconds_count{app=\"web\"} 4",
            "shoal_ingress_requests_in_flight{app=\"web\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        drop(held);
        // Nothing new since: a quiet app is left out of the record.
        let second = r.load(t0 + Duration::from_secs(2), 3_000, 2_000);
        assert!(second.apps.is_empty(), "{second:?}");
        web.answered(200, Duration::from_millis(1));
        let third = r.load(t0 + Duration::from_secs(6), 7_000, 2_000);
        assert_eq!(third.apps["web"].rps, 0.25, "one request over 4 s");
    }

    #[test]
    fn apps_gone_are_forgotten_unless_a_request_is_in_flight() {
        let r = Registry::default();
        let a = r.of("a").unwrap();
        let _b = r.of("b").unwrap();
        let g = a.begin();
        r.retain(|_| false);
        assert_eq!(r.sorted().len(), 1, "a has a request in flight");
        drop(g);
        r.retain(|_| false);
        assert!(r.sorted().is_empty());
    }
}
