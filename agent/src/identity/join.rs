//! TLS bootstrap with the join secret, in the spirit of kubeadm's token discovery.
//!
//! A node that holds only the join secret sends a member `POST /peer/v1/join` with a CSR and an
//! HMAC-SHA256 over it keyed by the secret. The member checks the HMAC, signs a certificate for
//! the CSR's key, and answers with the certificate, the CA and the cluster info, with an HMAC
//! over all of it and the joiner's nonce. The joiner checks that HMAC (so a node that does not
//! know the secret cannot hand out a CA) and that the certificate the member presented in the
//! TLS handshake chains to that CA. Nothing about the secret crosses the wire. The reply also
//! carries the cluster's data key wrapped for that secret (`secrets::SecretKey::wrap`).
//!
//! The secret a member checks joins against is its own, until an operator rotates it
//! (`PUT /v1/cluster/join-secret`): the new one then travels in `cluster/join`, sealed with the
//! data key, and every member checks joins against that one only.

use super::ClusterInfo;
use ring::hmac;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

pub const JOIN_PATH: &str = "/peer/v1/join";
const REQUEST_LABEL: &[u8] = b"shoal join request v1";
const REPLY_LABEL: &[u8] = b"shoal join reply v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub node_id: String,
    pub addrs: Vec<IpAddr>,
    pub csr: String,
    pub nonce: String,
    pub mac: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinReply {
    pub cluster: ClusterInfo,
    pub ca: String,
    pub cert: String,
    /// The cluster's data key wrapped for the join secret the request was signed with.
    #[serde(default)]
    pub data_key: String,
    pub mac: String,
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// HMAC over length-prefixed parts, so no two different part lists sign the same bytes.
fn tag(secret: &str, parts: &[&[u8]]) -> hmac::Tag {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.trim().as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    ctx.sign()
}

fn check(secret: &str, parts: &[&[u8]], mac: &str) -> bool {
    let Some(mac) = unhex(mac) else { return false };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.trim().as_bytes());
    let mut msg = Vec::new();
    for p in parts {
        msg.extend_from_slice(&(p.len() as u64).to_be_bytes());
        msg.extend_from_slice(p);
    }
    // Constant time.
    hmac::verify(&key, &msg, &mac).is_ok()
}

fn addrs_text(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl JoinRequest {
    pub fn new(secret: &str, node_id: &str, addrs: &[IpAddr], csr: &str) -> JoinRequest {
        let nonce = hex(&rand::random::<[u8; 16]>());
        let a = addrs_text(addrs);
        let mac = tag(
            secret,
            &[
                REQUEST_LABEL,
                node_id.as_bytes(),
                a.as_bytes(),
                csr.as_bytes(),
                nonce.as_bytes(),
            ],
        );
        JoinRequest {
            node_id: node_id.into(),
            addrs: addrs.to_vec(),
            csr: csr.into(),
            nonce,
            mac: hex(mac.as_ref()),
        }
    }

    /// Whether the request was made with `secret` (constant-time).
    pub fn verify(&self, secret: &str) -> bool {
        let a = addrs_text(&self.addrs);
        check(
            secret,
            &[
                REQUEST_LABEL,
                self.node_id.as_bytes(),
                a.as_bytes(),
                self.csr.as_bytes(),
                self.nonce.as_bytes(),
            ],
            &self.mac,
        )
    }
}

impl JoinReply {
    fn parts<'a>(
        cluster: &'a [u8],
        ca: &'a str,
        cert: &'a str,
        data_key: &'a str,
        nonce: &'a str,
    ) -> [&'a [u8]; 6] {
        [
            REPLY_LABEL,
            cluster,
            ca.as_bytes(),
            cert.as_bytes(),
            data_key.as_bytes(),
            nonce.as_bytes(),
        ]
    }

    pub fn new(
        secret: &str,
        req: &JoinRequest,
        cluster: &ClusterInfo,
        ca: &str,
        cert: &str,
        data_key: &str,
    ) -> Self {
        let c = serde_json::to_vec(cluster).unwrap_or_default();
        let mac = tag(secret, &Self::parts(&c, ca, cert, data_key, &req.nonce));
        JoinReply {
            cluster: cluster.clone(),
            ca: ca.into(),
            cert: cert.into(),
            data_key: data_key.into(),
            mac: hex(mac.as_ref()),
        }
    }

    /// Whether the reply to `req` came from a holder of `secret`.
    pub fn verify(&self, secret: &str, req: &JoinRequest) -> bool {
        let c = serde_json::to_vec(&self.cluster).unwrap_or_default();
        check(
            secret,
            &Self::parts(&c, &self.ca, &self.cert, &self.data_key, &req.nonce),
            &self.mac,
        )
    }
}

