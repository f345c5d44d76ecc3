//! Leader election: of two replicas exactly one reconciles; when it dies the other takes over;
//! a leader stopped or cut off past its term writes nothing once another took over, and exits.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use regcred_testenv::{TcpProxy, eventually};
use serde_json::json;

use crate::support::*;

/// Two replicas competing for one Lease of `lease` duration, one credential for them, and the
/// index of the replica that leads.
async fn two_replicas(lease: &str) -> (kube::Client, String, [TestController; 2], usize) {
    let cp = env().cp;
    let client = client().await;
    let name = format!("leader-{}", &unique()[..6]);
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let args = [
        "--leader-elect",
        "--leader-election-lease",
        &name,
        "--leader-election-namespace",
        CONTROLLER_NAMESPACE,
        "--leader-election-duration",
        lease,
    ];
    let replicas = [
        spawn_controller(
            cp,
            &format!("{name}-a"),
            &selector,
            &env().aws.endpoint(),
            &args,
            &[("POD_NAME", "replica-a".into())],
        ),
        spawn_controller(
            cp,
            &format!("{name}-b"),
            &selector,
            &env().aws.endpoint(),
            &args,
            &[("POD_NAME", "replica-b".into())],
        ),
    ];
    let ns = namespace(&client, "leader").await;
    let first = secret_value("u", "leader");
    create_secret(&client, &ns, "src", &[("password", first.as_bytes())]).await;
    let spec = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
    create_credential_for(&client, &ns, "cred", Some(&name), spec).await;
    wait_secret(&client, &ns, "cred", "written", |s| logins(s)[0].2 == first).await;

    // Exactly one leader; the standby has not reconciled anything.
    let leader = eventually("one leader", TIMEOUT, || async {
        let leading: Vec<_> = replicas.iter().map(|r| sample(&r.metrics(), "regcred_leader ")).collect();
        match leading.as_slice() {
            [Some(a), Some(b)] if a + b == 1.0 => Some(if *a == 1.0 { 0 } else { 1 }),
            _ => None,
        }
    })
    .await;
    (client, ns, replicas, leader)
}

/// Changes the source password and waits until the Secret carries it; returns how long that took.
async fn change_and_wait(client: &kube::Client, ns: &str, tag: &str) -> Duration {
    let started = Instant::now();
    let password = secret_value("u", tag);
    set_secret_key(client, ns, "src", "password", password.as_bytes()).await;
    wait_secret(client, ns, "cred", "updated by the new leader", |s| logins(s)[0].2 == password).await;
    started.elapsed()
}

