//! The OS image under QEMU (TCG), booted by `qemu/run` exactly as a user would: the console
//! shows shoal-init's stages, `/v1/status` answers through the forwarded port with the boot
//! report, the ACPI power button shuts the node down cleanly, and a second boot from the same
//! data disk is the same node with the same state (its data disk checked clean). An app whose
//! image is in a registry on the host is pulled and ready; an image loaded through the API
//! runs as a container inside, and runs again after the reboot.
//!
//! The same image boots from `shoal.raw` under UEFI (OVMF, systemd-boot, a unified kernel
//! image) with its state on the disk's own data partition, and `qemu/cluster 2` forms a
//! cluster over mDNS with no peer list.
//!
//! Slow (it builds the image when build/image/ lacks it, then boots under emulation); later
//! issues extend `Node` (deploy an app, reach it through the forwarded ingress port).

use serde_json::Value;
use shoal_e2e::registry::Registry;
use shoal_e2e::{busybox_image, free_port, get, https, netns::require_root, wait_for, BUSYBOX};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(600);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Node {
    name: String,
    ports: [u16; 4],
    repo: PathBuf,
    /// `direct` (kernel + initramfs, shoal.raw attached) or `uefi` (OVMF boots shoal.raw).
    mode: &'static str,
    /// A NoCloud seed of its own (`SHOAL_QEMU_SEED`), if not the bundle's.
    seed: Option<PathBuf>,
}

impl Node {
    fn new(mode: &'static str) -> Node {
        require_root();
        Node {
            name: format!("e2e-{mode}-{}", std::process::id()),
            ports: [free_port(), free_port(), free_port(), free_port()],
            repo: repo(),
            mode,
            seed: None,
        }
    }

    /// Boots with the bundle's user-data plus `extra` (top-level cloud-config keys).
    fn with_user_data(mut self, extra: &str) -> Node {
        let st = Command::new(self.repo.join("qemu/run"))
            .arg("bundle")
            .status()
            .expect("qemu/run bundle");
        assert!(st.success(), "qemu/run bundle failed");
        let bundle = self.repo.join("build/qemu/bundle/user-data-signer.yaml");
        let ud = std::fs::read_to_string(&bundle).unwrap();
        let dir = self
            .repo
            .join("build/qemu")
            .join(format!("{}.seed", self.name));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("user-data.yaml"), format!("{ud}\n{extra}")).unwrap();
        self.seed = Some(dir);
        self
    }

    fn dir(&self) -> PathBuf {
        self.repo.join("build/qemu").join(&self.name)
    }

    /// `qemu/run` in the background; waits for `/healthz` through the forwarded port.
    fn boot(&self, fresh: bool) -> Value {
        let ports = self.ports.map(|p| p.to_string()).join(" ");
        let st = Command::new(self.repo.join("qemu/run"))
            .env("SHOAL_QEMU_NODE", &self.name)
            .env("SHOAL_QEMU_PORTS", ports)
            .env("SHOAL_QEMU_DETACH", "1")
            .env("SHOAL_QEMU_BOOT", self.mode)
            .env("SHOAL_QEMU_FRESH", if fresh { "1" } else { "0" })
            .envs(self.seed.iter().map(|d| ("SHOAL_QEMU_SEED", d)))
            .status()
            .expect("qemu/run");
        assert!(st.success(), "qemu/run failed");
        wait_for(
            BOOT,
            "the agent's status through the forwarded port",
            || {
                // A VM that died (a kernel panic, say) will not answer: say so now.
                assert!(
                    self.running(),
                    "QEMU exited during boot:\n{}",
                    self.console()
                );
                get(self.ports[0], "/v1/status")
                    .ok()
                    .filter(|r| r.status == 200)
                    .map(|r| r.json())
                    .filter(|v| !v["boot"].is_null())
            },
        )
    }

    fn running(&self) -> bool {
        std::fs::read_to_string(self.dir().join("qemu.pid"))
            .ok()
            .is_some_and(|pid| Path::new(&format!("/proc/{}", pid.trim())).exists())
    }

    fn stop(&self) {
        let st = Command::new(self.repo.join("qemu/run"))
            .args(["stop", &self.name])
            .status()
            .unwrap();
        assert!(
            st.success(),
            "the node did not power off: {}",
            self.console()
        );
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir().join("console.log")).unwrap_or_default()
    }

    fn api(&self, method: &str, path: &str, body: &[u8]) -> shoal_e2e::Resp {
        let bundle = self.repo.join("build/qemu/bundle");
        let token = std::fs::read_to_string(bundle.join("admin.token")).unwrap();
        let auth = format!("Bearer {}", token.trim());
        https(
            method,
            self.ports[1],
            path,
            &[("Authorization", &auth)],
            body,
            &bundle.join("ca.crt"),
            None,
        )
        .unwrap()
    }
}

