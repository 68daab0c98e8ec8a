//! Certificates from a real ACME CA (Debian's pebble) for an app that asks for them
//! (`[expose] acme = true`), on two nodes with the host's dockerd. The host's name resolves
//! (pebble's DNS) to the node that does not order: the challenge it answers came through
//! the store. The certificate is then served by SNI on every node and chains to pebble's
//! root; a host the CA cannot reach gets its failure shown on the app, not a certificate.

use shoal_e2e::acme::Pebble;
use shoal_e2e::docker::*;
use shoal_e2e::{busybox_image, free_port, Agent, BUSYBOX};
use std::process::Command;

/// `curl` to `a`'s TLS ingress for `host` (resolved to loopback, so SNI and the check are
/// real), trusting only `ca`: curl's exit code, the status and the body.
fn tls_get(a: &Agent, host: &str, ca: &std::path::Path) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .args(["--resolve", &format!("{host}:{}:127.0.0.1", a.https_port)])
        .arg("--cacert")
        .arg(ca)
        .arg(format!("https://{host}:{}/", a.https_port))
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_host_gets_a_certificate_from_the_ca_validated_through_the_node_that_did_not_order() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let host = "shop.example.test";
    let broken = "broken.example.test";
    // Both ingresses on one port, on two loopback addresses: where the CA's DNS sends it.
    let port = free_port();
    let ips = ["127.0.0.2", "127.0.0.3"];
    let owner = shoal::ingress::acme::owner(host, ["n1", "n2"]).unwrap();
    let other = if owner == "n1" { 1 } else { 0 };
    let pebble = Pebble::start(&root.path().join("pebble"), port, ips[other]);
    // Nothing listens there: the CA cannot validate this one.
    pebble.point(broken, "127.0.0.9");
    let acme = format!(
        "[acme]\ndirectory = \"{}\"\nca = \"{}\"\ncontact = [\"mailto:ops@example.test\"]\n",
        pebble.directory,
        pebble.api_ca.display()
    );
    let nodes = join(
        ["n1", "n2"]
            .iter()
            .zip(ips)
            .map(|(id, ip)| {
                Agent::configure(
                    root.path(),
                    id,
                    &[],
                    &format!("{DOCKER_ON}{acme}[listen]\nhttp = \"{ip}:{port}\"\n"),
                )
            })
            .collect(),
    );
    // Through both: they share the host's engine, and each then says what it holds (an
    // image of that name from before would otherwise still be in one node's record).
    for a in &nodes {
        load(a, &busybox_image());
    }
    let spec = format!(
        r#"name = "shop"
[source]
image = "{BUSYBOX}"
[run]
command = ["sh", "-c", "mkdir -p /www && echo shop > /www/index.html && exec httpd -f -p 8080 -h /www"]
port = 8080
[expose]
hosts = ["{host}", "{broken}"]
acme = true
"#
    );
    deploy(&nodes[0], "shop", &spec);
    let all: Vec<&Agent> = nodes.iter().collect();

    let certs = converge(
        &all,
        "a certificate for the host and a failure for the other",
        || {
            let app = nodes[other].get("/v1/apps/shop").ok()?.json();
            if app["certificates"].is_null() {
                return None;
            }
            let c = app["certificates"].as_array()?.clone();
            let got = c.iter().find(|c| c["host"] == host)?;
            let bad = c.iter().find(|c| c["host"] == broken)?;
            (got["served"]["source"] == "acme" && bad["failed"]["failures"].as_u64() >= Some(1))
                .then_some(c)
        },
    );
    let shop = certs.iter().find(|c| c["host"] == host).unwrap();
    assert_eq!(shop["served"]["by"], owner, "{certs:?}");
    assert_eq!(shop["served"]["directory"], pebble.directory.as_str());
    assert!(shop.get("failed").is_none(), "{certs:?}");
    let bad = certs.iter().find(|c| c["host"] == broken).unwrap();
    assert!(bad.get("served").is_none(), "{certs:?}");
    let why = bad["failed"]["error"].as_str().unwrap();
    assert!(!why.is_empty(), "{certs:?}");
    assert!(
        bad["failed"]["retry_at_ms"].as_u64() > bad["failed"]["at_ms"].as_u64(),
        "{certs:?}"
    );

    // Served by SNI on both nodes, chaining to the CA's root, and the app answers behind it.
    let issuing = root.path().join("issuing-root.pem");
    std::fs::write(&issuing, pebble.issuing_root()).unwrap();
    for a in &nodes {
        let (code, out) = converge(&all, "the app behind the certificate", || {
            let r = tls_get(a, host, &issuing);
            (r.0 == 0 && r.1.ends_with("\n200")).then_some(r)
        });
        assert_eq!(code, 0, "{}: {out}", a.id);
        assert!(out.starts_with("shop\n"), "{}: {out}", a.id);
        // The failed host still has TLS, the node's own: not one the CA's root vouches for.
        let (code, out) = tls_get(a, broken, &issuing);
        assert_eq!(
            code, 60,
            "{}: curl should refuse the fallback certificate: {out}",
            a.id
        );
    }
    drop(pebble);
}
