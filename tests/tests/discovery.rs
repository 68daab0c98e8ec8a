//! Discovery on a virtual LAN of network namespaces with real multicast: agents holding only
//! the bundle (no peer list) find each other over mDNS and converge; python-zeroconf (a second,
//! independent mDNS stack) sees what they advertise; a node of another cluster is never
//! admitted; a partitioned host comes back and everyone converges.

use shoal_e2e::netns::Lan;
use shoal_e2e::{bundle, metric, wait_for, Agent};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn spec(name: &str) -> String {
    format!("name = \"{name}\"\n[source]\nimage = \"busybox\"\n")
}

/// Browses `_shoal._tcp.local.` with python-zeroconf in namespace `ns` for `secs` seconds;
/// instance name -> TXT properties.
fn zeroconf_browse(ns: &str, secs: u32) -> BTreeMap<String, BTreeMap<String, String>> {
    let script = format!(
        r#"
import json, time
from zeroconf import Zeroconf, ServiceBrowser, ServiceListener
found = {{}}
class L(ServiceListener):
    def add_service(self, zc, t, name):
        info = zc.get_service_info(t, name, 3000)
        if info:
            found[name] = {{k.decode(): (v or b"").decode() for k, v in info.properties.items()}}
    update_service = add_service
    def remove_service(self, zc, t, name):
        pass
zc = Zeroconf()
ServiceBrowser(zc, "_shoal._tcp.local.", L())
time.sleep({secs})
zc.close()
print(json.dumps(found))
"#
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "/usr/bin/python3", "-c", &script])
        .output()
        .expect("running python3 (python3-zeroconf)");
    assert!(
        out.status.success(),
        "zeroconf browse failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[test]
fn namespaces_discover_each_other_over_mdns_and_never_admit_another_cluster() {
    let lan = Lan::new(5); // three members, one of another cluster, one observer
    let root = tempfile::tempdir().unwrap();
    let ours = bundle(&root.path().join("bundle"), "lan");
    let theirs = bundle(&root.path().join("other"), "other");
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| {
            Agent::configure_in(
                &lan.hosts[i],
                root.path(),
                &format!("m{}", i + 1),
                &ours,
                &[],
            )
        })
        .collect();
    // The stranger also dials m1 directly: its TLS is refused in both directions.
    let m1 = format!("{}:7443", lan.hosts[0].ip);
    let mut stranger = Agent::configure_in(&lan.hosts[3], root.path(), "stranger", &theirs, &[m1]);
    for a in agents.iter_mut() {
        a.spawn_detached();
    }
    stranger.spawn_detached();
    for a in agents.iter().chain([&stranger]) {
        wait_for(T, "the agent's /healthz", || {
            a.get("/healthz").ok().filter(|r| r.status == 200)
        });
    }

    wait_for(T, "three members that see each other", || {
        agents
            .iter()
            .all(|a| {
                let mut ids = a.alive_ids();
                ids.sort();
                let mut want: Vec<String> =
                    ["m1", "m2", "m3"].iter().map(|s| s.to_string()).collect();
                want.retain(|w| *w != a.id);
                ids == want
            })
            .then_some(())
    });
    assert_eq!(
        agents[0].put_app("hello", &spec("hello")).unwrap().status,
        200
    );
    wait_for(T, "the write on every member", || {
        agents
            .iter()
            .all(|a| a.apps() == vec!["hello".to_string()])
            .then_some(())
    });

    // A second mDNS stack agrees: it lists all three members (and the stranger) with their
    // TXT records, and the records never carry the cluster id.
    let cluster_id = std::fs::read_to_string(ours.join("cluster.json")).unwrap();
    let cluster_id: serde_json::Value = serde_json::from_str(&cluster_id).unwrap();
    let cluster_id = cluster_id["id"].as_str().unwrap().to_string();
    let seen = wait_for(T, "python-zeroconf to list every node", || {
        let s = zeroconf_browse(&lan.hosts[4].ns, 4);
        (s.len() >= 4).then_some(s)
    });
    let txt = |id: &str| {
        seen.iter()
            .find(|(name, _)| name.starts_with(&format!("{id}.")))
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("zeroconf did not see {id}: {seen:?}"))
    };
    let hash = txt("m1")["c"].clone();
    assert_eq!(hash.len(), 16);
    for id in ["m1", "m2", "m3"] {
        let t = txt(id);
        assert_eq!(t["c"], hash);
        assert_eq!(t["id"], id);
        assert_eq!(t["api"], "7443");
        assert!(!t.values().any(|v| v.contains(&cluster_id)), "{t:?}");
    }
    assert_ne!(txt("stranger")["c"], hash);
    assert_eq!(agents[0].status()["cluster"]["hash"], hash.as_str());

    // The stranger is never admitted; every member logged and counted it.
    for a in &agents {
        assert!(!a.alive_ids().contains(&"stranger".to_string()));
        wait_for(T, "the foreign node to be counted", || {
            (metric(&a.metrics(), "shoal_discovery_foreign_nodes_total").unwrap_or(0.0) >= 1.0)
                .then_some(())
        });
        assert!(a
            .log()
            .contains("mDNS: not admitting a node that advertises another cluster"));
    }
    assert!(stranger.alive_ids().is_empty());
    let m1_refusals: f64 = agents[0]
        .metrics()
        .lines()
        .filter(|l| l.starts_with("shoal_peer_tls_refused_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        m1_refusals >= 1.0,
        "m1 did not count the stranger's TLS attempt"
    );
    assert!(stranger.is_running());
}

