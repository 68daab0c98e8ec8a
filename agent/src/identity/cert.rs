//! A node's own TLS identity: a key and a certificate from the cluster CA (CN = node id, SANs =
//! its addresses plus the cluster member name), kept under `<state_dir>/tls/`.
//!
//! A node holding the bundle issues its certificate itself; a node holding only the join secret
//! gets it signed by a member (`join.rs`). Either way the result is stored here and reused on
//! every start until it nears expiry, the CA changes, or the node's id or addresses change.

use super::{ClusterInfo, IdentityError};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// The DNS name every member certificate carries. Peers check the chain against the cluster
/// CA and this name: any certificate the CA issued is a member, whatever address it is
/// reached at (mDNS and NAT give a node several).
pub const MEMBER_NAME: &str = "node.shoal";
/// How long a node certificate is valid.
pub const CERT_DAYS: i64 = 365;
/// Renew when less than this is left.
pub const RENEW_DAYS: i64 = 30;
/// Tolerated clock skew between the signer and the others.
const BACKDATE: Duration = Duration::hours(1);

/// The files of `<state_dir>/tls/`: name, secret.
const FILES: [(&str, bool); 4] = [
    ("cluster.json", false),
    ("ca.crt", false),
    ("node.crt", false),
    ("node.key", true),
];

#[derive(Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub cluster: ClusterInfo,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The cluster's data key wrapped for this node's join secret, as the member that signed
    /// the certificate handed it over (`<state>/tls/data-key.sealed`); none when issued from
    /// the bundle, which carries its own.
    pub data_key: Option<String>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// What a certificate says, read back with x509-parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: String,
    pub ips: Vec<IpAddr>,
    pub not_after_unix: i64,
    pub issuer: String,
}

fn rcgen_err(e: rcgen::Error) -> IdentityError {
    IdentityError::Ca(e)
}

/// Reads the subject CN, IP SANs, expiry and issuer of a DER certificate.
pub fn cert_info_der(der: &[u8]) -> Result<CertInfo, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::IPAddress(b) = name {
                match b.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())),
                    _ => {}
                }
            }
        }
    }
    Ok(CertInfo {
        common_name,
        ips,
        not_after_unix: cert.validity().not_after.timestamp(),
        issuer: cert.issuer().to_string(),
    })
}

/// The first certificate of a PEM text, as DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| format!("not a PEM certificate: {e}"))
}

pub fn cert_info(pem: &str) -> Result<CertInfo, String> {
    cert_info_der(&pem_to_der(pem)?)
}

/// The parameters of every member certificate; nothing in them comes from a request except the
/// node id and the addresses, both checked by the caller.
fn member_params(node_id: &str, addrs: &[IpAddr], now: OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, node_id);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = now - BACKDATE;
    p.not_after = now + Duration::days(CERT_DAYS);
    let mut sans = Vec::new();
    for name in [MEMBER_NAME, "localhost"] {
        if let Ok(n) = name.try_into() {
            sans.push(SanType::DnsName(n));
        }
    }
    let mut ips: Vec<IpAddr> = addrs.to_vec();
    ips.push(IpAddr::from([127, 0, 0, 1]));
    ips.sort();
    ips.dedup();
    sans.extend(ips.into_iter().map(SanType::IpAddress));
    p.subject_alt_names = sans;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    p
}

fn issuer(ca_pem: &str, ca_key_pem: &str) -> Result<Issuer<'static, KeyPair>, IdentityError> {
    let key = KeyPair::from_pem(ca_key_pem).map_err(rcgen_err)?;
    Issuer::from_ca_cert_pem(ca_pem, key).map_err(rcgen_err)
}

/// A certificate request for `node_id` with a new key: returns (key PEM, CSR PEM).
pub fn request(node_id: &str) -> Result<(String, String), IdentityError> {
    request_with_key(node_id, None)
}

/// The key `key_pem` holds, or a new one.
fn key_or_new(key_pem: Option<&str>) -> Result<KeyPair, IdentityError> {
    match key_pem {
        Some(k) => KeyPair::from_pem(k).map_err(rcgen_err),
        None => KeyPair::generate().map_err(rcgen_err),
    }
}

