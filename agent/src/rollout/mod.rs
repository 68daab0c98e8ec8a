//! Rolling updates, as a pure function of replicated state, like placement: every node reads
//! the same app records, histories, rollout records and task records, and computes the same
//! revision for every replica slot. A node then starts and stops only its own containers.
//!
//! A new revision moves through an app's slots a few at a time: a slot whose old replica is
//! ready is advanced only while fewer than `surge + unavailable` slots of the new revision
//! are still short of ready; the first `surge` of those keep their old replica until the new
//! one is ready (the executor's plan stops it then), the rest stop it at once. Slots with
//! nothing ready on them (empty, crashed, not yet ready) take the new revision at once: they
//! serve nothing to lose. So with the defaults (surge 1, unavailable 0) no step leaves fewer
//! ready replicas than asked for.
//!
//! The app's rendezvous owner (`owner`) watches the rollout of the current record: once every
//! slot has run the new revision ready for `monitor` it records the rollout complete; a replica of the new
//! revision that fails `max_failures` times, or is not ready within `deadline`, fails it, with
//! the reason. A failed rollout with `rollback` on makes the newest earlier revision the
//! target again (skipping revisions whose own rollout failed): the same machinery rolls it
//! back. Only the current record's outcome counts: writing the app again starts a new
//! rollout.
//!
//! Invariant: the revision a slot is given is the target's, or one the slot's own task runs
//! now and whose spec is known (the record or its history), never any other.

use crate::scheduler::Placed;
use crate::spec::AppSpec;
use crate::state::records::{AppRecord, Outcome, Previous, RolloutRecord, Task, TaskState};
use crate::store::DiskBackend;
use std::collections::BTreeMap;

/// The replicated state rollouts depend on, read once per pass.
#[derive(Debug, Default)]
pub struct View {
    pub apps: Vec<AppRecord>,
    pub history: BTreeMap<String, Vec<Previous>>,
    /// Rollout records by (app, revision).
    pub outcomes: BTreeMap<(String, String), RolloutRecord>,
    /// Nodes that may run replicas (live, running containers), by id: their records say
    /// the start time of the agent run each last announced, labels and capacity.
    pub nodes: BTreeMap<String, crate::state::records::NodeRecord>,
    /// Task records of those nodes' current runs.
    pub tasks: Vec<Task>,
    /// Task records those nodes' earlier runs left: where replicas with volumes have data.
    pub earlier: Vec<Task>,
    /// Nodes an operator drained: nothing new is placed there, and their replicas move.
    pub drained: std::collections::BTreeSet<String>,
    /// The autoscaler's counts (`scale/<app>`).
    pub scale: BTreeMap<String, crate::state::records::ScaleRecord>,
}

/// A replica this node runs that is placed elsewhere now, kept until the replacement there
/// is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub app: String,
    pub replica: u32,
    pub to: String,
}

/// One replica slot of an app: where it is placed and what it should run there.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub app: String,
    pub replica: u32,
    pub node: String,
    pub revision: String,
    pub spec: AppSpec,
    /// Stop a replica of another revision now, not once this one is ready.
    pub replace_at_once: bool,
}

/// An app's state as a person reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppState {
    /// No replica is ready and some fit on no node (the reason says why).
    Pending,
    /// A revision is rolling out and not every replica of it is ready yet.
    Deploying,
    /// Every replica runs the target revision, ready.
    Running,
    /// The rollout completed, but some replicas are not ready now.
    Degraded,
    /// The rollout failed and the previous revision is being restored.
    RollingBack,
    /// The rollout failed and there is nothing to go back to (or rollback is off); for a
    /// job, a replica failed with no retries left.
    Failed,
    /// A job whose every replica ran to completion.
    Completed,
}

/// What `/v1/apps` shows of an app beside its spec.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AppStatus {
    pub state: AppState,
    pub message: String,
    /// The revision the app converges on.
    pub revision: String,
    /// The revision of the app's record (differs from `revision` after a rollback).
    pub latest: String,
    pub ready: u32,
    pub replicas: u32,
}

impl View {
    /// Reads the state; `eligible` says which node records may run replicas now (drained
    /// ones included: their tasks are read, nothing new is placed on them).
    pub fn read(
        store: &DiskBackend,
        eligible: impl Fn(&crate::state::records::NodeRecord) -> bool,
    ) -> View {
        use crate::state::records;
        let nodes: BTreeMap<String, records::NodeRecord> = records::nodes(store)
            .into_iter()
            .filter(|n| eligible(n))
            .map(|n| (n.id.clone(), n))
            .collect();
        let (tasks, earlier): (Vec<Task>, Vec<Task>) = records::tasks(store, "")
            .into_iter()
            .filter(|t| nodes.contains_key(&t.node))
            .partition(|t| nodes[&t.node].started_at_ms == t.agent_started_ms);
        View {
            apps: records::apps(store),
            history: records::histories(store),
            outcomes: records::rollouts(store),
            drained: records::drained(store).into_keys().collect(),
            scale: records::scales(store),
            nodes,
            tasks,
            earlier,
        }
    }

