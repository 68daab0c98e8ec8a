//! Whole clusters in virtual time (see `shoal::sim`): after faults heal, every node holds the
//! same state, no acknowledged write is lost unless a higher version overwrote it, and
//! deleted keys stay deleted. Every run prints its seed; `SHOAL_SIM_SEED` replays one.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal::sim::{Sim, SimConfig};
use shoal::store::{Bytes, Key};

fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("SHOAL_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SHOAL_SIM_SEED must be a number")],
        Err(_) => default.to_vec(),
    }
}

fn key(i: usize) -> Key {
    Key::parse(&format!("apps/k{i}")).unwrap()
}

fn all_joined(sim: &Sim) -> bool {
    (0..sim.len()).all(|i| !sim.is_up(i) || sim.live_view(i).len() == sim.len() - 1)
}

fn settle(sim: &mut Sim, what: &str, seed: u64) {
    let took = sim.run_until(60_000, 100, |s| s.converged());
    assert!(
        took.is_some(),
        "seed {seed}: {what}: no convergence within 60 s of virtual time"
    );
    if let Err(e) = sim.check_history() {
        panic!("seed {seed}: {what}: {e}");
    }
}

#[test]
fn lossy_duplicating_reordering_network_converges() {
    for seed in seeds(&[1, 2, 3, 4]) {
        let mut cfg = SimConfig::new(12, seed);
        cfg.loss = 0.2;
        cfg.duplicate = 0.1;
        cfg.latency_us = (100, 50_000);
        let mut sim = Sim::new(cfg);
        assert!(
            sim.run_until(30_000, 100, all_joined).is_some(),
            "seed {seed}: membership never formed"
        );
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..300 {
            let n = rng.random_range(0..sim.len());
            let k = key(rng.random_range(0..20));
            let v = rng
                .random_bool(0.8)
                .then(|| Bytes::from(format!("{}", rng.random_range(0..1000))));
            sim.write(n, k, v);
            sim.run_for_ms(rng.random_range(0..20));
        }
        settle(&mut sim, "loss 20%, duplicates 10%", seed);
    }
}

#[test]
fn partition_then_heal_converges_and_keeps_both_sides_writes() {
    for seed in seeds(&[11, 12, 13]) {
        let mut sim = Sim::new(SimConfig::new(7, seed));
        assert!(sim.run_until(30_000, 100, all_joined).is_some());
        sim.partition(&[&[0, 1, 2], &[3, 4, 5, 6]]);
        let mut rng = StdRng::seed_from_u64(seed);
        for round in 0..100 {
            let n = rng.random_range(0..7);
            sim.write(
                n,
                key(rng.random_range(0..10)),
                Some(Bytes::from(format!("r{round}"))),
            );
            sim.run_for_ms(50);
        }
        // Each side saw only its own writes.
        assert!(
            !sim.converged(),
            "seed {seed}: a partition let state through"
        );
        sim.heal();
        settle(&mut sim, "partition healed", seed);
        assert!(
            sim.run_until(30_000, 100, all_joined).is_some(),
            "seed {seed}: membership did not recover"
        );
    }
}

#[test]
fn crashed_nodes_lose_only_unflushed_state_and_catch_up() {
    for seed in seeds(&[21, 22, 23]) {
        let mut cfg = SimConfig::new(6, seed);
        cfg.loss = 0.05;
        let mut sim = Sim::new(cfg);
        assert!(sim.run_until(30_000, 100, all_joined).is_some());
        let mut rng = StdRng::seed_from_u64(seed);
        for round in 0..400 {
            let n = rng.random_range(0..6);
            if rng.random_bool(0.02) && (0..6).filter(|&i| sim.is_up(i)).count() > 3 {
                sim.crash(n);
            } else if rng.random_bool(0.05) {
                sim.restart(n);
            } else {
                sim.write(
                    n,
                    key(rng.random_range(0..15)),
                    Some(Bytes::from(format!("w{round}"))),
                );
            }
            sim.run_for_ms(rng.random_range(0..30));
        }
        for n in 0..6 {
            sim.restart(n);
        }
        settle(&mut sim, "crashes and restarts", seed);
    }
}