/// A certificate request for `node_id` for the key in `key_pem` (a renewal keeps its key: the
/// node's signed entries stay verifiable), or a new one.
pub fn request_with_key(
    node_id: &str,
    key_pem: Option<&str>,
) -> Result<(String, String), IdentityError> {
    let key = key_or_new(key_pem)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, node_id);
    let csr = p.serialize_request(&key).map_err(rcgen_err)?;
    Ok((key.serialize_pem(), csr.pem().map_err(rcgen_err)?))
}

/// Signs a member certificate for the key in `csr_pem` (whose signature proves the requester
/// holds it). Only the public key is taken from the request.
pub fn sign_request(
    ca_pem: &str,
    ca_key_pem: &str,
    csr_pem: &str,
    node_id: &str,
    addrs: &[IpAddr],
) -> Result<String, IdentityError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(rcgen_err)?;
    let params = member_params(node_id, addrs, OffsetDateTime::now_utc());
    let cert = params
        .signed_by(&csr.public_key, &issuer(ca_pem, ca_key_pem)?)
        .map_err(rcgen_err)?;
    Ok(cert.pem())
}

impl NodeIdentity {
    /// Issues a fresh key and certificate from the CA held in the bundle.
    pub fn issue(
        cluster: &ClusterInfo,
        ca_pem: &str,
        ca_key_pem: &str,
        node_id: &str,
        addrs: &[IpAddr],
    ) -> Result<NodeIdentity, IdentityError> {
        Self::issue_with_key(cluster, ca_pem, ca_key_pem, node_id, addrs, None)
    }

    /// Issues a certificate for the key in `key_pem` (a renewal: the node's entries, signed
    /// with it, stay verifiable everywhere), or for a new key.
    pub fn issue_with_key(
        cluster: &ClusterInfo,
        ca_pem: &str,
        ca_key_pem: &str,
        node_id: &str,
        addrs: &[IpAddr],
        key_pem: Option<&str>,
    ) -> Result<NodeIdentity, IdentityError> {
        let key = key_or_new(key_pem)?;
        let params = member_params(node_id, addrs, OffsetDateTime::now_utc());
        let cert = params
            .signed_by(&key, &issuer(ca_pem, ca_key_pem)?)
            .map_err(rcgen_err)?;
        Ok(NodeIdentity {
            cluster: cluster.clone(),
            ca_pem: ca_pem.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            data_key: None,
        })
    }

    pub fn dir(state_dir: &Path) -> PathBuf {
        state_dir.join("tls")
    }