    /// Reads the state as node `me` sees it: the nodes that may run replicas are `me` and
    /// the `live` nodes, of those that run containers.
    pub fn read_as(store: &DiskBackend, me: &str, live: impl Fn(&str) -> bool) -> View {
        View::read(store, |n| n.containers && (n.id == me || live(&n.id)))
    }

    /// How many replicas an app runs: the autoscaler's count held within the spec's `min`
    /// and `max` for an app it sizes (its `min` until it has chosen), else the spec's.
    pub fn replicas(&self, app: &AppRecord) -> u32 {
        match app.spec.autoscale_policy() {
            Some(p) => self
                .scale
                .get(&app.spec.name)
                .map_or(p.min, |s| s.replicas)
                .clamp(p.min, p.max),
            None => app.spec.replicas(),
        }
    }

    /// The outcome recorded for an app's current record, if its rollout has ended.
    fn outcome(&self, app: &AppRecord) -> Option<&RolloutRecord> {
        self.outcomes
            .get(&(app.spec.name.clone(), app.revision.clone()))
            .filter(|o| o.record == app.record)
    }

    /// Whether an app is a job whose current revision has ended (recorded by its owner):
    /// it is placed nowhere any more, so no node runs it again, even once the nodes that ran
    /// it are gone.
    pub fn finished_job(&self, app: &AppRecord) -> bool {
        app.spec.is_job() && self.outcome(app).is_some()
    }

    /// Whether a revision of an app is known to have failed its last rollout.
    fn failed(&self, app: &str, revision: &str) -> bool {
        self.outcomes
            .get(&(app.to_string(), revision.to_string()))
            .is_some_and(|o| o.outcome == Outcome::Failed)
    }

