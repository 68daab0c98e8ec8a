//! Images from a registry, against Debian's `docker-registry` on loopback: an app whose
//! image the node lacks pulls it through the engine, from an open registry and from one
//! behind a login (htpasswd) with the login in an app secret; a wrong login is said, not
//! retried in a loop.

use shoal_e2e::docker::*;
use shoal_e2e::{busybox_image, free_port, run, wait_for, Agent, BUSYBOX};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// A `docker-registry` process on a loopback port, with a login when asked.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    fn start(login: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let auth = match login {
            Some((user, password)) => {
                // bcrypt, the only hash the registry takes, from the system's crypt(3).
                let hash = run(Command::new("/usr/bin/python3").args([
                    "-W",
                    "ignore",
                    "-c",
                    "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                    password,
                ]));
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, format!("{user}:{}\n", hash.trim())).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: e2e\n    path: {}\n",
                    file.display()
                )
            }
            None => String::new(),
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (Debian's docker-registry package)");
        wait_for(Duration::from_secs(20), "the registry", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Registry { child, port, dir }
    }

    /// Pushes the test image as `e2e/busybox:TAG` and removes the local name, so a node must
    /// pull it; the reference.
    fn push_busybox(&self, tag: &str, login: Option<(&str, &str)>) -> String {
        busybox_image();
        let reference = format!("127.0.0.1:{}/e2e/busybox:{tag}", self.port);
        // A client configuration of its own: the host's stays as it was.
        let config: PathBuf = self.dir.path().join("client");
        let docker = |args: &[&str]| {
            run(Command::new("docker")
                .env("DOCKER_CONFIG", &config)
                .args(args))
        };
        if let Some((user, password)) = login {
            docker(&[
                "login",
                "-u",
                user,
                "-p",
                password,
                &format!("127.0.0.1:{}", self.port),
            ]);
        }
        docker(&["tag", BUSYBOX, &reference]);
        docker(&["push", &reference]);
        docker(&["rmi", &reference]);
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let open = Registry::start(None);
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
    let private = Registry::start(Some(login));
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
