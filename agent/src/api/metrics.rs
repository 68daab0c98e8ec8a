//! `/metrics`: every metric declared once, in a table (name, kind, help, how to read it),
//! rendered in the Prometheus text format.

use crate::state::{ConnCounters, Handle, Snapshot};
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

/// One metric: what `# HELP` and `# TYPE` say, and how to read its value from `T`.
pub struct Metric<T> {
    pub name: &'static str,
    pub kind: &'static str,
    pub help: &'static str,
    pub read: fn(&T) -> u64,
}

/// Read from the node's counters and trust.
pub const NODE: &[Metric<Handle>] = &[
    Metric {
        name: "shoal_peer_messages_total",
        kind: "counter",
        help: "Peer messages received.",
        read: |h| h.counters.peer_messages.load(Relaxed),
    },
    Metric {
        name: "shoal_peer_messages_refused_total",
        kind: "counter",
        help: "Peer messages refused as malformed or unauthorised.",
        read: |h| h.counters.peer_messages_refused.load(Relaxed),
    },
    Metric {
        name: "shoal_peer_sends_failed_total",
        kind: "counter",
        help: "Peer messages that could not be delivered.",
        read: |h| h.counters.peer_sends_failed.load(Relaxed),
    },
    Metric {
        name: "shoal_store_writes_total",
        kind: "counter",
        help: "Local writes acknowledged.",
        read: |h| h.counters.writes.load(Relaxed),
    },
    Metric {
        name: "shoal_peer_tls_handshakes_total",
        kind: "counter",
        help: "TLS handshakes completed on the API port.",
        read: |h| h.counters.tls_handshakes.load(Relaxed),
    },
    Metric {
        name: "shoal_tls_certificate_expiry_timestamp_seconds",
        kind: "gauge",
        help: "When this node's certificate expires; the agent renews it at start within 30 days.",
        read: |h| h.trust.cert_not_after.max(0) as u64,
    },
    Metric {
        name: "shoal_join_requests_total",
        kind: "counter",
        help: "TLS bootstrap requests received.",
        read: |h| h.counters.join_requests.load(Relaxed),
    },
    Metric {
        name: "shoal_join_refused_total",
        kind: "counter",
        help: "TLS bootstrap requests refused (wrong join secret).",
        read: |h| h.counters.join_refused.load(Relaxed),
    },
    Metric {
        name: "shoal_discovery_foreign_nodes_total",
        kind: "counter",
        help: "Nodes of other clusters seen over mDNS and not admitted.",
        read: |h| h.counters.mdns_foreign.load(Relaxed),
    },
];

/// Read from a snapshot of the core.
pub const SNAPSHOT: &[Metric<Snapshot>] = &[
    Metric {
        name: "shoal_membership_live_members",
        kind: "gauge",
        help: "Other members alive or suspect.",
        read: |s| s.members.iter().filter(|m| m.state.is_live()).count() as u64,
    },
    Metric {
        name: "shoal_store_seq",
        kind: "counter",
        help: "Changes applied to the local replica.",
        read: |s| s.seq,
    },
    Metric {
        name: "shoal_sync_lag_milliseconds",
        kind: "gauge",
        help: "Worst peer lag at its last exchange.",
        read: super::status::sync_lag_ms,
    },
    Metric {
        name: "shoal_sync_refused_total",
        kind: "counter",
        help: "Entry batches refused by the merge.",
        read: |s| s.sync.refused,
    },
    Metric {
        name: "shoal_sync_unvouched_total",
        kind: "counter",
        help: "Entries from peers left out for a bad proof: forged, signed by an evicted node, or desired state without an operator's signature.",
        read: |s| s.sync.unvouched_refused,
    },
    Metric {
        name: "shoal_sync_unvouched_pending_total",
        kind: "counter",
        help: "Entries from peers left out until their signer's record arrives (asked for again).",
        read: |s| s.sync.unvouched_pending,
    },
    Metric {
        name: "shoal_sync_tombstones_collected_total",
        kind: "counter",
        help: "Tombstones collected.",
        read: |s| s.sync.tombstones_collected,
    },
    Metric {
        name: "shoal_sync_reconciles_total",
        kind: "counter",
        help: "Reconciles started (full comparisons with one peer).",
        read: |s| s.sync.reconciles,
    },
    Metric {
        name: "shoal_sync_reconcile_dropped_total",
        kind: "counter",
        help: "Keys dropped because reconciles named them deleted elsewhere.",
        read: |s| s.sync.reconcile_dropped,
    },
    Metric {
        name: "shoal_sync_reconcile_held_total",
        kind: "counter",
        help: "Keys a reconcile named deleted but kept (unconfirmed by a second peer, or over the bound).",
        read: |s| s.sync.reconcile_held,
    },
    Metric {
        name: "shoal_sync_reconcile_unconfirmed_total",
        kind: "counter",
        help: "Reconciles whose named keys a second peer did not all confirm (the first peer is distrusted for a while).",
        read: |s| s.sync.reconcile_unconfirmed,
    },
];

