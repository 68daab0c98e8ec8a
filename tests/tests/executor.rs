//! The executor against the host's real dockerd: an image loaded through the API (no
//! registry), an app's replicas run as labelled, unprivileged, limited containers with their
//! env and secrets, a killed container comes back, scaling, updates and deletes converge, and
//! a restarted agent adopts the containers it finds instead of starting new ones.

use shoal_e2e::docker::*;
use shoal_e2e::{busybox_image, run, Agent, BUSYBOX};
use std::process::Command;

fn web_spec(replicas: u32, greeting: &str) -> String {
    format!(
        r#"name = "web"
[source]
image = "{BUSYBOX}"
[run]
command = ["sh", "-c", "echo \"$GREETING $API_KEY\" > /www/greeting; exec httpd -f -p $PORT -h /www"]
port = 8080
env = {{ GREETING = "{greeting}" }}
secrets = ["API_KEY"]
[scale]
replicas = {replicas}
[resources]
memory = "64Mi"
cpu = 0.5
"#
    )
}

#[test]
fn an_app_runs_as_containers_that_converge_on_its_spec() {
    shoal_e2e::netns::require_root();
    let archive = busybox_image();
    let root = tempfile::tempdir().unwrap();
    let cleanup = Cleanup::for_agents_in(root.path());
    let mut a = Agent::start(
        root.path(),
        "n1",
        &[],
        "[docker]\nenabled = true\nreconcile_ms = 300\n",
    );
    let cluster_id = a.cluster_id();
    assert_eq!(cluster_id, cleanup.0);

    // Images arrive through the API: a token is needed, and a broken archive is refused.
    let tar = std::fs::read(&archive).unwrap();
    let r = a.api("POST", "/v1/images", &[], &tar, None).unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    let r = write(&a, "POST", "/v1/images", b"not a tar archive");
    assert_eq!(r.status, 400, "{}", r.text());
    let r = write(&a, "POST", "/v1/images", &tar);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains(BUSYBOX), "{}", r.text());

    // Without its secret the app waits, and says for what.
    deploy(&a, "web", &web_spec(2, "hi"));
    converge(&[&a], "tasks waiting for their secret", || {
        let t = tasks(&a, "web");
        (t.len() == 2
            && t.iter().all(|t| {
                t["state"] == "pending" && t["reason"].as_str().unwrap_or("").contains("API_KEY")
            }))
        .then_some(())
    });
    let secret = "s3cret-value-7f1e";
    assert_eq!(
        write(&a, "PUT", "/v1/apps/web/secrets/API_KEY", secret.as_bytes()).status,
        200
    );
    let t = running(&a, "web", 2);
    let ids = containers(&cluster_id, "web", false);
    assert_eq!(ids.len(), 2, "{ids:?}");

    // Each replica is a container with the fixed labels, its env and secret, its limits and
    // no extra privileges; it serves on its own address.
    for task in &t {
        let c = inspect(task["container"].as_str().unwrap());
        let labels = &c["Config"]["Labels"];
        assert_eq!(labels["shoal.app"], "web");
        assert_eq!(labels["shoal.cluster"], cluster_id);
        assert_eq!(labels["shoal.replica"], task["replica"].to_string());
        assert_eq!(labels["shoal.version"], task["version"]);
        let host = &c["HostConfig"];
        assert_eq!(host["Privileged"], false);
        assert_eq!(host["Init"], true);
        assert_eq!(host["Memory"], 64 << 20);
        assert_eq!(host["NanoCpus"], 500_000_000);
        assert!(
            host["SecurityOpt"]
                .to_string()
                .contains("no-new-privileges"),
            "{host}"
        );
        let env = c["Config"]["Env"].to_string();
        assert!(
            env.contains("GREETING=hi") && env.contains("PORT=8080"),
            "{env}"
        );
        let ip = task["ip"].as_str().unwrap();
        let page = converge(&[&a], "the replica's web server", || {
            shoal_e2e::get_at(ip, 8080, "/greeting")
                .ok()
                .filter(|r| r.status == 200)
        });
        assert_eq!(page.text(), format!("hi {secret}\n"));
    }
    // The secret reaches the container, and nowhere else.
    let listing = a.get("/v1/tasks").unwrap().text() + &a.get("/v1/apps/web").unwrap().text();
    assert!(!listing.contains(secret) && !a.log().contains(secret));

    // A killed container is replaced, and the task counts the restart.
    let victim = t[0]["container"].as_str().unwrap().to_string();
    docker(&["kill", &victim]);
    converge(&[&a], "the killed replica to run again", || {
        let t = tasks(&a, "web");
        t.iter()
            .find(|x| x["replica"] == t[0]["replica"])
            .filter(|x| {
                x["state"] == "running"
                    && x["container"] != victim.as_str()
                    && x["restarts"].as_u64() >= Some(1)
                    // SIGKILL
                    && x["exit_code"] == 137
            })
            .map(|_| ())
    });
    converge(&[&a], "the killed container to be removed", || {
        (!containers(&cluster_id, "web", true).contains(&victim)).then_some(())
    });

    // Scale down: one replica goes.
    deploy(&a, "web", &web_spec(1, "hi"));
    converge(&[&a], "one container left", || {
        (containers(&cluster_id, "web", true).len() == 1 && tasks(&a, "web").len() == 1)
            .then_some(())
    });

    // An update replaces the container with one of the new version.
    let before = containers(&cluster_id, "web", true);
    deploy(&a, "web", &web_spec(1, "hello"));
    let t = converge(&[&a], "the updated replica", || {
        let t = tasks(&a, "web");
        let now = containers(&cluster_id, "web", true);
        (t.len() == 1 && t[0]["state"] == "running" && now.len() == 1 && now != before).then_some(t)
    });
    let env = inspect(t[0]["container"].as_str().unwrap())["Config"]["Env"].to_string();
    assert!(env.contains("GREETING=hello"), "{env}");

    // A restarted agent adopts what runs: no new container.
    let adopted = containers(&cluster_id, "web", true);
    a.kill9();
    a.spawn();
    running(&a, "web", 1);
    converge(&[&a], "the restarted agent to report the task", || {
        tasks(&a, "web")
            .first()
            .filter(|t| t["container"] == adopted[0].as_str())
            .map(|_| ())
    });
    assert_eq!(containers(&cluster_id, "web", true), adopted);

    // An image this node lacks: the task says how to fix it.
    let spec = "name = \"ghost\"\n[source]\nimage = \"shoal-e2e/absent:1\"\n";
    deploy(&a, "ghost", spec);
    converge(&[&a], "the ghost task to explain itself", || {
        tasks(&a, "ghost")
            .first()
            .filter(|t| {
                t["state"] == "pending"
                    && t["reason"]
                        .as_str()
                        .unwrap_or("")
                        .contains("POST /v1/images")
            })
            .map(|_| ())
    });

    // A replica that keeps exiting is restarted with a growing delay, its exit code kept.
    let spec = format!("name = \"crash\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"sh\", \"-c\", \"exit 3\"]\n");
    deploy(&a, "crash", &spec);
    converge(&[&a], "the crashing replica's restarts", || {
        tasks(&a, "crash")
            .first()
            .filter(|t| t["restarts"].as_u64() >= Some(3) && t["exit_code"] == 3)
            .map(|_| ())
    });
    assert_eq!(write(&a, "DELETE", "/v1/apps/crash", b"").status, 200);

    // Deleting the app removes its containers and its task records.
    assert_eq!(write(&a, "DELETE", "/v1/apps/web", b"").status, 200);
    converge(&[&a], "web's containers and tasks gone", || {
        (containers(&cluster_id, "web", true).is_empty() && tasks(&a, "web").is_empty())
            .then_some(())
    });
}

