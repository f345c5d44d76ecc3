//! The chart's alerting rules and Grafana dashboard (`charts/regcred/files/`) against a real
//! Prometheus (built from its Go module) scraping a real controller: a credential's broken
//! source makes its alert go pending under the shipped rules and fire under the same rules
//! rendered by the chart with short `for` durations, and fixing the source resolves both; every
//! dashboard panel's query returns series. The shipped `for` durations (10 minutes and more) are
//! proven by `promtool test rules` (tests/prometheus/alerts.test.yaml), not here.

use std::{path::PathBuf, process::Command, time::Duration};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::DeleteParams};
use regcred_testenv::{Prometheus, Registry, eventually, testbin};
use serde_json::{Value, json};

use crate::{support::*, verify::wait_verified};

/// How long a test waits for Prometheus to see a change: a scrape and an evaluation each
/// second, and the controller's reconcile and registry check before them.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped rule file, as promtool tests it and the chart embeds it.
fn shipped_rules() -> PathBuf {
    repo().join("charts/regcred/files/alerts.yaml")
}

/// The rule groups of the chart's PrometheusRule, rendered by helm with `for` set to 1s for
/// `alerts`, as rule file `name` under the target's temporary directory (JSON, which
/// Prometheus reads as YAML).
fn rendered_rules(name: &str, alerts: &[&str]) -> PathBuf {
    let mut cmd = Command::new(testbin("helm").unwrap());
    cmd.current_dir(repo())
        .args(["template", "regcred", "charts/regcred", "--namespace", CONTROLLER_NAMESPACE])
        .args(["--show-only", "templates/prometheusrule.yaml", "--set", "prometheusRule.enabled=true"]);
    for alert in alerts {
        cmd.args(["--set", &format!("prometheusRule.for.{alert}=1s")]);
    }
    let out = cmd.output().expect("running helm");
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let rule: Value = serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).expect("a PrometheusRule");
    assert_eq!(rule["kind"], "PrometheusRule");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, serde_json::to_string_pretty(&rule["spec"]).unwrap()).unwrap();
    path
}

/// A Prometheus that loads `rule_files` and scrapes the controller's admin port every second,
/// as the chart's ServiceMonitor would: `honor_labels` and the target labels the Prometheus
/// Operator gives a pod (its namespace, pod, service, container, endpoint).
fn start_prometheus(controller: &TestController, rule_files: &[PathBuf]) -> Prometheus {
    let config = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": rule_files,
        "scrape_configs": [{
            "job_name": "regcred-metrics",
            "honor_labels": true,
            "static_configs": [{
                "targets": [format!("127.0.0.1:{}", controller.admin_port)],
                "labels": {"namespace": CONTROLLER_NAMESPACE, "pod": "regcred-test", "service": "regcred-metrics",
                           "container": "regcred", "endpoint": "admin"},
            }],
        }],
    });
    Prometheus::start(&serde_json::to_string_pretty(&config).unwrap()).expect("starting prometheus")
}

/// The alerts of rule `alert` in the groups loaded from `file` whose labels name credential
/// `namespace`/`name`.
fn alerts_of(groups: &[Value], file: &std::path::Path, alert: &str, namespace: &str, name: &str) -> Vec<Value> {
    groups
        .iter()
        .filter(|g| g["file"].as_str() == file.to_str())
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["name"] == alert)
        .flat_map(|r| r["alerts"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["labels"]["namespace"] == namespace && a["labels"]["name"] == name)
        .collect()
}

/// Waits until Prometheus shows alert `alert` of credential `namespace`/`name` in `state`
/// (`pending`, `firing`) under the rules of `file`, or with `state` None, no such alert at
/// all; returns the alert.
async fn wait_alert(
    prometheus: &Prometheus,
    file: &std::path::Path,
    alert: &str,
    (namespace, name): (&str, &str),
    state: Option<&str>,
) -> Value {
    let what = format!("{alert} of {namespace}/{name} {} in {}", state.unwrap_or("gone"), file.display());
    eventually(&what, PROMETHEUS_WAIT, || async {
        let groups = prometheus.rule_groups().ok()?;
        let alerts = alerts_of(&groups, file, alert, namespace, name);
        match state {
            Some(state) => alerts.into_iter().find(|a| a["state"] == state),
            None => alerts.is_empty().then_some(Value::Null),
        }
    })
    .await
}

/// Waits until Prometheus has scraped a sample of `expr` (an instant query) with a value.
async fn wait_series(prometheus: &Prometheus, expr: &str) -> Vec<Value> {
    eventually(&format!("series of {expr}"), PROMETHEUS_WAIT, || async {
        let data = prometheus.query(expr).ok()?;
        data["result"].as_array().filter(|r| !r.is_empty()).cloned()
    })
    .await
}