#[tokio::test]
async fn one_replica_leads_and_a_standby_takes_over_when_it_dies() {
    let (client, ns, mut replicas, leader) = two_replicas("4s").await;
    let standby = 1 - leader;
    let standby_reconciles = sample(&replicas[standby].metrics(), "regcred_reconciles_total").unwrap_or(0.0);
    assert_eq!(standby_reconciles, 0.0, "the standby reconciled");
    // Both become ready: a standby that stayed unready would stall rolling updates and drains.
    // (Its caches may still be filling when the leader is found: a fresh-clone .ci/run under
    // load saw the standby answer 503 at that moment.)
    for replica in &replicas {
        regcred_testenv::wait_for("the replica ready", TIMEOUT, || {
            (admin_get(replica.admin_port, "/readyz").0 == 200).then_some(())
        })
        .expect("a replica never became ready");
    }

    // The leader dies without releasing the Lease; the standby takes over once it expires.
    replicas[leader].kill();
    let takeover = change_and_wait(&client, &ns, "leader2").await;
    eprintln!("leader takeover after SIGKILL: {takeover:?} (lease duration 4 s)");
    assert!(takeover < Duration::from_secs(4 + 6), "takeover took {takeover:?}");
    assert_eq!(sample(&replicas[standby].metrics(), "regcred_leader "), Some(1.0));
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn a_leader_stopped_with_sigterm_releases_the_lease_and_the_standby_takes_it_at_once() {
    // A long Lease: a standby that waited for it to expire would take seconds.
    let (client, ns, mut replicas, leader) = two_replicas("15s").await;
    let lease_name = replicas_lease(&client, CONTROLLER_NAMESPACE, &ns).await;
    let leader_identity = format!("replica-{}", ["a", "b"][leader]);
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), CONTROLLER_NAMESPACE);
    let spec = |lease: k8s_openapi::api::coordination::v1::Lease| lease.spec.unwrap_or_default();
    // SIGTERM right after a renewal: the old holder's term then ends `leaseDurationSeconds`
    // after that renewal, and a standby that waited for it could not take the Lease before.
    let before = spec(leases.get(&lease_name).await.unwrap()).renew_time;
    let renewed = eventually("a renewal by the leader", TIMEOUT, || async {
        let now = spec(leases.get(&lease_name).await.ok()?);
        (now.renew_time != before).then_some(now)
    })
    .await;
    replicas[leader].terminate();
    let term_end = renewed.renew_time.expect("renewTime").0
        + Duration::from_secs(u64::try_from(renewed.lease_duration_seconds.expect("leaseDurationSeconds")).unwrap());
    // The Lease is given up (holder cleared), not left to expire…
    eventually("the Lease released", TIMEOUT, || async {
        let lease = leases.get(&lease_name).await.ok()?;
        let holder = lease.spec.and_then(|s| s.holder_identity);
        (holder.as_deref() != Some(leader_identity.as_str())).then_some(())
    })
    .await;
    // …and the standby, which has been waiting for a while, takes it at once: it watches the
    // Lease, rather than sleeping until the old holder's term would have ended (at least the
    // 5-second renewal margin of a 15-second Lease).
    let takeover = change_and_wait(&client, &ns, "sigterm").await;
    eprintln!("leader takeover after SIGTERM: {takeover:?} (lease duration 15 s)");
    assert_eq!(sample(&replicas[1 - leader].metrics(), "regcred_leader "), Some(1.0));
    let taken = spec(leases.get(&lease_name).await.unwrap());
    assert_eq!(taken.holder_identity, Some(format!("replica-{}", ["a", "b"][1 - leader])));
    let acquired = taken.acquire_time.expect("acquireTime").0;
    eprintln!(
        "the standby took the Lease {:?} before the old term would have ended",
        term_end.duration_since(acquired)
    );
    assert!(
        acquired < term_end,
        "the standby took the Lease at {acquired}, not before the old term ended at {term_end}"
    );
}

/// Name of the Lease the test's replicas compete for (the one named after their label).
async fn replicas_lease(client: &kube::Client, lease_ns: &str, credential_ns: &str) -> String {
    let creds = Api::<regcred::crd::RegistryCredential>::namespaced(client.clone(), credential_ns);
    let cred = creds.get("cred").await.unwrap();
    let name = cred.metadata.labels.unwrap()[CONTROLLER_LABEL].clone();
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), lease_ns);
    assert!(leases.get_opt(&name).await.unwrap().is_some(), "no Lease {lease_ns}/{name}");
    name
}

