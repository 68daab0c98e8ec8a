//! shoal-init as PID 1 of new PID and mount namespaces (`unshare`), in test mode with a
//! scratch root and a table of shell-script services: it mounts what it should, starts services
//! in order once their dependency is ready, restarts a crashing one with backoff, reaps orphaned
//! grandchildren, and on SIGTERM stops services in reverse order and leaves the namespace the
//! way reboot(2) does there (the namespace's init is killed by SIGHUP).

use shoal_e2e::pid1::Loop;
use shoal_e2e::{init_bin, netns::require_root, wait_for};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

const SERVICES: &str = r#"
[[service]]
name = "base"
# Leaves two orphans behind that exit soon: init must reap them.
command = ["/bin/sh", "-c", "echo start-base >> $SHOAL_INIT_ROOT/var/order; echo hello from base; (sleep 0.3 &); (sh -c 'sleep 0.5 & exit 0'); touch $SHOAL_INIT_ROOT/run/base.ready; trap 'echo stop-base >> $SHOAL_INIT_ROOT/var/order; exit 0' TERM; while :; do sleep 0.05; done"]
ready = "/run/base.ready"

[[service]]
name = "late"
after = "base"
command = ["/bin/sh", "-c", "echo start-late >> $SHOAL_INIT_ROOT/var/order; trap 'echo stop-late >> $SHOAL_INIT_ROOT/var/order; exit 0' TERM; while :; do sleep 0.05; done"]

[[service]]
name = "plain"
after = "base"
# No shell and no trap: it stops on SIGTERM only if it inherited no blocked signals.
command = ["/bin/sleep", "1000"]

[[service]]
name = "crashy"
after = "base"
command = ["/bin/sh", "-c", "echo crashing; exit 3"]
"#;

/// shoal-init over a scratch root of its own, with its console kept.
struct Pid1 {
    p: shoal_e2e::pid1::Pid1,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Pid1 {
    fn start() -> Pid1 {
        Pid1::start_with(None, SERVICES, &[])
    }

    /// shoal-init in new PID and mount namespaces, inside network namespace `netns` if given.
    fn start_with(netns: Option<&str>, services: &str, env: &[(&str, &str)]) -> Pid1 {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("var")).unwrap();
        let table = dir.path().join("services.toml");
        std::fs::write(&table, services).unwrap();
        let console = dir.path().join("console.log");
        let p =
            shoal_e2e::pid1::Pid1::spawn(&init_bin(), netns, &root, &table, env, Some(&console));
        Pid1 { p, root, _dir: dir }
    }

    fn pid(&self) -> u32 {
        self.p.pid()
    }

    fn inside(&self, p: &str) -> PathBuf {
        self.p.inside(p)
    }

    fn report(&self) -> serde_json::Value {
        self.p.report()
    }

    fn service(&self, name: &str) -> serde_json::Value {
        self.report()["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == name).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("console.log")).unwrap_or_default()
    }
}

/// Children of `pid` that are zombies.
fn zombie_children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .filter(|c| {
            std::fs::read_to_string(format!("/proc/{c}/status")).is_ok_and(|s| {
                s.lines()
                    .any(|l| l.starts_with("State:") && l.contains('Z'))
            })
        })
        .collect()
}

