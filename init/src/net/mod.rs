//! The network stage: loopback up, then the first configuration source that is present wins —
//! the kernel's `ip=`, `shoal.net=`, a NoCloud `network-config` — else DHCPv4 on every physical
//! interface. Applied with rtnetlink; DNS goes to `/run/shoal/resolv.conf` (the image links
//! `/etc/resolv.conf` there). DHCP leases are renewed by a thread per interface.

pub mod config;
pub mod dhcp;
pub mod netlink;

use crate::cmdline::Cmdline;
use crate::report::Outcome;
use crate::sys::Sys;
use config::{Iface, NetConfig};
use netlink::{Link, Links};
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long DHCP may take before the stage reports the network as degraded.
const DHCP_LIMIT: Duration = Duration::from_secs(10);

/// What went wrong configuring an interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    #[error(transparent)]
    Dhcp(#[from] dhcp::DhcpError),
    #[error("no MAC address")]
    NoMac,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct IfState {
    pub name: String,
    pub mac: Option<String>,
    pub method: String,
    pub addrs: Vec<String>,
    pub gateway: Option<String>,
    pub mtu: Option<u32>,
    pub lease: Option<dhcp::Lease>,
    pub renewals: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NetState {
    pub source: String,
    pub interfaces: Vec<IfState>,
    pub dns: Vec<String>,
    pub ntp: Vec<String>,
    pub hostname: Option<String>,
}

/// Picks the configuration: `ip=`, then `shoal.net=`, then `network-config`, else DHCP.
pub fn choose(
    cmdline: &Cmdline,
    network_config: Option<&str>,
    detail: &mut Vec<String>,
) -> (NetConfig, String) {
    let dhcp_everywhere = || NetConfig {
        ifaces: vec![Iface {
            dhcp: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let sources: [(&str, Option<Result<NetConfig, config::ConfigError>>); 3] = [
        ("kernel ip=", cmdline.get("ip").map(config::parse_kernel_ip)),
        (
            "shoal.net=",
            cmdline.get("shoal.net").map(config::parse_shoal_net),
        ),
        (
            "nocloud network-config",
            network_config.map(config::parse_network_config),
        ),
    ];
    for (name, parsed) in sources {
        match parsed {
            Some(Ok(c)) => return (c, name.to_string()),
            Some(Err(e)) => detail.push(format!("{name} ignored: {e}")),
            None => {}
        }
    }
    (dhcp_everywhere(), "dhcp (no configuration given)".into())
}

/// Interfaces DHCP runs on when none is named: physical ones (a `device` link in sysfs), or
/// only those in `listed` (test mode: `InitEnv::net_ifaces`).
fn physical(root: &Path, listed: Option<&[String]>, links: &[Link]) -> Vec<Link> {
    links
        .iter()
        .filter(|l| !l.loopback)
        .filter(|l| match &listed {
            Some(names) => names.contains(&l.name),
            None => root
                .join("sys/class/net")
                .join(&l.name)
                .join("device")
                .exists(),
        })
        .cloned()
        .collect()
}

fn mac_bytes(mac: &Option<String>) -> Option<[u8; 6]> {
    let v: Vec<u8> = mac
        .as_ref()?
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    v.try_into().ok()
}

fn write_resolv(root: &Path, dns: &[String], search: &[String]) {
    let mut text = String::from("# written by shoal-init\n");
    for d in dns {
        text.push_str(&format!("nameserver {d}\n"));
    }
    if !search.is_empty() {
        text.push_str(&format!("search {}\n", search.join(" ")));
    }
    let path = root.join("run/shoal/resolv.conf");
    if let Some(d) = path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let _ = std::fs::write(path, text);
}

fn apply_lease(
    nl: &dyn Links,
    index: u32,
    l: &dhcp::Lease,
    st: &mut IfState,
) -> Result<(), NetError> {
    nl.up(index, l.mtu.map(u32::from))?;
    nl.add_addr(index, IpAddr::V4(l.addr), l.prefix)?;
    // RFC 3442: classless routes, when given, replace the router option.
    if l.routes.is_empty() {
        if let Some(gw) = l.routers.first() {
            nl.add_route(index, Ipv4Addr::UNSPECIFIED, 0, *gw)?;
            st.gateway = Some(gw.to_string());
        }
    } else {
        for (dst, p, gw) in &l.routes {
            nl.add_route(index, *dst, *p, *gw)?;
            if *p == 0 {
                st.gateway = Some(gw.to_string());
            }
        }
    }
    st.addrs = vec![format!("{}/{}", l.addr, l.prefix)];
    st.mtu = l.mtu.map(u32::from);
    st.lease = Some(l.clone());
    Ok(())
}

/// Keeps a lease: renews at T1 by unicast, falls back to a new DISCOVER at T2.
#[allow(clippy::too_many_arguments)]
fn renew_forever(
    sys: &dyn Sys,
    root: std::path::PathBuf,
    search: Vec<String>,
    ifname: String,
    index: u32,
    mac: [u8; 6],
    lease: Option<dhcp::Lease>,
    state: Arc<Mutex<NetState>>,
    slot: usize,
) {
    // No lease at boot: keep asking in the background, and apply the first one.
    let mut wait = Duration::from_secs(2);
    let mut lease = match lease {
        Some(l) => l,
        None => loop {
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(60));
            let Ok(l) = dhcp::acquire(&ifname, &mac, Duration::from_secs(20)) else {
                continue;
            };
            let applied = sys.netlink().map_err(NetError::from).and_then(|nl| {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                let st = &mut s.interfaces[slot];
                apply_lease(&*nl, index, &l, st)?;
                st.error = None;
                for d in &l.dns {
                    if !s.dns.contains(&d.to_string()) {
                        s.dns.push(d.to_string());
                    }
                }
                write_resolv(&root, &s.dns, &search);
                Ok(())
            });
            match applied {
                Ok(()) => {
                    crate::console(&format!(
                        "dhcp {ifname}: {}/{} from {} (after boot)",
                        l.addr, l.prefix, l.server
                    ));
                    break l;
                }
                Err(e) => crate::console(&format!("dhcp {ifname}: {e}")),
            }
        },
    };
    loop {
        std::thread::sleep(Duration::from_secs(u64::from(lease.t1_s)));
        let next = dhcp::renew(&ifname, &mac, &lease).or_else(|e| {
            crate::console(&format!("dhcp {ifname}: renewal failed ({e}); rebinding"));
            std::thread::sleep(Duration::from_secs(u64::from(
                lease.t2_s.saturating_sub(lease.t1_s),
            )));
            dhcp::acquire(
                &ifname,
                &mac,
                Duration::from_secs(u64::from(lease.lease_s.saturating_sub(lease.t2_s)).max(10)),
            )
        });
        match next {
            Ok(l) => {
                if let Ok(mut s) = state.lock() {
                    let st = &mut s.interfaces[slot];
                    st.renewals += 1;
                    if l.addr != lease.addr {
                        if let Ok(nl) = sys.netlink() {
                            let _ = apply_lease(&*nl, index, &l, st);
                        }
                    } else {
                        st.lease = Some(l.clone());
                    }
                }
                lease = l;
            }
            Err(e) => crate::console(&format!("dhcp {ifname}: lease lost ({e}); trying again")),
        }
    }
}

/// Applies `cfg`; fills `state`; returns the stage outcome.
pub fn apply(
    sys: &Arc<dyn Sys>,
    root: &Path,
    only: Option<&[String]>,
    cfg: &NetConfig,
    source: &str,
    state: &Arc<Mutex<NetState>>,
    detail: &mut Vec<String>,
) -> Outcome {
    let nl = match sys.netlink() {
        Ok(n) => n,
        Err(e) => {
            detail.push(format!("netlink: {e}"));
            return Outcome::Failed;
        }
    };
    let links = match nl.links() {
        Ok(l) => l,
        Err(e) => {
            detail.push(format!("netlink: {e}"));
            return Outcome::Failed;
        }
    };
    for l in links.iter().filter(|l| l.loopback) {
        if let Err(e) = nl.up(l.index, None) {
            detail.push(format!("lo: {e}"));
        }
    }
    let mut ns = NetState {
        source: source.to_string(),
        hostname: cfg.hostname.clone(),
        dns: cfg.dns.iter().map(|d| d.to_string()).collect(),
        ntp: cfg.ntp.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    };
    detail.push(format!("source: {source}"));
    if cfg.off {
        detail.push("ip=off: loopback only".into());
        *state.lock().unwrap_or_else(|p| p.into_inner()) = ns;
        return Outcome::Ok;
    }
    let (mut outcome, dhcp_jobs) = configure(&*nl, &links, root, only, cfg, &mut ns, detail);
    let (dhcp_outcome, renewals) = dhcp_all(&*nl, dhcp_jobs, &mut ns, detail);
    if dhcp_outcome != Outcome::Ok {
        outcome = dhcp_outcome;
    }
    write_resolv(root, &ns.dns, &cfg.search);
    *state.lock().unwrap_or_else(|p| p.into_inner()) = ns;
    drop(nl);
    keep_leases(sys, root, &cfg.search, renewals, state);
    outcome
}

/// An interface whose lease a keeper renews: name, index, MAC, the lease (none yet), its slot
/// in `NetState::interfaces`.
type Renewal = (String, u32, [u8; 6], Option<dhcp::Lease>, usize);

/// Brings up and addresses the interfaces `cfg` names; the outcome and the interfaces that
/// want DHCP (with their slot in `ns.interfaces`).
fn configure(
    nl: &dyn Links,
    links: &[Link],
    root: &Path,
    only: Option<&[String]>,
    cfg: &NetConfig,
    ns: &mut NetState,
    detail: &mut Vec<String>,
) -> (Outcome, Vec<(Link, usize)>) {
    let mut outcome = Outcome::Ok;
    let mut dhcp_jobs: Vec<(Link, usize)> = Vec::new();
    for want in &cfg.ifaces {
        let targets: Vec<Link> = match (&want.name, &want.mac) {
            (Some(n), _) => links.iter().filter(|l| &l.name == n).cloned().collect(),
            (None, Some(m)) => links
                .iter()
                .filter(|l| l.mac.as_ref() == Some(m))
                .cloned()
                .collect(),
            (None, None) => physical(root, only, links),
        };
        if targets.is_empty() {
            detail.push(format!(
                "no interface matches {:?}",
                want.name.as_ref().or(want.mac.as_ref())
            ));
            outcome = Outcome::Degraded;
        }
        for l in targets {
            let mut st = IfState {
                name: l.name.clone(),
                mac: l.mac.clone(),
                method: if want.dhcp && want.addrs.is_empty() {
                    "dhcp"
                } else {
                    "static"
                }
                .into(),
                ..Default::default()
            };
            let r = (|| -> Result<(), NetError> {
                nl.up(l.index, want.mtu)?;
                for (ip, p) in &want.addrs {
                    nl.add_addr(l.index, *ip, *p)?;
                    st.addrs.push(format!("{ip}/{p}"));
                }
                if let Some(gw) = want.gateway {
                    nl.add_route(l.index, Ipv4Addr::UNSPECIFIED, 0, gw)?;
                    st.gateway = Some(gw.to_string());
                }
                for (dst, p, gw) in &want.routes {
                    nl.add_route(l.index, *dst, *p, *gw)?;
                }
                st.mtu = want.mtu;
                Ok(())
            })();
            if let Err(e) = r {
                detail.push(format!("{}: {e}", l.name));
                st.error = Some(e.to_string());
                outcome = Outcome::Degraded;
            }
            if want.dhcp && want.addrs.is_empty() {
                dhcp_jobs.push((l.clone(), ns.interfaces.len()));
            }
            ns.interfaces.push(st);
        }
    }
    (outcome, dhcp_jobs)
}

/// DHCP on every interface at once, bounded; the outcome and the leases to keep renewing.
fn dhcp_all(
    nl: &dyn Links,
    dhcp_jobs: Vec<(Link, usize)>,
    ns: &mut NetState,
    detail: &mut Vec<String>,
) -> (Outcome, Vec<Renewal>) {
    let mut outcome = Outcome::Ok;
    let results: Vec<(Link, usize, Result<dhcp::Lease, NetError>)> = std::thread::scope(|s| {
        let handles: Vec<_> = dhcp_jobs
            .into_iter()
            .map(|(l, slot)| {
                s.spawn(move || {
                    let r = match mac_bytes(&l.mac) {
                        Some(mac) => {
                            dhcp::acquire(&l.name, &mac, DHCP_LIMIT).map_err(NetError::from)
                        }
                        None => Err(NetError::NoMac),
                    };
                    (l, slot, r)
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let mut renewals = Vec::new();
    for (l, slot, r) in results {
        let st = &mut ns.interfaces[slot];
        match r.and_then(|lease| apply_lease(nl, l.index, &lease, st).map(|_| lease)) {
            Ok(lease) => {
                detail.push(format!(
                    "{}: {}/{} by DHCP from {}",
                    l.name, lease.addr, lease.prefix, lease.server
                ));
                for d in &lease.dns {
                    if !ns.dns.contains(&d.to_string()) {
                        ns.dns.push(d.to_string());
                    }
                }
                for n in &lease.ntp {
                    ns.ntp.push(n.to_string());
                }
                if let Some(mac) = mac_bytes(&l.mac) {
                    renewals.push((l.name.clone(), l.index, mac, Some(lease), slot));
                }
            }
            Err(e) => {
                detail.push(format!(
                    "{}: DHCP: {e}; still trying in the background",
                    l.name
                ));
                st.error = Some(e.to_string());
                outcome = Outcome::Degraded;
                if let Some(mac) = mac_bytes(&l.mac) {
                    renewals.push((l.name.clone(), l.index, mac, None, slot));
                }
            }
        }
    }
    (outcome, renewals)
}

/// One thread per interface keeps its lease: renews it, rebinds, and asks again after a loss.
fn keep_leases(
    sys: &Arc<dyn Sys>,
    root: &Path,
    search: &[String],
    renewals: Vec<Renewal>,
    state: &Arc<Mutex<NetState>>,
) {
    for (name, index, mac, lease, slot) in renewals {
        let st = state.clone();
        let sys = sys.clone();
        let _ = std::thread::Builder::new()
            .name(format!("dhcp-{name}"))
            .spawn({
                let (root, search) = (root.to_path_buf(), search.to_vec());
                move || loop {
                    // A panic here must not leave the interface without its lease keeper; it
                    // restarts from the lease the interface holds now (renewals move it on
                    // from the one it got at boot).
                    let current = st
                        .lock()
                        .ok()
                        .and_then(|s| s.interfaces.get(slot).and_then(|i| i.lease.clone()))
                        .or_else(|| lease.clone());
                    let args = (
                        root.clone(),
                        search.clone(),
                        name.clone(),
                        current,
                        st.clone(),
                    );
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        renew_forever(
                            &*sys, args.0, args.1, args.2, index, mac, args.3, args.4, slot,
                        )
                    }));
                    if r.is_err() {
                        crate::console(&format!(
                            "dhcp {name}: lease keeper panicked; restarting it"
                        ));
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            });
    }
}
