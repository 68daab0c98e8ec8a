//! Replica behaviour: merge laws (proptest), watermarks, deltas, tombstones and reconcile.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn key(s: &str) -> Key {
    Key::parse(s).unwrap()
}

fn replica(node: &str) -> Replica<MemBackend> {
    Replica::open(id(node), MemBackend::new()).unwrap()
}

/// The whole state of a replica, tombstones included.
fn state<B: Backend>(r: &Replica<B>) -> BTreeMap<Key, Entry> {
    let mut out = BTreeMap::new();
    let mut after = None;
    loop {
        let (page, next) = r.snapshot_page(after.as_ref(), 7).unwrap();
        out.extend(page.into_iter().map(|e| (e.key.clone(), e)));
        match next {
            Some(n) => after = Some(n),
            None => return out,
        }
    }
}

const NOW: u64 = 1_700_000_000_000;

fn arb_entry() -> impl Strategy<Value = Entry> {
    (
        0..6usize,
        0..40u64,
        0..3usize,
        proptest::option::weighted(0.8, 0..1000u32),
    )
        .prop_map(|(k, t, o, v)| Entry {
            key: key(&format!("apps/k{k}")),
            version: Version {
                hlc: Hlc::from_millis(NOW + t),
                origin: id(&format!("n{o}")),
            },
            value: v.map(|v| Bytes::from(v.to_string())),
            proof: Default::default(),
        })
}

proptest! {
    #[test]
    fn merge_is_commutative_and_idempotent(entries in proptest::collection::vec(arb_entry(), 0..30), seed in any::<u64>()) {
        let mut a = replica("x");
        a.apply_remote(NOW, &entries).unwrap();
        let mut shuffled = entries.clone();
        let mut s = seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        let mut b = replica("y");
        for e in &shuffled {
            b.apply_remote(NOW, std::slice::from_ref(e)).unwrap();
        }
        // Applying everything again changes nothing.
        let again = b.apply_remote(NOW, &entries).unwrap();
        prop_assert!(again.changes.is_empty());
        prop_assert_eq!(state(&a), state(&b));
    }

    #[test]
    fn merge_is_associative(x in proptest::collection::vec(arb_entry(), 0..10),
                            y in proptest::collection::vec(arb_entry(), 0..10),
                            z in proptest::collection::vec(arb_entry(), 0..10)) {
        // (x ∪ y) ∪ z, built by merging replica states, equals x ∪ (y ∪ z).
        let of = |es: &[Entry]| { let mut r = replica("t"); r.apply_remote(NOW, es).unwrap(); r };
        let merged = |a: &Replica<MemBackend>, b: &Replica<MemBackend>| {
            let mut r = replica("t");
            r.apply_remote(NOW, &state(a).into_values().collect::<Vec<_>>()).unwrap();
            r.apply_remote(NOW, &state(b).into_values().collect::<Vec<_>>()).unwrap();
            r
        };
        let left = merged(&merged(&of(&x), &of(&y)), &of(&z));
        let right = merged(&of(&x), &merged(&of(&y), &of(&z)));
        prop_assert_eq!(state(&left), state(&right));
    }

    #[test]
    fn the_highest_version_wins(entries in proptest::collection::vec(arb_entry(), 1..30)) {
        let mut r = replica("x");
        r.apply_remote(NOW, &entries).unwrap();
        let s = state(&r);
        for e in &entries {
            let held = &s[&e.key];
            prop_assert!(held.version >= e.version);
        }
    }
}

