//! The workspace's binaries, built once per test process where they are missing (or taken from
//! `SHOAL_BIN` / `SHOAL_INIT_BIN`): one `workspace_bin` for all of them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

static BIN: OnceLock<PathBuf> = OnceLock::new();

/// The workspace's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds `bin` of `package` with cargo `profile` (`dev` for the debug build) and answers its
/// path: the one place the tests build a workspace binary.
pub fn workspace_bin(package: &str, bin: &str, profile: &str) -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "--profile",
            profile,
            "-p",
            package,
            "--bin",
            bin,
        ])
        .current_dir(workspace())
        .status()
        .expect("running cargo build");
    assert!(
        status.success(),
        "cargo build --profile {profile} -p {package} failed"
    );
    let dir = if profile == "dev" { "debug" } else { profile };
    workspace().join("target").join(dir).join(bin)
}

/// Builds the release binary (or takes `SHOAL_BIN`: a build with symbols, to profile) and
/// makes every agent started from now on use it.
pub fn use_release_bin() -> PathBuf {
    let bin = match std::env::var("SHOAL_BIN") {
        Ok(p) => PathBuf::from(p),
        Err(_) => workspace_bin("shoal", "shoal", "release"),
    };
    BIN.get_or_init(|| bin).clone()
}

/// The workspace's `target/debug/shoal` (or `SHOAL_BIN`), built once per test process.
pub fn shoal_bin() -> PathBuf {
    BIN.get_or_init(|| match std::env::var("SHOAL_BIN") {
        Ok(p) => PathBuf::from(p),
        Err(_) => workspace_bin("shoal", "shoal", "dev"),
    })
    .clone()
}

/// `unshare` arguments that run a command as PID 1 of fresh PID and mount namespaces (test
/// mode of shoal-init). `--kill-child`: when a test drops `unshare`, its namespace goes too.
pub const UNSHARE_PID1: [&str; 6] = [
    "--pid",
    "--fork",
    "--kill-child",
    "--mount",
    "--propagation",
    "private",
];

/// The workspace's `target/debug/shoal-init` (or `SHOAL_INIT_BIN`), built once per test process.
pub fn init_bin() -> PathBuf {
    static INIT: OnceLock<PathBuf> = OnceLock::new();
    INIT.get_or_init(|| match std::env::var("SHOAL_INIT_BIN") {
        Ok(p) => PathBuf::from(p),
        Err(_) => workspace_bin("shoal-init", "shoal-init", "dev"),
    })
    .clone()
}
