//! Certificates from an ACME CA (RFC 8555) for the hosts of apps that ask for them
//! (`[expose] acme = true`), from the CA the agent config names (`[acme]`).
//!
//! Each host has one owner: the live member ranking highest for it by rendezvous hash, so
//! no leader is elected and a dead owner's hosts pass to the next. The owner orders when the
//! host has no certificate from this CA, or when less than `renew_before` (a third of the
//! life, for short-lived ones) is left. The HTTP-01 challenge goes to the store
//! (`acme/challenges/<token>`), so whichever node the CA's lookup reaches answers it; the
//! owner asks the CA to look once every live node answers it (asked through the hop, as the
//! CA would ask), or after a bound. The certificate goes to `acme/certs/<host>`, its key
//! sealed like a secret, and every node serves it by SNI unless an operator uploaded one
//! for the host (`certs/<host>`), which wins. A failed order is recorded
//! (`acme/failures/<host>`, shown on `/v1/apps`) and tried again later, waiting twice as
//! long each time (a minute to six hours), by whichever member owns the host by then.

use crate::config;
use crate::ingress::{certs, proxy::Proxy};
use crate::state::records::{self, AcmeAccount, AcmeCert, AcmeChallenge, AcmeFailure, CertRecord};
use crate::state::Handle;
use crate::store::{keys, Key, Keyspace};
use bytes::Bytes;
use http_body_util::Limited;
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, Identifier,
    NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The first wait after a failed order; it doubles with each failure in a row.
const RETRY_BASE_MS: u64 = 60_000;
/// The longest wait between orders for a host that keeps failing.
const RETRY_MAX_MS: u64 = 6 * 3_600_000;
/// How long the owner waits for every node to answer a challenge before the CA is asked.
const SPREAD_WITHIN: Duration = Duration::from_secs(10);
/// An answer from the CA: more is refused.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// How long one request to the CA may take.
const REQUEST_WITHIN: Duration = Duration::from_secs(30);

/// Whether a host needs a certificate ordered now: it has none from `directory` that names
/// it, or the one it has is within `renew_before_ms` (or a third of its life) of expiring.
pub fn due(
    cert: Option<&AcmeCert>,
    host: &str,
    directory: &str,
    renew_before_ms: u64,
    now_ms: u64,
) -> bool {
    let Some(c) = cert else {
        return true;
    };
    if c.directory != directory || !certs::covers(&c.cert.names, host) {
        return true;
    }
    let life = c.cert.not_after_ms.saturating_sub(c.not_before_ms);
    let before = renew_before_ms.min(life / 3);
    now_ms.saturating_add(before) >= c.cert.not_after_ms
}

/// When a host whose orders failed may be ordered for again.
pub fn retry_at(f: &AcmeFailure) -> u64 {
    let doublings = f.failures.saturating_sub(1).min(20);
    f.at_ms
        .saturating_add((RETRY_BASE_MS << doublings).min(RETRY_MAX_MS))
}

/// The member that orders for `host`: the highest by rendezvous hash among `live`.
pub fn owner<'a>(host: &str, live: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let key = format!("acme/{host}");
    live.into_iter()
        .max_by_key(|n| (crate::scheduler::rank(&key, u32::MAX, n), *n))
}

/// The hosts some app asks a certificate for.
pub fn wanted(apps: &[records::AppRecord]) -> BTreeSet<String> {
    apps.iter()
        .filter(|a| a.spec.expose.acme)
        .flat_map(|a| a.spec.expose.hosts.iter().cloned())
        .collect()
}

/// A short, stable name for a directory URL (its account's key).
fn directory_id(url: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, url.as_bytes());
    crate::identity::join::hex(&d.as_ref()[..8])
}

/// The HTTP client instant-acme talks to the CA with: ours, HTTPS only, answers bounded.
struct Http(Client<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>);

impl instant_acme::HttpClient for Http {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let sent = tokio::time::timeout(REQUEST_WITHIN, self.0.request(req));
        Box::pin(async move {
            match sent.await {
                Ok(Ok(resp)) => {
                    let (parts, body) = resp.into_parts();
                    Ok(BytesResponse::from(Response::from_parts(
                        parts,
                        Limited::new(body, MAX_ANSWER_BYTES),
                    )))
                }
                Ok(Err(e)) => Err(instant_acme::Error::Other(crate::error_chain(&e).into())),
                Err(_) => Err(instant_acme::Error::Str("the CA did not answer in time")),
            }
        })
    }
}