#[test]
fn local_writes_advance_own_watermark_and_survive_reopen_after_flush() {
    let backend = MemBackend::new();
    let mut r = Replica::open(id("n1"), backend.clone()).unwrap();
    let w1 = r.write(NOW, key("apps/a"), Some(Bytes::from("1"))).unwrap();
    let w2 = r.write(NOW, key("apps/b"), Some(Bytes::from("2"))).unwrap();
    assert_eq!(w2.prev, w1.change.entry.version.hlc);
    assert_eq!(r.digest().watermark(&id("n1")), w2.change.entry.version.hlc);
    r.flush().unwrap();
    let w3 = r.write(NOW, key("apps/c"), Some(Bytes::from("3"))).unwrap();
    backend.crash();
    let mut r = Replica::open(id("n1"), backend.clone()).unwrap();
    assert!(r.get(&key("apps/b")).unwrap().is_some());
    assert!(
        r.get(&key("apps/c")).unwrap().is_none(),
        "unflushed write survived a crash"
    );
    // The clock restarts past every stored version, even with the wall clock behind.
    let w4 = r.write(NOW - 10_000, key("apps/d"), None).unwrap();
    assert!(w4.change.entry.version.hlc > w2.change.entry.version.hlc);
    assert!(
        w4.change.entry.version.hlc != w3.change.entry.version.hlc
            || w3.change.entry.key != w4.change.entry.key
    );
    assert_eq!(r.seq(), 3);
}

#[test]
fn owner_only_keys_cannot_be_written_for_another_node() {
    let mut r = replica("n1");
    assert!(matches!(
        r.write(NOW, key("nodes/n2"), Some(Bytes::from("{}"))),
        Err(StoreError::NotOwner { .. })
    ));
    r.write(NOW, key("nodes/n1"), Some(Bytes::from("{}")))
        .unwrap();
}

#[test]
fn a_batch_with_one_bad_entry_changes_nothing() {
    let mut src = replica("n2");
    let good = src
        .write(NOW, key("apps/a"), Some(Bytes::from("1")))
        .unwrap()
        .change
        .entry;
    let forged = Entry {
        key: key("nodes/n9"),
        ..good.clone()
    };
    let mut r = replica("n1");
    assert!(r.apply_remote(NOW, &[good.clone(), forged]).is_err());
    assert!(state(&r).is_empty());
    let future = Entry {
        version: Version {
            hlc: Hlc::from_millis(NOW + 3_600_000),
            origin: id("n2"),
        },
        ..good
    };
    assert!(matches!(
        r.apply_remote(NOW, &[future]),
        Err(StoreError::ClockDrift { .. })
    ));
    assert!(state(&r).is_empty());
}

#[test]
fn deltas_cover_exactly_what_the_peer_lacks_and_respect_bounds() {
    let mut a = replica("a");
    for i in 0..10 {
        a.write(NOW + i, key(&format!("apps/k{i}")), Some(Bytes::from("v")))
            .unwrap();
    }
    let mut b = replica("b");
    // Bounded: three rounds of at most 4 entries bring b level.
    for round in 0..3 {
        let d = a.delta_for(b.digest(), 4, 1 << 20).unwrap();
        assert_eq!(d.complete, round == 2, "round {round}");
        b.apply_remote(NOW, &d.entries).unwrap();
        b.advance(&d.through).unwrap();
    }
    assert_eq!(state(&a), state(&b));
    assert_eq!(a.digest().watermarks, b.digest().watermarks);
    let d = a.delta_for(b.digest(), 4, 1 << 20).unwrap();
    assert!(d.entries.is_empty() && d.complete);
}

/// Brings `to` level with everything `from` holds, as anti-entropy would.
fn sync_all(from: &Replica<MemBackend>, to: &mut Replica<MemBackend>, now_ms: u64) {
    let d = from.delta_for(to.digest(), 10_000, 1 << 24).unwrap();
    to.apply_remote(now_ms, &d.entries).unwrap();
    to.advance(&d.through).unwrap();
}

