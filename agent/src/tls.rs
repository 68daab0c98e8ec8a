//! Mutual TLS between members (rustls, ring provider): the server and client configurations
//! built from a node's identity, the verifier that accepts exactly the cluster CA's member
//! certificates, the one used during bootstrap, and the reasons for refusals (`Refusal`).

use crate::identity::cert::{cert_info_der, NodeIdentity, MEMBER_NAME};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad certificate or key: {0}")]
    Pem(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let c = c.map_err(|e| TlsError::Pem(format!("CA: {e}")))?;
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

fn chain(
    identity: &NodeIdentity,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("node certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .map_err(|e| TlsError::Pem(format!("node key: {e}")))?;
    Ok((certs, key))
}

/// Accepts a server certificate when it chains to the cluster CA and names a member, whatever
/// address the peer was dialled at.
#[derive(Debug)]
struct MemberVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let member = ServerName::try_from(MEMBER_NAME)
            .map_err(|_| rustls::Error::General("bad member name".into()))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &member, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS side of a member: what its API listener accepts and how it dials peers.
#[derive(Clone)]
pub struct Tls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl Tls {
    pub fn new(identity: &NodeIdentity) -> Result<Tls, TlsError> {
        let provider = provider();
        let roots = roots(&identity.ca_pem)?;
        // Client certificates are optional at the TLS layer because the same listener serves
        // token-authenticated writes from the CLI; a certificate that is presented must be
        // valid, and every `/peer/` path requires one.
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .allow_unauthenticated()
                .build()?;
        let (certs, key) = chain(identity)?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(certs.clone(), key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build()?;
        // No ALPN here: the HTTP/2 connector sets it.
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(MemberVerifier { inner }))
            .with_client_auth_cert(certs, key)?;
        Ok(Tls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// What the CLI dials the API with: any member's certificate from the cluster CA in `ca_pem`,
/// whatever address it was reached at (a port forward, a load balancer), and no client
/// certificate (the bearer token authenticates).
pub fn operator_client(ca_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let roots = roots(ca_pem)?;
    if roots.is_empty() {
        return Err(TlsError::Pem("no certificate in the CA file".into()));
    }
    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MemberVerifier { inner }))
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(client))
}

/// Checks that `cert` is a member certificate of the CA in `ca_pem` (used by a joiner once the
/// authenticated join reply told it the CA).
pub fn verify_member(ca_pem: &str, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider()).build()?;
    MemberVerifier { inner }.verify_server_cert(
        cert,
        &[],
        &ServerName::try_from(MEMBER_NAME).map_err(|e| TlsError::Pem(e.to_string()))?,
        &[],
        UnixTime::now(),
    )?;
    Ok(())
}

/// Checks member certificates found in the store (the proof of a `nodes/` record) against
/// the cluster CA, with a verifier built once.
pub struct MemberCheck {
    inner: MemberVerifier,
    name: ServerName<'static>,
}

impl MemberCheck {
    pub fn new(ca_pem: &str) -> Result<MemberCheck, TlsError> {
        let inner =
            WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider()).build()?;
        Ok(MemberCheck {
            inner: MemberVerifier { inner },
            name: ServerName::try_from(MEMBER_NAME).map_err(|e| TlsError::Pem(e.to_string()))?,
        })
    }
}

impl crate::identity::vouch::CertCheck for MemberCheck {
    fn check(&self, der: &[u8]) -> Result<(), String> {
        self.inner
            .verify_server_cert(
                &CertificateDer::from(der),
                &[],
                &self.name,
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// For bootstrap: a joiner does not know the CA yet, so it records the server's certificate
/// (checking only that the server holds its key) and verifies it once the join reply, which is
/// authenticated by the join secret, names the CA.
#[derive(Debug)]
pub struct Capture {
    seen: Mutex<Option<CertificateDer<'static>>>,
    algs: WebPkiSupportedAlgorithms,
}

impl Capture {
    pub fn seen(&self) -> Option<CertificateDer<'static>> {
        self.seen.lock().ok().and_then(|s| s.clone())
    }
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(end_entity.clone().into_owned());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A client configuration for the join request, and the capture of the server's certificate.
pub fn bootstrap_client() -> Result<(Arc<ClientConfig>, Arc<Capture>), TlsError> {
    let provider = provider();
    let capture = Arc::new(Capture {
        seen: Mutex::new(None),
        algs: provider.signature_verification_algorithms,
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    Ok((Arc::new(config), capture))
}

/// Why a TLS handshake (or a `/peer/` request) on the API listener was refused: a metrics
/// label each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotTls,
    UnknownCa,
    Expired,
    BadCertificate,
    /// A `/peer/` request on a connection without a client certificate.
    NoClientCertificate,
    PeerAlert,
    /// Timeouts, I/O errors.
    Other,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::NotTls,
        Refusal::UnknownCa,
        Refusal::Expired,
        Refusal::BadCertificate,
        Refusal::NoClientCertificate,
        Refusal::PeerAlert,
        Refusal::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotTls => "not_tls",
            Refusal::UnknownCa => "unknown_ca",
            Refusal::Expired => "expired",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::NoClientCertificate => "no_client_certificate",
            Refusal::PeerAlert => "peer_alert",
            Refusal::Other => "other",
        }
    }

    /// The reason for a handshake error.
    pub fn of(e: &std::io::Error) -> Refusal {
        use rustls::{CertificateError as C, Error as E};
        let Some(re) = e.get_ref().and_then(|r| r.downcast_ref::<rustls::Error>()) else {
            return Refusal::Other;
        };
        match re {
            E::InvalidMessage(_) => Refusal::NotTls,
            E::InvalidCertificate(c) => match c {
                C::UnknownIssuer | C::BadSignature => Refusal::UnknownCa,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => Refusal::Expired,
                _ => Refusal::BadCertificate,
            },
            E::NoCertificatesPresented => Refusal::NoClientCertificate,
            E::AlertReceived(_) => Refusal::PeerAlert,
            _ => Refusal::Other,
        }
    }
}

/// The node id in a verified client certificate chain.
pub fn peer_node_id(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let der = certs?.first()?;
    cert_info_der(der)
        .ok()
        .map(|i| i.common_name)
        .filter(|cn| !cn.is_empty())
}
