//! Registry verification (issue 13), against the real local control plane and a real registry
//! (CNCF distribution, htpasswd), each figure next to a baseline from the same run. Not a
//! test: it prints a report.
//!
//!   cargo bench --bench verify                  # the controller at its default --verify-qps (5)
//!   cargo bench --bench verify -- --qps 1000     # without the rate limit's spacing
//!
//! 1. source change → `Verified` updated in status, median of 20 changes (the password flips
//!    between right and wrong, so each change flips the condition), against the registry's
//!    own time for the same handshake made directly with regcred's verifier (median of 20);
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
use serde_json::json;

const SAMPLES: usize = 20;
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
    wait_reason(&credentials, "Verified", Duration::from_secs(60)).await?;

    // 1. Source change → Verified, against the handshake itself.
    let offset = registry.log_offset()?;
    let mut regcred = Vec::new();
    let mut written = Vec::new();
    for i in 0..SAMPLES {
        let (password, expected) = if i % 2 == 0 { (WRONG, "Unauthorized") } else { (RIGHT, "Verified") };
        let started = Instant::now();
        let patch = json!({"data": {"password": ByteString(password.as_bytes().to_vec())}});
        secrets.patch("src", &PatchParams::default(), &Patch::Merge(&patch)).await?;
        // When the pull Secret holds the new password (the write the check follows), then when
        // Verified says what the registry answered.
        loop {
            let pull = secrets.get("bench").await?;
            let config =
                pull.data.as_ref().and_then(|d| d.get(".dockerconfigjson")).map(|b| b.0.clone()).unwrap_or_default();
            let logins = regcred::dockerconfig::parse(&config).unwrap_or_default();
            if logins.iter().any(|l| secrecy::ExposeSecret::expose_secret(&l.password) == password) {
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "the pull Secret never changed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        written.push(started.elapsed());
        wait_reason(&credentials, expected, Duration::from_secs(60)).await?;
        regcred.push(started.elapsed());
    }
    let controller_requests = registry.requests_since(offset)?.len();
    let verifier = Verifier::new(VerifySettings { qps: 1000.0, ..Default::default() });
    let options = Options { reference: "latest".into(), plain_http: true, ..Default::default() };
    let login = |host: String, user: &str| RegistryAuth { server: host, username: user.into(), password: RIGHT.into() };
    let logins = [login(registry.host(), "puller")];
    let offset = registry.log_offset()?;
    let mut direct = Vec::new();
    for _ in 0..SAMPLES {
        let started = Instant::now();
        let findings = verifier.check_each(&logins, &options).await.map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            findings.iter().all(|(_, f)| f.reason == Reason::Verified),
            "direct check failed: {findings:?}"
        );
        direct.push(started.elapsed());
    }
    let direct_requests = registry.requests_since(offset)?.len();
    let (ctl, base) = (median_ms(&mut regcred), median_ms(&mut direct));
    println!(
        "source change → Verified updated, median of {SAMPLES}: regcred {ctl:.1} ms; the handshake alone {base:.1} ms; ratio {:.1}×",
        ctl / base
    );
    println!("  regcred min/max {:.1}/{:.1} ms", ms(regcred[0]), ms(regcred[SAMPLES - 1]));
    println!("  of which until the pull Secret held the change: median {:.1} ms", median_ms(&mut written));

    // 2. Requests per check.
    println!(
        "registry requests per check, Basic: {:.2} by the controller ({controller_requests} for {SAMPLES} changes), {:.2} direct",
        controller_requests as f64 / SAMPLES as f64,
        direct_requests as f64 / SAMPLES as f64
    );
    let token_options = Options { repository: Some("team/app".into()), ..options.clone() };
    let offset = token_registry.log_offset()?;
    let token_logins = [login(token_registry.host(), "team")];
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
    cmd.args(["run", "--admin-addr", "127.0.0.1:0", "--verify-private-networks"]);
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

/// Polls (every 5 ms) until the credential's Verified reason is `reason`.
async fn wait_reason(api: &Api<RegistryCredential>, reason: &str, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let cr = api.get("bench").await?;
        if cr.status.as_ref().and_then(|s| s.condition("Verified")).is_some_and(|c| c.reason == reason) {
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < timeout, "Verified={reason} not reached in {timeout:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    ms(samples[samples.len() / 2])
}