#[test]
fn deleted_keys_never_resurrect_after_collection_and_a_long_absence() {
    for seed in seeds(&[31, 32]) {
        let mut cfg = SimConfig::new(5, seed);
        cfg.node.sync.tombstone_min_age_ms = 1_000;
        cfg.node.sync.gc_interval_ms = 500;
        cfg.node.sync.tombstone_horizon_ms = 20_000;
        let mut sim = Sim::new(cfg);
        assert!(sim.run_until(30_000, 100, all_joined).is_some());
        for i in 0..10 {
            sim.write(i % 5, key(i), Some(Bytes::from("live")));
        }
        settle(&mut sim, "initial writes", seed);
        // Node 4 goes away holding every key; the others delete half of them and, once the
        // horizon has passed, collect the tombstones.
        sim.crash(4);
        for i in 0..5 {
            sim.write(i % 4, key(i), None);
        }
        sim.run_for_ms(60_000);
        let collected: u64 = (0..4)
            .map(|i| sim.node(i).unwrap().sync().stats.tombstones_collected)
            .sum();
        assert!(collected > 0, "seed {seed}: no tombstone was collected");
        // Meanwhile the stale node would resurrect them, if it could.
        sim.restart(4);
        sim.write(4, key(20), Some(Bytes::from("written after restart")));
        settle(&mut sim, "stale node back after collection", seed);
        for i in 0..5 {
            for n in 0..5 {
                assert!(
                    sim.read(n, &key(i)).is_none(),
                    "seed {seed}: k{i} resurrected on n{n}"
                );
            }
        }
        assert!(sim.read(0, &key(20)).is_some());
    }
}

#[test]
fn clock_skew_of_a_minute_loses_no_causally_later_write() {
    // Riak lost writes this way: a causally later write from a slow clock lost to an earlier
    // write from a fast one. Each write here follows the previous one in real time, after it
    // has spread, from a random node whose clock is up to 60 s off.
    for seed in seeds(&[41, 42]) {
        let mut cfg = SimConfig::new(5, seed);
        cfg.max_skew_ms = 60_000;
        let mut sim = Sim::new(cfg);
        assert!(sim.run_until(30_000, 100, all_joined).is_some());
        let mut rng = StdRng::seed_from_u64(seed);
        let k = key(0);
        for round in 0..100 {
            let n = rng.random_range(0..5);
            let value = format!("round {round}");
            sim.write(n, k.clone(), Some(Bytes::from(value.clone())));
            assert!(
                sim.run_until(10_000, 10, |s| (0..5)
                    .all(
                        |i| s.read(i, &k).and_then(|e| e.value) == Some(Bytes::from(value.clone()))
                    ))
                .is_some(),
                "seed {seed}: round {round}: the latest write did not win everywhere"
            );
        }
    }
}

#[test]
fn a_thousand_nodes_without_membership_disseminate_one_write_everywhere() {
    let mut cfg = SimConfig::new(1000, 7);
    cfg.swim = false;
    cfg.loss = 0.1;
    let mut sim = Sim::new(cfg);
    sim.run_for_ms(1000);
    let k = key(0);
    sim.watch(&k);
    sim.write(0, k.clone(), Some(Bytes::from("x")));
    let took = sim.run_until(20_000, 50, |s| {
        s.seen(&k).iter().skip(1).all(|t| t.is_some())
    });
    assert!(
        took.is_some(),
        "the write did not reach all 1000 nodes within 20 s"
    );
}

