//! The host's rules that keep containers tenants (iptables, the filter table):
//!
//! - `SHOAL-CONTAINERS`, jumped to from `INPUT` for traffic coming in on a Docker bridge
//!   (`docker0`, `br-*`): a container reaches the node itself only with replies to what the
//!   node opened and on the ingress ports (80, 443). The agent's status and API ports, the
//!   Docker socket's TCP twin, a metadata address bound on the node: all dropped.
//! - `DOCKER-USER` (Docker's hook in `FORWARD`): nothing from a container to the cloud
//!   metadata address (169.254.169.254), where a machine's user-data and credentials live.
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
/// Where clouds serve instance metadata and user-data.
pub const METADATA: &str = "169.254.169.254/32";
/// The bridges Docker makes: its default one and one per user-defined network.
const BRIDGES: [&str; 2] = ["docker0", "br-+"];

/// The rules of `CHAIN`, in order, as `iptables -S` prints them.
pub fn chain_rules() -> Vec<String> {
    vec![
        format!("-A {CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"),
        // Where a node serves the metadata address itself (a proxy, a test), not even on 80.
        format!("-A {CHAIN} -d {METADATA} -j DROP"),
        format!("-A {CHAIN} -p tcp -m multiport --dports 80,443 -j RETURN"),
        format!("-A {CHAIN} -j DROP"),
    ]
}

/// The jumps and drops outside `CHAIN`: (chain, rule arguments).
pub fn hooks() -> Vec<(&'static str, Vec<String>)> {
    let mut v: Vec<(&'static str, Vec<String>)> = BRIDGES
        .iter()
        .map(|b| ("INPUT", args(&format!("-i {b} -j {CHAIN}"))))
        .collect();
    v.push(("DOCKER-USER", args(&format!("-d {METADATA} -j DROP"))));
    v
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run iptables: {0}")]
    Spawn(std::io::Error),
    #[error("iptables {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// Runs iptables; `Ok(false)` when it ran and said no (a `-C` check that found nothing).
fn iptables(a: &[String]) -> Result<bool, FirewallError> {
    let out = Command::new("iptables")
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
        args: a.join(" "),
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

/// Makes the rules what they should be; cheap when they already are.
pub fn assert_rules() -> Result<Asserted, FirewallError> {
    let mut done = Asserted::default();
    let listed = Command::new("iptables")
        .args(["-w", "-S", CHAIN])
        .output()
        .map_err(FirewallError::Spawn)?;
    let have: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(String::from)
        .collect();
    if have != chain_rules() {
        if !listed.status.success() {
            iptables(&s(&["-N", CHAIN]))?;
        }
        // Flush and refill: the chain is without its drop for the few milliseconds between.
        iptables(&s(&["-F", CHAIN]))?;
        for r in chain_rules() {
            let mut a = args(&r);
            a[0] = "-A".into();
            iptables(&a)?;
        }
        done.rebuilt_chain = true;
    }
    // Docker makes DOCKER-USER when it starts; before that there is nothing to hook into.
    let docker_user = iptables(&s(&["-S", "DOCKER-USER"]))?;
    for (chain, rule) in hooks() {
        if chain == "DOCKER-USER" && !docker_user {
            continue;
        }
        let mut check = vec!["-C".to_string(), chain.to_string()];
        check.extend(rule.iter().cloned());
        if !iptables(&check)? {
            let mut insert = vec!["-I".to_string(), chain.to_string(), "1".to_string()];
            insert.extend(rule);
            iptables(&insert)?;
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
        let r = chain_rules();
        assert!(r[0].contains("RELATED,ESTABLISHED") && r[0].ends_with("-j RETURN"));
        assert!(r[1].contains("169.254.169.254/32") && r[1].ends_with("-j DROP"));
        assert!(r[2].contains("--dports 80,443"));
        assert_eq!(r.last().unwrap(), &format!("-A {CHAIN} -j DROP"));
        let h = hooks();
        assert!(h
            .iter()
            .any(|(c, a)| *c == "INPUT" && a.join(" ") == "-i br-+ -j SHOAL-CONTAINERS"));
        assert!(h
            .iter()
            .any(|(c, a)| *c == "DOCKER-USER" && a.join(" ").contains("169.254.169.254/32")));
    }
}
