//! Real `shoal agent` processes on loopback: they form a cluster from static peers, replicate
//! writes, survive SIGKILL with every acknowledged write, and refuse bad input without
//! changing anything.

use shoal_e2e::{cluster, get, http, wait_for, Agent, ClientCert};
use std::collections::BTreeSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn spec(name: &str, replicas: u32) -> String {
    format!("name = \"{name}\"\n[scale]\nreplicas = {replicas}\n")
}

fn has_all(a: &Agent, want: &BTreeSet<String>) -> bool {
    let have: BTreeSet<String> = a.apps().into_iter().collect();
    want.is_subset(&have)
}

#[test]
fn three_agents_form_a_cluster_and_converge() {
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 3);
    for a in &agents {
        wait_for(T, &format!("{} to see 2 live members", a.id), || {
            (a.alive_members() == 2).then_some(())
        });
    }
    let mut want = BTreeSet::new();
    for i in 0..30 {
        let name = format!("app{i}");
        let r = agents[i % 3].put_app(&name, &spec(&name, 1)).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        want.insert(name);
    }
    // A later write wins everywhere, whichever node takes it.
    assert_eq!(
        agents[2].put_app("app0", &spec("app0", 7)).unwrap().status,
        200
    );
    assert_eq!(agents[1].delete_app("app1").unwrap().status, 200);
    want.remove("app1");
    for a in &agents {
        wait_for(T, &format!("{} to hold every app", a.id), || {
            let apps: BTreeSet<String> = a.apps().into_iter().collect();
            (apps == want).then_some(())
        });
        wait_for(T, "the later write of app0", || {
            let r = get(a.status_port, "/v1/apps/app0").ok()?;
            (r.json()["scale"]["replicas"] == 7).then_some(())
        });
    }
    // Each node's own record, written at its start, reaches every other node.
    for a in &agents {
        wait_for(
            T,
            &format!("{} to list all three node records", a.id),
            || {
                let nodes = get(a.status_port, "/v1/nodes").ok()?.json();
                let ids: BTreeSet<String> = nodes
                    .as_array()?
                    .iter()
                    .filter_map(|n| n["id"].as_str().map(String::from))
                    .collect();
                (ids == BTreeSet::from(["n1".into(), "n2".into(), "n3".into()])).then_some(())
            },
        );
    }
}

#[test]
fn a_killed_agent_restarts_and_catches_up_while_writes_continue() {
    let root = tempfile::tempdir().unwrap();
    let mut agents = cluster(root.path(), 3);
    for a in &agents {
        wait_for(T, "membership", || (a.alive_members() == 2).then_some(()));
    }
    let mut acked = BTreeSet::new();
    for i in 0..60 {
        if i == 20 {
            agents[2].kill9();
        }
        let name = format!("w{i}");
        let target = if i < 20 { i % 3 } else { i % 2 };
        let r = agents[target].put_app(&name, &spec(&name, 1)).unwrap();
        if r.status == 200 {
            acked.insert(name);
        }
    }
    assert!(
        acked.len() >= 60,
        "writes to live nodes failed: {}",
        acked.len()
    );
    agents[2].spawn();
    for a in &agents {
        wait_for(
            T,
            &format!("{} to hold every acknowledged write", a.id),
            || has_all(a, &acked).then_some(()),
        );
    }
    wait_for(T, "the restarted node to be alive everywhere", || {
        agents.iter().all(|a| a.alive_members() == 2).then_some(())
    });
}

#[test]
fn every_acknowledged_write_survives_sigkill() {
    // A lone agent, so nothing can be restored from peers: only its own disk counts.
    let root = tempfile::tempdir().unwrap();
    let mut a = Agent::start(root.path(), "solo", &[], "");
    let mut acked = BTreeSet::new();
    for round in 0..5 {
        for i in 0..40 {
            let name = format!("r{round}-{i}");
            if a.put_app(&name, &spec(&name, 1)).map(|r| r.status).ok() == Some(200) {
                acked.insert(name);
            }
        }
        a.kill9();
        a.spawn();
        let have: BTreeSet<String> = a.apps().into_iter().collect();
        let lost: Vec<_> = acked.difference(&have).collect();
        assert!(
            lost.is_empty(),
            "round {round}: acknowledged writes lost after SIGKILL: {lost:?}"
        );
    }
    assert_eq!(acked.len(), 200);
}

