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

pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Netlink {
    pub fn open() -> Result<Netlink, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(err)?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(err)?;
            tokio::spawn(conn);
            Ok::<_, String>(handle)
        })?;
        Ok(Netlink { rt, handle })
    }

    pub fn links(&self) -> Result<Vec<Link>, String> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut s = self.handle.link().get().execute();
            while let Some(m) = s.try_next().await.map_err(err)? {
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

    pub fn up(&self, index: u32, mtu: Option<u32>) -> Result<(), String> {
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
                .map_err(err)
        })
    }

    /// Adds an address; one already there is fine.
    pub fn add_addr(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<(), String> {
        self.rt.block_on(async {
            match self.handle.address().add(index, ip, prefix).execute().await {
                Ok(()) => Ok(()),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_eexist() => Ok(()),
                Err(e) => Err(err(e)),
            }
        })
    }

    /// Adds (or replaces) an IPv4 route through `gw` on `index`; `prefix` 0 is the default route.
    pub fn add_route(
        &self,
        index: u32,
        dst: Ipv4Addr,
        prefix: u8,
        gw: Ipv4Addr,
    ) -> Result<(), String> {
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
                .map_err(err)
        })
    }
}

const fn libc_eexist() -> i32 {
    17
}
