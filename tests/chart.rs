//! The Helm chart (`charts/regcred`) and the plain manifests rendered from it (`deploy/`):
//! lint, drift, admission by a real apiserver, and the least privilege of its RBAC.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use regcred_testenv::{ControlPlane, testbin};

const NAMESPACE: &str = "regcred-system";
const SERVICE_ACCOUNT: &str = "system:serviceaccount:regcred-system:regcred";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn stdout_of(mut cmd: Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{stderr}");
    assert!(!stderr.contains("PodSecurity"), "{cmd:?} warned:\n{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn helm(args: &[&str]) -> String {
    let mut cmd = Command::new(testbin("helm").unwrap());
    cmd.args(args).current_dir(root());
    stdout_of(cmd)
}

/// `helm template` of the chart in the deploy namespace, with extra arguments.
fn render(extra: &[&str]) -> String {
    render_as("regcred", extra)
}

/// `render` under another release name: other object names (`<release>-regcred`) and another
/// ServiceAccount, so that its RBAC can be applied beside the default release's.
fn render_as(release: &str, extra: &[&str]) -> String {
    let mut args = vec!["template", release, "charts/regcred", "--namespace", NAMESPACE];
    args.extend(extra);
    helm(&args)
}

/// Writes `text` to a new file under the target's temporary directory.
fn temp_file(name: &str, text: &str) -> PathBuf {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chart-{}-{n}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.kubectl(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl {}:\n{stderr}", args.join(" "));
    assert!(!stderr.contains("PodSecurity"), "kubectl {}:\n{stderr}", args.join(" "));
    String::from_utf8(out.stdout).unwrap()
}

fn kubectl_apply(cp: &ControlPlane, manifests: &str, extra: &[&str]) -> String {
    let file = temp_file("apply.yaml", manifests);
    let mut args = vec!["apply", "--server-side", "--field-manager=chart-test", "-f", file.to_str().unwrap()];
    args.extend(extra);
    let out = kubectl(cp, &args);
    std::fs::remove_file(file).unwrap();
    out
}

/// The shared control plane with the CRDs installed and the Namespace of
/// `deploy/regcred.yaml` (with its Pod Security label) created for real.
fn cluster() -> &'static ControlPlane {
    static READY: OnceLock<()> = OnceLock::new();
    let cp = ControlPlane::shared();
    READY.get_or_init(|| {
        cp.install_crds(&root().join("crds")).unwrap();
        let deploy = std::fs::read_to_string(root().join("deploy/regcred.yaml")).unwrap();
        let namespace = deploy.split("\n---\n").next().unwrap();
        assert!(namespace.contains("kind: Namespace"), "deploy/regcred.yaml starts with {namespace}");
        kubectl_apply(cp, namespace, &[]);
    });
    cp
}

#[test]
fn chart_lints() {
    helm(&["lint", "--strict", "charts/regcred"]);
    helm(&["lint", "--strict", "charts/regcred", "--set", "replicaCount=1,serviceMonitor.enabled=true"]);
    helm(&["lint", "--strict", "charts/regcred", "--set", MONITORING]);
    helm(&["lint", "--strict", "charts/regcred", "--set", WEBHOOK]);
    helm(&["lint", "--strict", "charts/regcred", "--set", CERT_MANAGER]);
}

/// The Pod admission webhook with self-managed certificates, and with cert-manager's.
const WEBHOOK: &str = "webhook.enabled=true";
const CERT_MANAGER: &str = "webhook.enabled=true,webhook.certManager.enabled=true";

/// The values that turn on everything for Prometheus and Grafana.
const MONITORING: &str = "serviceMonitor.enabled=true,prometheusRule.enabled=true,dashboard.enabled=true";

/// The text of a file of the repository.
fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `helm template` that must fail: its stderr.
fn render_fails(extra: &[&str]) -> String {
    let mut cmd = Command::new(testbin("helm").unwrap());
    cmd.args(["template", "regcred", "charts/regcred", "--namespace", NAMESPACE]).args(extra).current_dir(root());
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} rendered");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The alerts of a PrometheusRule: (name, `for`, labels).
fn alerts(rule: &serde_json::Value) -> Vec<(String, String, serde_json::Value)> {
    let groups = rule["spec"]["groups"].as_array().cloned().unwrap_or_default();
    groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (r["alert"].as_str().unwrap().to_string(), r["for"].as_str().unwrap().to_string(), r["labels"].clone())
        })
        .collect()
}

