//! Fuzzes the peer message decoder and, for whatever decodes, the node that handles it:
//! untrusted bytes from the network must never panic the agent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::membership::Member;
use shoal::node::{Input, Node, NodeConfig};
use shoal::store::{MemBackend, NodeId, Replica};
use shoal::sync::message::decode;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = decode(data) {
        let id = NodeId::new("fuzz").unwrap();
        let replica = Replica::open(id.clone(), MemBackend::new()).unwrap();
        let mut node = Node::new(Member::new(id, "127.0.0.1:1".into(), 1), replica, NodeConfig::default(), 0);
        let mut out = Vec::new();
        let _ = node.handle(1_700_000_000_000, Input::Envelope(env), &mut out);
    }
});
