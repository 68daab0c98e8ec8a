//! What to do about this node's containers, decided from what should run and what does
//! (and whether it is ready), with no IO: the executor's loop carries the plan out.

use super::{ContainerSpec, Observed};

/// One replica this node should run, at one version of its app.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub app: String,
    pub replica: u32,
    pub version: String,
    pub spec: ContainerSpec,
    /// How its readiness is known (`[health]`).
    pub probe: crate::spec::Probe,
    /// Stop a container of another version of this replica now, not once this one is ready
    /// (a rollout's `unavailable`).
    pub replace_at_once: bool,
    /// For a job (`kind = "job"`): its retries after a failed run. A job's replica that
    /// exited is not restarted once it succeeded or ran out of retries.
    pub job: Option<u32>,
    /// The registry login for pulling its image (`source.credentials`).
    pub pull_auth: Option<super::RegistryAuth>,
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Desired replicas (by index) and their running container.
    pub running: Vec<(usize, Observed)>,
    /// Desired replicas whose container stopped: record how, remove it, start anew.
    pub stopped: Vec<(usize, Observed)>,
    /// Desired replicas with no container at all.
    pub missing: Vec<usize>,
    /// Containers nothing accounts for: removed apps, replicas placed elsewhere, old versions
    /// already replaced, duplicates.
    pub extra: Vec<Observed>,
}

/// `waiting`: replicas placed here that cannot start yet (a secret or image missing): an
/// older version of theirs keeps running meanwhile.
pub fn plan(desired: &[Desired], observed: &[Observed], waiting: &[(String, u32)]) -> Plan {
    let mut p = Plan::default();
    let mut claimed = vec![false; observed.len()];
    for (i, d) in desired.iter().enumerate() {
        let same =
            |o: &Observed| o.app == d.app && o.replica == d.replica && o.version == d.version;
        // A running copy wins over a stopped one; any further copies are extra.
        let pick = (0..observed.len())
            .filter(|&j| !claimed[j] && same(&observed[j]))
            .max_by_key(|&j| (observed[j].running, std::cmp::Reverse(j)));
        match pick {
            Some(j) if observed[j].running => {
                claimed[j] = true;
                p.running.push((i, observed[j].clone()));
            }
            Some(j) => {
                claimed[j] = true;
                p.stopped.push((i, observed[j].clone()));
            }
            None => p.missing.push(i),
        }
    }
    // Replaced only once the replacement is ready: never stop what serves for what does not.
    let replaced = |o: &Observed| {
        p.running.iter().any(|(i, new)| {
            desired[*i].app == o.app && desired[*i].replica == o.replica && new.ready
        })
    };
    let at_once = |o: &Observed| {
        desired
            .iter()
            .any(|d| d.app == o.app && d.replica == o.replica && d.replace_at_once)
    };
    let wanted = |o: &Observed| {
        desired
            .iter()
            .any(|d| d.app == o.app && d.replica == o.replica)
            || waiting.iter().any(|(a, r)| *a == o.app && *r == o.replica)
    };
    for (j, o) in observed.iter().enumerate() {
        if claimed[j] {
            continue;
        }
        // An older version keeps serving until its replacement is ready.
        if o.running && wanted(o) && !replaced(o) && !at_once(o) {
            continue;
        }
        p.extra.push(o.clone());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(app: &str, replica: u32, version: &str) -> Desired {
        Desired {
            app: app.into(),
            replica,
            version: version.into(),
            spec: ContainerSpec {
                name: super::super::container_name("c", app, replica, version, "n1"),
                image: "img".into(),
                command: vec![],
                env: vec![],
                labels: Default::default(),
                memory_bytes: None,
                nano_cpus: None,
                port: None,
                network: "net".into(),
                volumes: vec![],
            },
            probe: crate::spec::AppSpec::parse("name = \"a\"").unwrap().probe(),
            replace_at_once: false,
            job: None,
            pull_auth: None,
        }
    }

    fn seen(id: &str, app: &str, replica: u32, version: &str, running: bool) -> Observed {
        Observed {
            id: id.into(),
            app: app.into(),
            replica,
            version: version.into(),
            running,
            exit_code: (!running).then_some(1),
            ip: None,
            ready: running,
        }
    }

    fn ids(v: &[Observed]) -> Vec<&str> {
        v.iter().map(|o| o.id.as_str()).collect()
    }

    #[test]
    fn table() {
        let d = [desired("web", 0, "v2"), desired("web", 1, "v2")];
        // (what runs, running ids, stopped ids, missing indices, extra ids)
        type Case<'a> = (
            &'a [Observed],
            &'a [&'a str],
            &'a [&'a str],
            &'a [usize],
            &'a [&'a str],
        );
        let cases: &[Case] = &[
            (&[], &[], &[], &[0, 1], &[]),
            (
                &[
                    seen("a", "web", 0, "v2", true),
                    seen("b", "web", 1, "v2", true),
                ],
                &["a", "b"],
                &[],
                &[],
                &[],
            ),
            // A crashed container is replaced.
            (&[seen("a", "web", 0, "v2", false)], &[], &["a"], &[1], &[]),
            // Duplicates: the running one stays, the others go.
            (
                &[
                    seen("a", "web", 0, "v2", false),
                    seen("b", "web", 0, "v2", true),
                    seen("c", "web", 0, "v2", true),
                ],
                &["b"],
                &[],
                &[1],
                &["a", "c"],
            ),
            // An old version serves until its replacement is ready, then goes.
            (&[seen("o", "web", 0, "v1", true)], &[], &[], &[0, 1], &[]),
            (
                &[
                    seen("o", "web", 0, "v1", true),
                    Observed {
                        ready: false,
                        ..seen("n", "web", 0, "v2", true)
                    },
                ],
                &["n"],
                &[],
                &[1],
                &[],
            ),
            (
                &[
                    seen("o", "web", 0, "v1", true),
                    seen("n", "web", 0, "v2", true),
                ],
                &["n"],
                &[],
                &[1],
                &["o"],
            ),
            // A stopped old version, a removed app, a replica placed elsewhere: all extra.
            (
                &[
                    seen("o", "web", 0, "v1", false),
                    seen("x", "gone", 0, "v1", true),
                    seen("r", "web", 7, "v2", true),
                ],
                &[],
                &[],
                &[0, 1],
                &["o", "x", "r"],
            ),
        ];
        for (i, (obs, running, stopped, missing, extra)) in cases.iter().enumerate() {
            let p = plan(&d, obs, &[]);
            let r: Vec<Observed> = p.running.iter().map(|(_, o)| o.clone()).collect();
            let s: Vec<Observed> = p.stopped.iter().map(|(_, o)| o.clone()).collect();
            assert_eq!(ids(&r), *running, "case {i}");
            assert_eq!(ids(&s), *stopped, "case {i}");
            assert_eq!(p.missing, *missing, "case {i}");
            assert_eq!(ids(&p.extra), *extra, "case {i}");
        }
        // Told to replace at once, the old version goes before the new one is ready.
        let mut at_once = d.clone();
        at_once[0].replace_at_once = true;
        let obs = [seen("o", "web", 0, "v1", true)];
        assert_eq!(ids(&plan(&at_once, &obs, &[]).extra), ["o"]);
        assert!(plan(&d, &obs, &[]).extra.is_empty());
        // A replica waiting for its secret keeps its old version running.
        let old = [seen("o", "web", 0, "v1", true)];
        assert!(plan(&[], &old, &[("web".into(), 0)]).extra.is_empty());
        assert_eq!(ids(&plan(&[], &old, &[]).extra), ["o"]);
    }
}
