//! Cluster trust on loopback, with curl (OpenSSL) as an independent TLS peer: peer paths need
//! a certificate from the cluster CA, and plain TCP, self-signed, expired and foreign
//! certificates are refused and counted; a node with only the join secret obtains a
//! certificate and joins, one with a wrong secret does not; app secrets are stored sealed.

use shoal_e2e::{bundle, client_cert, get, http, metric, shoal_cli, wait_for, Agent, ClientCert};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn refused(a: &Agent, reason: &str) -> f64 {
    metric(
        &a.metrics(),
        &format!("shoal_peer_tls_refused_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(-1.0)
}

#[test]
fn peer_traffic_needs_a_certificate_from_the_cluster_ca() {
    let root = tempfile::tempdir().unwrap();
    let a = Agent::start(root.path(), "guard", &[], "");
    let (cert, key) = a.cert();
    let member = ClientCert {
        cert: &cert,
        key: &key,
    };

    // A member's certificate is accepted, and curl accepts the agent's against the CA.
    let r = a
        .api("GET", "/peer/v1/identity", &[], b"", Some(member))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], "guard");

    // No client certificate: TLS completes (the CLI uses this listener) but /peer/ refuses.
    let r = a.api("GET", "/peer/v1/identity", &[], b"", None).unwrap();
    assert_eq!(r.status, 401);
    assert!(refused(&a, "no_client_certificate") >= 1.0);

    // Plain TCP: no HTTP answer at all.
    let plain = http("GET", a.api_port, "/peer/v1/identity", &[], b"");
    assert!(plain.is_err(), "plain HTTP got an answer: {plain:?}");
    wait_for(T, "the plain-TCP refusal to be counted", || {
        (refused(&a, "not_tls") >= 1.0).then_some(())
    });

    let certs = root.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let attempt = |name: &str, c: &(PathBuf, PathBuf)| {
        let r = a.api(
            "GET",
            "/peer/v1/identity",
            &[],
            b"",
            Some(ClientCert {
                cert: &c.0,
                key: &c.1,
            }),
        );
        assert!(
            r.as_ref().map(|r| r.status >= 400).unwrap_or(true),
            "{name} certificate was accepted: {r:?}"
        );
    };
    // Self-signed.
    attempt("a self-signed", &client_cert(&certs, "guard", None, false));
    wait_for(T, "the self-signed refusal to be counted", || {
        (refused(&a, "unknown_ca") >= 1.0).then_some(())
    });
    // From another cluster's CA.
    let other = bundle(&root.path().join("other-bundle"), "other");
    attempt(
        "another cluster's",
        &client_cert(&certs, "o1", Some(&other), false),
    );
    wait_for(T, "the foreign refusal to be counted", || {
        (refused(&a, "unknown_ca") >= 2.0).then_some(())
    });
    // From this cluster's CA, but expired.
    attempt(
        "an expired",
        &client_cert(&certs, "old", Some(&a.bundle), true),
    );
    wait_for(T, "the expired refusal to be counted", || {
        (refused(&a, "expired") >= 1.0).then_some(())
    });

    // And curl itself refuses the agent when told to trust another CA.
    let r = shoal_e2e::https(
        "GET",
        a.api_port,
        "/healthz",
        &[],
        b"",
        &other.join("ca.crt"),
        None,
    );
    assert!(r.is_err(), "curl accepted the agent against a foreign CA");
    let mut a = a;
    assert!(a.is_running());
}

/// A bundle directory holding only `join.secret` (with `secret`).
fn join_only(root: &Path, name: &str, secret: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("join.secret"), format!("{secret}\n")).unwrap();
    d
}

