//! mDNS (mdns-sd): browse `_shoal._tcp.local.` from the start (a joiner needs candidates before
//! it is a member) and advertise this node once it is one.
//!
//! TXT records: `c` = cluster hash (never the id or a secret), `id` = node id, `api` = API port,
//! `v` = agent version.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

pub const SERVICE_TYPE: &str = "_shoal._tcp.local.";

/// One advertised node, as last resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub fullname: String,
    pub id: String,
    pub cluster_hash: String,
    pub version: String,
    pub addrs: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
#[error("mDNS: {0}")]
pub struct MdnsError(String);

impl From<mdns_sd::Error> for MdnsError {
    fn from(e: mdns_sd::Error) -> Self {
        MdnsError(e.to_string())
    }
}

/// A running mDNS responder and browser.
pub struct Mdns {
    daemon: mdns_sd::ServiceDaemon,
    seen: Arc<Mutex<BTreeMap<String, Seen>>>,
    changed: Arc<tokio::sync::Notify>,
    registered: Mutex<Option<String>>,
}

/// Parses a resolved service into what discovery needs; `None` if it is not a shoal node.
fn parse(info: &mdns_sd::ResolvedService) -> Option<Seen> {
    let id = info.get_property_val_str("id")?.to_string();
    let cluster_hash = info.get_property_val_str("c")?.to_string();
    let version = info.get_property_val_str("v").unwrap_or("").to_string();
    let port = info
        .get_property_val_str("api")
        .and_then(|p| p.parse().ok())
        .unwrap_or(info.get_port());
    let mut addrs: Vec<SocketAddr> = info
        .get_addresses_v4()
        .into_iter()
        .map(|ip| SocketAddr::new(IpAddr::V4(ip), port))
        .collect();
    addrs.sort();
    if id.is_empty() || addrs.is_empty() {
        return None;
    }
    Some(Seen {
        fullname: info.get_fullname().to_string(),
        id,
        cluster_hash,
        version,
        addrs,
    })
}

impl Mdns {
    /// Starts the responder and browses for shoal nodes.
    pub fn start() -> Result<Mdns, MdnsError> {
        let daemon = mdns_sd::ServiceDaemon::new()?;
        let rx = daemon.browse(SERVICE_TYPE)?;
        let seen: Arc<Mutex<BTreeMap<String, Seen>>> = Arc::default();
        let changed = Arc::new(tokio::sync::Notify::new());
        let (s, c) = (seen.clone(), changed.clone());
        tokio::spawn(async move {
            while let Ok(ev) = rx.recv_async().await {
                match ev {
                    mdns_sd::ServiceEvent::ServiceResolved(info) => {
                        if let Some(node) = parse(&info) {
                            if let Ok(mut m) = s.lock() {
                                if m.get(&node.fullname) != Some(&node) {
                                    tracing::debug!(node = %node.id, addrs = ?node.addrs, "mDNS: resolved");
                                    m.insert(node.fullname.clone(), node);
                                }
                            }
                            c.notify_waiters();
                        }
                    }
                    mdns_sd::ServiceEvent::ServiceRemoved(_, fullname) => {
                        if let Ok(mut m) = s.lock() {
                            m.remove(&fullname);
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(Mdns {
            daemon,
            seen,
            changed,
            registered: Mutex::new(None),
        })
    }

    /// Advertises this node. `ips` empty: every address of every interface, kept current.
    pub fn advertise(
        &self,
        node_id: &str,
        cluster_hash: &str,
        api_port: u16,
        version: &str,
        ips: &[IpAddr],
    ) -> Result<(), MdnsError> {
        let props = [
            ("c", cluster_hash),
            ("id", node_id),
            ("api", &api_port.to_string()),
            ("v", version),
        ];
        let host = format!("{node_id}.local.");
        let ip_list: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
        let mut info = mdns_sd::ServiceInfo::new(
            SERVICE_TYPE,
            node_id,
            &host,
            ip_list.join(",").as_str(),
            api_port,
            &props[..],
        )?;
        if ips.is_empty() {
            info = info.enable_addr_auto();
        }
        let fullname = info.get_fullname().to_string();
        self.daemon.register(info)?;
        if let Ok(mut r) = self.registered.lock() {
            *r = Some(fullname);
        }
        Ok(())
    }

    /// Every shoal node currently advertised, this one included.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Resolves when something new was seen.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Withdraws the advertisement (a goodbye packet) and stops the responder.
    pub async fn stop(&self) {
        let name = self.registered.lock().ok().and_then(|mut r| r.take());
        if let Some(name) = name {
            if let Ok(rx) = self.daemon.unregister(&name) {
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), rx.recv_async()).await;
            }
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), rx.recv_async()).await;
        }
    }
}
