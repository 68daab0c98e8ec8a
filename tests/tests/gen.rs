//! `shoal gen cluster` and `shoal gen token` through the real binary: the bundle is complete,
//! secrets are private and never printed unless asked, and an existing bundle is not replaced
//! by accident.

use shoal_e2e::shoal_bin;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn shoal(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(shoal_bin()).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn gen_cluster_writes_a_private_bundle_and_prints_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("prod");
    let o = out.to_str().unwrap();
    let (ok, stdout, stderr) = shoal(&[
        "gen",
        "cluster",
        "--name",
        "prod",
        "--out",
        o,
        "--peer",
        "10.0.0.2:7443",
    ]);
    assert!(ok, "{stderr}");
    let token = std::fs::read_to_string(out.join("admin.token")).unwrap();
    let secret = std::fs::read_to_string(out.join("join.secret")).unwrap();
    assert_eq!(token.trim().len(), 64);
    assert!(
        !stdout.contains(token.trim()) && !stdout.contains(secret.trim()),
        "a secret was printed: {stdout}"
    );
    assert!(stdout.contains("admin.token"));
    for f in [
        "ca.key",
        "join.secret",
        "admin.token",
        "user-data.yaml",
        "user-data-signer.yaml",
    ] {
        let mode = std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let ud = std::fs::read_to_string(out.join("user-data.yaml")).unwrap();
    assert!(ud.starts_with("#cloud-config\n"));
    assert!(ud.contains("\nshoal:\n"), "no top-level shoal: key");
    assert!(ud.contains("10.0.0.2:7443"));
    // No node gets the admin token; only the signer's user-data has the CA key.
    let signer = std::fs::read_to_string(out.join("user-data-signer.yaml")).unwrap();
    assert!(!ud.contains(token.trim()) && !signer.contains(token.trim()));
    assert!(!ud.contains("PRIVATE KEY") && signer.contains("PRIVATE KEY"));
    assert!(stdout.contains("user-data-signer.yaml"));

    // Asked for: printed.
    let again = dir.path().join("other");
    let (ok, stdout, _) = shoal(&[
        "gen",
        "cluster",
        "--name",
        "other",
        "--out",
        again.to_str().unwrap(),
        "--print-token",
    ]);
    assert!(ok);
    let t = std::fs::read_to_string(again.join("admin.token")).unwrap();
    assert!(stdout.contains(t.trim()));

    // No accidental replacement.
    let (ok, _, stderr) = shoal(&["gen", "cluster", "--name", "prod", "--out", o]);
    assert!(!ok && stderr.contains("--force"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out.join("admin.token")).unwrap(),
        token
    );
    let (ok, _, _) = shoal(&["gen", "cluster", "--name", "prod", "--out", o, "--force"]);
    assert!(ok);
    assert_ne!(
        std::fs::read_to_string(out.join("admin.token")).unwrap(),
        token
    );

    let (ok, _, stderr) = shoal(&[
        "gen",
        "cluster",
        "--name",
        "Not Valid",
        "--out",
        o,
        "--force",
    ]);
    assert!(!ok && stderr.contains("cluster name"), "{stderr}");
}

#[test]
fn gen_token_prints_a_fresh_token_each_time() {
    let (ok1, a, _) = shoal(&["gen", "token"]);
    let (ok2, b, _) = shoal(&["gen", "token"]);
    assert!(ok1 && ok2);
    assert_eq!(a.trim().len(), 64);
    assert_ne!(a, b);
}
