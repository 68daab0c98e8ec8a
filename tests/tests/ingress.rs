//! The ingress of one node against the host's real dockerd: requests routed by Host to the
//! app's ready replicas over HTTP/1.1 and h2c, spread over them, with the client's address,
//! the original host and the scheme passed on; an unknown host, a request without one and an
//! app with no ready replica answered by the proxy itself; a node without a replica passes
//! the request to one that has it, over the members' mutual TLS. WebSocket both ways.

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

/// The WebSocket echo app (this crate's `ws-echo` in an image): its archive and spec.
fn ws_app(name: &str, extra: &str) -> (std::path::PathBuf, String) {
    let (tag, archive) =
        shoal_e2e::ws_echo_image(std::path::Path::new(env!("CARGO_BIN_EXE_ws-echo")));
    let spec = format!(
        "name = \"{name}\"\n[source]\nimage = \"{tag}\"\n[run]\ncommand = [\"/bin/ws-echo\", \"8080\"]\nport = 8080\n{extra}"
    );
    (archive, spec)
}

/// A WebSocket session through the ingress at `port` for `host`: a text and a 100 KiB binary
/// message sent, both must come back as they went, then a clean close.
fn ws_echo(port: u16, host: &str) -> Result<(), String> {
    use tungstenite::{client::IntoClientRequest, Message};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let req = format!("ws://{host}/echo")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let (mut ws, resp) = tungstenite::client(req, stream).map_err(|e| e.to_string())?;
    if resp.status() != 101 {
        return Err(format!("status {}", resp.status()));
    }
    let big: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
    for m in [
        Message::text("hello through the ingress"),
        Message::binary(big),
    ] {
        ws.send(m.clone()).map_err(|e| e.to_string())?;
        let back = ws.read().map_err(|e| e.to_string())?;
        if back != m {
            return Err(format!("sent {} bytes, got back {:?}", m.len(), back.len()));
        }
    }
    ws.close(None).map_err(|e| e.to_string())?;
    // The server's close frame, then the end.
    while ws.read().is_ok() {}
    Ok(())
}

/// What `curl -o - -w "\n%{http_code} %{http_version}"` printed: status, version, body.
fn curl_out(out: &std::process::Output) -> (u16, String, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut t = tail.split_whitespace();
    let status = t.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = t.next().unwrap_or_default().to_string();
    (status, version, body.to_string())
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
    curl_out(&out)
}

#[test]
fn the_ingress_routes_by_host_to_ready_replicas_and_says_who_asked() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let a = one_node(root.path(), "");
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

    // WebSocket: the upgrade reaches the replica and the connection carries both ways.
    let (ws_archive, ws_spec) = ws_app("chat", "");
    load(&a, &ws_archive);
    deploy(&a, "chat", &ws_spec);
    converge(&[&a], "a WebSocket echo through the ingress", || {
        ws_echo(a.http_port, "chat.localhost").ok()
    });
    for _ in 0..3 {
        ws_echo(a.http_port, "chat.localhost").unwrap();
    }
}

#[test]
fn a_node_without_a_replica_passes_the_request_to_one_that_has_it() {
    shoal_e2e::netns::require_root();
    let archive = busybox_image();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let nodes = join(
        [("n1", "edge"), ("n2", "web")]
            .iter()
            .map(|(id, role)| {
                Agent::configure(
                    root.path(),
                    id,
                    &[],
                    &format!("labels = {{ role = \"{role}\" }}\n{DOCKER_ON}"),
                )
            })
            .collect(),
    );
    let (n1, n2) = (&nodes[0], &nodes[1]);
    load(n2, &archive);
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

    // A WebSocket across the hop (HTTP/1.1 over the members' TLS, upgraded there too).
    let (ws_archive, ws_spec) = ws_app("chat", "[scale]\nconstraints = [\"role=web\"]\n");
    load(n2, &ws_archive);
    deploy(n1, "chat", &ws_spec);
    converge(&[n1, n2], "chat ready on n2", || {
        tasks(n1, "chat")
            .first()
            .filter(|t| t["node"] == "n2" && t["ready"] == true)
            .map(|_| ())
    });
    converge(&[n1, n2], "a WebSocket echo through n1", || {
        ws_echo(n1.http_port, "chat.localhost").ok()
    });

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
    // A member's hop to a node with no ready replica of the app (a sender whose view is
    // behind): 503, marked so the sender tries another node.
    let (cert, key) = n2.cert();
    let member = Some(shoal_e2e::ClientCert {
        cert: &cert,
        key: &key,
    });
    let r = n1
        .api(
            "GET",
            "/cgi-bin/env",
            &[("x-shoal-hop", "web.localhost")],
            b"",
            member,
        )
        .unwrap();
    assert_eq!(
        (r.status, r.header("x-shoal-replica-gone")),
        (503, Some("1")),
        "{}",
        r.text()
    );
}

