//! The clock: when it is obviously wrong (before this release was built), set it from an SNTP
//! server (RFC 4330) named by DHCP, the kernel's `ip=`, or user-data's `ntp:`. TLS certificates
//! and the store's versions depend on a sane clock.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// No clock reads earlier than this on a machine running this release (2026-01-01).
pub const NOT_BEFORE_UNIX: u64 = 1_767_225_600;
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

pub fn obviously_wrong(now: SystemTime) -> bool {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() < NOT_BEFORE_UNIX)
        .unwrap_or(true)
}

/// Builds a client request whose transmit timestamp is `cookie` (echoed back as "originate").
pub fn request(cookie: u64) -> [u8; 48] {
    let mut p = [0u8; 48];
    p[0] = 0x23; // LI 0, version 4, mode 3 (client)
    p[40..48].copy_from_slice(&cookie.to_be_bytes());
    p
}

/// Why a clock check got no time, or could not set it.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("short SNTP reply")]
    Short,
    #[error("not a server reply")]
    NotServer,
    #[error("kiss-o'-death from the server")]
    KissOfDeath,
    #[error("reply does not answer our request")]
    NotOurs,
    #[error("server time before 1970")]
    BeforeEpoch,
    #[error("{server}: no address")]
    NoAddress { server: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("reply from {from}, not {to}")]
    WrongPeer { from: SocketAddr, to: SocketAddr },
    #[error("setting the clock: {0}")]
    Set(#[from] nix::errno::Errno),
    #[error("no NTP server is known (DHCP option 42, user-data ntp:, or the cloud's)")]
    NoServer,
    /// Every server failed: each one's error.
    #[error("{}", .0.join("; "))]
    AllFailed(Vec<String>),
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ClockError {
    let what = what.to_string();
    move |source| ClockError::Io { what, source }
}

/// Reads the server's transmit time from a reply to `cookie`.
pub fn parse_reply(b: &[u8], cookie: u64) -> Result<SystemTime, ClockError> {
    if b.len() < 48 {
        return Err(ClockError::Short);
    }
    if b[0] & 0x7 != 4 {
        return Err(ClockError::NotServer);
    }
    if b[1] == 0 {
        return Err(ClockError::KissOfDeath);
    }
    if b[24..32] != cookie.to_be_bytes() {
        return Err(ClockError::NotOurs);
    }
    let secs = u64::from(u32::from_be_bytes([b[40], b[41], b[42], b[43]]));
    let frac = u64::from(u32::from_be_bytes([b[44], b[45], b[46], b[47]]));
    let unix = secs
        .checked_sub(NTP_UNIX_OFFSET)
        .ok_or(ClockError::BeforeEpoch)?;
    Ok(UNIX_EPOCH + Duration::from_secs(unix) + Duration::from_nanos((frac * 1_000_000_000) >> 32))
}

/// Asks `server` (`host` or `host:port`, port 123 by default) for the time.
pub fn query(server: &str, timeout: Duration) -> Result<SystemTime, ClockError> {
    let with_port = if server.contains(':') {
        server.to_string()
    } else {
        format!("{server}:123")
    };
    let addr: SocketAddr = with_port
        .to_socket_addrs()
        .map_err(io(server))?
        .next()
        .ok_or_else(|| ClockError::NoAddress {
            server: server.into(),
        })?;
    let sock = UdpSocket::bind(("0.0.0.0", 0)).map_err(io("socket"))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(io("SO_RCVTIMEO"))?;
    let cookie = (crate::report::now_ms() << 16) ^ u64::from(std::process::id());
    sock.send_to(&request(cookie), addr).map_err(io(addr))?;
    let mut buf = [0u8; 512];
    let (n, from) = sock.recv_from(&mut buf).map_err(io(addr))?;
    if from != addr {
        return Err(ClockError::WrongPeer { from, to: addr });
    }
    parse_reply(&buf[..n], cookie)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn replies_are_checked() {
        let cookie: u64 = 0x1122_3344_5566_7788;
        let mut r = [0u8; 48];
        r[0] = 0x24;
        r[1] = 2;
        r[24..32].copy_from_slice(&cookie.to_be_bytes());
        let t: u32 = (1_900_000_000 + NTP_UNIX_OFFSET) as u32;
        r[40..44].copy_from_slice(&t.to_be_bytes());
        r[44..48].copy_from_slice(&0x8000_0000u32.to_be_bytes());
        let got = parse_reply(&r, cookie).unwrap();
        assert_eq!(got, UNIX_EPOCH + Duration::from_millis(1_900_000_000_500));
        assert!(parse_reply(&r, cookie + 1).is_err());
        let mut kod = r;
        kod[1] = 0;
        assert!(parse_reply(&kod, cookie).is_err());
        assert!(parse_reply(&r[..20], cookie).is_err());
        assert!(obviously_wrong(UNIX_EPOCH + Duration::from_secs(86_400)));
        assert!(!obviously_wrong(
            UNIX_EPOCH + Duration::from_secs(NOT_BEFORE_UNIX + 1)
        ));
        assert_eq!(request(cookie)[0], 0x23);
    }

    proptest! {
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..100), c in any::<u64>()) {
            let _ = parse_reply(&b, c);
        }
    }
}