    /// Where a rollback of an app goes: the newest earlier revision that runs something else
    /// and did not fail its own rollout.
    pub fn rollback_target<'a>(&'a self, app: &AppRecord) -> Option<&'a Previous> {
        self.history
            .get(&app.spec.name)?
            .iter()
            .find(|p| p.revision != app.revision && !self.failed(&app.spec.name, &p.revision))
    }

    /// The revision an app converges on and its spec: the record's, unless its rollout failed
    /// with rollback on and an earlier revision is known. Whether that is a rollback.
    pub fn target<'a>(&'a self, app: &'a AppRecord) -> (&'a str, &'a AppSpec, bool) {
        let failed = self
            .outcome(app)
            .is_some_and(|o| o.outcome == Outcome::Failed);
        // A job that failed stays failed: running an earlier one instead is no rollback.
        if failed && app.spec.update_policy().rollback && !app.spec.is_job() {
            if let Some(p) = self.rollback_target(app) {
                return (&p.revision, &p.spec, true);
            }
        }
        (&app.revision, &app.spec, false)
    }

    /// The spec of one of an app's revisions, if the record or its history holds it.
    fn spec_of<'a>(&'a self, app: &'a AppRecord, revision: &str) -> Option<&'a AppSpec> {
        if app.revision == revision {
            return Some(&app.spec);
        }
        self.history
            .get(&app.spec.name)?
            .iter()
            .find(|p| p.revision == revision)
            .map(|p| &p.spec)
    }

    /// The task a node's current run wrote for one replica.
    fn task(&self, app: &str, replica: u32, node: &str) -> Option<&Task> {
        self.tasks
            .iter()
            .find(|t| t.app == app && t.replica == replica && t.node == node)
    }

    /// Where every replica runs now (running or starting, on an eligible node; a job's in
    /// any state): the scheduler's stickiness input. A replica with volumes is pinned to the
    /// node that holds its data, in any state and whichever run of that node's agent said so.
    pub fn running(&self) -> Vec<crate::scheduler::Running<'_>> {
        let kinds: BTreeMap<&str, (bool, bool)> = self
            .apps
            .iter()
            .map(|a| {
                let s = &a.spec;
                (s.name.as_str(), (s.is_job(), !s.volumes.is_empty()))
            })
            .collect();
        let kind = |app: &str| kinds.get(app).copied().unwrap_or_default();
        // A job's replica stays where it ran, whatever its state: it is not run again
        // elsewhere while that node lives.
        let mut out: Vec<crate::scheduler::Running> = self
            .tasks
            .iter()
            .filter_map(|t| {
                let (job, volumes) = kind(&t.app);
                (live(t) || job || volumes).then_some(crate::scheduler::Running {
                    app: &t.app,
                    replica: t.replica,
                    node: &t.node,
                    since_ms: t.since_ms,
                    ready: t.ready,
                    pinned: volumes,
                })
            })
            .collect();
        for t in &self.earlier {
            if kind(&t.app).1 && self.task(&t.app, t.replica, &t.node).is_none() {
                out.push(crate::scheduler::Running {
                    app: &t.app,
                    replica: t.replica,
                    node: &t.node,
                    since_ms: t.since_ms,
                    ready: false,
                    pinned: true,
                });
            }
        }
        out
    }

    /// Placements (app, replica, node) cluster-wide, and the replicas nothing can take now
    /// with the reason. Computed once per reading of the state and handed to `slots`,
    /// `handoffs`, `judge` and `status`: it is the expensive part.
    pub fn place(&self) -> Placed {
        let apps: Vec<crate::scheduler::App> = self
            .apps
            .iter()
            .filter(|a| !self.finished_job(a))
            .map(|a| crate::scheduler::App {
                name: &a.spec.name,
                spec: &a.spec,
                replicas: self.replicas(a),
            })
            .collect();
        let nodes: Vec<crate::scheduler::Node> = self
            .nodes
            .values()
            .map(|n| crate::scheduler::Node {
                id: &n.id,
                capacity: n.capacity,
                labels: &n.labels,
                takes_new: !self.drained.contains(&n.id),
            })
            .collect();
        crate::scheduler::place(&apps, &nodes, &self.running())
    }

    /// The replicas `me` runs that are placed on another node now (drained away, or moved
    /// while views differed) and whose replacement there is not ready yet: `me` keeps them
    /// serving until it is. Replicas of removed apps, scaled away or of `every-node` apps
    /// have no replacement to wait for.
    pub fn handoffs(&self, placed: &Placed, me: &str) -> Vec<Handoff> {
        let placements = &placed.placements;
        let mut out = Vec::new();
        for t in self.tasks.iter().filter(|t| t.node == me && live(t)) {
            let Some(p) = placements
                .iter()
                .find(|p| p.app == t.app && p.replica == t.replica)
            else {
                continue;
            };
            let every_node = self
                .apps
                .iter()
                .any(|a| a.spec.name == t.app && a.spec.every_node());
            if p.node == me || every_node {
                continue;
            }
            let there = self.task(&p.app, p.replica, &p.node);
            if !there.is_some_and(|r| r.ready && live(r)) {
                out.push(Handoff {
                    app: t.app.clone(),
                    replica: t.replica,
                    to: p.node.clone(),
                });
            }
        }
        out
    }

    /// A drained node's progress: the replicas it still runs (0: drained).
    pub fn draining(&self, node: &str) -> Option<usize> {
        self.drained.contains(node).then(|| {
            self.tasks
                .iter()
                .filter(|t| t.node == node && live(t))
                .count()
        })
    }

    /// Every slot of every app with the revision it should run now.
    pub fn slots(&self, placed: &Placed) -> Vec<Slot> {
        let placements = &placed.placements;
        let mut out = Vec::new();
        for app in &self.apps {
            let mine: Vec<(u32, &str)> = placements
                .iter()
                .filter(|p| p.app == app.spec.name)
                .map(|p| (p.replica, p.node.as_str()))
                .collect();
            out.extend(self.slots_of(app, &mine));
        }
        out
    }

    /// One app's slots (its placements, in order), each with its revision.
    fn slots_of(&self, app: &AppRecord, placed: &[(u32, &str)]) -> Vec<Slot> {
        let (target, target_spec, _) = self.target(app);
        let policy = target_spec.update_policy();
        let name = app.spec.name.as_str();
        // What each slot runs now: a task at another revision, with a known spec, that is
        // ready is "old"; anything else takes the target at once.
        let mut in_progress = 0u32;
        let mut old = Vec::new();
        for (i, (replica, node)) in placed.iter().enumerate() {
            match self.task(name, *replica, node) {
                Some(t) if t.version == target && live(t) && !t.ready => in_progress += 1,
                Some(t) if t.version == target => {}
                Some(t) if live(t) && t.ready && self.spec_of(app, &t.version).is_some() => {
                    old.push(i)
                }
                _ => {}
            }
        }
        // A job does not roll: each replica runs the target once.
        let window = if app.spec.is_job() {
            u32::MAX
        } else {
            policy.surge.saturating_add(policy.unavailable)
        };
        let budget = window.saturating_sub(in_progress) as usize;
        // Of the advanced slots, those beyond the surge still left stop their old replica first.
        let keep_old = policy.surge.saturating_sub(in_progress) as usize;
        placed
            .iter()
            .enumerate()
            .map(|(i, (replica, node))| {
                let (revision, spec, at_once) = match old.iter().position(|j| *j == i) {
                    Some(k) if k < budget => (target, target_spec, k >= keep_old),
                    Some(_) => {
                        // Keeps what it runs: `old` holds only known revisions.
                        let t = self.task(name, *replica, node).map(|t| t.version.as_str());
                        let rev = t.unwrap_or(target);
                        let spec = self.spec_of(app, rev).unwrap_or(target_spec);
                        (rev, spec, false)
                    }
                    None => (target, target_spec, false),
                };
                Slot {
                    app: name.to_string(),
                    replica: *replica,
                    node: node.to_string(),
                    revision: revision.to_string(),
                    spec: spec.clone(),
                    replace_at_once: at_once,
                }
            })
            .collect()
    }

    /// The live node that owns an app's singleton duties: the one ranking highest by
    /// rendezvous hash among eligible nodes.
    pub fn owner(&self, app: &str) -> Option<&str> {
        self.nodes
            .keys()
            .map(String::as_str)
            .max_by_key(|n| (crate::scheduler::rank(app, u32::MAX, n), *n))
    }

    /// How the rollout of an app's current record ended, if it just did: complete when every
    /// slot runs the record's revision ready; failed when a replica of it failed too often or
    /// was not ready in time. `None` while it goes on, or once an outcome is recorded.
    pub fn judge(
        &self,
        app: &AppRecord,
        placed: &Placed,
        now_ms: u64,
        by: &str,
    ) -> Option<RolloutRecord> {
        if self.outcome(app).is_some() {
            return None;
        }
        let placed = slots_of(placed, &app.spec.name);
        let policy = app.spec.update_policy();
        let record = |outcome, reason: String| RolloutRecord {
            record: app.record.clone(),
            revision: app.revision.clone(),
            outcome,
            reason,
            at_ms: now_ms,
            by: by.to_string(),
        };
        if app.spec.is_job() {
            // Ended once every replica completed, or one failed with no retries left.
            let status = self.job_status(app, &placed);
            return match status.state {
                AppState::Completed => Some(record(Outcome::Complete, status.message)),
                AppState::Failed => Some(record(Outcome::Failed, status.message)),
                _ => None,
            };
        }
        let mut all_ready = !placed.is_empty() || self.replicas(app) == 0;
        for (replica, node) in &placed {
            let t = self.task(&app.spec.name, *replica, node);
            let Some(t) = t.filter(|t| t.version == app.revision) else {
                all_ready = false;
                continue;
            };
            // Ready, and for the monitor period: a replica that crashes at once (ready the
            // moment it runs, without a probe) does not complete a rollout.
            let settled = now_ms.saturating_sub(t.since_ms) >= policy.monitor.as_millis() as u64;
            all_ready &= t.ready && t.state == TaskState::Running && settled;
            let whose = format!("replica {replica} on {node}");
            if t.failures >= policy.max_failures {
                let how = t
                    .exit_code
                    .map(|c| format!(" (last exit code {c})"))
                    .unwrap_or_default();
                return Some(record(
                    Outcome::Failed,
                    format!("{whose} failed {} times{how}", t.failures),
                ));
            }
            // Not ready in time, through restarts: from its first start at this revision (or,
            // never started, from when it was placed).
            let from = if t.version_since_ms > 0 {
                t.version_since_ms
            } else {
                t.since_ms
            };
            let waited = now_ms.saturating_sub(from);
            if !t.ready
                && t.state != TaskState::Completed
                && waited > policy.deadline.as_millis() as u64
            {
                return Some(record(
                    Outcome::Failed,
                    format!(
                        "{whose} not ready within {:?}: {}",
                        policy.deadline, t.reason
                    ),
                ));
            }
        }
        all_ready.then(|| record(Outcome::Complete, String::new()))
    }

    /// An app's state: its target, how many of its slots run it ready, and the rollout's.
    pub fn status(&self, app: &AppRecord, placed: &Placed) -> AppStatus {
        if app.spec.is_job() {
            return self.job_status(app, &slots_of(placed, &app.spec.name));
        }
        let (target, _, rolling_back) = self.target(app);
        let unplaced: Vec<&crate::scheduler::Unplaced> = placed
            .unplaced
            .iter()
            .filter(|u| u.app == app.spec.name)
            .collect();
        let mut replicas = unplaced.len() as u32;
        let mut ready = 0;
        for p in placed.placements.iter().filter(|p| p.app == app.spec.name) {
            replicas += 1;
            let t = self.task(&p.app, p.replica, &p.node);
            if t.is_some_and(|t| t.version == target && t.ready && live(t)) {
                ready += 1;
            }
        }
        let outcome = self.outcome(app);
        let failed_why = outcome
            .filter(|o| o.outcome == Outcome::Failed)
            .map(|o| format!("revision {} failed: {}", o.revision, o.reason));
        let (state, message) = match (&failed_why, rolling_back) {
            (Some(why), true) if ready < replicas => (
                AppState::RollingBack,
                format!("{why}; restoring {target} ({ready} of {replicas} ready)"),
            ),
            (Some(why), true) => (AppState::Running, format!("{why}; rolled back to {target}")),
            (Some(why), false) => (AppState::Failed, why.clone()),
            (None, _) if outcome.is_none() && ready < replicas => {
                (AppState::Deploying, format!("{ready} of {replicas} ready"))
            }
            (None, _) if ready < replicas => {
                (AppState::Degraded, format!("{ready} of {replicas} ready"))
            }
            (None, _) if replicas == 0 && app.spec.autoscaled() => (
                AppState::Running,
                "scaled to zero: its next request starts a replica".to_string(),
            ),
            (None, _) => (AppState::Running, format!("{ready} of {replicas} ready")),
        };
        // Replicas nothing can take: pending when none is ready, said in any case.
        let (state, message) = match unplaced.first() {
            Some(u) => {
                let more = match unplaced.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                };
                let why = format!("replica {} is pending: {}{more}", u.replica, u.reason);
                if ready == 0 && failed_why.is_none() {
                    (AppState::Pending, why)
                } else {
                    (state, format!("{message}; {why}"))
                }
            }
            None => (state, message),
        };
        AppStatus {
            state,
            message,
            revision: target.to_string(),
            latest: app.revision.clone(),
            ready,
            replicas,
        }
    }
}

