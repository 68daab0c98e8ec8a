//! Which app answers a Host, and where its ready replicas are: a pure function of the
//! replicated apps and tasks, rebuilt when they change and read by every request.
//!
//! An app that declares a `run.port` answers to its `expose.hosts` and to
//! `<app>.<domain>`; a job answers to nothing. Its backends are its replicas that are ready
//! (the executor's probes said so), on this node first, else the live nodes that run one. Two
//! apps that claim one host: the app whose name sorts first keeps it (and the clash is
//! listed, so it can be shown).

use crate::spec::AppSpec;
use crate::state::records::{AppRecord, Task, TaskState};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

/// Where one app's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub app: String,
    /// Ready replicas on this node.
    pub local: Vec<SocketAddr>,
    /// Live nodes other than this one with a ready replica: (node id, its API address).
    pub remote: Vec<(String, String)>,
    /// Requests in the clear are sent to `https://` (`expose.force_https`).
    pub force_https: bool,
    /// For an app scaled to zero (`[scale] min = 0`): how long a request is held while a
    /// replica starts.
    pub wake: Option<std::time::Duration>,
}

/// Every host this cluster answers to.
#[derive(Debug, Clone, Default)]
pub struct Table {
    hosts: HashMap<String, Arc<Route>>,
    /// Hosts more than one app claims: (host, the app that keeps it, the others).
    pub clashes: Vec<(String, String, Vec<String>)>,
}

impl Table {
    /// The route for a request's Host (or HTTP/2 `:authority`), as the client wrote it.
    /// `<app>.internal` is for the cluster's own apps only: `inside` says whether the
    /// request came from one of this node's containers (or from a member that checked as
    /// much), asked only for such a name.
    pub fn route(&self, host: &str, inside: impl FnOnce() -> bool) -> Option<Arc<Route>> {
        let host = normalize(host)?;
        if is_internal(&host) && !inside() {
            return None;
        }
        self.hosts.get(&host).cloned()
    }

