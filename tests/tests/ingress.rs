//! The ingress of one node against the host's real dockerd: requests routed by Host to the
//! app's ready replicas over HTTP/1.1 and h2c, spread over them, with the client's address,
//! the original host and the scheme passed on; an unknown host, a request without one and an
//! app with no ready replica answered by the proxy itself; a node without a replica passes
//! the request to one that has it, over the members' mutual TLS.

use shoal_e2e::docker::*;
use shoal_e2e::{busybox_image, Agent, BUSYBOX};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::Command;

/// busybox httpd with a CGI script that prints its environment (the request's headers are
/// `HTTP_*` there) and the container's hostname.
fn echo_spec(name: &str, replicas: u32, extra: &str) -> String {
    format!(
        r#"name = "{name}"
[source]
image = "{BUSYBOX}"
[run]
command = ["sh", "-c", "mkdir -p /www/cgi-bin && printf '#!/bin/sh\necho Content-Type: text/plain\necho\necho host=$(hostname)\nenv\n' > /www/cgi-bin/env && chmod +x /www/cgi-bin/env && exec httpd -f -p 8080 -h /www"]
port = 8080
[scale]
replicas = {replicas}
{extra}"#
    )
}

/// `curl` to the ingress with `host` as the Host header: status, HTTP version, body.
fn through(a: &Agent, host: &str, path: &str, args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .args(["-H", &format!("Host: {host}")])
        .args(args)
        .arg(format!("http://127.0.0.1:{}{path}", a.http_port))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut t = tail.split_whitespace();
    let status = t.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = t.next().unwrap_or_default().to_string();
    (status, version, body.to_string())
}

#[test]
fn the_ingress_routes_by_host_to_ready_replicas_and_says_who_asked() {
    shoal_e2e::netns::require_root();
    let archive = busybox_image();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let a = Agent::start(
        root.path(),
        "n1",
        &[],
        "[docker]\nenabled = true\nreconcile_ms = 300\n",
    );
    let r = write(&a, "POST", "/v1/images", &std::fs::read(&archive).unwrap());
    assert_eq!(r.status, 200, "{}", r.text());
    deploy(
        &a,
        "web",
        &echo_spec("web", 2, "[expose]\nhosts = [\"www.example.test\"]\n"),
    );
    running(&a, "web", 2);

    // By its name under the domain and by its exposed host (any case, with a port).
    let (status, _, body) = converge(&[&a], "web through the ingress", || {
        let r = through(&a, "web.localhost", "/cgi-bin/env", &[]);
        (r.0 == 200).then_some(r)
    });
    assert_eq!(status, 200);
    for want in [
        "HTTP_X_FORWARDED_FOR=127.0.0.1",
        "HTTP_X_FORWARDED_HOST=web.localhost",
        "HTTP_X_FORWARDED_PROTO=http",
        "HTTP_FORWARDED=for=127.0.0.1;host=\"web.localhost\";proto=http",
    ] {
        assert!(body.contains(want), "{want} missing from:\n{body}");
    }
    let (status, _, body) = through(&a, "WWW.Example.test:80", "/cgi-bin/env", &[]);
    assert_eq!(status, 200, "{body}");
    // What a client says came before is kept, and the proxy's own hop is added.
    let (_, _, body) = through(
        &a,
        "web.localhost",
        "/cgi-bin/env",
        &[
            "-H",
            "X-Forwarded-For: 203.0.113.9",
            "-H",
            "X-Forwarded-Proto: https",
            "-H",
            "X-Shoal-Hop: other.localhost",
        ],
    );
    // (and the nodes' hop mark, sent by a client, does not reach the app)
    assert!(
        body.contains("HTTP_X_FORWARDED_FOR=203.0.113.9, 127.0.0.1")
            && body.contains("HTTP_X_FORWARDED_PROTO=http\n")
            && !body.contains("HTTP_X_SHOAL_HOP"),
        "{body}"
    );

    // HTTP/2 in the clear (prior knowledge), to a replica that speaks HTTP/1.1.
    let (status, version, body) = through(
        &a,
        "web.localhost",
        "/cgi-bin/env",
        &["--http2-prior-knowledge"],
    );
    assert_eq!((status, version.as_str()), (200, "2"), "{body}");
    assert!(
        body.contains("HTTP_X_FORWARDED_HOST=web.localhost"),
        "{body}"
    );

    // Both replicas get requests.
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let (_, _, body) = through(&a, "web.localhost", "/cgi-bin/env", &[]);
        if let Some(h) = body.lines().find_map(|l| l.strip_prefix("host=")) {
            seen.insert(h.to_string());
        }
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "one replica took every request: {seen:?}");

    // The proxy's own answers: a host no app has, a request with no host.
    let (status, _, body) = through(&a, "nope.localhost", "/", &[]);
    assert_eq!(
        (status, body.trim()),
        (404, "no app answers to nope.localhost")
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", a.http_port)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    assert!(
        raw.starts_with("HTTP/1.0 400") || raw.starts_with("HTTP/1.1 400"),
        "{raw}"
    );

    // An app whose replica never gets ready is not sent requests.
    deploy(
        &a,
        "never",
        &echo_spec("never", 1, "[health]\nhttp = \"/not-there\"\n"),
    );
    converge(&[&a], "never's replica running, not ready", || {
        tasks(&a, "never")
            .first()
            .filter(|t| t["container"].is_string() && t["ready"] == false)
            .map(|_| ())
    });
    let (status, _, body) = through(&a, "never.localhost", "/", &[]);
    assert_eq!((status, body.trim()), (503, "never has no ready replica"));
}

