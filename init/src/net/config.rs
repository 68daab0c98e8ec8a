//! What the network should look like, from whichever source wins: the kernel's `ip=`, our
//! `shoal.net=`, or a NoCloud `network-config` (v1 or v2, the subsets clouds emit). Parsers
//! never panic; they return a message naming what they could not read.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

/// What a network description got wrong, naming where it came from (`ip=`, `shoal.net=`,
/// `network-config`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0:?} is not an address")]
    NotAnAddress(String),
    #[error("{0} is not a netmask")]
    NotANetmask(Ipv4Addr),
    #[error("{0:?}: bad prefix")]
    BadPrefix(String),
    #[error("{origin}: {what} {value:?} is not an IPv4 address")]
    NotIpv4 {
        origin: &'static str,
        what: &'static str,
        value: String,
    },
    #[error("{origin}: bad {what} {value:?}")]
    BadValue {
        origin: &'static str,
        what: &'static str,
        value: String,
    },
    #[error("shoal.net=: unknown key {0:?}")]
    UnknownKey(String),
    #[error("shoal.net=: name an interface first")]
    NoInterface,
    #[error("ip=: neither a client address nor autoconfiguration")]
    NoAddress,
    #[error("network-config v1: static subnet without address")]
    StaticWithoutAddress,
    #[error("{origin}: {source}")]
    Yaml {
        origin: &'static str,
        source: serde_yaml_ng::Error,
    },
    #[error("{0} not supported")]
    Unsupported(String),
    #[error("network-config: version {0} not supported (1 or 2)")]
    Version(u64),
}

type Result<T> = std::result::Result<T, ConfigError>;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Iface {
    /// Interface name; `None` with a `mac` matches by address.
    pub name: Option<String>,
    pub mac: Option<String>,
    pub dhcp: bool,
    pub addrs: Vec<(IpAddr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    /// Extra routes: destination, prefix, gateway.
    pub routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetConfig {
    pub ifaces: Vec<Iface>,
    pub dns: Vec<IpAddr>,
    pub search: Vec<String>,
    pub ntp: Vec<IpAddr>,
    pub hostname: Option<String>,
    /// `ip=off`: configure nothing but loopback.
    pub off: bool,
}

fn prefix_of_mask(mask: Ipv4Addr) -> Result<u8> {
    let m = u32::from(mask);
    if m.leading_ones() + m.trailing_zeros() != 32 {
        return Err(ConfigError::NotANetmask(mask));
    }
    Ok(m.leading_ones() as u8)
}

/// `10.0.0.5/24` (or a bare address, /32 for v4, /128 for v6).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    let (a, p) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let ip: IpAddr = a
        .trim()
        .parse()
        .map_err(|_| ConfigError::NotAnAddress(s.into()))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match p {
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => match (ip, p.parse::<Ipv4Addr>()) {
                (IpAddr::V4(_), Ok(mask)) => prefix_of_mask(mask)?,
                _ => return Err(ConfigError::BadPrefix(s.into())),
            },
        },
        None => max,
    };
    Ok((ip, prefix))
}