/// A replica under an identity of its own (so the audit log tells its requests apart),
/// competing for the Lease `name` as `replica-<which>`, reaching the apiserver through `proxy`
/// when given. Returns it and its user name.
fn own_replica(
    name: &str,
    which: &str,
    lease: &str,
    proxy: Option<&TcpProxy>,
    extra: &[&str],
) -> (TestController, String) {
    let cp = env().cp;
    let (mut kubeconfig, user) = own_identity(&format!("{name}-{which}"), None);
    if let Some(proxy) = proxy {
        let text = std::fs::read_to_string(&kubeconfig).expect("reading the kubeconfig");
        let proxied = text.replace(cp.server(), &format!("https://127.0.0.1:{}", proxy.port()));
        assert_ne!(text, proxied, "the kubeconfig does not name {}", cp.server());
        kubeconfig = cp.dir().join(format!("{name}-{which}-proxied.kubeconfig"));
        std::fs::write(&kubeconfig, proxied).expect("writing the kubeconfig");
    }
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let args: Vec<&str> = [
        "--leader-elect",
        "--leader-election-lease",
        name,
        "--leader-election-namespace",
        CONTROLLER_NAMESPACE,
        "--leader-election-duration",
        lease,
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .collect();
    let envs = [("POD_NAME", format!("replica-{which}")), ("KUBECONFIG", kubeconfig.display().to_string())];
    let replica = spawn_controller(cp, &format!("{name}-{which}"), &selector, &env().aws.endpoint(), &args, &envs);
    (replica, user)
}

/// The holder of the Lease `name`.
async fn holder(client: &kube::Client, name: &str) -> Option<String> {
    let leases = Api::<Lease>::namespaced(client.clone(), CONTROLLER_NAMESPACE);
    leases.get_opt(name).await.ok().flatten()?.spec?.holder_identity
}

/// Waits until `replica` leads with its caches synced (it writes from then on).
async fn wait_leading(replica: &TestController, what: &str) {
    eventually(what, TIMEOUT, || async {
        let leads = sample(&replica.metrics(), "regcred_leader ") == Some(1.0);
        (leads && admin_get(replica.admin_port, "/readyz").0 == 200).then_some(())
    })
    .await;
}

/// Waits (at most `limit`) until `replica` has exited; panics if it has not.
async fn wait_exited(replica: &mut TestController, what: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Err(exit) = replica.check_alive() {
            return exit.to_string();
        }
        assert!(Instant::now() < deadline, "{what}: still running {limit:?} later");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The writes `user` sent after `offset`, as (verb, resource, namespace, name).
fn writes_of_since(user: &str, offset: u64) -> Vec<(String, String, String, String)> {
    requests_of_since(user, offset).into_iter().filter(|(verb, ..)| is_write(verb)).collect()
}

#[tokio::test]
async fn a_leader_paused_past_its_lease_writes_nothing_after_the_takeover_and_exits() {
    let cp = env().cp;
    let client = client().await;
    let name = format!("paused-{}", &unique()[..6]);
    let labels = [("regcred.dev/test-fan-out", name.as_str())];
    let targets = futures::future::join_all((0..12).map(|_| labelled_namespace(&client, "paused", &labels))).await;
    let source_ns = namespace(&client, "paused-src").await;
    let first = secret_value("u", "paused");
    create_secret(&client, &source_ns, "src", &[("password", first.as_bytes())]).await;

    // The first replica leads, through a proxy that will slow it down; the second stands by.
    let proxy = TcpProxy::start(([127, 0, 0, 1], cp.api_port()).into()).expect("starting the proxy");
    // A 9-second Lease: its renewals still come through the slowed proxy in time.
    let (mut old, old_user) = own_replica(&name, "a", "9s", Some(&proxy), &["--concurrency", "1"]);
    wait_leading(&old, "replica-a leading").await;
    let (standby, _) = own_replica(&name, "b", "9s", None, &["--concurrency", "1"]);
    eventually("replica-b ready", TIMEOUT, || async {
        (admin_get(standby.admin_port, "/readyz").0 == 200).then_some(())
    })
    .await;
    assert_eq!(holder(&client, &name).await.as_deref(), Some("replica-a"));

    // A fan-out to 12 namespaces, one write at a time, each held up 2 × 150 ms by the proxy:
    // the leader is paused in the middle of it, with writes still to send.
    proxy.set_delay(Duration::from_millis(150));
    let start = audit_offset();
    let spec = json!({
        "registry": "r.example.com",
        "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
        "namespaces": {"selector": {"matchLabels": {"regcred.dev/test-fan-out": name}}},
    });
    create_cluster_credential_for(&client, &name, Some(&name), spec).await;
    let created_by_old = || {
        requests_of_since(&old_user, start)
            .into_iter()
            .filter(|(verb, resource, ns, _)| verb == "create" && resource == "secrets" && targets.contains(ns))
            .count()
    };
    let deadline = Instant::now() + TIMEOUT;
    while created_by_old() < 2 {
        assert!(Instant::now() < deadline, "replica-a wrote fewer than 2 of the fan-out's Secrets in {TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    old.pause();
    let paused_after = created_by_old();
    eprintln!("paused replica-a after {paused_after} of 12 Secrets");
    assert!(paused_after < targets.len(), "the fan-out ended before replica-a was paused: nothing left to write");

    // Past its term, the standby takes the Lease and finishes the fan-out.
    eventually("replica-b holding the Lease", Duration::from_secs(9 + 15), || async {
        (holder(&client, &name).await.as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    let takeover = audit_offset();
    for ns in &targets {
        wait_secret(&client, ns, &name, "written by replica-b", |s| logins(s)[0].2 == first).await;
    }

    // The old leader runs again: it must send nothing (its fan-out has writes left), and exit.
    proxy.set_delay(Duration::ZERO);
    old.resume();
    let exit = wait_exited(&mut old, "replica-a after losing the Lease", TIMEOUT).await;
    eprintln!("replica-a: {}", exit.lines().next().unwrap_or_default());
    let late = writes_of_since(&old_user, takeover);
    assert!(late.is_empty(), "replica-a wrote after replica-b took the Lease: {late:?}");
    // Nor did it give the Lease up on its way out: it was no longer its to give.
    assert_eq!(holder(&client, &name).await.as_deref(), Some("replica-b"));

    // The new leader goes on alone.
    let second = secret_value("u", "paused2");
    set_secret_key(&client, &source_ns, "src", "password", second.as_bytes()).await;
    wait_secret(&client, &targets[0], &name, "updated by replica-b", |s| logins(s)[0].2 == second).await;
    let _ =
        Api::<regcred::crd::ClusterRegistryCredential>::all(client.clone()).delete(&name, &Default::default()).await;
}

#[tokio::test]
async fn a_leader_cut_off_past_its_lease_stops_writing_before_the_takeover_and_exits() {
    let cp = env().cp;
    let client = client().await;
    let name = format!("cutoff-{}", &unique()[..6]);
    let proxy = TcpProxy::start(([127, 0, 0, 1], cp.api_port()).into()).expect("starting the proxy");
    let (mut old, old_user) = own_replica(&name, "a", "6s", Some(&proxy), &[]);
    wait_leading(&old, "replica-a leading").await;
    let (standby, _) = own_replica(&name, "b", "6s", None, &[]);
    eventually("replica-b ready", TIMEOUT, || async {
        (admin_get(standby.admin_port, "/readyz").0 == 200).then_some(())
    })
    .await;
    let ns = namespace(&client, "cutoff").await;
    let first = secret_value("u", "cutoff");
    create_secret(&client, &ns, "src", &[("password", first.as_bytes())]).await;
    let spec = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
    create_credential_for(&client, &ns, "cred", Some(&name), spec).await;
    wait_secret(&client, &ns, "cred", "written by replica-a", |s| logins(s)[0].2 == first).await;
    assert_eq!(holder(&client, &name).await.as_deref(), Some("replica-a"));

    // replica-a loses the apiserver; past the term the standby takes over.
    proxy.cut();
    let cut = Instant::now();
    eventually("replica-b holding the Lease", Duration::from_secs(6 + 15), || async {
        (holder(&client, &name).await.as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    let takeover = audit_offset();
    eprintln!("replica-b took the Lease {:?} after the cut (lease 6 s)", cut.elapsed());
    // By then replica-a has stopped writing, and says so: it cannot know whether the
    // Lease was renewed, so it stops before the term it last saw ends.
    let still_leads = old.check_alive().is_ok() && sample(&old.metrics(), "regcred_leader ") == Some(1.0);
    assert!(!still_leads, "split brain: replica-a, cut off, still leads while replica-b holds the Lease");

    // Connected again, replica-a sends nothing and is gone; replica-b serves a change.
    proxy.reconnect();
    let second = secret_value("u", "cutoff2");
    set_secret_key(&client, &ns, "src", "password", second.as_bytes()).await;
    wait_secret(&client, &ns, "cred", "updated by replica-b", |s| logins(s)[0].2 == second).await;
    let exit = wait_exited(&mut old, "replica-a after losing the Lease", TIMEOUT).await;
    eprintln!("replica-a: {}", exit.lines().next().unwrap_or_default());
    let late = writes_of_since(&old_user, takeover);
    assert!(late.is_empty(), "replica-a wrote after replica-b took the Lease: {late:?}");
    assert_eq!(holder(&client, &name).await.as_deref(), Some("replica-b"));
}
