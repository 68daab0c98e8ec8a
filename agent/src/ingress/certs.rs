//! The ingress's certificates on `listen.https`, chosen by the name a client asks for (SNI):
//! those operators upload per host (`certs/<host>`, the key sealed like a secret), else a
//! self-signed one this node makes at start for `<domain>` and `*.<domain>`, so a client
//! that does not check (or trusts it) still gets TLS.
//!
//! A name is looked up as asked, then as the wildcard of its parent (`*.example.com` covers
//! `a.example.com`, not `a.b.example.com`, as RFC 6125 §6.4.3 has it).

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// What an uploaded PEM holds, checked.
#[derive(Debug)]
pub struct Parsed {
    pub key: Arc<CertifiedKey>,
    /// The certificates, leaf first, as PEM (what the store keeps in the clear).
    pub chain_pem: String,
    /// The key as PEM (what the store keeps sealed).
    pub key_pem: String,
    /// The DNS names the leaf is for (its subject alternative names), lowercase.
    pub names: Vec<String>,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

/// Reads a certificate chain (leaf first) and its private key from PEM text, and checks
/// that the key is the leaf's and that the leaf names `host` and is valid `now_ms`.
pub fn parse(pem: &[u8], host: &str, now_ms: u64) -> Result<Parsed, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificates do not read as PEM: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err("no certificate (-----BEGIN CERTIFICATE-----) in the PEM".into());
    };
    let key = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("no private key in the PEM (PKCS#8, PKCS#1 or SEC1): {e}"))?;
    let key_pem = match &key {
        PrivateKeyDer::Pkcs8(k) => pem_encode("PRIVATE KEY", k.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(k) => pem_encode("RSA PRIVATE KEY", k.secret_pkcs1_der()),
        PrivateKeyDer::Sec1(k) => pem_encode("EC PRIVATE KEY", k.secret_sec1_der()),
        _ => return Err("the private key is of a kind this agent does not know".into()),
    };
    let (names, not_before_ms, not_after_ms) = leaf_facts(leaf)?;
    if !covers(&names, host) {
        return Err(format!(
            "the certificate is for {}, not {host}",
            if names.is_empty() {
                "no DNS name".to_string()
            } else {
                names.join(", ")
            }
        ));
    }
    if now_ms >= not_after_ms {
        return Err("the certificate has expired".into());
    }
    if now_ms < not_before_ms {
        return Err("the certificate is not valid yet".into());
    }
    let chain_pem = chain
        .iter()
        .map(|c| pem_encode("CERTIFICATE", c.as_ref()))
        .collect();
    let key = CertifiedKey::from_der(chain, key, &crate::tls::provider())
        .map_err(|e| format!("the key does not go with the certificate: {e}"))?;
    Ok(Parsed {
        key: Arc::new(key),
        chain_pem,
        key_pem,
        names,
        not_before_ms,
        not_after_ms,
    })
}

/// What the store keeps of a certificate, ready to serve.
pub fn load(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, String> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the chain: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate".into());
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("the key: {e}"))?;
    CertifiedKey::from_der(chain, key, &crate::tls::provider())
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// The leaf's DNS names and validity (ms since the epoch).
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, u64, u64), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("the certificate's names do not parse: {e}")),
    };
    names.sort();
    names.dedup();
    let ms = |t: i64| (t.max(0) as u64).saturating_mul(1000);
    Ok((
        names,
        ms(cert.validity().not_before.timestamp()),
        ms(cert.validity().not_after.timestamp()),
    ))
}