/// Issue 24 §2, §3: the PrometheusRule and the dashboard ConfigMap ship `files/alerts.yaml` and
/// `files/dashboard.json` as they are, the very files promtool (scripts/test.sh) and the live
/// Prometheus (`integration` `alerts::`) test; `prometheusRule`'s values change `for`, add
/// labels and leave alerts out, and promtool accepts what the chart renders then; a name that
/// is no alert fails the install; the ConfigMap carries the Grafana sidecar's label and passes
/// a server-side dry-run (the PrometheusRule's CRD is not installed in the test apiserver).
#[test]
fn monitoring_ships_the_tested_rules_and_dashboard() {
    let defaults = render(&[]);
    assert!(!defaults.contains("kind: PrometheusRule") && !defaults.contains("grafana_dashboard"));

    let docs = documents(&render(&["--set", MONITORING]));
    let file: serde_json::Value = serde_saphyr::from_str(&read("charts/regcred/files/alerts.yaml")).unwrap();
    let rules = of_kind(&docs, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["spec"], file, "the PrometheusRule is not files/alerts.yaml");
    let names: Vec<_> = alerts(rules[0]).into_iter().map(|(name, ..)| name).collect();
    assert_eq!(
        names,
        [
            "RegcredCredentialNotReady",
            "RegcredNamespacesNotSynced",
            "RegcredVerificationFailing",
            "RegcredTokenExpiringSoon",
            "RegcredNoLeader",
            "RegcredReconcileFailures",
            "RegcredProviderCallsFailing"
        ]
    );
    let monitor = of_kind(&docs, "ServiceMonitor");
    assert_eq!(monitor[0]["spec"]["endpoints"][0]["honorLabels"], true, "the rules read a credential's own namespace");
    let dashboards: Vec<_> =
        of_kind(&docs, "ConfigMap").into_iter().filter(|c| c["metadata"]["name"] == "regcred-dashboard").collect();
    assert_eq!(dashboards.len(), 1);
    assert_eq!(dashboards[0]["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(dashboards[0]["metadata"]["namespace"], NAMESPACE);
    let shipped: serde_json::Value =
        serde_json::from_str(dashboards[0]["data"]["regcred.json"].as_str().unwrap()).unwrap();
    let json: serde_json::Value = serde_json::from_str(&read("charts/regcred/files/dashboard.json")).unwrap();
    assert_eq!(shipped, json, "the ConfigMap is not files/dashboard.json");
    kubectl_apply(
        cluster(),
        &render(&["--show-only=templates/dashboard.yaml", "--set", "dashboard.enabled=true"]),
        &["--dry-run=server"],
    );

    let tuned = documents(&render(&[
        "--set",
        "prometheusRule.enabled=true,prometheusRule.labels.release=kube-prometheus-stack",
        "--set",
        "prometheusRule.for.RegcredNoLeader=1m,prometheusRule.additionalRuleLabels.team=platform",
        "--set-json",
        r#"prometheusRule.disabled=["RegcredVerificationFailing"]"#,
    ]));
    let rule = of_kind(&tuned, "PrometheusRule")[0];
    assert_eq!(rule["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let tuned_alerts = alerts(rule);
    assert_eq!(tuned_alerts.len(), names.len() - 1, "{tuned_alerts:?}");
    assert!(tuned_alerts.iter().all(|(name, ..)| name != "RegcredVerificationFailing"));
    for (name, for_, labels) in &tuned_alerts {
        assert_eq!(labels["team"], "platform", "{name}");
        assert!(labels["severity"].is_string(), "{name}: its own labels stay");
        let shipped_for = alerts(rules[0]).into_iter().find(|(n, ..)| n == name).unwrap().1;
        assert_eq!(*for_, if name == "RegcredNoLeader" { "1m".to_string() } else { shipped_for }, "{name}");
    }
    let rendered = temp_file("rules.json", &rule["spec"].to_string());
    let mut promtool = Command::new(testbin("promtool").unwrap());
    promtool.args(["check", "rules"]).arg(&rendered);
    let out = stdout_of(promtool);
    assert!(out.contains(&format!("SUCCESS: {} rules found", names.len() - 1)), "{out}");
    std::fs::remove_file(rendered).unwrap();

    let error = render_fails(&["--set", "prometheusRule.enabled=true,prometheusRule.for.RegcredNoSuchAlert=5m"]);
    assert!(error.contains("prometheusRule: no alert RegcredNoSuchAlert"), "{error}");
    let error = render_fails(&["--set", "prometheusRule.enabled=true,prometheusRule.for.RegcredNoLeader=soon"]);
    assert!(error.contains("at '/prometheusRule/for/RegcredNoLeader': 'soon' does not match pattern"), "{error}");
}

#[test]
fn chart_crds_are_the_repo_crds() {
    let list = |dir: &str| {
        let mut files: Vec<_> = std::fs::read_dir(root().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        files
    };
    let files = list("crds");
    assert!(!files.is_empty());
    assert_eq!(list("charts/regcred/crds"), files, "charts/regcred/crds/ holds other files than crds/");
    for file in files {
        let repo = std::fs::read(root().join("crds").join(&file)).unwrap();
        let chart = std::fs::read(root().join("charts/regcred/crds").join(&file)).unwrap();
        assert!(repo == chart, "charts/regcred/crds/{file} differs from crds/{file}; copy it over");
    }
}

#[test]
fn deploy_manifests_are_up_to_date() {
    let fresh = temp_file("deploy.yaml", "");
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("scripts/render-deploy.sh")).arg(&fresh).env("HELM", testbin("helm").unwrap());
    stdout_of(cmd);
    let fresh_text = std::fs::read_to_string(&fresh).unwrap();
    std::fs::remove_file(fresh).unwrap();
    let committed = std::fs::read_to_string(root().join("deploy/regcred.yaml")).unwrap();
    assert!(committed == fresh_text, "deploy/regcred.yaml is stale: run scripts/render-deploy.sh");
    // The plain manifests are the chart's defaults: what the task asks of them holds there.
    for wanted in ["--leader-elect", "replicas: 2", "kind: PodDisruptionBudget", "kind: CustomResourceDefinition"] {
        assert!(committed.contains(wanted), "deploy/regcred.yaml lacks {wanted}");
    }
    assert!(!committed.contains("kind: ServiceMonitor"));
}

#[test]
fn manifests_pass_server_side_dry_run() {
    let cp = cluster();
    let deploy = std::fs::read_to_string(root().join("deploy/regcred.yaml")).unwrap();
    let out = kubectl_apply(cp, &deploy, &["--dry-run=server", "-o=name"]);
    for object in
        ["deployment.apps/regcred", "clusterrole.rbac.authorization.k8s.io/regcred", "service/regcred-metrics"]
    {
        assert!(out.lines().any(|l| l == object), "{object} missing from:\n{out}");
    }
    // The optional branches: one replica (no PDB), an AWS endpoint, ambient identity, IRSA.
    let custom = render(&[
        "--set",
        "replicaCount=1,aws.allowAmbientIdentity=true,aws.endpointUrl=https://aws.example:4566,logFormat=text",
        "--set",
        "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::123456789012:role/regcred",
    ]);
    assert!(
        custom.contains("- --allow-ambient-aws-identity")
            && custom.contains("- --aws-endpoint-url=https://aws.example:4566")
    );
    assert!(!custom.contains("kind: PodDisruptionBudget"));
    kubectl_apply(cp, &custom, &["--dry-run=server"]);
}

#[test]
fn rbac_is_least_privilege() {
    let cp = cluster();
    let rbac = render(&[
        "--show-only=templates/serviceaccount.yaml",
        "--show-only=templates/clusterrole.yaml",
        "--show-only=templates/clusterrolebinding.yaml",
        "--show-only=templates/role.yaml",
    ]);
    kubectl_apply(cp, &rbac, &[]);
    let can = |args: &[&str]| can(cp, SERVICE_ACCOUNT, args);
    let allowed: &[&[&str]] = &[
        &["list", "secrets", "--all-namespaces"],
        &["watch", "secrets", "--all-namespaces"],
        &["create", "secrets", "-n", "team-a"],
        &["create", "serviceaccounts", "--subresource=token", "-n", "team-a"],
        &["patch", "registrycredentials.regcred.dev", "--subresource=status", "-n", "team-a"],
        &["update", "registrycredentials.regcred.dev", "--subresource=finalizers", "-n", "team-a"],
        &["create", "events.events.k8s.io", "-n", "team-a"],
        &["get", "configmaps", "-n", "team-a"],
        &["update", "leases.coordination.k8s.io/regcred-leader", "-n", NAMESPACE],
    ];
    let denied: &[&[&str]] = &[
        &["delete", "registrycredentials.regcred.dev", "-n", "team-a"],
        &["update", "registrycredentials.regcred.dev", "-n", "team-a"],
        &["create", "pods", "-n", "team-a"],
        &["list", "configmaps", "-n", "team-a"],
        &["watch", "configmaps", "-n", "team-a"],
        &["update", "secrets", "-n", "team-a"],
        &["delete", "serviceaccounts", "-n", "team-a"],
        &["get", "serviceaccounts", "--subresource=token", "-n", "team-a"],
        &["update", "registrycredentials.regcred.dev", "--subresource=status", "-n", "team-a"],
        &["create", "leases.coordination.k8s.io", "-n", "team-a"],
        &["delete", "leases.coordination.k8s.io", "-n", NAMESPACE],
    ];
    for args in allowed {
        assert!(can(args), "{SERVICE_ACCOUNT} should be allowed: {}", args.join(" "));
    }
    for args in denied {
        assert!(!can(args), "{SERVICE_ACCOUNT} should be denied: {}", args.join(" "));
    }
}

/// `kubectl auth can-i` as `user`: whether RBAC allows `args`.
fn can(cp: &ControlPlane, user: &str, args: &[&str]) -> bool {
    let mut all = vec!["auth", "can-i", "--as", user];
    all.extend(args);
    let out = cp.kubectl(&all);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl {}: {answer} {}",
        all.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

/// The rendered documents of a `render`, as JSON values.
fn documents(rendered: &str) -> Vec<serde_json::Value> {
    serde_saphyr::from_multiple::<serde_json::Value>(rendered)
        .expect("the rendering is YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The controller's own ClusterRole (not the aggregated tenant roles).
fn controller_role(docs: &[serde_json::Value]) -> &serde_json::Value {
    docs.iter().find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "regcred").expect("the ClusterRole")
}

/// The resources a Role or ClusterRole grants anything on.
fn resources(role: &serde_json::Value) -> Vec<String> {
    let rules = role["rules"].as_array().cloned().unwrap_or_default();
    rules
        .iter()
        .flat_map(|r| r["resources"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r.as_str().map(String::from))
        .collect()
}

/// `irsa.enabled=false` drops every token permission and the policy and tells the controller;
/// `watchNamespaces` moves the Secret, ServiceAccount and token rules into a Role per
/// namespace; the default ships the TokenRequest policy. Each rendering is admitted by the
/// real apiserver.
#[test]
fn least_privilege_variants_render_as_documented() {
    let cp = cluster();
    let defaults = documents(&render(&[]));
    let cluster_role = controller_role(&defaults);
    assert!(resources(cluster_role).contains(&"serviceaccounts/token".to_string()));
    let policy = of_kind(&defaults, "ValidatingAdmissionPolicy");
    assert_eq!(policy.len(), 1, "the default install ships the TokenRequest policy");
    let policy_text = policy[0].to_string();
    assert!(
        policy_text.contains(r#"[\"sts.amazonaws.com\"]"#) && policy_text.contains(SERVICE_ACCOUNT),
        "{policy_text}"
    );
    assert_eq!(of_kind(&defaults, "ValidatingAdmissionPolicyBinding").len(), 1);

    let no_irsa = render(&["--set", "irsa.enabled=false"]);
    assert!(!no_irsa.contains("serviceaccounts/token") && !no_irsa.contains("kind: ValidatingAdmissionPolicy"));
    assert!(no_irsa.contains("- --disable-irsa"));
    kubectl_apply(cp, &no_irsa, &["--dry-run=server"]);

    let audiences =
        render(&["--set", "irsa.audiences={sts.amazonaws.com,example.com/pull},irsa.maxExpirationSeconds=1200"]);
    assert!(audiences.contains(r#"a in ["sts.amazonaws.com","example.com/pull"]"#) && audiences.contains("<= 1200"));
    kubectl_apply(cp, &audiences, &["--dry-run=server"]);

    // Workload Identity Federation: pool providers' audiences, narrowed to given projects.
    let pools = render(&["--set-json", r#"gcp.workloadIdentity.projectNumbers=["123","456"]"#]);
    assert!(pools.contains("workloadIdentityPools/[a-z0-9-]+/providers/") && pools.contains("/projects/(123|456)/"));
    kubectl_apply(cp, &pools, &["--dry-run=server"]);
    let no_pools = render(&["--set", "gcp.workloadIdentity.enabled=false"]);
    assert!(no_pools.contains("kind: ValidatingAdmissionPolicy") && !no_pools.contains("workloadIdentityPools"));
    let google = render(&[
        "--set",
        "gcp.allowAmbientIdentity=true",
        "--set-json",
        r#"gcp.tokenUris=["https://t.example/token"]"#,
    ]);
    assert!(
        google.contains("- --allow-ambient-gcp-identity")
            && google.contains("- --gcp-token-uri=https://t.example/token")
    );

    // Azure workload identity: api://AzureADTokenExchange only while it is enabled (the default).
    assert!(policy_text.contains("a == 'api://AzureADTokenExchange'"), "{policy_text}");
    let no_azure = render(&["--set", "azure.workloadIdentity.enabled=false"]);
    assert!(
        no_azure.contains("kind: ValidatingAdmissionPolicy") && !no_azure.contains("a == 'api://AzureADTokenExchange'")
    );
    kubectl_apply(cp, &no_azure, &["--dry-run=server"]);
    let azure = render(&[
        "--set",
        "azure.allowAmbientIdentity=true",
        "--set-json",
        r#"azure.authorityHosts=["https://login.example"]"#,
        "--set-json",
        r#"azure.registrySuffixes=[".azurecr.example"]"#,
    ]);
    assert!(
        azure.contains("- --allow-ambient-azure-identity")
            && azure.contains("- --azure-authority-host=https://login.example")
            && azure.contains("- --acr-registry-suffixes=.azurecr.example"),
        "{azure}"
    );

    let scoped = documents(&render(&["--set", "watchNamespaces={default,kube-public}"]));
    let cluster_wide = resources(controller_role(&scoped));
    for resource in ["secrets", "serviceaccounts", "serviceaccounts/token"] {
        assert!(!cluster_wide.contains(&resource.to_string()), "the ClusterRole still grants {resource}");
    }
    let roles: Vec<_> =
        of_kind(&scoped, "Role").into_iter().filter(|r| resources(r).contains(&"secrets".into())).collect();
    let mut namespaces: Vec<_> =
        roles.iter().map(|r| r["metadata"]["namespace"].as_str().unwrap_or_default()).collect();
    namespaces.sort();
    assert_eq!(namespaces, ["default", "kube-public"]);
    assert!(roles.iter().all(|r| resources(r).contains(&"serviceaccounts/token".to_string())));
    let bindings = of_kind(&scoped, "RoleBinding");
    assert_eq!(bindings.len(), 3, "one per namespace and the leader Lease's");
    let args = of_kind(&scoped, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--namespaces=default,kube-public"), "{args}");
    kubectl_apply(cp, &render(&["--set", "watchNamespaces={default,kube-public}"]), &["--dry-run=server"]);

    let old_cluster = render(&["--set", "irsa.admissionPolicy=false"]);
    assert!(!old_cluster.contains("kind: ValidatingAdmissionPolicy") && old_cluster.contains("serviceaccounts/token"));
}

#[test]
fn verify_values_become_flags() {
    let defaults = render(&[]);
    assert!(defaults.contains("- --verify-interval=6h") && defaults.contains("- --verify-qps=5"));
    assert!(!defaults.contains("--verify-default"));
    // `--set` would pass 0.5 as a string (helm parses only integers): the schema wants a number.
    let set = render(&["--set-json", r#"verify={"default":true,"interval":"30m","qps":0.5}"#]);
    for flag in ["- --verify-default", "- --verify-interval=30m", "- --verify-qps=0.5"] {
        assert!(set.contains(flag), "{flag} missing");
    }
}

/// The Deployment's controller container.
fn container(docs: &[serde_json::Value]) -> &serde_json::Value {
    &of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
}

/// The one object of a kind with a name.
fn named<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    let found: Vec<_> = of_kind(docs, kind).into_iter().filter(|d| d["metadata"]["name"] == name).collect();
    assert_eq!(found.len(), 1, "{kind} {name}: {found:?}");
    found[0]
}

/// The cert-manager CRDs of tests/fixtures/cert-manager/ (a subset of cert-manager's schemas),
/// installed once in the shared control plane.
fn cert_manager_crds(cp: &ControlPlane) {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| cp.install_crds(&root().join("tests/fixtures/cert-manager")).unwrap());
}

/// Issue 23: `webhook.enabled` renders a Service in front of every replica and a
/// MutatingWebhookConfiguration for Pod CREATE with the safe settings (Ignore, 2 s, IfNeeded,
/// no side effects, v1 reviews, kube-system, the release namespace and opted-out namespaces
/// and Pods excluded) and no caBundle (the controller injects it), and passes the webhook's
/// flags; with `webhook.certManager.enabled` a Certificate for the Service's names (and the
/// CA bootstrap, or the issuer named) and cert-manager's CA injection instead. Each rendering
/// passes a server-side dry-run, cert-manager's kinds against the fixture CRDs.
#[test]
fn webhook_renders_safe_and_passes_dry_run() {
    let cp = cluster();
    let defaults = render(&[]);
    for absent in ["MutatingWebhookConfiguration", "--webhook", "--attach", "cert-manager.io", "regcred-webhook"] {
        assert!(!defaults.contains(absent), "the default rendering has {absent}");
    }

    let rendered = render(&["--set", WEBHOOK]);
    let docs = documents(&rendered);
    let configurations = of_kind(&docs, "MutatingWebhookConfiguration");
    assert_eq!(configurations.len(), 1);
    let configuration = configurations[0];
    assert_eq!(configuration["metadata"]["name"], "regcred");
    assert!(configuration["metadata"]["annotations"].is_null(), "{configuration}");
    let webhooks = configuration["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 1);
    let webhook = &webhooks[0];
    assert_eq!(webhook["name"], "pods.regcred.dev");
    assert_eq!(webhook["failurePolicy"], "Ignore");
    assert_eq!(webhook["timeoutSeconds"], 2);
    assert_eq!(webhook["reinvocationPolicy"], "IfNeeded");
    assert_eq!(webhook["sideEffects"], "None");
    assert_eq!(webhook["admissionReviewVersions"], serde_json::json!(["v1"]));
    assert_eq!(webhook["matchPolicy"], "Equivalent");
    assert_eq!(
        webhook["rules"],
        serde_json::json!([{
            "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"],
            "scope": "Namespaced"
        }])
    );
    // The whole clientConfig: the Service, and no caBundle for Helm to own.
    assert_eq!(
        webhook["clientConfig"],
        serde_json::json!({"service": {
            "name": "regcred-webhook", "namespace": NAMESPACE, "path": "/mutate-pods", "port": 443
        }})
    );
    let opted_out = serde_json::json!({"key": "regcred.dev/inject", "operator": "NotIn", "values": ["false"]});
    assert_eq!(
        webhook["namespaceSelector"],
        serde_json::json!({"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", NAMESPACE]},
            opted_out
        ]})
    );
    assert_eq!(webhook["objectSelector"], serde_json::json!({"matchExpressions": [opted_out]}));

    let service = named(&docs, "Service", "regcred-webhook");
    assert_eq!(
        service["spec"]["ports"],
        serde_json::json!([{"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}])
    );
    let deployment = of_kind(&docs, "Deployment")[0];
    assert_eq!(
        service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"],
        "every replica serves the webhook"
    );
    let controller = container(&docs);
    let args: Vec<_> = controller["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    for flag in [
        "--webhook-addr=0.0.0.0:9443",
        "--webhook-configuration=regcred",
        "--webhook-secret=regcred-webhook-tls",
        "--webhook-certificates=self",
        "--webhook-hosts=regcred-webhook.regcred-system.svc,regcred-webhook.regcred-system.svc.cluster.local",
    ] {
        assert!(args.contains(&flag), "{flag} missing from {args:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--attach")), "attach is empty: the controller's default");
    assert!(
        controller["ports"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"name": "webhook", "containerPort": 9443, "protocol": "TCP"})),
        "{}",
        controller["ports"]
    );
    assert_eq!(controller["readinessProbe"]["httpGet"], serde_json::json!({"path": "/readyz", "port": "admin"}));
    kubectl_apply(cp, &rendered, &["--dry-run=server"]);

    // Extra excluded namespaces, a timeout, another port, the global attach default; with
    // watchNamespaces the webhook sees only those namespaces.
    let tuned = documents(&render(&[
        "--set",
        "webhook.enabled=true,webhook.timeoutSeconds=5,webhook.port=10443,attach=both",
        "--set-json",
        r#"webhook.excludeNamespaces=["monitoring","kube-system"]"#,
        "--set-json",
        r#"watchNamespaces=["team-a","monitoring"]"#,
    ]));
    let webhook = &of_kind(&tuned, "MutatingWebhookConfiguration")[0]["webhooks"][0];
    assert_eq!(webhook["timeoutSeconds"], 5);
    assert_eq!(
        webhook["namespaceSelector"]["matchExpressions"],
        serde_json::json!([
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "monitoring"]},
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
             "values": ["kube-system", NAMESPACE, "monitoring"]},
            opted_out
        ])
    );
    let args = container(&tuned)["args"].to_string();
    assert!(args.contains("--webhook-addr=0.0.0.0:10443") && args.contains(r#""--attach=both""#), "{args}");
    assert_eq!(container(&tuned)["ports"][1]["containerPort"], 10443);
    let attach = render(&["--set", "webhook.enabled=true,attach=pods"]);
    assert!(attach.contains("- --attach=pods"));
    assert!(render(&["--set", "attach=service-accounts"]).contains("- --attach=service-accounts"));
    let error = render_fails(&["--set", "attach=pods"]);
    assert!(error.contains("attach: pods attaches Secrets to Pods through the admission webhook"), "{error}");
    let error = render_fails(&["--set", "attach=all"]);
    assert!(error.contains("at '/attach': value must be one of"), "{error}");
    for timeout in ["0", "31"] {
        let error = render_fails(&["--set", &format!("webhook.enabled=true,webhook.timeoutSeconds={timeout}")]);
        assert!(error.contains("at '/webhook/timeoutSeconds'"), "{error}");
    }
    let error = render_fails(&["--set", "webhook.enabled=true,webhook.port=8080"]);
    assert!(error.contains("at '/webhook/port'"), "{error}");

    // cert-manager: a Certificate for the Service's names writes the Secret the controller
    // serves from, and cainjector fills the caBundle from it.
    cert_manager_crds(cp);
    let rendered = render(&["--set", CERT_MANAGER]);
    let docs = documents(&rendered);
    let configuration = of_kind(&docs, "MutatingWebhookConfiguration")[0];
    assert_eq!(
        configuration["metadata"]["annotations"],
        serde_json::json!({"cert-manager.io/inject-ca-from": "regcred-system/regcred-webhook"})
    );
    assert!(configuration["webhooks"][0]["clientConfig"]["caBundle"].is_null());
    assert_eq!(configuration["webhooks"][0]["failurePolicy"], "Ignore");
    let certificate = named(&docs, "Certificate", "regcred-webhook");
    assert_eq!(certificate["metadata"]["namespace"], NAMESPACE);
    assert_eq!(certificate["spec"]["secretName"], "regcred-webhook-tls");
    assert_eq!(
        certificate["spec"]["dnsNames"],
        serde_json::json!(["regcred-webhook.regcred-system.svc", "regcred-webhook.regcred-system.svc.cluster.local"])
    );
    assert_eq!(
        certificate["spec"]["issuerRef"],
        serde_json::json!({"name": "regcred-webhook-ca", "kind": "Issuer", "group": "cert-manager.io"})
    );
    // The bootstrap: self-signed Issuer → CA Certificate → CA Issuer.
    let ca = named(&docs, "Certificate", "regcred-webhook-ca");
    assert_eq!(ca["spec"]["isCA"], true);
    assert_eq!(ca["spec"]["issuerRef"]["name"], "regcred-webhook-selfsigned");
    assert_eq!(named(&docs, "Issuer", "regcred-webhook-selfsigned")["spec"], serde_json::json!({"selfSigned": {}}));
    assert_eq!(
        named(&docs, "Issuer", "regcred-webhook-ca")["spec"],
        serde_json::json!({"ca": {"secretName": ca["spec"]["secretName"]}})
    );
    let args = container(&docs)["args"].to_string();
    assert!(
        args.contains("--webhook-certificates=external") && args.contains("--webhook-secret=regcred-webhook-tls"),
        "{args}"
    );
    kubectl_apply(cp, &rendered, &["--dry-run=server"]);

    // An issuer of the user's: no bootstrap.
    let rendered = render(&[
        "--set",
        CERT_MANAGER,
        "--set",
        "webhook.certManager.issuerRef.name=corp-ca,webhook.certManager.issuerRef.kind=ClusterIssuer",
    ]);
    let docs = documents(&rendered);
    assert!(of_kind(&docs, "Issuer").is_empty());
    assert_eq!(of_kind(&docs, "Certificate").len(), 1);
    assert_eq!(
        named(&docs, "Certificate", "regcred-webhook")["spec"]["issuerRef"],
        serde_json::json!({"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
    );
    kubectl_apply(cp, &rendered, &["--dry-run=server"]);
    let error = render_fails(&["--set", CERT_MANAGER, "--set", "webhook.certManager.issuerRef.kind=ClusterIssuer"]);
    assert!(error.contains("at '/webhook/certManager/issuerRef'"), "{error}");

    // The fixture CRDs are not a blank check: a Certificate without its Secret is refused.
    let file = temp_file(
        "certificate.yaml",
        "apiVersion: cert-manager.io/v1\nkind: Certificate\nmetadata:\n  name: no-secret\n  namespace: regcred-system\n\
         spec:\n  dnsNames: [a.example]\n  issuerRef:\n    name: x\n",
    );
    let out = cp.kubectl(&["apply", "--server-side", "--dry-run=server", "-f", file.to_str().unwrap()]);
    std::fs::remove_file(file).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("spec.secretName: Required value"), "{stderr}");
}

/// The rules of the one Role (or ClusterRole) of that name.
fn rules(docs: &[serde_json::Value], kind: &str, name: &str) -> serde_json::Value {
    named(docs, kind, name)["rules"].clone()
}

/// Issue 23: the webhook's RBAC is limited by name. Self-managed certificates: its TLS Secret
/// in the release namespace (read, watch, update, patch; create, which RBAC cannot limit) and
/// its own MutatingWebhookConfiguration (read, watch, patch); cert-manager: reading the Secret
/// only. Checked as rendered and with `kubectl auth can-i` against applied RBAC of releases
/// named apart (namespace-scoped, so the cluster-wide Secret rule does not hide the Role's).
#[test]
fn webhook_rbac_is_least_privilege() {
    let docs = documents(&render(&["--set", WEBHOOK]));
    assert_eq!(
        rules(&docs, "Role", "regcred-webhook"),
        serde_json::json!([
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["regcred-webhook-tls"],
             "verbs": ["get", "list", "watch", "update", "patch"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}
        ])
    );
    let configurations: Vec<_> = controller_role(&docs)["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["resources"].to_string().contains("webhookconfigurations"))
        .cloned()
        .collect();
    assert_eq!(
        configurations,
        [serde_json::json!({
            "apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": ["regcred"], "verbs": ["get", "list", "watch", "patch"]
        })]
    );
    let binding = named(&docs, "RoleBinding", "regcred-webhook");
    assert_eq!(binding["roleRef"]["name"], "regcred-webhook");
    assert_eq!(binding["subjects"][0]["name"], "regcred");

    let docs = documents(&render(&["--set", CERT_MANAGER]));
    assert_eq!(
        rules(&docs, "Role", "regcred-webhook"),
        serde_json::json!([
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["regcred-webhook-tls"],
             "verbs": ["get", "list", "watch"]}
        ])
    );
    assert!(!controller_role(&docs).to_string().contains("webhookconfigurations"));

    let cp = cluster();
    let rbac_of = |release: &str, values: &str| {
        let rbac = render_as(
            release,
            &[
                "--set",
                values,
                "--show-only=templates/serviceaccount.yaml",
                "--show-only=templates/clusterrole.yaml",
                "--show-only=templates/clusterrolebinding.yaml",
                "--show-only=templates/role.yaml",
            ],
        );
        kubectl_apply(cp, &rbac, &[]);
        format!("system:serviceaccount:{NAMESPACE}:{release}-regcred")
    };
    let check = |user: &str, allowed: &[&[&str]], denied: &[&[&str]]| {
        for args in allowed {
            assert!(can(cp, user, args), "{user} should be allowed: {}", args.join(" "));
        }
        for args in denied {
            assert!(!can(cp, user, args), "{user} should be denied: {}", args.join(" "));
        }
    };
    let mwc = "mutatingwebhookconfigurations.admissionregistration.k8s.io";

    let user = rbac_of("hook", &format!("{WEBHOOK},watchNamespaces={{team-a}}"));
    let tls = "secrets/hook-regcred-webhook-tls";
    let own = format!("{mwc}/hook-regcred");
    let other = format!("{mwc}/regcred");
    check(
        &user,
        &[
            &["get", tls, "-n", NAMESPACE],
            &["list", tls, "-n", NAMESPACE],
            &["watch", tls, "-n", NAMESPACE],
            &["update", tls, "-n", NAMESPACE],
            &["patch", tls, "-n", NAMESPACE],
            &["create", "secrets", "-n", NAMESPACE],
            &["get", &own],
            &["list", &own],
            &["watch", &own],
            &["patch", &own],
        ],
        &[
            &["delete", tls, "-n", NAMESPACE],
            &["get", "secrets/other", "-n", NAMESPACE],
            &["list", "secrets", "-n", NAMESPACE],
            &["update", "secrets/other", "-n", NAMESPACE],
            &["patch", "secrets/other", "-n", NAMESPACE],
            &["update", tls, "-n", "team-a"],
            &["create", "secrets", "-n", "team-b"],
            &["update", &own],
            &["delete", &own],
            &["create", mwc],
            &["list", mwc],
            &["patch", &other],
            &["get", &other],
            &["patch", "validatingwebhookconfigurations.admissionregistration.k8s.io/hook-regcred"],
        ],
    );

    // Cluster-wide: the ClusterRole's Secret rule has no update, so the Role's stays the only one.
    let user = rbac_of("wide", WEBHOOK);
    let tls = "secrets/wide-regcred-webhook-tls";
    check(
        &user,
        &[&["update", tls, "-n", NAMESPACE], &["patch", &format!("{mwc}/wide-regcred")]],
        &[&["update", "secrets/other", "-n", NAMESPACE], &["update", tls, "-n", "team-a"]],
    );

    let user = rbac_of("certs", &format!("{CERT_MANAGER},watchNamespaces={{team-a}}"));
    let tls = "secrets/certs-regcred-webhook-tls";
    check(
        &user,
        &[&["get", tls, "-n", NAMESPACE], &["list", tls, "-n", NAMESPACE], &["watch", tls, "-n", NAMESPACE]],
        &[
            &["update", tls, "-n", NAMESPACE],
            &["patch", tls, "-n", NAMESPACE],
            &["create", "secrets", "-n", NAMESPACE],
            &["get", "secrets/other", "-n", NAMESPACE],
            &["get", &format!("{mwc}/certs-regcred")],
            &["patch", &format!("{mwc}/certs-regcred")],
        ],
    );
}
