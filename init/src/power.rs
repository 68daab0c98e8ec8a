//! The power button: the kernel's ACPI button driver (what QEMU's `system_powerdown` and a
//! real button press reach) reports `KEY_POWER` on an input device. Init reads those devices
//! and powers off cleanly on a press.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// `struct input_event` on 64-bit Linux: a timeval (16 bytes), type, code, value.
const EVENT_SIZE: usize = 24;

/// Whether a sysfs `capabilities/key` bitmap (hex words, most significant first) has KEY_POWER.
pub fn has_key_power(bitmap: &str) -> bool {
    let words: Vec<u64> = bitmap
        .split_whitespace()
        .rev()
        .filter_map(|w| u64::from_str_radix(w, 16).ok())
        .collect();
    let (word, bit) = (usize::from(KEY_POWER) / 64, usize::from(KEY_POWER) % 64);
    words.get(word).is_some_and(|w| w & (1 << bit) != 0)
}

/// Whether a run of input events holds a KEY_POWER press.
pub fn pressed(buf: &[u8]) -> bool {
    buf.chunks_exact(EVENT_SIZE).any(|e| {
        let kind = u16::from_le_bytes([e[16], e[17]]);
        let code = u16::from_le_bytes([e[18], e[19]]);
        let value = i32::from_le_bytes([e[20], e[21], e[22], e[23]]);
        kind == EV_KEY && code == KEY_POWER && value == 1
    })
}

pub struct Buttons {
    files: Vec<File>,
}

impl Buttons {
    /// Opens every input device that has a power key (in test mode only those in `listed`:
    /// `InitEnv::input`).
    pub fn open(
        root: &Path,
        listed: Option<&[String]>,
        test: bool,
        detail: &mut Vec<String>,
    ) -> Buttons {
        if test && listed.is_none() {
            detail.push("power button: not watched in test mode".into());
            return Buttons { files: vec![] };
        }
        let mut files = Vec::new();
        let names: Vec<String> = std::fs::read_dir(root.join("sys/class/input"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("event"))
                    .collect()
            })
            .unwrap_or_default();
        for n in names {
            if listed.as_ref().is_some_and(|l| !l.contains(&n)) {
                continue;
            }
            let caps = std::fs::read_to_string(
                root.join("sys/class/input")
                    .join(&n)
                    .join("device/capabilities/key"),
            )
            .unwrap_or_default();
            if !has_key_power(&caps) {
                continue;
            }
            let path = root.join("dev/input").join(&n);
            match std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(&path)
            {
                Ok(f) => {
                    detail.push(format!("power button: {n}"));
                    files.push(f);
                }
                Err(e) => detail.push(format!("power button {n}: {e}")),
            }
        }
        Buttons { files }
    }

    pub fn none() -> Buttons {
        Buttons { files: vec![] }
    }

    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.files.iter().map(|f| f.as_fd()).collect()
    }

    /// Reads what device `i` has; true on a power key press.
    pub fn read(&mut self, i: usize) -> bool {
        let mut buf = [0u8; EVENT_SIZE * 16];
        let Some(f) = self.files.get_mut(i) else {
            return false;
        };
        match f.read(&mut buf) {
            Ok(n) => pressed(&buf[..n - n % EVENT_SIZE]),
            Err(_) => false,
        }
    }
}

use std::os::unix::fs::OpenOptionsExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_bitmaps_and_events() {
        // The ACPI "Power Button" device: only KEY_POWER (bit 116 = word 1, bit 52).
        assert!(has_key_power("10000000000000 0"));
        assert!(!has_key_power("0"));
        assert!(!has_key_power("ffffffffffffffff"));
        assert!(!has_key_power("garbage"));
        let event = |kind: u16, code: u16, value: i32| {
            let mut e = vec![0u8; 16];
            e.extend_from_slice(&kind.to_le_bytes());
            e.extend_from_slice(&code.to_le_bytes());
            e.extend_from_slice(&value.to_le_bytes());
            e
        };
        let mut run = event(EV_KEY, KEY_POWER, 0);
        assert!(!pressed(&run), "a release is not a press");
        run.extend(event(0, 0, 0));
        run.extend(event(EV_KEY, KEY_POWER, 1));
        assert!(pressed(&run));
        assert!(!pressed(&event(EV_KEY, 115, 1)));
        assert!(!pressed(&run[..30]));
    }
}