#[test]
fn a_node_without_a_replica_passes_the_request_to_one_that_has_it() {
    shoal_e2e::netns::require_root();
    let archive = busybox_image();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let mut nodes: Vec<Agent> = [("n1", "edge"), ("n2", "web")]
        .iter()
        .map(|(id, role)| {
            Agent::configure(
                root.path(),
                id,
                &[],
                &format!(
                    "labels = {{ role = \"{role}\" }}\n[docker]\nenabled = true\nreconcile_ms = 300\n"
                ),
            )
        })
        .collect();
    let ports: Vec<u16> = nodes.iter().map(|a| a.api_port).collect();
    for a in &mut nodes {
        a.set_peers(&ports);
        a.spawn();
    }
    let (n1, n2) = (&nodes[0], &nodes[1]);
    converge(&[n1, n2], "two members and their records", || {
        nodes
            .iter()
            .all(|a| a.alive_members() == 1 && a.list("/v1/nodes").len() == 2)
            .then_some(())
    });
    let r = write(n2, "POST", "/v1/images", &std::fs::read(&archive).unwrap());
    assert_eq!(r.status, 200, "{}", r.text());
    deploy(
        n1,
        "web",
        &echo_spec("web", 1, "constraints = [\"role=web\"]\n"),
    );
    converge(&[n1, n2], "web ready on n2", || {
        tasks(n1, "web")
            .first()
            .filter(|t| t["node"] == "n2" && t["ready"] == true)
            .map(|_| ())
    });

    // Asked of n1, answered by n2's replica; the client's address is the one the app sees
    // (n1's hop adds none), and the hop's mark stays between the nodes.
    let (status, _, body) = converge(&[n1, n2], "web through n1", || {
        let r = through(
            n1,
            "web.localhost",
            "/cgi-bin/env",
            &["-H", "X-Forwarded-For: 203.0.113.9"],
        );
        (r.0 == 200).then_some(r)
    });
    assert_eq!(status, 200);
    assert!(
        body.contains("HTTP_X_FORWARDED_FOR=203.0.113.9, 127.0.0.1\n")
            && body.contains("HTTP_X_FORWARDED_HOST=web.localhost")
            && !body.to_ascii_lowercase().contains("shoal_hop"),
        "{body}"
    );
    // HTTP/2 from the client, across the hop.
    let (status, version, _) = through(n1, "web.localhost", "/", &["--http2-prior-knowledge"]);
    assert_eq!((status, version.as_str()), (200, "2"));

    // Only a member passes requests on: a client of n2's API with the mark is refused.
    let r = n2
        .api(
            "GET",
            "/cgi-bin/env",
            &[("x-shoal-hop", "web.localhost")],
            b"",
            None,
        )
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
}