#[test]
fn a_node_with_only_the_join_secret_joins_and_a_wrong_secret_does_not() {
    let root = tempfile::tempdir().unwrap();
    let a = Agent::start(root.path(), "seed", &[], "");
    let secret = std::fs::read_to_string(a.bundle.join("join.secret")).unwrap();

    // The right secret: a certificate from a member, then membership and replication.
    let jb = join_only(root.path(), "joiner-bundle", secret.trim());
    let j = Agent::configure_with_bundle(root.path(), "joiner", &[a.api_port], &jb, "");
    let mut j = j;
    j.spawn();
    assert!(j.dir.join("tls/node.crt").exists());
    assert!(!j.dir.join("tls/ca.key").exists() && !jb.join("ca.key").exists());
    wait_for(T, "seed and joiner to see each other", || {
        (a.alive_members() == 1 && j.alive_members() == 1).then_some(())
    });
    assert!(a.log().contains("signed a certificate for a joining node"));
    assert_eq!(j.status()["cluster"]["signs_joins"], false);
    assert_eq!(j.status()["cluster"]["hash"], a.status()["cluster"]["hash"]);
    assert_eq!(
        a.put_app("hello", "name = \"hello\"\n[source]\nimage = \"busybox\"\n")
            .unwrap()
            .status,
        200
    );
    wait_for(T, "the app to reach the joiner", || {
        j.apps().contains(&"hello".to_string()).then_some(())
    });
    // The joiner holds no admin token, only the operator key the join reply named: it takes
    // the operator's writes and nobody else's.
    let token = std::fs::read_to_string(a.bundle.join("admin.token")).unwrap();
    let put = |auth: &str| {
        j.api(
            "PUT",
            "/v1/apps/x",
            &[("Authorization", auth)],
            b"name = \"x\"\n",
            None,
        )
        .unwrap()
        .status
    };
    assert!(!jb.join("admin.token").exists());
    assert_eq!(put("Bearer not-the-token"), 401);
    assert_eq!(put(&format!("Bearer {}", token.trim())), 200);
    // It restarts from its stored certificate, without asking again.
    let joins_before = metric(&a.metrics(), "shoal_join_requests_total").unwrap();
    j.stop();
    j.spawn();
    wait_for(T, "the joiner back in the cluster", || {
        (a.alive_members() == 1 && j.alive_members() == 1).then_some(())
    });
    assert_eq!(
        metric(&a.metrics(), "shoal_join_requests_total").unwrap(),
        joins_before
    );

    // A wrong secret: refused with a clear log line on both sides, no certificate, no
    // membership.
    let wb = join_only(root.path(), "wrong-bundle", "not-the-secret");
    let mut w = Agent::configure_with_bundle(root.path(), "wrong", &[a.api_port], &wb, "");
    w.spawn_detached();
    wait_for(T, "the wrong-secret node to log the refusal", || {
        w.log().contains("join refused").then_some(())
    });
    wait_for(T, "the seed to count the refusal", || {
        (metric(&a.metrics(), "shoal_join_refused_total").unwrap_or(0.0) >= 1.0).then_some(())
    });
    assert!(a
        .log()
        .contains("join refused: the request is not signed with this cluster's join secret"));
    assert!(!w.dir.join("tls/node.crt").exists());
    assert!(w.is_running(), "it keeps trying instead of exiting");
    assert!(
        get(w.status_port, "/healthz").is_err(),
        "it serves nothing before it is a member"
    );
    let members = a.status()["members"].to_string();
    assert!(!members.contains("wrong"), "{members}");
    let nodes = get(a.status_port, "/v1/nodes").unwrap().text();
    assert!(!nodes.contains("\"wrong\""), "{nodes}");

    // No secret at all: a clear error and a non-zero exit.
    let empty = root.path().join("empty-bundle");
    std::fs::create_dir_all(&empty).unwrap();
    let mut n = Agent::configure_with_bundle(root.path(), "nothing", &[a.api_port], &empty, "");
    n.spawn_detached();
    let code = n.wait_exit(T);
    assert_ne!(code, Some(0));
    assert!(
        n.log().contains("no cluster bundle or join secret"),
        "{}",
        n.log()
    );
}

/// Waits until `n` logs a refused join and has no certificate.
fn assert_join_refused(a: &Agent, n: &Agent) {
    wait_for(T, "the refusal in the joiner's log", || {
        n.log().contains("join refused").then_some(())
    });
    assert!(!n.dir.join("tls/node.crt").exists());
    assert!(a
        .log()
        .contains("join refused: the request is not signed with this cluster's join secret"));
}

