//! The executor in-process, over the fake runtime (`executor::fake`) and one node's real
//! core and store, in virtual time (`start_paused`): restart backoff in a crash loop, start
//! failures, adopting containers an earlier run left, a runtime that is down, an image that is
//! missing. The real-Docker tests (`tests/tests/executor.rs`) cover the runtime itself.

use shoal::daemon::testing::{single_node, TestNode};
use shoal::executor::fake::FakeRuntime;
use shoal::executor::{ContainerSpec, Task, TaskState};
use shoal::spec::AppSpec;
use shoal::state::records;
use shoal::store::{keys, Bytes};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the executor passes in these tests.
const EVERY: Duration = Duration::from_millis(200);

struct World {
    node: TestNode,
    rt: Arc<FakeRuntime>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        World {
            node: single_node(dir.path(), "n1"),
            rt: Arc::new(FakeRuntime::default()),
            stop: CancellationToken::new(),
            _dir: dir,
        }
    }

    /// Publishes the node's record (a node that runs containers) and starts the executor.
    async fn start_executor(&self) {
        let h = &self.node.core.handle;
        records::NodeRecord::publish(h, Default::default(), true, None)
            .await
            .unwrap();
        tokio::spawn(shoal::executor::run::run(
            self.rt.clone(),
            self.node.core.handle.clone(),
            shoal::executor::run::Options::every(EVERY),
            self.stop.clone(),
        ));
    }

    /// Writes an app as an operator would; its revision (what its containers are labelled
    /// with).
    async fn put_app(&self, toml: &str) -> String {
        let spec = AppSpec::parse(toml).unwrap();
        let key = keys::app(&spec.name).unwrap();
        let value = Bytes::from(serde_json::to_vec(&spec).unwrap());
        self.node
            .core
            .handle
            .write_as(vec![(key, Some(value))], self.node.operator.clone())
            .await
            .unwrap();
        spec.revision()
    }

    fn task(&self, app: &str, replica: u32) -> Option<Task> {
        records::tasks(&self.node.core.handle.store, &keys::tasks_of("n1"))
            .into_iter()
            .find(|t| t.app == app && t.replica == replica)
    }

    /// Polls `f` in virtual time until it answers, or fails the test after `within`.
    async fn until<T>(&self, what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let end = shoal::clock::now() + within;
        loop {
            if let Some(t) = f() {
                return t;
            }
            assert!(shoal::clock::now() < end, "{what}: not within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn running_container(&self, app: &str, not: Option<&str>) -> String {
        self.until("a running container", Duration::from_secs(120), || {
            self.rt
                .running()
                .into_iter()
                .find(|(id, a, _)| a == app && Some(id.as_str()) != not)
                .map(|(id, _, _)| id)
        })
        .await
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
        self.node.stop.cancel();
    }
}

const WEB: &str = "name = \"web\"\n[source]\nimage = \"img\"\n";

#[tokio::test(start_paused = true)]
async fn a_crash_loop_backs_off_exponentially() {
    let w = World::new();
    w.rt.add_image("img");
    w.start_executor().await;
    w.put_app(WEB).await;
    let mut id = w.running_container("web", None).await;
    // Each container dies as soon as it runs: restarts come at once, then after 1, 2, 4 s.
    let mut gaps = Vec::new();
    for _ in 0..4 {
        let crashed_at = shoal::clock::now();
        w.rt.crash(&id, 1);
        let next = w.running_container("web", Some(&id)).await;
        let started = w.rt.starts().last().unwrap().at;
        gaps.push(started.duration_since(crashed_at));
        id = next;
    }
    for (gap, want) in gaps.iter().zip([0u64, 1, 2, 4]) {
        let want = Duration::from_secs(want);
        assert!(
            *gap >= want && *gap <= want + EVERY * 3,
            "restart gaps {gaps:?}: expected about 0, 1, 2, 4 s"
        );
    }
    // The record says what happened: restarts and the last exit code.
    let t = w.task("web", 0).unwrap();
    assert_eq!(t.restarts, 4, "{t:?}");
    assert_eq!(t.exit_code, Some(1), "{t:?}");
    assert_eq!(w.rt.removed().len(), 4, "each dead container is removed");
}

#[tokio::test(start_paused = true)]
async fn a_failing_start_is_recorded_and_retried_after_a_backoff() {
    let w = World::new();
    w.rt.add_image("img");
    w.rt.fail_starts(2);
    w.start_executor().await;
    w.put_app(WEB).await;
    let failed = w
        .until("the failure recorded", Duration::from_secs(10), || {
            w.task("web", 0).filter(|t| t.state == TaskState::Failed)
        })
        .await;
    assert!(failed.reason.contains("refused to start"), "{failed:?}");
    w.running_container("web", None).await;
    let starts = w.rt.starts();
    assert_eq!(
        starts.iter().map(|s| s.ok).collect::<Vec<_>>(),
        [false, false, true]
    );
    // The second retry waited out the backoff (1 s after the second failure).
    assert!(starts[2].at.duration_since(starts[1].at) >= Duration::from_secs(1));
    w.until("the task running", Duration::from_secs(10), || {
        w.task("web", 0).filter(|t| t.state == TaskState::Running)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_container_from_an_earlier_run_is_adopted_not_restarted() {
    let w = World::new();
    w.rt.add_image("img");
    let version = w.put_app(WEB).await;
    let h = &w.node.core.handle;
    let labels = [
        ("shoal.app", "web".to_string()),
        ("shoal.replica", "0".to_string()),
        ("shoal.version", version),
        ("shoal.cluster", h.trust.cluster.id.clone()),
        ("shoal.node", "n1".to_string()),
    ];
    w.rt.seed(
        "left-running",
        ContainerSpec {
            name: "shoal-web-0-00000000".into(),
            image: "img".into(),
            command: vec![],
            env: vec![],
            labels: labels
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            memory_bytes: None,
            nano_cpus: None,
            port: None,
            network: "n".into(),
            volumes: vec![],
        },
    );
    w.start_executor().await;
    let t = w
        .until("the task adopted", Duration::from_secs(10), || {
            w.task("web", 0).filter(|t| t.state == TaskState::Running)
        })
        .await;
    assert_eq!(t.container.as_deref(), Some("left-running"));
    // A few more passes change nothing.
    tokio::time::sleep(EVERY * 5).await;
    assert!(w.rt.starts().is_empty(), "{:?}", w.rt.starts());
    assert!(w.rt.removed().is_empty());
}

#[tokio::test(start_paused = true)]
async fn tasks_wait_while_the_runtime_is_down_and_run_when_it_is_back() {
    let w = World::new();
    w.rt.add_image("img");
    w.rt.set_down(true);
    w.start_executor().await;
    w.put_app(WEB).await;
    let t = w
        .until("the task waiting", Duration::from_secs(10), || {
            w.task("web", 0).filter(|t| t.state == TaskState::Pending)
        })
        .await;
    assert!(
        t.reason.contains("waiting for the container runtime"),
        "{t:?}"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(w.rt.starts().is_empty());
    w.rt.set_down(false);
    w.running_container("web", None).await;
    assert_eq!(w.rt.starts().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_missing_image_is_said_and_the_replica_starts_once_it_is_there() {
    let w = World::new();
    w.start_executor().await;
    w.put_app("name = \"web\"\n[source]\nimage = \"absent\"\n")
        .await;
    let t = w
        .until("the task pending", Duration::from_secs(10), || {
            w.task("web", 0)
                .filter(|t| t.state == TaskState::Pending && t.reason.contains("not on this node"))
        })
        .await;
    // A pull was tried (no registry has it) and said why.
    assert!(
        t.reason.contains("image absent is not on this node and cannot be pulled (cannot pull absent: not found in the registry)"),
        "{t:?}"
    );
    assert_eq!(w.rt.pulls(), ["absent"]);
    assert!(w.rt.starts().is_empty());
    // Loaded later (POST /v1/images): the periodic pass starts it.
    w.rt.add_image("absent");
    w.running_container("web", None).await;
}

/// `web` at `image`, probed by TCP on its port.
fn web_at(image: &str, health: &str) -> String {
    format!("name = \"web\"\n[source]\nimage = \"{image}\"\n[run]\nport = 8080\n[health]\ntcp = 8080\n{health}")
}

#[tokio::test(start_paused = true)]
async fn an_update_keeps_the_old_version_until_the_new_one_is_ready() {
    let w = World::new();
    for i in ["img:1", "img:2", "img:3"] {
        w.rt.add_image(i);
    }
    w.rt.set_healthy("img:2", false);
    w.start_executor().await;
    w.put_app(&web_at("img:1", "")).await;
    let t = w
        .until("v1 ready", Duration::from_secs(10), || {
            w.task("web", 0).filter(|t| t.ready)
        })
        .await;
    assert_eq!(t.state, TaskState::Running);
    let old = t.container.unwrap();

    // A version that never gets ready: started (and restarted after 10 failed probes), never
    // in the old one's place.
    w.put_app(&web_at("img:2", "")).await;
    let t = w
        .until("v2 probed", Duration::from_secs(10), || {
            w.task("web", 0)
                .filter(|t| t.image == "img:2" && t.reason.contains("unhealthy"))
        })
        .await;
    assert_eq!(t.state, TaskState::Starting, "{t:?}");
    assert!(!t.ready && t.reason.contains("unhealthy"), "{t:?}");
    let end = shoal::clock::now() + Duration::from_secs(30);
    while shoal::clock::now() < end {
        assert!(
            w.rt.running().iter().any(|(id, _, _)| *id == old),
            "the old version was stopped for one that is not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restarted = w.rt.starts().iter().filter(|s| s.ok).count();
    assert!(
        restarted >= 3,
        "v2 was not restarted for failing its probes: {restarted} starts"
    );

    // A good version replaces the old one once it is ready.
    w.put_app(&web_at("img:3", "")).await;
    w.until("v1 removed", Duration::from_secs(10), || {
        w.rt.removed().contains(&old).then_some(())
    })
    .await;
    let t = w.task("web", 0).unwrap();
    assert!(t.ready && t.image == "img:3", "{t:?}");
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_stops_answering_is_unready_then_restarted() {
    let w = World::new();
    w.rt.add_image("img:1");
    w.start_executor().await;
    w.put_app(&web_at(
        "img:1",
        "interval = \"1s\"\nfailure_threshold = 2\nrestart_threshold = 5\n",
    ))
    .await;
    let first = w
        .until("ready", Duration::from_secs(10), || {
            w.task("web", 0).filter(|t| t.ready)
        })
        .await
        .container
        .unwrap();
    w.rt.set_healthy("img:1", false);
    let t = w
        .until("unready", Duration::from_secs(10), || {
            w.task("web", 0).filter(|t| !t.ready)
        })
        .await;
    assert_eq!(t.state, TaskState::Running, "{t:?}");
    assert!(t.reason.starts_with("unready"), "{t:?}");
    // Two failures (2 s) made it unready; five (5 s) restart it.
    w.until("restarted", Duration::from_secs(10), || {
        w.rt.removed().contains(&first).then_some(())
    })
    .await;
    w.rt.set_healthy("img:1", true);
    let t = w
        .until("ready again", Duration::from_secs(10), || {
            w.task("web", 0)
                .filter(|t| t.ready && t.container.as_deref() != Some(&first))
        })
        .await;
    assert_eq!(t.restarts, 1, "{t:?}");
}