#[test]
fn a_departed_nodes_records_expire_everywhere_and_a_live_nodes_never_do() {
    const LEASE: u64 = 60_000;
    let lease = |r: Replica<MemBackend>| r.with_lease(LEASE);
    let (mut a, mut b, mut x) = (
        lease(replica("a")),
        lease(replica("b")),
        lease(replica("x")),
    );
    let v = || Some(Bytes::from("{}"));
    // x, which will depart, and a, which stays, each write their records; x also writes an
    // app spec (desired state: never a lease).
    for (r, me) in [(&mut x, "x"), (&mut a, "a")] {
        r.write(NOW, key(&format!("nodes/{me}")), v()).unwrap();
        r.write(NOW, key(&format!("tasks/{me}/web/0")), v())
            .unwrap();
        r.write(NOW, key(&format!("metrics/{me}/cpu")), v())
            .unwrap();
    }
    x.write(NOW, key("apps/web"), v()).unwrap();
    sync_all(&x, &mut b, NOW);
    sync_all(&a, &mut b, NOW);
    let held = |r: &Replica<MemBackend>, k: &str| {
        r.get(&key(k)).unwrap().is_some_and(|e| !e.is_tombstone())
    };
    assert!(held(&b, "tasks/x/web/0") && held(&b, "nodes/x"));

    // Within the lease nothing goes; a refreshes its records every quarter lease, x is gone.
    let mut t = NOW;
    while t < NOW + 3 * LEASE {
        t += LEASE / 8;
        assert!(a.refresh_own(t, 1000).unwrap().len() <= 2);
        sync_all(&a, &mut b, t);
        let gone = b.expire_departed(t, 1000).unwrap();
        if t <= NOW + LEASE {
            assert!(gone.is_empty(), "expired within the lease at +{}", t - NOW);
        }
    }
    for k in ["tasks/x/web/0", "metrics/x/cpu"] {
        assert!(!held(&b, k), "{k} outlived its lease");
    }
    // x's node record stays: it vouches for what x signed, until x is evicted.
    for k in [
        "nodes/x",
        "nodes/a",
        "tasks/a/web/0",
        "metrics/a/cpu",
        "apps/web",
    ] {
        assert!(held(&b, k), "{k} was collected");
    }
    assert_eq!(
        b.counts().unwrap().0,
        5,
        "live counts: {:?}",
        b.live_counts()
    );
    assert_eq!(b.live_counts().iter().map(|(_, n)| n).sum::<u64>(), 5);

    // A peer that still holds x's old records cannot bring them back.
    let stale = x.delta_for(&Digest::default(), 100, 1 << 20).unwrap();
    let applied = b.apply_remote(t, &stale.entries).unwrap();
    assert_eq!(applied.expired, 2);
    assert!(!held(&b, "tasks/x/web/0"));
    assert!(held(&b, "apps/web"), "the app spec is no lease");

    // x comes back: its records, written again, are accepted.
    let back = x.refresh_own(t, 1000).unwrap();
    assert_eq!(back.len(), 2);
    let fresh: Vec<Entry> = back.into_iter().map(|w| w.change.entry).collect();
    assert_eq!(b.apply_remote(t, &fresh).unwrap().changes.len(), 2);
    assert!(held(&b, "tasks/x/web/0"));
    // Its own records are never expired by the node itself.
    assert!(x.expire_departed(t + 10 * LEASE, 1000).unwrap().is_empty());
    // Without a lease, nothing expires.
    let mut plain = replica("p");
    sync_all(&x, &mut plain, NOW);
    assert!(plain
        .expire_departed(NOW + 100 * LEASE, 1000)
        .unwrap()
        .is_empty());
}

#[test]
fn a_nodes_older_desired_state_does_not_crowd_its_leases_out_of_a_refresh() {
    let mut a = replica("a").with_lease(60_000);
    let v = || Some(Bytes::from("{}"));
    // Specs it wrote first (older in its origin index than its records), then its records.
    for i in 0..5 {
        a.write(NOW, key(&format!("apps/s{i}")), v()).unwrap();
    }
    a.write(NOW, key("tasks/a/web/0"), v()).unwrap();
    a.write(NOW, key("images/a"), v()).unwrap();
    let refreshed: std::collections::BTreeSet<String> = a
        .refresh_own(NOW + 20_000, 2)
        .unwrap()
        .iter()
        .map(|w| w.change.entry.key.to_string())
        .collect();
    let want: std::collections::BTreeSet<String> =
        ["images/a", "tasks/a/web/0"].map(String::from).into();
    assert_eq!(refreshed, want);
}

