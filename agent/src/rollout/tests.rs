use super::*;

const NODES: [&str; 3] = ["n1", "n2", "n3"];

fn spec(image: &str, extra: &str) -> AppSpec {
    AppSpec::parse(&format!(
        "name = \"web\"\n[source]\nimage = \"{image}\"\n[scale]\nreplicas = 3\n{extra}"
    ))
    .unwrap()
}

/// A view of three nodes where `web` was at image `a`, now at `b` (record "r2").
fn view(extra: &str) -> View {
    let old = spec("a", extra);
    let new = spec("b", extra);
    View {
        history: BTreeMap::from([(
            "web".to_string(),
            vec![Previous {
                revision: old.revision(),
                spec: old,
                replaced_ms: 1,
            }],
        )]),
        apps: vec![AppRecord::new(new, "r2".into())],
        nodes: NODES.iter().map(|n| (n.to_string(), node(n))).collect(),
        ..View::default()
    }
}

fn node(id: &str) -> crate::state::records::NodeRecord {
    crate::state::records::NodeRecord {
        id: id.into(),
        addr: String::new(),
        version: String::new(),
        started_at_ms: 7,
        labels: Default::default(),
        containers: true,
        capacity: None,
    }
}

fn rev(v: &View, image: &str) -> String {
    if v.apps[0].spec.source.image.as_deref() == Some(image) {
        v.apps[0].revision.clone()
    } else {
        v.history["web"][0].revision.clone()
    }
}

fn task(replica: u32, node: &str, revision: &str, state: TaskState, ready: bool) -> Task {
    Task {
        app: "web".into(),
        replica,
        node: node.into(),
        version: revision.into(),
        image: String::new(),
        state,
        reason: "why".into(),
        since_ms: 1000,
        container: Some(format!("c{replica}")),
        ip: None,
        port: None,
        restarts: 0,
        exit_code: None,
        ready,
        failures: 0,
        version_since_ms: 0,
        agent_started_ms: 7,
    }
}

/// Sets the task of the slot that holds `replica` (as placed now).
fn set(v: &mut View, replica: u32, revision: &str, state: TaskState, ready: bool) {
    let node = v
        .place()
        .placements
        .into_iter()
        .find(|p| p.replica == replica)
        .unwrap()
        .node;
    v.tasks.retain(|t| t.replica != replica);
    v.tasks.push(task(replica, &node, revision, state, ready));
}

fn all_at(v: &mut View, revision: &str) {
    for r in 0..3 {
        set(v, r, revision, TaskState::Running, true);
    }
}

fn revisions(v: &View) -> Vec<(String, bool)> {
    v.slots(&v.place())
        .into_iter()
        .map(|s| (s.revision, s.replace_at_once))
        .collect()
}

#[test]
fn one_replica_at_a_time_and_only_once_the_last_is_ready() {
    let mut v = view("");
    let (a, b) = (rev(&v, "a"), rev(&v, "b"));
    all_at(&mut v, &a);
    let want = |n: usize| -> Vec<(String, bool)> {
        (0..3)
            .map(|i| (if i < n { b.clone() } else { a.clone() }, false))
            .collect()
    };
    assert_eq!(revisions(&v), want(1));
    // Replica 0 starting at b: still the only one.
    set(&mut v, 0, &b, TaskState::Starting, false);
    assert_eq!(revisions(&v), want(1));
    // Running but not ready is not enough.
    set(&mut v, 0, &b, TaskState::Running, false);
    assert_eq!(revisions(&v), want(1));
    set(&mut v, 0, &b, TaskState::Running, true);
    assert_eq!(revisions(&v), want(2));
    set(&mut v, 1, &b, TaskState::Running, true);
    assert_eq!(revisions(&v), want(3));
}

#[test]
fn surge_and_unavailable_widen_the_window() {
    let mut v = view("[update]\nsurge = 1\nunavailable = 1\n");
    let (a, b) = (rev(&v, "a"), rev(&v, "b"));
    all_at(&mut v, &a);
    // Two move at once: the first keeps its old replica until ready, the second does not.
    assert_eq!(
        revisions(&v),
        vec![(b.clone(), false), (b.clone(), true), (a.clone(), false)]
    );
    let mut v = view("[update]\nsurge = 0\nunavailable = 1\n");
    all_at(&mut v, &a);
    assert_eq!(
        revisions(&v),
        vec![(b.clone(), true), (a.clone(), false), (a.clone(), false)]
    );
}

#[test]
fn slots_with_nothing_ready_take_the_new_revision_at_once() {
    let mut v = view("");
    let (a, b) = (rev(&v, "a"), rev(&v, "b"));
    // Replica 0 runs a, ready; 1 has crashed at a; 2 has no task at all.
    set(&mut v, 0, &a, TaskState::Running, true);
    set(&mut v, 1, &a, TaskState::Failed, false);
    let r = revisions(&v);
    assert_eq!(r[1], (b.clone(), false));
    assert_eq!(r[2], (b.clone(), false));
    // Replica 0 still advances: nothing of b is short of ready yet.
    assert_eq!(r[0], (b.clone(), false));
    // With 1 and 2 starting, 0 waits.
    set(&mut v, 1, &b, TaskState::Starting, false);
    set(&mut v, 2, &b, TaskState::Starting, false);
    assert_eq!(revisions(&v)[0], (a.clone(), false));
}