/// `curl` over TLS to the ingress's `listen.https`, `host` resolved to loopback (so SNI and
/// the certificate check are real), trusting only `ca` (PEM file) unless `-k` is passed in
/// `args`: curl's exit code, status, HTTP version, body.
fn tls_through(a: &Agent, host: &str, path: &str, args: &[&str]) -> (i32, u16, String, String) {
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
        .args(["--resolve", &format!("{host}:{}:127.0.0.1", a.https_port)])
        .args(args)
        .arg(format!("https://{host}:{}{path}", a.https_port))
        .output()
        .expect("curl");
    let (status, version, body) = curl_out(&out);
    (out.status.code().unwrap_or(-1), status, version, body)
}

/// A self-signed certificate for `names` and its key, as one PEM; the certificate alone.
fn self_signed(names: &[&str]) -> (String, String) {
    let made =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = made.cert.pem();
    (format!("{cert}{}", made.signing_key.serialize_pem()), cert)
}

#[test]
fn tls_is_served_by_sni_from_uploaded_certificates_with_a_self_signed_fallback() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let a = one_node(root.path(), "");
    deploy(
        &a,
        "web",
        &echo_spec(
            "web",
            1,
            "[expose]\nhosts = [\"secure.example.test\", \"a.wild.test\"]\nforce_https = true\n",
        ),
    );
    running(&a, "web", 1);
    let dir = tempfile::tempdir().unwrap();
    let (pem, cert) = self_signed(&["secure.example.test"]);
    let ca = dir.path().join("secure.pem");
    std::fs::write(&ca, &cert).unwrap();
    let ca = ca.to_str().unwrap();

    // Before any upload: the node's own self-signed certificate, for *.localhost.
    let (_, status, version, body) = converge(&[&a], "web over TLS", || {
        let r = tls_through(&a, "web.localhost", "/cgi-bin/env", &["-k"]);
        (r.1 == 200).then_some(r)
    });
    assert_eq!((status, version.as_str()), (200, "2"), "h2 by ALPN: {body}");
    assert!(
        body.contains("HTTP_X_FORWARDED_PROTO=https\n") && body.contains("proto=https"),
        "{body}"
    );
    let (code, ..) = tls_through(&a, "secure.example.test", "/", &["--cacert", ca]);
    assert_eq!(
        code, 60,
        "the fallback is not trusted as secure.example.test"
    );

    // Uploads are checked: the host must be one the certificate names, and a name.
    for (host, body, want) in [
        ("other.example.test", pem.as_str(), "not other.example.test"),
        ("secure.example.test", "not a pem", "no certificate"),
        ("secure.example.test", cert.as_str(), "no private key"),
        ("Bad_Host", pem.as_str(), "not a host name"),
    ] {
        let r = write(&a, "PUT", &format!("/v1/certs/{host}"), body.as_bytes());
        assert_eq!(r.status, 400, "{host}: {}", r.text());
        assert!(r.text().contains(want), "{host}: {}", r.text());
    }
    let r = a
        .api(
            "PUT",
            "/v1/certs/secure.example.test",
            &[],
            pem.as_bytes(),
            None,
        )
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(write(&a, "GET", "/v1/certs", b"")
        .json()
        .as_array()
        .unwrap()
        .is_empty());

    let r = write(&a, "PUT", "/v1/certs/secure.example.test", pem.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, status, _, body) = converge(&[&a], "the uploaded certificate served", || {
        let r = tls_through(&a, "secure.example.test", "/cgi-bin/env", &["--cacert", ca]);
        (r.0 == 0).then_some(r)
    });
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("HTTP_X_FORWARDED_HOST=secure.example.test"),
        "{body}"
    );
    // Other names still get the fallback.
    let (code, ..) = tls_through(&a, "web.localhost", "/", &["--cacert", ca]);
    assert_eq!(code, 60);

    // A wildcard.
    let (wpem, wcert) = self_signed(&["*.wild.test"]);
    let wca = dir.path().join("wild.pem");
    std::fs::write(&wca, &wcert).unwrap();
    let r = write(&a, "PUT", "/v1/certs/*.wild.test", wpem.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    converge(&[&a], "the wildcard certificate served", || {
        let r = tls_through(&a, "a.wild.test", "/", &["--cacert", wca.to_str().unwrap()]);
        (r.0 == 0 && r.1 == 200).then_some(())
    });
    let listed = write(&a, "GET", "/v1/certs", b"").json();
    let hosts: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["*.wild.test", "secure.example.test"]);
    assert!(!listed.to_string().contains("PRIVATE"), "{listed}");

    // In the clear, an app that forces TLS redirects (308 keeps the method), but not ACME's
    // challenges; one that does not, answers.
    let (status, _, body) = through(
        &a,
        "secure.example.test:8080",
        "/cgi-bin/env?x=1",
        &["-D", "-"],
    );
    assert_eq!(status, 308, "{body}");
    assert!(
        body.to_ascii_lowercase()
            .contains("location: https://secure.example.test/cgi-bin/env?x=1"),
        "{body}"
    );
    let (status, _, _) = through(
        &a,
        "secure.example.test",
        "/.well-known/acme-challenge/t0ken",
        &[],
    );
    assert_eq!(status, 404, "a challenge reaches the app (which has none)");

    // Deleted: the fallback again.
    let r = write(&a, "DELETE", "/v1/certs/secure.example.test", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    converge(&[&a], "the fallback again", || {
        (tls_through(&a, "secure.example.test", "/", &["--cacert", ca]).0 == 60).then_some(())
    });
    let r = write(&a, "DELETE", "/v1/certs/secure.example.test", b"");
    assert_eq!(r.status, 404, "{}", r.text());
}

