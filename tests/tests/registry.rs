//! Images from a registry, against Debian's `docker-registry` on loopback: an app whose
//! image the node lacks pulls it through the engine, from an open registry and from one
//! behind a login (htpasswd) with the login in an app secret; a wrong login is said, not
//! retried in a loop.

use shoal_e2e::docker::*;
use shoal_e2e::registry::Registry;
use shoal_e2e::Agent;
use std::path::Path;
use std::process::Command;

fn app(name: &str, image: &str, credentials: Option<&str>) -> String {
    let creds = credentials
        .map(|c| format!("credentials = \"{c}\"\n"))
        .unwrap_or_default();
    format!(
        "name = \"{name}\"\n[source]\nimage = \"{image}\"\n{creds}[run]\ncommand = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nport = 8080\n[resources]\nmemory = \"16Mi\"\n"
    )
}

fn reason(a: &Agent, app: &str, has: &str) -> String {
    converge(&[a], &format!("{app}: {has}"), || {
        tasks(a, app).into_iter().find_map(|t| {
            t["reason"]
                .as_str()
                .filter(|r| r.contains(has))
                .map(String::from)
        })
    })
}

fn start_agent(root: &Path) -> Agent {
    Agent::start(
        root,
        "n1",
        &[],
        "[docker]\nenabled = true\nreconcile_ms = 300\n",
    )
}

#[test]
fn an_image_is_pulled_from_an_open_registry_and_from_one_behind_a_login() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let a = start_agent(root.path());

    // Open: nothing loaded here, the node pulls it.
    let open = Registry::start("127.0.0.1", None);
    let image = open.push_busybox("open", None);
    let pulled_open = image.clone();
    assert!(!Command::new("docker")
        .args(["image", "inspect", &image])
        .output()
        .unwrap()
        .status
        .success());
    deploy(&a, "web", &app("web", &image, None));
    running(&a, "web", 1);
    assert!(a.log().contains("image pulled"));

    // Behind a login: waits for its secret, says a wrong login, runs with the right one.
    let login = ("e2e", "s3cret-pw");
    let private = Registry::start("127.0.0.1", Some(login));
    let image = private.push_busybox("private", Some(login));
    deploy(&a, "priv", &app("priv", &image, Some("REGISTRY_LOGIN")));
    reason(
        &a,
        "priv",
        "waiting for secret REGISTRY_LOGIN, the registry login",
    );
    let set = |v: &str| {
        let r = write(
            &a,
            "PUT",
            "/v1/apps/priv/secrets/REGISTRY_LOGIN",
            v.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    };
    set("e2e:wrong");
    let why = reason(&a, "priv", "cannot be pulled");
    assert!(why.contains(&image), "{why}");
    set("e2e:s3cret-pw");
    running(&a, "priv", 1);
    // The password is in no task and no log line.
    assert!(!a.get("/v1/tasks").unwrap().text().contains("s3cret-pw"));
    assert!(!a.log().contains("s3cret-pw"));

    // A registry that does not answer: the deploy stands, unpinned, and says so.
    let t = std::time::Instant::now();
    let r = a
        .put_app("nowhere", &app("nowhere", "127.0.0.1:1/e2e/none:1", None))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let w = r.json()["warning"].as_str().unwrap_or_default().to_string();
    assert!(w.contains("is not pinned by content"), "{}", r.text());
    assert_eq!(r.json()["image"], "127.0.0.1:1/e2e/none:1", "{}", r.text());
    eprintln!("unpinned PUT: {:?}", t.elapsed());
    assert_eq!(a.delete_app("nowhere").unwrap().status, 200);
    let pinned = a
        .put_app("priv", &app("priv", &image, Some("REGISTRY_LOGIN")))
        .unwrap();
    assert!(pinned.json()["warning"].is_null(), "{}", pinned.text());
    eprintln!("and the pinned one: {:?}", t.elapsed());

    // A spec naming a bad secret is refused.
    let r = a
        .put_app("bad", &app("bad", &image, Some("lower-case")))
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("source.credentials"), "{}", r.text());
    for i in [&image, &pulled_open] {
        let _ = Command::new("docker").args(["rmi", "-f", i]).output();
    }
}