#[test]
fn a_revision_whose_spec_is_unknown_is_not_kept() {
    let mut v = view("");
    let b = rev(&v, "b");
    all_at(&mut v, "gone");
    assert!(revisions(&v).iter().all(|(r, _)| *r == b));
}

#[test]
fn the_owner_judges_complete_failed_or_late() {
    let mut v = view("[update]\ndeadline = \"10s\"\nmax_failures = 2\n");
    let b = rev(&v, "b");
    let app = v.apps[0].clone();
    assert_eq!(v.judge(&app, &v.place(), 2000, "n1"), None);
    all_at(&mut v, &b);
    // Ready since 1000: not for the 5 s of monitoring yet.
    assert_eq!(v.judge(&app, &v.place(), 5999, "n1"), None);
    let done = v.judge(&app, &v.place(), 6000, "n1").unwrap();
    assert_eq!(done.outcome, Outcome::Complete);
    assert_eq!((done.record.as_str(), done.by.as_str()), ("r2", "n1"));
    // Once recorded, nothing more is said of that record.
    v.outcomes.insert(("web".into(), b.clone()), done);
    assert_eq!(v.judge(&app, &v.place(), 9000, "n1"), None);

    let mut v = view("[update]\ndeadline = \"10s\"\nmax_failures = 2\n");
    all_at(&mut v, &b);
    set(&mut v, 1, &b, TaskState::Starting, false);
    v.tasks
        .iter_mut()
        .find(|t| t.replica == 1)
        .unwrap()
        .failures = 2;
    let failed = v.judge(&app, &v.place(), 2000, "n1").unwrap();
    assert_eq!(failed.outcome, Outcome::Failed);
    assert!(failed.reason.contains("replica 1") && failed.reason.contains("failed 2 times"));

    let mut v = view("[update]\ndeadline = \"10s\"\n");
    all_at(&mut v, &b);
    set(&mut v, 2, &b, TaskState::Starting, false);
    assert_eq!(v.judge(&app, &v.place(), 11_000, "n1"), None);
    let late = v.judge(&app, &v.place(), 11_001, "n1").unwrap();
    assert!(
        late.reason.contains("not ready within 10s: why"),
        "{late:?}"
    );
}

#[test]
fn a_failed_rollout_rolls_back_unless_told_not_to() {
    for (extra, back) in [("", true), ("[update]\nrollback = false\n", false)] {
        let mut v = view(extra);
        let (a, b) = (rev(&v, "a"), rev(&v, "b"));
        all_at(&mut v, &a);
        set(&mut v, 0, &b, TaskState::Starting, false);
        assert_eq!(v.status(&v.apps[0], &v.place()).state, AppState::Deploying);
        let failed = RolloutRecord {
            record: "r2".into(),
            revision: b.clone(),
            outcome: Outcome::Failed,
            reason: "replica 0 on n1 failed 3 times".into(),
            at_ms: 5,
            by: "n2".into(),
        };
        v.outcomes.insert(("web".into(), b.clone()), failed.clone());
        let target = if back { &a } else { &b };
        assert_eq!(v.target(&v.apps[0]).0, target);
        let s = v.status(&v.apps[0], &v.place());
        if back {
            assert_eq!(s.state, AppState::RollingBack);
            // Replica 0 goes back at once: nothing of it is ready.
            assert!(revisions(&v).iter().all(|(r, _)| *r == a));
            set(&mut v, 0, &a, TaskState::Running, true);
            let s = v.status(&v.apps[0], &v.place());
            assert_eq!(s.state, AppState::Running);
            assert!(s.message.contains("failed 3 times") && s.message.contains("rolled back"));
        } else {
            assert_eq!(s.state, AppState::Failed);
        }
        // The outcome of an earlier record says nothing about a newer one.
        v.outcomes.insert(
            ("web".into(), b.clone()),
            RolloutRecord {
                record: "r1".into(),
                ..failed
            },
        );
        assert_eq!(v.target(&v.apps[0]).0, b);
    }
}