#[test]
fn bad_peer_messages_are_refused_and_change_nothing() {
    let root = tempfile::tempdir().unwrap();
    let mut a = Agent::start(root.path(), "target", &[], "");
    let seq_before = a.status()["store"]["seq"].clone();
    let ct = ("Content-Type", "application/x-shoal-peer");
    let mut valid_prefix = b"SHOL\x01".to_vec();
    valid_prefix.extend_from_slice(&[0xff; 40]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("garbage", b"hello there".to_vec()),
        ("truncated", b"SHOL".to_vec()),
        ("wrong version", b"SHOL\x07rest".to_vec()),
        ("malformed body", valid_prefix),
        ("oversized", vec![0u8; 9 << 20]),
    ];
    let (cert, key) = a.cert();
    let me = Some(ClientCert {
        cert: &cert,
        key: &key,
    });
    for (what, body) in cases {
        match a.api("POST", "/peer/v1/msg", &[ct], &body, me) {
            Ok(r) => assert!(
                (400..500).contains(&r.status),
                "{what}: answered {}",
                r.status
            ),
            // The server answers 413 after 8 MiB and resets the rest of the upload, which
            // curl reports as a stream error instead of the answer.
            Err(e) if what == "oversized" => eprintln!("oversized: {e}"),
            Err(e) => panic!("{what}: {e}"),
        }
    }
    let r = a.api("POST", "/peer/v1/msg", &[], b"SHOL\x01", me).unwrap();
    assert_eq!(r.status, 415, "a message without the peer content type");
    assert!(a.is_running(), "the agent died on bad input");
    assert_eq!(
        a.status()["store"]["seq"],
        seq_before,
        "bad input changed the store"
    );
    let metrics = get(a.status_port, "/metrics").unwrap().text();
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("shoal_peer_messages_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(refused >= 7, "refusals not counted: {refused}");
}

#[test]
fn writes_need_the_admin_token_and_a_valid_spec() {
    let root = tempfile::tempdir().unwrap();
    let a = Agent::start(root.path(), "guarded", &[], "");
    let put = |auth: Option<&str>, path: &str, body: &str| {
        let h: Vec<(&str, &str)> = auth.map(|v| vec![("Authorization", v)]).unwrap_or_default();
        a.api("PUT", path, &h, body.as_bytes(), None).unwrap()
    };
    assert_eq!(put(None, "/v1/apps/x", &spec("x", 1)).status, 401);
    let r = put(
        Some("Bearer wrong-token-of-same-size!!"),
        "/v1/apps/x",
        &spec("x", 1),
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let good = format!("Bearer {}", a.token);
    let r = put(Some(&good), "/v1/apps/x", "name = \"x\"\nreplicaz = 2\n");
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains("replicaz"),
        "the error names the bad key: {}",
        r.text()
    );
    assert_eq!(put(Some(&good), "/v1/apps/x", &spec("y", 1)).status, 400);
    assert_eq!(
        put(Some(&good), "/v1/apps/Bad_Name", &spec("x", 1)).status,
        400
    );
    assert!(a.apps().is_empty(), "a refused write left something behind");
    assert_eq!(put(Some(&good), "/v1/apps/x", &spec("x", 1)).status, 200);
    assert_eq!(a.apps(), vec!["x".to_string()]);
    let r = a
        .api(
            "DELETE",
            "/v1/apps/nope",
            &[("Authorization", &good)],
            b"",
            None,
        )
        .unwrap();
    assert_eq!(r.status, 404);

    // A node holds no admin token: it checks operators against the public operator key in
    // cluster.json. The right token works there, any other does not.
    let tokenless = root.path().join("tokenless-bundle");
    std::fs::create_dir_all(&tokenless).unwrap();
    for f in ["cluster.json", "ca.crt", "ca.key", "join.secret"] {
        std::fs::copy(a.bundle.join(f), tokenless.join(f)).unwrap();
    }
    let mut b = Agent::configure_with_bundle(root.path(), "tokenless", &[], &tokenless, "");
    b.spawn();
    let put_on = |b: &Agent, auth: &str| {
        b.api(
            "PUT",
            "/v1/apps/x",
            &[("Authorization", auth)],
            spec("x", 1).as_bytes(),
            None,
        )
        .unwrap()
        .status
    };
    assert_eq!(put_on(&b, "Bearer anything"), 401);
    assert_eq!(put_on(&b, &good), 200);
    b.stop();

    // Without the operator key (a cluster.json from before operator keys, no token to derive
    // it from), a node accepts no writes at all.
    let keyless = root.path().join("keyless-bundle");
    std::fs::create_dir_all(&keyless).unwrap();
    for f in ["ca.crt", "ca.key", "join.secret"] {
        std::fs::copy(a.bundle.join(f), keyless.join(f)).unwrap();
    }
    let mut cluster: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.bundle.join("cluster.json")).unwrap())
            .unwrap();
    cluster.as_object_mut().unwrap().remove("operator_key");
    std::fs::write(keyless.join("cluster.json"), cluster.to_string()).unwrap();
    let mut c = Agent::configure_with_bundle(root.path(), "keyless", &[], &keyless, "");
    c.spawn();
    assert_eq!(put_on(&c, &good), 403);
}

