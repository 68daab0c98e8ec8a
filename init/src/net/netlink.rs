//! rtnetlink, driven synchronously from PID 1 through a current-thread tokio runtime that
//! exists only while a network call runs.

use futures_util::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr};

#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<String>,
    pub loopback: bool,
}

/// What the network stage does with links: `Netlink` on the machine, a recording fake in
/// tests (`sys::fake`).
pub trait Links {
    fn links(&self) -> Result<Vec<Link>>;
    fn up(&self, index: u32, mtu: Option<u32>) -> Result<()>;
    /// Adds an address; one already there is fine.
    fn add_addr(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<()>;
    /// Adds (or replaces) an IPv4 route through `gw` on `index`; `prefix` 0 is the default route.
    fn add_route(&self, index: u32, dst: Ipv4Addr, prefix: u8, gw: Ipv4Addr) -> Result<()>;
}

pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

/// A netlink call that failed: the socket or its runtime, or the kernel's answer.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Kernel(#[from] rtnetlink::Error),
}

type Result<T> = std::result::Result<T, NetlinkError>;

impl Netlink {
    pub fn open() -> Result<Netlink> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            Ok::<_, NetlinkError>(handle)
        })?;
        Ok(Netlink { rt, handle })
    }
}

impl Links for Netlink {
    fn links(&self) -> Result<Vec<Link>> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut s = self.handle.link().get().execute();
            while let Some(m) = s.try_next().await? {
                let mut l = Link {
                    index: m.header.index,
                    name: String::new(),
                    mac: None,
                    loopback: m.header.flags.contains(LinkFlags::Loopback),
                };
                for a in m.attributes {
                    match a {
                        LinkAttribute::IfName(n) => l.name = n,
                        LinkAttribute::Address(b) if b.len() == 6 => {
                            l.mac = Some(
                                b.iter()
                                    .map(|x| format!("{x:02x}"))
                                    .collect::<Vec<_>>()
                                    .join(":"),
                            )
                        }
                        _ => {}
                    }
                }
                out.push(l);
            }
            Ok(out)
        })
    }

    fn up(&self, index: u32, mtu: Option<u32>) -> Result<()> {
        self.rt.block_on(async {
            let mut b = LinkUnspec::new_with_index(index).up();
            if let Some(m) = mtu {
                b = b.mtu(m);
            }
            self.handle
                .link()
                .set(b.build())
                .execute()
                .await
                .map_err(NetlinkError::from)
        })
    }

    fn add_addr(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
        self.rt.block_on(async {
            match self.handle.address().add(index, ip, prefix).execute().await {
                Ok(()) => Ok(()),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_eexist() => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn add_route(&self, index: u32, dst: Ipv4Addr, prefix: u8, gw: Ipv4Addr) -> Result<()> {
        self.rt.block_on(async {
            let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst, prefix)
                .gateway(gw)
                .output_interface(index)
                .build();
            self.handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(NetlinkError::from)
        })
    }
}

const fn libc_eexist() -> i32 {
    17
}
