//! Finding a volume by its file-system label without udev: read the superblock of every block
//! device and recognise ext4, vfat and iso9660 labels (what `blkid` would say, for the three
//! file systems a shoal machine meets: its data disk, NoCloud seeds, config drives).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub fstype: &'static str,
    pub label: String,
}

fn trim_label(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches(['\0', ' '])
        .to_string()
}

/// Recognises the file system in the first 64 KiB of a device.
pub fn probe_bytes(b: &[u8]) -> Option<Probe> {
    // iso9660: primary volume descriptor at 32 KiB, "CD001", volume id at +40 (32 bytes).
    if b.len() >= 0x8000 + 72 && &b[0x8001..0x8006] == b"CD001" {
        return Some(Probe {
            fstype: "iso9660",
            label: trim_label(&b[0x8028..0x8048]),
        });
    }
    // ext2/3/4: superblock at 1 KiB, magic 0xEF53 at +56, volume name at +120 (16 bytes).
    if b.len() >= 1024 + 136 && b[1024 + 56] == 0x53 && b[1024 + 57] == 0xEF {
        return Some(Probe {
            fstype: "ext4",
            label: trim_label(&b[1024 + 120..1024 + 136]),
        });
    }
    // FAT: boot signature 0x55AA; FAT32 keeps its label at 0x47, FAT12/16 at 0x2B.
    if b.len() >= 512 && b[510] == 0x55 && b[511] == 0xAA {
        if &b[0x52..0x57] == b"FAT32" {
            return Some(Probe {
                fstype: "vfat",
                label: trim_label(&b[0x47..0x52]),
            });
        }
        if &b[0x36..0x39] == b"FAT" {
            return Some(Probe {
                fstype: "vfat",
                label: trim_label(&b[0x2B..0x36]),
            });
        }
    }
    None
}

/// Whether a device looks blank: its first 64 KiB are all zero.
pub fn blank(b: &[u8]) -> bool {
    b.iter().all(|x| *x == 0)
}

pub fn read_head(dev: &Path) -> Option<Vec<u8>> {
    let mut f = std::fs::File::open(dev).ok()?;
    f.seek(SeekFrom::Start(0)).ok()?;
    let mut b = vec![0u8; 64 * 1024];
    let mut n = 0;
    while n < b.len() {
        match f.read(&mut b[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
    }
    b.truncate(n);
    Some(b)
}

/// Candidate block devices: every entry of `/sys/class/block` (disks and partitions), or
/// only those in `only` (test mode: `InitEnv::disks`). Paths are under `root/dev`.
pub fn devices(root: &Path, only: Option<&[String]>) -> Vec<PathBuf> {
    if let Some(list) = only {
        return list
            .iter()
            .map(|s| root.join("dev").join(s.trim().trim_start_matches("/dev/")))
            .collect();
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(root.join("sys/class/block"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("zram")
                })
                .map(|n| root.join("dev").join(n))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The first device whose label is `label` (case-insensitive), with its file system.
pub fn find(root: &Path, only: Option<&[String]>, label: &str) -> Option<(PathBuf, Probe)> {
    devices(root, only).into_iter().find_map(|d| {
        let p = probe_bytes(&read_head(&d)?)?;
        p.label.eq_ignore_ascii_case(label).then_some((d, p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn recognises_labels() {
        let mut iso = vec![0u8; 0x9000];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        iso[0x8028..0x802E].copy_from_slice(b"cidata");
        assert_eq!(
            probe_bytes(&iso),
            Some(Probe {
                fstype: "iso9660",
                label: "cidata".into()
            })
        );
        let mut ext = vec![0u8; 4096];
        ext[1024 + 56] = 0x53;
        ext[1024 + 57] = 0xEF;
        ext[1024 + 120..1024 + 130].copy_from_slice(b"SHOAL_DATA");
        assert_eq!(probe_bytes(&ext).unwrap().label, "SHOAL_DATA");
        let mut fat = vec![0u8; 512];
        fat[510] = 0x55;
        fat[511] = 0xAA;
        fat[0x36..0x39].copy_from_slice(b"FAT");
        fat[0x2B..0x36].copy_from_slice(b"CIDATA     ");
        assert_eq!(
            probe_bytes(&fat),
            Some(Probe {
                fstype: "vfat",
                label: "CIDATA".into()
            })
        );
        assert_eq!(probe_bytes(&[0u8; 70000]), None);
        assert!(blank(&[0u8; 10]) && !blank(&[0, 1]));
    }

    proptest! {
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = probe_bytes(&b);
        }
    }
}