#[test]
fn the_status_endpoint_is_read_only_and_complete() {
    let root = tempfile::tempdir().unwrap();
    let a = Agent::start(root.path(), "st", &[], "");
    for path in [
        "/healthz",
        "/v1/status",
        "/v1/nodes",
        "/v1/apps",
        "/metrics",
    ] {
        assert_eq!(get(a.status_port, path).unwrap().status, 200, "GET {path}");
        let head = http("HEAD", a.status_port, path, &[], b"").unwrap();
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} sent a body");
        for m in ["POST", "PUT", "DELETE", "PATCH"] {
            let r = http(m, a.status_port, path, &[], b"").unwrap();
            assert_eq!(r.status, 405, "{m} {path}");
            assert_eq!(r.header("allow"), Some("GET, HEAD"));
        }
    }
    let s = a.status();
    assert_eq!(s["node_id"], "st");
    assert!(s["uptime_s"].is_u64());
    assert!(s["store"]["bytes_on_disk"].as_u64().unwrap() > 0);
    assert!(s["sync"]["lag_ms"].is_u64());
    assert_eq!(get(a.status_port, "/nope").unwrap().status, 404);
    let status = get(a.status_port, "/v1/status").unwrap();
    assert!(
        !status.text().contains(&a.token),
        "the admin token leaked into /v1/status"
    );
}

#[test]
fn events_stream_replays_from_a_change_number() {
    let root = tempfile::tempdir().unwrap();
    let a = Agent::start(root.path(), "ev", &[], "");
    for i in 0..3 {
        assert_eq!(
            a.put_app(&format!("e{i}"), &spec(&format!("e{i}"), 1))
                .unwrap()
                .status,
            200
        );
    }
    // Read the replay from change 0 and stop at the third app.
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", a.status_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /v1/events?since=0 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(s).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            let v: serde_json::Value = serde_json::from_str(d).unwrap();
            seen.push(v["key"].as_str().unwrap().to_string());
            if seen.iter().any(|k| k == "apps/e2") {
                break;
            }
        }
    }
    assert_eq!(seen, vec!["nodes/ev", "apps/e0", "apps/e1", "apps/e2"]);
    let r = get(a.status_port, "/v1/events?since=abc").unwrap();
    assert_eq!(r.status, 400);
}
