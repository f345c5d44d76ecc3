//! Hostile tenants: a ServiceAccount bound to the built-in `edit` role in its own namespace
//! attacks the controller through what it can write there, and servers a tenant controls
//! answer the controller with hostile responses. Nothing a tenant writes may decide anything
//! for another namespace or exhaust the controller. Each test starts its own controller
//! process (and servers), so what it measures is that process's alone.

use std::collections::BTreeSet;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use regcred::crd::RegistryCredential;
use regcred_testenv::{AwsEmulator, eventually};
use serde_json::{Value, json};

use crate::support::*;

const REGISTRY: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
const FORGED: &str = "forged-by-a-tenant";

/// The passwords the emulator handed out to GetAuthorizationToken calls signed by `key_id`.
fn issued_passwords(aws: &AwsEmulator, key_id: &str) -> BTreeSet<String> {
    aws.calls()
        .unwrap()
        .into_iter()
        .filter(|c| c["action"] == "ecr:GetAuthorizationToken" && c["status"] == 200)
        .filter(|c| c["access_key_id"].as_str() == Some(key_id))
        .map(|c| {
            let token = c["authorizationData"][0]["authorizationToken"].as_str().expect("token").to_string();
            let decoded = base64::engine::general_purpose::STANDARD.decode(token).expect("base64");
            let password = String::from_utf8(decoded).expect("utf-8").strip_prefix("AWS:").expect("AWS:").to_string();
            record_secret(&password);
            password
        })
        .collect()
}

/// The one password of a Secret's single login.
fn password(secret: &Secret) -> String {
    logins(secret).remove(0).2
}

/// A `.dockerconfigjson` with the tenant's own password for the ECR registry.
fn forged_config() -> Vec<u8> {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{FORGED}"));
    serde_json::to_vec(&json!({"auths": {REGISTRY: {"username": "AWS", "password": FORGED, "auth": auth}}})).unwrap()
}

/// A ClusterRegistryCredential with ECR access keys from `platform`, fanned out to the
/// namespaces labelled `forge=<name>`.
fn fan_out_spec(name: &str, platform: &str) -> Value {
    json!({
        "source": {"ecr": {"registry": REGISTRY, "auth": {"secretRef": {"name": "aws-keys", "namespace": platform}}}},
        "namespaces": {"selector": {"matchLabels": {"forge": name}}},
    })
}

/// How the controller is interrupted while the tenant forges its Secret.
#[derive(Clone, Copy)]
enum Interruption {
    /// SIGTERM to the only controller, then a new process.
    Restart,
    /// SIGKILL to the leader; the standby, which watched throughout, takes over.
    Failover,
}

/// The controllers the forging tests run, the first leading: one, or a leader and then a
/// standby on a Lease of their own.
async fn forge_controllers(
    name: &str,
    selector: &str,
    aws: &AwsEmulator,
    interruption: Interruption,
) -> Vec<TestController> {
    let cp = env().cp;
    let replicas = match interruption {
        Interruption::Restart => vec![""],
        Interruption::Failover => vec!["-a", "-b"],
    };
    let mut controllers = Vec::new();
    for which in replicas {
        let lease = ["--leader-elect", "--leader-election-lease", name, "--leader-election-duration", "4s"];
        let args = match which {
            "" => Vec::new(),
            _ => [&lease[..], &["--leader-election-namespace", CONTROLLER_NAMESPACE]].concat(),
        };
        let envs = [("POD_NAME", format!("{name}{which}"))];
        let controller = spawn_controller(cp, &format!("{name}{which}"), selector, &aws.endpoint(), &args, &envs);
        if controllers.is_empty() {
            eventually("the first controller leads", TIMEOUT, || async { leads(&controller).then_some(()) }).await;
        }
        controllers.push(controller);
    }
    controllers
}

/// Whether `controller` leads (always, without leader election) with its caches synced.
fn leads(controller: &TestController) -> bool {
    sample(&controller.metrics(), "regcred_leader ") == Some(1.0)
        && admin_get(controller.admin_port, "/readyz").0 == 200
}

