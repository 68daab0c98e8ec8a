//! An evil member against real agents: a TLS client holding a certificate from the cluster CA
//! (as a stolen or rogue member would) sends the sequences that once emptied a cluster —
//! digests with clocks at the top of the range, then a reconcile that holds nothing — and the
//! plausible variant within the allowed drift. Nothing is deleted; the forged digests are
//! refused and counted; every reconcile is logged at warn and counted.

use shoal::identity::vouch::NodeSigner;
use shoal::membership::Member;
use shoal::store::{Bytes, Digest, Entry, Hlc, Key, NodeId, Proof, Sign, Version};
use shoal::sync::message::{encode, Envelope, Message, Range, Rumor};
use shoal_e2e::{client_cert, cluster, metric, rss_kib, wait_for, Agent, ClientCert};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const T: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A digest naming `origins` with every watermark and collection horizon at `at`.
fn digest(origins: &[&str], at: Hlc) -> Digest {
    let map: BTreeMap<NodeId, Hlc> = origins
        .iter()
        .map(|o| (NodeId::new(o).unwrap(), at))
        .collect();
    Digest {
        watermarks: map.clone(),
        collected: map,
    }
}

/// A rogue member: a certificate from the cluster CA (as a stolen one would be) for "evil".
struct Evil {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl Evil {
    fn new(root: &std::path::Path) -> Evil {
        let (cert, key) = client_cert(root, "evil", Some(&root.join("bundle")), false);
        Evil { cert, key }
    }

    /// Signs as the evil member, with its certificate's key.
    fn signer(&self) -> NodeSigner {
        NodeSigner::new(
            &std::fs::read_to_string(&self.key).unwrap(),
            &std::fs::read_to_string(&self.cert).unwrap(),
        )
        .unwrap()
    }

    fn send(&self, to: &Agent, msg: Message) {
        let env = Envelope {
            from: Member::new(NodeId::new("evil").unwrap(), "127.0.0.1:9".into(), 1),
            msg,
        };
        let r = to
            .api(
                "POST",
                "/peer/v1/msg",
                &[("Content-Type", "application/x-shoal-peer")],
                &encode(&env),
                Some(ClientCert {
                    cert: &self.cert,
                    key: &self.key,
                }),
            )
            .unwrap();
        // Accepted at the door (a CA-signed member speaking as itself); judged inside.
        assert_eq!(r.status, 202, "{}", r.text());
    }