#[test]
fn a_departed_nodes_records_are_told_from_those_of_a_node_whose_id_starts_alike() {
    let mut b = replica("b").with_lease(60_000);
    let mut x = replica("x");
    let mut x2 = replica("x2");
    x.write(NOW, key("tasks/x/web/0"), Some(Bytes::from("{}")))
        .unwrap();
    sync_all(&x, &mut b, NOW);
    // x2 lives on: its record is fresh when x's has expired.
    x2.write(
        NOW + 100_000,
        key("tasks/x2/web/0"),
        Some(Bytes::from("{}")),
    )
    .unwrap();
    sync_all(&x2, &mut b, NOW + 100_000);
    let gone: Vec<String> = b
        .expire_departed(NOW + 100_000, 100)
        .unwrap()
        .iter()
        .map(|c| c.entry.key.to_string())
        .collect();
    assert_eq!(gone, ["tasks/x/web/0"]);
    assert!(b.get(&key("tasks/x2/web/0")).unwrap().is_some());
}

#[test]
fn push_chain_advances_watermark_only_in_order() {
    let mut a = replica("a");
    let w1 = a.write(NOW, key("apps/x"), Some(Bytes::from("1"))).unwrap();
    let w2 = a.write(NOW, key("apps/y"), Some(Bytes::from("2"))).unwrap();
    let mut b = replica("b");
    let h = |w: &Written| w.change.entry.version.hlc;
    // w2 first: applied, but the watermark cannot skip w1.
    b.apply_remote(NOW, std::slice::from_ref(&w2.change.entry))
        .unwrap();
    assert!(!b.advance_chain(&id("a"), w2.prev, h(&w2)).unwrap());
    b.apply_remote(NOW, std::slice::from_ref(&w1.change.entry))
        .unwrap();
    assert!(b.advance_chain(&id("a"), w1.prev, h(&w1)).unwrap());
    assert_eq!(b.digest().watermark(&id("a")), h(&w1));
}

#[test]
fn tombstones_are_collected_only_when_acknowledged_and_old_enough() {
    let mut a = replica("a");
    a.write(NOW, key("apps/x"), Some(Bytes::from("1"))).unwrap();
    let del = a.write(NOW + 1, key("apps/x"), None).unwrap();
    let h = del.change.entry.version.hlc;
    // Not acknowledged by everyone: kept.
    assert_eq!(
        a.collect_tombstones(NOW + 120_000, |_| Hlc::ZERO, 60_000, 86_400_000)
            .unwrap(),
        0
    );
    // Acknowledged but too young: kept.
    assert_eq!(
        a.collect_tombstones(NOW + 10, |_| h, 60_000, 86_400_000)
            .unwrap(),
        0
    );
    assert_eq!(
        a.collect_tombstones(NOW + 120_000, |_| h, 60_000, 86_400_000)
            .unwrap(),
        1
    );
    assert!(a.get(&key("apps/x")).unwrap().is_none());
    assert_eq!(a.digest().collected[&id("a")], h);
    // Past the horizon even unacknowledged tombstones go.
    a.write(NOW + 2, key("apps/y"), None).unwrap();
    assert_eq!(
        a.collect_tombstones(NOW + 100_000_000, |_| Hlc::ZERO, 60_000, 86_400_000)
            .unwrap(),
        1
    );
    // A re-sent collected tombstone does not come back.
    a.apply_remote(NOW + 3, &[del.change.entry]).unwrap();
    assert!(a.get(&key("apps/x")).unwrap().is_none());
}

