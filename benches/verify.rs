//! Registry verification (issue 13), against the real local control plane and a real registry
//! (CNCF distribution, htpasswd), each figure next to a baseline from the same run. Not a
//! test: it prints a report.
//!
//!   cargo bench --bench verify                  # the controller at its default --verify-qps (5)
//!   cargo bench --bench verify -- --qps 1000     # without the rate limit's spacing
//!
//! 1. source change → `Verified` updated in status, median of 20 changes (the password flips
//!    between right and wrong, so each change flips the condition), against a baseline that
//!    does the same work with a plain client (median of 20): patch its source Secret, read it,
//!    write the pull Secret, run the same handshake with regcred's verifier, patch the
//!    credential's `Verified` condition with the result. Both clocks start before the source
//!    patch and stop when a GET of the credential shows the expected reason (polled every
//!    5 ms); the samples interleave, alternating which goes first, after 2 warm-up pairs. The
//!    handshake alone is reported too;
//! 2. registry requests per check (the registry's access log), for a Basic registry and for a
//!    token-auth registry with a repository to prove.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use regcred::{
    crd::RegistryCredential,
    dockerconfig::RegistryAuth,
    verify::{Options, Reason, Verifier, VerifySettings},
};
use regcred_testenv::{ControlPlane, Process, Registry, RegistryOptions};
use secrecy::ExposeSecret;
use serde_json::json;

const SAMPLES: usize = 20;
/// Pairs run first and not counted (an even number: each flips the password twice).
const WARM_UP: usize = 2;
const NAMESPACE: &str = "bench-verify";
const RIGHT: &str = "bench-right-password";
const WRONG: &str = "bench-wrong-password";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    cp.install_crds(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds"))?;
    let client = cp.client().await;
    let registry = Registry::start(&[("puller", RIGHT)])?;
    let token_registry =
        Registry::start_with(&[("team", RIGHT)], RegistryOptions { token_auth: true, ..Default::default() })?;
    token_registry.push_test_image("team/app", "latest", "team", RIGHT)?;
    let qps: Option<String> = std::env::args().skip_while(|a| a != "--qps").nth(1);
    let _controller = spawn(&cp, qps.as_deref())?;
    println!("controller --verify-qps {}", qps.as_deref().unwrap_or("5 (default)"));

    let namespace: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::all(client.clone()).create(&PostParams::default(), &namespace).await?;
    let secrets = Api::<Secret>::namespaced(client.clone(), NAMESPACE);
    secrets.create(&PostParams::default(), &source("src", RIGHT)).await?;
    let credentials = Api::<RegistryCredential>::namespaced(client.clone(), NAMESPACE);
    let credential: RegistryCredential = serde_json::from_value(json!({
        "apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
        "metadata": {"name": "bench"},
        "spec": {"registry": registry.host(), "verify": {"insecure": true},
                 "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": "src"}}}},
    }))?;
    credentials.create(&PostParams::default(), &credential).await?;
    // The baseline's credential and source: labelled `bench`, which the controller leaves alone.
    secrets.create(&PostParams::default(), &source("direct-src", RIGHT)).await?;
    let mut direct: RegistryCredential = serde_json::from_value(json!({
        "apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
        "metadata": {"name": "direct", "labels": {"bench": "direct"}},
        "spec": {"registry": registry.host(), "verify": {"insecure": true},
                 "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": "direct-src"}}}},
    }))?;
    direct = credentials.create(&PostParams::default(), &direct).await?;
    anyhow::ensure!(direct.metadata.generation.is_some(), "the baseline credential has no generation");
    wait_reason(&credentials, "bench", "Verified", Instant::now(), Duration::from_secs(60)).await?;

    // 1. Source change → Verified, against the same work done directly, interleaved.
    let verifier = Verifier::new(VerifySettings { qps: 1000.0, ..Default::default() });
    let options = Options { reference: "latest".into(), plain_http: true, ..Default::default() };
    let login = |host: String, user: &str, password: &str| RegistryAuth {
        server: host,
        username: user.into(),
        password: password.to_string().into(),
    };
    let baseline = Baseline { secrets: &secrets, credentials: &credentials, verifier: &verifier, options: &options };
    let (mut regcred, mut written, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    let (mut controller_requests, mut direct_requests) = (0, 0);
    for i in 0..WARM_UP + SAMPLES {
        let (password, expected) = if i % 2 == 0 { (WRONG, "Unauthorized") } else { (RIGHT, "Verified") };
        let counted = i >= WARM_UP;
        for first in [i % 4 < 2, i % 4 >= 2] {
            let offset = registry.log_offset()?;
            if first {
                let (to_write, to_verified) = controller_sample(&secrets, &credentials, password, expected).await?;
                if counted {
                    written.push(to_write);
                    regcred.push(to_verified);
                    controller_requests += registry.requests_since(offset)?.len();
                }
            } else {
                let took = baseline.sample(&registry.host(), password, expected).await?;
                if counted {
                    direct.push(took);
                    direct_requests += registry.requests_since(offset)?.len();
                }
            }
        }
    }
    let logins = [login(registry.host(), "puller", RIGHT)];
    let mut handshake = Vec::new();
    for _ in 0..SAMPLES {
        let started = Instant::now();
        let findings = verifier.check_each(&logins, &options).await.map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            findings.iter().all(|(_, f)| f.reason == Reason::Verified),
            "direct check failed: {findings:?}"
        );
        handshake.push(started.elapsed());
    }
    let (ctl, base) = (median_ms(&mut regcred), median_ms(&mut direct));
    println!(
        "source change → Verified updated, median of {SAMPLES}: regcred {ctl:.1} ms; the same work with a plain client {base:.1} ms; ratio {:.2}×",
        ctl / base
    );
    println!(
        "  min/max: regcred {:.1}/{:.1} ms, plain client {:.1}/{:.1} ms ({WARM_UP} warm-up pairs first, not counted)",
        ms(regcred[0]),
        ms(regcred[SAMPLES - 1]),
        ms(direct[0]),
        ms(direct[SAMPLES - 1])
    );
    println!("  of which until the pull Secret held the change: median {:.1} ms", median_ms(&mut written));
    println!("  the handshake alone (regcred's verifier, right password): median {:.1} ms", median_ms(&mut handshake));

    // 2. Requests per check.
    println!(
        "registry requests per check, Basic: {:.2} by the controller ({controller_requests} for {SAMPLES} changes), {:.2} direct",
        controller_requests as f64 / SAMPLES as f64,
        direct_requests as f64 / SAMPLES as f64
    );
    let token_options = Options { repository: Some("team/app".into()), ..options.clone() };
    let offset = token_registry.log_offset()?;
    let token_logins = [login(token_registry.host(), "team", RIGHT)];
    let findings = verifier.check_each(&token_logins, &token_options).await.map_err(anyhow::Error::msg)?;
    anyhow::ensure!(findings.iter().all(|(_, f)| f.reason == Reason::Verified), "token check failed: {findings:?}");
    let registry_requests = token_registry.requests_since(offset)?;
    println!(
        "registry requests per check, token auth with repository team/app: {} to the registry ({}), plus 1 to the token server",
        registry_requests.len(),
        registry_requests
            .iter()
            .map(|r| format!("{} {} {}", r.method, r.path, r.status))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn spawn(cp: &ControlPlane, qps: Option<&str>) -> anyhow::Result<Process> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_regcred"));
    // The baseline's credential carries the label `bench`; the controller leaves it alone.
    cmd.args(["run", "--selector", "!bench", "--admin-addr", "127.0.0.1:0", "--verify-private-networks"]);
    if let Some(qps) = qps {
        cmd.args(["--verify-qps", qps]);
    }
    cmd.env("KUBECONFIG", cp.controller_kubeconfig_path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info");
    Process::spawn("regcred", cmd, &cp.dir().join("regcred-verify-bench.log"))
}

fn source(name: &str, password: &str) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some([("password".to_string(), ByteString(password.as_bytes().to_vec()))].into()),
        ..Default::default()
    }
}

