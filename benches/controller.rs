//! Measures regcred against the real local control plane and the AWS emulator, each figure
//! next to a baseline from the same run. Not a test: it prints a report.
//!
//!   cargo bench --bench controller                     # short idle window (30 s)
//!   cargo bench --bench controller -- --idle-secs 300  # the 5-minute idle window
//!
//! 1. apply → Ready latency, median of 20, against a baseline that does the same work
//!    directly with a plain client (read the source Secret, create the pull Secret, patch
//!    the credential's status). Both clocks start before the credential's create and stop
//!    the same way: when a GET of the credential shows Ready=True (polled every 5 ms). The
//!    samples interleave (baseline, regcred; then regcred, baseline; …) after 3 warm-up pairs
//!    that are not counted, so a drift of the machine's load or of the apiserver's caches
//!    falls on both alike;
//! 2. writes by the controller while idle after sync (audit log), against the writes it made
//!    to sync the 20 credentials;
//! 3. controller RSS after sync, against its RSS before any credential existed;
//! 4. ECR: AWS calls and apiserver writes per token rotation for 1, 10 and 100 credentials
//!    sharing one identity, against one call per credential (what a per-object refresher does).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use regcred::crd::RegistryCredential;
use regcred_testenv::{AwsEmulator, CONTROLLER_USER, ControlPlane, Process};
use serde_json::{Value, json};

const LATENCY_SAMPLES: usize = 20;
/// Pairs (one baseline, one regcred sample) run first and not counted: the first creates of a
/// kind warm the apiserver's caches and the controller's connections.
const WARM_UP: usize = 3;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let idle_secs: u64 =
        std::env::args().skip_while(|a| a != "--idle-secs").nth(1).map(|v| v.parse()).transpose()?.unwrap_or(30);
    let cp = ControlPlane::start()?;
    cp.install_crds(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds"))?;
    let client = cp.client().await;
    let aws = AwsEmulator::start_with_lifetime(30)?;
    let controller = spawn(&cp, &aws)?;
    tokio::time::sleep(Duration::from_secs(2)).await; // let it list and settle before the RSS baseline
    let rss_empty = controller.rss_kib();

    // 1. Latency.
    namespace(&client, "bench").await?;
    let secrets = Api::<Secret>::namespaced(client.clone(), "bench");
    secrets.create(&PostParams::default(), &secret("source", b"password", b"bench-password")).await?;
    let audit_before_sync = cp.audit_log_len()?;
    let (mut baseline, mut regcred) = (Vec::new(), Vec::new());
    for i in 0..WARM_UP + LATENCY_SAMPLES {
        // Alternate which goes first, so neither always follows the other's writes.
        let (base, ctl) = if i % 2 == 0 {
            let base = direct_sync(&client, i).await?;
            (base, controller_sync(&client, i).await?)
        } else {
            let ctl = controller_sync(&client, i).await?;
            (direct_sync(&client, i).await?, ctl)
        };
        if i >= WARM_UP {
            baseline.push(base);
            regcred.push(ctl);
        }
    }
    let (base_ms, ctl_ms) = (median_ms(&mut baseline), median_ms(&mut regcred));
    println!(
        "apply → Ready, median of {LATENCY_SAMPLES}: regcred {ctl_ms:.1} ms, direct baseline {base_ms:.1} ms, ratio {:.2}×",
        ctl_ms / base_ms
    );
    println!(
        "  min/max: regcred {:.1}/{:.1} ms, baseline {:.1}/{:.1} ms ({WARM_UP} warm-up pairs first, not counted)",
        ms(regcred[0]),
        ms(regcred[LATENCY_SAMPLES - 1]),
        ms(baseline[0]),
        ms(baseline[LATENCY_SAMPLES - 1])
    );

    // 2. Idle writes, 3. RSS.
    let sync_writes = controller_writes(&cp, audit_before_sync, cp.audit_log_len()?, None)?;
    let rss_synced = controller.rss_kib();
    let idle_start = cp.audit_log_len()?;
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle_writes = controller_writes(&cp, idle_start, cp.audit_log_len()?, None)?;
    println!(
        "writes by the controller in {idle_secs} s idle after sync: {} (syncing the {} credentials took {})",
        idle_writes.values().sum::<usize>(),
        WARM_UP + LATENCY_SAMPLES,
        sync_writes.values().sum::<usize>()
    );
    println!("  sync writes by resource: {sync_writes:?}; idle: {idle_writes:?}");
    println!(
        "controller RSS: {} KiB after syncing {} credentials, {} KiB before any (ratio {:.2}×); peak {} KiB",
        rss_synced.0,
        WARM_UP + LATENCY_SAMPLES,
        rss_empty.0,
        rss_synced.0 as f64 / rss_empty.0 as f64,
        rss_synced.1
    );

    // 4. ECR rotations.
    for n in [1usize, 10, 100] {
        let (calls, writes) = ecr_rotation(&cp, &client, &aws, n).await?;
        println!(
            "ECR, {n:>3} credentials sharing one identity: {calls} GetAuthorizationToken per rotation (per-object refresher: {n}, ratio {:.2}), controller writes per rotation: {} {writes:?}",
            calls as f64 / n as f64,
            writes.values().sum::<usize>()
        );
    }
    drop(controller);
    Ok(())
}