#[test]
fn reconcile_drops_what_the_peer_deleted_and_keeps_what_it_never_saw() {
    // b is a stale replica: it holds x, which a has since deleted and collected, and z,
    // written while it was away.
    let mut a = replica("a");
    let x = a
        .write(NOW, key("apps/x"), Some(Bytes::from("1")))
        .unwrap()
        .change
        .entry;
    let mut b = replica("b");
    b.apply_remote(NOW, &[x]).unwrap();
    b.write(NOW + 5, key("apps/z"), Some(Bytes::from("new")))
        .unwrap();
    a.write(NOW + 1, key("apps/y"), Some(Bytes::from("2")))
        .unwrap();
    a.write(NOW + 2, key("apps/x"), None).unwrap();
    a.collect_tombstones(NOW + 200_000, |_| Hlc(u64::MAX), 60_000, u64::MAX)
        .unwrap();
    assert!(b.digest().behind_horizon_of(a.digest()));
    let mut after: Option<Key> = None;
    let mut named = Vec::new();
    loop {
        let (page, next) = a.snapshot_page(after.as_ref(), 1).unwrap();
        let (_, n) = b
            .reconcile_page(NOW, a.digest(), after.as_ref(), &page, next.as_ref())
            .unwrap();
        named.extend(n);
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    // The reconcile only names x; nothing goes until the sync engine drops it.
    assert_eq!(
        named.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["apps/x"]
    );
    assert!(b.get(&key("apps/x")).unwrap().is_some());
    assert_eq!(b.drop_confirmed(&named).unwrap().len(), 1);
    assert!(
        b.get(&key("apps/x")).unwrap().is_none(),
        "deleted key resurrected"
    );
    assert!(b.get(&key("apps/y")).unwrap().is_some());
    assert!(
        b.get(&key("apps/z")).unwrap().is_some(),
        "write unseen by the peer was lost"
    );
    assert!(!b.digest().behind_horizon_of(a.digest()));
}

#[test]
fn watch_log_keeps_one_row_per_key_in_change_order() {
    let mut r = replica("a");
    r.write(NOW, key("apps/a"), Some(Bytes::from("1"))).unwrap();
    r.write(NOW, key("apps/b"), Some(Bytes::from("1"))).unwrap();
    r.write(NOW, key("apps/a"), Some(Bytes::from("2"))).unwrap();
    let all = replica::changes_since(r.backend(), 0, 100).unwrap();
    let keys: Vec<_> = all
        .iter()
        .map(|c| (c.seq, c.entry.key.to_string()))
        .collect();
    assert_eq!(
        keys,
        vec![(2, "apps/b".to_string()), (3, "apps/a".to_string())]
    );
    assert_eq!(
        replica::changes_since(r.backend(), 2, 100).unwrap().len(),
        1
    );
}

#[test]
fn disk_backend_reopens_with_flushed_writes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut r = Replica::open(id("n1"), DiskBackend::open(dir.path()).unwrap()).unwrap();
        for i in 0..100 {
            r.write(NOW + i, key(&format!("apps/k{i}")), Some(Bytes::from("v")))
                .unwrap();
        }
        r.flush().unwrap();
    }
    let r = Replica::open(id("n1"), DiskBackend::open(dir.path()).unwrap()).unwrap();
    assert_eq!(r.counts().unwrap(), (100, 0));
    assert_eq!(r.seq(), 100);
    let keys = replica::scan_keyspace(r.backend(), Keyspace::Apps, "k1", 1000).unwrap();
    assert_eq!(keys.len(), 11);
}