/// Both clocks' stop: polls (every 5 ms) until credential `name`'s Verified reason is `reason`;
/// the time since `started`.
async fn wait_reason(
    api: &Api<RegistryCredential>,
    name: &str,
    reason: &str,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    loop {
        let cr = api.get(name).await?;
        if cr.status.as_ref().and_then(|s| s.condition("Verified")).is_some_and(|c| c.reason == reason) {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(started.elapsed() < timeout, "{name}: Verified={reason} not reached in {timeout:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One regcred sample: the source change; (until the pull Secret held it, until Verified said
/// what the registry answered).
async fn controller_sample(
    secrets: &Api<Secret>,
    credentials: &Api<RegistryCredential>,
    password: &str,
    expected: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let started = Instant::now();
    let patch = json!({"data": {"password": ByteString(password.as_bytes().to_vec())}});
    secrets.patch("src", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    loop {
        let pull = secrets.get("bench").await?;
        let config =
            pull.data.as_ref().and_then(|d| d.get(".dockerconfigjson")).map(|b| b.0.clone()).unwrap_or_default();
        let logins = regcred::dockerconfig::parse(&config).unwrap_or_default();
        if logins.iter().any(|l| l.password.expose_secret() == password) {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "the pull Secret never changed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let written = started.elapsed();
    Ok((written, wait_reason(credentials, "bench", expected, started, Duration::from_secs(60)).await?))
}

/// The baseline: what the controller does for a source change, done with a plain client.
struct Baseline<'a> {
    secrets: &'a Api<Secret>,
    credentials: &'a Api<RegistryCredential>,
    verifier: &'a Verifier,
    options: &'a Options,
}

impl Baseline<'_> {
    async fn sample(&self, host: &str, password: &str, expected: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let patch = json!({"data": {"password": ByteString(password.as_bytes().to_vec())}});
        self.secrets.patch("direct-src", &PatchParams::default(), &Patch::Merge(&patch)).await?;
        let source = self.secrets.get("direct-src").await?;
        let read = source.data.and_then(|d| d.get("password").cloned()).map(|b| b.0).unwrap_or_default();
        let login = RegistryAuth {
            server: host.into(),
            username: "puller".into(),
            password: String::from_utf8_lossy(&read).into_owned().into(),
        };
        let rendered = regcred::dockerconfig::render(std::slice::from_ref(&login));
        let pull = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "direct"},
                          "type": "kubernetes.io/dockerconfigjson",
                          "data": {".dockerconfigjson": ByteString(rendered.expose_secret().to_vec())}});
        self.secrets.patch("direct", &PatchParams::apply("bench").force(), &Patch::Apply(&pull)).await?;
        let findings = self.verifier.check_each(&[login], self.options).await.map_err(anyhow::Error::msg)?;
        let reason = findings.first().map(|(_, f)| f.reason).ok_or_else(|| anyhow::anyhow!("no finding"))?;
        let verified = if reason == Reason::Verified { "True" } else { "False" };
        let status = json!({"apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
            "status": {"conditions": [{"type": "Verified", "status": verified, "reason": reason.as_str(),
                       "message": "direct", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        self.credentials.patch_status("direct", &PatchParams::apply("bench").force(), &Patch::Apply(&status)).await?;
        wait_reason(self.credentials, "direct", expected, started, Duration::from_secs(60)).await
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    ms(samples[samples.len() / 2])
}
