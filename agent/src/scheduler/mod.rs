//! Placement: which node runs which replica, as a pure function of replicated state. Every
//! node computes it from the same inputs and gets the same answer, so there is no leader and
//! nothing to elect; a node then starts and stops only its own tasks.
//!
//! A replica that is running stays where it is, as long as its node still matches the app's
//! constraints. Every other replica goes to an eligible node: one that matches the app's
//! `constraints` on node labels and has the declared cpu and memory free (what replicas
//! placed there declare counts as taken; a node of unknown capacity takes anything). Among
//! those it prefers, in order, the spread domain (`spread = "zone"`: the value of that label)
//! holding the fewest of the app's replicas, the node holding the fewest, and the node
//! ranking highest for (app, replica, node) by rendezvous hash, so replicas spread and a node
//! leaving moves only its own. `every-node` apps are placed first, on every eligible node.
//! A replica that fits nowhere is left unplaced with the reason.
//!
//! Work is O(replicas × nodes) cheap steps (a hash mix and a few comparisons per candidate),
//! plus one SHA-256 per node and per replica.

use crate::spec::AppSpec;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// An app as the scheduler sees it.
#[derive(Debug, Clone, Copy)]
pub struct App<'a> {
    pub name: &'a str,
    pub spec: &'a AppSpec,
    /// How many replicas it runs (the spec's count, or the autoscaler's).
    pub replicas: u32,
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    pub id: &'a str,
    /// What it can hold; `None`: unknown, anything fits.
    pub capacity: Option<Capacity>,
    pub labels: &'a BTreeMap<String, String>,
    /// False for a drained node: nothing new goes there; what runs there moves, but for
    /// pinned replicas.
    pub takes_new: bool,
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl<'a> Node<'a> {
    /// A node with no labels and unknown capacity.
    pub fn bare(id: &'a str) -> Node<'a> {
        Node {
            id,
            capacity: None,
            labels: &NO_LABELS,
            takes_new: true,
        }
    }
}

/// CPU (in thousandths of a core) and memory: what a node has, or a replica declares.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Capacity {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
}

impl Capacity {
    /// What one replica of `spec` declares (`[resources]`; nothing declared takes nothing).
    pub fn of(spec: &AppSpec) -> Capacity {
        Capacity {
            cpu_milli: spec
                .resources
                .cpu
                .map_or(0, |c| (c * 1000.0).round().max(0.0) as u64),
            memory_bytes: spec
                .resources
                .memory_bytes()
                .ok()
                .flatten()
                .map_or(0, |m| m.max(0) as u64),
        }
    }

    fn fits(&self, free: &Free) -> bool {
        (self.cpu_milli as i128) <= free.cpu && (self.memory_bytes as i128) <= free.memory
    }
}

impl std::fmt::Display for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} CPU and {}",
            self.cpu_milli as f64 / 1000.0,
            bytes(self.memory_bytes as i128)
        )
    }
}

/// `1.5 GiB`, `256 MiB`, `512 KiB`.
fn bytes(b: i128) -> String {
    let b = b.max(0) as f64;
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if b >= size as f64 {
            let v = b / size as f64;
            return if v.fract() == 0.0 {
                format!("{v} {unit}")
            } else {
                format!("{v:.1} {unit}")
            };
        }
    }
    format!("{b} B")
}

/// What is left on a node (may go below zero: running replicas stay even when a node is
/// over-committed).
#[derive(Debug, Clone, Copy)]
struct Free {
    cpu: i128,
    memory: i128,
}

impl Free {
    fn take(&mut self, c: Capacity) {
        self.cpu -= c.cpu_milli as i128;
        self.memory -= c.memory_bytes as i128;
    }
}

/// A replica some node reports running (from the `tasks/` records of its current run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running<'a> {
    pub app: &'a str,
    pub replica: u32,
    pub node: &'a str,
    /// When it started running (ms since the epoch).
    pub since_ms: u64,
    /// Whether it is ready for traffic.
    pub ready: bool,
    /// It holds data on its node (a volume): it stays there while the node lives, drained
    /// or not matching the constraints any more.
    pub pinned: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Placement {
    pub app: String,
    pub replica: u32,
    pub node: String,
}

/// A replica no node can take now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub app: String,
    pub replica: u32,
    pub reason: String,
}

/// Placements, sorted by (app, replica, node), and the replicas left unplaced.
#[derive(Debug, Default, PartialEq)]
pub struct Placed {
    pub placements: Vec<Placement>,
    pub unplaced: Vec<Unplaced>,
}

