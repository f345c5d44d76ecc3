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
    let mut args = vec!["template", "regcred", "charts/regcred", "--namespace", NAMESPACE];
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
}

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
    let can = |args: &[&str]| {
        let mut all = vec!["auth", "can-i", "--as", SERVICE_ACCOUNT];
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
    };
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
