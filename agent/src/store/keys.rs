//! Every key the agent writes, built in one place (ARCHITECTURE.md's state model):
//! `nodes/<id>`, `tasks/<node>/<app>/<replica>`, `apps/<name>`, `secrets/<app>/<NAME>`,
//! `revoked/<id>`, `cluster/join`. Each builder validates like `Key::parse`.

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

/// An app's spec.
pub fn app(name: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Apps, &[name])
}

/// One of an app's secrets, sealed.
pub fn secret(app: &str, name: &str) -> Result<Key, StoreError> {
    Key::join(Keyspace::Secrets, &[app, name])
}

/// An evicted node.
pub fn revoked(id: &NodeId) -> Result<Key, StoreError> {
    Key::join(Keyspace::Revoked, &[id.as_str()])
}

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
        assert_eq!(join_secret().unwrap().keyspace(), Keyspace::Cluster);
        assert!(app("").is_err());
        assert!(task("bad id", "web", 0).is_err());
    }
}