fn basic(registry: &str, secret: &str, verify: bool) -> Value {
    let mut spec = json!({"registry": registry,
                          "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": secret}}}});
    if verify {
        spec["verify"] = json!({"insecure": true});
    }
    spec
}

#[tokio::test]
async fn alerts_go_pending_and_fire_when_a_source_breaks_and_resolve_when_it_is_fixed() {
    let label = format!("alerts-{}", &unique()[..6]);
    let controller = spawn_labelled(&label, &[], &[]);
    let client = client().await;
    let ns = namespace(&client, "alerts").await;
    let password = secret_value("puller", "alerts");
    let registry = Registry::start(&[("puller", &password)]).unwrap();
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    create_secret(&client, &ns, "checked-src", &[("password", password.as_bytes())]).await;
    create_credential_for(&client, &ns, "pull", Some(&label), basic(&registry.host(), "src", false)).await;
    create_credential_for(&client, &ns, "checked", Some(&label), basic(&registry.host(), "checked-src", true)).await;
    wait_ready(&client, &ns, "pull", "True", None).await;
    wait_verified(&client, &ns, "checked", "True", "Verified").await;

    let shipped = shipped_rules();
    let short =
        rendered_rules(&format!("{label}-rules.json"), &["RegcredCredentialNotReady", "RegcredVerificationFailing"]);
    let prometheus = start_prometheus(&controller, &[shipped.clone(), short.clone()]);
    // The credentials' own namespace reached Prometheus as `namespace` (honor_labels).
    wait_series(&prometheus, &format!(r#"regcred_credential_ready{{namespace="{ns}",name="pull"}} == 1"#)).await;
    wait_series(&prometheus, &format!(r#"regcred_credential_verified{{namespace="{ns}",name="checked"}} == 1"#)).await;
    let groups = prometheus.rule_groups().unwrap();
    for file in [&shipped, &short] {
        for (alert, name) in [("RegcredCredentialNotReady", "pull"), ("RegcredVerificationFailing", "checked")] {
            assert_eq!(alerts_of(&groups, file, alert, &ns, name), Vec::<Value>::new(), "{alert} while healthy");
        }
    }

    // The source Secret goes: Ready=False.
    Api::<Secret>::namespaced(client.clone(), &ns).delete("src", &DeleteParams::default()).await.unwrap();
    wait_ready(&client, &ns, "pull", "False", Some("SourceSecretNotFound")).await;
    let pending = wait_alert(&prometheus, &shipped, "RegcredCredentialNotReady", (&ns, "pull"), Some("pending")).await;
    let firing = wait_alert(&prometheus, &short, "RegcredCredentialNotReady", (&ns, "pull"), Some("firing")).await;
    for alert in [&pending, &firing] {
        let description = alert["annotations"]["description"].as_str().unwrap_or_default();
        assert!(
            description.starts_with(&format!("RegistryCredential {ns}/pull is not Ready (SourceSecretNotFound): "))
                && description.contains(&format!("First run: kubectl describe registrycredential pull -n {ns} ")),
            "{description}"
        );
        assert_eq!(alert["labels"]["kind"], "RegistryCredential");
        assert_eq!(alert["labels"]["severity"], "warning");
    }
    // Fixed: the Secret is back, Ready=True, and the alert goes under both rule files.
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    wait_ready(&client, &ns, "pull", "True", None).await;
    wait_alert(&prometheus, &shipped, "RegcredCredentialNotReady", (&ns, "pull"), None).await;
    wait_alert(&prometheus, &short, "RegcredCredentialNotReady", (&ns, "pull"), None).await;

    // A wrong password in the source: the registry check fails (the Secret is still written).
    let wrong = secret_value("puller", "alerts-wrong");
    set_secret_key(&client, &ns, "checked-src", "password", wrong.as_bytes()).await;
    wait_verified(&client, &ns, "checked", "False", "Unauthorized").await;
    let pending =
        wait_alert(&prometheus, &shipped, "RegcredVerificationFailing", (&ns, "checked"), Some("pending")).await;
    let firing = wait_alert(&prometheus, &short, "RegcredVerificationFailing", (&ns, "checked"), Some("firing")).await;
    for alert in [&pending, &firing] {
        let description = alert["annotations"]["description"].as_str().unwrap_or_default();
        assert!(
            description.starts_with(&format!(
                "The last registry check of RegistryCredential {ns}/checked failed (Unauthorized): "
            )) && description.contains(&format!("kubectl describe registrycredential checked -n {ns} ")),
            "{description}"
        );
    }
    set_secret_key(&client, &ns, "checked-src", "password", password.as_bytes()).await;
    wait_verified(&client, &ns, "checked", "True", "Verified").await;
    wait_alert(&prometheus, &shipped, "RegcredVerificationFailing", (&ns, "checked"), None).await;
    wait_alert(&prometheus, &short, "RegcredVerificationFailing", (&ns, "checked"), None).await;

    // The controller led throughout: the leader rule, evaluated on the same scrape, is quiet.
    let groups = prometheus.rule_groups().unwrap();
    let leader = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["name"] == "RegcredNoLeader")
        .collect::<Vec<_>>();
    assert_eq!(leader.len(), 2, "one per rule file");
    assert!(leader.iter().all(|r| r["state"] == "inactive" && r["health"] == "ok"), "{leader:?}");
    std::fs::remove_file(short).unwrap();
}

/// Every target's `expr` in the dashboard's panels (rows' nested panels too).
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default().to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_string()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

#[tokio::test]
async fn every_dashboard_query_returns_series() {
    let label = format!("dashboard-{}", &unique()[..6]);
    let controller = spawn_labelled(&label, &[], &[]);
    let client = client().await;
    let ns = namespace(&client, "dashboard").await;
    let password = secret_value("puller", "dashboard");
    let registry = Registry::start(&[("puller", &password)]).unwrap();
    let wrong = secret_value("puller", "dashboard-wrong");
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    create_secret(&client, &ns, "wrong-src", &[("password", wrong.as_bytes())]).await;
    // Ready and verified; Ready but refused by the registry; not Ready (no source Secret).
    create_credential_for(&client, &ns, "good", Some(&label), basic(&registry.host(), "src", true)).await;
    create_credential_for(&client, &ns, "refused", Some(&label), basic(&registry.host(), "wrong-src", true)).await;
    create_credential_for(&client, &ns, "missing", Some(&label), basic(&registry.host(), "absent", false)).await;
    // ECR: a token that expires (and a provider call); a key AWS does not know (failed calls,
    // Degraded).
    create_aws_keys(&client, &env().aws, &ns, "aws-keys", "dashboard").await;
    let unknown_key = format!("AKIA{}", &unique()[..16].to_uppercase());
    let unknown_secret = secret_value("aws", "dashboard-unknown");
    create_secret(
        &client,
        &ns,
        "unknown-keys",
        &[("accessKeyId", unknown_key.as_bytes()), ("secretAccessKey", unknown_secret.as_bytes())],
    )
    .await;
    let ecr = |secret: &str| json!({"source": {"ecr": {"registry": "123456789012.dkr.ecr.eu-west-1.amazonaws.com", "auth": {"secretRef": {"name": secret}}}}});
    create_credential_for(&client, &ns, "ecr", Some(&label), ecr("aws-keys")).await;
    create_credential_for(&client, &ns, "ecr-unknown", Some(&label), ecr("unknown-keys")).await;
    wait_verified(&client, &ns, "good", "True", "Verified").await;
    wait_verified(&client, &ns, "refused", "False", "Unauthorized").await;
    wait_ready(&client, &ns, "missing", "False", Some("SourceSecretNotFound")).await;
    wait_ready(&client, &ns, "ecr", "True", None).await;
    wait_ready(&client, &ns, "ecr-unknown", "False", Some("AwsRequestFailed")).await;

    let prometheus = start_prometheus(&controller, &[shipped_rules()]);
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("charts/regcred/files/dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    let queries = panel_queries(&dashboard);
    assert!(queries.len() >= 10, "{queries:?}");
    for (panel, expr) in &queries {
        // Grafana's variables, as it would fill them in.
        let expr = expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$__interval", "1s");
        assert!(!expr.contains('$'), "panel {panel:?}: a variable the test does not fill in: {expr}");
        let result = wait_series(&prometheus, &expr).await;
        assert!(!result.is_empty(), "panel {panel:?}: {expr}");
    }
    // The table of failing credentials names each failing one with its reason.
    let failing = queries.iter().find(|(panel, _)| panel == "Failing credentials").expect("the table").1.clone();
    let rows = wait_series(&prometheus, &failing).await;
    let mut named: Vec<_> = rows
        .iter()
        .filter(|r| r["metric"]["namespace"] == ns.as_str())
        .map(|r| {
            let m = &r["metric"];
            format!("{} {}={} {}", m["name"], m["condition"], m["status"], m["reason"]).replace('"', "")
        })
        .collect();
    named.sort();
    assert_eq!(
        named,
        [
            "ecr-unknown Degraded=True AwsRequestFailed",
            "ecr-unknown Ready=False AwsRequestFailed",
            "missing Ready=False SourceSecretNotFound",
            "refused Verified=False Unauthorized",
        ],
        "{rows:?}"
    );
}
