//! Zero downtime through the ingress, against the host's real dockerd: under continuous load
//! of slow requests (each takes 300 ms in the app), a rolling update and a scale-down fail no
//! request (a leaving replica is taken out of the routes and stopped only once the requests
//! in flight to it are answered), and a replica killed mid-load fails at most the requests
//! it had in flight.

use shoal_e2e::docker::*;
use shoal_e2e::load::{get, Load};
use shoal_e2e::Agent;

const CLIENTS: usize = 4;

fn spec(version: &str, replicas: u32) -> String {
    shoal_e2e::load::slow_app("steady", version, replicas, "")
}

fn versions(a: &Agent) -> Vec<String> {
    tasks(a, "steady")
        .iter()
        .filter(|t| t["ready"] == true)
        .map(|t| t["version"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn a_rolling_update_a_scale_down_and_a_killed_replica_under_load_lose_no_request_but_its_own() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let a = one_node(root.path(), "");
    let cluster = a.cluster_id();
    deploy(&a, "steady", &spec("1", 2));
    converge(&[&a], "two replicas of v1 ready", || {
        (versions(&a).len() == 2).then_some(())
    });
    assert_eq!(
        get(a.http_port, "steady.localhost", "/cgi-bin/slow").1,
        "v=1\n"
    );

    // A rolling update under load: every request answered, by v1 then v2.
    let load = Load::start(a.http_port, "steady.localhost", "/cgi-bin/slow", CLIENTS, 0);
    converge(&[&a], "some load through v1", || {
        (load.ok() > 10).then_some(())
    });
    let first = versions(&a)[0].clone();
    deploy(&a, "steady", &spec("2", 2));
    converge(&[&a], "v2 rolled out and v1's containers gone", || {
        let v = versions(&a);
        (v.len() == 2
            && v.iter().all(|x| *x != first)
            && containers(&cluster, "steady", true).len() == 2)
            .then_some(())
    });
    let before = load.ok();
    converge(&[&a], "more load through v2", || {
        (load.ok() > before + 10).then_some(())
    });
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} of {ok} failed during the rollout: {failed:?}",
        failed.len()
    );
    assert_eq!(
        get(a.http_port, "steady.localhost", "/cgi-bin/slow").1,
        "v=2\n"
    );

    // A scale-down under load: the replica that goes finishes what it has.
    let load = Load::start(a.http_port, "steady.localhost", "/cgi-bin/slow", CLIENTS, 0);
    converge(&[&a], "some load on two replicas", || {
        (load.ok() > 10).then_some(())
    });
    deploy(&a, "steady", &spec("2", 1));
    converge(&[&a], "one replica left", || {
        (containers(&cluster, "steady", true).len() == 1 && tasks(&a, "steady").len() == 1)
            .then_some(())
    });
    let before = load.ok();
    converge(&[&a], "more load on one replica", || {
        (load.ok() > before + 5).then_some(())
    });
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} of {ok} failed during the scale-down: {failed:?}",
        failed.len()
    );

    // A replica killed mid-load: only what it had in flight may fail (one request a client
    // at most), the rest goes to the other replica and then to its replacement.
    deploy(&a, "steady", &spec("2", 2));
    converge(&[&a], "two replicas again", || {
        (versions(&a).len() == 2).then_some(())
    });
    let load = Load::start(a.http_port, "steady.localhost", "/cgi-bin/slow", CLIENTS, 0);
    converge(&[&a], "some load on two replicas", || {
        (load.ok() > 10).then_some(())
    });
    let victim = containers(&cluster, "steady", false)[0].clone();
    docker(&["kill", &victim]);
    converge(&[&a], "the killed replica replaced and ready", || {
        let c = containers(&cluster, "steady", false);
        (c.len() == 2 && !c.contains(&victim) && versions(&a).len() == 2).then_some(())
    });
    let before = load.ok();
    converge(&[&a], "more load after the replacement", || {
        (load.ok() > before + 10).then_some(())
    });
    let (ok, failed) = load.finish();
    assert!(
        failed.len() <= CLIENTS,
        "{} of {ok} failed, more than the {CLIENTS} the killed replica can have had in flight: {failed:?}",
        failed.len()
    );
    eprintln!(
        "killed mid-load: {} of {} failed",
        failed.len(),
        ok + failed.len() as u64
    );
}
