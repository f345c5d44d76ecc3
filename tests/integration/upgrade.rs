//! The upgrade README documents ("Upgrading"), from the release before the one-core change
//! (796ef1e, kept in `tests/upgrade/796ef1e/`): its plain manifests installed with
//! `kubectl apply --server-side`, or its chart with `helm install`; the objects it left
//! (Secrets without the uid label, ServiceAccount entries without uids, conditions stored
//! before they were a map list); then today's `deploy/regcred.yaml` applied the same way, or
//! today's CRDs applied and `helm upgrade` to today's chart, and today's controller taking
//! over.
//!
//! On a control plane of its own each: CustomResourceDefinitions are cluster-wide, and the
//! shared one serves today's.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret, ServiceAccount},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use regcred::crd::{ClusterRegistryCredential, RegistryCredential};
use regcred_testenv::{ControlPlane, eventually};
use serde_json::{Value, json};

use crate::support::*;

const OLD: &str = "tests/upgrade/796ef1e";
const UID_LABEL: &str = "regcred.dev/credential-uid";
const ADDED: &str = "regcred.dev/added-image-pull-secrets";
/// The pull Secrets of the fixture: (namespace, name, registry key, password).
const PULL_SECRETS: [(&str, &str, &str, &str); 3] = [
    ("upgrade-a", "dockerhub-pull", "https://index.docker.io/v1/", "example-dockerhub-token"),
    ("upgrade-b", "shared", "r.example.com", "example-shared-password"),
    ("upgrade-c", "shared", "r.example.com", "example-shared-password"),
];
/// The ServiceAccounts of the fixture and the entry regcred added to each.
const ACCOUNTS: [(&str, &str, &str); 3] = [
    ("upgrade-a", "builder", "dockerhub-pull"),
    ("upgrade-b", "default", "shared"),
    ("upgrade-c", "default", "shared"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.kubectl(args);
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn an_upgrade_from_796ef1e_writes_each_object_at_most_once_and_keeps_every_pull_secret() {
    let cp = ControlPlane::start().expect("starting a control plane of the test's own");
    let client = cp.client().await;

    // 1. The old release, installed as README said then: its plain manifests, server-side.
    let old_deploy = root().join(OLD).join("deploy.yaml");
    kubectl_ok(&cp, &["apply", "--server-side", "-f", old_deploy.to_str().unwrap()]);
    wait_established(&cp);
    assert_eq!(conditions_list_type(&cp), Value::Null, "the old CRDs' conditions are a plain list");
    create_old_objects(&client, &root().join(OLD).join("objects.yaml")).await;

    // 2. The upgrade, exactly as README's "Upgrading" has it for the plain manifests.
    let deploy = root().join("deploy/regcred.yaml");
    kubectl_ok(&cp, &["apply", "--server-side", "-f", deploy.to_str().unwrap()]);
    wait_established(&cp);
    assert_eq!(conditions_list_type(&cp), json!("map"), "today's CRDs were not applied");
    let kubeconfig =
        cp.service_account_kubeconfig(CONTROLLER_NAMESPACE, "regcred").expect("a token of the packaged ServiceAccount");

    let (uid, cluster_uid) = old_credentials_still_valid(&client).await;

    // 3. Watch every pull Secret and ServiceAccount through the takeover: none may be deleted,
    //    and every version must still give the Pods their login.
    let watches = Watches::start(&client).await;

    // 4. Today's controller takes over; 5. a restart after it writes nothing.
    take_over(&cp, &client, watches, (&uid, &cluster_uid), "upgrade-manifests", &|name| spawn(&cp, &kubeconfig, name))
        .await;
}

/// The chart's path from 796ef1e, as README's and CHANGELOG.md's "Upgrading" have it: that
/// commit's chart (kept in `tests/upgrade/796ef1e/chart/`) installed with `helm install` and
/// its values file (`values.yaml` there), the objects its controller wrote, then
/// `kubectl apply --server-side --force-conflicts -f crds/` (Helm never updates CRDs) and
/// `helm upgrade` to today's chart with the same values file, with a watch on every pull
/// Secret and ServiceAccount from before the first step.
///
/// Without a kubelet the Deployment's Pods do not run: today's controller runs as the
/// upgraded Deployment says (the arguments and environment `helm get manifest` shows, the
/// token of its ServiceAccount), the old one not at all (as in the test above).
#[tokio::test]
async fn a_helm_upgrade_from_796ef1e_writes_each_object_at_most_once_and_keeps_every_pull_secret() {
    let cp = ControlPlane::start().expect("starting a control plane of the test's own");
    let client = cp.client().await;
    let values = root().join(OLD).join("values.yaml");
    let values = values.to_str().unwrap();

    // 1. The old chart, installed as README said then (its crds/ go in with the first install).
    let old_chart = root().join(OLD).join("chart");
    let install = ["install", RELEASE, old_chart.to_str().unwrap(), "--namespace", CONTROLLER_NAMESPACE];
    helm_ok(&cp, &[&install[..], &["--create-namespace", "-f", values]].concat());
    wait_established(&cp);
    assert_eq!(conditions_list_type(&cp), Value::Null, "the old chart's CRDs' conditions are a plain list");
    let old = deployed(&cp);
    assert!(!old.args.iter().any(|a| a.starts_with("--gcp-refresh-share")), "not the old chart: {:?}", old.args);
    create_old_objects(&client, &root().join(OLD).join("objects.yaml")).await;
    let watches = Watches::start(&client).await;

    // 2. The upgrade, exactly as README's "Upgrading" has it for the chart. The CRDs first:
    //    Helm created them, so server-side apply stops at a conflict with field manager `helm`
    //    unless told to take the fields over (README: `--force-conflicts`, once).
    let crds = root().join("crds");
    let crds = crds.to_str().unwrap();
    let refused = cp.kubectl(&["apply", "--server-side", "-f", crds]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("conflict") && stderr.contains("\"helm\""), "{stderr}");
    kubectl_ok(&cp, &["apply", "--server-side", "--force-conflicts", "-f", crds]);
    wait_established(&cp);
    assert_eq!(conditions_list_type(&cp), json!("map"), "today's CRDs were not applied");
    helm_ok(&cp, &["upgrade", RELEASE, "charts/regcred", "--namespace", CONTROLLER_NAMESPACE, "-f", values]);
    let deployment = deployed(&cp);
    assert!(
        deployment.args.iter().any(|a| a == "--gcp-refresh-share=0.25"),
        "not today's chart: {:?}",
        deployment.args
    );
    assert_eq!(deployment.service_account, "regcred", "the audit log is read for another user");
    let (uid, cluster_uid) = old_credentials_still_valid(&client).await;

    // 3. Today's controller, as the upgraded Deployment runs it, takes over.
    let kubeconfig = cp
        .service_account_kubeconfig(CONTROLLER_NAMESPACE, &deployment.service_account)
        .expect("a token of the chart's ServiceAccount");
    take_over(&cp, &client, watches, (&uid, &cluster_uid), "upgrade-helm", &|name| {
        deployment.spawn(&cp, &kubeconfig, name)
    })
    .await;
}

const RELEASE: &str = "regcred";

fn helm_ok(cp: &ControlPlane, args: &[&str]) -> String {
    let out = Command::new(regcred_testenv::testbin("helm").expect("helm"))
        .args(args)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .current_dir(root())
        .output()
        .expect("running helm");
    assert!(out.status.success(), "helm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_established(cp: &ControlPlane) {
    let crds = ["crd/registrycredentials.regcred.dev", "crd/clusterregistrycredentials.regcred.dev"];
    kubectl_ok(cp, &[&["wait", "--for=condition=Established", "--timeout=60s"][..], &crds[..]].concat());
}

/// `x-kubernetes-list-type` of the stored RegistryCredential CRD's status conditions (null
/// before 4096e96, `map` since).
fn conditions_list_type(cp: &ControlPlane) -> Value {
    let crd: CustomResourceDefinition =
        serde_json::from_str(&kubectl_ok(cp, &["get", "-o", "json", "crd/registrycredentials.regcred.dev"])).unwrap();
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
    schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]["x-kubernetes-list-type"].clone()
}

/// Existing credentials are still valid: they read as today's types, and an update of each as
/// stored passes today's schema and validation rules (server-side dry run). Their uids.
async fn old_credentials_still_valid(client: &Client) -> (String, String) {
    let creds = Api::<RegistryCredential>::namespaced(client.clone(), "upgrade-a");
    let cred = creds.get("dockerhub").await.expect("the old RegistryCredential reads as today's type");
    let dry = PostParams { dry_run: true, ..Default::default() };
    creds.replace("dockerhub", &dry, &cred).await.expect("the old RegistryCredential passes today's validation");
    let clusters = Api::<ClusterRegistryCredential>::all(client.clone());
    let cluster = clusters.get("shared").await.expect("the old ClusterRegistryCredential reads as today's type");
    clusters.replace("shared", &dry, &cluster).await.expect("the old ClusterRegistryCredential passes validation");
    (cred.uid().unwrap(), cluster.uid().unwrap())
}

/// Watches of every Secret and ServiceAccount from now on (see [`watch`]).
struct Watches {
    seen: Arc<Mutex<Vec<String>>>,
    broken: Arc<Mutex<Vec<String>>>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Watches {
    async fn start(client: &Client) -> Watches {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let broken = Arc::new(Mutex::new(Vec::<String>::new()));
        let secrets = Api::<Secret>::all(client.clone());
        let secrets_from = secrets.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
        let accounts = Api::<ServiceAccount>::all(client.clone());
        let accounts_from = accounts.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
        let tasks = [
            tokio::spawn(watch(secrets, secrets_from, seen.clone(), broken.clone(), check_secret)),
            tokio::spawn(watch(accounts, accounts_from, seen.clone(), broken.clone(), check_account)),
        ];
        Watches { seen, broken, tasks }
    }
}

/// Whether every fixture object is migrated: each pull Secret labelled with its credential's
/// uid and still valid, each ServiceAccount entry with the uid, both credentials Ready for
/// their generation.
async fn migrated(client: Client, uid: String, cluster_uid: String) -> Option<()> {
    for (ns, name, _, _) in PULL_SECRETS {
        let secret = Api::<Secret>::namespaced(client.clone(), ns).get(name).await.ok()?;
        let owner = if ns == "upgrade-a" { &uid } else { &cluster_uid };
        (secret.labels().get(UID_LABEL) == Some(owner)).then_some(())?;
        check_secret(&secret).ok()?;
    }
    for (ns, name, entry) in ACCOUNTS {
        let account = Api::<ServiceAccount>::namespaced(client.clone(), ns).get(name).await.ok()?;
        let owner = if ns == "upgrade-a" { &uid } else { &cluster_uid };
        (account.annotations().get(ADDED) == Some(&format!("{entry}={owner}"))).then_some(())?;
    }
    let ready = |status: Option<&regcred::crd::CredentialStatus>, generation: Option<i64>| {
        status
            .and_then(|s| s.condition("Ready"))
            .is_some_and(|c| c.status == "True" && c.reason == "Synced" && c.observed_generation == generation)
    };
    let cr = Api::<RegistryCredential>::namespaced(client.clone(), "upgrade-a").get("dockerhub").await.ok()?;
    ready(cr.status.as_ref(), cr.metadata.generation).then_some(())?;
    let crc = Api::<ClusterRegistryCredential>::all(client.clone()).get("shared").await.ok()?;
    ready(crc.status.as_ref().map(|s| &s.credential), crc.metadata.generation).then_some(())?;
    Some(())
}

/// SIGTERM, as a rolling update sends, and its exit: a leader releases its Lease on the way
/// out, so the next one starts at once.
async fn stop(controller: &mut TestController) {
    controller.terminate();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while controller.check_alive().is_ok() {
        assert!(std::time::Instant::now() < deadline, "the controller did not exit {TIMEOUT:?} after SIGTERM");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Today's controller (started by `spawn` under a name) takes over the fixture: every object
/// migrated, no version `watches` saw would have failed a Pod, at most one write per object
/// and no delete; then a restart writes nothing (README: "After that, a restart makes no
/// writes while nothing changed").
async fn take_over(
    cp: &ControlPlane,
    client: &Client,
    watches: Watches,
    (uid, cluster_uid): (&str, &str),
    names: &str,
    spawn: &dyn Fn(&str) -> TestController,
) {
    let Watches { seen, broken, tasks } = watches;
    let start = cp.audit_log_len().unwrap();
    let mut controller = spawn(&format!("{names}-1"));
    eventually("today's controller migrated every object", TIMEOUT, || {
        migrated(client.clone(), uid.to_string(), cluster_uid.to_string())
    })
    .await;
    stop(&mut controller).await;
    let end = cp.audit_log_len().unwrap();

    // No version of a pull Secret or ServiceAccount the upgrade left would have failed a Pod.
    let lost = broken.lock().unwrap().clone();
    assert!(lost.is_empty(), "a Pod could have lost its pull Secret: {lost:#?}\nevents: {:#?}", seen.lock().unwrap());

    // At most one write per object (the migration), and no delete.
    let writes = writes_by_object(cp, start, end);
    eprintln!("upgrade: the takeover's writes: {writes:?}");
    let twice: Vec<_> = writes.iter().filter(|(_, verbs)| verbs.len() > 1).collect();
    assert!(twice.is_empty(), "objects written more than once by the takeover: {twice:?}\nall writes: {writes:#?}");
    assert!(!writes.values().flatten().any(|v| v.starts_with("delete")), "the takeover deleted: {writes:#?}");
    // The RegistryCredential's Secret lacked the uid label: its one write. The fan-out's
    // Secrets had it and their content is today's: none.
    assert!(writes.contains_key("secrets upgrade-a/dockerhub-pull"), "no migration write? {writes:#?}");

    let restart = cp.audit_log_len().unwrap();
    let controller = spawn(&format!("{names}-2"));
    let reconciled = regcred_testenv::wait_for("the restarted controller reconciled both credentials", TIMEOUT, || {
        let reconciles: f64 = controller
            .metrics()
            .lines()
            .filter(|l| l.starts_with("regcred_reconciles_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (reconciles >= 2.0).then_some(())
    });
    if let Err(error) = reconciled {
        let log = std::fs::read_to_string(controller_log_path(cp, &format!("{names}-2"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(80).collect::<Vec<_>>().into_iter().rev().collect();
        panic!("{error:#}\nmetrics:\n{}\nthe controller's log, last lines:\n{}", controller.metrics(), tail.join("\n"));
    }
    let after_restart = writes_by_object(cp, restart, cp.audit_log_len().unwrap());
    drop(controller);
    assert!(after_restart.is_empty(), "the restart after the migration wrote: {after_restart:#?}");

    for task in tasks {
        task.abort();
    }
    let broken = broken.lock().unwrap().clone();
    let seen = seen.lock().unwrap().clone();
    eprintln!("upgrade: watched through the upgrade: {seen:#?}");
    assert!(broken.is_empty(), "a Pod could have lost its pull Secret: {broken:#?}\nevents: {seen:#?}");
    assert!(
        seen.iter().any(|e| e.starts_with("MODIFIED Secret upgrade-a/dockerhub-pull")),
        "the watch never saw upgrade-a/dockerhub-pull migrated: {seen:#?}"
    );
}

/// Creates the fixture's objects as 796ef1e left them: credentials first (then their status,
/// applied as field manager regcred), then the rest with their uids filled in; Secrets with a
/// POST of regcred's own fields and an apply of the whole, both as regcred (secret::ensure_secret).
async fn create_old_objects(client: &Client, path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("objects.yaml");
    let regcred = PostParams { field_manager: Some("regcred".into()), ..Default::default() };
    let apply = PatchParams::apply("regcred").force();
    let mut uids = BTreeMap::new();
    let mut rest = Vec::new();
    for mut doc in docs.into_iter().filter(|d| !d.is_null()) {
        let kind = doc["kind"].as_str().unwrap().to_string();
        let status = doc.as_object_mut().unwrap().remove("status");
        match kind.as_str() {
            "Namespace" => {
                let ns: Namespace = serde_json::from_value(doc).unwrap();
                Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
            }
            "RegistryCredential" | "ClusterRegistryCredential" => {
                let name = doc["metadata"]["name"].as_str().unwrap().to_string();
                let (uid, generation) = if kind == "RegistryCredential" {
                    let api = Api::<RegistryCredential>::namespaced(client.clone(), "upgrade-a");
                    let cr = api.create(&PostParams::default(), &serde_json::from_value(doc.clone()).unwrap()).await;
                    let cr = cr.unwrap();
                    (cr.uid().unwrap(), cr.metadata.generation)
                } else {
                    let api = Api::<ClusterRegistryCredential>::all(client.clone());
                    let cr = api.create(&PostParams::default(), &serde_json::from_value(doc.clone()).unwrap()).await;
                    let cr = cr.unwrap();
                    (cr.uid().unwrap(), cr.metadata.generation)
                };
                assert_eq!(generation, Some(1));
                let patch = json!({"apiVersion": doc["apiVersion"], "kind": kind, "status": status.unwrap()});
                if kind == "RegistryCredential" {
                    let api = Api::<RegistryCredential>::namespaced(client.clone(), "upgrade-a");
                    api.patch_status(&name, &apply, &Patch::Apply(&patch)).await.unwrap();
                } else {
                    let api = Api::<ClusterRegistryCredential>::all(client.clone());
                    api.patch_status(&name, &apply, &Patch::Apply(&patch)).await.unwrap();
                }
                uids.insert(format!("{{{{uid:{kind}/{name}}}}}"), uid);
            }
            _ => rest.push(doc),
        }
    }
    for doc in rest {
        let mut text = serde_json::to_string(&doc).unwrap();
        for (placeholder, uid) in &uids {
            text = text.replace(placeholder, uid);
        }
        let mut doc: Value = serde_json::from_str(&text).unwrap();
        let ns = doc["metadata"]["namespace"].as_str().unwrap().to_string();
        match doc["kind"].as_str().unwrap() {
            "Secret" => {
                // stringData as the data a controller writes.
                if let Some(Value::Object(strings)) = doc.as_object_mut().unwrap().remove("stringData") {
                    let data: BTreeMap<String, ByteString> = strings
                        .into_iter()
                        .map(|(k, v)| (k, ByteString(v.as_str().unwrap().as_bytes().to_vec())))
                        .collect();
                    doc["data"] = serde_json::to_value(data).unwrap();
                }
                let secret: Secret = serde_json::from_value(doc).unwrap();
                let api = Api::<Secret>::namespaced(client.clone(), &ns);
                if secret.owner_references().is_empty() {
                    api.create(&PostParams::default(), &secret).await.unwrap();
                    continue;
                }
                let mut skeleton = secret.clone();
                skeleton.metadata.labels = Some(
                    secret
                        .labels()
                        .iter()
                        .filter(|(k, _)| k.contains("regcred"))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                );
                let created = api.create(&regcred, &skeleton).await.unwrap();
                let mut full = secret.clone();
                full.metadata.resource_version = created.metadata.resource_version;
                let mut full = serde_json::to_value(full).unwrap();
                full["apiVersion"] = json!("v1");
                full["kind"] = json!("Secret");
                api.patch(&secret.name_any(), &apply, &Patch::Apply(&full)).await.unwrap();
            }
            "ServiceAccount" => {
                let account: ServiceAccount = serde_json::from_value(doc).unwrap();
                let api = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
                // The namespace's `default` may already be there (kube-controller-manager makes
                // it): regcred added its entry with a merge patch.
                let patch = json!({"metadata": {"annotations": account.annotations()},
                                   "imagePullSecrets": account.image_pull_secrets});
                let merge = PatchParams { field_manager: Some("regcred".into()), ..Default::default() };
                if let Err(error) = api.create(&PostParams::default(), &account).await {
                    assert!(matches!(&error, kube::Error::Api(s) if s.code == 409), "{error}");
                    api.patch(&account.name_any(), &merge, &Patch::Merge(&patch)).await.unwrap();
                }
            }
            other => panic!("objects.yaml: unexpected kind {other}"),
        }
    }
}

/// Whether a version of a watched Secret still gives Pods their login (for the fixture's
/// pull Secrets; other Secrets pass).
fn check_secret(secret: &Secret) -> Result<(), String> {
    let (ns, name) = (secret.namespace().unwrap_or_default(), secret.name_any());
    let Some((_, _, server, password)) = PULL_SECRETS.iter().find(|(n, s, _, _)| *n == ns && *s == name) else {
        return Ok(());
    };
    if secret.type_.as_deref() != Some("kubernetes.io/dockerconfigjson") {
        return Err(format!("type {:?}", secret.type_));
    }
    let config = secret.data.as_ref().and_then(|d| d.get(".dockerconfigjson")).map(|b| b.0.clone()).unwrap_or_default();
    let logins = regcred::dockerconfig::parse(&config).map_err(|e| format!("unreadable .dockerconfigjson: {e}"))?;
    logins
        .iter()
        .any(|l| {
            l.server == *server
                && l.username == "example-user"
                && secrecy::ExposeSecret::expose_secret(&l.password) == *password
        })
        .then_some(())
        .ok_or_else(|| format!("no login for {server} with the source's password"))
}

/// Whether a version of a watched ServiceAccount still names its pull Secret.
fn check_account(account: &ServiceAccount) -> Result<(), String> {
    let (ns, name) = (account.namespace().unwrap_or_default(), account.name_any());
    let Some((_, _, entry)) = ACCOUNTS.iter().find(|(n, a, _)| *n == ns && *a == name) else {
        return Ok(());
    };
    let names: Vec<_> = account.image_pull_secrets.iter().flatten().map(|r| r.name.as_str()).collect();
    names.contains(entry).then_some(()).ok_or_else(|| format!("imagePullSecrets {names:?} lost {entry}"))
}

/// Records every event of `api` from `version` on in `seen`, and in `broken` each deletion of
/// a fixture object and each version `check` refuses.
async fn watch<K>(
    api: Api<K>,
    version: String,
    seen: Arc<Mutex<Vec<String>>>,
    broken: Arc<Mutex<Vec<String>>>,
    check: fn(&K) -> Result<(), String>,
) where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let stream = api.watch(&WatchParams::default(), &version).await.expect("watching");
    let mut stream = stream.boxed();
    while let Ok(Some(event)) = stream.try_next().await {
        let (what, object) = match event {
            WatchEvent::Added(o) => ("ADDED", o),
            WatchEvent::Modified(o) => ("MODIFIED", o),
            WatchEvent::Deleted(o) => ("DELETED", o),
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Error(e) => {
                broken.lock().unwrap().push(format!("watch error: {e:?}"));
                break;
            }
        };
        let line = format!(
            "{what} {} {}/{} rv {}",
            K::kind(&()),
            object.meta().namespace.clone().unwrap_or_default(),
            object.meta().name.clone().unwrap_or_default(),
            object.meta().resource_version.clone().unwrap_or_default()
        );
        let verdict = if what == "DELETED" {
            if is_fixture(&object) { Err("deleted".to_string()) } else { Ok(()) }
        } else {
            check(&object)
        };
        if let Err(why) = verdict {
            broken.lock().unwrap().push(format!("{line}: {why}"));
        }
        seen.lock().unwrap().push(line);
    }
}

fn is_fixture<K: Resource<DynamicType = ()>>(object: &K) -> bool {
    let (ns, name) =
        (object.meta().namespace.as_deref().unwrap_or_default(), object.meta().name.as_deref().unwrap_or_default());
    PULL_SECRETS.iter().any(|(n, s, _, _)| *n == ns && *s == name && K::kind(&()) == "Secret")
        || ACCOUNTS.iter().any(|(n, a, _)| *n == ns && *a == name && K::kind(&()) == "ServiceAccount")
}

/// Writes by the controller between two audit offsets: their verbs per object
/// (`resource[/subresource] namespace/name`; the objects of the upgrade, not Events or the
/// leader Lease).
fn writes_by_object(cp: &ControlPlane, from: u64, to: u64) -> BTreeMap<String, Vec<String>> {
    let text = cp.read_audit_log(from, Some(to)).unwrap();
    let mut writes = BTreeMap::<String, Vec<String>>::new();
    for event in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        let verb = event["verb"].as_str().unwrap_or_default();
        let object = &event["objectRef"];
        let resource = object["resource"].as_str().unwrap_or_default();
        if event["user"]["username"] != CONTROLLER_USER
            || !is_write(verb)
            || !["secrets", "serviceaccounts", "registrycredentials", "clusterregistrycredentials"].contains(&resource)
        {
            continue;
        }
        let sub = object["subresource"].as_str().map(|s| format!("/{s}")).unwrap_or_default();
        let key = format!(
            "{resource}{sub} {}/{}",
            object["namespace"].as_str().unwrap_or_default(),
            object["name"].as_str().unwrap_or_default()
        );
        writes.entry(key).or_default().push(verb.to_string());
    }
    writes
}

/// Today's controller on this control plane, as the packaged ServiceAccount.
fn spawn(cp: &ControlPlane, kubeconfig: &Path, name: &str) -> TestController {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcred"));
    cmd.args(["run", "--resync-interval", "10m", "--admin-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "debug,hyper=info,tower=info,rustls=info,aws_smithy_runtime=info,aws_config=info")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("HOME", cp.dir());
    TestController::spawn(name, cmd, &controller_log_path(cp, name))
}

/// The controller container of the release's Deployment, as `helm get manifest` shows it.
struct Deployed {
    args: Vec<String>,
    /// Environment variables with a value (the downward API's `POD_NAME` and `POD_NAMESPACE`
    /// are filled in by [`Deployed::spawn`]).
    env: Vec<(String, String)>,
    service_account: String,
}

fn deployed(cp: &ControlPlane) -> Deployed {
    let manifest = helm_ok(cp, &["get", "manifest", RELEASE, "--namespace", CONTROLLER_NAMESPACE]);
    let docs: Vec<Value> = serde_saphyr::from_multiple(&manifest).expect("the release's manifest is YAML");
    let deployment = docs.into_iter().find(|d| d["kind"] == "Deployment").expect("the release's Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let strings = |v: &Value| v.as_array().into_iter().flatten().filter_map(|a| a.as_str().map(String::from)).collect();
    let env = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
        .collect();
    assert!(container["command"].is_null(), "the image's entrypoint is regcred: {container}");
    Deployed {
        args: strings(&container["args"]),
        env,
        service_account: pod["serviceAccountName"].as_str().unwrap().into(),
    }
}

impl Deployed {
    /// Today's binary with the container's arguments and environment, as a Pod `name` of the
    /// release's namespace with the token of its ServiceAccount (`kubeconfig`); its admin
    /// endpoint on a free loopback port instead of 0.0.0.0:8080.
    fn spawn(&self, cp: &ControlPlane, kubeconfig: &Path, name: &str) -> TestController {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcred"));
        cmd.args(&self.args).args(["--admin-addr", "127.0.0.1:0"]).env_clear();
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", CONTROLLER_NAMESPACE)
            .env("KUBECONFIG", kubeconfig)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("HOME", cp.dir());
        TestController::spawn(name, cmd, &controller_log_path(cp, name))
    }
}