/// Writes `bytes` to the ingress and reads what comes back until the server closes or 5 s
/// pass: the status line's code (0 if none).
fn raw(port: u16, bytes: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    // The server may answer and close before it has read everything.
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[test]
fn hostile_requests_get_a_4xx_or_a_timeout_and_do_not_hurt_other_clients() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let a = one_node(root.path(), "[ingress]\nmax_body_bytes = 1048576\n");
    deploy(&a, "web", &echo_spec("web", 1, ""));
    // An app that reads whole bodies, for the body limits.
    let (sink_archive, sink_spec) = ws_app("sink", "");
    load(&a, &sink_archive);
    deploy(&a, "sink", &sink_spec);
    running(&a, "web", 1);
    converge(&[&a], "web and sink through the ingress", || {
        (through(&a, "web.localhost", "/", &[]).0 == 200
            && through(&a, "sink.localhost", "/", &[]).0 == 200)
            .then_some(())
    });
    let p = a.http_port;
    let ok = || {
        let (code, text) = raw(
            p,
            b"GET / HTTP/1.1\r\nHost: web.localhost\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(code, 200, "{text}");
    };

    let big = vec![b'x'; 2 << 20];
    let chunked = {
        let mut b = b"POST / HTTP/1.1\r\nHost: sink.localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        for c in big.chunks(64 << 10) {
            b.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            b.extend_from_slice(c);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"0\r\n\r\n");
        b
    };
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        ("a host that is no name", b"GET / HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n".to_vec(), &[404]),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: web.localhost\r\nHost: other\r\nConnection: close\r\n\r\n".to_vec(), &[400]),
        ("a host that is not text", b"GET / HTTP/1.1\r\nHost: web\xff.localhost\r\nConnection: close\r\n\r\n".to_vec(), &[400]),
        ("200 headers", format!("GET / HTTP/1.1\r\nHost: web.localhost\r\n{many_headers}\r\n").into_bytes(), &[431]),
        ("a 1 MiB header", format!("GET / HTTP/1.1\r\nHost: web.localhost\r\nX-Big: {}\r\n\r\n", "y".repeat(1 << 20)).into_bytes(), &[431, 400]),
        ("a declared body over the limit", [format!("POST / HTTP/1.1\r\nHost: sink.localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", 2 << 20).as_bytes(), &big].concat(), &[413]),
        ("a chunked body over the limit", chunked, &[413]),
        ("two Content-Lengths", b"POST / HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".to_vec(), &[400]),
        ("an unknown transfer coding", b"POST / HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: gzip\r\n\r\nabc".to_vec(), &[400, 501]),
        ("a request line that is not one", b"GET\x00/ HTTP/1.1\r\n\r\n".to_vec(), &[400]),
    ];
    for (what, bytes, want) in &cases {
        let (code, text) = raw(p, bytes);
        assert!(
            want.contains(&code),
            "{what}: {code}, want one of {want:?}: {}",
            text.chars().take(300).collect::<String>()
        );
        ok();
    }
    // Smuggling: with both Content-Length and Transfer-Encoding the chunked framing wins, the
    // app is given that framing only, and the connection closes after the one answer (RFC
    // 9112 §6.3), so the request hidden after the body is never read as one.
    let (code, text) = raw(
        p,
        b"POST / HTTP/1.1\r\nHost: sink.localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: sink.localhost\r\n\r\n",
    );
    assert!(
        code == 200 && text.contains("read 0 bytes") && text.matches("HTTP/1.1 ").count() == 1,
        "{text}"
    );
    ok();
    // A body within the limit goes through whole, chunked or not.
    let (code, text) = raw(
        p,
        b"POST / HTTP/1.1\r\nHost: sink.localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    );
    assert!(code == 200 && text.contains("read 5 bytes"), "{text}");
    let (code, text) = raw(
        p,
        &[format!("POST / HTTP/1.1\r\nHost: sink.localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", 1 << 20).as_bytes(), &big[..1 << 20]].concat(),
    );
    assert!(code == 200 && text.contains("read 1048576 bytes"), "{text}");

    // Slow headers: 200 clients that never finish theirs hold nothing others need, and are
    // closed by the header deadline.
    let slow: Vec<std::net::TcpStream> = (0..200)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", p)).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: web.localhost\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    let t0 = std::time::Instant::now();
    ok();
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
    for mut s in slow {
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut buf = [0u8; 512];
        // Closed (0 bytes, or a 408 first) well before our 20 s, not left open.
        let t = std::time::Instant::now();
        let r = s.read(&mut buf);
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(18)
                && !matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a slow client was not closed: {r:?} after {:?}",
            t.elapsed()
        );
    }
    ok();
}

