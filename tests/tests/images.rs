//! Images between nodes without a registry, each node on its own Docker engine: an image one
//! node holds runs on a node that lacks it (fetched over the mutual-TLS API, kept only as the
//! id asked for), the spec is pinned to that id when it is deployed, nodes that hold
//! different images under one name make a deploy a conflict, and the fetched image is removed
//! once no version of any app needs it while the one an operator loaded stays.

use shoal_e2e::docker::*;
use shoal_e2e::{busybox_image, Agent, AgentBuilder, BUSYBOX};

fn app(name: &str) -> String {
    format!(
        "name = \"{name}\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nport = 8080\n[scale]\nconstraints = [\"engine=two\"]\n[resources]\nmemory = \"16Mi\"\n"
    )
}

fn host_image_id() -> String {
    docker(&["image", "inspect", "--format", "{{.Id}}", BUSYBOX])
        .trim()
        .to_string()
}

#[test]
fn an_image_one_node_holds_runs_on_another_and_goes_when_no_app_needs_it() {
    shoal_e2e::netns::require_root();
    let root = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup::for_agents_in(root.path());
    let engine = Engine::start(1);
    let mut n1 = AgentBuilder::new(root.path(), "n1")
        .extra("[docker]\nenabled = true\nreconcile_ms = 300\n")
        .build();
    let mut n2 = AgentBuilder::new(root.path(), "n2")
        .extra(&format!(
            "labels = {{ engine = \"two\" }}\n{}image_grace_ms = 1000\n",
            engine.agent_settings()
        ))
        .build();
    let ports = [n1.api_port, n2.api_port];
    for a in [&mut n1, &mut n2] {
        a.set_peers(&ports);
        a.spawn();
    }
    let both: [&Agent; 2] = [&n1, &n2];
    converge(&both, "two members and their records", || {
        both.iter()
            .all(|a| a.alive_members() == 1 && a.list("/v1/nodes").len() == 2)
            .then_some(())
    });
    let tar = std::fs::read(busybox_image()).unwrap();
    assert_eq!(write(&n1, "POST", "/v1/images", &tar).status, 200);
    let id = host_image_id();
    assert!(
        engine.image_id(&id).is_none(),
        "the second engine starts empty"
    );

    // n2's engine holds another image under the same name: which one is meant is unclear.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("f"), "not busybox").unwrap();
    let other_tar = other.path().join("other.tar");
    shoal_e2e::run(
        std::process::Command::new("tar")
            .arg("-C")
            .arg(other.path())
            .arg("-cf")
            .arg(&other_tar)
            .arg("f"),
    );
    engine.docker(&["import", other_tar.to_str().unwrap(), BUSYBOX]);
    let holds = |node: &str, tag: &str| -> Vec<String> {
        n1.list("/v1/nodes")
            .into_iter()
            .filter(|n| n["id"] == node)
            .flat_map(|n| n["images"].as_array().cloned().unwrap_or_default())
            .filter(|i| {
                i["tags"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t == tag))
            })
            .filter_map(|i| i["id"].as_str().map(String::from))
            .collect()
    };
    converge(&both, "n2's record of the other image", || {
        holds("n2", BUSYBOX).iter().any(|i| *i != id).then_some(())
    });
    let r = n1.put_app("far", &app("far")).unwrap();
    assert_eq!(r.status, 409, "{}", r.text());
    let conflict = r.text();
    assert!(
        conflict.contains("nodes hold different images"),
        "{conflict}"
    );
    assert!(n1.apps().is_empty(), "nothing was written: {:?}", n1.apps());
    engine.docker(&["rmi", BUSYBOX]);

    // Deployed once n2's record says it no longer holds it: pinned to the one id.
    converge(&both, "n2's record without it", || {
        holds("n2", BUSYBOX).is_empty().then_some(())
    });
    assert_eq!(holds("n1", BUSYBOX), vec![id.clone()]);
    let r = n1.put_app("far", &app("far")).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let pinned = r.json()["image"].as_str().unwrap_or_default().to_string();
    assert_eq!(pinned, id, "pinned to the image id");
    let t = running(&n1, "far", 1);
    assert_eq!(t[0]["node"], "n2");
    assert_eq!(engine.image_id(&id).as_deref(), Some(id.as_str()));
    assert!(
        n2.log().contains("image fetched from a peer"),
        "{}",
        n2.log()
    );
    let image_of_container = engine.docker(&["ps", "--no-trunc", "--format", "{{.Image}}"]);
    assert!(image_of_container.contains(&id), "{image_of_container}");

    // Gone with the app: the image n2 fetched is removed; the one loaded on n1 stays.
    assert_eq!(n1.delete_app("far").unwrap().status, 200);
    converge(&both, "the fetched image removed from n2's engine", || {
        engine.image_id(&id).is_none().then_some(())
    });
    assert_eq!(host_image_id(), id, "the loaded image stays on n1");
    drop(engine);
}