#[test]
fn init_mounts_supervises_reaps_and_shuts_down_in_order() {
    let mut init = Pid1::start();
    let pid = init.pid();

    // Mounts, seen in its own mount namespace.
    let root = init.root.display().to_string();
    let cgroup = format!("{root}/sys/fs/cgroup ");
    let mountinfo = wait_for(T, "the mounts", || {
        let m = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
        m.contains(&cgroup).then_some(m)
    });
    for (target, fstype) in [
        ("proc", "proc"),
        ("sys", "sysfs"),
        ("dev", "devtmpfs"),
        ("dev/pts", "devpts"),
        ("dev/shm", "tmpfs"),
        ("run", "tmpfs"),
        ("tmp", "tmpfs"),
        ("sys/fs/cgroup", "cgroup2"),
    ] {
        let line = format!("{root}/{target} ");
        assert!(
            mountinfo
                .lines()
                .any(|l| l.contains(&line) && l.contains(&format!(" - {fstype} "))),
            "{target} is not a {fstype} mount:\n{mountinfo}"
        );
    }

    // Services in order, the crashing one restarted with backoff (not in a tight loop).
    wait_for(T, "base and late running, crashy restarted 3 times", || {
        (init.service("base")["state"] == "running"
            && init.service("late")["state"] == "running"
            && init.service("crashy")["restarts"].as_u64() >= Some(3))
        .then_some(())
    });
    // Services start with no signal blocked (a mask inherited from init would make them deaf
    // to SIGTERM).
    // The report gives the pid in init's namespace: find the process out here by its NSpid.
    let plain = init.service("plain")["pid"].as_u64().unwrap();
    let plain_status = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("status")).ok())
        .find(|st| {
            st.lines().any(|l| {
                l.starts_with("NSpid:") && {
                    let ids: Vec<&str> = l.split_whitespace().skip(1).collect();
                    ids.len() == 2 && ids[1] == plain.to_string()
                }
            }) && st.lines().any(|l| l == "Name:\tsleep")
        })
        .expect("the plain service's process");
    let sigblk = plain_status
        .lines()
        .find(|l| l.starts_with("SigBlk:"))
        .unwrap();
    assert!(sigblk.ends_with("0000000000000000"), "{sigblk}");
    let crashy = init.service("crashy");
    assert_eq!(crashy["last_exit"], "exited with status 3");
    assert!(
        crashy["restarts"].as_u64().unwrap() <= 8,
        "no backoff: {crashy}"
    );
    let report = init.report();
    for stage in ["mounts", "cmdline", "services"] {
        let s = report["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == stage)
            .unwrap_or_else(|| panic!("no stage {stage}: {report}"));
        assert_eq!(s["outcome"], "ok", "{s}");
        assert!(s["ended_ms"].as_u64() >= s["started_ms"].as_u64());
    }
    assert!(init.console().contains("[base] hello from base"));
    let log = std::fs::read_to_string(init.root.join("var/log/shoal/base.log")).unwrap();
    assert!(log.contains("hello from base"));

    // Orphaned grandchildren are reaped: none left as zombies.
    wait_for(T, "both orphans reaped", || {
        (init.report()["orphans_reaped"].as_u64() >= Some(2)).then_some(())
    });
    assert!(zombie_children(pid).is_empty());

    // SIGTERM: services stop in reverse order, then reboot(2) ends the namespace (SIGHUP).
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = wait_for(T, "the namespace to end", || {
        init.p.unshare.try_wait().ok().flatten()
    });
    assert_eq!(status.signal(), Some(1), "{status:?}: {}", init.console());
    let order = std::fs::read_to_string(init.root.join("var/order")).unwrap();
    let order: Vec<&str> = order.lines().collect();
    assert_eq!(
        order,
        ["start-base", "start-late", "stop-late", "stop-base"]
    );
    assert!(init
        .console()
        .contains("services stopped, file systems synced"));
    assert!(
        !init.console().contains("did not stop in time"),
        "{}",
        init.console()
    );
}

#[test]
fn sigusr2_and_sigpwr_power_off_and_sigint_reboots() {
    // reboot(2) in a PID namespace kills its init: SIGINT for power-off, SIGHUP for reboot.
    for (sig, ends_with) in [("USR2", 2), ("PWR", 2), ("INT", 1)] {
        let mut init = Pid1::start();
        let pid = init.pid();
        wait_for(T, "base running", || {
            (init.service("base")["state"] == "running").then_some(())
        });
        Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap();
        let status = wait_for(T, "the namespace to end", || {
            init.p.unshare.try_wait().ok().flatten()
        });
        assert_eq!(status.signal(), Some(ends_with), "SIG{sig}: {status:?}");
    }
}

