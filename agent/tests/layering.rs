//! The invariants of ARCHITECTURE.md that a reading of the source can check: the sans-IO core
//! imports no runtime, network, engine or clock; no module below the composition root imports
//! the daemon, the API or the CLI; init links no agent code.

use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `agent/src/<rel>` (a directory or a file), with its text.
fn files(rel: &str) -> Vec<(String, String)> {
    let p = src().join(rel);
    let mut out = Vec::new();
    let mut stack = vec![p];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if p.extension().is_some_and(|e| e == "rs") {
            let name = p.strip_prefix(src()).unwrap().display().to_string();
            out.push((name, std::fs::read_to_string(&p).unwrap()));
        }
    }
    assert!(!out.is_empty(), "no sources under {rel}");
    out
}

/// The code of a file without its comments.
fn code(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

const CORE: [&str; 7] = [
    "store",
    "sync",
    "membership",
    "node.rs",
    "scheduler",
    "executor/plan.rs",
    "sim",
];

#[test]
fn the_sans_io_core_does_no_io_and_reads_no_clock() {
    let banned = [
        "tokio",
        "hyper",
        "bollard",
        "rustls",
        "std::net::Tcp",
        "std::net::Udp",
        "SystemTime",
        "Instant::now",
        "std::process",
    ];
    let mut found = Vec::new();
    for m in CORE {
        for (name, text) in files(m) {
            let code = code(&text);
            for b in banned {
                if code.contains(b) {
                    found.push(format!("{name}: {b}"));
                }
            }
            // The storage engine is the backend's alone.
            if name != "store/backend.rs" && (code.contains("redb") || code.contains("std::fs")) {
                found.push(format!("{name}: redb or std::fs outside store/backend.rs"));
            }
        }
    }
    assert!(found.is_empty(), "IO in the sans-IO core: {found:#?}");
}

#[test]
fn no_module_below_the_composition_root_imports_it() {
    let mut found = Vec::new();
    for (name, text) in files(".") {
        let code = code(&text);
        let top = name.split('/').next().unwrap_or_default();
        for (module, allowed) in [
            ("crate::daemon", &["daemon", "cli"][..]),
            ("crate::api", &["daemon", "cli", "api"][..]),
            ("crate::cli", &["cli", "main.rs"][..]),
        ] {
            let allowed = allowed.iter().any(|a| top == *a || name == *a);
            if !allowed && code.contains(module) {
                found.push(format!("{name} imports {module}"));
            }
        }
    }
    assert!(found.is_empty(), "upward imports: {found:#?}");
}

#[test]
fn init_links_no_agent_code() {
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("../init/Cargo.toml");
    let manifest = std::fs::read_to_string(init).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap_or_default()
        .split("\n[")
        .next()
        .unwrap_or_default();
    assert!(
        !deps
            .lines()
            .any(|l| l.trim_start().starts_with("shoal ") || l.trim_start().starts_with("shoal=")),
        "init depends on the agent:\n{deps}"
    );
}
