//! Apps that stay up, against the host's real dockerd: health probes decide ready, unready
//! and restart; a new revision rolls out one replica at a time and never leaves fewer ready
//! replicas than asked for; a revision that crashes or is never ready is rolled back
//! automatically, leaving the previous revision's containers untouched; the history and the
//! rollback endpoint.

use serde_json::Value;
use shoal_e2e::docker::*;
use shoal_e2e::{busybox_image, get_at, Agent, BUSYBOX};
use std::collections::BTreeSet;

/// `web`, three replicas, ready once `/www/ready` exists: `ready` is the shell that makes it
/// (after a while, or never).
fn web(greeting: &str, ready: &str, extra: &str) -> String {
    format!(
        r#"name = "web"
[source]
image = "{BUSYBOX}"
[run]
command = ["sh", "-c", "echo {greeting} > /www/greeting; ({ready}) & exec httpd -f -p 8080 -h /www"]
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

fn start() -> (tempfile::TempDir, Cleanup, Agent) {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let cleanup = Cleanup::for_agents_in(root.path());
    let a = Agent::start(
        root.path(),
        "n1",
        &[],
        "[docker]\nenabled = true\nreconcile_ms = 300\n",
    );
    let tar = std::fs::read(busybox_image()).unwrap();
    let r = write(&a, "POST", "/v1/images", &tar);
    assert_eq!(r.status, 200, "{}", r.text());
    (root, cleanup, a)
}

/// Waits until every replica of `app` runs `revision`, ready; their containers.
fn all_ready(a: &Agent, app: &str, revision: &str, n: usize) -> BTreeSet<String> {
    converge(
        &[a],
        &format!("{n} ready replicas of {app} at {revision}"),
        || {
            let t = tasks(a, app);
            let done = t.len() == n
                && t.iter().all(|t| {
                    t["version"] == revision && t["ready"] == true && t["state"] == "running"
                });
            done.then(|| {
                t.iter()
                    .map(|t| t["container"].as_str().unwrap().to_string())
                    .collect()
            })
        },
    )
}

/// The running containers of `app` and whether each answers its readiness path now, as one
/// consistent sample: `None` when the set of containers changed while they were asked (under
/// load a rollout step can start a replacement after the listing and remove the replica it
/// replaces before that one is asked, which no ordering of a single listing accounts for).
/// A replica being stopped after its replacement got ready is in a consistent sample with
/// that replacement.
fn serving(cluster: &str, app: &str) -> Option<Vec<(String, bool)>> {
    let before = containers(cluster, app, false);
    let asked: Vec<(String, bool)> = before
        .iter()
        .map(|id| {
            let out = std::process::Command::new("docker")
                .args([
                    "inspect",
                    "-f",
                    "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                    id,
                ])
                .output()
                .unwrap();
            let ip = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let ok = !ip.is_empty() && get_at(&ip, 8080, "/ready").is_ok_and(|r| r.status == 200);
            (id.clone(), ok)
        })
        .collect();
    (containers(cluster, app, false) == before).then_some(asked)
}

#[test]
fn a_new_revision_rolls_out_one_replica_at_a_time_and_a_bad_one_rolls_back() {
    let (_root, cleanup, a) = start();
    let cluster = cleanup.0.clone();
    let v1 = put_app(&a, "web", &web("one", "touch /www/ready", ""));
    let first = all_ready(&a, "web", &v1, 3);
    converge(&[&a], "web running", || {
        (app_status(&a, "web")["state"] == "running").then_some(())
    });

    // v2 takes a second to be ready: while it rolls out, never more than one replica beyond
    // three runs, and never fewer than three answer.
    let v2 = put_app(&a, "web", &web("two", "sleep 1; touch /www/ready", ""));
    assert_ne!(v1, v2);
    let mut states = BTreeSet::new();
    let second = converge(&[&a], "v2 rolled out", || {
        let s = serving(&cluster, "web")?;
        assert!(s.len() <= 4, "more than replicas + surge: {s:?}");
        let up = s.iter().filter(|(_, ok)| *ok).count();
        assert!(up >= 3, "fewer than three replicas answer: {s:?}");
        states.insert(
            app_status(&a, "web")["state"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
        let t = tasks(&a, "web");
        let done = s.len() == 3
            && t.len() == 3
            && t.iter().all(|t| t["version"] == v2 && t["ready"] == true);
        done.then(|| s.into_iter().map(|(id, _)| id).collect::<BTreeSet<_>>())
    });
    assert!(states.contains("deploying"), "{states:?}");
    assert!(first.is_disjoint(&second));
    let page = get_at(
        tasks(&a, "web")[0]["ip"].as_str().unwrap(),
        8080,
        "/greeting",
    )
    .unwrap();
    assert_eq!(page.text(), "two\n");
    converge(&[&a], "web running at v2", || {
        let s = app_status(&a, "web");
        (s["state"] == "running" && s["revision"] == v2.as_str()).then_some(())
    });

    // v3 crashes at once: the rollout fails on its first replica, v2 is restored, and v2's
    // containers were never touched.
    let v3 = put_app(
        &a,
        "web",
        &web("three", "exit 0", "").replace("exec httpd", "exit 3; httpd"),
    );
    let s = converge(&[&a], "v3 rolled back", || {
        let s = app_status(&a, "web");
        (s["state"] == "running" && s["revision"] == v2.as_str() && s["latest"] == v3.as_str())
            .then_some(s)
    });
    let msg = s["message"].as_str().unwrap();
    assert!(
        msg.contains("failed 3 times (last exit code 3)") && msg.contains("rolled back"),
        "{msg}"
    );
    assert_eq!(all_ready(&a, "web", &v2, 3), second);
    assert_eq!(
        containers(&cluster, "web", true)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        second,
        "a v3 container is left"
    );

    // v4 runs but is never ready: failed at its deadline, back to v2 (not to v3, which
    // failed), v2 untouched again.
    let v4 = put_app(
        &a,
        "web",
        &web("four", "true", "[update]\ndeadline = \"3s\"\n"),
    );
    let s = converge(&[&a], "v4 rolled back", || {
        let s = app_status(&a, "web");
        (s["latest"] == v4.as_str() && s["revision"] == v2.as_str() && s["state"] == "running")
            .then_some(s)
    });
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("not ready within 3s"),
        "{s}"
    );
    assert_eq!(all_ready(&a, "web", &v2, 3), second);

    // The history lists what came before, newest first.
    let h = write(&a, "GET", "/v1/apps/web/history", b"");
    assert_eq!(h.status, 200, "{}", h.text());
    let h = h.json();
    assert_eq!(h["current"]["revision"], v4.as_str());
    let previous: Vec<&str> = h["previous"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["revision"].as_str().unwrap())
        .collect();
    assert_eq!(previous, [v3.as_str(), v2.as_str(), v1.as_str()]);

    // A rollback by hand makes the restored revision the app's record: nothing restarts.
    let r = write(&a, "POST", "/v1/apps/web/rollback", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["revision"], v2.as_str());
    converge(&[&a], "the record at v2", || {
        let s = app_status(&a, "web");
        (s["latest"] == v2.as_str() && s["state"] == "running").then_some(())
    });
    assert_eq!(all_ready(&a, "web", &v2, 3), second);
    // Again: the newest earlier revision that did not fail is v1.
    let r = write(&a, "POST", "/v1/apps/web/rollback", b"");
    assert_eq!(r.json()["revision"], v1.as_str(), "{}", r.text());
    all_ready(&a, "web", &v1, 3);

    // Refusals.
    let r = write(&a, "POST", "/v1/apps/web/rollback?to=0123456789abcdef", b"");
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("no earlier revision"), "{}", r.text());
    assert_eq!(write(&a, "POST", "/v1/apps/nope/rollback", b"").status, 404);
    let r = a
        .api("POST", "/v1/apps/web/rollback", &[], b"", None)
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(write(&a, "GET", "/v1/apps/web/rollback", b"").status, 405);
}

#[test]
fn a_first_deploy_that_crashes_is_failed_and_one_too_big_is_pending_with_the_reason() {
    let (_root, _cleanup, a) = start();
    put_app(
        &a,
        "bad",
        &format!(
            "name = \"bad\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"sh\", \"-c\", \"exit 7\"]\n[resources]\nmemory = \"16Mi\"\n"
        ),
    );
    let s = converge(&[&a], "bad failed", || {
        let s = app_status(&a, "bad");
        (s["state"] == "failed").then_some(s)
    });
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("replica 0 on n1 failed 3 times (last exit code 7)"),
        "{s}"
    );
    // Too big for any node: pending, with the reason, and nothing started.
    put_app(
        &a,
        "huge",
        &format!(
            "name = \"huge\"\n[source]\nimage = \"{BUSYBOX}\"\n[resources]\nmemory = \"1000Gi\"\n"
        ),
    );
    let s = converge(&[&a], "huge pending", || {
        let s = app_status(&a, "huge");
        (s["state"] == "pending").then_some(s)
    });
    let msg = s["message"].as_str().unwrap();
    assert!(
        msg.contains("replica 0 is pending: needs 0 CPU and 1000 GiB, the largest free is"),
        "{msg}"
    );
    assert!(tasks(&a, "huge").is_empty());
}

#[test]
fn an_exec_probe_makes_a_replica_ready_unready_and_restarts_it() {
    let (_root, _cleanup, a) = start();
    put_app(
        &a,
        "job",
        &format!(
            r#"name = "job"
[source]
image = "{BUSYBOX}"
[run]
command = ["sleep", "3600"]
[health]
exec = ["test", "-f", "/tmp/ok"]
interval = "200ms"
failure_threshold = 1
restart_threshold = 5
[resources]
memory = "16Mi"
"#
        ),
    );
    let task = |want: &dyn Fn(&Value) -> bool| {
        converge(&[&a], "the job's task", || {
            tasks(&a, "job").into_iter().find(|t| want(t))
        })
    };
    // Started, then probed: not ready while the file is missing.
    let t = task(&|t| {
        t["state"] == "starting"
            && t["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("waiting until ready"))
    });
    assert_eq!(t["ready"], false, "{t}");
    let id = t["container"].as_str().unwrap().to_string();
    docker(&["exec", &id, "touch", "/tmp/ok"]);
    task(&|t| t["state"] == "running" && t["ready"] == true);
    docker(&["exec", &id, "rm", "/tmp/ok"]);
    let t = task(&|t| t["state"] == "running" && t["ready"] == false);
    assert!(t["reason"].as_str().unwrap().starts_with("unready"), "{t}");
    // Five failures in a row: a new container.
    let t = task(&|t| t["container"] != id.as_str() && t["container"].is_string());
    assert!(t["restarts"].as_u64().unwrap() >= 1, "{t}");
}

#[test]
fn a_drained_node_hands_its_replicas_over_once_their_replacements_are_ready() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let cleanup = Cleanup::for_agents_in(root.path());
    let nodes = two_nodes(root.path());
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let spec = web("one", "sleep 1; touch /www/ready", "").replace("replicas = 3", "replicas = 2");
    let rev = put_app(n1, "web", &spec);
    all_ready(n1, "web", &rev, 2);
    let on = |node: &str| {
        tasks(n2, "web")
            .iter()
            .filter(|t| t["node"] == node && t["state"] == "running")
            .count()
    };
    converge(&[n1, n2], "a replica on each node", || {
        (on("n1") == 1 && on("n2") == 1).then_some(())
    });

    let r = write(n2, "POST", "/v1/nodes/n1/drain", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    // The replica moves to n2; n1's keeps answering until the new one is ready.
    converge(&[n1, n2], "n1 drained", || {
        let s = serving(&cleanup.0, "web")?;
        let up = s.iter().filter(|(_, ok)| *ok).count();
        assert!(
            up >= 2,
            "fewer than two replicas answer during the drain: {s:?}"
        );
        let node = n2
            .list("/v1/nodes")
            .into_iter()
            .find(|n| n["id"] == "n1")
            .unwrap();
        (node["drain"]["state"] == "drained" && s.len() == 2).then_some(())
    });
    assert_eq!(on("n2"), 2);
    assert!(n1.log().contains("drained: no replica runs here any more"));
    // Nothing new lands on it: a third replica goes to n2 as well.
    put_app(n1, "web", &spec.replace("replicas = 2", "replicas = 3"));
    all_ready(n1, "web", &rev, 3);
    assert_eq!(on("n1"), 0);

    // Uncordoned, it takes new replicas again; the moved ones stay where they went.
    assert_eq!(write(n1, "POST", "/v1/nodes/n1/uncordon", b"").status, 200);
    let node = |a: &Agent| {
        a.list("/v1/nodes")
            .into_iter()
            .find(|n| n["id"] == "n1")
            .unwrap()
    };
    converge(&[n1, n2], "the drain mark gone", || {
        node(n2)["drain"].is_null().then_some(())
    });
    put_app(n1, "web", &spec.replace("replicas = 2", "replicas = 4"));
    all_ready(n1, "web", &rev, 4);
    converge(&[n1, n2], "a replica back on n1", || {
        (on("n1") >= 1).then_some(())
    });
    // Refusals: an unknown node, a bad id, a GET.
    assert_eq!(write(n1, "POST", "/v1/nodes/n9/drain", b"").status, 404);
    assert_eq!(
        write(n1, "POST", "/v1/nodes/bad%20id/drain", b"").status,
        400
    );
    assert_eq!(write(n1, "GET", "/v1/nodes/n1/drain", b"").status, 405);
}

#[test]
fn a_job_runs_to_completion_once_and_a_failing_one_stops_retrying() {
    let (_root, cleanup, mut a) = start();
    let job = |name: &str, script: &str, extra: &str| {
        format!(
            "name = \"{name}\"\nkind = \"job\"\n{extra}[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"sh\", \"-c\", \"{script}\"]\n[scale]\nreplicas = 2\n[resources]\nmemory = \"16Mi\"\n"
        )
    };
    let rev = put_app(&a, "once", &job("once", "echo ran", ""));
    converge(&[&a], "both replicas completed", || {
        let t = tasks(&a, "once");
        (t.len() == 2
            && t.iter().all(|t| {
                t["state"] == "completed" && t["exit_code"] == 0 && t["version"] == rev.as_str()
            }))
        .then_some(())
    });
    converge(&[&a], "the job completed", || {
        (app_status(&a, "once")["state"] == "completed").then_some(())
    });
    assert!(containers(&cleanup.0, "once", true).is_empty());
    let runs = |a: &Agent| a.log().matches("job completed").count();
    assert_eq!(runs(&a), 2);

    // A restarted agent does not run it again.
    a.stop();
    a.spawn();
    converge(&[&a], "the tasks recorded by the new run", || {
        let t = tasks(&a, "once");
        (t.len() == 2 && t.iter().all(|t| t["state"] == "completed")).then_some(())
    });
    let end = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < end {
        assert!(containers(&cleanup.0, "once", true).is_empty(), "ran again");
    }

    // Exit 3 every time, one retry: two runs, then failed with the reason.
    put_app(&a, "flaky", &job("flaky", "exit 3", "[job]\nretries = 1\n"));
    let s = converge(&[&a], "the flaky job failed", || {
        let s = app_status(&a, "flaky");
        (s["state"] == "failed").then_some(s)
    });
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("exited with code 3 after 2 runs: no retries left"),
        "{s}"
    );
    // Its owner says a job failed, not that a rollout failed and is rolled back.
    converge(&[&a], "the job's failure logged", || {
        a.log()
            .lines()
            .any(|l| l.contains("job failed") && l.contains("app=flaky"))
            .then_some(())
    });
    assert!(
        !a.log().contains("rollback=true"),
        "a job was said to roll back"
    );
    let r = a
        .put_app(
            "bad",
            "name = \"bad\"\nkind = \"cron\"\n[source]\nimage = \"x\"\n",
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("kind \\\"cron\\\""), "{}", r.text());
}

#[test]
fn a_volume_outlives_crashes_and_updates_and_a_drain_leaves_it_where_its_data_is() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let cleanup = Cleanup::for_agents_in(root.path());
    let nodes = two_nodes(root.path());
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let spec = |greeting: &str| {
        format!(
            r#"name = "notes"
[source]
image = "{BUSYBOX}"
[run]
command = ["sh", "-c", "echo {greeting} >> /data/log; exec httpd -f -p 8080 -h /data"]
port = 8080
[resources]
memory = "16Mi"
[[volumes]]
name = "data"
path = "/data"
"#
        )
    };
    let log = |a: &Agent| -> Option<(String, String, String)> {
        let t = tasks(a, "notes")
            .into_iter()
            .find(|t| t["state"] == "running" && t["ready"] == true)?;
        let page = get_at(t["ip"].as_str()?, 8080, "/log").ok()?;
        Some((
            t["node"].as_str()?.to_string(),
            t["container"].as_str()?.to_string(),
            page.text(),
        ))
    };
    put_app(n1, "notes", &spec("one"));
    let (node, first, text) = converge(&[n1, n2], "notes serving", || log(n1));
    assert_eq!(text, "one\n");
    // Killed: the replacement on the same node finds the data.
    docker(&["kill", &first]);
    let (node2, _, text) = converge(&[n1, n2], "notes back", || {
        log(n1).filter(|(_, c, _)| *c != first)
    });
    assert_eq!(
        (node2.as_str(), text.as_str()),
        (node.as_str(), "one\none\n")
    );
    // Updated: the new revision's container mounts the same volume.
    put_app(n1, "notes", &spec("two"));
    let (node3, _, text) = converge(&[n1, n2], "notes updated", || {
        log(n1).filter(|(_, _, t)| t.contains("two"))
    });
    assert_eq!(
        (node3.as_str(), text.as_str()),
        (node.as_str(), "one\none\ntwo\n")
    );
    let v: Value = serde_json::from_str(&docker(&[
        "volume",
        "inspect",
        &format!("shoal-{}-notes-0-data", &cleanup.0[..12]),
    ]))
    .unwrap();
    assert_eq!(v[0]["Labels"]["shoal.app"], "notes", "{v}");

    // Drained, its node keeps it (the data is there) and says so.
    let r = write(n2, "POST", &format!("/v1/nodes/{node}/drain"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let t = converge(&[n1, n2], "the reason on the task", || {
        tasks(n2, "notes").into_iter().find(|t| {
            t["reason"]
                .as_str()
                .unwrap_or("")
                .contains("the drain leaves it here")
        })
    });
    assert_eq!(t["node"], node.as_str());
    let drained = n2
        .list("/v1/nodes")
        .into_iter()
        .find(|n| n["id"] == node.as_str())
        .unwrap();
    assert_eq!(drained["drain"]["state"], "draining", "{drained}");
}