#[test]
fn a_partitioned_namespace_comes_back_and_everyone_converges() {
    let lan = Lan::new(3);
    let root = tempfile::tempdir().unwrap();
    let ours = bundle(&root.path().join("bundle"), "lan");
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| {
            Agent::configure_in(
                &lan.hosts[i],
                root.path(),
                &format!("p{}", i + 1),
                &ours,
                &[],
            )
        })
        .collect();
    for a in agents.iter_mut() {
        a.spawn_detached();
    }
    wait_for(T, "a three-member cluster", || {
        agents
            .iter()
            .all(|a| a.alive_ids().len() == 2)
            .then_some(())
    });

    lan.partition(2);
    wait_for(T, "both sides to see the split", || {
        (!agents[0].alive_ids().contains(&"p3".to_string())
            && !agents[1].alive_ids().contains(&"p3".to_string())
            && agents[2].alive_ids().is_empty())
        .then_some(())
    });
    // Writes on both sides of the partition.
    assert_eq!(
        agents[0].put_app("left", &spec("left")).unwrap().status,
        200
    );
    assert_eq!(
        agents[2].put_app("right", &spec("right")).unwrap().status,
        200
    );
    assert_eq!(agents[1].apps(), vec!["left".to_string()]);
    assert_eq!(agents[2].apps(), vec!["right".to_string()]);

    lan.heal(2);
    wait_for(
        T,
        "membership to recover and every write to be everywhere",
        || {
            agents
                .iter()
                .all(|a| {
                    a.alive_ids().len() == 2
                        && a.apps() == vec!["left".to_string(), "right".to_string()]
                })
                .then_some(())
        },
    );
}

#[test]
fn a_node_with_only_the_join_secret_finds_a_member_over_mdns_and_joins() {
    let lan = Lan::new(2);
    let root = tempfile::tempdir().unwrap();
    let ours = bundle(&root.path().join("bundle"), "lan");
    let only_secret = root.path().join("join-only");
    std::fs::create_dir_all(&only_secret).unwrap();
    std::fs::copy(ours.join("join.secret"), only_secret.join("join.secret")).unwrap();
    let mut seed = Agent::configure_in(&lan.hosts[0], root.path(), "seed", &ours, &[]);
    let mut joiner = Agent::configure_in(&lan.hosts[1], root.path(), "joiner", &only_secret, &[]);
    seed.spawn();
    joiner.spawn();
    wait_for(T, "seed and joiner to see each other", || {
        (seed.alive_ids() == vec!["joiner".to_string()]
            && joiner.alive_ids() == vec!["seed".to_string()])
        .then_some(())
    });
    assert!(joiner
        .log()
        .contains("joined: certificate signed by a member"));
}