/// The kernel's `ip=` (Documentation/admin-guide/nfs/nfsroot.rst):
/// `<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>:<ntp0>`,
/// or one of `off|none|on|any|dhcp|bootp|rarp|both`, or dracut's `<device>:dhcp`.
pub fn parse_kernel_ip(s: &str) -> Result<NetConfig> {
    let mut cfg = NetConfig::default();
    match s {
        "off" | "none" => {
            cfg.off = true;
            return Ok(cfg);
        }
        "on" | "any" | "dhcp" | "bootp" | "rarp" | "both" | "dhcp4" => {
            cfg.ifaces.push(Iface {
                dhcp: true,
                ..Default::default()
            });
            return Ok(cfg);
        }
        _ => {}
    }
    let f: Vec<&str> = s.split(':').collect();
    if f.len() == 2 && matches!(f[1], "dhcp" | "on" | "any" | "dhcp4") {
        cfg.ifaces.push(Iface {
            name: Some(f[0].to_string()),
            dhcp: true,
            ..Default::default()
        });
        return Ok(cfg);
    }
    let get = |i: usize| f.get(i).copied().unwrap_or("").trim();
    let ip4 = |i: usize, what: &'static str| -> Result<Option<Ipv4Addr>> {
        match get(i) {
            "" => Ok(None),
            v => ipv4("ip=", what, v).map(Some),
        }
    };
    let client = ip4(0, "client address")?;
    let gateway = ip4(2, "gateway")?;
    let mask = ip4(3, "netmask")?;
    let autoconf = get(6);
    let mut iface = Iface {
        name: (!get(5).is_empty()).then(|| get(5).to_string()),
        gateway,
        ..Default::default()
    };
    match client {
        Some(ip) => {
            let prefix = match mask {
                Some(m) => prefix_of_mask(m)?,
                None => 24,
            };
            iface.addrs.push((IpAddr::V4(ip), prefix));
        }
        None => {
            if matches!(autoconf, "" | "off" | "none") {
                return Err(ConfigError::NoAddress);
            }
        }
    }
    iface.dhcp = matches!(autoconf, "on" | "any" | "dhcp" | "both" | "bootp" | "dhcp4")
        || (client.is_none() && !matches!(autoconf, "off" | "none"));
    if !get(4).is_empty() {
        cfg.hostname = Some(get(4).to_string());
    }
    for i in [7, 8] {
        if let Some(d) = ip4(i, "DNS server")? {
            cfg.dns.push(IpAddr::V4(d));
        }
    }
    if let Some(n) = ip4(9, "NTP server")? {
        cfg.ntp.push(IpAddr::V4(n));
    }
    cfg.ifaces.push(iface);
    Ok(cfg)
}

/// `shoal.net=`: `dhcp`, `off`, or `<iface>,<addr>/<prefix>[,gw=<ip>][,dns=<ip>]...[,mtu=<n>]`.
pub fn parse_shoal_net(s: &str) -> Result<NetConfig> {
    let mut cfg = NetConfig::default();
    match s {
        "off" => {
            cfg.off = true;
            return Ok(cfg);
        }
        "dhcp" => {
            cfg.ifaces.push(Iface {
                dhcp: true,
                ..Default::default()
            });
            return Ok(cfg);
        }
        _ => {}
    }
    let mut parts = s.split(',');
    let name = parts.next().unwrap_or("").trim();
    if name.is_empty() {
        return Err(ConfigError::NoInterface);
    }
    let mut iface = Iface {
        name: Some(name.into()),
        ..Default::default()
    };
    let bad = |what: &'static str, v: &str| ConfigError::BadValue {
        origin: "shoal.net=",
        what,
        value: v.into(),
    };
    for p in parts {
        match p.split_once('=') {
            Some(("gw", v)) => iface.gateway = Some(v.parse().map_err(|_| bad("gw", v))?),
            Some(("dns", v)) => cfg.dns.push(v.parse().map_err(|_| bad("dns", v))?),
            Some(("mtu", v)) => iface.mtu = Some(v.parse().map_err(|_| bad("mtu", v))?),
            Some((k, _)) => return Err(ConfigError::UnknownKey(k.into())),
            None if p == "dhcp" => iface.dhcp = true,
            None => iface.addrs.push(parse_cidr(p)?),
        }
    }
    cfg.ifaces.push(iface);
    Ok(cfg)
}

// ---- NoCloud network-config ----

