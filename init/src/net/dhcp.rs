//! A small DHCPv4 client on dhcproto: DISCOVER → OFFER → REQUEST → ACK on one interface
//! (broadcast flag set, so it needs no address yet), then renewal at T1 by unicast to the
//! server. The lease carries the address, routers, DNS, MTU, classless static routes (RFC 3442,
//! which replace the router option when present), NTP servers and the lease times.

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

/// Why no lease came (or a reply could not be one).
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("offered address {0} is not usable")]
    Unusable(Ipv4Addr),
    #[error("no server identifier")]
    NoServerId,
    #[error("bad subnet mask {0}")]
    BadMask(Ipv4Addr),
    #[error("{what}: {source}")]
    Socket {
        what: String,
        source: std::io::Error,
    },
    #[error("encoding a request: {0}")]
    Encode(#[from] dhcproto::error::EncodeError),
    #[error("no answer")]
    NoAnswer,
    #[error("no DHCP lease on {ifname} within {secs} s")]
    NoLease { ifname: String, secs: u64 },
    #[error("server answered {0:?}")]
    Refused(Option<MessageType>),
}

impl DhcpError {
    fn socket(what: impl Into<String>, e: impl Into<std::io::Error>) -> DhcpError {
        DhcpError::Socket {
            what: what.into(),
            source: e.into(),
        }
    }
}

type Result<T> = std::result::Result<T, DhcpError>;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lease {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub server: Ipv4Addr,
    pub routers: Vec<Ipv4Addr>,
    pub routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
    pub dns: Vec<Ipv4Addr>,
    pub ntp: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub mtu: Option<u16>,
    pub lease_s: u32,
    pub t1_s: u32,
    pub t2_s: u32,
}

/// Reads a lease out of an OFFER or ACK. Rejects what cannot be a usable lease.
pub fn lease_from(msg: &Message) -> Result<Lease> {
    let o = msg.opts();
    let addr = msg.yiaddr();
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
        return Err(DhcpError::Unusable(addr));
    }
    let server = match o.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => return Err(DhcpError::NoServerId),
    };
    let prefix = match o.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => {
            let m = u32::from(*m);
            if m.leading_ones() + m.trailing_zeros() != 32 {
                return Err(DhcpError::BadMask(Ipv4Addr::from(m)));
            }
            m.leading_ones() as u8
        }
        _ => 24,
    };
    let routers = match o.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.clone(),
        _ => vec![],
    };
    let routes = match o.get(OptionCode::ClasslessStaticRoute) {
        Some(DhcpOption::ClasslessStaticRoute(r)) => r
            .iter()
            .map(|(net, gw)| (net.network(), net.prefix_len(), *gw))
            .collect(),
        _ => vec![],
    };
    let dns = match o.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(d)) => d.clone(),
        _ => vec![],
    };
    let ntp = match o.get(OptionCode::NtpServers) {
        Some(DhcpOption::NtpServers(d)) => d.clone(),
        _ => vec![],
    };
    let domain = match o.get(OptionCode::DomainName) {
        Some(DhcpOption::DomainName(d)) => Some(d.clone()),
        _ => None,
    };
    let mtu = match o.get(OptionCode::InterfaceMtu) {
        Some(DhcpOption::InterfaceMtu(m)) if *m >= 576 => Some(*m),
        _ => None,
    };
    let lease_s = match o.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(l)) => (*l).max(10),
        _ => 3600,
    };
    let t1_s = match o.get(OptionCode::Renewal) {
        Some(DhcpOption::Renewal(t)) if *t > 0 && *t < lease_s => *t,
        _ => lease_s / 2,
    };
    let t2_s = match o.get(OptionCode::Rebinding) {
        Some(DhcpOption::Rebinding(t)) if *t > t1_s && *t < lease_s => *t,
        _ => lease_s / 8 * 7,
    };
    Ok(Lease {
        addr,
        prefix,
        server,
        routers,
        routes,
        dns,
        ntp,
        domain,
        mtu,
        lease_s,
        t1_s,
        t2_s,
    })
}

/// Decodes a datagram. dhcproto checks some option lengths with (debug) assertions instead of
/// errors: such options are refused here first (`fixed_lengths_hold`), and a panic inside the
/// crate is caught, so a hostile packet cannot take PID 1's network stage down with it.
pub fn decode(buf: &[u8]) -> Option<Message> {
    if !fixed_lengths_hold(buf) {
        return None;
    }
    std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(buf)).ok())
        .ok()
        .flatten()
}

