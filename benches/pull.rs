//! From a source change to a Pod that pulls with the new credential, on a real node
//! (testenv's `Node`: containerd and a kubelet) against a real registry, next to the same Pod
//! with a hand-written Secret in the same run. Not a test: it prints a report. Needs a machine
//! that can run the node (root, containerd, runc).
//!
//!   cargo bench --bench pull [-- --samples 20]
//!
//! Each sample, the registry's password changes (the registry takes only the new one) and:
//!
//! * regcred: the source Secret gets the new password; as soon as regcred's pull Secret holds
//!   it, a Pod naming that Secret is created; the time runs from the source change to the
//!   kubelet's `Pulled` Event for the Pod (and on to the Pod's container having run);
//! * hand-written: the `.dockerconfigjson` Secret is rewritten with the new password and the
//!   same Pod (naming that Secret) created at once; the time runs from the write to `Pulled`.
//!
//! The difference is regcred's part: noticing the source change and writing the pull Secret.
//! A Pod created before the Secret changes would fail its first pull and wait for the
//! kubelet's back-off (10 s, then doubling): that is the kubelet's figure, not regcred's. The
//! two kinds of sample alternate, which one goes first flipping each time, and every Pod
//! pulls (`imagePullPolicy: Always`). Medians of the samples, and their ratio.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::{
    ByteString,
    api::core::v1::{Event, Namespace, Pod, Secret, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use regcred::crd::RegistryCredential;
use regcred_testenv::{ControlPlane, Node, Process, Registry, docker_config_json};
use serde_json::json;

const NAMESPACE: &str = "bench-pull";
const USER: &str = "puller";
const POLL: Duration = Duration::from_millis(10);
const TIMEOUT: Duration = Duration::from_secs(60);

/// Times of one sample, from the change.
struct Sample {
    /// Until the pull Secret held the new password (zero for the hand-written one).
    secret: Duration,
    pulled: Duration,
    ran: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let samples: usize = std::env::args().skip_while(|a| a != "--samples").nth(1).map_or(Ok(20), |n| n.parse())?;
    if let Some(why) = Node::cannot_run() {
        anyhow::bail!("this bench needs a node, and this machine cannot run one: {why}");
    }
    let cp = ControlPlane::start()?;
    cp.install_crds(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds"))?;
    let node = Node::start(&cp)?;
    let client = cp.client().await;
    let mut password = "bench-pull-0".to_string();
    let registry = Registry::start(&[(USER, &password)])?;
    let image = registry.push_program_image("bench/app", "v1", USER, &password, &["hello", "bench"])?;
    let _controller = spawn(&cp)?;

    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::all(client.clone()).create(&PostParams::default(), &namespace).await?;
    let secrets = Api::<Secret>::namespaced(client.clone(), NAMESPACE);
    secrets.create(&PostParams::default(), &opaque("src", &password)).await?;
    secrets.create(&PostParams::default(), &pull_secret("manual", &registry.host(), &password)).await?;
    let credential: RegistryCredential = serde_json::from_value(json!({
        "apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
        "metadata": {"name": "bench"},
        "spec": {"registry": registry.host(),
                 "source": {"basic": {"username": USER, "passwordSecretRef": {"name": "src"}}}},
    }))?;
    Api::<RegistryCredential>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &credential)
        .await?;
    wait_holding(&secrets, "bench", &password).await?;
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE);
    let started = Instant::now();
    while accounts.get_opt("default").await?.is_none() {
        anyhow::ensure!(started.elapsed() < TIMEOUT, "no default ServiceAccount");
        tokio::time::sleep(POLL).await;
    }
    // A first Pod of each kind, not counted: the image's layer reaches the node once.
    for secret in ["bench", "manual"] {
        let name = format!("warm-{secret}");
        create_pod(&client, &name, &image, secret, node.name()).await?;
        wait_pulled(&client, &name, Instant::now()).await?;
    }

    let (mut regcred, mut manual) = (Vec::new(), Vec::new());
    for i in 1..=samples {
        password = format!("bench-pull-{i}-{}", std::process::id());
        registry.set_users(&[(USER, &password)])?;
        let regcred_first = i % 2 == 1;
        for kind in if regcred_first { ["regcred", "manual"] } else { ["manual", "regcred"] } {
            let pod = format!("{kind}-{i}");
            let started = Instant::now();
            let secret = if kind == "regcred" {
                let patch = json!({"data": {"password": ByteString(password.as_bytes().to_vec())}});
                secrets.patch("src", &PatchParams::default(), &Patch::Merge(&patch)).await?;
                wait_holding(&secrets, "bench", &password).await?;
                started.elapsed()
            } else {
                let config = docker_config_json(&registry.host(), USER, &password);
                let patch = json!({"data": {".dockerconfigjson": ByteString(config)}});
                secrets.patch("manual", &PatchParams::default(), &Patch::Merge(&patch)).await?;
                Duration::ZERO
            };
            create_pod(&client, &pod, &image, if kind == "regcred" { "bench" } else { "manual" }, node.name()).await?;
            let pulled = wait_pulled(&client, &pod, started).await?;
            let ran = wait_ran(&client, &pod, started).await?;
            let sample = Sample { secret, pulled, ran };
            if kind == "regcred" {
                regcred.push(sample)
            } else {
                manual.push(sample)
            }
            Api::<Pod>::namespaced(client.clone(), NAMESPACE)
                .delete(&pod, &DeleteParams::default().grace_period(0))
                .await?;
        }
    }

    let median = |samples: &[Sample], f: fn(&Sample) -> Duration| {
        let mut v: Vec<Duration> = samples.iter().map(f).collect();
        v.sort();
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (r_pulled, r_min, r_max) = median(&regcred, |s| s.pulled);
    let (m_pulled, m_min, m_max) = median(&manual, |s| s.pulled);
    let (r_secret, _, _) = median(&regcred, |s| s.secret);
    let (r_ran, _, _) = median(&regcred, |s| s.ran);
    let (m_ran, _, _) = median(&manual, |s| s.ran);
    println!(
        "node: {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")?.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "source change → Pod pulled with the new credential, median of {samples}: regcred {:.0} ms \
         (min {:.0}, max {:.0}); hand-written Secret {:.0} ms (min {:.0}, max {:.0}); ratio {:.2}×",
        ms(r_pulled),
        ms(r_min),
        ms(r_max),
        ms(m_pulled),
        ms(m_min),
        ms(m_max),
        r_pulled.as_secs_f64() / m_pulled.as_secs_f64()
    );
    println!("  of which until regcred's pull Secret held the new password: median {:.0} ms", ms(r_secret));
    println!(
        "  until the container had run (Succeeded): regcred {:.0} ms, hand-written {:.0} ms (medians)",
        ms(r_ran),
        ms(m_ran)
    );
    Ok(())
}