    fn empty_reconcile(&self, to: &Agent, d: Digest) {
        self.send(
            to,
            Message::ReconcileReply {
                digest: d,
                after: None,
                entries: Vec::new(),
                next: None,
            },
        );
    }
}

fn count(a: &Agent, name: &str) -> f64 {
    metric(&a.metrics(), name).unwrap_or(-1.0)
}

fn apps(a: &Agent) -> BTreeSet<String> {
    a.apps().into_iter().collect()
}

/// An honest write of app "after": it queues behind whatever the evil member sent.
fn write_after(a: &Agent) {
    let r = a.put_app("after", "name = \"after\"\n").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// `n` agents under `root` that all see each other.
fn joined(root: &std::path::Path, n: usize) -> Vec<Agent> {
    let agents = cluster(root, n);
    for a in &agents {
        wait_for(T, "membership", || {
            (a.alive_members() == n - 1).then_some(())
        });
    }
    agents
}

#[test]
fn an_evil_member_cannot_wipe_the_store() {
    let root = tempfile::tempdir().unwrap();
    let agents = joined(root.path(), 3);
    let mut want = BTreeSet::new();
    for i in 0..12 {
        let name = format!("app{i}");
        let spec = format!("name = \"{name}\"\n");
        assert_eq!(agents[i % 3].put_app(&name, &spec).unwrap().status, 200);
        want.insert(name);
    }
    for a in &agents {
        wait_for(T, "every app everywhere", || {
            (apps(a) == want).then_some(())
        });
    }
    let evil = Evil::new(root.path());
    let victim = &agents[0];
    let origins = ["n1", "n2", "n3"];

    // 1. The top of the clock: refused before anything is applied or remembered.
    let refused0 = count(victim, "shoal_sync_refused_total");
    evil.send(
        victim,
        Message::SyncRequest(digest(&origins, Hlc(u64::MAX))),
    );
    evil.empty_reconcile(victim, digest(&origins, Hlc(u64::MAX)));
    evil.send(
        victim,
        Message::SyncPush(Range {
            entries: Vec::new(),
            through: digest(&origins, Hlc(u64::MAX)).watermarks,
            complete: true,
        }),
    );
    wait_for(T, "the forged digests refused", || {
        (count(victim, "shoal_sync_refused_total") >= refused0 + 2.0).then_some(())
    });
    assert!(
        victim.log().contains("past what this node's clock allows"),
        "{}",
        victim.log()
    );

    // 2. Within the allowed drift: horizons ten minutes ahead make the victim reconcile with
    // the evil member, whose one page holds nothing. It names every key, a second (honest)
    // peer names none, nothing goes, and the evil member is not believed for a while.
    let plausible = digest(&origins, Hlc::from_millis(now_ms() + 10 * 60 * 1000));
    evil.send(victim, Message::SyncRequest(plausible.clone()));
    wait_for(
        T,
        "the victim to start a reconcile with the evil member",
        || (count(victim, "shoal_sync_reconciles_total") >= 1.0).then_some(()),
    );
    evil.empty_reconcile(victim, plausible.clone());
    wait_for(T, "the second peer's verdict", || {
        (count(victim, "shoal_sync_reconcile_unconfirmed_total") >= 1.0).then_some(())
    });
    assert_eq!(count(victim, "shoal_sync_reconcile_dropped_total"), 0.0);
    assert!(count(victim, "shoal_sync_reconcile_held_total") >= want.len() as f64);
    let log = victim.log();
    assert!(
        log.contains("WARN") && log.contains("reconcile ended") && log.contains("peer=evil"),
        "{log}"
    );

    // Distrusted now: the same sequence starts no reconcile. The write after it goes through
    // the same queue, so once it is acknowledged the forged messages were handled.
    let started = count(victim, "shoal_sync_reconciles_total");
    evil.send(victim, Message::SyncRequest(plausible.clone()));
    evil.empty_reconcile(victim, plausible);
    write_after(victim);
    assert_eq!(count(victim, "shoal_sync_reconciles_total"), started);

    // Every app is still on every node, including the write after the attack.
    want.insert("after".into());
    for a in &agents {
        wait_for(
            T,
            &format!("{} to hold every app after the attack", a.id),
            || (apps(a) == want).then_some(()),
        );
    }
}

/// An entry at `key` claiming `origin`, signed with the evil member's own key.
fn forged(signer: &NodeSigner, key: &str, origin: &str, value: &str) -> Rumor {
    let hlc = Hlc::from_millis(now_ms());
    let mut entry = Entry {
        key: Key::parse(key).unwrap(),
        version: Version {
            hlc,
            origin: NodeId::new(origin).unwrap(),
        },
        value: Some(Bytes::from(value.to_string())),
        proof: Proof::default(),
    };
    entry.proof = signer.prove(&entry);
    Rumor { entry, prev: hlc }
}

#[test]
fn a_member_speaks_only_for_itself() {
    // A member certificate (stolen, or a rogue node's) and its key: the evil member can sign,
    // but only as "evil". It rewrites n2's record and task, and writes apps with no operator
    // behind them: nothing of it is taken, anywhere; each is refused, counted and logged.
    let root = tempfile::tempdir().unwrap();
    let agents = joined(root.path(), 3);
    let n2_addr = |a: &Agent| {
        a.list("/v1/nodes")
            .into_iter()
            .find(|n| n["id"] == "n2")
            .map(|n| n["addr"].as_str().unwrap_or_default().to_string())
    };
    for a in &agents {
        wait_for(T, "n2's record everywhere", || n2_addr(a));
    }
    let before = n2_addr(&agents[0]).unwrap();
    let evil = Evil::new(root.path());
    let signer = evil.signer();
    let victim = &agents[0];
    let record = r#"{"id":"n2","addr":"203.0.113.9:7443","labels":{},"containers":true}"#;
    let mut unsigned = forged(&signer, "apps/unsigned", "evil", r#"{"name":"unsigned"}"#);
    unsigned.entry.proof = Proof::default();
    let rumors = vec![
        forged(&signer, "nodes/n2", "n2", record),
        forged(&signer, "tasks/n2/web/0", "n2", r#"{"forged":true}"#),
        forged(&signer, "apps/evil", "evil", r#"{"name":"evil"}"#),
        forged(&signer, "apps/evil2", "n1", r#"{"name":"evil2"}"#),
        unsigned,
    ];
    evil.send(victim, Message::Push(rumors.clone()));
    // The same entries arriving by anti-entropy fare no better.
    evil.send(
        victim,
        Message::SyncPush(Range {
            entries: rumors.iter().map(|r| r.entry.clone()).collect(),
            through: BTreeMap::new(),
            complete: true,
        }),
    );
    wait_for(T, "the forged entries refused", || {
        (count(victim, "shoal_sync_unvouched_total") >= 10.0).then_some(())
    });
    // A write after them shares their queue: once acknowledged and replicated, the forged
    // entries had every chance to spread.
    write_after(victim);
    for a in &agents {
        wait_for(T, "the honest write everywhere", || {
            apps(a).contains("after").then_some(())
        });
        assert_eq!(
            apps(a),
            BTreeSet::from(["after".to_string()]),
            "{} took a forged app",
            a.id
        );
        assert_eq!(
            n2_addr(a).unwrap(),
            before,
            "{} took n2's forged record",
            a.id
        );
        assert!(
            !a.list("/v1/tasks").iter().any(|t| t["forged"] == true),
            "{} took n2's forged task",
            a.id
        );
    }
    let log = victim.log();
    for why in [
        "its certificate names",
        "the signature does not verify",
        "no valid operator signature",
    ] {
        assert!(
            log.contains("entry refused: no valid proof") && log.contains(why),
            "no refusal for {why:?} in:\n{log}"
        );
    }
    assert!(log.contains("peer=evil"), "{log}");
}

#[test]
fn a_hostile_node_id_at_the_join_endpoint_cannot_forge_log_lines() {
    let root = tempfile::tempdir().unwrap();
    let a = Agent::start(root.path(), "door", &[], "");
    wait_for(T, "the agent", || {
        a.get("/healthz").ok().filter(|r| r.status == 200)
    });
    let forged = "INFO shoal::daemon: admin token rotated by operator";
    let id = format!(
        "x\n2026-11-30T00:00:00Z  {forged}\n{}",
        "A".repeat(64 * 1024 - 200)
    );
    let body = serde_json::json!({
        "node_id": id,
        "addrs": [],
        "csr": "",
        "nonce": "00",
        "mac": "00",
    });
    let r = a
        .api(
            "POST",
            "/peer/v1/join",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
            None,
        )
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    // The refusal is logged, on one line, without the caller's text as a line of its own.
    wait_for(T, "the refusal in the log", || {
        a.log()
            .contains("join refused: invalid node id")
            .then_some(())
    });
    let log = a.log();
    assert!(
        !log.lines()
            .any(|l| l.trim_start().starts_with("2026-11-30T00:00:00Z")),
        "a forged line reached the log:\n{log}"
    );
    assert!(log.len() < 32 * 1024, "the log took the caller's 64 KiB");
    assert!(metric(&a.metrics(), "shoal_join_refused_total").unwrap() >= 1.0);
}

/// One request on a fresh connection, answered within `limit`: the status line.
fn quick_get(port: u16, path: &str, limit: Duration) -> Option<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    Some(line)
}

#[test]
fn idle_and_slow_clients_cannot_take_the_listeners_down() {
    use std::io::{Read, Write};
    let root = tempfile::tempdir().unwrap();
    let b = shoal_e2e::bundle(&root.path().join("bundle"), "test");
    let mut a = Agent::configure_listen(root.path(), "busy", &[], &b, "", "idle_timeout_ms = 3000");
    a.spawn();
    wait_for(T, "the agent", || {
        a.get("/healthz").ok().filter(|r| r.status == 200)
    });
    let pid = a.pid().unwrap();
    let before = rss_kib(pid);
    // Per listener: 2000 connections that never send a byte, and 200 that send half a header.
    let mut held = Vec::new();
    for port in [a.status_port, a.api_port] {
        for i in 0..2200 {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            if i >= 2000 {
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
                    .unwrap();
            }
            held.push(s);
        }
    }
    // The node still answers at once, reads and writes.
    let line = quick_get(a.status_port, "/healthz", Duration::from_secs(1));
    assert!(
        line.as_deref()
            .is_some_and(|l| l.starts_with("HTTP/1.1 200")),
        "{line:?}"
    );
    let r = a.put_app("busy", "name = \"busy\"\n").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let during = rss_kib(pid);
    // On the deadline every one of them is closed by the agent: each reads end of stream.
    wait_for(T, "the idle connections shed", || {
        let m = a.metrics();
        let idle = metric(
            &m,
            "shoal_api_connections_idle_closed_total{listener=\"status\"}",
        )?;
        // On the TLS port they end at the handshake deadline, or at once for the half-headers
        // (no TLS at all): none is left open there.
        let api_open = metric(&m, "shoal_api_connections_open{listener=\"api\"}")?;
        (idle >= 2200.0 && api_open == 0.0).then_some(())
    });
    for mut s in held {
        s.set_read_timeout(Some(T)).unwrap();
        // Closed: end of stream or a reset, perhaps after a 408 for the half-headers in the
        // clear or a TLS alert record (type 21) for those on the TLS port.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(
            rest.is_empty() || rest.starts_with(b"HTTP/1.1 408") || rest[0] == 21,
            "{rest:?}"
        );
    }
    let m = a.metrics();
    assert!(metric(&m, "shoal_api_connections_open{listener=\"status\"}").unwrap() <= 2.0);
    println!(
        "agent RSS: {before} KiB idle, {during} KiB holding 4400 hostile connections, {} KiB after they were shed",
        rss_kib(pid)
    );
}

/// A join request for `id` made with the cluster's join secret.
fn join_as(a: &Agent, id: &str) -> u16 {
    let secret = std::fs::read_to_string(a.bundle.join("join.secret")).unwrap();
    let (_key, csr) = shoal::identity::cert::request(id).unwrap();
    let jr = shoal::identity::join::JoinRequest::new(secret.trim(), id, &[], &csr);
    a.post_join(&serde_json::to_string(&jr).unwrap())
}

#[test]
fn an_evicted_node_is_cut_off_everywhere() {
    let root = tempfile::tempdir().unwrap();
    let agents = joined(root.path(), 3);
    let (n1, n2, n3) = (&agents[0], &agents[1], &agents[2]);
    let auth = format!("Bearer {}", n1.token);
    let delete = |a: &Agent, path: &str, token: &str| {
        a.api("DELETE", path, &[("Authorization", token)], b"", None)
            .unwrap()
    };
    // Only an operator evicts; bad ids and unknown nodes are told apart; a node does not
    // evict itself.
    assert_eq!(delete(n1, "/v1/nodes/n3", "Bearer nope").status, 401);
    assert_eq!(delete(n1, "/v1/nodes/bad%20id", &auth).status, 400);
    assert_eq!(delete(n1, "/v1/nodes/ghost", &auth).status, 404);
    assert_eq!(delete(n1, "/v1/nodes/n1", &auth).status, 409);
    // A join cannot take over a live member's id.
    assert_eq!(join_as(n1, "n2"), 409);

    wait_for(T, "n3's record on n1", || {
        n1.list("/v1/nodes")
            .iter()
            .any(|n| n["id"] == "n3")
            .then_some(())
    });
    // The operator's way: `shoal nodes rm` with the bundle (its CA and admin token).
    let addr = format!("127.0.0.1:{}", n1.api_port);
    let rm = |id: &str| {
        shoal_e2e::shoal_cli(&[
            "--bundle",
            n1.bundle.to_str().unwrap(),
            "--addr",
            &addr,
            "nodes",
            "rm",
            id,
        ])
    };
    let (ok, _, err) = rm("ghost");
    assert!(!ok && err.contains("404") && err.contains("ghost"), "{err}");
    let (ok, out, err) = rm("n3");
    assert!(ok, "{out}{err}");
    assert!(out.contains("node n3 evicted"), "{out}");
    // Every other node refuses n3 within seconds: its messages at the door, then it is down.
    for a in [n1, n2] {
        // n3 is evicted and out of this node's membership (not alive; the other peer's own
        // liveness is not what this checks: under load it may be suspect for a moment).
        let end = std::time::Instant::now() + T;
        loop {
            let evicted = a
                .list("/v1/nodes")
                .iter()
                .any(|n| n["id"] == "n3" && n["state"] == "evicted");
            let members = a.status()["members"].clone();
            let n3_alive = members
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["id"] == "n3" && m["state"] == "alive"));
            if evicted && !n3_alive {
                eprintln!(
                    "{}: n3 cut off {:?} after the eviction",
                    a.id,
                    T - (end - std::time::Instant::now())
                );
                break;
            }
            if std::time::Instant::now() >= end {
                let tail = |x: &Agent| {
                    let log = x.log();
                    let lines: Vec<&str> = log.lines().rev().take(60).collect();
                    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
                };
                panic!(
                    "{}: n3 not cut off within {T:?} (evicted in /v1/nodes: {evicted}); members: {members}\n== n1's log:\n{}\n== n2's log:\n{}",
                    a.id,
                    tail(n1),
                    tail(n2)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_for(T, "n3's messages refused", || {
            a.log()
                .contains("node n3 was evicted from this cluster")
                .then_some(())
        });
    }
    // What n3 writes now (it still holds the operator key and takes writes) reaches nobody.
    assert_eq!(
        n3.put_app("from-evicted", "name = \"from-evicted\"\n")
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        n1.put_app("marker", "name = \"marker\"\n").unwrap().status,
        200
    );
    for a in [n1, n2] {
        wait_for(T, "the marker write", || {
            apps(a).contains("marker").then_some(())
        });
        assert!(!apps(a).contains("from-evicted"), "{} heard n3", a.id);
    }
    // Its id stays out, and evicting it again changes nothing.
    assert_eq!(join_as(n2, "n3"), 403);
    let again = delete(n2, "/v1/nodes/n3", &auth);
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["already"], true);
}

#[test]
fn a_node_whose_clock_is_off_says_so_and_answers_writes_with_503() {
    // n3 runs 30 minutes ahead (libfaketime), past the 15 minutes the cluster allows: its
    // peers would refuse everything it writes.
    let root = tempfile::tempdir().unwrap();
    let n1 = Agent::start(root.path(), "n1", &[], "");
    let n2 = Agent::start(root.path(), "n2", &[n1.api_port], "");
    let mut n3 = Agent::configure(root.path(), "n3", &[n1.api_port, n2.api_port], "");
    n3.env = vec![
        (
            "LD_PRELOAD".into(),
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1".into(),
        ),
        ("FAKETIME".into(), "+30m".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    n3.spawn();
    wait_for(T, "n3 to see its clock is off", || {
        (n3.status()["clock"]["skewed"] == true).then_some(())
    });
    let st = n3.status();
    let offset = st["clock"]["offset_ms"].as_i64().unwrap();
    assert!((-31 * 60_000..=-29 * 60_000).contains(&offset), "{st}");
    let r = n3.put_app("late", "name = \"late\"\n").unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("clock"), "{}", r.text());
    assert_eq!(metric(&n3.metrics(), "shoal_clock_skewed"), Some(1.0));
    wait_for(T, "the error in n3's log", || {
        n3.log().contains("clock is out of bounds").then_some(())
    });
    // The others are fine: one peer of two off is not a majority.
    assert_eq!(n1.status()["clock"]["skewed"], false);
    assert_eq!(metric(&n1.metrics(), "shoal_clock_skewed"), Some(0.0));
    assert_eq!(
        n1.put_app("on-time", "name = \"on-time\"\n")
            .unwrap()
            .status,
        200
    );
}