#[test]
fn a_node_without_containers_refuses_images_and_says_so_in_its_record() {
    let root = tempfile::tempdir().unwrap();
    let a = Agent::start(root.path(), "n1", &[], "");
    let r = write(&a, "POST", "/v1/images", b"whatever");
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("docker.enabled"), "{}", r.text());
    let node = a.get("/v1/nodes").unwrap().json();
    assert_eq!(node[0]["containers"], false, "{node}");
}

/// Running tasks of `app` on `node`, as `a` sees the cluster.
fn running_on(a: &Agent, app: &str, node: &str) -> usize {
    tasks(a, app)
        .iter()
        .filter(|t| t["node"] == node && t["state"] == "running")
        .count()
}

#[test]
fn replicas_spread_over_nodes_and_move_when_a_node_goes() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let cleanup = Cleanup::for_agents_in(root.path());
    // Both nodes share this machine's Docker: one image load serves both.
    let mut nodes = two_nodes(root.path());
    let cluster_id = nodes[0].cluster_id();
    assert_eq!(cluster_id, cleanup.0);
    let spec = format!(
        "name = \"web\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n[scale]\nreplicas = 2\n"
    );
    deploy(&nodes[0], "web", &spec);

    // Every node computes the same placement: one replica each, seen alike from both.
    for a in &nodes {
        converge(
            &[&nodes[0], &nodes[1]],
            "one running replica per node",
            || (running_on(a, "web", "n1") == 1 && running_on(a, "web", "n2") == 1).then_some(()),
        );
    }

    // n2's machine goes away (agent stopped, its containers gone with it): n1 takes over.
    nodes[1].stop();
    let on_n2 = [
        format!("shoal.cluster={cluster_id}"),
        "shoal.node=n2".into(),
    ];
    for id in labelled(&on_n2, true) {
        docker(&["rm", "-f", &id]);
    }
    converge(&[&nodes[0], &nodes[1]], "both replicas on n1", || {
        (running_on(&nodes[0], "web", "n1") == 2).then_some(())
    });

    // What n2 last reported is still listed, marked with n2's state.
    for t in tasks(&nodes[0], "web") {
        let alive = if t["node"] == "n1" { "alive" } else { "dead" };
        assert_eq!(t["node_state"], alive, "{t}");
    }

    // n2 comes back: running replicas stay where they are, and n2 clears its old records.
    nodes[1].spawn();
    converge(
        &[&nodes[0], &nodes[1]],
        "n2 to clear its stale task records",
        || {
            let t = tasks(&nodes[1], "web");
            (t.iter().all(|t| t["node"] == "n1") && t.len() == 2).then_some(())
        },
    );
    assert_eq!(running_on(&nodes[1], "web", "n1"), 2);
    let n2 = labelled(&on_n2, true);
    assert!(n2.is_empty(), "n2 started containers: {n2:?}");
}