/// Per listener (`status`, `api`).
pub const CONNECTIONS: &[Metric<ConnCounters>] = &[
    Metric {
        name: "shoal_api_connections_open",
        kind: "gauge",
        help: "Connections open, by listener.",
        read: |c| c.open.load(Relaxed) as u64,
    },
    Metric {
        name: "shoal_api_connections_shed_total",
        kind: "counter",
        help: "Connections refused because the listener held its maximum, by listener.",
        read: |c| c.shed.load(Relaxed),
    },
    Metric {
        name: "shoal_api_connections_idle_closed_total",
        kind: "counter",
        help: "Connections closed after moving no byte for listen.idle_timeout_ms, by listener.",
        read: |c| c.idle_closed.load(Relaxed),
    },
];

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn table<T>(out: &mut String, metrics: &[Metric<T>], from: &T) {
    for m in metrics {
        head(out, m.name, m.kind, m.help);
        let _ = writeln!(out, "{} {}", m.name, (m.read)(from));
    }
}

/// The whole `/metrics` text.
pub async fn render(h: &Handle) -> String {
    let mut out = String::new();
    table(&mut out, NODE, h);
    if let Ok(s) = h.snapshot().await {
        table(&mut out, SNAPSHOT, &s);
    }
    let c = &h.counters;
    for m in CONNECTIONS {
        head(&mut out, m.name, m.kind, m.help);
        for (listener, conns) in [
            ("status", &c.status_conns),
            ("api", &c.api_conns),
            ("ingress", &c.ingress_conns),
        ] {
            let _ = writeln!(
                out,
                "{}{{listener=\"{listener}\"}} {}",
                m.name,
                (m.read)(conns)
            );
        }
    }
    head(
        &mut out,
        "shoal_peer_tls_refused_total",
        "counter",
        "Connections to the API port refused at the TLS layer, by reason.",
    );
    for (reason, n) in c.refusals() {
        let _ = writeln!(
            out,
            "shoal_peer_tls_refused_total{{reason=\"{}\"}} {n}",
            reason.label()
        );
    }
    let clock = h.clock.view(crate::clock::wall_ms());
    head(
        &mut out,
        "shoal_clock_offset_seconds",
        "gauge",
        "Median of peers' clocks minus this node's, from their HTTP Date headers.",
    );
    let _ = writeln!(
        out,
        "shoal_clock_offset_seconds {}",
        clock.offset_ms as f64 / 1000.0
    );
    head(
        &mut out,
        "shoal_clock_skewed",
        "gauge",
        "1 while most peers' clocks differ from this node's by more than the drift bound (writes answer 503).",
    );
    let _ = writeln!(out, "shoal_clock_skewed {}", u8::from(clock.skewed));
    out
}