/// Whether the options whose length dhcproto asserts (rather than checks) have it: Rapid
/// Commit (80) none, Client FQDN (81) at least 3, Client Network Interface (94) 3, the bulk
/// leasequery times (152-155) 4. Walks the options after the fixed header and magic cookie;
/// anything malformed beyond that is dhcproto's to refuse.
pub fn fixed_lengths_hold(buf: &[u8]) -> bool {
    // Repeated options are one option, concatenated (RFC 3396): their lengths add up.
    let mut total = [0usize; 256];
    let mut present = [false; 256];
    let mut i = 240;
    while i < buf.len() {
        let code = buf[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some(&len) = buf.get(i + 1) else { break };
        total[usize::from(code)] += usize::from(len);
        present[usize::from(code)] = true;
        i += 2 + usize::from(len);
    }
    let ok = |c: usize, f: fn(usize) -> bool| !present[c] || f(total[c]);
    ok(80, |l| l == 0)
        && ok(81, |l| l >= 3)
        && ok(94, |l| l == 3)
        && (152..=155).all(|c| ok(c, |l| l == 4))
}

fn socket_on(ifname: &str) -> Result<UdpSocket> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| DhcpError::socket("socket", e))?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)
        .map_err(|e| DhcpError::socket("SO_REUSEADDR", e))?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true)
        .map_err(|e| DhcpError::socket("SO_BROADCAST", e))?;
    socket::setsockopt(
        &fd,
        sockopt::BindToDevice,
        &std::ffi::OsString::from(ifname),
    )
    .map_err(|e| DhcpError::socket(format!("bind to {ifname}"), e))?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)),
    )
    .map_err(|e| DhcpError::socket("bind :68", e))?;
    Ok(UdpSocket::from(fd))
}

fn request_list() -> DhcpOption {
    DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::DomainName,
        OptionCode::InterfaceMtu,
        OptionCode::NtpServers,
        OptionCode::ClasslessStaticRoute,
        OptionCode::AddressLeaseTime,
        OptionCode::Renewal,
        OptionCode::Rebinding,
    ])
}

fn base(mac: &[u8; 6], xid: u32, kind: MessageType, broadcast: bool) -> Message {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootRequest)
        .set_xid(xid)
        .set_chaddr(mac);
    if broadcast {
        m.set_flags(Flags::default().set_broadcast());
    }
    let mut id = vec![1u8];
    id.extend_from_slice(mac);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m.opts_mut().insert(DhcpOption::ClientIdentifier(id));
    m.opts_mut().insert(request_list());
    m
}

fn send(sock: &UdpSocket, m: &Message, to: SocketAddrV4) -> Result<()> {
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf))?;
    sock.send_to(&buf, to)
        .map_err(|e| DhcpError::socket(format!("send to {to}"), e))?;
    Ok(())
}

/// A transaction id nobody on the link can guess (a rogue server must see our request to
/// answer it): from the kernel's urandom, which never blocks.
fn random_xid() -> u32 {
    use std::io::Read;
    let mut b = [0u8; 4];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u32::from_ne_bytes(b),
        Err(_) => nix::unistd::getpid().as_raw() as u32 ^ (crate::report::now_ms() as u32),
    }
}

/// Whether a reply is to our request: our transaction id and our hardware address.
fn ours(m: &Message, xid: u32, mac: &[u8; 6]) -> bool {
    m.xid() == xid && m.opcode() == Opcode::BootReply && m.chaddr().get(..6) == Some(&mac[..])
}

/// Waits for a reply to `xid` for `mac` until `deadline`.
fn receive(sock: &UdpSocket, xid: u32, mac: &[u8; 6], deadline: Instant) -> Result<Message> {
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DhcpError::NoAnswer);
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| DhcpError::socket("SO_RCVTIMEO", e))?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(DhcpError::NoAnswer)
            }
            Err(e) => return Err(DhcpError::socket("receive", e)),
        };
        let Some(m) = decode(&buf[..n]) else {
            continue;
        };
        if ours(&m, xid, mac) {
            return Ok(m);
        }
    }
}

/// Acquires a lease on `ifname`, retrying DISCOVER with backoff until `limit`.
pub fn acquire(ifname: &str, mac: &[u8; 6], limit: Duration) -> Result<Lease> {
    let sock = socket_on(ifname)?;
    let end = Instant::now() + limit;
    let bcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let mut wait = Duration::from_millis(500);
    // Retransmissions keep the transaction id, so a late OFFER (servers may first ping the
    // address they offer) still counts.
    let xid = random_xid();
    while Instant::now() < end {
        send(&sock, &base(mac, xid, MessageType::Discover, true), bcast)?;
        let step = (Instant::now() + wait).min(end);
        let offer = match receive(&sock, xid, mac, step) {
            Ok(m) if m.opts().msg_type() == Some(MessageType::Offer) => m,
            _ => {
                wait = (wait * 2).min(Duration::from_secs(4));
                continue;
            }
        };
        let lease = lease_from(&offer)?;
        let mut req = base(mac, xid, MessageType::Request, true);
        req.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(lease.addr));
        req.opts_mut()
            .insert(DhcpOption::ServerIdentifier(lease.server));
        send(&sock, &req, bcast)?;
        match receive(
            &sock,
            xid,
            mac,
            (Instant::now() + Duration::from_secs(3)).min(end),
        ) {
            Ok(m) if m.opts().msg_type() == Some(MessageType::Ack) => return lease_from(&m),
            Ok(m) if m.opts().msg_type() == Some(MessageType::Nak) => continue,
            _ => continue,
        }
    }
    Err(DhcpError::NoLease {
        ifname: ifname.into(),
        secs: limit.as_secs(),
    })
}