/// The first 8 bytes of a SHA-256 over length-prefixed parts: the same on every machine and
/// every build.
fn h64(parts: &[&[u8]]) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        ctx.update(&(part.len() as u32).to_be_bytes());
        ctx.update(part);
    }
    let d = ctx.finish();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b)
}

/// splitmix64's finalizer: a bijection that spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn replica_hash(app: &str, replica: u32) -> u64 {
    h64(&[app.as_bytes(), &replica.to_be_bytes()])
}

fn node_hash(node: &str) -> u64 {
    h64(&[node.as_bytes()])
}

/// The rendezvous weight of `node` for one replica.
pub(crate) fn rank(app: &str, replica: u32, node: &str) -> u64 {
    mix(replica_hash(app, replica) ^ node_hash(node))
}

/// Places every replica of every app on one of `nodes` (the live nodes that run containers
/// and are not drained). Two apps of one name: the first wins.
pub fn place(apps: &[App<'_>], nodes: &[Node<'_>], running: &[Running<'_>]) -> Placed {
    let mut nodes: Vec<Node> = nodes.to_vec();
    nodes.sort_by_key(|n| n.id);
    nodes.dedup_by_key(|n| n.id);
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    let hashes: Vec<u64> = nodes.iter().map(|n| node_hash(n.id)).collect();
    let mut free: Vec<Free> = nodes
        .iter()
        .map(|n| {
            let c = n.capacity.unwrap_or(Capacity {
                cpu_milli: u64::MAX,
                memory_bytes: u64::MAX,
            });
            Free {
                cpu: c.cpu_milli as i128,
                memory: c.memory_bytes as i128,
            }
        })
        .collect();
    let mut holders: HashMap<(&str, u32), Vec<&Running<'_>>> = HashMap::new();
    for r in running.iter().filter(|r| index.contains_key(r.node)) {
        holders.entry((r.app, r.replica)).or_default().push(r);
    }
    let mut seen = BTreeSet::new();
    let apps: Vec<&App> = apps.iter().filter(|a| seen.insert(a.name)).collect();
    let mut out = Placed::default();
    let eligible = |app: &App| -> Vec<bool> {
        let cs = app.spec.constraints();
        nodes
            .iter()
            .map(|n| cs.iter().all(|c| c.matches(n.labels)))
            .collect()
    };
    // `every-node` apps first: one replica on each eligible node that holds it or has room.
    for app in apps.iter().filter(|a| a.spec.every_node()) {
        let demand = Capacity::of(app.spec);
        for (i, ok) in eligible(app).into_iter().enumerate() {
            if !ok || !nodes[i].takes_new {
                continue;
            }
            let holds = holders
                .get(&(app.name, 0))
                .is_some_and(|rs| rs.iter().any(|r| r.node == nodes[i].id));
            if holds || demand.fits(&free[i]) {
                free[i].take(demand);
                out.placements.push(Placement {
                    app: app.name.to_string(),
                    replica: 0,
                    node: nodes[i].id.to_string(),
                });
            }
        }
    }
    let apps: Vec<&App> = apps.into_iter().filter(|a| !a.spec.every_node()).collect();
    // Running replicas stay (the best copy when several nodes run one): they take their room
    // before anything new is placed.
    let mut chosen: Vec<BTreeMap<u32, usize>> = vec![BTreeMap::new(); apps.len()];
    let mut eligibility: Vec<Vec<bool>> = Vec::with_capacity(apps.len());
    for (k, app) in apps.iter().enumerate() {
        let ok = eligible(app);
        let demand = Capacity::of(app.spec);
        for replica in 0..app.replicas {
            // Two nodes run it only while their views differed (or one has not yet said it
            // stopped): a ready copy wins over one that is not (a node cut off and back keeps
            // serving until the replacement made meanwhile is ready), then the later start,
            // the one that reacted to the newer view.
            let holder = holders.get(&(app.name, replica)).and_then(|rs| {
                rs.iter()
                    .filter(|r| r.pinned || (ok[index[r.node]] && nodes[index[r.node]].takes_new))
                    .max_by_key(|r| (r.ready, r.since_ms, rank(app.name, replica, r.node), r.node))
            });
            if let Some(r) = holder {
                let i = index[r.node];
                chosen[k].insert(replica, i);
                free[i].take(demand);
            }
        }
        eligibility.push(ok);
    }
    for (k, app) in apps.iter().enumerate() {
        place_new(
            app,
            &nodes,
            &hashes,
            &eligibility[k],
            &mut free,
            &mut chosen[k],
            &mut out,
        );
        out.placements
            .extend(chosen[k].iter().map(|(replica, i)| Placement {
                app: app.name.to_string(),
                replica: *replica,
                node: nodes[*i].id.to_string(),
            }));
    }
    out.placements.sort();
    out
}

/// Places one app's replicas that no node holds yet, in replica order.
fn place_new(
    app: &App,
    nodes: &[Node],
    hashes: &[u64],
    eligible: &[bool],
    free: &mut [Free],
    chosen: &mut BTreeMap<u32, usize>,
    out: &mut Placed,
) {
    let demand = Capacity::of(app.spec);
    // Each node's spread domain as a small number (nodes without the label share one).
    let mut names: HashMap<Option<&str>, usize> = HashMap::new();
    let domain: Vec<usize> = match app.spec.scale.spread.as_deref() {
        Some(label) => nodes
            .iter()
            .map(|n| {
                let next = names.len();
                *names
                    .entry(n.labels.get(label).map(String::as_str))
                    .or_insert(next)
            })
            .collect(),
        None => vec![0; nodes.len()],
    };
    let mut in_domain = vec![0u32; names.len().max(1)];
    let mut load = vec![0u32; nodes.len()];
    for i in chosen.values() {
        load[*i] += 1;
        in_domain[domain[*i]] += 1;
    }
    for replica in 0..app.replicas {
        if chosen.contains_key(&replica) {
            continue;
        }
        let h = replica_hash(app.name, replica);
        let mut best: Option<(u32, u32, u64, usize)> = None;
        for i in 0..nodes.len() {
            if !eligible[i] || !nodes[i].takes_new || !demand.fits(&free[i]) {
                continue;
            }
            // Fewest in the domain, fewest on the node, then the highest rank.
            let key = (
                in_domain[domain[i]],
                load[i],
                u64::MAX - mix(h ^ hashes[i]),
                i,
            );
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
        match best {
            Some((_, _, _, i)) => {
                chosen.insert(replica, i);
                free[i].take(demand);
                load[i] += 1;
                in_domain[domain[i]] += 1;
            }
            None => out.unplaced.push(Unplaced {
                app: app.name.to_string(),
                replica,
                reason: why_unplaced(app, demand, nodes, eligible, free),
            }),
        }
    }
}

/// Why nothing could take a replica: no node, no node matching the constraints, or no room.
fn why_unplaced(
    app: &App,
    demand: Capacity,
    nodes: &[Node],
    eligible: &[bool],
    free: &[Free],
) -> String {
    if nodes.is_empty() {
        return "no live node runs containers".into();
    }
    let roomiest = (0..nodes.len()).filter(|i| eligible[*i]).max_by_key(|i| {
        (
            free[*i].memory,
            free[*i].cpu,
            std::cmp::Reverse(nodes[*i].id),
        )
    });
    let Some(i) = roomiest else {
        return format!(
            "no live node matches its constraints ({})",
            app.spec.scale.constraints.join(", ")
        );
    };
    let f = &free[i];
    format!(
        "needs {demand}, the largest free is {} CPU and {} on {}",
        f.cpu.max(0) as f64 / 1000.0,
        bytes(f.memory),
        nodes[i].id
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(replicas: u32) -> AppSpec {
        AppSpec::parse(&format!("name = \"a\"\n[scale]\nreplicas = {replicas}")).unwrap()
    }

    /// Placements over nodes with no labels and unknown capacity.
    fn pl(apps: &[App], ids: &[&str], running: &[Running]) -> Vec<Placement> {
        let nodes: Vec<Node> = ids.iter().map(|i| Node::bare(i)).collect();
        place(apps, &nodes, running).placements
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
            replicas: s.replicas(),
        }];
        let p = pl(&apps, &["n1", "n2", "n3"], &[]);
        assert_eq!(p.len(), 3);
        for n in ["n1", "n2", "n3"] {
            assert_eq!(on(&p, n), 1, "{p:?}");
        }
        let p = pl(&apps, &["n1", "n2"], &[]);
        assert_eq!(p.len(), 3);
        assert!(on(&p, "n1") >= 1 && on(&p, "n2") >= 1, "{p:?}");
        assert!(pl(&apps, &[], &[]).is_empty());
    }

    #[test]
    fn every_node_runs_one_replica_per_node() {
        let s = AppSpec::parse("name = \"a\"\n[scale]\nplacement = \"every-node\"").unwrap();
        let p = pl(
            &[App {
                name: "agent",
                spec: &s,
                replicas: s.replicas(),
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
            replicas: s.replicas(),
        }];
        let fresh = pl(&apps, &["n1", "n2", "n3"], &[]);
        let other = ["n1", "n2", "n3"]
            .into_iter()
            .find(|n| *n != fresh[0].node)
            .unwrap();
        let running = [Running {
            app: "web",
            replica: 0,
            node: other,
            since_ms: 5,
            ready: true,
            pinned: false,
        }];
        assert_eq!(pl(&apps, &["n1", "n2", "n3"], &running)[0].node, other);
        // Running on a node that is no longer eligible does not count.
        let without: Vec<&str> = ["n1", "n2", "n3"]
            .into_iter()
            .filter(|n| *n != other)
            .collect();
        assert_ne!(pl(&apps, &without, &running)[0].node, other);
        // Reported by two nodes: the later start stays.
        let both = [
            running[0],
            Running {
                node: fresh[0].node.as_str(),
                since_ms: 9,
                ..running[0]
            },
        ];
        assert_eq!(pl(&apps, &["n1", "n2", "n3"], &both)[0].node, fresh[0].node);
        let both = [
            both[0],
            Running {
                since_ms: 1,
                ..both[1]
            },
        ];
        assert_eq!(pl(&apps, &["n1", "n2", "n3"], &both)[0].node, other);
        // A later start that is not ready yet does not displace a ready copy.
        let both = [
            both[0],
            Running {
                since_ms: 9,
                ready: false,
                ..both[1]
            },
        ];
        assert_eq!(pl(&apps, &["n1", "n2", "n3"], &both)[0].node, other);
    }

    fn labelled<'a>(id: &'a str, labels: &'a BTreeMap<String, String>, gib: u64) -> Node<'a> {
        Node {
            id,
            capacity: Some(Capacity {
                cpu_milli: 2000,
                memory_bytes: gib << 30,
            }),
            labels,
            takes_new: true,
        }
    }

    fn zone(z: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("zone".to_string(), z.to_string())])
    }

    #[test]
    fn replicas_fit_the_room_nodes_have() {
        let s = AppSpec::parse(
            "name = \"db\"\n[scale]\nreplicas = 3\n[resources]\nmemory = \"1Gi\"\ncpu = 1\n",
        )
        .unwrap();
        let apps = [App {
            name: "db",
            spec: &s,
            replicas: s.replicas(),
        }];
        let none = BTreeMap::new();
        let nodes = [labelled("big", &none, 2), labelled("small", &none, 1)];
        let p = place(&apps, &nodes, &[]);
        assert_eq!(on(&p.placements, "big"), 2, "{p:?}");
        assert_eq!(on(&p.placements, "small"), 1, "{p:?}");
        // A fourth does not fit anywhere, and says why.
        let s4 = AppSpec::parse(
            "name = \"db\"\n[scale]\nreplicas = 4\n[resources]\nmemory = \"1Gi\"\ncpu = 0.5\n",
        )
        .unwrap();
        let p = place(
            &[App {
                name: "db",
                spec: &s4,
                replicas: s4.replicas(),
            }],
            &nodes,
            &[],
        );
        assert_eq!(p.placements.len(), 3);
        assert_eq!(p.unplaced.len(), 1, "{p:?}");
        assert_eq!(
            p.unplaced[0].reason,
            "needs 0.5 CPU and 1 GiB, the largest free is 1.5 CPU and 0 B on small"
        );
        // Too big for any node.
        let huge = AppSpec::parse("name = \"huge\"\n[resources]\nmemory = \"2Gi\"\n").unwrap();
        let p = place(
            &[App {
                name: "huge",
                spec: &huge,
                replicas: huge.replicas(),
            }],
            &[nodes[1]],
            &[],
        );
        assert_eq!(
            p.unplaced[0].reason,
            "needs 0 CPU and 2 GiB, the largest free is 2 CPU and 1 GiB on small"
        );
        // Running replicas stay even when they over-commit, and leave no room.
        let running = [Running {
            app: "huge",
            replica: 0,
            node: "small",
            since_ms: 1,
            ready: true,
            pinned: false,
        }];
        let p = place(
            &[
                App {
                    name: "huge",
                    spec: &huge,
                    replicas: huge.replicas(),
                },
                App {
                    name: "db",
                    spec: &s,
                    replicas: s.replicas(),
                },
            ],
            &[nodes[1]],
            &running,
        );
        assert_eq!(p.placements.len(), 1, "{p:?}");
        assert_eq!(p.unplaced.len(), 3);
    }

    #[test]
    fn constraints_choose_nodes_and_spread_fills_every_zone_first() {
        let (a, b) = (zone("a"), zone("b"));
        let nodes = [
            labelled("a1", &a, 8),
            labelled("a2", &a, 8),
            labelled("a3", &a, 8),
            labelled("b1", &b, 8),
        ];
        let only_b =
            AppSpec::parse("name = \"x\"\n[scale]\nreplicas = 2\nconstraints = [\"zone=b\"]\n")
                .unwrap();
        let p = place(
            &[App {
                name: "x",
                spec: &only_b,
                replicas: only_b.replicas(),
            }],
            &nodes,
            &[],
        );
        assert_eq!(on(&p.placements, "b1"), 2, "{p:?}");
        let not_b =
            AppSpec::parse("name = \"x\"\n[scale]\nreplicas = 3\nconstraints = [\"zone!=b\"]\n")
                .unwrap();
        let p = place(
            &[App {
                name: "x",
                spec: &not_b,
                replicas: not_b.replicas(),
            }],
            &nodes,
            &[],
        );
        assert_eq!(on(&p.placements, "b1"), 0, "{p:?}");
        let nowhere =
            AppSpec::parse("name = \"x\"\n[scale]\nconstraints = [\"gpu\", \"zone=a\"]\n").unwrap();
        let p = place(
            &[App {
                name: "x",
                spec: &nowhere,
                replicas: nowhere.replicas(),
            }],
            &nodes,
            &[],
        );
        assert_eq!(
            p.unplaced[0].reason,
            "no live node matches its constraints (gpu, zone=a)"
        );
        // Without spread, four replicas go one per node; with it, zone b gets one of the
        // first two whatever the ranks say, and two of four.
        for n in 2..=4 {
            let spread = AppSpec::parse(&format!(
                "name = \"x\"\n[scale]\nreplicas = {n}\nspread = \"zone\"\n"
            ))
            .unwrap();
            let p = place(
                &[App {
                    name: "x",
                    spec: &spread,
                    replicas: spread.replicas(),
                }],
                &nodes,
                &[],
            );
            let in_b = on(&p.placements, "b1");
            assert_eq!(in_b, n / 2, "{n}: {p:?}");
        }
    }

    #[test]
    fn a_pinned_replica_stays_on_a_drained_node_others_move() {
        let s = spec(2);
        let apps = [App {
            name: "web",
            spec: &s,
            replicas: s.replicas(),
        }];
        let mut nodes: Vec<Node> = ["n1", "n2"].iter().map(|n| Node::bare(n)).collect();
        let running = |pinned| {
            [0, 1].map(|replica| Running {
                app: "web",
                replica,
                node: if replica == 0 { "n1" } else { "n2" },
                since_ms: 1,
                ready: true,
                pinned,
            })
        };
        nodes[0].takes_new = false;
        let moved = place(&apps, &nodes, &running(false)).placements;
        assert_eq!(on(&moved, "n2"), 2, "{moved:?}");
        let kept = place(&apps, &nodes, &running(true)).placements;
        assert_eq!((on(&kept, "n1"), on(&kept, "n2")), (1, 1), "{kept:?}");
    }

    proptest! {
        #[test]
        fn placement_is_deterministic_complete_and_balanced(
            replicas in 1u32..12,
            nodes in proptest::collection::btree_set("[a-z]{1,6}", 1..8),
        ) {
            let s = spec(replicas);
            let apps = [App { name: "web", spec: &s, replicas: s.replicas() }];
            let list: Vec<&str> = nodes.iter().map(|s| s.as_str()).collect();
            let mut reversed = list.clone();
            reversed.reverse();
            let p = pl(&apps, &list, &[]);
            prop_assert_eq!(&p, &pl(&apps, &reversed, &[]));
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
            let apps = [App { name: "web", spec: &s, replicas: s.replicas() }];
            let list: Vec<&str> = nodes.iter().map(|s| s.as_str()).collect();
            let before = pl(&apps, &list, &[]);
            let gone = list[gone % list.len()];
            let running: Vec<Running> = before
                .iter()
                .map(|p| Running { app: "web", replica: p.replica, node: &p.node, since_ms: 1, ready: true, pinned: false })
                .collect();
            let rest: Vec<&str> = list.iter().copied().filter(|n| *n != gone).collect();
            let after = pl(&apps, &rest, &running);
            for (b, a) in before.iter().zip(&after) {
                if b.node != gone {
                    prop_assert_eq!(b, a);
                }
            }
        }
    }
}
