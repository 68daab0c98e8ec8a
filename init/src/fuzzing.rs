//! Entry points for the decoders of untrusted input, one per fuzz target (`fuzz/`), also run
//! over the fuzzers' corpora by `cargo test` (`tests/fuzz_corpora.rs`). Each takes any bytes
//! and must return without panicking, hanging or writing outside its scratch directory.

use std::path::PathBuf;

/// A scratch directory of this process, made once.
fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-init-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

fn as_volume(data: &[u8]) -> PathBuf {
    let p = scratch().join("volume.img");
    let _ = std::fs::write(&p, data);
    p
}

/// An ISO 9660 seed (NoCloud and config-drive files).
pub fn iso(data: &[u8]) {
    let v = as_volume(data);
    let _ = crate::metadata::seedfs::iso_files(&v, &crate::metadata::NOCLOUD_FILES);
    let _ = crate::metadata::seedfs::iso_files(&v, &crate::metadata::CONFIG_DRIVE_FILES);
}

/// A FAT seed.
pub fn fat(data: &[u8]) {
    let v = as_volume(data);
    let _ = crate::metadata::seedfs::fat_files(&v, &crate::metadata::NOCLOUD_FILES);
    let _ = crate::metadata::seedfs::fat_files(&v, &crate::metadata::CONFIG_DRIVE_FILES);
}

/// User-data, `write_files` landing in a scratch root.
pub fn user_data(data: &[u8]) {
    let root = scratch().join("root");
    let _ = std::fs::create_dir_all(root.join("var"));
    let _ = std::fs::create_dir_all(root.join("run"));
    let _ = crate::metadata::userdata::process(&root, data);
}

/// NoCloud network-config, the kernel's `ip=` and shoal's own `shoal.net=`.
pub fn network_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::net::config::parse_network_config(&text);
    let _ = crate::net::config::parse_kernel_ip(&text);
    let _ = crate::net::config::parse_shoal_net(&text);
}

/// A DHCP reply and the lease read from it.
pub fn dhcp(data: &[u8]) {
    if let Some(m) = crate::net::dhcp::decode(data) {
        let _ = crate::net::dhcp::lease_from(&m);
    }
}

/// A decoder under fuzzing.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/` and the corpus test know them.
pub const TARGETS: [(&str, Target); 5] = [
    ("iso", iso),
    ("fat", fat),
    ("user_data", user_data),
    ("network_config", network_config),
    ("dhcp", dhcp),
];