/// A stand-in for the cloud metadata service: 169.254.169.254 on this machine's loopback
/// interface, an HTTP server on port 80 there. Removed when dropped.
struct FakeMetadata {
    server: std::process::Child,
}

impl FakeMetadata {
    fn start(dir: &std::path::Path) -> FakeMetadata {
        let _ = Command::new("ip")
            .args(["addr", "del", "169.254.169.254/32", "dev", "lo"])
            .output();
        run(Command::new("ip").args(["addr", "add", "169.254.169.254/32", "dev", "lo"]));
        std::fs::write(dir.join("user-data"), "#cloud-config\nsecret: yes\n").unwrap();
        let server = Command::new("/usr/bin/python3")
            .args([
                "-m",
                "http.server",
                "80",
                "--bind",
                "169.254.169.254",
                "--directory",
            ])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let md = FakeMetadata { server };
        shoal_e2e::wait_for(CONVERGE, "the fake metadata server", || {
            shoal_e2e::get_at("169.254.169.254", 80, "/user-data")
                .ok()
                .filter(|r| r.status == 200)
        });
        md
    }
}

impl Drop for FakeMetadata {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", "shoalmd0"])
            .output();
    }
}

/// Whether `http://host:port/path` answers 200 to container `id` (busybox nc, 2 s; its wget
/// is not used: the static build crashes resolving).
fn reaches(id: &str, url: &str) -> bool {
    let out = fetch(id, url);
    out.starts_with("HTTP/1.") && out.contains(" 200 ")
}