/// Renews `lease` by unicast to its server (RENEWING state of RFC 2131).
pub fn renew(ifname: &str, mac: &[u8; 6], lease: &Lease) -> Result<Lease> {
    let sock = socket_on(ifname)?;
    let xid = random_xid();
    let mut req = base(mac, xid, MessageType::Request, false);
    req.set_ciaddr(lease.addr);
    send(&sock, &req, SocketAddrV4::new(lease.server, 67))?;
    match receive(&sock, xid, mac, Instant::now() + Duration::from_secs(5))? {
        m if m.opts().msg_type() == Some(MessageType::Ack) => lease_from(&m),
        m => Err(DhcpError::Refused(m.opts().msg_type())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_dhcproto_asserts_on_are_checked_first() {
        let packet = |opts: &[u8]| {
            let mut b = vec![0u8; 236];
            b.extend_from_slice(&[99, 130, 83, 99]);
            b.extend_from_slice(opts);
            b.push(255);
            b
        };
        assert!(fixed_lengths_hold(&packet(&[53, 1, 2, 0, 94, 3, 1, 2, 3])));
        // Found by fuzzing with debug assertions: a Client Network Interface of 1 byte.
        assert!(!fixed_lengths_hold(&packet(&[94, 1, 0])));
        assert!(!fixed_lengths_hold(&packet(&[80, 1, 0])));
        assert!(!fixed_lengths_hold(&packet(&[81, 2, 0, 0])));
        assert!(!fixed_lengths_hold(&packet(&[153, 2, 0, 0])));
        // Found next: the same option twice is one of twice the length.
        assert!(!fixed_lengths_hold(&packet(&[
            152, 4, 0, 0, 0, 1, 152, 4, 0, 0, 0, 2
        ])));
        assert!(decode(&packet(&[94, 1, 0])).is_none());
        // Truncated or short input is left to the decoder.
        assert!(fixed_lengths_hold(&[0u8; 10]));
        assert!(fixed_lengths_hold(&packet(&[94])[..241]));
    }
    use proptest::prelude::*;

    fn ack() -> Message {
        let mut m = Message::default();
        m.set_opcode(Opcode::BootReply)
            .set_yiaddr(Ipv4Addr::new(10, 9, 0, 50));
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(MessageType::Ack));
        o.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 9, 0, 1)));
        o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 0, 0)));
        o.insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 9, 0, 1)]));
        o.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 9, 0, 53,
        )]));
        o.insert(DhcpOption::InterfaceMtu(1400));
        o.insert(DhcpOption::AddressLeaseTime(120));
        o.insert(DhcpOption::ClasslessStaticRoute(vec![(
            "192.168.0.0/16".parse().unwrap(),
            Ipv4Addr::new(10, 9, 0, 254),
        )]));
        m
    }

    #[test]
    fn a_lease_reads_every_option_we_use() {
        let l = lease_from(&ack()).unwrap();
        assert_eq!((l.addr, l.prefix), (Ipv4Addr::new(10, 9, 0, 50), 16));
        assert_eq!(
            l.routes,
            vec![(
                Ipv4Addr::new(192, 168, 0, 0),
                16,
                Ipv4Addr::new(10, 9, 0, 254)
            )]
        );
        assert_eq!(
            (l.mtu, l.lease_s, l.t1_s, l.t2_s),
            (Some(1400), 120, 60, 105)
        );
        let mut bad = ack();
        bad.opts_mut()
            .insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 0, 255, 0)));
        assert!(lease_from(&bad).is_err());
        let mut none = ack();
        none.set_yiaddr(Ipv4Addr::UNSPECIFIED);
        assert!(lease_from(&none).is_err());
    }

    #[test]
    fn only_replies_to_our_request_and_our_address_count() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let xid = random_xid();
        assert_ne!(xid, random_xid(), "two transaction ids in a row were equal");
        let mut m = ack();
        m.set_xid(xid).set_chaddr(&mac);
        assert!(ours(&m, xid, &mac));
        assert!(!ours(&m, xid ^ 1, &mac));
        let other = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
        assert!(
            !ours(&m, xid, &other),
            "a reply for another machine was taken"
        );
        m.set_opcode(Opcode::BootRequest);
        assert!(!ours(&m, xid, &mac));
    }

    proptest! {
        #[test]
        fn decoding_random_or_mutated_replies_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..20),
        ) {
            if let Some(m) = decode(&bytes) {
                let _ = lease_from(&m);
            }
            let mut buf = Vec::new();
            ack().encode(&mut Encoder::new(&mut buf)).unwrap();
            for (at, b) in flips {
                let i = at % buf.len();
                buf[i] = b;
            }
            if let Some(m) = decode(&buf) {
                let _ = lease_from(&m);
            }
        }
    }
}
