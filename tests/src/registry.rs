//! Debian's `docker-registry` as a real registry for the tests: open or behind htpasswd.

use crate::{busybox_image, free_port, run, wait_for, BUSYBOX};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

/// A `docker-registry` process on a port of `ip` (loopback, or the test's end of a LAN), with
/// a login when asked.
pub struct Registry {
    child: Child,
    /// `ip:port`
    pub addr: String,
    dir: tempfile::TempDir,
}

impl Registry {
    pub fn start(ip: &str, login: Option<(&str, &str)>) -> Registry {
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
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {ip}:{port}\n{auth}",
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
            std::net::TcpStream::connect((ip, port)).ok()
        });
        Registry {
            child,
            addr: format!("{ip}:{port}"),
            dir,
        }
    }

    /// Pushes the test image from the host's engine as `e2e/busybox:TAG` and removes the
    /// local name, so a node must pull it; the reference.
    pub fn push_busybox(&self, tag: &str, login: Option<(&str, &str)>) -> String {
        busybox_image();
        self.push(&[], BUSYBOX, &format!("e2e/busybox:{tag}"), login)
    }

    /// Pushes `image` as `NAME` through the engine the docker CLI reaches with `via` (none:
    /// the host's) and removes the pushed name there; the reference.
    pub fn push(
        &self,
        via: &[String],
        image: &str,
        name: &str,
        login: Option<(&str, &str)>,
    ) -> String {
        let reference = format!("{}/{name}", self.addr);
        // A client configuration of its own: the host's stays as it was.
        let config: PathBuf = self.dir.path().join("client");
        let docker = |args: &[&str]| {
            run(Command::new("docker")
                .env("DOCKER_CONFIG", &config)
                .args(via)
                .args(args))
        };
        if let Some((user, password)) = login {
            docker(&["login", "-u", user, "-p", password, &self.addr]);
        }
        docker(&["tag", image, &reference]);
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
