//! Three nodes, each a network namespace with its own agent and its own Docker engine, so
//! a node's death takes its containers with it. One cluster goes through what apps that
//! stay up must survive: an image loaded on one node runs on all three; an image from a
//! registry behind a login runs on all three; an app too big for any node is pending with
//! the reason; a job completes once; a new version that is never ready rolls back on its
//! own while the old replicas answer every probe (every 50 ms, from outside the nodes);
//! a drained node empties while its replicas become ready elsewhere; a SIGKILLed node
//! (agent and engine) has its replicas ready elsewhere. The ingress of every node (port 80 of
//! its address) reaches an app that runs on one node only, and an app on every node reaches
//! it by `<app>.internal` from inside its containers. Under continuous load through a node
//! that runs no replica, a rolling update fails no request and a replica killed mid-load
//! fails at most what it had in flight.

use serde_json::Value;
use shoal_e2e::docker::*;
use shoal_e2e::load::Load;
use shoal_e2e::netns::Lan;
use shoal_e2e::registry::Registry;
use shoal_e2e::{busybox_image, get_at, Agent, AgentBuilder, BUSYBOX};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `web`: three replicas of httpd, ready once `/www/ready` exists; `ready` is the shell that
/// makes it (or never does).
fn web(image: &str, ready: &str, extra: &str) -> String {
    format!(
        r#"name = "web"
[source]
image = "{image}"
[run]
command = ["sh", "-c", "({ready}) & exec httpd -f -p 8080 -h /www"]
port = 8080
[health]
http = "/ready"
interval = "300ms"
[scale]
replicas = 3
[resources]
memory = "32Mi"
{extra}"#
    )
}

/// Waits until `app` has `n` ready replicas at `revision`, on the nodes `on` only, each node
/// holding at most `per_node`; the tasks.
fn ready_on(
    agents: &[&Agent],
    app: &str,
    revision: &str,
    n: usize,
    on: &[&str],
    per_node: usize,
) -> Vec<Value> {
    converge(
        agents,
        &format!("{n} ready replicas of {app} at {revision} on {on:?}"),
        || {
            // A dead node's records say what ran there when it was last heard of.
            let t: Vec<Value> = tasks(agents[0], app)
                .into_iter()
                .filter(|t| t["node_state"] != "dead")
                .collect();
            let mut count = std::collections::BTreeMap::new();
            for task in &t {
                *count
                    .entry(task["node"].as_str().unwrap_or("").to_string())
                    .or_insert(0) += 1;
            }
            let done = t.len() == n
                && count.values().all(|c| *c <= per_node)
                && t.iter().all(|t| {
                    t["version"] == revision
                        && t["ready"] == true
                        && t["state"] == "running"
                        && on.contains(&t["node"].as_str().unwrap_or(""))
                });
            done.then_some(t)
        },
    )
}