#[test]
fn one_byzantine_node_among_twenty_wipes_nothing_in_an_hour() {
    // n19 lies in every sync message it sends (see `shoal::sim`): plausible and top-of-clock
    // collection horizons, reconcile pages that hold nothing. The others write and delete for
    // an hour of virtual time, collect tombstones, and crash and come back (so honest
    // reconciles happen too). Nothing acknowledged may be lost, nothing deleted may return.
    for seed in seeds(&[51]) {
        let mut cfg = SimConfig::new(20, seed);
        cfg.node.sync.tombstone_min_age_ms = 10_000;
        cfg.node.sync.gc_interval_ms = 2_000;
        cfg.byzantine = vec![19];
        let mut sim = Sim::new(cfg);
        assert!(
            sim.run_until(60_000, 100, all_joined).is_some(),
            "seed {seed}: membership never formed"
        );
        let mut rng = StdRng::seed_from_u64(seed);
        for minute in 0..60 {
            for _ in 0..6 {
                let n = rng.random_range(0..19);
                let k = key(rng.random_range(0..40));
                let v = rng
                    .random_bool(0.75)
                    .then(|| Bytes::from(format!("{minute}")));
                sim.write(n, k, v);
                sim.run_for_ms(10_000);
            }
            // Every ten minutes an honest node is away for 30 s: it comes back behind the
            // others' collection horizons and must reconcile.
            if minute % 10 == 5 {
                let n = rng.random_range(0..19);
                sim.crash(n);
                sim.run_for_ms(30_000);
                sim.restart(n);
            }
        }
        settle(&mut sim, "an hour with a byzantine member", seed);
        let byz = sim.node(19).unwrap().id().clone();
        let named_by_liar: Vec<_> = sim
            .reconciles
            .iter()
            .filter(|(_, r)| r.peer == byz && r.named > 0)
            .collect();
        assert!(
            !named_by_liar.is_empty() && sim.forged > 100,
            "seed {seed}: the attack never ran (forged {}, reconciles {:?})",
            sim.forged,
            sim.reconciles
        );
        assert!(
            sim.messages_refused > 0,
            "seed {seed}: no forged digest refused"
        );
        let honest: usize = sim.reconciles.iter().filter(|(_, r)| r.peer != byz).count();
        assert!(honest > 0, "seed {seed}: no honest reconcile happened");
        // Its rumors carried forged task records of other nodes and unsigned apps: every
        // honest node left them out.
        assert!(
            sim.unvouched > 0,
            "seed {seed}: no forged entry was reported"
        );
        for i in 0..19 {
            let node = sim.node(i).unwrap();
            let r = node.replica();
            assert!(
                r.get(&Key::parse("apps/forged").unwrap())
                    .unwrap()
                    .is_none(),
                "seed {seed}: n{i} took an app nobody signed"
            );
            for victim in 0..19 {
                let k = Key::parse(&format!("tasks/n{victim}/forged/0")).unwrap();
                assert!(
                    r.get(&k).unwrap().is_none(),
                    "seed {seed}: n{i} took a task record forged in n{victim}'s name"
                );
            }
        }
        println!(
            "seed {seed}: forged {} messages, {} refused; {} entries refused for bad proofs; {} reconciles named keys on the liar's word, {} honest reconciles",
            sim.forged,
            sim.messages_refused,
            sim.unvouched,
            named_by_liar.len(),
            honest
        );
    }
}

/// A seed restarts while a member still counts its old self. The seed went deaf first (its
/// listener closed at shutdown) and declared the member down; the member rejoined under a new
/// generation, which reset its failure detector and left the old seed suspect for good. The
/// member finds the seed only through its configured peer list; the restarted seed knows
/// nobody. Both must see each other alive again (in a real cluster the seed never got its
/// peer back: `trust::the_join_secret_rotates_without_losing_sealed_secrets`).
#[test]
fn a_member_renamed_while_its_only_peer_restarts_finds_it_again() {
    for seed in seeds(&[41, 42, 43, 44, 45, 46]) {
        let mut cfg = SimConfig::new(2, seed);
        cfg.discovery = Some(vec![vec![], vec![0]]);
        let mut sim = Sim::new(cfg);
        assert!(
            sim.run_until(30_000, 100, all_joined).is_some(),
            "seed {seed}: membership never formed"
        );
        let gen = sim.node(1).unwrap().me().gen;
        sim.deafen(0, true);
        // The deaf seed declares the member down and tells it; it rejoins as a new generation.
        let declared = sim.run_until(30_000, 10, |s| {
            s.live_view(0).is_empty() && s.node(1).unwrap().me().gen > gen
        });
        assert!(
            declared.is_some(),
            "seed {seed}: the deaf seed kept its peer"
        );
        sim.crash(0);
        sim.deafen(0, false);
        sim.restart(0);
        let back = sim.run_until(60_000, 100, |s| (0..2).all(|i| s.alive_view(i).len() == 1));
        assert!(
            back.is_some(),
            "seed {seed}: the two do not see each other alive a minute after the seed's restart: {:?}",
            (0..2).map(|i| sim.node(i).unwrap().members()).collect::<Vec<_>>()
        );
    }
}
