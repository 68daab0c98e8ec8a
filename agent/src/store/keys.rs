//! Every key the agent writes, built in one place (ARCHITECTURE.md's state model):
//! `nodes/<id>`, `tasks/<node>/<app>/<replica>`, `apps/<name>`, `secrets/<app>/<NAME>`,
//! `revoked/<id>`, `cluster/join`, `cluster/drain/<id>`, `history/<app>`, `rollouts/<app>/<revision>`,
//! `images/<id>`, `scale/<app>`, `metrics/<node>/ingress`, `acme/...`. Each builder validates like `Key::parse`.

use super::{Key, Keyspace, NodeId, StoreError};

/// A node's own record.
pub fn node(id: &NodeId) -> Result<Key, StoreError> {
    Key::join(Keyspace::Nodes, &[id.as_str()])
}

/// One replica's observed state, written by the node that runs it.
pub fn task(node: &str, app: &str, replica: u32) -> Result<Key, StoreError> {
    Key::join(Keyspace::Tasks, &[node, app, &replica.to_string()])
}

/// The prefix (within `tasks/`) of one node's task records.
pub fn tasks_of(node: &str) -> String {
    format!("{node}/")
}

/// The images a node holds.
pub fn images(id: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Images, &[id])
}

/// An app's spec.
pub fn app(name: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Apps, &[name])
}

/// An app's earlier specs, newest first.
pub fn history(app: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::History, &[app])
}

/// How the latest rollout of one of an app's revisions ended.
pub fn rollout(app: &str, revision: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Rollouts, &[app, revision])
}

/// One of an app's secrets, sealed.
pub fn secret(app: &str, name: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Secrets, &[app, name])
}

/// The ingress's certificate for a host (or `*.domain`), uploaded by an operator.
pub fn cert(host: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Certs, &[host])
}

/// The ACME account the cluster holds with one CA (`dir`: a digest of its directory URL).
pub fn acme_account(dir: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Acme, &["account", dir])
}

/// The certificate an ACME CA issued for a host.
pub fn acme_cert(host: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Acme, &["certs", host])
}

/// An HTTP-01 challenge every node answers while an order waits on it.
pub fn acme_challenge(token: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Acme, &["challenges", token])
}

/// Why a host's latest orders failed, and how many in a row.
pub fn acme_failure(host: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Acme, &["failures", host])
}

/// The replica count the autoscaler chose for an app.
pub fn scale(app: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Scale, &[app])
}

/// What a node's ingress saw of each app over its last interval (`metrics/<node>/ingress`).
pub fn load(node: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Metrics, &[node, "ingress"])
}

/// An evicted node.
pub fn revoked(id: &NodeId) -> Result<Key, StoreError> {
    Key::join(Keyspace::Revoked, &[id.as_str()])
}

/// A node's drain mark: nothing new is placed on it, and its replicas move off.
pub fn drain(id: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Cluster, &["drain", id])
}

/// The prefix (within `cluster/`) of the drain marks.
pub const DRAIN_PREFIX: &str = "drain/";

/// The join secret in force after a rotation.
pub const JOIN_SECRET: &str = "cluster/join";

pub fn join_secret() -> Result<Key, StoreError> {
    Key::parse(JOIN_SECRET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_documented_ones() {
        let n = NodeId::new("n1").unwrap();
        assert_eq!(node(&n).unwrap().as_str(), "nodes/n1");
        assert_eq!(task("n1", "web", 2).unwrap().as_str(), "tasks/n1/web/2");
        assert_eq!(app("web").unwrap().as_str(), "apps/web");
        assert_eq!(secret("web", "K").unwrap().as_str(), "secrets/web/K");
        assert_eq!(revoked(&n).unwrap().as_str(), "revoked/n1");
        assert_eq!(history("web").unwrap().as_str(), "history/web");
        assert_eq!(images("n1").unwrap().as_str(), "images/n1");
        assert!(images("bad id").is_err());
        assert_eq!(drain("n1").unwrap().as_str(), "cluster/drain/n1");
        assert_eq!(
            rollout("web", "ab12").unwrap().as_str(),
            "rollouts/web/ab12"
        );
        assert_eq!(scale("web").unwrap().as_str(), "scale/web");
        assert_eq!(load("n1").unwrap().as_str(), "metrics/n1/ingress");
        assert_eq!(join_secret().unwrap().keyspace(), Keyspace::Cluster);
        assert!(app("").is_err());
        assert!(task("bad id", "web", 0).is_err());
    }
}