/// The value at `cluster/join`: the join secret in force, sealed with the cluster's data key
/// (bound to that key name), and its fingerprint for people to compare.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinSecretRecord {
    pub sealed: String,
    pub fingerprint: String,
    pub set_at_ms: u64,
}

impl JoinSecretRecord {
    pub fn new(
        key: &super::secrets::SecretKey,
        secret: &str,
        cluster_id: &str,
        now_ms: u64,
    ) -> Result<JoinSecretRecord, super::secrets::SealError> {
        let sealed = key.seal(crate::store::keys::JOIN_SECRET, secret.trim().as_bytes())?;
        Ok(JoinSecretRecord {
            sealed: hex(&sealed),
            fingerprint: fingerprint(secret, cluster_id),
            set_at_ms: now_ms,
        })
    }

    /// The join secret, if this record opens with `key`.
    pub fn open(&self, key: &super::secrets::SecretKey) -> Option<String> {
        let sealed = unhex(&self.sealed)?;
        let plain = key.open(crate::store::keys::JOIN_SECRET, &sealed).ok()?;
        String::from_utf8(plain).ok()
    }
}

/// A join secret's fingerprint: 16 hex digits of SHA-256 over the cluster id and the secret.
/// Says which secret is in force without revealing it.
pub fn fingerprint(secret: &str, cluster_id: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("shoal join secret v1\0{cluster_id}\0{}", secret.trim()).as_bytes(),
    );
    hex(&d.as_ref()[..8])
}

/// A join secret an operator may set: 32 to 256 printable ASCII characters (what
/// `shoal gen token` prints has 64).
pub fn check_join_secret(secret: &str) -> Result<&str, String> {
    let s = secret.trim();
    if s.len() < 32 || s.len() > 256 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "a join secret is 32 to 256 printable ASCII characters without spaces (this one has {}): make one with `shoal gen token`",
            s.len()
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_bind_every_field_and_the_secret() {
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let r = JoinRequest::new("s3cret", "n1", &[ip], "CSR");
        assert!(r.verify("s3cret"));
        assert!(
            r.verify("s3cret\n"),
            "a trailing newline from the file is not part of it"
        );
        assert!(!r.verify("other"));
        for tamper in [
            |r: &mut JoinRequest| r.node_id = "n2".into(),
            |r: &mut JoinRequest| r.addrs.clear(),
            |r: &mut JoinRequest| r.csr.push('x'),
            |r: &mut JoinRequest| r.nonce = "00".into(),
            |r: &mut JoinRequest| r.mac = "zz".into(),
            |r: &mut JoinRequest| r.mac.truncate(10),
        ] {
            let mut t = r.clone();
            tamper(&mut t);
            assert!(!t.verify("s3cret"));
        }
        let cluster = ClusterInfo {
            name: "c".into(),
            id: "id".into(),
            created_at_ms: 1,
            operator_key: None,
        };
        let reply = JoinReply::new("s3cret", &r, &cluster, "CA", "CERT", "WRAPPED");
        assert!(reply.verify("s3cret", &r));
        assert!(!reply.verify("other", &r));
        let r2 = JoinRequest::new("s3cret", "n1", &[ip], "CSR");
        assert!(
            !reply.verify("s3cret", &r2),
            "a reply is bound to its request's nonce"
        );
        let mut forged = reply.clone();
        forged.ca = "EVIL CA".into();
        assert!(!forged.verify("s3cret", &r));
        let mut forged = reply.clone();
        forged.data_key = "OTHER".into();
        assert!(!forged.verify("s3cret", &r));
    }

    #[test]
    fn the_join_secret_in_force_opens_only_with_the_data_key() {
        use crate::identity::secrets::SecretKey;
        let key = SecretKey::random().unwrap();
        let secret = "a".repeat(64);
        let rec = JoinSecretRecord::new(&key, &secret, "c", 5).unwrap();
        assert!(!rec.sealed.contains(&secret) && rec.fingerprint.len() == 16);
        assert_eq!(rec.fingerprint, fingerprint(&(secret.clone() + "\n"), "c"));
        assert_ne!(rec.fingerprint, fingerprint(&secret, "d"));
        assert_eq!(rec.open(&key).as_deref(), Some(secret.as_str()));
        assert_eq!(rec.open(&SecretKey::random().unwrap()), None);
        let mut t = rec.clone();
        t.sealed.replace_range(0..2, "00");
        assert_eq!(t.open(&key), None);
        assert!(check_join_secret(&secret).is_ok());
        assert!(check_join_secret("short").is_err());
        assert!(check_join_secret(&format!("{} x", "a".repeat(40))).is_err());
        assert!(check_join_secret(&"a".repeat(257)).is_err());
    }
}