fn ip_json(ns: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new("ip")
        .args(["-n", ns, "-j"])
        .args(args)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn ipv4_of(ns: &str) -> Option<(String, u64)> {
    let v = ip_json(ns, &["addr", "show", "dev", "eth0"]);
    v[0]["addr_info"].as_array()?.iter().find_map(|a| {
        (a["family"] == "inet").then(|| {
            (
                a["local"].as_str().unwrap().to_string(),
                a["prefixlen"].as_u64().unwrap(),
            )
        })
    })
}

fn default_gw(ns: &str) -> Option<String> {
    let v = ip_json(ns, &["route", "show", "default"]);
    v[0]["gateway"].as_str().map(String::from)
}

/// dnsmasq serving DHCP on `ns`'s eth0 for the LAN `net` (first three octets), T1 = 4 s.
fn dnsmasq(ns: &str, net: &str, dir: &Path) -> Child {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
        ])
        .args([
            "--interface=eth0",
            "--bind-interfaces",
            "--port=0",
            "--log-dhcp",
        ])
        .arg(format!("--dhcp-range={net}.100,{net}.150,255.255.255.0,2m"))
        .arg(format!("--dhcp-option=option:router,{net}.11"))
        .arg(format!("--dhcp-option=option:dns-server,{net}.53"))
        .args([
            "--dhcp-option=option:mtu,1400",
            "--dhcp-option=option:T1,4",
            "--dhcp-option=option:T2,7",
        ])
        .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
        .arg(format!(
            "--log-facility={}",
            dir.join("dnsmasq.log").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq")
}

#[test]
fn a_dhcp_server_that_appears_after_boot_is_used() {
    let mut lan = shoal_e2e::netns::Lan::new(1);
    let server = lan.hosts[0].ns.clone();
    let net = lan.subnet.clone();
    let client = lan.add_bare_host().ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let init = Pid1::start_with(Some(&client), "", &[("SHOAL_INIT_NET_IFACES", "eth0")]);
    let report = wait_for(T, "the network stage to give up", || {
        let r = init.report();
        (!stage(&r, "network").is_null()).then_some(r)
    });
    assert_eq!(stage(&report, "network")["outcome"], "degraded");
    assert!(details(&report, "network").contains("still trying in the background"));
    let mut d = dnsmasq(&server, &net, dir.path());
    let (addr, _) = wait_for(Duration::from_secs(90), "a late DHCP address", || {
        ipv4_of(&client)
    });
    assert!(addr.starts_with(&format!("{net}.1")), "{addr}");
    assert_eq!(
        default_gw(&client).as_deref(),
        Some(format!("{net}.11").as_str())
    );
    let _ = d.kill();
    let _ = d.wait();
}

#[test]
fn dhcp_from_a_real_dnsmasq_sets_address_route_dns_and_mtu_and_renews() {
    let mut lan = shoal_e2e::netns::Lan::new(1);
    let server = lan.hosts[0].ns.clone();
    let net = lan.subnet.clone();
    let client = lan.add_bare_host().ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dnsmasq.log");
    let mut dnsmasq = dnsmasq(&server, &net, dir.path());
    let init = Pid1::start_with(Some(&client), "", &[("SHOAL_INIT_NET_IFACES", "eth0")]);
    let (addr, prefix) = wait_for(T, "a DHCP address on eth0", || ipv4_of(&client));
    assert!(addr.starts_with(&format!("{net}.1")), "{addr}");
    assert_eq!(prefix, 24);
    assert_eq!(
        default_gw(&client).as_deref(),
        Some(format!("{net}.11").as_str())
    );
    let link = ip_json(&client, &["link", "show", "dev", "eth0"]);
    assert_eq!(link[0]["mtu"], 1400);
    wait_for(T, "the DHCP name server in resolv.conf", || {
        std::fs::read_to_string(init.inside("run/shoal/resolv.conf"))
            .ok()
            .filter(|r| r.contains(&format!("nameserver {net}.53")))
    });
    let fwd = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client,
            "cat",
            "/proc/sys/net/ipv4/ip_forward",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&fwd.stdout).trim(),
        "1",
        "sysctls applied in the namespace"
    );
    let net_report = init.report()["network"].clone();
    assert_eq!(net_report["interfaces"][0]["method"], "dhcp");
    // T1 is 4 s: the lease is renewed by unicast, and the server sees it.
    wait_for(Duration::from_secs(40), "a lease renewal", || {
        (init.report()["network"]["interfaces"][0]["renewals"].as_u64() >= Some(1)).then_some(())
    });
    let acks = std::fs::read_to_string(&log)
        .unwrap()
        .matches("DHCPACK")
        .count();
    assert!(acks >= 2, "dnsmasq acknowledged {acks} times");
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
}

