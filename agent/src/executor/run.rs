//! The executor's loop: on every relevant store change and membership change, and every
//! `every` in any case (crashed containers, images loaded since), it places the replicas,
//! plans against what the runtime reports, carries the plan out and records the tasks.

use super::distribute::Located;
use super::health::{Tracker, Verdict};
use super::plan::{plan, Desired};
use super::{container_name, ContainerRuntime, ContainerSpec, Observed, Task, TaskState};
use super::{LABEL_APP, LABEL_CLUSTER, LABEL_NODE, LABEL_REPLICA, LABEL_VERSION};
use crate::clock::wall_ms;
use crate::membership::MemberState;
use crate::rollout::View;
use crate::spec::AppSpec;
use crate::state::records::Outcome;
use crate::state::Handle;
use crate::store::replica::{read_entry, scan_keyspace};
use crate::store::{keys, Bytes, Change, Keyspace};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A replica that ran this long before it stopped is not crash-looping: its backoff restarts.
const STABLE: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

type ReplicaId = (String, u32);

/// Failures of one replica, for the restart backoff.
#[derive(Debug, Default)]
struct Restarts {
    count: u32,
    /// Consecutive failures since it last ran stably.
    streak: u32,
    not_before: Option<Instant>,
    started: Option<Instant>,
    /// How its last container ended.
    last_exit: Option<i64>,
    /// The version these failures are of: a new version starts without the old one's backoff.
    version: String,
    /// Failures at this version: a rollout fails at `[update] max_failures`.
    failures: u32,
    /// When the first container at this version started (wall ms).
    first_started_ms: Option<u64>,
    /// A job's replica that is done at this version: the task it ended with.
    done: Option<Task>,
}

impl Restarts {
    fn failed(&mut self, now: Instant) {
        self.count += 1;
        self.failures += 1;
        self.streak += 1;
        // A first failure is retried at once, then after 1, 2, 4 ... 60 s.
        let delay = match self.streak {
            0 | 1 => Duration::ZERO,
            n => Duration::from_secs(1u64 << (n - 2).min(6)).min(BACKOFF_MAX),
        };
        self.not_before = Some(now + delay);
        self.started = None;
    }

    fn may_start(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|t| now >= t)
    }
}

/// A replica's memory limit when its spec sets none.
pub const DEFAULT_MEMORY_BYTES: i64 = 512 << 20;

/// Until a container is first ready it is probed at least this often, whatever its interval:
/// a rollout waits on it.
const PROBE_UNTIL_READY: Duration = Duration::from_millis(250);

/// A running container the executor probes: its tracker, and the task that probes it
/// (stopped when this goes).
struct Watched {
    tracker: Tracker,
    prober: Option<tokio::task::AbortHandle>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(p) = &self.prober {
            p.abort();
        }
    }
}

/// One probe's result, from a container's prober to the executor's loop.
pub struct ProbeResult {
    container: String,
    at: Instant,
    result: Result<(), String>,
}

