//! Placement: which node runs which replica, as a pure function of replicated state. Every
//! node computes it from the same inputs and gets the same answer, so there is no leader and
//! nothing to elect; a node then starts and stops only its own tasks.
//!
//! A replica that is running stays where it is. Every other replica goes to the eligible node
//! that ranks highest for (app, replica, node) by rendezvous hash, preferring nodes that hold
//! no replica of the app yet, so replicas spread and a node leaving moves only its own.

use crate::spec::AppSpec;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// An app as the scheduler sees it.
#[derive(Debug, Clone, Copy)]
pub struct App<'a> {
    pub name: &'a str,
    pub spec: &'a AppSpec,
}

/// A replica some node reports running (from the `tasks/` records of its current run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running<'a> {
    pub app: &'a str,
    pub replica: u32,
    pub node: &'a str,
    /// When it started running (ms since the epoch).
    pub since_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Placement {
    pub app: String,
    pub replica: u32,
    pub node: String,
}

/// The rendezvous weight of `node` for one replica: the first 8 bytes of a SHA-256, the same
/// on every machine and every build.
fn rank(app: &str, replica: u32, node: &str) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [app.as_bytes(), &replica.to_be_bytes(), node.as_bytes()] {
        ctx.update(&(part.len() as u32).to_be_bytes());
        ctx.update(part);
    }
    let d = ctx.finish();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b)
}

/// The node of `among` that ranks highest for one replica.
fn best<'n>(app: &str, replica: u32, among: impl Iterator<Item = &'n str>) -> Option<&'n str> {
    among.max_by_key(|n| (rank(app, replica, n), *n))
}