#[test]
fn an_app_calls_another_by_name_across_nodes_and_an_internal_one_is_theirs_alone() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    // n1's ingress on the standard port of every address: where its containers' resolver
    // sends `<app>.internal` (the gateway of their network, port 80).
    let nodes = join(vec![
        shoal_e2e::agent::AgentBuilder::new(root.path(), "n1")
            .extra(DOCKER_ON)
            .extra("labels = { zone = \"a\" }")
            .extra("[listen]\nhttp = \"0.0.0.0:80\"\n")
            .build(),
        shoal_e2e::agent::AgentBuilder::new(root.path(), "n2")
            .extra(DOCKER_ON)
            .extra("labels = { zone = \"b\" }")
            .build(),
    ]);
    let (n1, n2) = (&nodes[0], &nodes[1]);
    load(n1, &busybox_image());
    load(n2, &busybox_image());
    // b runs on n2 only; a runs on n1 and asks for b by name. (No `-T` to this busybox's
    // wget: it crashes with one.)
    deploy(
        n1,
        "b",
        &format!(
            r#"name = "b"
[source]
image = "{BUSYBOX}"
[run]
command = ["sh", "-c", "mkdir -p /www && echo hello from b > /www/index.html && exec httpd -f -p 8080 -h /www"]
port = 8080
[scale]
constraints = ["zone=b"]
[expose]
internal = true
"#
        ),
    );
    deploy(
        n1,
        "a",
        &format!(
            r#"name = "a"
[source]
image = "{BUSYBOX}"
[run]
command = ["sh", "-c", "mkdir -p /www/cgi-bin && printf '#!/bin/sh\necho Content-Type: text/plain\necho\nwget -q -O - http://b.internal/ 2>&1\n' > /www/cgi-bin/call && chmod +x /www/cgi-bin/call && exec httpd -f -p 8080 -h /www"]
port = 8080
[scale]
constraints = ["zone=a"]
"#
        ),
    );
    running(n1, "a", 1);
    converge(&[n1, n2], "b ready on n2", || {
        tasks(n1, "b")
            .iter()
            .any(|t| t["node"] == "n2" && t["ready"] == true)
            .then_some(())
    });
    // a (on n1) → b.internal → n1's ingress → the hop to n2 → b.
    let (status, body) = converge(&[n1, n2], "a reaching b by name", || {
        let r = shoal_e2e::load::get(n1.http_port, "a.localhost", "/cgi-bin/call");
        r.1.contains("hello from b").then_some(r)
    });
    assert_eq!((status, body.as_str()), (200, "hello from b\n"));
    // b is internal: no client outside the cluster reaches it, by any name; nor does one
    // reach a by the cluster's own name for it.
    for (host, app) in [
        ("b.localhost", "b"),
        ("b.internal", "b"),
        ("a.internal", "a"),
    ] {
        for a in [n1, n2] {
            let (status, body) = shoal_e2e::load::get(a.http_port, host, "/");
            assert_eq!(
                (status, body.as_str()),
                (404, format!("no app answers to {host}\n").as_str()),
                "{app} from outside through {}",
                a.id
            );
        }
    }
    let m = n1.metrics();
    assert!(
        m.contains("shoal_ingress_requests_total{app=\"b\",class=\"2xx\"}"),
        "b's requests are counted where they entered, on n1:\n{m}"
    );
}

