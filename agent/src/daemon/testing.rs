//! One node's core, in-process, for tests of what is built on `state::Handle` (the executor
//! over a fake runtime, in virtual time): a new cluster, this node's certificate from its CA,
//! a store under a directory, no peers, no listeners.

use super::{start, Core, Security};
use crate::config::AgentConfig;
use crate::identity::cert::NodeIdentity;
use crate::identity::vouch::{NodeSigner, OperatorKey, Vouchers};
use crate::identity::{Bundle, Trust};
use crate::state::Counters;
use crate::store::NodeId;
use crate::tls::{MemberCheck, Tls};
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A running core and what a test needs to drive it.
pub struct TestNode {
    pub core: Core,
    /// Signs desired state (apps, secrets) as an operator would.
    pub operator: Arc<OperatorKey>,
    /// Stops the core loop.
    pub stop: CancellationToken,
}

/// Starts node `id`'s core with its store under `dir`. Panics on a setup failure: test only.
pub fn single_node(dir: &Path, id: &str) -> TestNode {
    let b = Bundle::generate("test", crate::clock::wall_ms()).expect("a bundle");
    let identity = NodeIdentity::issue(&b.cluster, &b.ca_cert, &b.ca_key, id, &[]).expect("a cert");
    let trust = Trust::new(
        b.cluster.clone(),
        b.ca_cert.clone(),
        Some(b.ca_key.clone()),
        b.join_secret.clone(),
        b.secret_key().expect("the data key"),
        0,
    )
    .expect("trust");
    let signer = NodeSigner::new(&identity.key_pem, &identity.cert_pem).expect("a signer");
    let vouch = Vouchers::new(
        Arc::new(MemberCheck::new(&b.ca_cert).expect("the CA")),
        trust.operator.into_iter().collect(),
    );
    let security = Security {
        tls: Tls::new(&identity).expect("TLS"),
        trust: Arc::new(trust),
        signer: Arc::new(signer),
        vouch: Box::new(vouch),
    };
    let cfg = AgentConfig {
        state_dir: dir.to_path_buf(),
        ..AgentConfig::default()
    };
    let stop = CancellationToken::new();
    let core = start(
        &cfg,
        NodeId::new(id).expect("a node id"),
        "127.0.0.1:1".into(),
        security,
        Arc::new(Counters::default()),
        stop.clone(),
    )
    .expect("the core");
    TestNode {
        core,
        operator: Arc::new(OperatorKey::from_token(&b.admin_token, &b.cluster.id)),
        stop,
    }
}
