//! The host's rules that keep containers tenants (iptables and ip6tables, the filter table):
//!
//! - `SHOAL-CONTAINERS`, jumped to from `INPUT` for traffic coming in on a Docker bridge
//!   (`docker0`, `br-*`): a container reaches the node itself only with replies to what the
//!   node opened, on the ingress ports (80, 443) and at the resolver (UDP 53). The agent's status and API ports, the
//!   Docker socket's TCP twin, a metadata address bound on the node: all dropped.
//! - `DOCKER-USER` (Docker's hook in `FORWARD`): nothing from a container to the cloud
//!   metadata address (169.254.169.254, and EC2's fd00:ec2::254 over IPv6), where a
//!   machine's user-data and credentials live.
//!
//! Between apps, Docker's per-network isolation does the rest: each app has its own bridge
//! network (`docker::network_name`), and Docker drops traffic between bridges.
//!
//! The agent asserts the rules when its executor starts and every 15 s after (a restarted
//! dockerd or a hand-made flush undoes them); asserting is a handful of `iptables -C` calls
//! when nothing changed. Rules are what is checked, so several agents sharing one Docker
//! (tests, a development machine) assert the same ones.

use std::process::Command;

/// The chain the agent owns.
pub const CHAIN: &str = "SHOAL-CONTAINERS";
/// The bridges Docker makes: its default one and one per user-defined network.
const BRIDGES: [&str; 2] = ["docker0", "br-+"];

/// Both address families get the same rules: a container with an IPv6 address (or a
/// link-local one) must not find the node's ports open over IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// Where clouds serve instance metadata and user-data, as `-S` prints it.
    pub fn metadata(self) -> &'static str {
        match self {
            Family::V4 => "169.254.169.254/32",
            Family::V6 => "fd00:ec2::254/128",
        }
    }
}

/// The rules of `CHAIN`, in order, as `iptables -S` prints them.
pub fn chain_rules(f: Family) -> Vec<String> {
    let metadata = f.metadata();
    vec![
        format!("-A {CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"),
        // Where a node serves the metadata address itself (a proxy, a test), not even on 80.
        format!("-A {CHAIN} -d {metadata} -j DROP"),
        format!("-A {CHAIN} -p tcp -m multiport --dports 80,443 -j RETURN"),
        // The resolver on the gateway (`<app>.internal`, and names passed on).
        format!("-A {CHAIN} -p udp -m udp --dport 53 -j RETURN"),
        format!("-A {CHAIN} -j DROP"),
    ]
}

/// The jumps and drops outside `CHAIN`: (chain, rule arguments).
pub fn hooks(f: Family) -> Vec<(&'static str, Vec<String>)> {
    let mut v: Vec<(&'static str, Vec<String>)> = BRIDGES
        .iter()
        .map(|b| ("INPUT", args(&format!("-i {b} -j {CHAIN}"))))
        .collect();
    v.push(("DOCKER-USER", args(&format!("-d {} -j DROP", f.metadata()))));
    v
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run iptables: {0}")]
    Spawn(std::io::Error),
    #[error("{args} failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// Runs iptables; `Ok(false)` when it ran and said no (a `-C` check that found nothing).
fn iptables(f: Family, a: &[String]) -> Result<bool, FirewallError> {
    let out = Command::new(f.tool())
        .arg("-w")
        .args(a)
        .output()
        .map_err(FirewallError::Spawn)?;
    if out.status.success() {
        return Ok(true);
    }
    // 1: the rule (or chain) is not there; anything else is a real failure.
    if out.status.code() == Some(1) && a.first().is_some_and(|f| f == "-C" || f == "-S") {
        return Ok(false);
    }
    Err(FirewallError::Failed {
        args: format!("{} {}", f.tool(), a.join(" ")),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// What asserting changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Asserted {
    pub rebuilt_chain: bool,
    pub hooks_added: usize,
}

/// Makes the rules what they should be in both families; cheap when they already are.
pub fn assert_rules() -> Result<Asserted, FirewallError> {
    let mut done = Asserted::default();
    for f in Family::ALL {
        let d = assert_family(f)?;
        done.rebuilt_chain |= d.rebuilt_chain;
        done.hooks_added += d.hooks_added;
    }
    Ok(done)
}

fn assert_family(f: Family) -> Result<Asserted, FirewallError> {
    let mut done = Asserted::default();
    let listed = Command::new(f.tool())
        .args(["-w", "-S", CHAIN])
        .output()
        .map_err(FirewallError::Spawn)?;
    let have: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(String::from)
        .collect();
    if have != chain_rules(f) {
        if !listed.status.success() {
            iptables(f, &s(&["-N", CHAIN]))?;
        }
        // Flush and refill: the chain is without its drop for the few milliseconds between.
        iptables(f, &s(&["-F", CHAIN]))?;
        for r in chain_rules(f) {
            let mut a = args(&r);
            a[0] = "-A".into();
            iptables(f, &a)?;
        }
        done.rebuilt_chain = true;
    }
    // Docker makes DOCKER-USER when it starts (in ip6tables only with its `ip6tables`
    // option); before that there is nothing to hook into.
    let docker_user = iptables(f, &s(&["-S", "DOCKER-USER"]))?;
    for (chain, rule) in hooks(f) {
        if chain == "DOCKER-USER" && !docker_user {
            continue;
        }
        let mut check = vec!["-C".to_string(), chain.to_string()];
        check.extend(rule.iter().cloned());
        if !iptables(f, &check)? {
            let mut insert = vec!["-I".to_string(), chain.to_string(), "1".to_string()];
            insert.extend(rule);
            iptables(f, &insert)?;
            done.hooks_added += 1;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_lets_through_only_replies_and_the_ingress() {
        for (f, metadata) in [
            (Family::V4, "169.254.169.254/32"),
            (Family::V6, "fd00:ec2::254/128"),
        ] {
            let r = chain_rules(f);
            assert!(r[0].contains("RELATED,ESTABLISHED") && r[0].ends_with("-j RETURN"));
            assert!(r[1].contains(metadata) && r[1].ends_with("-j DROP"));
            assert!(r[2].contains("--dports 80,443"));
            assert_eq!(r.last().unwrap(), &format!("-A {CHAIN} -j DROP"));
            let h = hooks(f);
            assert!(h
                .iter()
                .any(|(c, a)| *c == "INPUT" && a.join(" ") == "-i br-+ -j SHOAL-CONTAINERS"));
            assert!(h
                .iter()
                .any(|(c, a)| *c == "DOCKER-USER" && a.join(" ").contains(metadata)));
        }
    }
}