#[test]
fn disk_compaction_shrinks_the_file_after_deletes_and_keeps_every_value() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let backend = DiskBackend::open(&dir).unwrap();
    let mut r = Replica::open(id("n1"), backend.clone()).unwrap();
    let big = Bytes::from("x".repeat(2000));
    for i in 0..3_000u64 {
        r.write(NOW + i, key(&format!("apps/k{i}")), Some(big.clone()))
            .unwrap();
    }
    r.flush().unwrap();
    // The live data shrinks to a tenth; tombstones are collected.
    for i in 300..3_000u64 {
        r.write(NOW + 5_000 + i, key(&format!("apps/k{i}")), None)
            .unwrap();
    }
    r.collect_tombstones(NOW + 1_000_000, |_| Hlc(u64::MAX), 0, u64::MAX)
        .unwrap();
    r.flush().unwrap();
    let before = backend.size_on_disk();
    let want = state(&r);
    assert!(
        backend.maybe_compact(3.0).unwrap(),
        "{before} bytes for {} live were not compacted",
        backend.logical_size()
    );
    let after = backend.size_on_disk();
    assert!(
        after * 2 < before,
        "compaction did not shrink the file: {before} -> {after}"
    );
    assert!(after <= 3 * backend.logical_size().max(1 << 20));
    assert_eq!(state(&r), want);
    r.write(NOW + 30_000, key("apps/after"), Some(Bytes::from("1")))
        .unwrap();
    r.flush().unwrap();
    drop(r);
    drop(backend);
    let r = Replica::open(id("n1"), DiskBackend::open(&dir).unwrap()).unwrap();
    assert_eq!(state(&r).len(), want.len() + 1);
}

#[test]
fn peers_cannot_move_our_own_watermark_or_push_clocks_past_the_drift() {
    let mut a = replica("a");
    let w = a
        .write(NOW, key("apps/x"), Some(Bytes::from("1")))
        .unwrap()
        .change
        .entry
        .version
        .hlc;
    // A `through` for our own origin, at the top of the clock: ignored.
    let top = BTreeMap::from([(id("a"), Hlc(u64::MAX)), (id("b"), Hlc(u64::MAX))]);
    a.advance(&top).unwrap();
    assert_eq!(a.digest().watermark(&id("a")), w);
    // Bounded readings are refused before anything is applied.
    assert!(crate::store::replica::check_bound(&top, "through", NOW).is_err());
    let d = Digest {
        watermarks: top.clone(),
        collected: BTreeMap::new(),
    };
    assert!(d.check(NOW, 60_000).is_err());
    // A horizon younger than the tombstone minimum age allows (drift included) is refused;
    // one just inside it passes.
    let soon = NOW + crate::store::replica::MAX_DRIFT_MS - 60_000;
    let horizon = |ms| Digest {
        watermarks: BTreeMap::from([(id("b"), Hlc::from_millis(ms))]),
        collected: BTreeMap::from([(id("b"), Hlc::from_millis(ms))]),
    };
    assert!(horizon(soon + 1).check(NOW, 60_000).is_err());
    assert!(horizon(soon).check(NOW, 60_000).is_ok());
}

#[test]
fn a_poisoned_store_does_not_pin_the_clock_at_the_top() {
    let backend = MemBackend::new();
    let mut r = Replica::open(id("a"), backend.clone()).unwrap();
    // What an older agent could be made to store: a watermark at the top of the clock.
    r.advance(&BTreeMap::from([(id("b"), Hlc(u64::MAX))]))
        .unwrap();
    r.flush().unwrap();
    let mut r = Replica::open(id("a"), backend).unwrap();
    let v1 = r
        .write(NOW, key("apps/x"), None)
        .unwrap()
        .change
        .entry
        .version;
    let v2 = r
        .write(NOW, key("apps/y"), None)
        .unwrap()
        .change
        .entry
        .version;
    assert!(v1.hlc.millis() == NOW && v2.hlc > v1.hlc, "{v1:?} {v2:?}");
}

#[test]
fn the_clock_saturates_instead_of_wrapping() {
    let mut c = HlcClock::new(Hlc(u64::MAX));
    assert_eq!(c.tick(NOW), Hlc(u64::MAX));
}