impl View {
    /// A job's state: running until every replica completed, failed once one has no retries
    /// left; once its owner recorded the end, that record (the replicas are placed nowhere
    /// any more, and their nodes may be gone).
    fn job_status(&self, app: &AppRecord, placed: &[(u32, &str)]) -> AppStatus {
        let status = |state, message: String, ready| AppStatus {
            state,
            message,
            revision: app.revision.clone(),
            latest: app.revision.clone(),
            ready,
            replicas: app.spec.replicas(),
        };
        if let Some(o) = self.outcome(app) {
            return match o.outcome {
                Outcome::Complete => {
                    status(AppState::Completed, o.reason.clone(), app.spec.replicas())
                }
                Outcome::Failed => status(AppState::Failed, o.reason.clone(), 0),
            };
        }
        let mut replicas = 0;
        let mut completed = 0;
        let mut failed = None;
        for (replica, node) in placed {
            replicas += 1;
            let t = self.task(&app.spec.name, *replica, node);
            let t = t.filter(|t| t.version == app.revision);
            match t.map(|t| t.state) {
                Some(TaskState::Completed) => completed += 1,
                Some(TaskState::Failed) if t.is_some_and(|t| t.reason.contains("no retries")) => {
                    let t = t.expect("matched");
                    failed.get_or_insert(format!(
                        "replica {} on {}: {}",
                        t.replica, t.node, t.reason
                    ));
                }
                _ => {}
            }
        }
        let (state, message) = match failed {
            Some(why) => (AppState::Failed, why),
            None if replicas > 0 && completed == replicas => (
                AppState::Completed,
                format!("{completed} of {replicas} completed"),
            ),
            None => (
                AppState::Running,
                format!("{completed} of {replicas} completed"),
            ),
        };
        AppStatus {
            replicas,
            ..status(state, message, completed)
        }
    }
}

/// Where an app's replicas are placed: (replica, node).
fn slots_of<'a>(placed: &'a Placed, app: &str) -> Vec<(u32, &'a str)> {
    placed
        .placements
        .iter()
        .filter(|p| p.app == app)
        .map(|p| (p.replica, p.node.as_str()))
        .collect()
}

/// Whether a task's replica has a container (starting or running).
fn live(t: &Task) -> bool {
    matches!(t.state, TaskState::Running | TaskState::Starting)
}

#[cfg(test)]
mod tests;