/// Step the clock when it is this far off; below it the error is harmless to TLS and to the
/// store's 15-minute drift bound, and stepping would only make time jump for nothing.
pub const STEP_MS: i64 = 500;
/// How often the clock is checked after boot.
pub const INTERVAL: Duration = Duration::from_secs(15 * 60);

/// What the keeper last did, for the boot report (`clock`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Kept {
    /// The server that answered last, and when (ms since the epoch, after any step).
    pub server: Option<String>,
    pub synced_at_ms: Option<u64>,
    /// The last measured offset (server minus us), in ms.
    pub offset_ms: Option<i64>,
    pub queries: u64,
    pub steps: u64,
    pub last_error: Option<String>,
}

/// One check against the first of `servers` that answers: measures the offset (correcting
/// for half the round trip) and steps the clock past `STEP_MS` (only reports it with `dry`).
pub fn check(
    sys: &dyn crate::sys::Sys,
    servers: &[String],
    dry: bool,
    kept: &mut Kept,
) -> Result<String, ClockError> {
    if servers.is_empty() {
        return Err(ClockError::NoServer);
    }
    let mut errors = Vec::new();
    for s in servers {
        kept.queries += 1;
        let t0 = SystemTime::now();
        let started = std::time::Instant::now();
        let theirs = match query(s, Duration::from_secs(2)) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{s}: {e}"));
                continue;
            }
        };
        let rtt = started.elapsed();
        let ours = t0 + rtt / 2;
        let offset_ms = match theirs.duration_since(ours) {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        };
        kept.server = Some(s.clone());
        kept.offset_ms = Some(offset_ms);
        kept.last_error = None;
        let unix = theirs
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let said = if offset_ms.abs() <= STEP_MS {
            format!("clock within {offset_ms} ms of {s}")
        } else if dry {
            format!("would set the clock to {unix} (unix) from {s} (off by {offset_ms} ms); not in test mode")
        } else {
            sys.set_clock(theirs + rtt / 2)?;
            kept.steps += 1;
            format!("clock set to {unix} (unix) from {s} (was off by {offset_ms} ms)")
        };
        kept.synced_at_ms = Some(crate::report::now_ms());
        return Ok(said);
    }
    let e = ClockError::AllFailed(errors);
    kept.last_error = Some(e.to_string());
    Err(e)
}

/// Checks the clock every `every` for as long as PID 1 lives, against the servers
/// `servers()` names at the time (DHCP renewals may change them).
pub fn keep(
    sys: std::sync::Arc<dyn crate::sys::Sys>,
    servers: impl Fn() -> Vec<String> + Send + 'static,
    every: Duration,
    dry: bool,
    kept: std::sync::Arc<std::sync::Mutex<Kept>>,
) {
    let spawned = std::thread::Builder::new()
        .name("clock".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let list = servers();
            let mut k = kept.lock().map(|k| k.clone()).unwrap_or_default();
            match check(&*sys, &list, dry, &mut k) {
                Ok(said) if said.starts_with("clock set") => crate::console(&said),
                Ok(_) => {}
                Err(e) => crate::console(&format!("clock: {e}")),
            }
            if let Ok(mut g) = kept.lock() {
                *g = k;
            }
        });
    if let Err(e) = spawned {
        crate::console(&format!(
            "clock: cannot start the keeper ({e}); the clock is checked at boot only"
        ));
    }
}