#[derive(Deserialize)]
struct Wrapped {
    network: serde_yaml_ng::Value,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V2 {
    version: u8,
    ethernets: BTreeMap<String, V2Eth>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct V2Eth {
    #[serde(rename = "match")]
    matches: V2Match,
    dhcp4: Option<serde_yaml_ng::Value>,
    addresses: Vec<String>,
    gateway4: Option<String>,
    routes: Vec<V2Route>,
    nameservers: V2Ns,
    mtu: Option<u32>,
    set_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V2Match {
    macaddress: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V2Route {
    to: String,
    via: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V2Ns {
    addresses: Vec<String>,
    search: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V1 {
    version: u8,
    config: Vec<V1Item>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V1Item {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    mac_address: Option<String>,
    mtu: Option<u32>,
    subnets: Vec<V1Subnet>,
    address: serde_yaml_ng::Value,
    search: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V1Subnet {
    #[serde(rename = "type")]
    kind: String,
    address: Option<String>,
    netmask: Option<String>,
    gateway: Option<String>,
    dns_nameservers: Vec<String>,
    routes: Vec<V1Route>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V1Route {
    network: String,
    netmask: Option<String>,
    prefix: Option<u8>,
    gateway: String,
}

fn truthy(v: &Option<serde_yaml_ng::Value>) -> bool {
    match v {
        Some(serde_yaml_ng::Value::Bool(b)) => *b,
        Some(serde_yaml_ng::Value::String(s)) => matches!(s.as_str(), "true" | "yes" | "on"),
        _ => false,
    }
}

fn ipv4(origin: &'static str, what: &'static str, s: &str) -> Result<Ipv4Addr> {
    s.trim().parse().map_err(|_| ConfigError::NotIpv4 {
        origin,
        what,
        value: s.into(),
    })
}

fn v4(s: &str, what: &'static str) -> Result<Ipv4Addr> {
    ipv4("network-config", what, s)
}

fn dns(d: &str) -> Result<IpAddr> {
    d.parse().map_err(|_| ConfigError::BadValue {
        origin: "network-config",
        what: "DNS server",
        value: d.into(),
    })
}

fn yaml<T: serde::de::DeserializeOwned>(
    origin: &'static str,
    doc: serde_yaml_ng::Value,
) -> Result<T> {
    serde_yaml_ng::from_value(doc).map_err(|source| ConfigError::Yaml { origin, source })
}

fn route_dest(to: &str) -> Result<(Ipv4Addr, u8)> {
    if matches!(to, "default" | "0.0.0.0/0") {
        return Ok((Ipv4Addr::UNSPECIFIED, 0));
    }
    match parse_cidr(to)? {
        (IpAddr::V4(a), p) => Ok((a, p)),
        _ => Err(ConfigError::Unsupported(format!(
            "network-config: IPv6 route {to:?}"
        ))),
    }
}

/// A NoCloud `network-config` document (v1 or v2; top-level or under `network:`).
pub fn parse_network_config(text: &str) -> Result<NetConfig> {
    let mut doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Yaml {
            origin: "network-config",
            source,
        })?;
    if let Ok(w) = serde_yaml_ng::from_value::<Wrapped>(doc.clone()) {
        doc = w.network;
    }
    match doc.get("version").and_then(|v| v.as_u64()).unwrap_or(0) {
        2 => network_config_v2(yaml("network-config v2", doc)?),
        1 => network_config_v1(yaml("network-config v1", doc)?),
        other => Err(ConfigError::Version(other)),
    }
}

fn network_config_v2(v: V2) -> Result<NetConfig> {
    debug_assert_eq!(v.version, 2);
    let mut cfg = NetConfig::default();
    for (id, e) in v.ethernets {
        let mut i = Iface {
            name: e
                .set_name
                .or(e.matches.name)
                .or_else(|| e.matches.macaddress.is_none().then(|| id.clone())),
            mac: e.matches.macaddress.map(|m| m.to_ascii_lowercase()),
            dhcp: truthy(&e.dhcp4),
            mtu: e.mtu,
            ..Default::default()
        };
        for a in &e.addresses {
            i.addrs.push(parse_cidr(a)?);
        }
        if let Some(g) = &e.gateway4 {
            i.gateway = Some(v4(g, "gateway4")?);
        }
        for r in &e.routes {
            let (dst, p) = route_dest(&r.to)?;
            let via = v4(&r.via, "route via")?;
            if p == 0 {
                i.gateway = Some(via);
            } else {
                i.routes.push((dst, p, via));
            }
        }
        for d in &e.nameservers.addresses {
            cfg.dns.push(dns(d)?);
        }
        cfg.search.extend(e.nameservers.search.iter().cloned());
        cfg.ifaces.push(i);
    }
    Ok(cfg)
}

fn network_config_v1(v: V1) -> Result<NetConfig> {
    let mut cfg = NetConfig::default();
    for item in v.config {
        match item.kind.as_str() {
            "physical" => {
                let mut i = Iface {
                    name: item.name.clone(),
                    mac: item.mac_address.map(|m| m.to_ascii_lowercase()),
                    mtu: item.mtu,
                    ..Default::default()
                };
                for s in item.subnets {
                    v1_subnet(s, &mut i, &mut cfg)?;
                }
                cfg.ifaces.push(i);
            }
            "nameserver" => {
                let addrs: Vec<String> = match &item.address {
                    serde_yaml_ng::Value::String(s) => vec![s.clone()],
                    serde_yaml_ng::Value::Sequence(v) => v
                        .iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect(),
                    _ => vec![],
                };
                for d in addrs {
                    cfg.dns.push(dns(&d)?);
                }
                cfg.search.extend(item.search);
            }
            other => {
                return Err(ConfigError::Unsupported(format!(
                    "network-config v1: type {other:?}"
                )))
            }
        }
    }
    Ok(cfg)
}

fn v1_subnet(s: V1Subnet, i: &mut Iface, cfg: &mut NetConfig) -> Result<()> {
    match s.kind.as_str() {
        "dhcp" | "dhcp4" => i.dhcp = true,
        "static" | "static4" => {
            let a = s
                .address
                .as_deref()
                .ok_or(ConfigError::StaticWithoutAddress)?;
            let (ip, mut p) = parse_cidr(a)?;
            if let Some(m) = &s.netmask {
                p = prefix_of_mask(v4(m, "netmask")?)?;
            }
            i.addrs.push((ip, p));
            if let Some(g) = &s.gateway {
                i.gateway = Some(v4(g, "gateway")?);
            }
            for d in &s.dns_nameservers {
                cfg.dns.push(dns(d)?);
            }
            for r in &s.routes {
                let dst = v4(&r.network, "route network")?;
                let p = match (r.prefix, &r.netmask) {
                    (Some(p), _) => p,
                    (None, Some(m)) => prefix_of_mask(v4(m, "route netmask")?)?,
                    (None, None) => 32,
                };
                i.routes.push((dst, p, v4(&r.gateway, "route gateway")?));
            }
        }
        other => {
            return Err(ConfigError::Unsupported(format!(
                "network-config v1: subnet type {other:?}"
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kernel_ip_forms() {
        let c = parse_kernel_ip(
            "10.0.0.5::10.0.0.1:255.255.255.0:n1:eth0:off:1.1.1.1:8.8.8.8:10.0.0.1",
        )
        .unwrap();
        let i = &c.ifaces[0];
        assert_eq!(i.name.as_deref(), Some("eth0"));
        assert_eq!(i.addrs, vec![("10.0.0.5".parse().unwrap(), 24)]);
        assert_eq!(i.gateway, Some("10.0.0.1".parse().unwrap()));
        assert!(!i.dhcp);
        assert_eq!(c.hostname.as_deref(), Some("n1"));
        assert_eq!(c.dns.len(), 2);
        assert_eq!(c.ntp, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(parse_kernel_ip("dhcp").unwrap().ifaces[0].dhcp);
        assert!(parse_kernel_ip("off").unwrap().off);
        let d = parse_kernel_ip("eth1:dhcp").unwrap();
        assert_eq!(
            (d.ifaces[0].name.as_deref(), d.ifaces[0].dhcp),
            (Some("eth1"), true)
        );
        assert!(parse_kernel_ip(":::::eth0:dhcp").unwrap().ifaces[0].dhcp);
        assert!(parse_kernel_ip("10.0.0.300").is_err());
        assert!(parse_kernel_ip("10.0.0.5::::n:eth0:off:1.2.3").is_err());
        assert!(parse_kernel_ip("10.0.0.5:::255.0.255.0")
            .unwrap_err()
            .to_string()
            .contains("netmask"));
    }

    #[test]
    fn shoal_net_forms() {
        let c = parse_shoal_net("eth0,10.1.0.2/16,gw=10.1.0.1,dns=1.1.1.1,mtu=1400").unwrap();
        let i = &c.ifaces[0];
        assert_eq!(i.addrs, vec![("10.1.0.2".parse().unwrap(), 16)]);
        assert_eq!(
            (i.gateway, i.mtu),
            (Some("10.1.0.1".parse().unwrap()), Some(1400))
        );
        assert!(parse_shoal_net("eth0,bogus=1")
            .unwrap_err()
            .to_string()
            .contains("bogus"));
        assert!(parse_shoal_net("").is_err());
    }

    #[test]
    fn network_config_v2_and_v1() {
        let v2 = "network:\n  version: 2\n  ethernets:\n    eth0:\n      addresses: [10.2.0.5/24]\n      gateway4: 10.2.0.1\n      routes:\n        - to: 192.168.0.0/16\n          via: 10.2.0.254\n      nameservers:\n        addresses: [10.2.0.53]\n        search: [example.internal]\n      mtu: 1450\n    id1:\n      match:\n        macaddress: 52:54:00:AA:BB:CC\n      dhcp4: true\n";
        let c = parse_network_config(v2).unwrap();
        assert_eq!(c.ifaces.len(), 2);
        let e = c
            .ifaces
            .iter()
            .find(|i| i.name.as_deref() == Some("eth0"))
            .unwrap();
        assert_eq!(e.gateway, Some("10.2.0.1".parse().unwrap()));
        assert_eq!(
            e.routes,
            vec![(
                "192.168.0.0".parse().unwrap(),
                16,
                "10.2.0.254".parse().unwrap()
            )]
        );
        assert_eq!(e.mtu, Some(1450));
        let m = c.ifaces.iter().find(|i| i.mac.is_some()).unwrap();
        assert!(m.dhcp && m.name.is_none());
        assert_eq!(m.mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert_eq!(c.search, vec!["example.internal".to_string()]);

        let v1 = "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    mac_address: '52:54:00:12:34:56'\n    subnets:\n      - type: static\n        address: 10.3.0.5\n        netmask: 255.255.255.0\n        gateway: 10.3.0.1\n        dns_nameservers: [10.3.0.53]\n  - type: nameserver\n    address: [9.9.9.9]\n";
        let c = parse_network_config(v1).unwrap();
        assert_eq!(c.ifaces[0].addrs, vec![("10.3.0.5".parse().unwrap(), 24)]);
        assert_eq!(c.dns.len(), 2);
        assert!(parse_network_config("version: 3\n")
            .unwrap_err()
            .to_string()
            .contains("version 3"));
        assert!(
            parse_network_config("version: 1\nconfig:\n  - type: bond\n")
                .unwrap_err()
                .to_string()
                .contains("bond")
        );
        assert!(parse_network_config(": : :").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in ".{0,200}") {
            let _ = parse_kernel_ip(&s);
            let _ = parse_shoal_net(&s);
            let _ = parse_network_config(&s);
            let _ = parse_cidr(&s);
        }

        #[test]
        fn v2_yaml_mutations_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let base = b"version: 2\nethernets:\n  eth0:\n    addresses: [10.2.0.5/24]\n    routes: [{to: default, via: 10.2.0.1}]\n".to_vec();
            let mut m = base.clone();
            for (i, b) in bytes.iter().enumerate() {
                let at = (i * 7 + *b as usize) % m.len();
                m[at] = *b;
            }
            let _ = parse_network_config(&String::from_utf8_lossy(&m));
        }
    }
}
