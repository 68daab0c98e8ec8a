//! The cloud and bare-metal artefacts outside Rust: every Terraform and Packer file parses with
//! a real HCL parser (hcl-rs), every `var.X` they use is declared, the settings the security
//! model depends on are there, the user-data rewrite the AWS example does matches what
//! `shoal gen cluster` writes, and Debian's packer validates the template.

use hcl::{Block, Body};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn hcl_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            hcl_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "tf" || x == "hcl") {
            out.push(p);
        }
    }
}

fn parse(p: &Path) -> Body {
    let text = std::fs::read_to_string(p).unwrap();
    hcl::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn blocks<'a>(body: &'a Body, kind: &str) -> Vec<&'a Block> {
    body.blocks().filter(|b| b.identifier() == kind).collect()
}

fn labels(b: &Block) -> Vec<String> {
    b.labels().iter().map(|l| l.as_str().to_string()).collect()
}

/// The block `kind "l0" "l1"` in a module (all its files).
fn find<'a>(bodies: &'a [Body], kind: &str, l: &[&str]) -> &'a Block {
    bodies
        .iter()
        .flat_map(|b| blocks(b, kind))
        .find(|b| labels(b) == l)
        .unwrap_or_else(|| panic!("no {kind} {l:?}"))
}

fn attr(b: &Body, key: &str) -> String {
    b.attributes()
        .find(|a| a.key() == key)
        .map(|a| a.expr().to_string())
        .unwrap_or_else(|| panic!("no attribute {key}"))
}

/// Parses every file of a module and checks that each `var.X` it uses is declared.
fn module(dir: &Path) -> Vec<Body> {
    let mut files = Vec::new();
    hcl_files(dir, &mut files);
    assert!(!files.is_empty(), "no HCL in {}", dir.display());
    let bodies: Vec<Body> = files.iter().map(|p| parse(p)).collect();
    let declared: BTreeSet<String> = bodies
        .iter()
        .flat_map(|b| blocks(b, "variable"))
        .filter_map(|b| labels(b).first().cloned())
        .collect();
    let mut used = BTreeSet::new();
    for p in &files {
        let text = std::fs::read_to_string(p).unwrap();
        for (i, _) in text.match_indices("var.") {
            let name: String = text[i + 4..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let before = text[..i].chars().last().unwrap_or(' ');
            if !name.is_empty() && !before.is_ascii_alphanumeric() && before != '_' {
                used.insert(name);
            }
        }
    }
    let missing: Vec<_> = used.difference(&declared).collect();
    assert!(
        missing.is_empty(),
        "{}: undeclared {missing:?}",
        dir.display()
    );
    bodies
}

#[test]
fn every_hcl_file_parses_and_declares_what_it_uses() {
    let root = repo();
    let mut files = Vec::new();
    hcl_files(&root.join("deploy"), &mut files);
    hcl_files(&root.join("packer"), &mut files);
    assert!(files.len() >= 7, "{files:?}");
    for f in &files {
        parse(f);
    }
    module(&root.join("packer"));
    // A broken file is refused: the check above can fail.
    assert!(hcl::parse("resource \"x\" {\n  a = \n}\n").is_err());
}

#[test]
fn aws_example_launches_from_a_template_with_the_cluster_user_data_and_imdsv2() {
    let m = module(&repo().join("deploy/terraform/aws"));
    let lt = find(&m, "resource", &["aws_launch_template", "shoal"]);
    assert!(attr(lt.body(), "user_data").contains("local.user_data"));
    let md = blocks(lt.body(), "metadata_options");
    assert_eq!(md.len(), 1);
    assert_eq!(attr(md[0].body(), "http_tokens"), "\"required\"");
    assert_eq!(attr(md[0].body(), "http_put_response_hop_limit"), "1");
    let inst = find(&m, "resource", &["aws_instance", "node"]);
    assert!(!blocks(inst.body(), "launch_template").is_empty());
    // Members talk on 7443 to each other only; the status port is not open to the world.
    let sg = find(&m, "resource", &["aws_security_group", "shoal"]).body();
    let rules = blocks(sg, "ingress");
    let status = rules
        .iter()
        .find(|r| attr(r.body(), "from_port") == "7070")
        .expect("status rule");
    assert_eq!(attr(status.body(), "cidr_blocks"), "var.admin_cidrs");
    assert!(rules.iter().any(|r| attr(r.body(), "from_port") == "7443"
        && r.body().attributes().any(|a| a.key() == "self")));
}

#[test]
fn the_aws_peer_rewrite_matches_what_shoal_gen_cluster_writes() {
    let m = module(&repo().join("deploy/terraform/aws"));
    let locals = m.iter().flat_map(|b| blocks(b, "locals")).next().unwrap();
    for name in ["user_data", "signer_user_data"] {
        let rewrite = attr(locals.body(), name);
        assert!(rewrite.contains("\"  peers: []\""), "{name}: {rewrite}");
    }
    let node = find(&m, "resource", &["aws_instance", "node"]).body();
    let ud = attr(node, "user_data_base64");
    assert!(
        ud.contains("count.index == 0") && ud.contains("local.signer_user_data"),
        "{ud}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(shoal_e2e::shoal_bin())
        .args(["gen", "cluster", "--name", "tf", "--out"])
        .arg(dir.path().join("b"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["b/user-data.yaml", "b/user-data-signer.yaml"] {
        let ud = std::fs::read_to_string(dir.path().join(f)).unwrap();
        // Exactly one line to rewrite, inside the shoal: mapping (two spaces of indent).
        assert_eq!(
            ud.lines().filter(|l| *l == "  peers: []").count(),
            1,
            "{ud}"
        );
        let rewritten = ud.replace("  peers: []", "  peers: [\"10.0.1.10:7443\"]");
        assert!(rewritten.contains("shoal:\n"));
        assert!(rewritten.contains("  peers: [\"10.0.1.10:7443\"]\n"));
    }
}

#[test]
fn libvirt_example_boots_uefi_machines_with_a_seed_and_a_data_volume() {
    let m = module(&repo().join("deploy/terraform/libvirt"));
    let d = find(&m, "resource", &["libvirt_domain", "node"]).body();
    assert_eq!(attr(d, "firmware"), "var.ovmf_code");
    assert!(attr(d, "cloudinit").contains("libvirt_cloudinit_disk.seed"));
    assert_eq!(blocks(d, "disk").len(), 2);
    assert_eq!(blocks(d, "nvram").len(), 1);
    let seed = find(&m, "resource", &["libvirt_cloudinit_disk", "seed"]).body();
    let ud = attr(seed, "user_data");
    assert!(
        ud.contains("count.index == 0")
            && ud.contains("file(local.signer_user_data_file)")
            && ud.contains("file(var.user_data_file)"),
        "{ud}"
    );
}

#[test]
fn debian_packer_validates_the_template() {
    let root = repo();
    assert!(
        root.join("build/image/shoal.raw.sha256").exists(),
        "build the image first (tests/run does: qemu/run build)"
    );
    let out = Command::new("packer")
        .args(["validate", "packer/shoal.pkr.hcl"])
        .current_dir(&root)
        .output()
        .expect("packer (tests/run installs Debian's)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And it refuses a template that names an unknown setting.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pkr.hcl");
    let text = std::fs::read_to_string(root.join("packer/shoal.pkr.hcl"))
        .unwrap()
        .replace(
            "disk_image       = true",
            "disk_image       = true\n  no_such_setting = 1",
        );
    std::fs::write(&bad, text).unwrap();
    let out = Command::new("packer")
        .arg("validate")
        .arg(&bad)
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(!out.status.success());
}