pub struct Executor<R> {
    rt: R,
    h: Handle,
    me: String,
    cluster: String,
    /// What this node last wrote for each of its tasks.
    written: HashMap<ReplicaId, Task>,
    restarts: HashMap<ReplicaId, Restarts>,
    runtime_down: bool,
    /// Running containers of desired replicas, by container id.
    watched: HashMap<String, Watched>,
    probes: tokio::sync::mpsc::Sender<ProbeResult>,
    /// Times for the trackers are counted from here.
    epoch: Instant,
    /// While this node is drained: the replicas it still runs.
    drain_left: Option<usize>,
    /// Image pulls under way or failed, by image.
    pulls: HashMap<String, Pull>,
    /// A container was started: pass again shortly (`LOOK_AGAIN`) to start probing it.
    look_again: bool,
    pulled: tokio::sync::mpsc::Sender<Pulled>,
    /// The images this node holds and brought, and the peers it fetches from.
    images: super::distribute::Keeper,
    /// The members at the last pass, with their states.
    members: Vec<(String, MemberState)>,
    /// See `Options::inflight`.
    inflight: Option<(Inflight, Duration)>,
    /// Containers being drained before they stop.
    draining: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// A pull of a missing image.
enum Pull {
    Running,
    /// With the login and the peers it was tried with: a new login, or peers that now hold
    /// it, are tried at once.
    Failed {
        why: String,
        at: Instant,
        auth: Option<super::RegistryAuth>,
        holders: Vec<String>,
    },
}

/// How soon after starting containers the executor looks at them again, to probe them.
const LOOK_AGAIN: Duration = Duration::from_millis(20);

/// A pull that takes longer (a registry trickling its answer) is given up, and tried again.
const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A failed pull is tried again after this.
const PULL_RETRY: Duration = Duration::from_secs(30);

/// Where the executor's own background work reports: probe results and ended pulls.
pub struct Wakes {
    pub probes: tokio::sync::mpsc::Receiver<ProbeResult>,
    pub pulls: tokio::sync::mpsc::Receiver<Pulled>,
}

/// An ended pull or fetch.
pub struct Pulled {
    pub image: String,
    /// The image id it brought, or why it could not.
    pub result: Result<String, String>,
    /// The login it used.
    pub auth: Option<super::RegistryAuth>,
    /// The peers it could fetch from.
    pub holders: Vec<String>,
}

/// The peers a located image can be fetched from, by id.
fn holder_ids(located: &Option<Located>) -> Vec<String> {
    located
        .iter()
        .flat_map(|l| l.holders.iter().map(|(n, _)| n.clone()))
        .collect()
}

/// How the executor runs, besides its runtime and the node.
#[derive(Clone)]
pub struct Options {
    /// A pass at least this often, whatever changes.
    pub every: Duration,
    /// How long an image this node brought stays once no version of any app needs it.
    pub image_grace: Duration,
    /// Where missing images are fetched from before a registry is asked.
    pub peers: Option<std::sync::Arc<dyn super::distribute::Fetch>>,
    /// Requests the node's ingress has in flight to a container's address. With it, a
    /// running replica this node no longer wants (replaced by a rollout, scaled away, moved
    /// by a drain) is drained first: out of the routes, it is stopped once nothing is in
    /// flight to it, or after `drain_deadline`.
    pub inflight: Option<Inflight>,
    pub drain_deadline: Duration,
}

/// Requests in flight to an address (the ingress's count); `None` when the ingress never
/// sent it one: a replica nothing was ever routed to has nothing to drain.
pub type Inflight = std::sync::Arc<dyn Fn(std::net::IpAddr) -> Option<usize> + Send + Sync>;

/// How long a replica that leaves the routes keeps running before its in-flight count is
/// trusted: this node's route table is rebuilt from the task records written at the end of
/// the pass, and the other nodes', which pass requests here, hear of it by then.
const DRAIN_SETTLE: Duration = Duration::from_secs(1);

impl Options {
    pub fn every(every: Duration) -> Options {
        Options {
            every,
            image_grace: Duration::from_secs(600),
            peers: None,
            inflight: None,
            drain_deadline: Duration::from_secs(30),
        }
    }
}

/// What should run here, or why a placed replica cannot.
enum Resolved {
    Run(Desired),
    Wait(Task),
}

impl<R: ContainerRuntime + Clone + Send + Sync + 'static> Executor<R> {
    /// The executor, and where its probes' results and ended pulls arrive (for `on_probe`
    /// and `on_pulled`).
    pub fn new(rt: R, h: Handle, options: &Options) -> (Executor<R>, Wakes) {
        let (probes, results) = tokio::sync::mpsc::channel(256);
        let (pulled, pulls) = tokio::sync::mpsc::channel(64);
        let mut images = super::distribute::Keeper::new(&h, options.image_grace);
        images.peers = options.peers.clone();
        let ex = Executor {
            images,
            members: Vec::new(),
            me: h.me.id.to_string(),
            cluster: h.trust.cluster.id.clone(),
            rt,
            h,
            written: HashMap::new(),
            restarts: HashMap::new(),
            runtime_down: false,
            watched: HashMap::new(),
            probes,
            epoch: crate::clock::now(),
            drain_left: None,
            pulls: HashMap::new(),
            look_again: false,
            pulled,
            inflight: options
                .inflight
                .clone()
                .map(|f| (f, options.drain_deadline)),
            draining: Default::default(),
        };
        (
            ex,
            Wakes {
                probes: results,
                pulls,
            },
        )
    }