/// Item 1 of issue 20. The tenant edits the fan-out's Secret in its namespace while the
/// controller is down, or while the leader is gone and before the standby takes over. After
/// that the controller must not take the tenant's bytes as the token it wrote: a namespace that
/// joins the fan-out gets a token AWS issued, and the tenant's Secret is repaired.
async fn a_token_forged_during(interruption: Interruption) {
    let admin = client().await;
    let aws = AwsEmulator::start().unwrap();
    let name = format!("forge-{}", &unique()[..6]);
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let mut controllers = forge_controllers(&name, &selector, &aws, interruption).await;
    let platform = namespace(&admin, "forge-platform").await;
    let key_id = create_aws_keys(&admin, &aws, &platform, "aws-keys", "secretkey").await;
    let tenant_ns = labelled_namespace(&admin, "forge-tenant", &[("forge", &name)]).await;
    let tenant = tenant(&admin, &tenant_ns).await;
    create_cluster_credential_for(&admin, &name, Some(&name), fan_out_spec(&name, &platform)).await;
    let genuine = password(&wait_secret(&admin, &tenant_ns, &name, "written", |_| true).await);
    assert_eq!(issued_passwords(&aws, &key_id), BTreeSet::from([genuine.clone()]));
    wait_cluster(&admin, &name, "the digest of what it wrote recorded", |s| s.credential.token_digest.is_some()).await;
    let mut first = controllers.remove(0);
    match interruption {
        Interruption::Restart => first.terminate(),
        Interruption::Failover => first.kill(),
    }
    drop(first);

    // The tenant writes its own token into the Secret regcred wrote in its namespace.
    let patch =
        json!({"data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(forged_config())}});
    Api::<Secret>::namespaced(tenant.clone(), &tenant_ns)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("an editor may patch Secrets in its namespace");

    let mut next = match interruption {
        Interruption::Restart => spawn_controller(env().cp, &format!("{name}-2"), &selector, &aws.endpoint(), &[], &[]),
        Interruption::Failover => controllers.remove(0),
    };
    let joined = labelled_namespace(&admin, "forge-joined", &[("forge", &name)]).await;
    let written = wait_secret(&admin, &joined, &name, "written", |_| true).await;
    // `next` wrote it: the first controller is gone (SIGTERM and waited for, or SIGKILL).
    next.check_alive().expect("the next controller runs");
    assert_ne!(password(&written), FORGED, "the tenant's token was written into another namespace");
    let repaired = wait_secret(&admin, &tenant_ns, &name, "repaired", |s| password(s) != FORGED).await;
    let issued = issued_passwords(&aws, &key_id);
    for (ns, secret) in [(&joined, &written), (&tenant_ns, &repaired)] {
        assert!(issued.contains(&password(secret)), "{ns} holds a token AWS did not issue");
    }
    assert_no_leaks(&admin).await;
}

#[tokio::test]
async fn a_token_forged_during_a_restart_reaches_no_other_namespace() {
    a_token_forged_during(Interruption::Restart).await;
}

#[tokio::test]
async fn a_token_forged_during_a_leader_failover_reaches_no_other_namespace() {
    a_token_forged_during(Interruption::Failover).await;
}

/// With a genuine Secret beside the forged one, the restarted controller seeds its token
/// cache from the genuine one: no call to AWS, the other tenant's Secret is not rewritten, and
/// the forged one is repaired with the token regcred wrote.
#[tokio::test]
async fn a_forged_secret_is_repaired_from_the_genuine_token_without_a_provider_call() {
    let admin = client().await;
    let aws = AwsEmulator::start().unwrap();
    let name = format!("forge2-{}", &unique()[..6]);
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let mut first = spawn_controller(env().cp, &name, &selector, &aws.endpoint(), &[], &[]);
    let platform = namespace(&admin, "forge-platform").await;
    let key_id = create_aws_keys(&admin, &aws, &platform, "aws-keys", "secretkey").await;
    let tenant_ns = labelled_namespace(&admin, "forge-tenant", &[("forge", &name)]).await;
    let victim = labelled_namespace(&admin, "forge-victim", &[("forge", &name)]).await;
    let tenant = tenant(&admin, &tenant_ns).await;
    create_cluster_credential_for(&admin, &name, Some(&name), fan_out_spec(&name, &platform)).await;
    wait_secret(&admin, &tenant_ns, &name, "written", |_| true).await;
    wait_secret(&admin, &victim, &name, "written", |_| true).await;
    wait_cluster(&admin, &name, "the digest of what it wrote recorded", |s| s.credential.token_digest.is_some()).await;
    first.terminate();
    drop(first);
    let before = Api::<Secret>::namespaced(admin.clone(), &victim).get(&name).await.unwrap();
    let genuine = password(&before);

    let patch =
        json!({"data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(forged_config())}});
    Api::<Secret>::namespaced(tenant.clone(), &tenant_ns)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("an editor may patch Secrets in its namespace");

    let _second = spawn_controller(env().cp, &format!("{name}-2"), &selector, &aws.endpoint(), &[], &[]);
    let repaired = wait_secret(&admin, &tenant_ns, &name, "repaired", |s| password(s) != FORGED).await;
    assert_eq!(password(&repaired), genuine, "repaired with the token regcred wrote");
    let after = Api::<Secret>::namespaced(admin.clone(), &victim).get(&name).await.unwrap();
    assert_eq!(after.metadata.resource_version, before.metadata.resource_version, "the victim's Secret was rewritten");
    assert_eq!(issued_passwords(&aws, &key_id).len(), 1, "the restart asked AWS again");
    assert_no_leaks(&admin).await;
}

/// A tenant points `spec.verify` at a registry of their own whose Bearer realm answers the
/// token request with an endless body (chunked), or announces a 1 TiB one (Content-Length)
/// and streams it. The controller stops reading at its cap: `Verified=False` with
/// `ResponseTooLarge` naming the endpoint and the cap, its peak RSS stays under 100 MiB, and
/// it keeps running. Each realm streams at most 256 MiB and then stops, so the test ends by
/// itself even against a controller that reads it all.
#[tokio::test]
async fn an_endless_token_answer_is_cut_off_at_the_cap_and_memory_stays_bounded() {
    use std::{
        io::{Read, Write},
        net::TcpListener,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        time::Duration,
    };

    /// The most a realm sends on one connection.
    const BUDGET: u64 = 256 << 20;
    const CHUNK: usize = 64 << 10;

    /// A registry on 127.0.0.1: `GET /v2/` is a Bearer challenge naming its own `/token` as
    /// the realm, which streams `{"token":"aaaa…` until `BUDGET` is sent or the client hangs
    /// up. `lying`: announce a 1 TiB Content-Length instead of chunking. Counts the body bytes
    /// it got out; stops accepting once `stop` is set.
    fn hostile_registry(lying: bool, sent: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let host = listener.local_addr().expect("its address").to_string();
        listener.set_nonblocking(true).expect("non-blocking accept");
        let realm = format!("http://{host}/token");
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok((mut socket, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let (realm, sent) = (realm.clone(), sent.clone());
                std::thread::spawn(move || {
                    let _ = socket.set_nonblocking(false);
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.ends_with(b"\r\n\r\n") && request.len() < 16 << 10 {
                        match socket.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    if !request.starts_with(b"GET /token") {
                        let challenge = format!(
                            "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer realm=\"{realm}\",service=\"hostile\"\r\n\
                             content-length: 0\r\nconnection: close\r\n\r\n"
                        );
                        let _ = socket.write_all(challenge.as_bytes());
                        return;
                    }
                    let framing = if lying { "content-length: 1099511627776" } else { "transfer-encoding: chunked" };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{framing}\r\nconnection: close\r\n\r\n"
                    );
                    if socket.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    // `{"token":"` and then a token that never ends.
                    let frame = |data: &[u8]| match lying {
                        true => data.to_vec(),
                        false => [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat(),
                    };
                    if socket.write_all(&frame(br#"{"token":""#)).is_err() {
                        return;
                    }
                    let frame = frame(&[b'a'; CHUNK]);
                    let mut out = 0u64;
                    while out < BUDGET {
                        if socket.write_all(&frame).is_err() {
                            return; // the controller hung up
                        }
                        out += CHUNK as u64;
                        sent.fetch_add(CHUNK as u64, Ordering::SeqCst);
                    }
                    if !lying {
                        let _ = socket.write_all(b"0\r\n\r\n");
                    }
                });
            }
        });
        host
    }

    /// Stops the servers' accept loops when the test ends, however it ends.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    let client = client().await;
    let ns = namespace(&client, "hostile-endless").await;
    let name = format!("hostile-{}", &unique()[..6]);
    let mut controller = spawn_labelled(&name, &[], &[]);
    let stop = Stop(Arc::default());
    let (endless_sent, lying_sent) = (Arc::<AtomicU64>::default(), Arc::<AtomicU64>::default());
    let endless = hostile_registry(false, endless_sent.clone(), stop.0.clone());
    let lying = hostile_registry(true, lying_sent.clone(), stop.0.clone());
    let password = secret_value("tenant", "hostile");
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    for (cred, host) in [("endless", &endless), ("lying", &lying)] {
        let spec = json!({"registry": host, "verify": {"insecure": true},
                          "source": {"basic": {"username": "tenant", "passwordSecretRef": {"name": "src"}}}});
        create_credential_for(&client, &ns, cred, Some(&name), spec).await;
    }

    // Whatever the reason: the check ended. Then the memory it took, then the reason.
    let api = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    let verified = |cr: &RegistryCredential| {
        let condition = cr.status.as_ref()?.condition("Verified")?;
        (condition.status == "False").then(|| (condition.reason.clone(), condition.message.clone()))
    };
    let mut results = Vec::new();
    for (cred, host) in [("endless", &endless), ("lying", &lying)] {
        let result =
            eventually(&format!("{cred}: Verified=False"), TIMEOUT, || async { verified(&api.get(cred).await.ok()?) })
                .await;
        results.push((cred, host, result));
    }
    let (rss, peak) = controller.rss_kib();
    let (endless_sent, lying_sent) = (endless_sent.load(Ordering::SeqCst), lying_sent.load(Ordering::SeqCst));
    println!(
        "controller VmRSS {} KiB, VmHWM {} KiB; the realms got out {endless_sent} (endless) and {lying_sent} (lying) \
         body bytes; {results:?}",
        rss, peak
    );
    assert!(
        peak < 100 << 10,
        "the controller's peak RSS reached {} MiB reading the realms' answers ({} and {} MiB sent): {results:?}",
        peak >> 10,
        endless_sent >> 20,
        lying_sent >> 20
    );
    for (cred, host, (reason, message)) in &results {
        assert_eq!(reason, "ResponseTooLarge", "{cred}: {message}");
        let named = format!("the token endpoint http://{host}/token answered with more than 64 KiB");
        assert!(message.contains(&named), "{cred}: {message}");
        assert!(!message.contains("aaaa"), "{cred}: the body is quoted: {message}");
    }
    // The controller hung up soon after the cap: what got out is the cap plus what the
    // sockets' buffers took in.
    assert!(endless_sent < 32 << 20, "the endless realm got {endless_sent} bytes out");
    controller.check_alive().expect("the controller survived the realms' answers");
    assert_eq!(admin_get(controller.admin_port, "/healthz").0, 200, "the controller still answers");
    drop(stop);
}

/// Items 3 and 4 of issue 20. The tenant plants 200 Secrets carrying a cluster credential's
/// uid label (and regcred's managed-by label) with 100 KB annotations each, then flips a label
/// on one of them 20 times. A label decides nothing: the controller lists no Secret and reads
/// none of the look-alikes, however often the tenant flips them, and its memory stays flat.
/// (Before, each flip made it list the credential's Secrets by that label, look-alikes and
/// their annotations included.)
#[tokio::test]
async fn look_alike_secrets_and_label_flips_make_the_controller_read_nothing() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{ObjectMeta, PostParams};

    let admin = client().await;
    let name = format!("lookalike-{}", &unique()[..6]);
    let (kubeconfig, user) = own_identity(&name, None);
    let identity = [("KUBECONFIG", kubeconfig.display().to_string())];
    let controller = spawn_labelled(&name, &[], &identity);
    let source_ns = namespace(&admin, "lookalike-src").await;
    let password = secret_value("robot", "lookalike");
    create_secret(&admin, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let tenant_ns = labelled_namespace(&admin, "lookalike-tenant", &[("lookalike", &name)]).await;
    let tenant = tenant(&admin, &tenant_ns).await;
    let spec = json!({
        "registry": "registry.example.com",
        "source": {"basic": {"username": "robot", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
        "namespaces": {"selector": {"matchLabels": {"lookalike": name}}},
    });
    let uid = create_cluster_credential_for(&admin, &name, Some(&name), spec).await.metadata.uid.unwrap();
    wait_cluster(&admin, &name, "synced", |s| s.synced_namespaces == Some(1)).await;

    let secrets = Api::<Secret>::namespaced(tenant.clone(), &tenant_ns);
    let filler = "x".repeat(100_000);
    for i in 0..200 {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(format!("look-alike-{i}")),
                labels: Some(
                    [
                        (regcred::secret::CREDENTIAL_UID_LABEL.to_string(), uid.clone()),
                        ("app.kubernetes.io/managed-by".to_string(), "regcred".to_string()),
                    ]
                    .into(),
                ),
                annotations: Some([("filler".to_string(), filler.clone())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        secrets.create(&PostParams::default(), &secret).await.expect("an editor may create Secrets");
    }
    let offset = audit_offset();
    for flip in 0..20 {
        let patch = json!({"metadata": {"labels": {"flip": flip.to_string()}}});
        secrets.patch("look-alike-0", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
    // Something the controller must act on, after the flips: once it has, it saw them too.
    let joined = labelled_namespace(&admin, "lookalike-joined", &[("lookalike", &name)]).await;
    wait_secret(&admin, &joined, &name, "written", |_| true).await;
    let reads: Vec<_> = requests_of_since(&user, offset)
        .into_iter()
        .filter(|(verb, resource, _, object)| {
            resource == "secrets" && (verb == "list" || object.starts_with("look-alike-"))
        })
        .collect();
    assert!(reads.is_empty(), "the controller read Secrets because of a label: {reads:?}");
    let (_, peak_kib) = controller.rss_kib();
    eprintln!("look-alikes: controller peak RSS {} MiB", peak_kib / 1024);
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");

    // A restart beside them: its first listing pages through them (their labels and
    // annotations dropped as they arrive), and it reads none of them.
    drop(controller);
    let offset = audit_offset();
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let restarted = spawn_controller(env().cp, &format!("{name}-2"), &selector, &env().aws.endpoint(), &[], &identity);
    regcred_testenv::eventually("the restarted controller reconciled", TIMEOUT, || async {
        sample(&restarted.metrics(), "regcred_reconciles_total").filter(|n| *n >= 1.0)
    })
    .await;
    let reads: Vec<_> = requests_of_since(&user, offset)
        .into_iter()
        .filter(|(verb, resource, _, object)| {
            resource == "secrets" && verb == "get" && object.starts_with("look-alike-")
        })
        .collect();
    assert!(reads.is_empty(), "the restarted controller read look-alikes: {reads:?}");
    let (_, restart_peak_kib) = restarted.rss_kib();
    eprintln!("look-alikes: restarted controller peak RSS {} MiB", restart_peak_kib / 1024);
    assert!(restart_peak_kib < 64 * 1024, "peak RSS after a restart {restart_peak_kib} KiB");
    assert_no_leaks(&admin).await;
}

/// A server on 127.0.0.1 that answers nothing and counts the connections made to it.
fn connection_counter() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::{Arc, atomic::AtomicUsize};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    let host = listener.local_addr().expect("its address").to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    (host, count)
}

/// Item 6 of issue 20. A tenant points `spec.verify` at an address inside the cluster network
/// (here 127.0.0.1), over HTTPS and over plain HTTP (`insecure`): under a controller installed
/// as by default, its check is refused before anything is sent (`Verified=False`,
/// `NotAllowed`), so the Verified message cannot tell it what answers there. A
/// ClusterRegistryCredential's check of the same address is made; with
/// `--verify-allowed-hosts`, not even that one, as the host is not listed.
#[tokio::test]
async fn a_tenants_check_cannot_probe_the_cluster_network() {
    use std::sync::atomic::Ordering;

    let admin = client().await;
    let name = format!("probe-{}", &unique()[..6]);
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let _strict = spawn_strict_controller(env().cp, &name, &selector, &env().aws.endpoint(), &[], &[]);
    let (target, connections) = connection_counter();
    let ns = namespace(&admin, "probe").await;
    let password = secret_value("robot", "probe");
    create_secret(&admin, &ns, "src", &[("password", password.as_bytes())]).await;
    for (credential, insecure) in [("https", false), ("plain", true)] {
        let spec = json!({"registry": target, "verify": {"insecure": insecure},
                          "source": {"basic": {"username": "robot", "passwordSecretRef": {"name": "src"}}}});
        create_credential_for(&admin, &ns, credential, Some(&name), spec).await;
        let message = crate::verify::wait_verified(&admin, &ns, credential, "False", "NotAllowed").await;
        assert!(message.contains("127.0.0.1"), "{message}");
    }
    assert_eq!(connections.load(Ordering::SeqCst), 0, "a tenant's check reached the address");

    // The platform's own credential may check it (the counter sees the connection).
    let platform = json!({"registry": target, "verify": {"insecure": true}, "namespaces": {"names": [ns]},
                          "secret": {"name": "platform"},
                          "source": {"basic": {"username": "robot", "passwordSecretRef": {"name": "src", "namespace": ns}}}});
    create_cluster_credential_for(&admin, &name, Some(&name), platform.clone()).await;
    regcred_testenv::eventually("the cluster credential's check connects", TIMEOUT, || async {
        (connections.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;

    // With an allowlist, a host outside it is not reached by anyone.
    let listed = format!("{name}-listed");
    let listed_selector = format!("{CONTROLLER_LABEL}={listed}");
    let allow = ["--verify-allowed-hosts", "registry.example.com"];
    let _listed = spawn_strict_controller(env().cp, &listed, &listed_selector, &env().aws.endpoint(), &allow, &[]);
    let before = connections.load(Ordering::SeqCst);
    let mut spec = platform;
    spec["secret"]["name"] = json!("listed");
    create_cluster_credential_for(&admin, &listed, Some(&listed), spec).await;
    let verified = wait_cluster(&admin, &listed, "Verified=False NotAllowed", |s| {
        s.credential.condition("Verified").is_some_and(|c| c.status == "False" && c.reason == "NotAllowed")
    })
    .await;
    let message = verified.status.unwrap().credential.condition("Verified").unwrap().message.clone();
    assert!(message.contains("--verify-allowed-hosts"), "{message}");
    assert_eq!(connections.load(Ordering::SeqCst), before, "a host outside the allowlist was reached");
    assert_no_leaks(&admin).await;
}

/// Item 7 of issue 20. A ClusterRegistryCredential's Events are in `default` (the apiserver
/// refused an Event about a cluster-scoped object in the controller's namespace: 422
/// "involvedObject.namespace: does not match event.namespace"), where readers of `default`
/// see them. So they carry counts and reasons, never the namespaces they write into: a tenant
/// who can read `default` learns nothing of which other tenants a fan-out serves, nor of a
/// tenant's Secret that blocks it.
#[tokio::test]
async fn a_fan_outs_events_name_no_tenant_namespace() {
    let admin = client().await;
    let tag = unique()[..8].to_string();
    let name = format!("quiet-events-{tag}");
    let source_ns = namespace(&admin, "events-src").await;
    let password = secret_value("robot", "events");
    create_secret(&admin, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let served = labelled_namespace(&admin, "events-served", &[("events", &tag)]).await;
    let blocked = labelled_namespace(&admin, "events-blocked", &[("events", &tag)]).await;
    // A tenant's own Secret of the fan-out's name: that namespace fails.
    create_secret(&admin, &blocked, &name, &[("mine", b"not regcred's")]).await;
    let spec = json!({
        "registry": "registry.example.com",
        "source": {"basic": {"username": "robot", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
        "namespaces": {"selector": {"matchLabels": {"events": tag}}},
    });
    create_cluster_credential_for(&admin, &name, None, spec).await;
    wait_secret(&admin, &served, &name, "written", |_| true).await;
    wait_cluster(&admin, &name, "the blocked namespace failed", |s| s.failed_namespaces == Some(1)).await;
    wait_event(&admin, "default", "ClusterRegistryCredential", &name, "Normal", "Synced").await;
    let events = events_for(&admin, "default", "ClusterRegistryCredential", &name).await;
    for (_, reason, note) in &events {
        for namespace in [&served, &blocked] {
            assert!(!note.contains(namespace.as_str()), "{reason} names {namespace}: {note}");
        }
    }
}

/// Issue 20, item 4: a tenant annotates ServiceAccounts in a namespace the cluster credential
/// does not target as if it had added entries there, and keeps editing them. They can change
/// nothing the credential does, so their events reach it no more, and it reads none of them.
/// (Before, each was read at every reconcile, and each edit made one.)
#[tokio::test]
async fn service_accounts_a_tenant_marks_outside_the_targets_are_never_read() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::api::{ObjectMeta, PostParams};

    let admin = client().await;
    let name = format!("marked-{}", &unique()[..6]);
    let (kubeconfig, user) = own_identity(&name, None);
    let _controller = spawn_labelled(&name, &[], &[("KUBECONFIG", kubeconfig.display().to_string())]);
    let source_ns = namespace(&admin, "marked-src").await;
    let password = secret_value("robot", "marked");
    create_secret(&admin, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let _target = labelled_namespace(&admin, "marked-target", &[("marked", &name)]).await;
    let tenant_ns = namespace(&admin, "marked-tenant").await;
    let tenant = tenant(&admin, &tenant_ns).await;
    let spec = json!({
        "registry": "registry.example.com",
        "source": {"basic": {"username": "robot", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
        "namespaces": {"selector": {"matchLabels": {"marked": name}}},
        "secret": {"name": "pull"},
        "serviceAccounts": ["default"],
    });
    let uid = create_cluster_credential_for(&admin, &name, Some(&name), spec).await.metadata.uid.unwrap();
    wait_cluster(&admin, &name, "synced", |s| s.synced_namespaces == Some(1)).await;

    let offset = audit_offset();
    let accounts = Api::<ServiceAccount>::namespaced(tenant.clone(), &tenant_ns);
    let marked = [(regcred::service_account::ADDED_ANNOTATION.to_string(), format!("pull={uid}"))];
    for i in 0..20 {
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(format!("marked-{i}")),
                annotations: Some(marked.clone().into()),
                ..Default::default()
            },
            ..Default::default()
        };
        accounts.create(&PostParams::default(), &account).await.expect("an editor may create ServiceAccounts");
    }
    for flip in 0..20 {
        let patch = json!({"metadata": {"annotations": {"flip": flip.to_string()}}});
        accounts.patch(&format!("marked-{}", flip % 5), &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
    // Something the controller must act on, after the edits: once it has, it saw them too.
    let joined = labelled_namespace(&admin, "marked-joined", &[("marked", &name)]).await;
    wait_secret(&admin, &joined, "pull", "written", |_| true).await;
    let touched: Vec<_> = requests_of_since(&user, offset)
        .into_iter()
        .filter(|(_, resource, namespace, _)| resource == "serviceaccounts" && *namespace == tenant_ns)
        .collect();
    assert!(touched.is_empty(), "the controller read or wrote the tenant's ServiceAccounts: {touched:?}");
}
