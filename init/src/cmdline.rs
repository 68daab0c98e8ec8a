//! The kernel command line (`/proc/cmdline`): space-separated words, double quotes group
//! spaces into one word (`key="a b"`), `key=value` or a bare flag. Later duplicates win, as
//! the kernel's own parameters do. Never fails: whatever it cannot read is kept as flags.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    params: BTreeMap<String, String>,
    flags: Vec<String>,
}

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        let mut any = false;
        for c in text.chars() {
            match c {
                '"' => {
                    quoted = !quoted;
                    any = true;
                }
                c if c.is_whitespace() && !quoted => {
                    if any {
                        words.push(std::mem::take(&mut cur));
                        any = false;
                    }
                }
                c => {
                    cur.push(c);
                    any = true;
                }
            }
        }
        if any {
            words.push(cur);
        }
        let mut out = Cmdline::default();
        for w in words {
            match w.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    out.params.insert(k.to_string(), v.to_string());
                }
                _ => out.flags.push(w),
            }
        }
        out
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    #[cfg(test)]
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_what_kernels_and_bootloaders_write() {
        let c = Cmdline::parse(
            "BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro quiet console=ttyS0,115200 ip=10.0.0.2::10.0.0.1:255.255.255.0:n1:eth0:off \"ds=nocloud;s=http://10.0.0.1/seed/\" shoal.net=\"a b\" root=/dev/vdb\n",
        );
        assert_eq!(c.get("root"), Some("/dev/vdb"), "later duplicates win");
        assert_eq!(c.get("console"), Some("ttyS0,115200"));
        assert_eq!(c.get("ds"), Some("nocloud;s=http://10.0.0.1/seed/"));
        assert_eq!(c.get("shoal.net"), Some("a b"));
        assert!(c.has_flag("ro") && c.has_flag("quiet"));
        assert_eq!(c.get("nope"), None);
        assert_eq!(Cmdline::parse(""), Cmdline::default());
        assert!(Cmdline::parse("=x").has_flag("=x"));
    }

    proptest! {
        #[test]
        fn never_panics_and_round_trips_simple_pairs(
            text in ".{0,300}",
            pairs in proptest::collection::btree_map("[a-z][a-z0-9._]{0,8}", "[a-zA-Z0-9,:/.]{0,12}", 0..8),
        ) {
            let _ = Cmdline::parse(&text);
            let line: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let c = Cmdline::parse(&line.join(" "));
            for (k, v) in &pairs {
                prop_assert_eq!(c.get(k), Some(v.as_str()));
            }
        }
    }
}