/// What the owner loop needs: the CA, and how to reach it.
pub struct Acme {
    directory: String,
    contact: Vec<String>,
    tls: rustls::ClientConfig,
    renew_before_ms: u64,
    check_every: Duration,
    order_within: Duration,
    /// The account, once opened or made, for `directory`.
    account: Option<Account>,
}

impl Acme {
    /// From the agent config; an error names a CA file that cannot be read.
    pub fn new(c: &config::Acme) -> Result<Acme, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &c.ca {
            Some(path) => {
                use rustls_pki_types::pem::PemObject;
                let pem =
                    std::fs::read(path).map_err(|e| format!("acme.ca {}: {e}", path.display()))?;
                for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| format!("acme.ca {}: {e}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("acme.ca {}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("acme.ca {}: no certificate", path.display()));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Acme {
            directory: c.directory.clone(),
            contact: c.contact.clone(),
            tls,
            renew_before_ms: c.renew_before_days.saturating_mul(86_400_000),
            check_every: Duration::from_millis(c.check_interval_ms),
            order_within: Duration::from_millis(c.order_timeout_ms),
            account: None,
        })
    }

    fn http(&self) -> Box<dyn instant_acme::HttpClient> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        Box::new(Http(Client::builder(TokioExecutor::new()).build(https)))
    }

    /// The cluster's account with the CA: the one in the store, else a new one (recorded).
    async fn account(&mut self, h: &Handle) -> Result<Account, String> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let key = keys::acme_account(&directory_id(&self.directory)).map_err(|e| e.to_string())?;
        let kept = read::<AcmeAccount>(h, &key).filter(|a| a.directory == self.directory);
        let opened = kept.and_then(|a| {
            let sealed = crate::identity::join::unhex(&a.credentials_sealed)?;
            let plain = h.trust.secrets.open(key.as_str(), &sealed).ok()?;
            serde_json::from_slice::<instant_acme::AccountCredentials>(&plain).ok()
        });
        let account = match opened {
            Some(creds) => Account::builder_with_http(self.http())
                .from_credentials(creds)
                .await
                .map_err(|e| format!("the account: {}", crate::error_chain(&e)))?,
            None => {
                let contact: Vec<&str> = self.contact.iter().map(String::as_str).collect();
                let (account, creds) = Account::builder_with_http(self.http())
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.directory.clone(),
                        None,
                    )
                    .await
                    .map_err(|e| format!("a new account: {}", crate::error_chain(&e)))?;
                let plain = serde_json::to_vec(&creds).map_err(|e| e.to_string())?;
                let sealed = h
                    .trust
                    .secrets
                    .seal(key.as_str(), &plain)
                    .map_err(|e| e.to_string())?;
                let record = AcmeAccount {
                    directory: self.directory.clone(),
                    credentials_sealed: crate::identity::join::hex(&sealed),
                };
                write(h, key, Some(&record)).await?;
                tracing::info!(directory = %self.directory, id = %account.id(), "ACME account created");
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }

    /// Orders a certificate for `host` (opening or making the account first), all within
    /// `order_within`; the challenge records go again, whatever the outcome.
    async fn order(&mut self, h: &Handle, proxy: &Proxy, host: &str) -> Result<AcmeCert, String> {
        let within = self.order_within;
        let mut written = Vec::new();
        // The account too: a CA that never finishes an answer holds up no other host.
        let got = tokio::time::timeout(within, async {
            let account = self.account(h).await?;
            self.order_with(h, proxy, &account, host, &mut written)
                .await
        })
        .await
        .unwrap_or_else(|_| Err(format!("the order took longer than {within:?}")));
        if !written.is_empty() {
            let gone = written.into_iter().map(|k| (k, None)).collect();
            if let Err(e) = h.write(gone).await {
                tracing::debug!(err = %e, "cannot remove ACME challenges");
            }
        }
        if got.is_err() {
            // A CA that forgot the account (or a reset one) gets a new account next time.
            self.account = None;
        }
        got
    }

    async fn order_with(
        &self,
        h: &Handle,
        proxy: &Proxy,
        account: &Account,
        host: &str,
        written: &mut Vec<Key>,
    ) -> Result<AcmeCert, String> {
        let acme_err =
            |what: &str, e: instant_acme::Error| format!("{what}: {}", crate::error_chain(&e));
        let ids = [Identifier::Dns(host.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(|e| acme_err("the new order", e))?;
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a.map_err(|e| acme_err("the authorization", e))?;
            match a.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(format!("the authorization is {other:?}")),
            }
            let mut ch = a
                .challenge(ChallengeType::Http01)
                .ok_or("the CA offers no HTTP-01 challenge")?;
            let token = ch.token.clone();
            if token.is_empty()
                || token.len() > 256
                || !token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err("the CA's challenge token is not base64url".into());
            }
            let key_authorization = ch.key_authorization().as_str().to_string();
            let key = keys::acme_challenge(&token).map_err(|e| e.to_string())?;
            let record = AcmeChallenge {
                host: host.to_string(),
                key_authorization: key_authorization.clone(),
                expires_ms: crate::clock::wall_ms()
                    .saturating_add(self.order_within.as_millis() as u64),
            };
            write(h, key.clone(), Some(&record)).await?;
            written.push(key);
            spread(h, proxy, host, &token, &key_authorization).await;
            ch.set_ready()
                .await
                .map_err(|e| acme_err("the challenge", e))?;
        }
        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(self.order_within);
        match order.poll_ready(&retries).await {
            Ok(OrderStatus::Ready) => {}
            Ok(status) => return Err(format!("the order is {status:?}, not ready")),
            Err(e) => return Err(acme_err("the validation", e)),
        }
        let key_pem = order
            .finalize()
            .await
            .map_err(|e| acme_err("the finalization", e))?;
        let chain = order
            .poll_certificate(&retries)
            .await
            .map_err(|e| acme_err("the certificate", e))?;
        let now = crate::clock::wall_ms();
        let parsed = certs::parse(format!("{chain}\n{key_pem}").as_bytes(), host, now)
            .map_err(|e| format!("the issued certificate: {e}"))?;
        let key = keys::acme_cert(host).map_err(|e| e.to_string())?;
        let sealed = h
            .trust
            .secrets
            .seal(key.as_str(), parsed.key_pem.as_bytes())
            .map_err(|e| e.to_string())?;
        Ok(AcmeCert {
            cert: CertRecord {
                chain_pem: parsed.chain_pem,
                key_sealed: crate::identity::join::hex(&sealed),
                names: parsed.names,
                not_after_ms: parsed.not_after_ms,
            },
            directory: self.directory.clone(),
            issued_ms: now,
            not_before_ms: parsed.not_before_ms,
            by: h.me.id.to_string(),
        })
    }

    /// One look at every wanted host: orders those this node owns that are due.
    async fn round(&mut self, h: &Handle, proxy: &Proxy) {
        let Ok(snap) = h.snapshot().await else {
            return;
        };
        let me = h.me.id.as_str();
        let mut live: Vec<&str> = snap
            .members
            .iter()
            .filter(|m| m.state.is_live())
            .map(|m| m.id.as_str())
            .collect();
        live.push(me);
        let hosts = wanted(&records::apps(&h.store));
        let issued: BTreeMap<String, AcmeCert> = records::acme(&h.store, "certs");
        let failed: BTreeMap<String, AcmeFailure> = records::acme(&h.store, "failures");
        let now = crate::clock::wall_ms();
        for host in &hosts {
            if owner(host, live.iter().copied()) != Some(me)
                || !due(
                    issued.get(host),
                    host,
                    &self.directory,
                    self.renew_before_ms,
                    now,
                )
                || failed.get(host).is_some_and(|f| now < retry_at(f))
            {
                continue;
            }
            tracing::info!(%host, directory = %self.directory, "ordering a certificate");
            let (Ok(cert_key), Ok(fail_key)) = (keys::acme_cert(host), keys::acme_failure(host))
            else {
                continue;
            };
            match self.order(h, proxy, host).await {
                Ok(cert) => {
                    tracing::info!(%host, not_after_ms = cert.cert.not_after_ms, "certificate issued");
                    let value = serde_json::to_vec(&cert).ok().map(Bytes::from);
                    let mut ops = vec![(cert_key, value)];
                    if failed.contains_key(host) {
                        ops.push((fail_key, None));
                    }
                    if let Err(e) = h.write(ops).await {
                        tracing::warn!(%host, err = %e, "cannot record the certificate");
                    }
                }
                Err(error) => {
                    let failures = failed.get(host).map_or(0, |f| f.failures).saturating_add(1);
                    let f = AcmeFailure {
                        failures,
                        error: crate::http::short(&error).to_string(),
                        at_ms: crate::clock::wall_ms(),
                        by: me.to_string(),
                    };
                    tracing::warn!(%host, %error, failures, retry_at_ms = retry_at(&f), "the certificate order failed");
                    if let Err(e) = write(h, fail_key, Some(&f)).await {
                        tracing::warn!(%host, err = %e, "cannot record the failed order");
                    }
                }
            }
        }
        // What no app asks for any more goes, by whoever owns it; a challenge whose
        // order's time is up goes by its host's owner.
        let mut gone = Vec::new();
        for (space, names) in [
            ("certs", issued.keys().cloned().collect::<Vec<_>>()),
            ("failures", failed.keys().cloned().collect()),
        ] {
            for host in names {
                if !hosts.contains(&host) && owner(&host, live.iter().copied()) == Some(me) {
                    gone.extend(Key::join(Keyspace::Acme, &[space, &host]).ok());
                }
            }
        }
        for (token, c) in records::acme::<AcmeChallenge>(&h.store, "challenges") {
            if c.expires_ms < now && owner(&c.host, live.iter().copied()) == Some(me) {
                gone.extend(keys::acme_challenge(&token).ok());
            }
        }
        if !gone.is_empty() {
            let ops = gone.into_iter().map(|k| (k, None)).collect();
            if let Err(e) = h.write(ops).await {
                tracing::debug!(err = %e, "cannot remove stale ACME records");
            }
        }
    }
}