/// Carries slots out as executors would, one step at a time: a slot given a new revision
/// starts it (ready at the next step), and its old replica stops when the new one is ready,
/// or at once when told. Ready replicas never drop below `replicas - unavailable`, and the
/// rollout ends.
#[test]
fn rolling_never_drops_below_what_is_asked_and_ends() {
    for (surge, unavailable) in [(1, 0), (2, 0), (1, 1), (0, 1), (3, 2)] {
        let mut v = view(&format!(
            "[update]\nsurge = {surge}\nunavailable = {unavailable}\n"
        ));
        let (a, b) = (rev(&v, "a"), rev(&v, "b"));
        all_at(&mut v, &a);
        // Per replica: is an old one serving, is a new one starting / ready.
        let mut old = [true; 3];
        let mut new = [(false, false); 3];
        for step in 0..20 {
            let serving = (0..3).filter(|&i| old[i] || new[i].1).count();
            assert!(
                serving >= 3 - unavailable,
                "surge {surge} unavailable {unavailable} step {step}: {serving}"
            );
            if new.iter().all(|n| n.1) {
                break;
            }
            assert!(step < 19, "did not end");
            for s in v.slots(&v.place()) {
                let i = s.replica as usize;
                if s.revision == b {
                    if new[i].0 {
                        new[i].1 = true;
                    }
                    new[i].0 = true;
                    if s.replace_at_once || new[i].1 {
                        old[i] = false;
                    }
                }
            }
            for (i, n) in new.iter().enumerate() {
                let (revision, state, ready) = match n {
                    (_, true) => (&b, TaskState::Running, true),
                    (true, false) => (&b, TaskState::Starting, false),
                    _ => (&a, TaskState::Running, true),
                };
                set(&mut v, i as u32, revision, state, ready);
            }
        }
    }
}

#[test]
fn the_owner_is_one_live_node_and_the_same_for_every_reader() {
    let v = view("");
    let o = v.owner("web").unwrap();
    assert!(NODES.contains(&o));
    let mut fewer = view("");
    fewer.nodes.remove(o);
    assert_ne!(fewer.owner("web"), Some(o));
    assert_eq!(View::default().owner("web"), None);
}

#[test]
fn a_rollback_skips_revisions_that_failed() {
    let mut v = view("");
    let (a, b) = (rev(&v, "a"), rev(&v, "b"));
    // History: c (failed before), then a; the record b fails now.
    let c = spec("c", "");
    v.history.get_mut("web").unwrap().insert(
        0,
        Previous {
            revision: c.revision(),
            spec: c.clone(),
            replaced_ms: 2,
        },
    );
    let failed = |revision: &str, record: &str| RolloutRecord {
        record: record.into(),
        revision: revision.into(),
        outcome: Outcome::Failed,
        reason: "no".into(),
        at_ms: 5,
        by: "n2".into(),
    };
    v.outcomes
        .insert(("web".into(), c.revision()), failed(&c.revision(), "r1"));
    assert_eq!(v.rollback_target(&v.apps[0]).unwrap().revision, a);
    v.outcomes
        .insert(("web".into(), b.clone()), failed(&b, "r2"));
    assert_eq!(v.target(&v.apps[0]).0, a);
}

#[test]
fn a_job_that_ended_is_recorded_placed_nowhere_and_never_rolled_back() {
    let job = |extra: &str| {
        AppSpec::parse(&format!(
            "name = \"web\"\nkind = \"job\"\n[source]\nimage = \"b\"\n[scale]\nreplicas = 2\n{extra}"
        ))
        .unwrap()
    };
    let earlier = job("[job]\nretries = 1\n");
    let spec = job("");
    let mut v = View {
        history: BTreeMap::from([(
            "web".to_string(),
            vec![Previous {
                revision: earlier.revision(),
                spec: earlier,
                replaced_ms: 1,
            }],
        )]),
        apps: vec![AppRecord::new(spec, "r2".into())],
        nodes: NODES.iter().map(|n| (n.to_string(), node(n))).collect(),
        ..View::default()
    };
    let app = v.apps[0].clone();
    let r = app.revision.clone();
    assert_eq!(v.place().placements.len(), 2);
    set(&mut v, 0, &r, TaskState::Completed, false);
    assert_eq!(
        v.judge(&app, &v.place(), 2000, "n1"),
        None,
        "one still runs"
    );
    set(&mut v, 1, &r, TaskState::Completed, false);
    let done = v.judge(&app, &v.place(), 2000, "n1").unwrap();
    assert_eq!(done.outcome, Outcome::Complete);
    v.outcomes.insert(("web".into(), r.clone()), done);
    // Ended: placed nowhere, so no node runs it again, even with the nodes that ran it gone.
    assert!(v.place().placements.is_empty());
    v.tasks.clear();
    v.nodes.retain(|id, _| id == "n3");
    let s = v.status(&app, &v.place());
    assert_eq!((s.state, s.ready, s.replicas), (AppState::Completed, 2, 2));
    assert!(v.place().placements.is_empty());

    // A job that failed is recorded failed and stays so: no earlier revision is run instead.
    let mut v = View {
        outcomes: BTreeMap::new(),
        nodes: NODES.iter().map(|n| (n.to_string(), node(n))).collect(),
        ..v
    };
    set(&mut v, 0, &r, TaskState::Failed, false);
    v.tasks[0].reason = "exited with code 3 after 1 runs: no retries left".into();
    let failed = v.judge(&app, &v.place(), 2000, "n1").unwrap();
    assert_eq!(failed.outcome, Outcome::Failed);
    assert!(failed.reason.contains("no retries left"), "{failed:?}");
    v.outcomes.insert(("web".into(), r.clone()), failed);
    assert_eq!(v.target(&app).0, r.as_str());
    assert_eq!(v.status(&app, &v.place()).state, AppState::Failed);
    assert!(v.place().placements.is_empty());
}
