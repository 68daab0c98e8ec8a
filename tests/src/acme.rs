//! Debian's pebble, a real ACME (RFC 8555) test CA, on loopback, with pebble-challtestsrv
//! as the DNS server its validation asks: names resolve where a test says, and the CA
//! connects to port `http_port` there for HTTP-01, as Let's Encrypt connects to port 80.

use crate::{free_port, wait_for};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Pebble {
    children: Vec<Child>,
    /// The directory URL an ACME client starts from.
    pub directory: String,
    /// The root pebble's own TLS (its API) is checked against: made here, the package ships
    /// none.
    pub api_ca: PathBuf,
    management: u16,
    dns_management: u16,
    log: PathBuf,
}

impl Pebble {
    /// Starts the CA in `dir`, validating HTTP-01 on `http_port` at the address its DNS
    /// gives, `default_ip` for every name unless `point` says otherwise.
    pub fn start(dir: &Path, http_port: u16, default_ip: &str) -> Pebble {
        for bin in ["pebble", "pebble-challtestsrv"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {bin}")])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                "{bin} is not installed (Debian's pebble package; tests/run installs it)"
            );
        }
        std::fs::create_dir_all(dir).unwrap();
        let ca = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pebble API test root");
        let ca_cert = params.self_signed(&ca).unwrap();
        let issuer = rcgen::Issuer::new(params, ca);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        let api_ca = dir.join("api-ca.pem");
        std::fs::write(&api_ca, ca_cert.pem()).unwrap();
        std::fs::write(dir.join("api-cert.pem"), leaf_cert.pem()).unwrap();
        std::fs::write(dir.join("api-key.pem"), leaf_key.serialize_pem()).unwrap();

        let (api, management, dns, dns_management) =
            (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{api}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("api-cert.pem"),
            "privateKey": dir.join("api-key.pem"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let log = dir.join("pebble.log");
        let out = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap()
        };
        let dns_server = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", default_ip, "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .stdout(out())
            .stderr(out())
            .spawn()
            .expect("pebble-challtestsrv");
        let ca_server = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            // Validation at once, not after a random wait. Pebble still refuses 5 % of good
            // nonces, as RFC 8555 §6.5 lets a CA: the client must retry those.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(out())
            .stderr(out())
            .spawn()
            .expect("pebble");
        let p = Pebble {
            children: vec![dns_server, ca_server],
            directory: format!("https://127.0.0.1:{api}/dir"),
            api_ca,
            management,
            dns_management,
            log,
        };
        for port in [api, management, dns_management] {
            wait_for(Duration::from_secs(20), "pebble to listen", || {
                TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
            });
        }
        p
    }

    /// `host` resolves to `ip` (and nothing else) from now on.
    pub fn point(&self, host: &str, ip: &str) {
        let r = crate::http::curl(
            None,
            "POST",
            &format!("http://127.0.0.1:{}/add-a", self.dns_management),
            &[("content-type", "application/json")],
            serde_json::json!({"host": format!("{host}."), "addresses": [ip]})
                .to_string()
                .as_bytes(),
            None,
            None,
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// The root the certificates pebble issues chain to (its management API; made afresh
    /// at every start).
    pub fn issuing_root(&self) -> String {
        let r = crate::http::curl(
            None,
            "GET",
            &format!("https://127.0.0.1:{}/roots/0", self.management),
            &[],
            b"",
            Some(&self.api_ca),
            None,
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    }

    /// What pebble and its DNS server said.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
