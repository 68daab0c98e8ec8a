//! Untrusted peer bytes: random and mutated messages never panic the decoder or the node, and
//! a batch that fails validation changes nothing. (The cargo-fuzz target in fuzz/ explores
//! the same surface with coverage guidance.)

use proptest::prelude::*;
use shoal::membership::Member;
use shoal::node::{Input, Node, NodeConfig};
use shoal::store::{Bytes, Entry, Hlc, Key, MemBackend, NodeId, Replica, Version};
use shoal::sync::message::{decode, encode, Envelope, Message, Range, Rumor};
use std::collections::BTreeMap;

const NOW: u64 = 1_700_000_000_000;

fn node() -> Node<MemBackend> {
    let id = NodeId::new("me").unwrap();
    let replica = Replica::open(id.clone(), MemBackend::new()).unwrap();
    Node::new(
        Member::new(id, "127.0.0.1:1".into(), 1),
        replica,
        NodeConfig::default(),
        0,
    )
}

fn entry(key: &str, origin: &str, v: &str) -> Entry {
    Entry {
        key: Key::parse(key).unwrap(),
        version: Version {
            hlc: Hlc::from_millis(NOW),
            origin: NodeId::new(origin).unwrap(),
        },
        value: Some(Bytes::from(v.to_string())),
        proof: Default::default(),
    }
}

fn samples() -> Vec<Vec<u8>> {
    let from = Member::new(NodeId::new("peer").unwrap(), "127.0.0.1:2".into(), 3);
    let e = entry("apps/a", "peer", "{}");
    let msgs = vec![
        Message::Push(vec![Rumor {
            entry: e.clone(),
            prev: Hlc::ZERO,
        }]),
        Message::SyncPush(Range {
            entries: vec![e.clone()],
            through: BTreeMap::from([(NodeId::new("peer").unwrap(), Hlc(5))]),
            complete: true,
        }),
        Message::ReconcileRequest {
            after: Some(Key::parse("apps/a").unwrap()),
        },
        Message::Swim(Bytes::from_static(b"\x00\x01\x02")),
    ];
    msgs.into_iter()
        .map(|msg| {
            encode(&Envelope {
                from: from.clone(),
                msg,
            })
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(env) = decode(&data) {
            let mut n = node();
            let _ = n.handle(NOW, Input::Envelope(env), &mut Vec::new());
        }
    }

    #[test]
    fn mutated_messages_never_panic(which in 0..4usize, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
        let mut data = samples()[which].clone();
        for (pos, byte) in flips {
            let i = pos % data.len();
            data[i] = byte;
        }
        data.truncate(cut % (data.len() + 1));
        if let Ok(env) = decode(&data) {
            let mut n = node();
            let _ = n.handle(NOW, Input::Envelope(env), &mut Vec::new());
        }
    }
}

#[test]
fn a_forged_batch_is_refused_whole() {
    let from = Member::new(NodeId::new("peer").unwrap(), "127.0.0.1:2".into(), 3);
    let mut n = node();
    // The second entry claims to be node "victim"'s own record but comes from "peer".
    let batch = vec![
        entry("apps/ok", "peer", "{}"),
        entry("nodes/victim", "peer", "{}"),
    ];
    let env = Envelope {
        from,
        msg: Message::SyncPush(Range {
            entries: batch,
            through: BTreeMap::from([(NodeId::new("peer").unwrap(), Hlc(u64::MAX / 2))]),
            complete: true,
        }),
    };
    let r = n.handle(
        NOW,
        Input::Envelope(decode(&encode(&env)).unwrap()),
        &mut Vec::new(),
    );
    assert!(r.is_err(), "a forged owner-only entry was accepted");
    assert_eq!(n.replica().seq(), 0, "the refused batch changed the store");
    assert!(
        n.replica().digest().watermarks.is_empty(),
        "the refused batch moved a watermark"
    );
}

#[test]
fn the_fuzzers_corpus_never_panics_the_node() {
    // What `cargo fuzz run peer_message` kept (fuzz/corpus/peer_message), replayed here.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/peer_message");
    let inputs: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert!(!inputs.is_empty());
    for input in inputs {
        let data = std::fs::read(input.path()).unwrap();
        if let Ok(env) = decode(&data) {
            let mut out = Vec::new();
            let _ = node().handle(NOW, Input::Envelope(env), &mut out);
        }
    }
}
