//! Autoscaling on traffic against the host's real dockerd: load through the ingress above an
//! app's target grows it to `max`, and once the load is gone it shrinks back to `min` after
//! its window; an app with `min = 0` stops when idle and its first request is held until a
//! replica answers it. The per-app metrics on `/metrics` count what went through.

use shoal_e2e::docker::*;
use shoal_e2e::http::metric;
use shoal_e2e::load::{get, Load};
use shoal_e2e::{Agent, BUSYBOX};
use std::time::{Duration, Instant};

/// busybox httpd serving one file, sized by its load.
fn spec(name: &str, scale: &str) -> String {
    format!(
        r#"name = "{name}"
[source]
image = "{BUSYBOX}"
[run]
command = ["sh", "-c", "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www"]
port = 8080
[scale]
{scale}"#
    )
}

fn ask(a: &Agent, host: &str) -> u16 {
    get(a.http_port, host, "/").0
}

/// A request that may be held for a while (curl, up to a minute): status and body.
fn held(a: &Agent, host: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "60", "-o", "-", "-w", "\n%{http_code}"])
        .args(["-H", &format!("Host: {host}")])
        .arg(format!("http://127.0.0.1:{}/", a.http_port))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

/// How many of `app`'s replicas run ready.
fn ready(a: &Agent, app: &str) -> usize {
    tasks(a, app)
        .iter()
        .filter(|t| t["state"] == "running" && t["ready"] == true)
        .count()
}

/// The app as `/v1/apps` shows it.
fn app(a: &Agent, name: &str) -> serde_json::Value {
    a.list("/v1/apps")
        .into_iter()
        .find(|v| v["name"] == name)
        .unwrap_or_default()
}

#[test]
fn load_above_the_target_grows_an_app_to_max_and_it_shrinks_back_after_the_window() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let a = one_node(root.path(), "[autoscale]\ninterval_ms = 500\n");
    deploy(
        &a,
        "busy",
        &spec(
            "busy",
            "min = 1\nmax = 3\ntarget_rps = 5\ndown_window = \"4s\"\n",
        ),
    );
    // (polled through the status port: requests through the ingress are load)
    converge(&[&a], "busy's first replica ready", || {
        (ready(&a, "busy") == 1).then_some(())
    });
    assert_eq!(ask(&a, "busy.localhost"), 200);
    // A couple of intervals at rest: min it stays.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(tasks(&a, "busy").len(), 1, "min is 1 and nothing loads it");

    // About 20 req/s against a target of 5 a replica: four replicas' worth, max is 3.
    let load = Load::start(a.http_port, "busy.localhost", "/", 2, 10);
    converge(&[&a], "busy grown to max (3 ready)", || {
        (ready(&a, "busy") == 3).then_some(())
    });
    let v = app(&a, "busy");
    assert_eq!(v["autoscale"]["replicas"], 3, "{v}");
    assert!(
        v["autoscale"]["last"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("req/s")),
        "{v}"
    );
    assert!(v["load"]["rps"].as_f64().unwrap_or(0.0) > 10.0, "{v}");
    // It stays at max while the load goes on (nothing flaps).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(app(&a, "busy")["autoscale"]["replicas"], 3);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, failed) = load.finish();
    assert!(ok > 50, "{ok} answered");
    assert!(
        failed.is_empty(),
        "requests failed while the app grew: {failed:?}"
    );

    let m = a.metrics();
    let served = metric(
        &m,
        "shoal_ingress_requests_total{app=\"busy\",class=\"2xx\"}",
    )
    .unwrap_or(0.0);
    assert!(
        served >= ok as f64,
        "{served} counted for {ok} answered:\n{m}"
    );
    assert!(
        metric(
            &m,
            "shoal_ingress_request_duration_seconds_count{app=\"busy\"}"
        )
        .unwrap_or(0.0)
            >= served
    );
    assert_eq!(
        metric(&m, "shoal_ingress_requests_in_flight{app=\"busy\"}"),
        Some(0.0)
    );
    assert!(
        metric(&m, "shoal_ingress_response_bytes_total{app=\"busy\"}").unwrap_or(0.0)
            >= 6.0 * ok as f64,
        "every answer is \"hello\\n\""
    );

    // Quiet: back to min once the window has passed.
    let quiet = Instant::now();
    converge(&[&a], "busy shrunk back to 1", || {
        (tasks(&a, "busy").len() == 1 && ready(&a, "busy") == 1).then_some(())
    });
    assert!(
        quiet.elapsed() >= Duration::from_secs(3),
        "shrunk within {:?}, before its 4 s window",
        quiet.elapsed()
    );
    assert_eq!(app(&a, "busy")["autoscale"]["replicas"], 1);
    assert_eq!(ask(&a, "busy.localhost"), 200);
}

#[test]
fn an_app_scaled_to_zero_stops_when_idle_and_its_first_request_is_held_until_it_answers() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let a = one_node(root.path(), "[autoscale]\ninterval_ms = 500\n");
    deploy(
        &a,
        "sleepy",
        &spec(
            "sleepy",
            "min = 0\nmax = 2\ntarget_rps = 50\ndown_window = \"3s\"\nwake_timeout = \"50s\"\n",
        ),
    );
    // Nothing runs until a request comes.
    converge(&[&a], "sleepy scaled to zero", || {
        let v = app(&a, "sleepy");
        v["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("scaled to zero"))
            .then_some(())
    });
    assert!(tasks(&a, "sleepy").is_empty());

    for round in 0..2 {
        // The first request is held while a replica starts, then answered.
        let asked = Instant::now();
        let (status, body) = held(&a, "sleepy.localhost");
        assert_eq!(status, 200, "round {round}: {body}");
        assert_eq!(body, "hello\n");
        eprintln!(
            "round {round}: first request answered in {:?}",
            asked.elapsed()
        );
        assert_eq!(ready(&a, "sleepy"), 1);
        assert_eq!(app(&a, "sleepy")["autoscale"]["replicas"], 1);
        // Idle again: stopped after its window.
        converge(&[&a], "sleepy stopped again", || {
            tasks(&a, "sleepy").is_empty().then_some(())
        });
    }

    // A request that cannot be served in time gets 503, not a hang: an app whose replica
    // never gets ready.
    deploy(
        &a,
        "stuck",
        &spec(
            "stuck",
            "min = 0\nmax = 1\ntarget_rps = 50\nwake_timeout = \"2s\"\n[health]\nhttp = \"/not-there\"\n",
        ),
    );
    converge(&[&a], "stuck scaled to zero", || {
        app(&a, "stuck")["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("scaled to zero"))
            .then_some(())
    });
    let asked = Instant::now();
    let (status, body) = held(&a, "stuck.localhost");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("scaled to zero"), "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "{:?}",
        asked.elapsed()
    );
}
