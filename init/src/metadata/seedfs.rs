//! Reading files from a seed volume in user space: ISO 9660 with Joliet names (what
//! `cloud-localds` and config drives write) and FAT (through the `fatfs` crate). Nothing is
//! mounted, so neither the isofs nor the vfat kernel module is needed at boot.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const SECTOR: u64 = 2048;
const MAX_FILE: u64 = 16 << 20;

/// Why a seed volume's files could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("no Joliet directory tree on this ISO 9660 volume")]
    NoJoliet,
    #[error("the FAT volume's boot sector is malformed")]
    FatBootSector,
    #[error("the FAT volume is malformed (its reader gave up)")]
    FatPanicked,
    #[error("{0}: not a seed file system")]
    NotASeed(String),
}

type Files = Result<BTreeMap<String, Vec<u8>>, SeedError>;

fn read_at(f: &mut std::fs::File, off: u64, len: usize) -> Result<Vec<u8>, SeedError> {
    f.seek(SeekFrom::Start(off))?;
    let mut b = vec![0u8; len];
    f.read_exact(&mut b)?;
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
pub fn iso_files(dev: &Path, wanted: &[&str]) -> Files {
    let mut f = std::fs::File::open(dev)?;
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
    let (lba, size) = root.ok_or(SeedError::NoJoliet)?;
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

/// Bytes a FAT volume may make us read in all: every wanted file at its largest, and room for
/// directories. A cyclic cluster chain (a hostile or broken seed) reads on forever; the budget
/// turns it into an error instead of a hung boot.
const FAT_READ_BUDGET: u64 = 64 << 20;

/// A read-only device that refuses to read past a budget.
struct Budgeted<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other(
                "read budget spent: the volume's cluster chains loop or are far too long",
            ));
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

impl<R> std::io::Write for Budgeted<R> {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("the seed volume is read only"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<R: Seek> Seek for Budgeted<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Reads `wanted` paths from a FAT volume, within `FAT_READ_BUDGET`. The FAT crate is not
/// ours and meets hostile volumes here: a panic inside it (its arithmetic overflows on some
/// malformed boot sectors, found by fuzzing) is an unreadable seed, not a failed boot stage.
pub fn fat_files(dev: &Path, wanted: &[&str]) -> Files {
    std::panic::catch_unwind(|| fat_files_inner(dev, wanted)).unwrap_or(Err(SeedError::FatPanicked))
}

/// Whether the boot sector's FAT geometry is one the reader computes with without
/// overflowing: a FAT of at least one sector whose size in bits fits 32 bits. (The reader
/// would wrap, or panic in a debug build; such a volume is malformed anyway.)
pub fn fat_geometry_sane(boot: &[u8]) -> bool {
    let (Some(bps), Some(spf16), Some(spf32)) =
        (boot.get(11..13), boot.get(22..24), boot.get(36..40))
    else {
        return false;
    };
    let bps = u64::from(u16::from_le_bytes([bps[0], bps[1]]));
    let spf16 = u16::from_le_bytes([spf16[0], spf16[1]]);
    let spf = if spf16 != 0 {
        u64::from(spf16)
    } else {
        u64::from(u32::from_le_bytes([spf32[0], spf32[1], spf32[2], spf32[3]]))
    };
    spf > 0 && spf * bps * 8 <= u64::from(u32::MAX)
}

fn fat_files_inner(dev: &Path, wanted: &[&str]) -> Files {
    let mut f = std::fs::File::open(dev)?;
    let mut boot = [0u8; 512];
    f.read_exact(&mut boot)?;
    if !fat_geometry_sane(&boot) {
        return Err(SeedError::FatBootSector);
    }
    f.seek(std::io::SeekFrom::Start(0))?;
    let f = Budgeted {
        inner: f,
        left: FAT_READ_BUDGET,
    };
    let fs = fatfs::FileSystem::new(f, fatfs::FsOptions::new())?;
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

pub fn files(dev: &Path, fstype: &str, wanted: &[&str]) -> Files {
    match fstype {
        "iso9660" => iso_files(dev, wanted),
        "vfat" => fat_files(dev, wanted),
        other => Err(SeedError::NotASeed(other.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fat_geometry_that_would_overflow_the_reader_is_refused() {
        let sector = |bps: u16, spf16: u16, spf32: u32| {
            let mut b = vec![0u8; 512];
            b[11..13].copy_from_slice(&bps.to_le_bytes());
            b[22..24].copy_from_slice(&spf16.to_le_bytes());
            b[36..40].copy_from_slice(&spf32.to_le_bytes());
            b
        };
        assert!(fat_geometry_sane(&sector(512, 9, 0)));
        assert!(fat_geometry_sane(&sector(512, 0, 1009)));
        // Found by fuzzing with debug assertions: 2^26 sectors of FAT32, 2^38 bits.
        assert!(!fat_geometry_sane(&sector(512, 0, 1 << 26)));
        assert!(!fat_geometry_sane(&sector(512, 0, 0)));
        assert!(!fat_geometry_sane(&[0u8; 20]));
    }

    #[test]
    fn a_cyclic_fat_chain_ends_in_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("seed.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(40 << 20)
            .unwrap();
        let ok = std::process::Command::new("mkfs.vfat")
            .args(["-F", "32", "-n", "CIDATA"])
            .arg(&img)
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "mkfs.vfat (dosfstools) is needed");
        // Point the root directory's first cluster at itself in the FAT, and fill it with
        // deleted entries, so a directory walk never meets the end marker.
        let mut b = std::fs::read(&img).unwrap();
        let bps = u16::from_le_bytes([b[11], b[12]]) as usize;
        let per_cluster = b[13] as usize;
        let reserved = u16::from_le_bytes([b[14], b[15]]) as usize;
        let fats = b[16] as usize;
        let fat_sectors = u32le(&b, 36) as usize;
        let root = u32le(&b, 44);
        let at = reserved * bps + root as usize * 4;
        b[at..at + 4].copy_from_slice(&root.to_le_bytes());
        let data = (reserved + fats * fat_sectors) * bps + (root as usize - 2) * per_cluster * bps;
        for e in (data..data + per_cluster * bps).step_by(32) {
            b[e] = 0xE5;
            b[e + 11] = 0x20;
        }
        std::fs::write(&img, &b).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = img.clone();
        std::thread::spawn(move || {
            let _ = tx.send(fat_files(&path, &["meta-data", "user-data"]));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("reading a cyclic FAT volume hung");
        // Nothing found (an error or an empty answer), and in bounded time.
        assert!(r.map(|m| m.is_empty()).unwrap_or(true));
    }

    proptest! {
        #[test]
        fn directory_parsing_never_panics(b in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = parse_dir(&b);
        }
    }
}
