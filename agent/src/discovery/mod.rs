//! Finding the other members: mDNS on a LAN (`mdns`), static peers and DNS names from the node
//! config elsewhere. Both only propose candidates: a candidate is joined after it proved, in a
//! mutual-TLS exchange, that it holds a certificate from this cluster's CA.

pub mod mdns;

use crate::membership::Member;
use crate::peer::PeerClient;
use crate::state::{Counters, Handle};
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Keeps trying the configured peers (resolving names each time) and hands what answers to
/// the core loop, which joins those it does not already know.
pub async fn retry_join(
    handle: Handle,
    peers: Vec<String>,
    every: Duration,
    shutdown: CancellationToken,
) {
    if peers.is_empty() {
        return;
    }
    let client = PeerClient::new(
        handle.me.clone(),
        handle.counters.clone(),
        &handle.tls,
        handle.clock.clone(),
    );
    loop {
        let mut found = Vec::new();
        for p in &peers {
            match client.identity(p).await {
                Ok(m) => found.push(m),
                Err(e) => tracing::debug!(peer = %p, err = %e, "peer not reachable yet"),
            }
        }
        if !found.is_empty() && handle.discovered(found).await.is_err() {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Ids of the members the core sees alive. A suspect is asked again: it may be a process
/// that restarted under a newer generation (see `Node::discovered`).
async fn live_ids(handle: &Handle) -> HashSet<String> {
    handle
        .snapshot()
        .await
        .map(|s| {
            s.members
                .into_iter()
                .filter(|m| m.state == crate::membership::MemberState::Alive)
                .map(|m| m.id.to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Joins the nodes mDNS shows advertising this cluster; ignores (and counts, once per node)
/// those of other clusters. When nobody is found within `window`, this node is the cluster's
/// first member: it says so, and keeps browsing.
pub async fn mdns_join(
    handle: Handle,
    mdns: Arc<mdns::Mdns>,
    every: Duration,
    window: Duration,
    shutdown: CancellationToken,
) {
    let client = PeerClient::new(
        handle.me.clone(),
        handle.counters.clone(),
        &handle.tls,
        handle.clock.clone(),
    );
    let hash = handle.trust.cluster_hash.clone();
    let started = crate::clock::now();
    let mut foreign = BTreeSet::new();
    let mut settled = false;
    loop {
        let live = live_ids(&handle).await;
        let mut found: Vec<Member> = Vec::new();
        for s in mdns.seen() {
            if s.id == handle.me.id.as_str() {
                continue;
            }
            if s.cluster_hash != hash {
                if foreign.insert(s.fullname.clone()) {
                    Counters::inc(&handle.counters.mdns_foreign);
                    tracing::warn!(
                        node = %s.id,
                        addrs = ?s.addrs,
                        "mDNS: not admitting a node that advertises another cluster"
                    );
                }
                continue;
            }
            if live.contains(&s.id) {
                continue;
            }
            for a in &s.addrs {
                match client.identity(&a.to_string()).await {
                    Ok(m) => {
                        found.push(m);
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(node = %s.id, addr = %a, err = %e, "mDNS candidate did not prove membership")
                    }
                }
            }
        }
        if !settled {
            if !live.is_empty() || !found.is_empty() {
                settled = true;
            } else if started.elapsed() >= window {
                settled = true;
                tracing::info!(
                    cluster = %handle.trust.cluster.name,
                    window_ms = window.as_millis() as u64,
                    "mDNS: no other member found; this node starts the cluster and keeps browsing"
                );
            }
        }
        if !found.is_empty() && handle.discovered(found).await.is_err() {
            return;
        }
        let wait = if settled {
            every
        } else {
            Duration::from_millis(250)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = mdns.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