#[test]
fn a_balancer_in_front_names_the_client_with_the_proxy_protocol() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    // Every connection from loopback is a balancer's here.
    let a = one_node(
        root.path(),
        "[ingress]\nproxy_protocol_from = [\"127.0.0.0/8\"]\n",
    );
    deploy(&a, "web", &echo_spec("web", 1, ""));
    running(&a, "web", 1);
    let request = b"GET /cgi-bin/env HTTP/1.0\r\nHost: web.localhost\r\n\r\n";
    // v2, TCP over IPv4, from 203.0.113.7:5555.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend([203, 0, 113, 7, 127, 0, 0, 1]);
    v2.extend(5555u16.to_be_bytes());
    v2.extend(a.http_port.to_be_bytes());
    let v1 = format!("PROXY TCP4 198.51.100.9 127.0.0.1 4444 {}\r\n", a.http_port);
    for (header, client) in [(v2, "203.0.113.7"), (v1.into_bytes(), "198.51.100.9")] {
        let body = converge(&[&a], "web answering through the balancer", || {
            let (status, body) = raw(a.http_port, &[header.as_slice(), request].concat());
            (status == 200).then_some(body)
        });
        assert!(
            body.contains(&format!("HTTP_X_FORWARDED_FOR={client}\n")),
            "{client} missing:\n{body}"
        );
    }
    // A balancer's connection without the header is closed unanswered.
    let (status, body) = raw(a.http_port, request);
    assert_eq!((status, body.as_str()), (0, ""));
}
