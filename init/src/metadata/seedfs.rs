//! Reading files from a seed volume in user space: ISO 9660 with Joliet names (what
//! `cloud-localds` and config drives write) and FAT (through the `fatfs` crate). Nothing is
//! mounted, so neither the isofs nor the vfat kernel module is needed at boot.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const SECTOR: u64 = 2048;
const MAX_FILE: u64 = 16 << 20;

fn read_at(f: &mut std::fs::File, off: u64, len: usize) -> Result<Vec<u8>, String> {
    f.seek(SeekFrom::Start(off)).map_err(|e| e.to_string())?;
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).map_err(|e| e.to_string())?;
    Ok(b)
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

struct Entry {
    name: String,
    lba: u64,
    size: u64,
    dir: bool,
}

fn parse_dir(data: &[u8]) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut i = 0usize;
    while i < data.len() {
        let len = data[i] as usize;
        if len == 0 {
            // Records never cross a sector: skip to the next one.
            i = (i / SECTOR as usize + 1) * SECTOR as usize;
            continue;
        }
        if len < 34 || i + len > data.len() {
            break;
        }
        let r = &data[i..i + len];
        let name_len = r[32] as usize;
        if 33 + name_len <= r.len() {
            let raw = &r[33..33 + name_len];
            if raw != [0] && raw != [1] {
                let units: Vec<u16> = raw
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                let name = String::from_utf16_lossy(&units);
                let name = name.split(';').next().unwrap_or("").to_string();
                out.push(Entry {
                    name,
                    lba: u64::from(u32le(r, 2)),
                    size: u64::from(u32le(r, 10)),
                    dir: r[25] & 2 != 0,
                });
            }
        }
        i += len;
    }
    out
}

/// Reads `wanted` paths (e.g. `user-data`, `openstack/latest/meta_data.json`) from an ISO 9660
/// image with Joliet names.
pub fn iso_files(dev: &Path, wanted: &[&str]) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut f = std::fs::File::open(dev).map_err(|e| e.to_string())?;
    let mut root = None;
    for s in 16..64 {
        let vd = read_at(&mut f, s * SECTOR, SECTOR as usize)?;
        if &vd[1..6] != b"CD001" || vd[0] == 255 {
            break;
        }
        let joliet =
            vd[0] == 2 && vd[88] == b'%' && vd[89] == b'/' && matches!(vd[90], b'@' | b'C' | b'E');
        if joliet {
            root = Some((
                u64::from(u32le(&vd, 156 + 2)),
                u64::from(u32le(&vd, 156 + 10)),
            ));
            break;
        }
    }
    let (lba, size) = root.ok_or("no Joliet directory tree on this ISO 9660 volume")?;
    let mut out = BTreeMap::new();
    for path in wanted {
        let (mut l, mut s) = (lba, size);
        let parts: Vec<&str> = path.split('/').collect();
        let mut found = None;
        for (k, part) in parts.iter().enumerate() {
            if s > MAX_FILE {
                break;
            }
            let dir = read_at(&mut f, l * SECTOR, s as usize)?;
            let Some(e) = parse_dir(&dir).into_iter().find(|e| e.name == *part) else {
                break;
            };
            if k + 1 == parts.len() {
                if !e.dir && e.size <= MAX_FILE {
                    found = Some(read_at(&mut f, e.lba * SECTOR, e.size as usize)?);
                }
            } else if e.dir {
                (l, s) = (e.lba, e.size);
            } else {
                break;
            }
        }
        if let Some(b) = found {
            out.insert(path.to_string(), b);
        }
    }
    Ok(out)
}

/// Reads `wanted` paths from a FAT volume.
pub fn fat_files(dev: &Path, wanted: &[&str]) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let f = std::fs::File::open(dev).map_err(|e| e.to_string())?;
    let fs = fatfs::FileSystem::new(f, fatfs::FsOptions::new()).map_err(|e| e.to_string())?;
    let root = fs.root_dir();
    let mut out = BTreeMap::new();
    for path in wanted {
        if let Ok(file) = root.open_file(path) {
            let mut b = Vec::new();
            if file.take(MAX_FILE).read_to_end(&mut b).is_ok() {
                out.insert(path.to_string(), b);
            }
        }
    }
    Ok(out)
}

pub fn files(
    dev: &Path,
    fstype: &str,
    wanted: &[&str],
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    match fstype {
        "iso9660" => iso_files(dev, wanted),
        "vfat" => fat_files(dev, wanted),
        other => Err(format!("{other}: not a seed file system")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn directory_parsing_never_panics(b in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = parse_dir(&b);
        }
    }
}