/// Whether a certificate for `names` serves `host` (exact, or a wildcard one level up).
pub fn covers(names: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let wild = host
        .split_once('.')
        .map(|(_, parent)| format!("*.{parent}"));
    names.iter().any(|n| *n == host || Some(n) == wild.as_ref())
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The certificates this node serves, by name; the self-signed one for any other.
#[derive(Debug)]
pub struct Certs {
    by_name: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    fallback: Arc<CertifiedKey>,
}

impl Certs {
    /// With a fresh self-signed certificate for `domain` and `*.domain`.
    pub fn new(domain: &str) -> Result<Certs, String> {
        let made =
            rcgen::generate_simple_self_signed(vec![domain.to_string(), format!("*.{domain}")])
                .map_err(|e| format!("cannot make the fallback certificate: {e}"))?;
        let key = PrivateKeyDer::try_from(made.signing_key.serialize_der())
            .map_err(|e| format!("the fallback key: {e}"))?;
        let key =
            CertifiedKey::from_der(vec![made.cert.der().clone()], key, &crate::tls::provider())
                .map_err(|e| format!("the fallback certificate: {e}"))?;
        Ok(Certs {
            by_name: RwLock::new(HashMap::new()),
            fallback: Arc::new(key),
        })
    }

    /// Serves exactly these: each under every name it was uploaded for.
    pub fn replace(&self, by_name: HashMap<String, Arc<CertifiedKey>>) {
        *self.by_name.write().unwrap_or_else(|p| p.into_inner()) = by_name;
    }

    /// The certificate for a name a client asked for.
    pub fn lookup(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.map(str::to_ascii_lowercase) else {
            return self.fallback.clone();
        };
        let m = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = m.get(&name) {
            return k.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = m.get(&format!("*.{parent}")) {
                return k.clone();
            }
        }
        self.fallback.clone()
    }

    /// The TLS configuration of `listen.https`: these certificates, HTTP/2 and HTTP/1.1 by ALPN.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, rustls::Error> {
        let mut c = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(c)
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.lookup(hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> String {
        let made = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        format!("{}{}", made.cert.pem(), made.signing_key.serialize_pem())
    }

    fn now() -> u64 {
        crate::clock::wall_ms()
    }

    #[test]
    fn an_upload_is_checked_for_its_key_its_names_and_its_dates() {
        let pem = self_signed(&["web.example.com", "*.example.org"]);
        let p = parse(pem.as_bytes(), "web.example.com", now()).unwrap();
        assert_eq!(p.names, ["*.example.org", "web.example.com"]);
        assert!(
            p.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
            "{}",
            p.key_pem
        );
        assert!(p.chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(parse(pem.as_bytes(), "a.example.org", now()).is_ok());
        let e = parse(pem.as_bytes(), "a.b.example.org", now()).unwrap_err();
        assert!(e.contains("not a.b.example.org"), "{e}");
        let e = parse(pem.as_bytes(), "web.example.com", u64::MAX / 2).unwrap_err();
        assert!(e.contains("expired"), "{e}");

        // Another certificate's key.
        let other = self_signed(&["web.example.com"]);
        let (cert, _) = pem.split_at(pem.find("-----BEGIN PRIVATE KEY").unwrap());
        let (_, key) = other.split_at(other.find("-----BEGIN PRIVATE KEY").unwrap());
        let e = parse(format!("{cert}{key}").as_bytes(), "web.example.com", now()).unwrap_err();
        assert!(e.contains("does not go with"), "{e}");
        // Halves missing, or not PEM at all.
        assert!(parse(cert.as_bytes(), "web.example.com", now())
            .unwrap_err()
            .contains("no private key"));
        assert!(parse(key.as_bytes(), "web.example.com", now())
            .unwrap_err()
            .contains("no certificate"));
        assert!(parse(b"\x00\xffnot pem", "web.example.com", now()).is_err());
    }

    #[test]
    fn names_are_looked_up_exactly_then_one_wildcard_up_else_the_fallback() {
        let certs = Certs::new("localhost").unwrap();
        let a = parse(
            self_signed(&["a.example.com"]).as_bytes(),
            "a.example.com",
            now(),
        )
        .unwrap();
        let w = parse(
            self_signed(&["*.example.com"]).as_bytes(),
            "b.example.com",
            now(),
        )
        .unwrap();
        certs.replace(HashMap::from([
            ("a.example.com".to_string(), a.key.clone()),
            ("*.example.com".to_string(), w.key.clone()),
        ]));
        assert!(Arc::ptr_eq(&certs.lookup(Some("A.example.com")), &a.key));
        assert!(Arc::ptr_eq(&certs.lookup(Some("b.example.com")), &w.key));
        assert!(Arc::ptr_eq(
            &certs.lookup(Some("x.b.example.com")),
            &certs.fallback
        ));
        assert!(Arc::ptr_eq(&certs.lookup(None), &certs.fallback));
        assert!(covers(&["*.example.com".into()], "q.example.com"));
        assert!(!covers(&["*.example.com".into()], "example.com"));
    }
}
