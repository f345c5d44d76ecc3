//! The planner's cost per namespace as a fan-out grows (issue 20): `plan::plan` for a cluster
//! credential whose Secrets are all current, at 1,000 namespaces (the baseline) and at 10,000,
//! in the same run. A planner linear in the namespaces costs the same per namespace at both
//! sizes (ratio about 1); one that passes over all Secrets for each namespace costs ten times
//! as much per namespace at 10,000.
//!
//!   cargo bench --bench plan

use std::{collections::BTreeSet, hint::black_box, sync::Arc, time::Instant};

use regcred::{
    plan::{LiveSecret, Observed, plan},
    state::Content,
};

const HASH: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const DIGEST: &str = "0123456789abcdef0123456789abcdef";

struct Fixture {
    targets: Vec<String>,
    own: Vec<LiveSecret>,
}

fn fixture(namespaces: usize) -> Fixture {
    let targets: Vec<String> = (0..namespaces).map(|i| format!("team-{i:05}")).collect();
    let content = Arc::new(Content { data_hash: HASH.into(), meta_digest: DIGEST.into() });
    let own = targets
        .iter()
        .map(|ns| LiveSecret {
            namespace: ns.clone(),
            name: "pull".into(),
            resource_version: Some("12345".into()),
            content: Some(content.clone()),
        })
        .collect();
    Fixture { targets, own }
}

/// Nanoseconds per namespace of one `plan` call, the best of `rounds`.
fn per_namespace(fixture: &Fixture, rounds: usize) -> f64 {
    let (none, contested) = (BTreeSet::new(), BTreeSet::new());
    let observed = Observed {
        targets: &fixture.targets,
        terminating: &none,
        secret_name: "pull",
        previous_name: None,
        own: &fixture.own,
        contested: &contested,
        desired_hash: HASH,
        desired_meta_digest: DIGEST,
    };
    let best = (0..rounds)
        .map(|_| {
            let started = Instant::now();
            let planned = black_box(plan(black_box(&observed)));
            assert_eq!(planned.steps.len(), fixture.targets.len());
            started.elapsed()
        })
        .min()
        .unwrap_or_default();
    best.as_nanos() as f64 / fixture.targets.len() as f64
}

fn main() {
    let (small, large) = (fixture(1_000), fixture(10_000));
    // Interleaved, after a warm-up of each.
    per_namespace(&small, 3);
    per_namespace(&large, 1);
    let (mut base, mut big) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        base = base.min(per_namespace(&small, 3));
        big = big.min(per_namespace(&large, 1));
    }
    println!(
        "plan, all current: 1,000 namespaces {base:.0} ns/namespace (baseline); 10,000 namespaces {big:.0} ns/namespace"
    );
    println!("per-namespace cost at 10,000 against 1,000: {:.2}x (linear: about 1)", big / base);
}