/// Waits (bounded) until every live node answers the challenge, this one included: the CA
/// may ask any of them.
async fn spread(h: &Handle, proxy: &Proxy, host: &str, token: &str, key_authorization: &str) {
    let deadline = crate::clock::now() + SPREAD_WITHIN;
    let path = format!("{}{token}", super::proxy::ACME_CHALLENGE);
    let Ok(snap) = h.snapshot().await else {
        return;
    };
    let addrs: BTreeMap<String, String> = records::nodes(&h.store)
        .into_iter()
        .map(|n| (n.id, n.addr))
        .collect();
    let mut waiting: Vec<String> = snap
        .members
        .iter()
        .filter(|m| m.state.is_live() && m.id != h.me.id)
        .filter_map(|m| addrs.get(m.id.as_str()).cloned())
        .collect();
    let mut here = false;
    loop {
        here = here || proxy.challenge(token, host).as_deref() == Some(key_authorization);
        let mut still = Vec::new();
        for addr in waiting {
            let answered = proxy.ask_node(&addr, host, &path).await;
            if !matches!(&answered, Some((s, b)) if s.is_success() && b.as_ref() == key_authorization.as_bytes())
            {
                still.push(addr);
            }
        }
        waiting = still;
        if here && waiting.is_empty() {
            return;
        }
        if crate::clock::now() >= deadline {
            tracing::warn!(%host, here, not_yet = ?waiting, "not every node answers the challenge yet: asking the CA anyway");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where each of `hosts` stands, as `/v1/apps` shows it: the certificate served (uploaded
/// or from the CA, until when) and the latest failed order, if any.
pub fn status(store: &crate::store::DiskBackend, hosts: &[String]) -> serde_json::Value {
    let uploaded = records::certs(store);
    let issued: BTreeMap<String, AcmeCert> = records::acme(store, "certs");
    let failed: BTreeMap<String, AcmeFailure> = records::acme(store, "failures");
    hosts
        .iter()
        .map(|host| {
            let mut v = serde_json::json!({ "host": host });
            if let Some(c) = uploaded.get(host) {
                v["served"] =
                    serde_json::json!({"source": "uploaded", "not_after_ms": c.not_after_ms});
            } else if let Some(c) = issued.get(host) {
                v["served"] = serde_json::json!({
                    "source": "acme",
                    "directory": c.directory,
                    "issued_ms": c.issued_ms,
                    "not_after_ms": c.cert.not_after_ms,
                    "by": c.by,
                });
            }
            if let Some(f) = failed.get(host) {
                v["failed"] = serde_json::json!({
                    "error": f.error,
                    "failures": f.failures,
                    "at_ms": f.at_ms,
                    "retry_at_ms": retry_at(f),
                    "by": f.by,
                });
            }
            v
        })
        .collect()
}

fn read<T: serde::de::DeserializeOwned>(h: &Handle, key: &Key) -> Option<T> {
    let (e, _) = crate::store::replica::read_entry(&h.store, key.as_str()).ok()??;
    serde_json::from_slice(e.value.as_deref()?).ok()
}

async fn write<T: serde::Serialize>(h: &Handle, key: Key, value: Option<&T>) -> Result<(), String> {
    let value = match value {
        Some(v) => Some(Bytes::from(
            serde_json::to_vec(v).map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    h.write(vec![(key, value)])
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The owner loop: a round every `check_interval`, and soon after apps or members change.
pub async fn run(h: Handle, mut acme: Acme, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut changes = h.subscribe();
    let mut members = h.members.clone();
    loop {
        // Nothing asks for a certificate: nothing to read or order.
        if records::apps(&h.store).iter().any(|a| a.spec.expose.acme)
            || !records::acme::<serde_json::Value>(&h.store, "certs").is_empty()
        {
            acme.round(&h, &proxy).await;
        }
        let next = tokio::time::sleep(acme.check_every);
        tokio::pin!(next);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut next => break,
                m = members.changed() => {
                    if m.is_err() {
                        return;
                    }
                    break;
                }
                c = changes.recv() => match c {
                    Ok(c) if c.entry.key.keyspace() != Keyspace::Apps => continue,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        while changes.try_recv().is_ok() {}
                        break;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
        // Changes come in bursts (a deploy, a member's comings and goings): one round.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while changes.try_recv().is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(directory: &str, names: &[&str], not_before_ms: u64, not_after_ms: u64) -> AcmeCert {
        AcmeCert {
            cert: CertRecord {
                chain_pem: String::new(),
                key_sealed: String::new(),
                names: names.iter().map(|s| s.to_string()).collect(),
                not_after_ms,
            },
            directory: directory.into(),
            issued_ms: not_before_ms,
            not_before_ms,
            by: "n1".into(),
        }
    }

    const DAY: u64 = 86_400_000;

    #[test]
    fn a_host_is_due_without_a_certificate_from_this_ca_for_it_or_near_its_end() {
        let d = "https://ca/dir";
        let c = cert(d, &["a.example.com"], 0, 90 * DAY);
        assert!(due(None, "a.example.com", d, 30 * DAY, 0));
        assert!(!due(Some(&c), "a.example.com", d, 30 * DAY, 59 * DAY));
        assert!(due(Some(&c), "a.example.com", d, 30 * DAY, 60 * DAY));
        // Another CA's, or another name's, is ordered again.
        assert!(due(
            Some(&c),
            "a.example.com",
            "https://other/dir",
            30 * DAY,
            DAY
        ));
        assert!(due(Some(&c), "b.example.com", d, 30 * DAY, DAY));
        // A six-day certificate is renewed with two days left, not thirty.
        let short = cert(d, &["a.example.com"], 0, 6 * DAY);
        assert!(!due(Some(&short), "a.example.com", d, 30 * DAY, 3 * DAY));
        assert!(due(Some(&short), "a.example.com", d, 30 * DAY, 4 * DAY));
    }

    #[test]
    fn failed_orders_wait_twice_as_long_each_time_up_to_six_hours() {
        let f = |failures| AcmeFailure {
            failures,
            error: String::new(),
            at_ms: 1_000,
            by: "n1".into(),
        };
        assert_eq!(retry_at(&f(1)), 1_000 + 60_000);
        assert_eq!(retry_at(&f(2)), 1_000 + 120_000);
        assert_eq!(retry_at(&f(4)), 1_000 + 480_000);
        assert_eq!(retry_at(&f(30)), 1_000 + RETRY_MAX_MS);
        assert_eq!(retry_at(&f(u32::MAX)), 1_000 + RETRY_MAX_MS);
    }

    #[test]
    fn each_host_has_one_owner_and_a_gone_owners_hosts_spread_over_the_rest() {
        let nodes = ["n1", "n2", "n3"];
        let hosts: Vec<String> = (0..60).map(|i| format!("h{i}.example.com")).collect();
        let mut by = BTreeMap::<&str, usize>::new();
        for h in &hosts {
            let o = owner(h, nodes).unwrap();
            // The same answer whatever order the members are listed in.
            assert_eq!(owner(h, ["n3", "n1", "n2"]), Some(o));
            *by.entry(o).or_default() += 1;
            // Without n3, n3's hosts move and no other host does.
            let without = owner(h, ["n1", "n2"]).unwrap();
            if o != "n3" {
                assert_eq!(without, o);
            }
        }
        assert_eq!(by.len(), 3, "every node owns some of 60 hosts: {by:?}");
        assert_eq!(owner("a", std::iter::empty::<&str>()), None);
    }
}