#[test]
fn the_join_secret_rotates_without_losing_sealed_secrets() {
    let root = tempfile::tempdir().unwrap();
    let mut a = Agent::start(root.path(), "seed", &[], "");
    let dir = a.bundle.clone();
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .unwrap()
            .trim()
            .to_string()
    };
    let (old, token, cluster_id) = (read("join.secret"), read("admin.token"), {
        let c: serde_json::Value = serde_json::from_str(&read("cluster.json")).unwrap();
        c["id"].as_str().unwrap().to_string()
    });
    let wrapped_before = read("data-key.sealed");
    let auth = format!("Bearer {token}");
    let put = |ag: &Agent, path: &str, auth: &str, body: &str| {
        ag.api(
            "PUT",
            path,
            &[("Authorization", auth)],
            body.as_bytes(),
            None,
        )
        .unwrap()
    };
    // Bad input loses nothing: no token, a weak secret, the wrong method.
    assert_eq!(
        put(
            &a,
            "/v1/cluster/join-secret",
            "Bearer nope",
            &"x".repeat(64)
        )
        .status,
        401
    );
    let weak = put(&a, "/v1/cluster/join-secret", &auth, "hunter2");
    assert_eq!(weak.status, 400, "{}", weak.text());
    assert!(weak.text().contains("32 to 256"), "{}", weak.text());
    assert_eq!(
        a.api(
            "GET",
            "/v1/cluster/join-secret",
            &[("Authorization", &auth)],
            b"",
            None
        )
        .unwrap()
        .status,
        405
    );
    assert_eq!(
        put(&a, "/v1/apps/web/secrets/API_KEY", &auth, "v1").status,
        200
    );

    // The CLI rotates: the cluster first, then the bundle.
    let addr = format!("127.0.0.1:{}", a.api_port);
    let (ok, out, err) = shoal_cli(&[
        "--bundle",
        dir.to_str().unwrap(),
        "--addr",
        &addr,
        "cluster",
        "rotate-join-secret",
        "-o",
        "json",
    ]);
    assert!(ok, "{out}{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    let new = read("join.secret");
    assert_ne!(new, old);
    assert!(!dir.join("join.secret.new").exists());
    assert_eq!(
        answer["join_secret_fingerprint"],
        shoal::identity::join::fingerprint(&new, &cluster_id)
    );
    // The data key is the same one, wrapped for the new secret, in the bundle, its
    // user-data and the answer (each wrap with its own nonce).
    let wrapped = read("data-key.sealed");
    assert_ne!(wrapped, wrapped_before);
    assert!(read("user-data.yaml").contains(&wrapped));
    use shoal::identity::secrets::SecretKey;
    let before = SecretKey::unwrap(&wrapped_before, &old, &cluster_id).unwrap();
    let sealed = before.seal("secrets/web/API_KEY", b"v1").unwrap();
    for w in [wrapped.as_str(), answer["data_key"].as_str().unwrap()] {
        let after = SecretKey::unwrap(w, &new, &cluster_id).unwrap();
        assert_eq!(after.open("secrets/web/API_KEY", &sealed).unwrap(), b"v1");
    }
    wait_for(T, "the rotation logged", || {
        a.log()
            .contains("the join secret was rotated")
            .then_some(())
    });
    assert!(
        !a.log().contains(&new) && !out.contains(&new),
        "the secret was shown"
    );

    // The old secret admits nobody any more; the new one does, and the joiner is handed the
    // data key wrapped for it.
    let ob = join_only(root.path(), "old-bundle", &old);
    let mut o = Agent::configure_with_bundle(root.path(), "old", &[a.api_port], &ob, "");
    o.spawn_detached();
    assert_join_refused(&a, &o);
    let nb = join_only(root.path(), "new-bundle", &new);
    let mut j = Agent::configure_with_bundle(root.path(), "joiner", &[a.api_port], &nb, "");
    j.spawn();
    let handed = std::fs::read_to_string(j.dir.join("tls/data-key.sealed")).unwrap();
    let key = SecretKey::unwrap(&handed, &new, &cluster_id).unwrap();
    assert_eq!(key.open("secrets/web/API_KEY", &sealed).unwrap(), b"v1");
    wait_for(T, "seed and joiner to see each other", || {
        (a.alive_members() == 1 && j.alive_members() == 1).then_some(())
    });

    // The joiner and the seed agree on the data key in practice: a third secret put in force
    // through the joiner (sealed with its key) is what the seed then admits with.
    let third = "3".repeat(64);
    let r = put(&j, "/v1/cluster/join-secret", &auth, &third);
    assert_eq!(r.status, 200, "{}", r.text());
    let tb = join_only(root.path(), "third-bundle", &third);
    let mut t = Agent::configure_with_bundle(root.path(), "third", &[a.api_port], &tb, "");
    wait_for(T, "the third secret to reach the seed", || {
        let jr = shoal::identity::join::JoinRequest::new(&third, "probe", &[], "not a CSR");
        let s = a.post_join(&serde_json::to_string(&jr).unwrap());
        // 400: the secret was accepted and the (bogus) CSR refused after it.
        (s == 400).then_some(())
    });
    t.spawn();
    assert!(t.dir.join("tls/node.crt").exists());

    // The seed restarts from its rotated bundle: the new wrap opens with the new secret.
    a.stop();
    a.spawn();
    wait_for(T, "the seed back with its peers", || {
        (a.alive_members() == 2).then_some(())
    });
    assert!(!a.log().contains("does not open"), "{}", a.log());
}