fn spawn(cp: &ControlPlane, aws: &AwsEmulator) -> anyhow::Result<Process> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcred"));
    // The baseline's credentials carry the label `bench`; the controller leaves them alone.
    cmd.args(["run", "--selector", "!bench", "--aws-endpoint-url", &aws.endpoint()])
        .args(["--admin-addr", &format!("127.0.0.1:{}", regcred_testenv::free_port())])
        .env("KUBECONFIG", cp.controller_kubeconfig_path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info");
    Process::spawn("regcred", cmd, &cp.dir().join("regcred-bench.log"))
}

async fn namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let ns = Namespace { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Ok(())
}

fn secret(name: &str, key: &[u8], value: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some(BTreeMap::from([(String::from_utf8_lossy(key).into_owned(), ByteString(value.to_vec()))])),
        ..Default::default()
    }
}

fn credential(name: &str, spec: Value) -> anyhow::Result<RegistryCredential> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
        "metadata": {"name": name}, "spec": spec,
    }))?)
}

/// What the controller does for one credential, done directly: the baseline.
async fn direct_sync(client: &Client, i: usize) -> anyhow::Result<Duration> {
    let creds = Api::<RegistryCredential>::namespaced(client.clone(), "bench");
    let secrets = Api::<Secret>::namespaced(client.clone(), "bench");
    let name = format!("direct-{i}");
    let spec = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "source"}}},
                      "secret": {"name": format!("{name}-pull")}});
    let mut cr = credential(&name, spec)?;
    cr.metadata.labels = Some(BTreeMap::from([("bench".into(), "direct".into())]));
    let start = Instant::now();
    let cr = creds.create(&PostParams::default(), &cr).await?;
    let source = secrets.get("source").await?;
    let password = source.data.and_then(|d| d.get("password").cloned()).map(|b| b.0).unwrap_or_default();
    let rendered = regcred::dockerconfig::render(&[regcred::dockerconfig::RegistryAuth {
        server: "r.example.com".into(),
        username: "u".into(),
        password: String::from_utf8_lossy(&password).into_owned().into(),
    }]);
    let auth = secrecy::ExposeSecret::expose_secret(&rendered);
    secrets.create(&PostParams::default(), &secret(&format!("{name}-pull"), b".dockerconfigjson", auth)).await?;
    let status = json!({"apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Synced", "message": "direct",
                   "lastTransitionTime": "2026-01-01T00:00:00Z"}], "observedGeneration": cr.metadata.generation}});
    creds.patch_status(&name, &PatchParams::apply("bench").force(), &Patch::Apply(&status)).await?;
    wait_ready(&creds, &name, start).await
}

/// Creates a credential and waits until the controller reports it Ready.
async fn controller_sync(client: &Client, i: usize) -> anyhow::Result<Duration> {
    let creds = Api::<RegistryCredential>::namespaced(client.clone(), "bench");
    let name = format!("ctl-{i}");
    let spec = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "source"}}}});
    let start = Instant::now();
    creds.create(&PostParams::default(), &credential(&name, spec)?).await?;
    wait_ready(&creds, &name, start).await
}