fn spawn(cp: &ControlPlane) -> anyhow::Result<Process> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_regcred"));
    cmd.args(["run", "--admin-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", cp.controller_kubeconfig_path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info");
    Process::spawn("regcred", cmd, &cp.dir().join("regcred-pull-bench.log"))
}

fn opaque(name: &str, password: &str) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some([("password".to_string(), ByteString(password.as_bytes().to_vec()))].into()),
        ..Default::default()
    }
}

fn pull_secret(name: &str, host: &str, password: &str) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some([(".dockerconfigjson".to_string(), ByteString(docker_config_json(host, USER, password)))].into()),
        ..Default::default()
    }
}

/// Polls until regcred's pull Secret `name` holds `password`.
async fn wait_holding(secrets: &Api<Secret>, name: &str, password: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let config = secrets
            .get_opt(name)
            .await?
            .and_then(|s| s.data)
            .and_then(|d| d.get(".dockerconfigjson").map(|b| b.0.clone()))
            .unwrap_or_default();
        let logins = regcred::dockerconfig::parse(&config).unwrap_or_default();
        if logins.iter().any(|l| secrecy::ExposeSecret::expose_secret(&l.password) == password) {
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < TIMEOUT, "Secret {name} never held the new password");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn create_pod(client: &Client, name: &str, image: &str, secret: &str, node: &str) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "hostNetwork": true, "restartPolicy": "Never",
                 "automountServiceAccountToken": false, "terminationGracePeriodSeconds": 0,
                 "imagePullSecrets": [{"name": secret}],
                 "containers": [{"name": "app", "image": image, "imagePullPolicy": "Always"}]},
    }))?;
    Api::<Pod>::namespaced(client.clone(), NAMESPACE).create(&PostParams::default(), &pod).await?;
    Ok(())
}

/// Polls until the kubelet's `Pulled` Event for the Pod exists; the time since `started`.
/// A `Failed` pull ends the bench: every sample must pull at the first try.
async fn wait_pulled(client: &Client, pod: &str, started: Instant) -> anyhow::Result<Duration> {
    let events = Api::<Event>::namespaced(client.clone(), NAMESPACE);
    let selector = ListParams::default().fields(&format!("involvedObject.name={pod}"));
    loop {
        let list = events.list(&selector).await?;
        if list.items.iter().any(|e| e.reason.as_deref() == Some("Pulled")) {
            return Ok(started.elapsed());
        }
        if let Some(failed) = list.items.iter().find(|e| e.reason.as_deref() == Some("Failed")) {
            anyhow::bail!("Pod {pod}: {}", failed.message.as_deref().unwrap_or_default());
        }
        anyhow::ensure!(started.elapsed() < TIMEOUT, "Pod {pod} did not pull in {TIMEOUT:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// Polls until the Pod's container has run (phase Succeeded); the time since `started`.
async fn wait_ran(client: &Client, pod: &str, started: Instant) -> anyhow::Result<Duration> {
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    loop {
        let phase = pods.get(pod).await?.status.and_then(|s| s.phase);
        if phase.as_deref() == Some("Succeeded") {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(started.elapsed() < TIMEOUT, "Pod {pod} did not run in {TIMEOUT:?} ({phase:?})");
        tokio::time::sleep(POLL).await;
    }
}