#[test]
fn static_kernel_ip_is_applied_through_netlink() {
    let mut lan = shoal_e2e::netns::Lan::new(0);
    let ns = lan.add_bare_host().ns.clone();
    let cmdline = "ro console=ttyS0 ip=10.79.0.5::10.79.0.1:255.255.255.0:n5:eth0:off:10.79.0.53";
    let init = Pid1::start_with(
        Some(&ns),
        "",
        &[
            ("SHOAL_INIT_NET_IFACES", "eth0"),
            ("SHOAL_INIT_CMDLINE", cmdline),
        ],
    );
    let (addr, prefix) = wait_for(T, "the static address", || ipv4_of(&ns));
    assert_eq!((addr.as_str(), prefix), ("10.79.0.5", 24));
    assert_eq!(default_gw(&ns).as_deref(), Some("10.79.0.1"));
    let resolv = wait_for(T, "resolv.conf", || {
        std::fs::read_to_string(init.inside("run/shoal/resolv.conf")).ok()
    });
    assert!(resolv.contains("nameserver 10.79.0.53"));
    assert_eq!(init.report()["network"]["source"], "kernel ip=");
}

fn stage(report: &serde_json::Value, name: &str) -> serde_json::Value {
    report["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or(serde_json::Value::Null)
}

fn details(report: &serde_json::Value, name: &str) -> String {
    stage(report, name)["detail"].to_string()
}

/// The (members') user-data `shoal gen cluster` writes, with a host name added; and the
/// cluster's join secret, which it carries.
fn cluster_user_data(dir: &Path, hostname: &str) -> (PathBuf, String) {
    let b = shoal_e2e::bundle(&dir.join("bundle"), "meta");
    let mut ud = std::fs::read_to_string(b.join("user-data.yaml")).unwrap();
    ud.push_str(&format!("hostname: {hostname}\nruncmd: [\"echo no\"]\n"));
    let path = dir.join("user-data");
    std::fs::write(&path, &ud).unwrap();
    let secret = std::fs::read_to_string(b.join("join.secret")).unwrap();
    (path, secret.trim().to_string())
}

fn metadata_server(mode: &str, ud: &Path, log: &Path) -> (Child, u16) {
    let port = shoal_e2e::free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/metadata_server.py");
    let mut child = Command::new("/usr/bin/python3")
        .arg(script)
        .args([mode, &port.to_string()])
        .arg(ud)
        .arg(log)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    (child, port)
}

fn node_json(init: &Pid1) -> serde_json::Value {
    let p = init.inside("run/shoal/node.json");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "node.json holds the bundle");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn ec2_imdsv2_and_gce_metadata_from_real_http_servers() {
    for (mode, source) in [
        ("ec2", "ec2 (IMDSv2)"),
        ("gce", "gce"),
        ("openstack", "openstack"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (ud, secret) = cluster_user_data(dir.path(), &format!("{mode}-from-user-data"));
        let log = dir.path().join("requests.log");
        let (mut server, port) = metadata_server(mode, &ud, &log);
        let addr = format!("127.0.0.1:{port}");
        // The firmware names the cloud, as it does on a real instance.
        let dmi = fake_dmi(dir.path(), mode);
        let init = Pid1::start_with(
            None,
            "",
            &[
                ("SHOAL_INIT_METADATA_HOST", &addr),
                ("SHOAL_INIT_UTS", "1"),
                ("SHOAL_INIT_DMI", dmi.to_str().unwrap()),
            ],
        );
        let report = wait_for(T, "the metadata stage", || {
            let r = init.report();
            (!stage(&r, "hostname").is_null()).then_some(r)
        });
        assert_eq!(
            report["metadata"]["source"],
            source,
            "{}",
            details(&report, "metadata")
        );
        let nj = node_json(&init);
        // What a member needs and no more: no admin token, no CA key.
        assert_eq!(nj["bundle"]["join_secret"], secret.as_str());
        assert!(nj["bundle"]["admin_token"].is_null() && nj["bundle"]["ca_key"].is_null());
        // user-data's hostname wins over the provider's; runcmd is refused, and said so.
        assert!(details(&report, "hostname").contains(&format!("{mode}-from-user-data")));
        assert!(details(&report, "user-data").contains("refused runcmd"));
        assert_eq!(stage(&report, "user-data")["outcome"], "degraded");
        // sethostname(2) in init's own UTS namespace.
        let out = Command::new("nsenter")
            .args(["--target", &init.pid().to_string(), "--uts", "hostname"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{mode}-from-user-data")
        );
        // The report never holds a secret.
        assert!(!report.to_string().contains(&secret));

        let reqs: Vec<serde_json::Value> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if mode == "ec2" {
            assert_eq!(
                reqs[0]["method"], "PUT",
                "IMDSv2 starts with a token: {reqs:?}"
            );
            assert!(reqs
                .iter()
                .filter(|r| r["method"] == "GET")
                .all(|r| r["token"].is_string() && r["status"] != 401));
            // And the server really enforces it.
            let r =
                shoal_e2e::http("GET", port, "/latest/meta-data/instance-id", &[], b"").unwrap();
            assert_eq!(r.status, 401);
        } else if mode == "gce" {
            assert!(reqs
                .iter()
                .filter(|r| r["path"].as_str().unwrap().starts_with("/computeMetadata"))
                .all(|r| r["flavor"] == "Google"));
            let r =
                shoal_e2e::http("GET", port, "/computeMetadata/v1/instance/id", &[], b"").unwrap();
            assert_eq!(r.status, 403);
        } else {
            assert_eq!(
                report["metadata"]["instance_id"],
                "83679162-1378-4288-a2d4-70e13ec132aa"
            );
        }
        let _ = server.kill();
        let _ = server.wait();
    }
}

/// A `/sys/class/dmi/id` as the firmware of `platform` fills it.
fn fake_dmi(dir: &Path, platform: &str) -> PathBuf {
    let (vendor, product) = match platform {
        "ec2" => ("Amazon EC2", "t3.small"),
        "gce" => ("Google", "Google Compute Engine"),
        "openstack" => ("OpenStack Foundation", "OpenStack Nova"),
        _ => ("QEMU", "Standard PC (Q35 + ICH9, 2009)"),
    };
    let d = dir.join("dmi");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("sys_vendor"), format!("{vendor}\n")).unwrap();
    std::fs::write(d.join("product_name"), format!("{product}\n")).unwrap();
    d
}

#[test]
fn a_machine_its_firmware_names_no_cloud_asks_no_metadata_service() {
    // A server at the metadata address that would answer as EC2 (a rogue neighbour, a route
    // from a rogue DHCP server): a bare-metal machine never asks it.
    let dir = tempfile::tempdir().unwrap();
    let (ud, _) = cluster_user_data(dir.path(), "rogue");
    let log = dir.path().join("requests.log");
    let (mut server, port) = metadata_server("ec2", &ud, &log);
    let addr = format!("127.0.0.1:{port}");
    let dmi = fake_dmi(dir.path(), "bare-metal");
    let init = Pid1::start_with(
        None,
        "",
        &[
            ("SHOAL_INIT_METADATA_HOST", &addr),
            ("SHOAL_INIT_DMI", dmi.to_str().unwrap()),
        ],
    );
    let report = wait_for(T, "the metadata stage", || {
        let r = init.report();
        (!stage(&r, "metadata").is_null()).then_some(r)
    });
    assert!(
        details(&report, "metadata").contains("no cloud platform named"),
        "{}",
        details(&report, "metadata")
    );
    assert!(
        report["metadata"]["source"].is_null(),
        "{}",
        report["metadata"]
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap_or_default(), "");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn without_metadata_the_machine_boots_in_dev_mode_quickly() {
    let closed = format!("127.0.0.1:{}", shoal_e2e::free_port());
    // No disk either: /var becomes a tmpfs and the report says so.
    let init = Pid1::start_with(
        None,
        SERVICES,
        &[
            ("SHOAL_INIT_METADATA_HOST", &closed),
            ("SHOAL_INIT_DISKS", ""),
        ],
    );
    wait_for(T, "services running", || {
        (init.service("base")["state"] == "running").then_some(())
    });
    let report = init.report();
    let m = stage(&report, "metadata");
    assert_eq!(m["outcome"], "degraded");
    assert!(m["detail"].to_string().contains("dev mode"));
    let took = m["ended_ms"].as_u64().unwrap() - m["started_ms"].as_u64().unwrap();
    assert!(took <= 5_000, "metadata probing is bounded: took {took} ms");
    assert!(!init.inside("run/shoal/node.json").exists());
    assert_eq!(stage(&report, "data-disk")["outcome"], "degraded");
    assert!(details(&report, "data-disk").contains("NO DATA DISK"));
    let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", init.pid())).unwrap();
    assert!(mountinfo
        .lines()
        .any(|l| l.contains(&format!("{}/var ", init.root.display())) && l.contains(" - tmpfs ")));
}

/// A NoCloud seed made by `cloud-localds`, as ISO 9660 (`iso`) or FAT (`vfat`).
fn seed_image(dir: &Path, name: &str, ud: &Path, hostname: &str, fs: &str) -> PathBuf {
    let md = dir.join(format!("{name}.meta-data"));
    std::fs::write(
        &md,
        format!("instance-id: iid-{name}\nlocal-hostname: {hostname}\n"),
    )
    .unwrap();
    let nc = dir.join(format!("{name}.network-config"));
    std::fs::write(&nc, "version: 2\nethernets:\n  eth0:\n    addresses: [10.81.0.7/24]\n    routes:\n      - to: default\n        via: 10.81.0.1\n    nameservers:\n      addresses: [10.81.0.53]\n    mtu: 1450\n").unwrap();
    let img = dir.join(format!("{name}.img"));
    let out = Command::new("cloud-localds")
        .args(["-f", fs])
        .arg("-N")
        .arg(&nc)
        .arg(&img)
        .arg(ud)
        .arg(&md)
        .output()
        .expect("cloud-localds (cloud-image-utils)");
    assert!(
        out.status.success(),
        "cloud-localds: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

#[test]
fn nocloud_seed_network_config_and_data_disk_across_boots() {
    let mut lan = shoal_e2e::netns::Lan::new(0);
    let ns = lan.add_bare_host().ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let (ud, secret) = cluster_user_data(dir.path(), "seeded");
    let seed = Loop::new(&seed_image(dir.path(), "seed1", &ud, "meta-host", "iso"));
    let disk_file = dir.path().join("data.img");
    std::fs::File::create(&disk_file)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let disk = Loop::new(&disk_file);
    let disks = format!("{},{}", seed.0, disk.0);
    let env = [
        ("SHOAL_INIT_NET_IFACES", "eth0"),
        ("SHOAL_INIT_DISKS", disks.as_str()),
    ];

    // First boot: the seed is found by its label, its network-config (v2) applied, the blank
    // disk formatted and mounted at /var.
    let mut init = Pid1::start_with(Some(&ns), "", &env);
    let report = wait_for(T, "the boot stages", || {
        let r = init.report();
        (!stage(&r, "hostname").is_null()).then_some(r)
    });
    assert!(report["metadata"]["source"]
        .as_str()
        .unwrap_or_else(|| panic!("{report:#}"))
        .starts_with("nocloud"));
    assert_eq!(report["metadata"]["instance_id"], "iid-seed1");
    assert_eq!(ipv4_of(&ns), Some(("10.81.0.7".to_string(), 24)));
    assert_eq!(default_gw(&ns).as_deref(), Some("10.81.0.1"));
    assert_eq!(
        ip_json(&ns, &["link", "show", "dev", "eth0"])[0]["mtu"],
        1450
    );
    assert_eq!(report["network"]["source"], "nocloud network-config");
    assert!(
        details(&report, "data-disk").contains("formatting blank disk"),
        "{}",
        details(&report, "data-disk")
    );
    let pid = init.pid();
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(mountinfo
        .lines()
        .any(|l| l.contains(&format!("{}/var ", init.root.display())) && l.contains(" - ext4 ")));
    assert_eq!(node_json(&init)["bundle"]["join_secret"], secret.as_str());
    assert!(details(&report, "user-data").contains("first boot"));
    // The store has a file system of its own, reserved on the data disk: filling the disk
    // (images, containers, logs) leaves the store room to write.
    let data = details(&report, "data-disk");
    assert!(
        data.contains("made the store's file system: 64 MiB")
            && data.contains("mounted at /var/lib/shoal"),
        "{data}"
    );
    let store = init.root.join("var/lib/shoal");
    assert!(mountinfo_of(pid)
        .lines()
        .any(|l| l.contains(&format!("{} ", store.display())) && l.contains(" - ext4 ")));
    let filler = init.inside("var/filler");
    let filled = fill(&filler);
    assert!(
        filled > 100 << 20,
        "only {filled} bytes filled the data disk"
    );
    // Written through to the data disk while it is full (the store's file system lives in a
    // file there): nothing about it may need a block the disk no longer has.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(init.inside("var/lib/shoal/after-full")).unwrap();
        f.write_all(&vec![7u8; 4 << 20])
            .and_then(|()| f.sync_all())
            .expect("the store's file system has room when the data disk is full");
        let _ = Command::new("sync").status();
    }
    std::fs::remove_file(&filler).unwrap();
    let machine_id = stage(&report, "machine-id")["detail"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    wait_for(T, "the first boot to end", || {
        init.p.unshare.try_wait().ok().flatten()
    });
    drop(init);

    // Second boot, same disks: the data disk is found by label (not formatted again), the
    // machine id is the same, and the same user-data gives the same machine.
    let mut init = Pid1::start_with(Some(&ns), "", &env);
    let report = wait_for(T, "the second boot", || {
        let r = init.report();
        (!stage(&r, "hostname").is_null()).then_some(r)
    });
    assert!(details(&report, "data-disk").contains("mounted at /var"));
    assert!(!details(&report, "data-disk").contains("formatting"));
    assert!(details(&report, "data-disk").contains("fsck: clean"));
    // The same store file system, checked and mounted again, with what was written to it.
    let data = details(&report, "data-disk");
    assert!(
        data.contains("store fsck: clean") && !data.contains("made the store's"),
        "{data}"
    );
    assert_eq!(
        std::fs::read(init.inside("var/lib/shoal/after-full"))
            .unwrap()
            .len(),
        4 << 20
    );
    assert_eq!(
        stage(&report, "machine-id")["detail"]
            .as_array()
            .unwrap()
            .last()
            .unwrap(),
        &machine_id
    );
    assert!(details(&report, "user-data").contains("unchanged since the last boot"));
    let pid = init.pid();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    wait_for(T, "the second boot to end", || {
        init.p.unshare.try_wait().ok().flatten()
    });
    drop(init);
    drop(seed);

    // Third boot with changed user-data on a FAT seed: applied, and the change recorded.
    let (ud2, _) = cluster_user_data(dir.path(), "renamed");
    let seed2 = Loop::new(&seed_image(dir.path(), "seed2", &ud2, "meta-host", "vfat"));
    let disks = format!("{},{}", seed2.0, disk.0);
    let init = Pid1::start_with(
        Some(&ns),
        "",
        &[
            ("SHOAL_INIT_NET_IFACES", "eth0"),
            ("SHOAL_INIT_DISKS", disks.as_str()),
        ],
    );
    let report = wait_for(T, "the third boot", || {
        let r = init.report();
        (!stage(&r, "hostname").is_null()).then_some(r)
    });
    assert_eq!(report["metadata"]["instance_id"], "iid-seed2");
    assert!(
        details(&report, "user-data").contains("hostname: changed"),
        "{}",
        details(&report, "user-data")
    );
    assert!(details(&report, "hostname").contains("renamed"));
}

#[test]
fn a_data_disk_from_before_the_store_volume_moves_its_state_onto_one() {
    // An older node's data disk: the agent's state straight on it.
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("lib/shoal/tls")).unwrap();
    std::fs::create_dir_all(tree.join("lib/shoal/store")).unwrap();
    std::fs::write(tree.join("lib/shoal/store/replica.redb"), b"the store").unwrap();
    std::fs::write(tree.join("lib/shoal/tls/node.key"), b"KEY").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tree.join("lib/shoal/tls/node.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::symlink("store/replica.redb", tree.join("lib/shoal/link")).unwrap();
    let disk_file = dir.path().join("old.img");
    std::fs::File::create(&disk_file)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    shoal_e2e::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "SHOAL_DATA", "-d"])
            .arg(&tree)
            .arg(&disk_file),
    );
    let disk = Loop::new(&disk_file);
    let init = Pid1::start_with(None, "", &[("SHOAL_INIT_DISKS", disk.0.as_str())]);
    let report = wait_for(T, "the boot stages", || {
        let r = init.report();
        (!stage(&r, "machine-id").is_null()).then_some(r)
    });
    let data = details(&report, "data-disk");
    assert!(
        data.contains("moved /var/lib/shoal onto the store's file system")
            && data.contains("mounted at /var/lib/shoal"),
        "{data}"
    );
    let store = init.root.join("var/lib/shoal");
    assert!(mountinfo_of(init.pid())
        .lines()
        .any(|l| l.contains(&format!("{} ", store.display())) && l.contains(" - ext4 ")));
    assert_eq!(
        std::fs::read(init.inside("var/lib/shoal/store/replica.redb")).unwrap(),
        b"the store"
    );
    let key = init.inside("var/lib/shoal/tls/node.key");
    assert_eq!(std::fs::read(&key).unwrap(), b"KEY");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_link(init.inside("var/lib/shoal/link")).unwrap(),
        Path::new("store/replica.redb")
    );
}

fn mountinfo_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap()
}