    /// Whether some host routes to `app`.
    pub fn has_app(&self, app: &str) -> bool {
        self.hosts.values().any(|r| r.app == app)
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

/// A Host as the table keys it: lowercase, without a port or a trailing dot; `None` for one
/// that is not a DNS name (an IP literal, an empty or malformed value).
pub fn normalize(host: &str) -> Option<String> {
    let name = match host.rsplit_once(':') {
        // `[v6]:port` and bare IPv6 are addresses, never an app's name.
        _ if host.starts_with('[') => return None,
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let labels_ok = name.split('.').all(|l| {
        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    (labels_ok && name.len() <= 253 && name.parse::<std::net::Ipv4Addr>().is_err()).then_some(name)
}

/// Whether a (normalized) host is a name of the cluster's own network, `<app>.internal`.
pub fn is_internal(host: &str) -> bool {
    host.strip_suffix(super::dns::SUFFIX)
        .is_some_and(|app| app.ends_with('.'))
}

/// The hosts `spec` answers to under `domain`: its `expose.hosts` and `<app>.<domain>`,
/// unless it is internal only; and `<app>.internal`.
pub fn hosts_of(spec: &AppSpec, domain: &str) -> Vec<String> {
    let mut out: Vec<String> = spec
        .expose
        .hosts
        .iter()
        .filter_map(|h| normalize(h))
        .collect();
    // And, for other apps, `<app>.internal` (`dns`).
    let outside = (!spec.expose.internal).then_some(domain);
    for d in outside.into_iter().chain([super::dns::SUFFIX]) {
        if let Some(h) = normalize(&format!("{}.{d}", spec.name)) {
            out.push(h);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The table for `apps` and `tasks` as node `me` sees them; `live` says which nodes are up,
/// `addrs` where their APIs are (a node without one is not routed to).
pub fn build(
    apps: &[AppRecord],
    tasks: &[Task],
    me: &str,
    domain: &str,
    live: impl Fn(&str) -> bool,
    addrs: &BTreeMap<String, String>,
) -> Table {
    let mut ready: BTreeMap<&str, (Vec<SocketAddr>, BTreeSet<&str>)> = BTreeMap::new();
    for t in tasks {
        if !(t.ready && t.state == TaskState::Running) {
            continue;
        }
        let e = ready.entry(t.app.as_str()).or_default();
        if t.node == me {
            let addr =
                t.ip.as_deref()
                    .zip(t.port)
                    .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port)));
            e.0.extend(addr);
        } else if live(&t.node) && addrs.contains_key(&t.node) {
            e.1.insert(t.node.as_str());
        }
    }
    let mut claims: BTreeMap<String, Vec<&AppRecord>> = BTreeMap::new();
    for a in apps
        .iter()
        .filter(|a| a.spec.run.port.is_some() && !a.spec.is_job())
    {
        for h in hosts_of(&a.spec, domain) {
            claims.entry(h).or_default().push(a);
        }
    }
    let mut routes: BTreeMap<&str, Arc<Route>> = BTreeMap::new();
    let mut table = Table::default();
    for (host, mut by) in claims {
        by.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        let keeper = by[0];
        if by.len() > 1 {
            table.clashes.push((
                host.clone(),
                keeper.spec.name.clone(),
                by[1..].iter().map(|a| a.spec.name.clone()).collect(),
            ));
        }
        let name = keeper.spec.name.as_str();
        let route = routes
            .entry(name)
            .or_insert_with(|| {
                let (mut local, remote) = ready.remove(name).unwrap_or_default();
                local.sort();
                Arc::new(Route {
                    app: name.to_string(),
                    local,
                    remote: remote
                        .into_iter()
                        .filter_map(|n| Some((n.to_string(), addrs.get(n)?.clone())))
                        .collect(),
                    force_https: keeper.spec.expose.force_https,
                    wake: keeper
                        .spec
                        .autoscale_policy()
                        .filter(|p| p.to_zero())
                        .map(|p| p.wake_timeout),
                })
            })
            .clone();
        table.hosts.insert(host, route);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, port: Option<u16>, hosts: &[&str]) -> AppRecord {
        let mut text = format!("name = \"{name}\"\n[source]\nimage = \"x:1\"\n");
        if let Some(p) = port {
            text += &format!("[run]\nport = {p}\n");
        }
        if !hosts.is_empty() {
            text += &format!("[expose]\nhosts = {hosts:?}\n");
        }
        AppRecord::new(AppSpec::parse(&text).unwrap(), String::new())
    }

    fn addrs() -> BTreeMap<String, String> {
        ["n1", "n2", "n3"]
            .iter()
            .map(|n| (n.to_string(), format!("{n}.lan:7443")))
            .collect()
    }

    fn remote(n: &str) -> (String, String) {
        (n.to_string(), format!("{n}.lan:7443"))
    }

    fn task(app: &str, node: &str, ip: &str, ready: bool) -> Task {
        Task {
            app: app.into(),
            replica: 0,
            node: node.into(),
            version: "v".into(),
            image: "x:1".into(),
            state: TaskState::Running,
            reason: String::new(),
            since_ms: 0,
            container: Some("c".into()),
            ip: Some(ip.into()),
            port: Some(8080),
            restarts: 0,
            exit_code: None,
            ready,
            failures: 0,
            version_since_ms: 0,
            agent_started_ms: 0,
        }
    }

    #[test]
    fn hosts_are_matched_without_case_port_or_trailing_dot_and_never_as_addresses() {
        for (given, want) in [
            ("Web.Example.COM", Some("web.example.com")),
            ("web.example.com:8080", Some("web.example.com")),
            ("web.example.com.", Some("web.example.com")),
            ("localhost", Some("localhost")),
            ("10.0.0.1", None),
            ("10.0.0.1:80", None),
            ("[::1]:80", None),
            ("::1", None),
            ("", None),
            ("a..b", None),
            ("we b", None),
            ("web:80:80", None),
            ("web:x", None),
        ] {
            assert_eq!(normalize(given).as_deref(), want, "{given:?}");
        }
    }

    #[test]
    fn an_app_answers_to_its_hosts_and_its_name_under_the_domain_with_ready_replicas_only() {
        let apps = [
            app("web", Some(8080), &["www.example.com"]),
            app("worker", None, &[]),
        ];
        let tasks = [
            task("web", "n1", "10.0.0.2", true),
            task("web", "n1", "10.0.0.3", false),
            task("web", "n2", "10.1.0.2", true),
            task("web", "n3", "10.2.0.2", true),
        ];
        let t = build(&apps, &tasks, "n1", "localhost", |n| n != "n3", &addrs());
        let r = t.route("WWW.example.com:80", || false).unwrap();
        assert_eq!(r.app, "web");
        assert_eq!(r.local, ["10.0.0.2:8080".parse().unwrap()]);
        assert_eq!(r.remote, [remote("n2")], "n3 is down");
        assert_eq!(t.route("web.localhost", || false).unwrap(), r);
        assert_eq!(
            t.route("web.internal", || true).unwrap(),
            r,
            "other apps' name for it"
        );
        assert!(
            t.route("web.internal", || false).is_none(),
            "the cluster's own name is not for outside clients"
        );
        assert!(
            t.route("worker.localhost", || false).is_none(),
            "no port, no route"
        );
        assert!(t.route("other.localhost", || false).is_none());
        assert_eq!(t.len(), 3);
        // Seen from n2: its own replica is local, n1's is remote.
        let t = build(&apps, &tasks, "n2", "localhost", |_| true, &addrs());
        let r = t.route("web.localhost", || false).unwrap();
        assert_eq!(r.local, ["10.1.0.2:8080".parse().unwrap()]);
        assert_eq!(r.remote, [remote("n1"), remote("n3")]);
    }

    #[test]
    fn an_internal_app_answers_to_its_internal_name_from_inside_only() {
        let mut db = app("db", Some(5432), &[]);
        db.spec.expose.internal = true;
        let apps = [db, app("web", Some(8080), &[])];
        let t = build(&apps, &[], "n1", "localhost", |_| true, &addrs());
        assert_eq!(t.route("db.internal", || true).unwrap().app, "db");
        assert_eq!(t.route("DB.internal.:80", || true).unwrap().app, "db");
        for outside in ["db.internal", "db.localhost"] {
            assert!(t.route(outside, || false).is_none(), "{outside}");
        }
        assert!(
            t.route("db.localhost", || true).is_none(),
            "no outside name at all"
        );
        assert_eq!(t.route("web.localhost", || false).unwrap().app, "web");
        assert!(is_internal("a.internal") && !is_internal("internal") && !is_internal("ainternal"));
    }

    #[test]
    fn a_host_two_apps_claim_goes_to_the_first_by_name_and_the_clash_is_listed() {
        let apps = [
            app("zeta", Some(80), &["shop.example.com"]),
            app("alpha", Some(80), &["shop.example.com"]),
        ];
        let t = build(&apps, &[], "n1", "localhost", |_| true, &addrs());
        assert_eq!(t.route("shop.example.com", || false).unwrap().app, "alpha");
        assert_eq!(t.route("zeta.localhost", || false).unwrap().app, "zeta");
        assert_eq!(
            t.clashes,
            [(
                "shop.example.com".to_string(),
                "alpha".to_string(),
                vec!["zeta".to_string()]
            )]
        );
    }

    #[test]
    fn a_job_answers_to_nothing() {
        let mut a = app("batch", Some(80), &["batch.example.com"]);
        a.spec.kind = Some("job".into());
        let t = build(&[a], &[], "n1", "localhost", |_| true, &addrs());
        assert!(t.is_empty());
    }
}