/// Both samples' clock stop: polls (every 5 ms) until a GET shows the credential Ready=True;
/// the time since `start`. The baseline's first GET already sees it, as regcred's last does.
async fn wait_ready(creds: &Api<RegistryCredential>, name: &str, start: Instant) -> anyhow::Result<Duration> {
    loop {
        let cr = creds.get(name).await?;
        if cr.status.as_ref().and_then(|s| s.condition("Ready")).is_some_and(|c| c.status == "True") {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "{name} not Ready in 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One rotation for `n` credentials sharing keys: (GetAuthorizationToken calls, writes).
async fn ecr_rotation(
    cp: &ControlPlane,
    client: &Client,
    aws: &AwsEmulator,
    n: usize,
) -> anyhow::Result<(u64, BTreeMap<String, usize>)> {
    let ns = format!("ecr-{n}");
    namespace(client, &ns).await?;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let key_id = format!("AKIABENCH{n:011}");
    // The emulator checks signatures: these keys are an IAM user's.
    aws.add_access_key(&key_id, &key_id, "bench-secret")?;
    let mut keys = secret("aws-keys", b"accessKeyId", key_id.as_bytes());
    keys.data.as_mut().unwrap().insert("secretAccessKey".into(), ByteString(b"bench-secret".to_vec()));
    secrets.create(&PostParams::default(), &keys).await?;
    let creds = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    for i in 0..n {
        let spec = json!({"source": {"ecr": {"registry": "123456789012.dkr.ecr.eu-west-1.amazonaws.com", "auth": {"secretRef": {"name": "aws-keys"}}}}});
        creds.create(&PostParams::default(), &credential(&format!("c{i}"), spec)?).await?;
    }
    let first = wait_tokens(&secrets, n, None).await?;
    // One rotation: from now until every Secret holds a token other than the first. Earlier
    // sizes keep rotating meanwhile, so calls count by access key and writes by namespace.
    let (calls_before, audit_before) = (token_calls(aws, &key_id)?, cp.audit_log_len()?);
    wait_tokens(&secrets, n, Some(&first)).await?;
    let calls = token_calls(aws, &key_id)? - calls_before;
    let writes = controller_writes(cp, audit_before, cp.audit_log_len()?, Some(&ns))?;
    Ok((calls, writes))
}

/// Waits until `n` Secrets c0..c(n-1) exist and none holds `not`; returns the password they hold.
async fn wait_tokens(secrets: &Api<Secret>, n: usize, not: Option<&str>) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let mut passwords = Vec::new();
        for i in 0..n {
            if let Some(s) = secrets.get_opt(&format!("c{i}")).await? {
                let config = &s.data.unwrap_or_default()[".dockerconfigjson"].0;
                let login = regcred::dockerconfig::parse(config)?;
                passwords.push(secrecy::ExposeSecret::expose_secret(&login[0].password).to_string());
            }
        }
        let fresh: Vec<_> = passwords.iter().filter(|p| Some(p.as_str()) != not).collect();
        if fresh.len() == n && fresh.iter().all(|p| *p == fresh[0]) {
            return Ok(fresh[0].clone());
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(90), "tokens did not settle");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// GetAuthorizationToken calls signed with this access key.
fn token_calls(aws: &AwsEmulator, key_id: &str) -> anyhow::Result<u64> {
    let calls = aws.calls()?;
    Ok(calls.iter().filter(|c| c["action"] == "ecr:GetAuthorizationToken" && c["access_key_id"] == key_id).count()
        as u64)
}

/// Writes by the controller between two audit log offsets (in one namespace, if given), by resource.
fn controller_writes(
    cp: &ControlPlane,
    from: u64,
    to: u64,
    namespace: Option<&str>,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let text = cp.read_audit_log(from, Some(to))?;
    let mut writes = BTreeMap::new();
    for event in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        let verb = event["verb"].as_str().unwrap_or_default();
        let in_namespace = namespace.is_none_or(|ns| event["objectRef"]["namespace"] == ns);
        if event["user"]["username"] == CONTROLLER_USER
            && in_namespace
            && matches!(verb, "create" | "update" | "patch" | "delete")
        {
            let resource = event["objectRef"]["resource"].as_str().unwrap_or_default();
            let sub = event["objectRef"]["subresource"].as_str().map(|s| format!("/{s}")).unwrap_or_default();
            *writes.entry(format!("{verb} {resource}{sub}")).or_default() += 1;
        }
    }
    Ok(writes)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    ms(samples[samples.len() / 2])
}