    /// The stored identity, if there is a complete one.
    pub fn load(state_dir: &Path) -> Result<Option<NodeIdentity>, IdentityError> {
        let dir = Self::dir(state_dir);
        if !dir.join("node.crt").exists() {
            return Ok(None);
        }
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| IdentityError::Read {
                path: dir.display().to_string(),
                reason: format!("{name}: {e}"),
            })
        };
        let cluster =
            serde_json::from_str(&read("cluster.json")?).map_err(|e| IdentityError::Read {
                path: dir.display().to_string(),
                reason: format!("cluster.json: {e}"),
            })?;
        Ok(Some(NodeIdentity {
            cluster,
            ca_pem: read("ca.crt")?,
            cert_pem: read("node.crt")?,
            key_pem: read("node.key")?,
            data_key: std::fs::read_to_string(dir.join(super::DATA_KEY_FILE))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
        }))
    }

    /// Stores the identity: the key 0600, the directory 0700, each file replaced atomically.
    pub fn save(&self, state_dir: &Path) -> Result<(), IdentityError> {
        let dir = Self::dir(state_dir);
        let werr = |p: &Path| {
            let path = p.display().to_string();
            move |source| IdentityError::Write { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(werr(&dir))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(werr(&dir))?;
        let bodies = [
            serde_json::to_string_pretty(&self.cluster).unwrap_or_default() + "\n",
            self.ca_pem.clone(),
            self.cert_pem.clone(),
            self.key_pem.clone(),
        ];
        // The key goes first and the certificate last, so a crash never leaves a certificate
        // next to a key it does not belong to.
        let order = [3usize, 0, 1, 2];
        for i in order {
            let (name, secret) = FILES[i];
            super::write_file(&dir, name, &bodies[i], secret)?;
        }
        let data_key = dir.join(super::DATA_KEY_FILE);
        match &self.data_key {
            Some(k) => super::write_file(&dir, super::DATA_KEY_FILE, k, true),
            None => match std::fs::remove_file(&data_key) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(werr(&data_key)(e)),
                _ => Ok(()),
            },
        }
    }

    pub fn info(&self) -> Result<CertInfo, String> {
        cert_info(&self.cert_pem)
    }

    /// Why this identity should be replaced before use, if it should: another CA, another
    /// node id, an address missing from the SANs, or expiry within `RENEW_DAYS`.
    pub fn stale_because(
        &self,
        ca_pem: Option<&str>,
        node_id: &str,
        addrs: &[IpAddr],
        now_unix: i64,
    ) -> Option<String> {
        let info = match self.info() {
            Ok(i) => i,
            Err(e) => return Some(format!("the stored certificate is unreadable ({e})")),
        };
        if let Some(ca) = ca_pem {
            if pem_to_der(ca).ok() != pem_to_der(&self.ca_pem).ok() {
                return Some("the cluster CA changed".into());
            }
        }
        if info.common_name != node_id {
            return Some(format!(
                "it names node {:?}, this node is {node_id:?}",
                info.common_name
            ));
        }
        if let Some(ip) = addrs.iter().find(|ip| !info.ips.contains(ip)) {
            return Some(format!("it does not name the address {ip}"));
        }
        if info.not_after_unix - now_unix < RENEW_DAYS * 86_400 {
            return Some("it expires within 30 days".into());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Bundle;

    #[test]
    fn issued_certificates_name_the_node_and_its_addresses() {
        let b = Bundle::generate("t", 0).unwrap();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let id = NodeIdentity::issue(&b.cluster, &b.ca_cert, &b.ca_key, "n1", &[ip]).unwrap();
        let info = id.info().unwrap();
        assert_eq!(info.common_name, "n1");
        assert!(info.ips.contains(&ip));
        assert!(info.issuer.contains("CA"));
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!(info.not_after_unix > now + 364 * 86_400);
        assert_eq!(id.stale_because(Some(&b.ca_cert), "n1", &[ip], now), None);
        assert!(id
            .stale_because(Some(&b.ca_cert), "n2", &[ip], now)
            .is_some());
        let other: IpAddr = "10.9.9.9".parse().unwrap();
        assert!(id
            .stale_because(Some(&b.ca_cert), "n1", &[other], now)
            .unwrap()
            .contains("10.9.9.9"));
        let b2 = Bundle::generate("t", 0).unwrap();
        assert!(id
            .stale_because(Some(&b2.ca_cert), "n1", &[ip], now)
            .is_some());
        assert!(id
            .stale_because(None, "n1", &[ip], now + 340 * 86_400)
            .is_some());

        let dir = tempfile::tempdir().unwrap();
        assert_eq!(NodeIdentity::load(dir.path()).unwrap(), None);
        id.save(dir.path()).unwrap();
        assert_eq!(NodeIdentity::load(dir.path()).unwrap(), Some(id.clone()));
        use std::os::unix::fs::PermissionsExt;
        let mode = |n: &str| {
            std::fs::metadata(NodeIdentity::dir(dir.path()).join(n))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("node.key"), 0o600);
        assert_eq!(mode("node.crt"), 0o644);
    }

    #[test]
    fn a_renewal_keeps_the_key() {
        let b = crate::identity::Bundle::generate("c", 1).unwrap();
        let first = NodeIdentity::issue(&b.cluster, &b.ca_cert, &b.ca_key, "n1", &[]).unwrap();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let renewed = NodeIdentity::issue_with_key(
            &b.cluster,
            &b.ca_cert,
            &b.ca_key,
            "n1",
            &[ip],
            Some(&first.key_pem),
        )
        .unwrap();
        assert_eq!(renewed.key_pem, first.key_pem);
        assert_ne!(renewed.cert_pem, first.cert_pem);
        let (key, _csr) = request_with_key("n1", Some(&first.key_pem)).unwrap();
        assert_eq!(key, first.key_pem);
    }

    #[test]
    fn a_signed_request_takes_only_the_key_from_the_request() {
        let b = Bundle::generate("t", 0).unwrap();
        let (_key, csr) = request("asked-for").unwrap();
        let cert = sign_request(&b.ca_cert, &b.ca_key, &csr, "joiner", &[]).unwrap();
        let info = cert_info(&cert).unwrap();
        assert_eq!(info.common_name, "joiner");
        assert!(sign_request(&b.ca_cert, &b.ca_key, "garbage", "x", &[]).is_err());
    }
}