impl Node {
    /// Writes app `name` through the forwarded API port.
    fn put_app(&self, name: &str) {
        let spec = format!("name = \"{name}\"\n[source]\nimage = \"busybox\"\n");
        let r = self.api("PUT", &format!("/v1/apps/{name}"), spec.as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Loads the busybox test image through the forwarded API port (there is no registry),
    /// deploys app `name` running its web server, and waits until the node reports the
    /// container running; returns the container's id.
    fn run_app(&self, name: &str) -> String {
        let tar = std::fs::read(busybox_image()).unwrap();
        let r = self.api("POST", "/v1/images", &tar);
        assert_eq!(r.status, 200, "{}", r.text());
        let spec = format!(
            "name = \"{name}\"\n[source]\nimage = \"{BUSYBOX}\"\n[run]\ncommand = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nport = 8080\n[resources]\nmemory = \"32Mi\"\n"
        );
        let r = self.api("PUT", &format!("/v1/apps/{name}"), spec.as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        self.task_running(name, None)
    }

    /// From inside a second app's container on the node: the metadata address, the agent's
    /// ports and `web`'s container do not answer, while the node's ingress port does. The probe's exit code carries what it found
    /// (100 + one bit per thing that answered when it must not), read from its task record.
    fn containers_are_tenants(&self, web: &str) {
        let tasks = get(self.ports[0], "/v1/tasks").unwrap().json();
        let web_ip = tasks
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["app"] == web)
            .and_then(|t| t["ip"].as_str())
            .unwrap()
            .to_string();
        let script = format!(
            "gw=$(ip route | awk '/^default/ {{print $3}}'); code=0; \
             answers() {{ out=$(nc -w 3 \"$1\" \"$2\" </dev/null 2>&1); [ $? -eq 0 ] || echo \"$out\" | grep -q refused; }}; \
             answers 169.254.169.254 80 && code=$((code|1)); \
             answers $gw 7070 && code=$((code|2)); \
             answers $gw 7443 && code=$((code|4)); \
             answers {web_ip} 8080 && code=$((code|8)); \
             answers $gw 80 || code=$((code|16)); \
             exit $((code+100))"
        );
        let spec = serde_json::json!({
            "name": "probe",
            "source": { "image": BUSYBOX },
            "run": { "command": ["sh", "-c", script] },
            "resources": { "memory": "32Mi" },
        });
        let r = self.api("PUT", "/v1/apps/probe", spec.to_string().as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        let code = wait_for(BOOT, "the probe's exit code", || {
            let tasks = get(self.ports[0], "/v1/tasks").ok()?.json();
            let t = tasks
                .as_array()?
                .iter()
                .find(|t| t["app"] == "probe")?
                .clone();
            t["exit_code"].as_i64()
        });
        assert_eq!(
            code, 100,
            "from a container: 1 metadata, 2 :7070, 4 :7443, 8 another app answered; 16 the ingress port did not"
        );
        let r = self.api("DELETE", "/v1/apps/probe", b"");
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Waits until app `name`'s task runs in a container other than `not`; its id.
    fn task_running(&self, name: &str, not: Option<&str>) -> String {
        let end = std::time::Instant::now() + BOOT;
        loop {
            let found = (|| {
                let tasks = get(self.ports[0], "/v1/tasks").ok()?.json();
                let t = tasks.as_array()?.iter().find(|t| t["app"] == name)?.clone();
                let id = t["container"].as_str()?.to_string();
                (t["state"] == "running" && t["ip"].is_string() && Some(id.as_str()) != not)
                    .then_some(id)
            })();
            if let Some(id) = found {
                return id;
            }
            if std::time::Instant::now() > end {
                // What the node says and logged, to tell why.
                let tasks = get(self.ports[0], "/v1/tasks").map(|r| r.text());
                let console = self.console();
                let tail: Vec<&str> = console.lines().rev().take(80).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "timed out after {BOOT:?} waiting for {name}'s container running\ntasks: {tasks:?}\nconsole (last lines):\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Boots the powered-off node from the same disks: the same node, its app still there,
    /// the data disk found by its label and checked clean.
    fn boot_again_keeps(&self, id: &str, app: &str) {
        let status = self.boot(false);
        assert_eq!(status["node_id"], id);
        let d = stage(&status, "data-disk")["detail"].to_string();
        assert!(
            d.contains("fsck: clean") && !d.contains("formatting"),
            "{d}"
        );
        // The store's own file system, found and checked again.
        assert!(
            d.contains("store fsck: clean") && d.contains("mounted at /var/lib/shoal"),
            "{d}"
        );
        let apps = get(self.ports[0], "/v1/apps").unwrap().text();
        assert!(apps.contains(&format!("\"{app}\"")), "{apps}");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            say_what_it_said("the node", &self.console());
        }
        if let Ok(pid) = std::fs::read_to_string(self.dir().join("qemu.pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        let _ = std::fs::remove_dir_all(self.dir());
        if let Some(seed) = &self.seed {
            let _ = std::fs::remove_dir_all(seed);
        }
    }
}

/// On a failed test, what a node's init and agent said: CI shows only the test's output
/// (dockerd and containerd are loud and rarely the story).
fn say_what_it_said(who: &str, console: &str) {
    let lines: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("[agent]") || l.starts_with("shoal-init"))
        .collect();
    let from = lines.len().saturating_sub(150);
    eprintln!(
        "---- {who}: init and agent, last {} lines ----",
        lines.len() - from
    );
    for l in &lines[from..] {
        eprintln!("{l}");
    }
}

fn stage(status: &Value, name: &str) -> Value {
    status["boot"]["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

/// The root is slot A of shoal.raw, squashfs, read-only, mounted by the boot initramfs.
fn assert_root_is_slot_a(status: &Value) {
    let initrd = &status["boot"]["initrd"];
    assert_eq!(initrd["root"], "PARTLABEL=shoal-a", "{initrd}");
    assert_eq!(initrd["device"], "/dev/vda2", "{initrd}");
    assert_eq!(initrd["fstype"], "squashfs", "{initrd}");
    let mounts = stage(status, "mounts")["detail"].to_string();
    assert!(
        mounts.contains("root /dev/vda2 squashfs ro"),
        "the root is not slot A read-only: {mounts}"
    );
}

#[test]
fn the_image_boots_serves_its_status_powers_off_cleanly_and_keeps_its_identity() {
    // A registry on the host, which the guest reaches through its gateway (10.0.2.2 is the
    // host's loopback under QEMU's user networking); the engine is told to speak plain HTTP
    // to it through user-data (write_files into /etc/docker, kept on the data disk).
    let registry = Registry::start("127.0.0.1", None);
    let pushed = registry.push_busybox("qemu", None);
    let guest_addr = registry.addr.replacen("127.0.0.1", "10.0.2.2", 1);
    let node = Node::new("direct").with_user_data(&format!(
        "write_files:\n  - path: /etc/docker/daemon.json\n    content: '{{\"insecure-registries\": [\"{guest_addr}\"]}}'\n"
    ));
    let status = node.boot(true);
    assert_root_is_slot_a(&status);

    // shoal-init's stages on the console and in the report the agent serves.
    let console = node.console();
    for s in [
        "mounts",
        "modules",
        "data-disk",
        "metadata-local",
        "network",
        "user-data",
        "services",
    ] {
        assert!(
            console.contains(&format!("shoal-init: stage {s}: ")),
            "no stage {s} on the console"
        );
    }
    let d = stage(&status, "data-disk")["detail"].to_string();
    assert!(d.contains("formatting blank disk"), "{d}");
    // The store gets a file system of its own, reserved on the data disk.
    assert!(
        d.contains("made the store's file system") && d.contains("mounted at /var/lib/shoal"),
        "{d}"
    );
    assert!(status["boot"]["metadata"]["source"]
        .as_str()
        .unwrap_or("")
        .starts_with("nocloud"));
    assert_eq!(status["boot"]["network"]["interfaces"][0]["method"], "dhcp");
    let id = status["node_id"].as_str().unwrap().to_string();

    // dockerd comes up inside (on the data disk).
    wait_for(BOOT, "dockerd's API", || {
        node.console()
            .contains("API listen on /var/run/docker.sock")
            .then_some(())
    });

    // An app whose image only the host's registry holds: pinned to the registry's digest,
    // pulled by the node's engine through the gateway, ready by its probe.
    let image = pushed.replacen(&registry.addr, &guest_addr, 1);
    let spec = format!(
        "name = \"pulled\"\n[source]\nimage = \"{image}\"\n[run]\ncommand = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nport = 8080\n[health]\ntcp = 8080\ninterval = \"1s\"\n[resources]\nmemory = \"32Mi\"\n"
    );
    let r = node.api("PUT", "/v1/apps/pulled", spec.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("@sha256:"),
        "pinned by digest: {}",
        r.text()
    );
    node.task_running("pulled", None);
    wait_for(BOOT, "pulled ready", || {
        let tasks = get(node.ports[0], "/v1/tasks").ok()?.json();
        tasks
            .as_array()?
            .iter()
            .any(|t| t["app"] == "pulled" && t["ready"] == true)
            .then_some(())
    });
    // And it answers through the node's ingress, on the port qemu/run forwards to the
    // guest's :80, by its name under the default domain.
    let url = format!("http://127.0.0.1:{}/", node.ports[2]);
    let page = wait_for(BOOT, "pulled through the ingress", || {
        shoal_e2e::curl(
            None,
            "GET",
            &url,
            &[("Host", "pulled.localhost")],
            b"",
            None,
            None,
        )
        .ok()
        .filter(|r| r.status == 200)
    });
    assert!(
        page.text().contains("hello from busybox"),
        "{}",
        page.text()
    );
    let r = node.api("DELETE", "/v1/apps/pulled", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    drop(registry);

    // A container runs in it: an image loaded and an app deployed through the forwarded API
    // port, its replica reported running by the node.
    let first = node.run_app("web");
    node.containers_are_tenants("web");

    // ACPI power button: services stop in order, file systems synced, power off.
    node.stop();
    let console = node.console();
    assert!(console.contains("shoal-init: power button pressed"));
    assert!(
        console.contains("shoal-init: service agent: stopped (exited with status 0)"),
        "{console}"
    );
    assert!(console.contains("services stopped, file systems synced"));
    assert!(!console.contains("did not stop in time"));

    // Second boot from the same disk: same node, same state, disk clean.
    node.boot_again_keeps(&id, "web");
    // Its container stopped with the node; the executor starts the replica again.
    node.task_running("web", Some(&first));
    node.stop();
}

#[test]
fn shoal_raw_boots_under_uefi_with_state_on_its_data_partition() {
    let node = Node::new("uefi");
    let status = node.boot(true);
    let console = node.console();
    // OVMF's boot manager started systemd-boot from the disk, which started slot A's UKI.
    assert!(
        console.contains("BdsDxe: loading Boot"),
        "no UEFI boot:\n{console}"
    );
    assert!(
        console.contains("initrd: root PARTLABEL=shoal-a"),
        "{console}"
    );
    assert_root_is_slot_a(&status);
    // The command line is the one inside the unified kernel image.
    assert!(
        console.contains("Kernel command line: console=tty0 console=ttyS0,115200 panic=30 shoal.root=PARTLABEL=shoal-a"),
        "{console}"
    );
    // No separate data disk: the disk's own blank shoal-data partition became /var.
    let d = stage(&status, "data-disk")["detail"].to_string();
    assert!(d.contains("formatting blank partition /dev/vda4"), "{d}");
    // The disk (8 GiB) is larger than the image (2.6 GiB): the data partition took the rest.
    assert!(
        d.contains("grew /dev/vda4 by 5502 MiB to the end of /dev/vda"),
        "{d}"
    );
    node.put_app("uefi");
    let id = status["node_id"].as_str().unwrap().to_string();
    node.stop();

    // Booted again from the same disk: the partition is found by its label and kept.
    node.boot_again_keeps(&id, "uefi");
    node.stop();
}

/// `qemu/cluster N` and `qemu/cluster stop`; the nodes are c1..cN with fixed ports.
struct Cluster {
    repo: PathBuf,
    n: usize,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        require_root();
        let repo = repo();
        let c = Cluster { repo, n };
        let st = Command::new(c.repo.join("qemu/cluster"))
            .arg(n.to_string())
            .env("SHOAL_QEMU_FRESH", "1")
            .status()
            .unwrap();
        assert!(st.success(), "qemu/cluster {n} failed");
        c
    }

    fn status_port(i: usize) -> u16 {
        7100 + 10 * i as u16
    }

    fn console(&self, i: usize) -> String {
        std::fs::read_to_string(self.repo.join(format!("build/qemu/c{i}/console.log")))
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 1..=self.n {
                say_what_it_said(&format!("c{i}"), &self.console(i));
            }
        }
        let _ = Command::new(self.repo.join("qemu/cluster"))
            .arg("stop")
            .status();
        for i in 1..=self.n {
            let dir = self.repo.join(format!("build/qemu/c{i}"));
            if let Ok(pid) = std::fs::read_to_string(dir.join("qemu.pid")) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
    }
}

#[test]
fn two_nodes_on_one_lan_form_a_cluster_over_mdns() {
    let cluster = Cluster::start(2);
    for i in 1..=2 {
        wait_for(BOOT, "every node sees two alive members", || {
            let nodes: Value = get(Cluster::status_port(i), "/v1/nodes")
                .ok()
                .filter(|r| r.status == 200)?
                .json();
            let alive = nodes
                .as_array()?
                .iter()
                .filter(|n| n["state"] == "alive")
                .count();
            (alive == 2).then_some(())
        });
    }
    // They found each other over mDNS on the LAN: no peer list was given, and each
    // advertises its LAN address.
    let status: Value = get(Cluster::status_port(1), "/v1/status").unwrap().json();
    assert!(
        status["boot"].to_string().contains("10.77.0.11"),
        "{status}"
    );
    for (i, other) in [(1, "10.77.0.12"), (2, "10.77.0.11")] {
        let log = cluster.console(i);
        assert!(
            log.contains("member up member=node-") && log.contains(&format!("addr={other}:7443")),
            "c{i} did not see its peer on the LAN:\n{log}"
        );
        assert!(log.contains("mDNS: advertising"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
    let st = Command::new(cluster.repo.join("qemu/cluster"))
        .arg("stop")
        .status()
        .unwrap();
    assert!(st.success());
    for i in 1..=2 {
        assert!(cluster
            .console(i)
            .contains("services stopped, file systems synced"));
    }
}