    /// The restart record of a desired replica; a new version starts with no backoff (the
    /// count of restarts is kept).
    fn restarts_of(&mut self, d: &Desired) -> &mut Restarts {
        let r = self.restarts.entry((d.app.clone(), d.replica)).or_default();
        if r.version != d.version {
            *r = Restarts {
                count: r.count,
                version: d.version.clone(),
                ..Restarts::default()
            };
        }
        r
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Starts probing a running container of a desired replica, once.
    fn watch(&mut self, o: &Observed, d: &Desired) {
        if self.watched.contains_key(&o.id) {
            return;
        }
        let tracker = Tracker::new(&d.probe, self.ms(crate::clock::now()));
        let prober = (d.probe.kind != crate::spec::ProbeKind::None).then(|| {
            let (rt, tx, probe) = (self.rt.clone(), self.probes.clone(), d.probe.clone());
            let (id, ip) = (o.id.clone(), o.ip.clone());
            tokio::spawn(async move {
                let mut seen_ok = false;
                // Probes at the probe's cadence count; until the first success, quicker ones
                // between them (10 ms, doubling) report only a success: a container is ready
                // as soon as it answers, and failures still count at the probe's own pace.
                let mut next_regular = crate::clock::now();
                let mut quick = Duration::from_millis(10);
                loop {
                    let result = tokio::time::timeout(
                        probe.timeout,
                        rt.probe(&id, ip.as_deref(), &probe.kind),
                    )
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {:?}", probe.timeout)));
                    let at = crate::clock::now();
                    let regular = at >= next_regular;
                    seen_ok |= result.is_ok();
                    if regular || result.is_ok() {
                        let r = ProbeResult {
                            container: id.clone(),
                            at,
                            result,
                        };
                        if tx.send(r).await.is_err() {
                            return;
                        }
                    }
                    if regular {
                        next_regular = at
                            + if seen_ok {
                                probe.interval
                            } else {
                                probe.interval.min(PROBE_UNTIL_READY)
                            };
                    }
                    let until_regular = next_regular.saturating_duration_since(at);
                    let wait = if seen_ok {
                        until_regular
                    } else {
                        quick = (quick * 2).min(PROBE_UNTIL_READY);
                        (quick / 2).min(until_regular)
                    };
                    tokio::time::sleep(wait).await;
                }
            })
            .abort_handle()
        });
        self.watched
            .insert(o.id.clone(), Watched { tracker, prober });
    }

    /// A probe's result: whether the executor should pass again (readiness changed, or the
    /// container was restarted for failing its probes).
    pub async fn on_probe(&mut self, r: ProbeResult) -> bool {
        let at = self.ms(r.at);
        let Some(w) = self.watched.get_mut(&r.container) else {
            return false;
        };
        match w.tracker.observe(at, r.result) {
            Verdict::Unchanged => false,
            Verdict::Changed => true,
            Verdict::Restart => {
                let said = w.tracker.said().unwrap_or_default().to_string();
                self.watched.remove(&r.container);
                let Ok(observed) = self.rt.list(&self.cluster, &self.me).await else {
                    return true;
                };
                if let Some(o) = observed.iter().find(|o| o.id == r.container) {
                    tracing::warn!(app = %o.app, replica = o.replica, container = %o.id, last = %said, "failing its health checks: restarting it");
                    if let Err(e) = self.rt.remove(&o.id).await {
                        tracing::warn!(container = %o.id, err = %e, "cannot remove container");
                    }
                    let restarts = self.restarts.entry((o.app.clone(), o.replica)).or_default();
                    restarts.failed(crate::clock::now());
                }
                true
            }
        }
    }

    fn task(&self, app: &str, replica: u32, version: &str, image: &str) -> Task {
        Task {
            app: app.into(),
            replica,
            node: self.me.clone(),
            version: version.into(),
            image: image.into(),
            state: TaskState::Scheduled,
            reason: String::new(),
            since_ms: wall_ms(),
            container: None,
            ip: None,
            port: None,
            restarts: self
                .restarts
                .get(&(app.into(), replica))
                .map_or(0, |r| r.count),
            exit_code: self
                .restarts
                .get(&(app.into(), replica))
                .and_then(|r| r.last_exit),
            ready: false,
            failures: self
                .restarts
                .get(&(app.into(), replica))
                .filter(|r| r.version == version)
                .map_or(0, |r| r.failures),
            version_since_ms: self
                .restarts
                .get(&(app.into(), replica))
                .filter(|r| r.version == version)
                .and_then(|r| r.first_started_ms)
                .unwrap_or(0),
            agent_started_ms: self.h.started_ms,
        }
    }

    /// The replicated state placement and rollouts read: the nodes that may run replicas
    /// are this one and the live members that run containers.
    fn view(&self, members: &[(String, MemberState)]) -> View {
        View::read_as(&self.h.store, &self.me, |id| {
            members.iter().any(|(m, state)| m == id && state.is_live())
        })
    }

    /// The app owner's duty: records how the rollouts of the apps this node owns ended, and
    /// forgets the rollouts of revisions that are gone.
    async fn judge(&self, view: &View, placed: &crate::scheduler::Placed) {
        let mut ops = Vec::new();
        for app in &view.apps {
            if view.owner(&app.spec.name) != Some(self.me.as_str()) {
                continue;
            }
            let Some(verdict) = view.judge(app, placed, wall_ms(), &self.me) else {
                continue;
            };
            match verdict.outcome {
                Outcome::Complete => {
                    tracing::info!(app = %app.spec.name, revision = %verdict.revision, "rollout complete")
                }
                // A job that failed is never rolled back: it ran once, as asked.
                Outcome::Failed if app.spec.is_job() => {
                    tracing::warn!(app = %app.spec.name, revision = %verdict.revision, reason = %verdict.reason, "job failed")
                }
                Outcome::Failed => {
                    tracing::warn!(app = %app.spec.name, revision = %verdict.revision, reason = %verdict.reason, rollback = app.spec.update_policy().rollback, "rollout failed")
                }
            }
            if let Ok(key) = keys::rollout(&app.spec.name, &verdict.revision) {
                let value = serde_json::to_vec(&verdict).unwrap_or_default();
                ops.push((key, Some(Bytes::from(value))));
            }
        }
        // Records of revisions neither the app nor its history holds any more.
        for (name, revision) in view.outcomes.keys() {
            let known = view.apps.iter().any(|a| {
                a.spec.name == *name
                    && (a.revision == *revision
                        || view
                            .history
                            .get(name)
                            .is_some_and(|h| h.iter().any(|p| p.revision == *revision)))
            });
            if !known && view.owner(name) == Some(self.me.as_str()) {
                if let Ok(key) = keys::rollout(name, revision) {
                    ops.push((key, None));
                }
            }
        }
        if ops.is_empty() {
            return;
        }
        if let Err(e) = self.h.write(ops).await {
            tracing::warn!(err = %e, "cannot record rollouts");
        }
    }

    /// One of an app's secrets, opened.
    fn open_secret(&self, app: &str, name: &str) -> Option<Vec<u8>> {
        let key = keys::secret(app, name).ok()?;
        let (e, _) = read_entry(&self.h.store, key.as_str()).ok()??;
        self.h
            .trust
            .secrets
            .open(key.as_str(), e.value.as_ref()?)
            .ok()
    }

    /// Turns a placed replica into a container spec: image, command, env with its secrets
    /// opened, limits, labels.
    fn resolve(&self, spec: &AppSpec, version: &str, replica: u32) -> Resolved {
        let image = spec.source.run_image().unwrap_or_default().to_string();
        let mut t = self.task(&spec.name, replica, version, &image);
        t.port = spec.run.port;
        if image.is_empty() {
            t.state = TaskState::Pending;
            t.reason = if spec.source.git.is_some() {
                "waiting for a build of the app's git source".into()
            } else {
                "the app has no image yet (source.image, or a deploy of its files)".into()
            };
            return Resolved::Wait(t);
        }
        let mut env: BTreeMap<String, String> = spec.run.env.clone();
        if let Some(p) = spec.run.port {
            env.entry("PORT".into()).or_insert(p.to_string());
        }
        for name in &spec.run.secrets {
            let opened = self.open_secret(&spec.name, name);
            match opened.map(String::from_utf8) {
                Some(Ok(v)) => {
                    env.insert(name.clone(), v);
                }
                // The reason names the secret, never its value.
                Some(Err(_)) => {
                    t.state = TaskState::Failed;
                    t.reason =
                        format!("secret {name} is not UTF-8: it cannot be an environment variable");
                    return Resolved::Wait(t);
                }
                None => {
                    t.state = TaskState::Pending;
                    t.reason = format!(
                        "waiting for secret {name} (PUT /v1/apps/{}/secrets/{name})",
                        spec.name
                    );
                    return Resolved::Wait(t);
                }
            }
        }
        let mut pull_auth = None;
        if let Some(name) = &spec.source.credentials {
            let login = self
                .open_secret(&spec.name, name)
                .and_then(|v| String::from_utf8(v).ok());
            let Some(login) = login else {
                t.state = TaskState::Pending;
                t.reason = format!(
                    "waiting for secret {name}, the registry login (PUT /v1/apps/{}/secrets/{name}, as user:password)",
                    spec.name
                );
                return Resolved::Wait(t);
            };
            let (user, password) = login.split_once(':').unwrap_or((login.as_str(), ""));
            pull_auth = Some(super::RegistryAuth {
                username: user.to_string(),
                password: password.to_string(),
            });
        }
        let labels = BTreeMap::from([
            (LABEL_APP.to_string(), spec.name.clone()),
            (LABEL_REPLICA.to_string(), replica.to_string()),
            (LABEL_VERSION.to_string(), version.to_string()),
            (LABEL_CLUSTER.to_string(), self.cluster.clone()),
            (LABEL_NODE.to_string(), self.me.clone()),
        ]);
        Resolved::Run(Desired {
            replace_at_once: false,
            job: spec.job_retries(),
            pull_auth,
            probe: spec.probe(),
            app: spec.name.clone(),
            replica,
            version: version.to_string(),
            spec: ContainerSpec {
                name: container_name(&self.cluster, &spec.name, replica, version, &self.me),
                image,
                command: spec.run.command.clone(),
                env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
                labels,
                // Validated when the spec was written; a spec without a limit gets the
                // default, so no replica can take the node's memory.
                memory_bytes: Some(
                    spec.resources
                        .memory_bytes()
                        .ok()
                        .flatten()
                        .unwrap_or(DEFAULT_MEMORY_BYTES),
                ),
                nano_cpus: spec.resources.cpu.map(|c| (c * 1e9) as i64),
                port: spec.run.port,
                network: super::docker::network_name(&self.cluster, &self.me, &spec.name),
                volumes: spec
                    .volumes
                    .iter()
                    .map(|v| {
                        let name =
                            super::docker::volume_name(&self.cluster, &spec.name, replica, &v.name);
                        (name, v.path.clone())
                    })
                    .collect(),
            },
        })
    }

    /// One reconciliation: place, plan, act, record.
    #[tracing::instrument(name = "executor_pass", skip_all)]
    pub async fn pass(&mut self) {
        let now = crate::clock::now();
        let mut desired = Vec::new();
        let mut tasks: BTreeMap<ReplicaId, Task> = BTreeMap::new();
        let members: Vec<(String, MemberState)> = match self.h.snapshot().await {
            Ok(s) => s
                .members
                .into_iter()
                .map(|m| (m.id.to_string(), m.state))
                .collect(),
            // The agent is stopping.
            Err(_) => return,
        };
        let view = self.view(&members);
        self.members = members;
        let placed = view.place();
        self.judge(&view, &placed).await;
        for slot in view
            .slots(&placed)
            .into_iter()
            .filter(|s| s.node == self.me)
        {
            match self.resolve(&slot.spec, &slot.revision, slot.replica) {
                Resolved::Run(d) => desired.push(Desired {
                    replace_at_once: slot.replace_at_once,
                    ..d
                }),
                Resolved::Wait(t) => {
                    tasks.insert((t.app.clone(), t.replica), t);
                }
            }
        }
        // Replicas placed elsewhere now keep serving here until their replacement is ready.
        for hand in view.handoffs(&placed, &self.me) {
            let id = (hand.app.clone(), hand.replica);
            if let Some(mut t) = self.written.get(&id).cloned() {
                t.reason = format!("moving to {}: stopped here once it is ready there", hand.to);
                tasks.entry(id).or_insert(t);
            }
        }
        let left = view.draining(&self.me);
        if left == Some(0) && self.drain_left.is_some_and(|n| n > 0) {
            tracing::info!("drained: no replica runs here any more");
        }
        self.drain_left = left;
        match self.rt.list(&self.cluster, &self.me).await {
            Ok(observed) => {
                if self.runtime_down {
                    tracing::info!("the container runtime answers again");
                    self.runtime_down = false;
                }
                self.act(now, &desired, &observed, &mut tasks).await;
                if view.drained.contains(&self.me) {
                    // Data does not move with a drain (that is the lifecycle's to do).
                    for d in desired.iter().filter(|d| !d.spec.volumes.is_empty()) {
                        if let Some(t) = tasks.get_mut(&(d.app.clone(), d.replica)) {
                            if t.reason.is_empty() {
                                t.reason =
                                    "holds its volumes' data on this node: the drain leaves it here"
                                        .into();
                            }
                        }
                    }
                }
            }
            Err(e) => {
                if !self.runtime_down {
                    tracing::warn!(err = %crate::error_chain(&e), "the container runtime does not answer: tasks wait");
                    self.runtime_down = true;
                }
                for d in &desired {
                    let mut t = self.task(&d.app, d.replica, &d.version, &d.spec.image);
                    t.state = TaskState::Pending;
                    t.reason = format!("waiting for the container runtime: {e}");
                    tasks.insert((d.app.clone(), d.replica), t);
                }
            }
        }
        // A job that ended is placed nowhere; its records stay, saying how it ended.
        let finished: BTreeSet<(String, String)> = view
            .apps
            .iter()
            .filter(|a| view.finished_job(a))
            .map(|a| (a.spec.name.clone(), a.revision.clone()))
            .collect();
        self.record(tasks, &finished).await;
    }

    async fn act(
        &mut self,
        now: Instant,
        desired: &[Desired],
        observed: &[Observed],
        tasks: &mut BTreeMap<ReplicaId, Task>,
    ) {
        let waiting: Vec<ReplicaId> = tasks.keys().cloned().collect();
        // Probe what runs as desired; forget what no longer runs. Readiness goes into the plan:
        // an old version stays until its replacement is ready.
        for o in observed.iter().filter(|o| o.running) {
            let d = desired
                .iter()
                .find(|d| d.app == o.app && d.replica == o.replica && d.version == o.version);
            if let Some(d) = d {
                self.watch(o, d);
            }
        }
        self.watched
            .retain(|id, _| observed.iter().any(|o| o.running && o.id == *id));
        let observed: Vec<Observed> = observed
            .iter()
            .map(|o| Observed {
                ready: self.watched.get(&o.id).is_some_and(|w| w.tracker.ready()),
                ..o.clone()
            })
            .collect();
        let p = plan(desired, &observed, &waiting);
        for (i, o) in &p.running {
            let d = &desired[*i];
            let r = self.restarts_of(d);
            if r.started.is_none_or(|s| now.duration_since(s) >= STABLE) {
                r.streak = 0;
            }
            let mut t = self.task(&d.app, d.replica, &d.version, &d.spec.image);
            let w = self.watched.get(&o.id);
            let said = w
                .and_then(|w| w.tracker.said())
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            t.ready = o.ready;
            (t.state, t.reason) = if o.ready {
                (TaskState::Running, String::new())
            } else if w.is_some_and(|w| w.tracker.ever_ready()) {
                (TaskState::Running, format!("unready{said}"))
            } else {
                (TaskState::Starting, format!("waiting until ready{said}"))
            };
            t.container = Some(o.id.clone());
            t.ip = o.ip.clone();
            t.port = d.spec.port;
            tasks.insert((d.app.clone(), d.replica), t);
        }
        let mut starts: Vec<usize> = p.missing.clone();
        for (i, o) in &p.stopped {
            let d = &desired[*i];
            let code = o.exit_code.unwrap_or(-1);
            if let Err(e) = self.rt.remove(&o.id).await {
                tracing::warn!(container = %o.id, err = %e, "cannot remove a stopped container");
            }
            if let Some(t) = self.job_ended(now, d, code) {
                tasks.insert((d.app.clone(), d.replica), t);
                continue;
            }
            tracing::warn!(app = %d.app, replica = d.replica, exit_code = code, "container stopped: replacing it");
            let r = self.restarts_of(d);
            r.failed(now);
            r.last_exit = o.exit_code;
            let mut t = self.task(&d.app, d.replica, &d.version, &d.spec.image);
            t.state = TaskState::Failed;
            t.reason = match d.job {
                Some(retries) => {
                    format!("exited with code {code}: retry {} of {retries}", t.failures)
                }
                None => format!("exited with code {code}: restarting"),
            };
            tasks.insert((d.app.clone(), d.replica), t);
            starts.push(*i);
        }
        for i in starts {
            let d = &desired[i];
            let id = (d.app.clone(), d.replica);
            if let Some(t) = self.done(d) {
                tasks.insert(id, t);
                continue;
            }
            if !self.restarts_of(d).may_start(now) {
                // Still backing off: keep saying why it failed.
                let t = self.written.get(&id).cloned().unwrap_or_else(|| {
                    let mut t = self.task(&d.app, d.replica, &d.version, &d.spec.image);
                    t.state = TaskState::Failed;
                    t.reason = "restarting after a backoff".into();
                    t
                });
                tasks.entry(id).or_insert(t);
                continue;
            }
            let t = self.start(now, d).await;
            // Probing starts at the pass that sees it running: make that pass soon.
            self.look_again |= t.container.is_some();
            tasks.insert(id.clone(), t);
        }
        for o in &p.extra {
            if self.drain(o) {
                continue;
            }
            tracing::info!(app = %o.app, replica = o.replica, version = %o.version, container = %o.id, "removing a container this node should no longer run");
            if let Err(e) = self.rt.remove(&o.id).await {
                tracing::warn!(container = %o.id, err = %e, "cannot remove container");
            }
        }
        if !p.extra.is_empty() || !p.stopped.is_empty() {
            // An app gone from this node (or a job done) leaves its network behind.
            if let Err(e) = self.rt.prune_networks(&self.cluster, &self.me).await {
                tracing::warn!(err = %e, "cannot remove unused app networks");
            }
        }
    }

    /// Drains a running container this node no longer wants, if the ingress can say what it
    /// has in flight to it, and removes it after (in the background); whether it took it.
    fn drain(&self, o: &Observed) -> bool {
        let Some((inflight, deadline)) = &self.inflight else {
            return false;
        };
        let Some(ip) =
            o.ip.as_deref()
                .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
                .filter(|_| o.running)
        else {
            return false;
        };
        let Ok(mut draining) = self.draining.lock() else {
            return false;
        };
        if draining.contains(&o.id) {
            return true;
        }
        if inflight(ip).is_none() {
            return false;
        }
        draining.insert(o.id.clone());
        tracing::info!(app = %o.app, replica = o.replica, version = %o.version, container = %o.id, "draining a container this node should no longer run");
        let (rt, inflight, deadline, all, o, cluster, me) = (
            self.rt.clone(),
            inflight.clone(),
            *deadline,
            self.draining.clone(),
            o.clone(),
            self.cluster.clone(),
            self.me.clone(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(DRAIN_SETTLE).await;
            let end = crate::clock::now() + deadline;
            let mut left = inflight(ip).unwrap_or(0);
            while left > 0 && crate::clock::now() < end {
                tokio::time::sleep(Duration::from_millis(25)).await;
                left = inflight(ip).unwrap_or(0);
            }
            if left > 0 {
                tracing::warn!(app = %o.app, replica = o.replica, container = %o.id, in_flight = left, "drain deadline passed: stopping it with requests in flight");
            }
            tracing::info!(app = %o.app, replica = o.replica, version = %o.version, container = %o.id, "removing a drained container");
            if let Err(e) = rt.remove(&o.id).await {
                tracing::warn!(container = %o.id, err = %e, "cannot remove container");
            }
            // The last container of an app here leaves its network behind.
            if let Err(e) = rt.prune_networks(&cluster, &me).await {
                tracing::warn!(err = %e, "cannot remove unused app networks");
            }
            if let Ok(mut d) = all.lock() {
                d.remove(&o.id);
            }
        });
        true
    }

    /// A job's replica whose container exited: done when it succeeded or has no retries
    /// left (the task it ends with), `None` when it runs again.
    fn job_ended(&mut self, now: Instant, d: &Desired, code: i64) -> Option<Task> {
        let retries = d.job?;
        let failures = self.restarts_of(d).failures;
        if code != 0 && failures < retries {
            return None;
        }
        let r = self.restarts_of(d);
        r.last_exit = Some(code);
        if code != 0 {
            r.failed(now);
        }
        let mut t = self.task(&d.app, d.replica, &d.version, &d.spec.image);
        (t.state, t.reason) = if code == 0 {
            tracing::info!(app = %d.app, replica = d.replica, "job completed");
            (TaskState::Completed, "completed".to_string())
        } else {
            tracing::warn!(app = %d.app, replica = d.replica, exit_code = code, "job failed: no retries left");
            (
                TaskState::Failed,
                format!(
                    "exited with code {code} after {} runs: no retries left",
                    t.failures
                ),
            )
        };
        self.restarts_of(d).done = Some(t.clone());
        Some(t)
    }

    /// The task a job's replica ended with at this version, if it did: kept by this run of
    /// the agent, or recorded by an earlier one (so a restarted agent does not run it again).
    fn done(&mut self, d: &Desired) -> Option<Task> {
        let retries = d.job?;
        if let Some(t) = &self.restarts_of(d).done {
            return Some(t.clone());
        }
        let key = keys::task(&self.me, &d.app, d.replica).ok()?;
        let (e, _) = read_entry(&self.h.store, key.as_str()).ok()??;
        let mut t: Task = serde_json::from_slice(e.value.as_deref()?).ok()?;
        let ended = t.state == TaskState::Completed
            || (t.state == TaskState::Failed && t.failures > retries);
        if t.version != d.version || !ended {
            return None;
        }
        t.agent_started_ms = self.h.started_ms;
        self.restarts_of(d).done = Some(t.clone());
        Some(t)
    }

    /// Starts bringing a missing image (one at a time per image, a failed one tried again
    /// after `PULL_RETRY`): from a live peer that holds it, else from its registry. What the
    /// replica waits for.
    fn pull(&mut self, now: Instant, d: &Desired, located: Option<Located>) -> String {
        let image = d.spec.image.clone();
        match self.pulls.get(&image) {
            Some(Pull::Running) => return format!("pulling image {image}"),
            // Tried again at once with a new login, or when peers now hold it.
            Some(Pull::Failed {
                why,
                at,
                auth,
                holders,
            }) if now.duration_since(*at) < PULL_RETRY
                && *auth == d.pull_auth
                && *holders == holder_ids(&located) =>
            {
                return format!(
                    "image {image} is not on this node and cannot be pulled ({why}): load it with POST /v1/images, or fix the reference or the registry login"
                );
            }
            _ => {}
        }
        self.pulls.insert(image.clone(), Pull::Running);
        let holders = holder_ids(&located);
        let (rt, done, auth) = (self.rt.clone(), self.pulled.clone(), d.pull_auth.clone());
        let peers = self.images.peers.clone();
        let cluster = self.cluster.clone();
        let located = located.filter(|l| !l.holders.is_empty() && peers.is_some());
        let said = match &located {
            Some(l) => format!("fetching image {image} from {}", l.holders[0].0),
            None => format!("pulling image {image}"),
        };
        tracing::info!(image = %image, login = auth.is_some(), peers = ?located.as_ref().map(|l| &l.holders), "bringing a missing image");
        tokio::spawn(async move {
            let bring = async {
                let mut why = None;
                if let (Some(l), Some(peers)) = (&located, &peers) {
                    // A tag is given its name here; a digest or an id is run by id.
                    let tag = (!crate::spec::is_pinned(&image)).then_some(image.as_str());
                    match super::distribute::fetch(&rt, &**peers, &cluster, &l.id, &l.holders, tag)
                        .await
                    {
                        Ok(from) => {
                            tracing::info!(image = %image, id = %l.id, %from, "image fetched from a peer");
                            return Ok(l.id.clone());
                        }
                        Err(e) => {
                            tracing::warn!(image = %image, err = %e, "cannot fetch the image from a peer: trying its registry");
                            why = Some(e);
                        }
                    }
                }
                if crate::spec::is_image_id(&image) {
                    return Err(why.unwrap_or_else(|| {
                        "no live node holds it and an image id names no registry".into()
                    }));
                }
                rt.pull(&image, auth.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                rt.image_id(&crate::spec::tagged(&image))
                    .await
                    .ok()
                    .flatten()
                    .ok_or_else(|| "the engine does not have it after the pull".to_string())
            };
            let result = match tokio::time::timeout(PULL_TIMEOUT, bring).await {
                Ok(r) => r,
                Err(_) => Err(format!("not done within {PULL_TIMEOUT:?}")),
            };
            let _ = done
                .send(Pulled {
                    image,
                    result,
                    auth,
                    holders,
                })
                .await;
        });
        said
    }

    /// A pull or fetch ended: the replicas waiting for it start at the next pass.
    pub fn on_pulled(&mut self, p: Pulled) {
        match p.result {
            Ok(id) => {
                tracing::info!(image = %p.image, %id, "image pulled");
                self.pulls.remove(&p.image);
                self.images.brought(id);
            }
            Err(why) => {
                tracing::warn!(image = %p.image, err = %why, "cannot pull image");
                self.pulls.insert(
                    p.image,
                    Pull::Failed {
                        why,
                        at: crate::clock::now(),
                        auth: p.auth,
                        holders: p.holders,
                    },
                );
            }
        }
    }

    /// Brings the node's image record up to date and removes images no app needs any more.
    pub async fn keep_images(&mut self) {
        let now = crate::clock::now();
        let apps = crate::state::records::apps(&self.h.store);
        let histories = crate::state::records::histories(&self.h.store);
        let specs: Vec<&AppSpec> = apps
            .iter()
            .map(|a| &a.spec)
            .chain(histories.values().flatten().map(|p| &p.spec))
            .collect();
        self.images.collect(&self.rt, &specs, now).await;
        self.images.publish(&self.rt, &self.h, now).await;
    }

    /// Where the cluster's records say `reference` is.
    fn locate(&self, reference: &str) -> Option<Located> {
        let members = &self.members;
        let held = crate::state::records::held_images(&self.h.store);
        let addrs = crate::state::records::nodes(&self.h.store)
            .into_iter()
            .map(|n| (n.id, n.addr))
            .collect();
        super::distribute::locate(reference, &held, &addrs, &self.me, |n| {
            members.iter().any(|(m, s)| m == n && s.is_live())
        })
    }

    async fn start(&mut self, now: Instant, d: &Desired) -> Task {
        let mut t = self.task(&d.app, d.replica, &d.version, &d.spec.image);
        t.port = d.spec.port;
        let mut spec = std::borrow::Cow::Borrowed(&d.spec);
        match self.rt.has_image(&d.spec.image).await {
            Ok(true) => {}
            Ok(false) => {
                let located = self.locate(&d.spec.image);
                let here = match &located {
                    Some(l) => self.rt.has_image(&l.id).await.unwrap_or(false),
                    None => false,
                };
                match located {
                    // Fetched from a peer in place of a registry digest: run by id.
                    Some(l) if here => spec.to_mut().image = l.id,
                    located => {
                        t.state = TaskState::Pending;
                        t.reason = self.pull(now, d, located);
                        return t;
                    }
                }
            }
            Err(e) => {
                t.state = TaskState::Pending;
                t.reason = format!("waiting for the container runtime: {e}");
                return t;
            }
        }
        let started = self.rt.start(&spec).await;
        let mut watch = None;
        let r = self.restarts_of(d);
        match started {
            Ok(started) => {
                r.started = Some(now);
                r.first_started_ms.get_or_insert_with(wall_ms);
                tracing::info!(app = %d.app, replica = d.replica, container = %started.id, "container started");
                t.state = TaskState::Starting;
                t.reason = "started".into();
                t.container = Some(started.id.clone());
                t.ip = started.ip.clone();
                // Probed from now: a replica is ready as soon as it answers.
                watch = started.ip.is_some().then(|| Observed {
                    id: started.id,
                    app: d.app.clone(),
                    replica: d.replica,
                    version: d.version.clone(),
                    running: true,
                    exit_code: None,
                    ip: started.ip,
                    ready: false,
                });
            }
            Err(e) => {
                r.failed(now);
                let why = crate::error_chain(&e);
                tracing::warn!(app = %d.app, replica = d.replica, err = %why, "cannot start container");
                t.state = TaskState::Failed;
                t.reason = why;
            }
        }
        t.restarts = r.count;
        t.version_since_ms = r.first_started_ms.unwrap_or(0);
        if let Some(o) = watch {
            self.watch(&o, d);
        }
        t
    }

    /// Writes the tasks that changed and deletes the records of tasks no longer here (but
    /// those of `finished` jobs: (app, revision)).
    async fn record(
        &mut self,
        mut tasks: BTreeMap<ReplicaId, Task>,
        finished: &BTreeSet<(String, String)>,
    ) {
        let mut ops = Vec::new();
        let mine = scan_keyspace(
            &self.h.store,
            Keyspace::Tasks,
            &keys::tasks_of(&self.me),
            usize::MAX,
        )
        .unwrap_or_default();
        for e in mine {
            let stale = e
                .value
                .as_deref()
                .and_then(|v| serde_json::from_slice::<Task>(v).ok())
                .is_none_or(|t| {
                    !tasks.contains_key(&(t.app.clone(), t.replica))
                        && !finished.contains(&(t.app, t.version))
                });
            if stale {
                ops.push((e.key, None));
            }
        }
        for (id, t) in tasks.iter_mut() {
            if let Some(prev) = self.written.get(id) {
                // `since_ms` is when the state changed, not when it was last seen.
                if prev.state == t.state {
                    t.since_ms = prev.since_ms;
                }
                if !prev.differs(t) {
                    continue;
                }
            }
            let Ok(key) = keys::task(&self.me, &t.app, t.replica) else {
                continue;
            };
            let value = serde_json::to_vec(&*t).unwrap_or_default();
            ops.push((key, Some(Bytes::from(value))));
        }
        self.restarts.retain(|id, _| tasks.contains_key(id));
        if ops.is_empty() {
            self.written = tasks.into_iter().collect();
            return;
        }
        match self.h.write(ops).await {
            Ok(_) => self.written = tasks.into_iter().collect(),
            Err(e) => tracing::warn!(err = %e, "cannot record task states"),
        }
    }
}

/// Whether a change can alter what this node should run.
fn relevant(c: &Change, me: &str) -> bool {
    let k = &c.entry.key;
    match k.keyspace() {
        Keyspace::Apps
        | Keyspace::Nodes
        | Keyspace::Secrets
        | Keyspace::History
        | Keyspace::Rollouts
        | Keyspace::Scale
        | Keyspace::Cluster => true,
        // Peers' image records: an image a replica waits for may now be fetched.
        Keyspace::Images => k.owner() != Some(me),
        // Other nodes' tasks move placements (a replica running elsewhere stays there).
        Keyspace::Tasks => k.owner() != Some(me),
        _ => false,
    }
}

/// The host rules that keep containers from the node and the metadata address
/// (`firewall`), asserted every `FIREWALL_EVERY` from the periodic pass; failures are logged
/// once until they change.
#[derive(Default)]
struct Firewall {
    last_error: Option<String>,
    /// When the rules were last asserted: a few iptables runs, not worth every pass.
    last: Option<Instant>,
}

/// How often the host rules are asserted again.
const FIREWALL_EVERY: Duration = Duration::from_secs(15);

impl Firewall {
    async fn assert<R: ContainerRuntime>(&mut self, rt: &R) {
        let now = crate::clock::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < FIREWALL_EVERY)
        {
            return;
        }
        self.last = Some(now);
        match rt.guard_host().await {
            Ok(None) => {}
            Ok(Some(done)) => {
                if self.last_error.take().is_some() || done.rebuilt_chain || done.hooks_added > 0 {
                    tracing::info!(
                        rebuilt_chain = done.rebuilt_chain,
                        hooks_added = done.hooks_added,
                        "container firewall rules in place"
                    );
                }
            }
            Err(e) => {
                let e = e.to_string();
                if self.last_error.as_ref() != Some(&e) {
                    tracing::error!(err = %e, "cannot set the container firewall: containers may reach this node's ports and the metadata address");
                    self.last_error = Some(e);
                }
            }
        }
    }
}

/// Runs the executor until `shutdown`. Containers keep running when the agent stops: a
/// restarted agent adopts them by their labels.
pub async fn run<R: ContainerRuntime + Clone + Send + Sync + 'static>(
    rt: R,
    h: Handle,
    options: Options,
    shutdown: CancellationToken,
) {
    use futures_util::StreamExt;
    let mut changes = h.subscribe();
    let mut members = h.members.clone();
    let me = h.me.id.to_string();
    let cluster = h.trust.cluster.id.clone();
    let (mut ex, mut wakes) = Executor::new(rt, h, &options);
    let mut firewall = Firewall::default();
    let mut tick = tokio::time::interval(options.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Container stops as Docker reports them; (re)subscribed at a periodic pass when absent.
    let mut stops: Option<futures_util::stream::BoxStream<'static, ()>> = None;
    loop {
        let next_stop = async {
            match stops.as_mut() {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(LOOK_AGAIN), if ex.look_again => {}
            _ = tick.tick() => {
                if stops.is_none() {
                    stops = ex.rt.stops(&cluster).await.ok();
                }
                firewall.assert(&ex.rt).await;
                ex.keep_images().await;
            }
            e = next_stop => if e.is_none() {
                stops = None;
            },
            // A member up or down moves placements: act now, not at the next tick.
            m = members.changed() => if m.is_err() {
                return;
            },
            p = wakes.pulls.recv() => match p {
                Some(p) => {
                    ex.on_pulled(p);
                    ex.keep_images().await;
                }
                None => continue,
            },
            r = wakes.probes.recv() => match r {
                Some(r) => if !ex.on_probe(r).await {
                    continue;
                },
                None => continue,
            },
            c = changes.recv() => match c {
                Ok(c) if !relevant(&c, &me) => continue,
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    // Take everything already queued in this one pass.
                    while changes.try_recv().is_ok() {}
                }
                Err(RecvError::Closed) => return,
            },
        }
        ex.look_again = false;
        ex.pass().await;
    }
}