/// Writes zeros to `path` until the file system is full; how many bytes went in.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut n = 0u64;
    while let Ok(w) = f.write(&chunk) {
        if w == 0 {
            break;
        }
        n += w as u64;
    }
    let _ = f.sync_all();
    n
}

/// The SNTP server fixture (RFC 4330) answering `unix` seconds; its process and port.
fn sntp_server(unix: u64) -> (Child, u16) {
    let port = shoal_e2e::free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sntp_server.py");
    let mut server = Command::new("/usr/bin/python3")
        .arg(script)
        .args([&port.to_string(), &unix.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (server, port)
}

/// A NoCloud seed directory whose user-data names `ntp` as the NTP server; its kernel
/// command line.
fn ntp_seed(dir: &Path, ntp: &str) -> String {
    let seed = dir.join("seed");
    std::fs::create_dir_all(&seed).unwrap();
    std::fs::write(seed.join("meta-data"), "instance-id: iid-dir\n").unwrap();
    std::fs::write(
        seed.join("user-data"),
        format!("#cloud-config\nntp:\n  servers: [\"{ntp}\"]\n"),
    )
    .unwrap();
    format!("ds=nocloud;s=file://{}/", seed.display())
}

/// init with a NoCloud seed directory (given on the command line) whose user-data names an
/// SNTP server that says 2030, plus one more setting; the server and its port.
fn init_with_ntp(dir: &Path, extra: (&str, &str)) -> (Pid1, Child, u16) {
    let (server, port) = sntp_server(1_893_456_000);
    let cmdline = ntp_seed(dir, &format!("127.0.0.1:{port}"));
    let init = Pid1::start_with(None, "", &[("SHOAL_INIT_CMDLINE", cmdline.as_str()), extra]);
    (init, server, port)
}

#[test]
fn the_clock_is_kept_after_boot() {
    // A plausible clock is still checked at boot, then again and again; the server says 2030,
    // so each check would step it (test mode only reports).
    let dir = tempfile::tempdir().unwrap();
    let (init, mut server, port) = init_with_ntp(dir.path(), ("SHOAL_INIT_NTP_INTERVAL_MS", "300"));
    let report = wait_for(T, "three checks of the clock", || {
        let r = init.report();
        (r["clock"]["queries"].as_u64().unwrap_or(0) >= 3).then_some(r)
    });
    assert!(
        details(&report, "clock").contains("would set the clock to 1893456000 (unix)"),
        "{}",
        details(&report, "clock")
    );
    assert_eq!(report["clock"]["server"], format!("127.0.0.1:{port}"));
    assert!(report["clock"]["offset_ms"].as_i64().unwrap() > 100_000_000);
    assert_eq!(
        report["clock"]["steps"], 0,
        "test mode must not step the clock"
    );
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn a_wrong_clock_is_set_from_the_ntp_server_user_data_names() {
    let dir = tempfile::tempdir().unwrap();
    let (init, mut server, _) = init_with_ntp(dir.path(), ("SHOAL_INIT_CLOCK_WRONG", "1"));
    let report = wait_for(T, "the clock stage", || {
        let r = init.report();
        (!stage(&r, "clock").is_null()).then_some(r)
    });
    assert_eq!(report["metadata"]["instance_id"], "iid-dir");
    assert!(
        details(&report, "clock").contains("would set the clock to 1893456000 (unix)"),
        "{}",
        details(&report, "clock")
    );
    let _ = server.kill();
    let _ = server.wait();
}