/// What `GET url` from inside container `id` gets back (busybox nc, 2 s), raw.
fn fetch(id: &str, url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "80"));
    let path = if path.is_empty() { "/" } else { path };
    let script = format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {host} {port}");
    Command::new("docker")
        .args(["exec", id, "sh", "-c", &script])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn iptables_has(chain: &str, rule: &str) -> bool {
    Command::new("iptables")
        .args(["-w", "-C", chain])
        .args(rule.split_whitespace())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn containers_are_tenants() {
    shoal_e2e::netns::require_root();
    let archive = busybox_image();
    let root = tempfile::tempdir().unwrap();
    let md_dir = tempfile::tempdir().unwrap();
    let _md = FakeMetadata::start(md_dir.path());
    let cleanup = Cleanup::for_agents_in(root.path());
    let mut a = Agent::start(
        root.path(),
        "n1",
        &[],
        "[docker]\nenabled = true\nreconcile_ms = 300\n",
    );
    let mark = cleanup.0[..12].to_string();
    let r = write(&a, "POST", "/v1/images", &std::fs::read(&archive).unwrap());
    assert_eq!(r.status, 200, "{}", r.text());
    // The node keeps an app network made ahead of need.
    let spares = || {
        docker(&[
            "network",
            "ls",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=shoal.cluster={}", cleanup.0),
            "--filter",
            "label=shoal.spare",
        ])
        .lines()
        .map(String::from)
        .collect::<Vec<String>>()
    };
    let first_spare = converge(&[&a], "a spare network", || spares().pop());
    // "quiet" sets no limits; "web" serves on 8080 from two replicas.
    deploy(
        &a,
        "quiet",
        &format!("name = \"quiet\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"sleep\", \"3600\"]\n"),
    );
    deploy(
        &a,
        "web",
        &format!(
            "name = \"web\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"sh\", \"-c\", \"mkdir -p /www && echo web-of-$SHOAL_TEST_MARK > /www/index.html && exec httpd -f -p 8080 -h /www\"]\nenv = {{ SHOAL_TEST_MARK = \"{mark}\" }}\nport = 8080\n[scale]\nreplicas = 2\n"
        ),
    );
    let quiet = running(&a, "quiet", 1);
    let web = running(&a, "web", 2);
    let q = quiet[0]["container"].as_str().unwrap().to_string();
    let w0 = web[0]["container"].as_str().unwrap().to_string();
    let w1_ip = web[1]["ip"].as_str().unwrap().to_string();
    let w0_ip = web[0]["ip"].as_str().unwrap().to_string();

    // The controls: the node reaches the metadata server and the app; an app's replicas
    // reach each other.
    assert_eq!(
        shoal_e2e::get_at("169.254.169.254", 80, "/user-data")
            .unwrap()
            .status,
        200
    );
    let page = shoal_e2e::get_at(&w0_ip, 8080, "/").unwrap();
    assert!(
        page.status == 200 && page.text().contains(&mark),
        "{}",
        page.text()
    );
    assert!(
        reaches(&w0, &format!("http://{w1_ip}:8080/")),
        "web's replicas are cut off from each other"
    );

    // From inside another app: no metadata, no agent ports, no other app.
    let info = inspect(&q);
    let net = info["HostConfig"]["NetworkMode"]
        .as_str()
        .unwrap()
        .to_string();
    // The first app took the spare; the second has a network of its own; both are n1's.
    let net_info = |n: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&docker(&["network", "inspect", n])).unwrap()[0]
            .clone()
    };
    assert_eq!(net_info(&net)["Id"], first_spare.as_str());
    let web_net = inspect(&w0)["HostConfig"]["NetworkMode"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(web_net, net);
    for n in [&net, &web_net] {
        let labels = &net_info(n)["Labels"];
        assert_eq!(labels["shoal.node"], "n1", "{n}: {labels}");
        assert_eq!(labels["shoal.cluster"], cleanup.0.as_str(), "{n}: {labels}");
    }
    let gateway = info["NetworkSettings"]["Networks"][&net]["Gateway"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !reaches(&q, "http://169.254.169.254/user-data"),
        "the metadata address answered a container"
    );
    // A port of the node on every address (as the agent's are on a machine): it answers the
    // node at the bridge's address, not the container.
    let port = shoal_e2e::free_port();
    let mut node_port = Command::new("/usr/bin/python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "0.0.0.0",
            "--directory",
        ])
        .arg(md_dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    shoal_e2e::wait_for(CONVERGE, "the node's port", || {
        shoal_e2e::get_at(&gateway, port, "/user-data")
            .ok()
            .filter(|r| r.status == 200)
    });
    let from_container = reaches(&q, &format!("http://{gateway}:{port}/user-data"));
    let _ = node_port.kill();
    let _ = node_port.wait();
    assert!(!from_container, "a port of the node answered a container");
    // Whatever answers there, it must not be the other app (its page names this test's
    // cluster); the networks are shown when it is.
    let got = fetch(&q, &format!("http://{w0_ip}:8080/"));
    assert!(
        !got.contains(&mark),
        "one app reached another's replica: {got:?}\nnetworks: {}",
        docker(&["network", "ls", "--format", "{{.Name}} {{.ID}}"])
    );

    // Unprivileged and limited by default.
    let host = &info["HostConfig"];
    assert_eq!(host["CapDrop"], serde_json::json!(["ALL"]));
    let added: Vec<&str> = host["CapAdd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().trim_start_matches("CAP_"))
        .collect();
    assert!(
        !added.contains(&"NET_RAW") && !added.contains(&"SYS_ADMIN") && !added.contains(&"MKNOD"),
        "{added:?}"
    );
    assert_eq!(host["Memory"], 512 << 20, "no default memory limit");

    // The rules come back when something removes them.
    let rule = "-d 169.254.169.254/32 -j DROP";
    assert!(iptables_has("DOCKER-USER", rule));
    run(Command::new("iptables")
        .args(["-w", "-D", "DOCKER-USER"])
        .args(rule.split_whitespace()));
    run(Command::new("iptables").args(["-w", "-F", "SHOAL-CONTAINERS"]));
    converge(&[&a], "the firewall rules re-asserted", || {
        (iptables_has("DOCKER-USER", rule) && iptables_has("SHOAL-CONTAINERS", "-j DROP"))
            .then_some(())
    });
    assert!(!reaches(&q, "http://169.254.169.254/user-data"));
    // The same over IPv6 (EC2 serves metadata at fd00:ec2::254 too).
    let v6 = Command::new("ip6tables")
        .args(["-w", "-S", "SHOAL-CONTAINERS"])
        .output()
        .unwrap();
    let v6 = String::from_utf8_lossy(&v6.stdout);
    assert!(
        v6.contains("-d fd00:ec2::254/128 -j DROP") && v6.contains("-A SHOAL-CONTAINERS -j DROP"),
        "{v6}"
    );
    assert!(Command::new("ip6tables")
        .args(["-w", "-C", "INPUT", "-i", "br-+", "-j", "SHOAL-CONTAINERS"])
        .status()
        .unwrap()
        .success());

    // A restarted agent knows which network serves which app: a new version of "quiet"
    // joins its replica's network, and a spare is kept beside it.
    a.kill9();
    a.spawn();
    deploy(
        &a,
        "quiet",
        &format!("name = \"quiet\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"sleep\", \"3601\"]\n"),
    );
    let quiet2 = converge(&[&a], "quiet's new version", || {
        tasks(&a, "quiet")
            .first()
            .filter(|t| t["state"] == "running")
            .and_then(|t| t["container"].as_str().map(String::from))
            .filter(|c| *c != q)
    });
    assert_eq!(inspect(&quiet2)["HostConfig"]["NetworkMode"], net.as_str());
    // (Labels stay: the networks the apps took are still labelled spares.)
    converge(&[&a], "one unused spare beside the apps' networks", || {
        let unused: Vec<String> = spares()
            .into_iter()
            .filter(|n| {
                net_info(n)["Containers"]
                    .as_object()
                    .is_none_or(|c| c.is_empty())
            })
            .collect();
        (unused.len() == 1).then_some(())
    });

    // An app that goes takes its network with it.
    let r = a.delete_app("quiet").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    converge(&[&a], "quiet's network removed", || {
        let nets = docker(&["network", "ls", "--format", "{{.Name}}"]);
        (!nets.lines().any(|n| n == net)).then_some(())
    });
}

/// A `docker save` archive of another image (busybox plus one file) that names itself `as_name`,
/// made without touching `as_name` on this Docker.
fn impostor_archive(dir: &std::path::Path, as_name: &str) -> std::path::PathBuf {
    let ctx = dir.join("impostor");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {BUSYBOX}\nRUN echo impostor > /impostor\n"),
    )
    .unwrap();
    docker(&[
        "build",
        "-q",
        "-t",
        "shoal-e2e/impostor:1",
        ctx.to_str().unwrap(),
    ]);
    let saved = dir.join("impostor.tar");
    docker(&[
        "save",
        "-o",
        saved.to_str().unwrap(),
        "shoal-e2e/impostor:1",
    ]);
    let out = dir.join("renamed.tar");
    // Rename it in the archive's manifest and repositories files.
    let script = r#"
import json, sys, tarfile, io
src, dst, name = sys.argv[1:4]
repo, tag = name.rsplit(':', 1)
with tarfile.open(src) as t, tarfile.open(dst, 'w') as o:
    for m in t.getmembers():
        data = t.extractfile(m).read() if m.isfile() else None
        if m.name == 'manifest.json':
            man = json.loads(data)
            for e in man:
                e['RepoTags'] = [name]
            data = json.dumps(man).encode()
        elif m.name == 'repositories':
            old = json.loads(data)
            ids = [v for r in old.values() for v in r.values()]
            data = json.dumps({repo: {tag: ids[0]}}).encode()
        if data is not None:
            m.size = len(data)
            o.addfile(m, io.BytesIO(data))
        else:
            o.addfile(m)
"#;
    run(Command::new("/usr/bin/python3")
        .args(["-c", script])
        .args([saved.as_os_str(), out.as_os_str()])
        .arg(as_name));
    out
}