/// Accepts node-signed entries only once the signer's record is known: the order problem the
/// real checker has, without its cryptography.
struct NeedsRecord;

impl vouch::Vouch for NeedsRecord {
    fn check(&mut self, e: &Entry, lookup: &mut vouch::Lookup<'_>) -> Result<(), Unvouched> {
        match e.signer_record() {
            Some(k) if k != e.key && lookup(&k).is_none() => {
                Err(Unvouched::UnknownSigner(e.version.origin.clone()))
            }
            _ => Ok(()),
        }
    }
}

#[test]
fn deltas_and_pages_carry_the_signers_records_and_unknown_signers_hold_the_watermark() {
    let mut a = replica("a");
    // Tasks first, the record last: in version order the record comes after them.
    for i in 0..5 {
        a.write(
            NOW + i,
            key(&format!("tasks/a/app/{i}")),
            Some(Bytes::from("t")),
        )
        .unwrap();
    }
    a.write(NOW + 9, key("nodes/a"), Some(Bytes::from("{}")))
        .unwrap();
    let fresh = || {
        Replica::open(id("b"), MemBackend::new())
            .unwrap()
            .with_proofs(std::sync::Arc::new(vouch::Unsigned), Box::new(NeedsRecord))
    };

    // A delta of two entries still carries the record, in front: nothing is left out.
    let mut b = fresh();
    let d = a.delta_for(b.digest(), 2, 1 << 20).unwrap();
    assert_eq!(d.entries[0].key, key("nodes/a"));
    let applied = b.apply_remote(NOW, &d.entries).unwrap();
    assert!(applied.unvouched.is_empty(), "{:?}", applied.unvouched);
    // So does a reconcile page (keys sort metrics < nodes < tasks: the page lacks it).
    let (page, _) = a.snapshot_page(Some(&key("nodes/a")), 3).unwrap();
    assert_eq!(page[0].key, key("nodes/a"));

    // Without the record, entries wait, and the watermark does not claim them.
    let mut c = fresh();
    let tasks: Vec<Entry> = state(&a)
        .into_values()
        .filter(|e| e.key.keyspace() == Keyspace::Tasks)
        .collect();
    let applied = c.apply_remote(NOW, &tasks).unwrap();
    assert_eq!(applied.unvouched.len(), 5);
    assert!(applied.changes.is_empty());
    let held = applied.pending_origins();
    c.advance_except(&a.digest().watermarks, &held).unwrap();
    assert_eq!(c.digest().watermark(&id("a")), Hlc::ZERO);
    // The next delta brings them with the record.
    let d = a.delta_for(c.digest(), 100, 1 << 20).unwrap();
    let applied = c.apply_remote(NOW, &d.entries).unwrap();
    assert!(applied.unvouched.is_empty());
    c.advance(&d.through).unwrap();
    assert_eq!(state(&a), state(&c));
}

proptest! {
    #[test]
    fn live_counts_kept_as_entries_change_match_a_full_count(
        entries in proptest::collection::vec(arb_entry(), 0..60),
        deletes in proptest::collection::vec(0..6usize, 0..10),
    ) {
        let backend = MemBackend::new();
        let mut r = Replica::open(id("t"), backend.clone()).unwrap();
        r.apply_remote(NOW, &entries).unwrap();
        for k in deletes {
            r.write(NOW + 100, key(&format!("apps/k{k}")), None).unwrap();
        }
        let apps = |r: &Replica<MemBackend>| {
            r.live_counts().iter().find(|(k, _)| *k == Keyspace::Apps).unwrap().1
        };
        prop_assert_eq!(apps(&r), r.counts().unwrap().0);
        // The same after reopening, counted from the disk.
        r.flush().unwrap();
        let again = Replica::open(id("t"), backend).unwrap();
        prop_assert_eq!(apps(&again), apps(&r));
    }
}