#[test]
fn three_nodes_on_their_own_engines_keep_apps_up() {
    shoal_e2e::netns::require_root();
    // Where the time goes, for a slow run.
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("{:>6.1} s  {what}", t0.elapsed().as_secs_f64());
    let lan = Lan::new(3);
    let root = tempfile::tempdir().unwrap();
    let bundle = shoal_e2e::bundle(&root.path().join("bundle"), "test");
    let cluster = shoal_e2e::cluster_id(&bundle);
    let mut engines: Vec<Engine> = (0..3u8)
        .map(|i| Engine::start_in(2 + i, &lan.hosts[i as usize]))
        .collect();
    for (i, e) in engines.iter().enumerate() {
        lan.route(&e.pool, i);
    }
    let peers: Vec<String> = lan.hosts.iter().map(|h| format!("{}:7443", h.ip)).collect();
    let mut nodes: Vec<Agent> = (0..3)
        .map(|i| {
            AgentBuilder::new(root.path(), &format!("n{}", i + 1))
                .bundle(&bundle)
                .peer_addrs(&peers)
                .in_netns(&lan.hosts[i])
                .extra(&engines[i].agent_settings())
                // Records of a node not heard from for 10 s are collected (24 h by default).
                .extra("[sync]\ndeparted_ms = 10000\ngc_interval_ms = 500\n")
                // n1 is the front door of the load phase: no replica of `steady` there.
                .extra(if i == 0 {
                    "labels = { front = \"yes\" }\n"
                } else {
                    ""
                })
                .build()
        })
        .collect();
    for a in &mut nodes {
        a.spawn();
    }
    let all: Vec<&Agent> = nodes.iter().collect();
    converge(&all, "three members and their records", || {
        all.iter()
            .all(|a| a.alive_members() == 2 && a.list("/v1/nodes").len() == 3)
            .then_some(())
    });
    let n1 = &nodes[0];

    phase("image loaded on n1");
    // An image loaded on one node runs on all three.
    let tar = std::fs::read(busybox_image()).unwrap();
    let r = write(n1, "POST", "/v1/images", &tar);
    assert_eq!(r.status, 200, "{}", r.text());
    let id = engines[0].image_id(BUSYBOX).expect("loaded on n1's engine");
    assert!(engines[1].image_id(&id).is_none() && engines[2].image_id(&id).is_none());
    let v1 = put_app(n1, "web", &web(BUSYBOX, "touch /www/ready", ""));
    let first = ready_on(&all, "web", &v1, 3, &["n1", "n2", "n3"], 1);
    for e in &engines {
        assert_eq!(e.image_id(&id).as_deref(), Some(id.as_str()));
        assert_eq!(e.containers(&cluster, "web", false).len(), 1);
    }

    phase("ingress");
    // The ingress of every node: `solo` runs on one node only, `caller` on each, and asks
    // for `solo.internal` from inside its container: through every node's ingress (port 80
    // of its address), caller answers with what solo said, whichever node took it, locally
    // or through the hop to solo's node.
    put_app(
        n1,
        "solo",
        &format!(
            "name = \"solo\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"sh\", \"-c\", \"mkdir -p /www && echo solo here > /www/index.html && exec httpd -f -p 8080 -h /www\"]\nport = 8080\n[resources]\nmemory = \"16Mi\"\n"
        ),
    );
    put_app(
        n1,
        "caller",
        &format!(
            "name = \"caller\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"sh\", \"-c\", \"mkdir -p /www/cgi-bin && printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\nwget -q -O - http://solo.internal/ 2>&1\\n' > /www/cgi-bin/call && chmod +x /www/cgi-bin/call && exec httpd -f -p 8080 -h /www\"]\nport = 8080\n[scale]\nplacement = \"every-node\"\n[resources]\nmemory = \"16Mi\"\n"
        ),
    );
    for (i, h) in lan.hosts.iter().enumerate() {
        let addr = format!("{}:80", h.ip);
        converge(&all, &format!("solo through n{}'s ingress", i + 1), || {
            let r = shoal_e2e::load::get_from(&addr, "solo.localhost", "/");
            (r == (200, "solo here\n".to_string())).then_some(())
        });
        converge(
            &all,
            &format!("caller on n{} reaching solo by name", i + 1),
            || {
                let r = shoal_e2e::load::get_from(&addr, "caller.localhost", "/cgi-bin/call");
                (r == (200, "solo here\n".to_string())).then_some(())
            },
        );
    }

    phase("load");
    // Continuous load through n1's ingress, whose node runs no replica of `steady`: every
    // request goes on to n2 or n3 over the hop. A rolling update fails none of them, and a
    // replica killed mid-load fails at most what it had in flight.
    const CLIENTS: usize = 4;
    let steady = |version: &str| {
        shoal_e2e::load::slow_app(
            "steady",
            version,
            2,
            "constraints = [\"!front\"]\n[resources]\nmemory = \"16Mi\"\n",
        )
    };
    let ready_versions = || -> Vec<String> {
        tasks(n1, "steady")
            .iter()
            .filter(|t| t["ready"] == true && t["node"] != "n1")
            .map(|t| t["version"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let steady_containers = |all_states: bool| -> Vec<String> {
        engines
            .iter()
            .flat_map(|e| e.containers(&cluster, "steady", all_states))
            .collect()
    };
    put_app(n1, "steady", &steady("1"));
    converge(&all, "two replicas of steady v1 ready", || {
        (ready_versions().len() == 2).then_some(())
    });
    let front = format!("{}:80", lan.hosts[0].ip);
    converge(&all, "steady through n1's ingress", || {
        (shoal_e2e::load::get_from(&front, "steady.localhost", "/cgi-bin/slow")
            == (200, "v=1\n".to_string()))
            .then_some(())
    });
    let load = Load::start_at(&front, "steady.localhost", "/cgi-bin/slow", CLIENTS, 0);
    converge(&all, "some load through v1", || {
        (load.ok() > 10).then_some(())
    });
    let old = ready_versions()[0].clone();
    put_app(n1, "steady", &steady("2"));
    converge(
        &all,
        "steady v2 rolled out and v1's containers gone",
        || {
            let v = ready_versions();
            (v.len() == 2 && v.iter().all(|x| *x != old) && steady_containers(true).len() == 2)
                .then_some(())
        },
    );
    let before = load.ok();
    converge(&all, "more load through v2", || {
        (load.ok() > before + 10).then_some(())
    });
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} of {ok} failed during the rolling update across nodes: {failed:?}",
        failed.len()
    );
    assert_eq!(
        shoal_e2e::load::get_from(&front, "steady.localhost", "/cgi-bin/slow").1,
        "v=2\n"
    );
    let load = Load::start_at(&front, "steady.localhost", "/cgi-bin/slow", CLIENTS, 0);
    converge(&all, "some load on two replicas", || {
        (load.ok() > 10).then_some(())
    });
    let (engine, victim) = engines
        .iter()
        .find_map(|e| {
            e.containers(&cluster, "steady", false)
                .first()
                .cloned()
                .map(|c| (e, c))
        })
        .expect("a replica of steady");
    engine.docker(&["kill", &victim]);
    converge(&all, "the killed replica replaced and ready", || {
        let c = steady_containers(false);
        (c.len() == 2 && !c.contains(&victim) && ready_versions().len() == 2).then_some(())
    });
    let before = load.ok();
    converge(&all, "more load after the replacement", || {
        (load.ok() > before + 10).then_some(())
    });
    let (ok, failed) = load.finish();
    assert!(
        failed.len() <= CLIENTS,
        "{} of {ok} failed, more than the {CLIENTS} the killed replica can have had in flight: {failed:?}",
        failed.len()
    );
    eprintln!(
        "killed mid-load across nodes: {} of {} failed",
        failed.len(),
        ok + failed.len() as u64
    );
    n1.delete_app("steady").unwrap();

    phase("too big");
    // Too big for any node: pending with the reason, nothing started anywhere.
    put_app(
        n1,
        "huge",
        &format!(
            "name = \"huge\"\n[source]\nimage = \"{BUSYBOX}\"\n[resources]\nmemory = \"1000Gi\"\n"
        ),
    );
    let s = converge(&all, "huge pending", || {
        let s = app_status(n1, "huge");
        (s["state"] == "pending").then_some(s)
    });
    let msg = s["message"].as_str().unwrap();
    assert!(
        msg.contains("needs 0 CPU and 1000 GiB, the largest free is"),
        "{msg}"
    );
    assert!(tasks(n1, "huge").is_empty());

    phase("job");
    // A job runs to completion once, on one of the three.
    put_app(
        n1,
        "once",
        &format!("name = \"once\"\nkind = \"job\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"sh\", \"-c\", \"echo ran\"]\n[resources]\nmemory = \"16Mi\"\n"),
    );
    converge(&all, "the job completed", || {
        let t = tasks(n1, "once");
        (t.len() == 1 && t[0]["state"] == "completed" && t[0]["exit_code"] == 0).then_some(())
    });
    let job_runs = |nodes: &[Agent]| -> usize {
        nodes
            .iter()
            .map(|a| a.log().matches("job completed").count())
            .sum()
    };
    assert_eq!(job_runs(&nodes), 1);

    phase("registry");
    // From a registry behind a login, pushed through n1's engine and removed there: every
    // node pulls it with the login in the app's secret.
    let login = ("e2e", "s3cret-pw");
    let registry = Registry::start(&lan.gateway(), Some(login));
    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM {BUSYBOX}\nLABEL e2e=private\n"),
    )
    .unwrap();
    engines[0].docker(&[
        "build",
        "-q",
        "-t",
        "e2e/private:1",
        context.path().to_str().unwrap(),
    ]);
    let via = engines[0].host_args();
    let private = registry.push(&via, "e2e/private:1", "e2e/private:1", Some(login));
    engines[0].docker(&["rmi", "e2e/private:1"]);
    let r = write(
        n1,
        "PUT",
        "/v1/apps/priv/secrets/REGISTRY_LOGIN",
        b"e2e:s3cret-pw",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let spec = format!(
        "name = \"priv\"\n[source]\nimage = \"{private}\"\ncredentials = \"REGISTRY_LOGIN\"\n[run]\ncommand = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nport = 8080\n[scale]\nreplicas = 3\n[resources]\nmemory = \"16Mi\"\n"
    );
    let r = n1.put_app("priv", &spec).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()["image"]
            .as_str()
            .unwrap_or("")
            .contains("@sha256:"),
        "pinned to the registry's digest: {}",
        r.text()
    );
    converge(&all, "priv running on all three", || {
        let t = tasks(n1, "priv");
        let nodes: BTreeSet<&str> = t.iter().filter_map(|t| t["node"].as_str()).collect();
        (t.len() == 3 && nodes.len() == 3 && t.iter().all(|t| t["state"] == "running"))
            .then_some(())
    });
    // Each node pulled it, or fetched it from a peer that had.
    assert!(all.iter().any(|a| a.log().contains("image pulled")));
    for a in &all {
        assert!(!a.log().contains("s3cret-pw"));
    }

    phase("rollback");
    // A version that is never ready rolls back on its own; the old replicas, probed every
    // 50 ms from outside their nodes, never miss an answer.
    let ips: Vec<String> = first
        .iter()
        .map(|t| t["ip"].as_str().unwrap().to_string())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        let ips = ips.clone();
        std::thread::spawn(move || {
            let (mut asked, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                for ip in &ips {
                    asked += 1;
                    match get_at(ip, 8080, "/ready") {
                        Ok(r) if r.status == 200 => {}
                        other => failed.push(format!("{ip}: {:?}", other.map(|r| r.status))),
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (asked, failed)
        })
    };
    let v2 = put_app(
        n1,
        "web",
        &web(BUSYBOX, "true", "[update]\ndeadline = \"4s\"\n"),
    );
    let s = converge(&all, "v2 rolled back", || {
        let s = app_status(n1, "web");
        (s["latest"] == v2.as_str() && s["revision"] == v1.as_str() && s["state"] == "running")
            .then_some(s)
    });
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("not ready within 4s"),
        "{s}"
    );
    let back = ready_on(&all, "web", &v1, 3, &["n1", "n2", "n3"], 1);
    stop.store(true, Ordering::Relaxed);
    let (asked, failed) = prober.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {asked} probes failed: {failed:?}\nprobed: {ips:?}\nengines:\n{}",
        failed.len(),
        engines
            .iter()
            .map(|e| e.docker(&["ps", "-a", "--format", "{{.Names}} {{.Status}} {{.Networks}}"])
                + &e.docker(&["network", "ls", "--format", "{{.Name}} {{.Labels}}"]))
            .collect::<Vec<_>>()
            .join("\n")
            // Routes: a leftover bridge on the pool's addresses would shadow the node's.
            + &shoal_e2e::run(std::process::Command::new("ip").arg("route"))
    );
    assert!(asked >= 3 * 20, "only {asked} probes");
    let containers_of = |t: &[Value]| -> BTreeSet<String> {
        t.iter()
            .map(|t| t["container"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        containers_of(&back),
        containers_of(&first),
        "v1's replicas were replaced"
    );

    phase("drain");
    // Drain n2: its replicas become ready on n1 and n3 before it empties.
    let r = write(n1, "POST", "/v1/nodes/n2/drain", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    ready_on(&all, "web", &v1, 3, &["n1", "n3"], 2);
    converge(&all, "n2 drained and empty", || {
        let drained = n1
            .list("/v1/nodes")
            .iter()
            .any(|n| n["id"] == "n2" && n["drain"]["state"] == "drained");
        (drained
            && engines[1].containers(&cluster, "web", true).is_empty()
            && engines[1].containers(&cluster, "priv", true).is_empty())
        .then_some(())
    });
    let r = write(n1, "POST", "/v1/nodes/n2/uncordon", b"");
    assert_eq!(r.status, 200, "{}", r.text());

    phase("kill n3");
    // SIGKILL n3, agent and engine: its replicas become ready on n1 and n2.
    let on_n3 = engines[2].containers(&cluster, "web", false);
    assert!(!on_n3.is_empty(), "n3 runs web after the drain of n2");
    nodes[2].kill9();
    engines[2].kill9();
    let n1 = &nodes[0];
    let survivors: Vec<&Agent> = nodes[..2].iter().collect();
    ready_on(&survivors, "web", &v1, 3, &["n1", "n2"], 2);
    converge(&survivors, "priv running on n1 and n2", || {
        let t: Vec<Value> = tasks(n1, "priv")
            .into_iter()
            .filter(|t| t["node"] != "n3")
            .collect();
        (t.len() == 3 && t.iter().all(|t| t["state"] == "running")).then_some(())
    });

    phase("collection");
    // n3's task and image records are collected on both survivors once it has been gone
    // for the horizon; its node record stays (dead), and the survivors' records, written
    // again every quarter of the horizon, never go.
    converge(&survivors, "n3's records collected", || {
        survivors
            .iter()
            .all(|a| {
                let from_n3 = a
                    .list("/v1/tasks")
                    .iter()
                    .filter(|t| t["node"] == "n3")
                    .count();
                let n3 = a.list("/v1/nodes").into_iter().find(|n| n["id"] == "n3");
                from_n3 == 0
                    && n3.is_some_and(|n| n["images"].as_array().is_none_or(|i| i.is_empty()))
            })
            .then_some(())
    });
    for a in &survivors {
        for app in ["web", "priv"] {
            assert_eq!(
                tasks(a, app).len(),
                3,
                "{} lost live records of {app}",
                a.id
            );
        }
    }

    phase("end");
    // The job never ran again, and the big app never started.
    assert_eq!(job_runs(&nodes), 1);
    assert!(tasks(&nodes[0], "huge").is_empty());
}