#[test]
fn image_uploads_are_capped_and_cannot_retag_what_runs() {
    shoal_e2e::netns::require_root();
    let archive = busybox_image();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let tar = std::fs::read(&archive).unwrap();
    let a = Agent::start(
        root.path(),
        "n1",
        &[],
        &format!(
            "[docker]\nenabled = true\nreconcile_ms = 300\nmax_image_bytes = {}\n",
            tar.len() + 64 * 1024
        ),
    );
    // Over the cap (curl declares the size): refused before a byte is loaded.
    let big = [tar.clone(), vec![0u8; 128 * 1024]].concat();
    let r = write(&a, "POST", "/v1/images", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    let r = write(&a, "POST", "/v1/images", &tar);
    assert_eq!(r.status, 200, "{}", r.text());
    deploy(
        &a,
        "quiet",
        &format!("name = \"quiet\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"sleep\", \"3600\"]\n"),
    );
    let t = running(&a, "quiet", 1);
    let before = inspect(t[0]["container"].as_str().unwrap())["Image"].clone();
    let id_before = docker(&["image", "inspect", "-f", "{{.Id}}", BUSYBOX]);

    // Another image under the running name: refused, the name stays where it was.
    let impostor = std::fs::read(impostor_archive(root.path(), BUSYBOX)).unwrap();
    let r = write(&a, "POST", "/v1/images", &impostor);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["in_use"][0]["app"], "quiet", "{}", r.text());
    assert_eq!(
        docker(&["image", "inspect", "-f", "{{.Id}}", BUSYBOX]),
        id_before
    );
    // The same image again is no retag: accepted.
    let r = write(&a, "POST", "/v1/images", &tar);
    assert_eq!(r.status, 200, "{}", r.text());
    let t = running(&a, "quiet", 1);
    assert_eq!(
        inspect(t[0]["container"].as_str().unwrap())["Image"],
        before
    );
}