#[test]
fn app_secrets_are_stored_sealed_and_never_shown() {
    let root = tempfile::tempdir().unwrap();
    let agents = shoal_e2e::cluster(root.path(), 2);
    let (a, b) = (&agents[0], &agents[1]);
    let value = "correct-horse-battery-staple-4711";
    let auth = format!("Bearer {}", a.token);
    let put = |path: &str, auth: &str| {
        a.api(
            "PUT",
            path,
            &[("Authorization", auth)],
            value.as_bytes(),
            None,
        )
        .unwrap()
    };
    assert_eq!(
        put("/v1/apps/web/secrets/API_KEY", "Bearer nope").status,
        401
    );
    assert_eq!(put("/v1/apps/web/secrets/api-key", &auth).status, 400);
    assert_eq!(put("/v1/apps/Web/secrets/API_KEY", &auth).status, 400);
    let r = put("/v1/apps/web/secrets/API_KEY", &auth);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.text().contains(value));
    wait_for(T, "the secret to replicate", || {
        (b.status()["store"]["keys"]["secrets"] == 1).then_some(())
    });
    for ag in [a, b] {
        for path in ["/v1/status", "/v1/apps", "/v1/nodes", "/metrics"] {
            let body = get(ag.status_port, path).unwrap().text();
            assert!(!body.contains(value), "{path} shows the secret");
        }
        let store = std::fs::read(ag.dir.join("store/replica.redb")).unwrap();
        assert!(
            !store.windows(value.len()).any(|w| w == value.as_bytes()),
            "the store holds the secret in the clear"
        );
        assert!(!ag.log().contains(value), "the log shows the secret");
    }
    let del = |path: &str| {
        a.api("DELETE", path, &[("Authorization", &auth)], b"", None)
            .unwrap()
            .status
    };
    assert_eq!(del("/v1/apps/web/secrets/API_KEY"), 200);
    assert_eq!(del("/v1/apps/web/secrets/API_KEY"), 404);
}

#[test]
fn a_member_speaks_only_for_itself() {
    use shoal::membership::Member;
    use shoal::store::NodeId;
    use shoal::sync::message::{encode, Envelope, Message};
    let root = tempfile::tempdir().unwrap();
    let a = Agent::start(root.path(), "honest", &[], "");
    let (cert, key) = a.cert();
    let me = Some(ClientCert {
        cert: &cert,
        key: &key,
    });
    let ct = ("Content-Type", "application/x-shoal-peer");
    let as_node = |id: &str| {
        encode(&Envelope {
            from: Member::new(NodeId::new(id).unwrap(), "127.0.0.1:1".into(), 1),
            msg: Message::ReconcileRequest { after: None },
        })
    };
    // Signed as the node the certificate names: accepted.
    let r = a
        .api("POST", "/peer/v1/msg", &[ct], &as_node("honest"), me)
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    // The same certificate claiming to be another node: refused and counted.
    let r = a
        .api("POST", "/peer/v1/msg", &[ct], &as_node("impostor"), me)
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(metric(&a.metrics(), "shoal_peer_messages_refused_total").unwrap() >= 1.0);
}
