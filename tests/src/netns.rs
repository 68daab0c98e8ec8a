//! A virtual LAN of network namespaces: one "switch" namespace holding a Linux bridge, one
//! namespace per host with `eth0` on the bridge, and a port from the test's own namespace so
//! the test can reach every host. The bridge lives in its own namespace so that the host's
//! firewall (Docker sets the FORWARD policy to DROP, and br_netfilter applies it to bridged
//! frames) never sees the LAN's traffic. Multicast (mDNS) crosses the bridge like on a real
//! switch. Everything is removed on drop.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Panics with a clear message when the test cannot create namespaces (not root).
pub fn require_root() {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "this test builds network namespaces and needs root (tests/run runs as root)"
    );
}

pub struct Host {
    pub ns: String,
    pub ip: String,
    /// The host's port on the bridge, in the switch namespace.
    port: String,
}

pub struct Lan {
    pub tag: String,
    switch: String,
    /// The first three octets of the LAN's /24.
    pub subnet: String,
    pub hosts: Vec<Host>,
    root_if: String,
}

impl Lan {
    /// A LAN with `n` hosts, `10.213.K.11`, `.12`, ...; the test's namespace is `.1`.
    pub fn new(n: usize) -> Lan {
        require_root();
        // Claim a free number: creating the switch namespace fails if another test (in this or
        // another process) holds it, so the first success is ours alone.
        let start = std::process::id() + NEXT.fetch_add(1, Ordering::Relaxed) * 7;
        let k = (0..250)
            .map(|i| (start + i) % 250 + 1)
            .find(|k| {
                Command::new("ip")
                    .args(["netns", "add", &format!("sh{k}-sw")])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("no free namespace number: remove leftovers with `ip -all netns del`");
        let tag = format!("sh{k}");
        let switch = format!("{tag}-sw");
        let subnet = format!("10.213.{k}");
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        ip(&["-n", &switch, "link", "set", "lo", "up"]);
        let root_if = format!("{tag}-h");
        let _ = Command::new("ip").args(["link", "del", &root_if]).output();
        ip(&[
            "link", "add", &root_if, "type", "veth", "peer", "name", "uplink", "netns", &switch,
        ]);
        ip(&[
            "-n", &switch, "link", "set", "uplink", "master", "br0", "up",
        ]);
        ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", &root_if]);
        ip(&["link", "set", &root_if, "up"]);
        let mut lan = Lan {
            tag,
            switch,
            subnet,
            hosts: Vec::new(),
            root_if,
        };
        for _ in 0..n {
            lan.add_host();
        }
        lan
    }

    /// Adds a host namespace with `eth0` on the bridge, addressed.
    pub fn add_host(&mut self) -> &Host {
        self.add(true)
    }

    /// Adds a host namespace with `eth0` on the bridge, down and without an address: for
    /// something that configures the network itself (shoal-init).
    pub fn add_bare_host(&mut self) -> &Host {
        self.add(false)
    }

    fn add(&mut self, configure: bool) -> &Host {
        let i = self.hosts.len();
        let ns = format!("{}-{}", self.tag, i + 1);
        let port = format!("p{}", i + 1);
        let addr = format!("{}.{}", self.subnet, 11 + i);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &self.switch,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ]);
        if configure {
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            // mDNS sends to 224.0.0.251: give multicast a route even without a default route.
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"]);
        }
        self.hosts.push(Host { ns, ip: addr, port });
        self.hosts.last().unwrap()
    }

    /// Routes `cidr` from the test's namespace through host `i` (its containers' networks),
    /// and lets that host forward. Gone with the LAN.
    pub fn route(&self, cidr: &str, i: usize) {
        let h = &self.hosts[i];
        ip(&["route", "replace", cidr, "via", &h.ip, "dev", &self.root_if]);
        ip(&[
            "netns",
            "exec",
            &h.ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
    }

    /// The test's own address on the LAN.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// Cuts host `i` off the switch (its own interface stays up, as when a cable is pulled
    /// at the far end of a switch port that still carries link).
    pub fn partition(&self, i: usize) {
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &self.hosts[i].port,
            "nomaster",
        ]);
    }

    pub fn heal(&self, i: usize) {
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &self.hosts[i].port,
            "master",
            "br0",
        ]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .output();
    }
}