/// Places every replica of every app on one of `nodes` (the live nodes that run containers
/// and are not drained). Sorted by (app, replica); empty when there is no node. Work is
/// O(replicas × nodes) per app (a rendezvous hash per candidate), plus the running list once.
pub fn place(apps: &[App<'_>], nodes: &[&str], running: &[Running<'_>]) -> Vec<Placement> {
    let nodes: BTreeSet<&str> = nodes.iter().copied().collect();
    if nodes.is_empty() {
        return Vec::new();
    }
    let mut holders: HashMap<(&str, u32), Vec<&Running<'_>>> = HashMap::new();
    for r in running.iter().filter(|r| nodes.contains(r.node)) {
        holders.entry((r.app, r.replica)).or_default().push(r);
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for app in apps {
        // Two records for one app name cannot both be placed: the first wins.
        if !seen.insert(app.name) {
            continue;
        }
        if app.spec.every_node() {
            out.extend(nodes.iter().map(|n| Placement {
                app: app.name.to_string(),
                replica: 0,
                node: n.to_string(),
            }));
            continue;
        }
        let count = app.spec.replicas();
        let mut chosen: BTreeMap<u32, &str> = BTreeMap::new();
        let mut load: BTreeMap<&str, usize> = nodes.iter().map(|n| (*n, 0)).collect();
        // Running replicas first: they stay (the best-ranked copy when several nodes run one).
        for replica in 0..count {
            // Two nodes run it only while their views differed (or one has not yet said it
            // stopped): the later start is the one that reacted to the newer view.
            let holder = holders.get(&(app.name, replica)).and_then(|rs| {
                rs.iter()
                    .max_by_key(|r| (r.since_ms, rank(app.name, replica, r.node), r.node))
            });
            if let Some(r) = holder {
                chosen.insert(replica, r.node);
                *load.entry(r.node).or_default() += 1;
            }
        }
        for replica in 0..count {
            if chosen.contains_key(&replica) {
                continue;
            }
            // Nodes without a replica of the app first; with more replicas than nodes, the
            // least loaded nodes take the extra ones.
            let least = load.values().copied().min().unwrap_or(0);
            let light = load.iter().filter(|(_, l)| **l == least).map(|(n, _)| *n);
            let Some(n) = best(app.name, replica, light) else {
                continue;
            };
            chosen.insert(replica, n);
            *load.entry(n).or_default() += 1;
        }
        out.extend(chosen.into_iter().map(|(replica, node)| Placement {
            app: app.name.to_string(),
            replica,
            node: node.to_string(),
        }));
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(replicas: u32) -> AppSpec {
        AppSpec::parse(&format!("name = \"a\"\n[scale]\nreplicas = {replicas}")).unwrap()
    }

    fn on(p: &[Placement], node: &str) -> usize {
        p.iter().filter(|p| p.node == node).count()
    }

    #[test]
    fn replicas_spread_over_nodes() {
        let s = spec(3);
        let apps = [App {
            name: "web",
            spec: &s,
        }];
        let p = place(&apps, &["n1", "n2", "n3"], &[]);
        assert_eq!(p.len(), 3);
        for n in ["n1", "n2", "n3"] {
            assert_eq!(on(&p, n), 1, "{p:?}");
        }
        let p = place(&apps, &["n1", "n2"], &[]);
        assert_eq!(p.len(), 3);
        assert!(on(&p, "n1") >= 1 && on(&p, "n2") >= 1, "{p:?}");
        assert!(place(&apps, &[], &[]).is_empty());
    }

    #[test]
    fn every_node_runs_one_replica_per_node() {
        let s = AppSpec::parse("name = \"a\"\n[scale]\nplacement = \"every-node\"").unwrap();
        let p = place(
            &[App {
                name: "agent",
                spec: &s,
            }],
            &["b", "a", "c"],
            &[],
        );
        let nodes: Vec<&str> = p.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(nodes, ["a", "b", "c"]);
    }

    #[test]
    fn a_running_replica_stays_where_it_is() {
        let s = spec(1);
        let apps = [App {
            name: "web",
            spec: &s,
        }];
        let fresh = place(&apps, &["n1", "n2", "n3"], &[]);
        let other = ["n1", "n2", "n3"]
            .into_iter()
            .find(|n| *n != fresh[0].node)
            .unwrap();
        let running = [Running {
            app: "web",
            replica: 0,
            node: other,
            since_ms: 5,
        }];
        assert_eq!(place(&apps, &["n1", "n2", "n3"], &running)[0].node, other);
        // Running on a node that is no longer eligible does not count.
        let without: Vec<&str> = ["n1", "n2", "n3"]
            .into_iter()
            .filter(|n| *n != other)
            .collect();
        assert_ne!(place(&apps, &without, &running)[0].node, other);
        // Reported by two nodes: the later start stays.
        let both = [
            running[0],
            Running {
                node: fresh[0].node.as_str(),
                since_ms: 9,
                ..running[0]
            },
        ];
        assert_eq!(
            place(&apps, &["n1", "n2", "n3"], &both)[0].node,
            fresh[0].node
        );
        let both = [
            both[0],
            Running {
                since_ms: 1,
                ..both[1]
            },
        ];
        assert_eq!(place(&apps, &["n1", "n2", "n3"], &both)[0].node, other);
    }

    proptest! {
        #[test]
        fn placement_is_deterministic_complete_and_balanced(
            replicas in 1u32..12,
            nodes in proptest::collection::btree_set("[a-z]{1,6}", 1..8),
        ) {
            let s = spec(replicas);
            let apps = [App { name: "web", spec: &s }];
            let list: Vec<&str> = nodes.iter().map(|s| s.as_str()).collect();
            let mut reversed = list.clone();
            reversed.reverse();
            let p = place(&apps, &list, &[]);
            prop_assert_eq!(&p, &place(&apps, &reversed, &[]));
            let indices: Vec<u32> = p.iter().map(|p| p.replica).collect();
            prop_assert_eq!(indices, (0..replicas).collect::<Vec<_>>());
            let per_node = replicas.div_ceil(list.len() as u32) as usize;
            for n in &list {
                prop_assert!(on(&p, n) <= per_node, "{:?}", p);
            }
        }

        #[test]
        fn a_node_leaving_moves_only_its_own_replicas(
            replicas in 1u32..12,
            nodes in proptest::collection::btree_set("[a-z]{1,6}", 2..8),
            gone in 0usize..8,
        ) {
            let s = spec(replicas);
            let apps = [App { name: "web", spec: &s }];
            let list: Vec<&str> = nodes.iter().map(|s| s.as_str()).collect();
            let before = place(&apps, &list, &[]);
            let gone = list[gone % list.len()];
            let running: Vec<Running> = before
                .iter()
                .map(|p| Running { app: "web", replica: p.replica, node: &p.node, since_ms: 1 })
                .collect();
            let rest: Vec<&str> = list.iter().copied().filter(|n| *n != gone).collect();
            let after = place(&apps, &rest, &running);
            for (b, a) in before.iter().zip(&after) {
                if b.node != gone {
                    prop_assert_eq!(b, a);
                }
            }
        }
    }
}
