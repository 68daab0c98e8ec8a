//! What shoal-init runs against, parsed once at start: the real machine, or in test mode
//! (`SHOAL_INIT_ROOT=DIR`) a scratch root and the fixtures a test names. Nothing else in init
//! reads a `SHOAL_INIT_*` variable; everything that depends on one is handed this value.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitEnv {
    /// Where every path lives: `/`, or the test's scratch root.
    pub root: PathBuf,
    /// Test mode: nothing outside the scratch root and the named fixtures is touched.
    pub test: bool,
    /// The service table (`SHOAL_INIT_SERVICES`); the built-in one when absent.
    pub services: Option<PathBuf>,
    /// The only block devices looked at (`SHOAL_INIT_DISKS`, names under `/dev`).
    pub disks: Option<Vec<String>>,
    /// The only network interfaces configured (`SHOAL_INIT_NET_IFACES`).
    pub net_ifaces: Option<Vec<String>>,
    /// The only input devices watched for the power key (`SHOAL_INIT_INPUT`).
    pub input: Option<Vec<String>>,
    /// Set the host name in test mode (`SHOAL_INIT_UTS`: the test has its own UTS namespace).
    pub uts: bool,
    /// The kernel command line in test mode (`SHOAL_INIT_CMDLINE`), never the host's.
    pub cmdline: Option<String>,
    /// Where the HTTP metadata services are (`SHOAL_INIT_METADATA_HOST` in test mode).
    pub metadata_host: Option<String>,
    /// Treat the clock as obviously wrong (`SHOAL_INIT_CLOCK_WRONG`, test mode).
    pub clock_wrong: bool,
    /// How often the clock is checked (`SHOAL_INIT_NTP_INTERVAL_MS`, test mode).
    pub ntp_interval: Option<Duration>,
    /// The firmware's DMI strings (`SHOAL_INIT_DMI`, test mode).
    pub dmi: PathBuf,
}

fn list(v: Option<String>) -> Option<Vec<String>> {
    v.map(|v| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

impl InitEnv {
    /// From the process environment.
    pub fn from_env() -> InitEnv {
        InitEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// From any source of variables. Test fixtures are honoured only in test mode.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> InitEnv {
        let root = get("SHOAL_INIT_ROOT").filter(|r| !r.is_empty());
        let test = root.is_some();
        let fixture = |k: &str| if test { get(k) } else { None };
        InitEnv {
            root: root
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/")),
            test,
            services: fixture("SHOAL_INIT_SERVICES").map(PathBuf::from),
            disks: list(fixture("SHOAL_INIT_DISKS")),
            net_ifaces: list(fixture("SHOAL_INIT_NET_IFACES")),
            input: list(fixture("SHOAL_INIT_INPUT")),
            uts: fixture("SHOAL_INIT_UTS").is_some(),
            cmdline: if test {
                Some(get("SHOAL_INIT_CMDLINE").unwrap_or_default())
            } else {
                None
            },
            metadata_host: if test {
                get("SHOAL_INIT_METADATA_HOST")
            } else {
                Some(crate::metadata::LINK_LOCAL.to_string())
            },
            clock_wrong: fixture("SHOAL_INIT_CLOCK_WRONG").is_some(),
            ntp_interval: fixture("SHOAL_INIT_NTP_INTERVAL_MS")
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis),
            dmi: fixture("SHOAL_INIT_DMI")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/sys/class/dmi/id")),
        }
    }

    /// A path under the root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> InitEnv {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        InitEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn a_real_boot_ignores_every_test_fixture() {
        let e = env(&[
            ("SHOAL_INIT_DISKS", "loop0"),
            ("SHOAL_INIT_CMDLINE", "ds=evil"),
            ("SHOAL_INIT_DMI", "/tmp/fake"),
            ("SHOAL_INIT_METADATA_HOST", "10.0.0.1:80"),
        ]);
        assert!(!e.test);
        assert_eq!(e.root, PathBuf::from("/"));
        assert_eq!(e.disks, None);
        assert_eq!(e.cmdline, None);
        assert_eq!(e.dmi, PathBuf::from("/sys/class/dmi/id"));
        assert_eq!(e.metadata_host.as_deref(), Some("169.254.169.254"));
    }

    #[test]
    fn test_mode_takes_the_fixtures_it_is_given() {
        let e = env(&[
            ("SHOAL_INIT_ROOT", "/tmp/r"),
            ("SHOAL_INIT_DISKS", "loop3, loop4,"),
            ("SHOAL_INIT_NET_IFACES", "eth0"),
            ("SHOAL_INIT_NTP_INTERVAL_MS", "250"),
            ("SHOAL_INIT_UTS", "1"),
        ]);
        assert!(e.test);
        assert_eq!(e.path("/run/shoal"), PathBuf::from("/tmp/r/run/shoal"));
        assert_eq!(e.disks, Some(vec!["loop3".into(), "loop4".into()]));
        assert_eq!(e.net_ifaces, Some(vec!["eth0".into()]));
        assert_eq!(e.ntp_interval, Some(Duration::from_millis(250)));
        assert!(e.uts && !e.clock_wrong);
        // No metadata host unless the test names one; the command line is empty, not the host's.
        assert_eq!(e.metadata_host, None);
        assert_eq!(e.cmdline.as_deref(), Some(""));
    }
}
