//! The apiserver reads behind `regcred doctor`, with the user's own client: the Pod (or a
//! workload's Pod template), its ServiceAccount, the pull Secrets, the credentials and the
//! kubelet's Events. Only the subject itself must be readable; whatever else the user may not
//! read is recorded as such in the facts. Lists are read in pages of [`LIST_LIMIT`], every page.

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, StatefulSet},
    batch::v1::{CronJob, Job},
    core::v1::{Event, Pod, PodSpec, PodTemplateSpec, Secret, ServiceAccount},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{Api, Client, Resource, api::ListParams};
use serde::de::DeserializeOwned;

use super::{
    error::Error,
    facts::{
        Account, Condition, CredentialFacts, Facts, FoundSecret, ImageUse, Listing, Login, PullEvent, SecretFacts,
    },
};
use crate::{
    crd::{ClusterRegistryCredential, CredentialStatus, RegistryCredential},
    dockerconfig,
};

/// Objects per page of a list.
pub const LIST_LIMIT: u32 = 500;

/// Every object `params` selects, read page by page.
async fn list_all<K>(api: &Api<K>, params: &ListParams) -> kube::Result<Vec<K>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut params = params.clone().limit(LIST_LIMIT);
    let mut items = Vec::new();
    loop {
        let page = api.list(&params).await?;
        items.extend(page.items);
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(items),
        }
    }
}

/// What to look at.
#[derive(Debug, Clone)]
pub enum Target {
    Pod(String),
    /// `deployment`, `statefulset`, `daemonset`, `job` or `cronjob`, and its name.
    Workload(WorkloadKind, String),
    Image {
        image: String,
        service_account: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
    Job,
    CronJob,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "deployment",
            WorkloadKind::StatefulSet => "statefulset",
            WorkloadKind::DaemonSet => "daemonset",
            WorkloadKind::Job => "job",
            WorkloadKind::CronJob => "cronjob",
        }
    }
}

/// Gathers the facts about `target` in `namespace`.
pub async fn observe(client: &Client, namespace: &str, target: &Target) -> Result<Facts, Error> {
    let mut facts = match target {
        Target::Pod(name) => pod_facts(client, namespace, name).await?,
        Target::Workload(kind, name) => workload_facts(client, namespace, *kind, name).await?,
        Target::Image { image, service_account } => image_facts(image, service_account),
    };
    facts.namespace = namespace.to_string();
    facts.service_account = account(client, namespace, &facts.service_account.name).await;
    // Only the Secrets the pull sends are read.
    let mut names: Vec<String> = facts.secrets_sent().into_iter().map(|(name, _)| name).collect();
    names.sort();
    names.dedup();
    for name in names {
        let secret = secret_facts(client, namespace, &name).await;
        facts.secrets.insert(name, secret);
    }
    facts.credentials = credentials(client, namespace).await;
    Ok(facts)
}

async fn get<K>(client: &Client, namespace: &str, name: &str) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let what = format!("{} {name}", K::kind(&K::DynamicType::default()));
    match Api::<K>::namespaced(client.clone(), namespace).get_opt(name).await {
        Ok(Some(object)) => Ok(object),
        Ok(None) => Err(Error::NotFound { what, namespace: namespace.to_string() }),
        Err(source) => Err(Error::Kube { what, source }),
    }
}

async fn pod_facts(client: &Client, namespace: &str, name: &str) -> Result<Facts, Error> {
    let pod: Pod = get(client, namespace, name).await?;
    let spec = pod.spec.ok_or_else(|| Error::NoContainers(format!("pod/{name}")))?;
    let mut facts = spec_facts(format!("pod/{name}"), &spec);
    facts.is_pod = true;
    let events = pod_events(client, namespace, name).await;
    for image in &mut facts.images {
        image.events = events_for(&events, image);
    }
    Ok(facts)
}

async fn workload_facts(client: &Client, namespace: &str, kind: WorkloadKind, name: &str) -> Result<Facts, Error> {
    let (template, selector): (Option<PodTemplateSpec>, Option<Option<LabelSelector>>) = match kind {
        WorkloadKind::Deployment => {
            get::<Deployment>(client, namespace, name).await?.spec.map(|s| (s.template, Some(s.selector))).unzip()
        }
        WorkloadKind::StatefulSet => {
            get::<StatefulSet>(client, namespace, name).await?.spec.map(|s| (s.template, Some(s.selector))).unzip()
        }
        WorkloadKind::DaemonSet => {
            get::<DaemonSet>(client, namespace, name).await?.spec.map(|s| (s.template, Some(s.selector))).unzip()
        }
        WorkloadKind::Job => get::<Job>(client, namespace, name).await?.spec.map(|s| (s.template, s.selector)).unzip(),
        WorkloadKind::CronJob => {
            let cron: CronJob = get(client, namespace, name).await?;
            (cron.spec.and_then(|s| s.job_template.spec).map(|s| s.template), None)
        }
    };
    let subject = format!("{}/{name}", kind.as_str());
    let spec = template.and_then(|t| t.spec).ok_or_else(|| Error::NoContainers(subject.clone()))?;
    let mut facts = spec_facts(subject, &spec);
    if let Some(labels) = selector.flatten().as_ref().and_then(match_labels) {
        let events = workload_events(client, namespace, &labels).await;
        for image in &mut facts.images {
            image.events = events_for(&events, image);
        }
    }
    Ok(facts)
}

/// A selector's `matchLabels` as a label selector (`app=web,tier=front`); `None` without any.
/// Its `matchExpressions` are left out: the Pods found are those to read Events of, not a
/// decision.
pub fn match_labels(selector: &LabelSelector) -> Option<String> {
    let labels = selector.match_labels.as_ref().filter(|l| !l.is_empty())?;
    Some(labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
}

/// How many of a workload's Pods, newest first, the Events are read of.
const WORKLOAD_PODS: usize = 3;

/// The pull Events of the workload's newest Pods (those its selector's labels pick).
async fn workload_events(client: &Client, namespace: &str, labels: &str) -> Vec<Event> {
    let params = ListParams::default().labels(labels);
    let Ok(mut pods) = list_all(&Api::<Pod>::namespaced(client.clone(), namespace), &params).await else {
        return vec![];
    };
    pods.sort_by_key(|p| std::cmp::Reverse(p.metadata.creation_timestamp.clone().map(|t| t.0)));
    let mut events = Vec::new();
    for pod in pods.iter().take(WORKLOAD_PODS) {
        if let Some(name) = &pod.metadata.name {
            events.extend(pod_events(client, namespace, name).await);
        }
    }
    events
}

fn image_facts(image: &str, service_account: &str) -> Facts {
    Facts {
        subject: format!("image/{image}"),
        service_account: Account { name: service_account.to_string(), ..Default::default() },
        images: vec![ImageUse { image: image.to_string(), role: "image", container: String::new(), events: vec![] }],
        ..Default::default()
    }
}

/// The images (init, regular, ephemeral containers), pull Secrets and ServiceAccount of a spec.
pub fn spec_facts(subject: String, spec: &PodSpec) -> Facts {
    let image = |role: &'static str, name: &str, image: &Option<String>| ImageUse {
        image: image.clone().unwrap_or_default(),
        role,
        container: name.to_string(),
        events: vec![],
    };
    let mut images: Vec<ImageUse> =
        spec.init_containers.iter().flatten().map(|c| image("init", &c.name, &c.image)).collect();
    images.extend(spec.containers.iter().map(|c| image("container", &c.name, &c.image)));
    images.extend(spec.ephemeral_containers.iter().flatten().map(|c| image("ephemeral", &c.name, &c.image)));
    let account = spec.service_account_name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
    Facts {
        subject,
        pull_secrets: spec.image_pull_secrets.iter().flatten().map(|r| r.name.clone()).collect(),
        service_account: Account { name: account, ..Default::default() },
        images,
        ..Default::default()
    }
}

async fn account(client: &Client, namespace: &str, name: &str) -> Account {
    let base = Account { name: name.to_string(), ..Default::default() };
    match get::<ServiceAccount>(client, namespace, name).await {
        Ok(sa) => Account {
            pull_secrets: Some(sa.image_pull_secrets.iter().flatten().map(|r| r.name.clone()).collect()),
            ..base
        },
        Err(Error::NotFound { .. }) => {
            Account { problem: Some("not found: Pods cannot be created with it".into()), ..base }
        }
        Err(e) => Account { problem: Some(e.to_string()), ..base },
    }
}

async fn secret_facts(client: &Client, namespace: &str, name: &str) -> SecretFacts {
    match get::<Secret>(client, namespace, name).await {
        Ok(secret) => SecretFacts::Found(found_secret(&secret)),
        Err(Error::NotFound { .. }) => SecretFacts::Missing,
        Err(Error::Kube { source: kube::Error::Api(status), .. }) if status.code == 403 => SecretFacts::Forbidden,
        Err(e) => SecretFacts::Unreadable(e.to_string()),
    }
}

/// The type, logins and managing credential of a Secret. Its values stay in [`Login`].
pub fn found_secret(secret: &Secret) -> FoundSecret {
    let type_ = secret.type_.clone().unwrap_or_else(|| "Opaque".into());
    let data = secret.data.as_ref();
    let logins =
        match (data.and_then(|d| d.get(dockerconfig::DOCKER_CONFIG_KEY)), data.and_then(|d| d.get(".dockercfg"))) {
            (Some(json), _) => parse_logins(&json.0),
            (None, Some(cfg)) => parse_dockercfg(&cfg.0),
            (None, None) => Err(format!("no {} key", dockerconfig::DOCKER_CONFIG_KEY)),
        };
    let managed_by = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.api_version.starts_with("regcred.dev/"))
        .map(|o| (o.kind.clone(), o.name.clone()));
    FoundSecret { type_, logins, managed_by }
}

fn parse_logins(bytes: &[u8]) -> Result<Vec<Login>, String> {
    let logins = dockerconfig::parse(bytes).map_err(|e| e.to_string())?;
    Ok(logins.into_iter().map(|l| Login { server: l.server, username: l.username, password: l.password }).collect())
}

/// The older `.dockercfg` form: the `auths` map without the `auths` key around it.
fn parse_dockercfg(bytes: &[u8]) -> Result<Vec<Login>, String> {
    let inner: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|_| "not a .dockercfg document".to_string())?;
    let wrapped = serde_json::to_vec(&serde_json::json!({ "auths": inner })).map_err(|e| e.to_string())?;
    parse_logins(&wrapped)
}

async fn credentials(client: &Client, namespace: &str) -> Listing<Vec<CredentialFacts>> {
    let params = ListParams::default();
    let namespaced = list_all(&Api::<RegistryCredential>::namespaced(client.clone(), namespace), &params).await;
    let mut list: Vec<CredentialFacts> = match namespaced {
        Ok(items) => items.iter().map(namespaced_facts).collect(),
        Err(e) => return Listing::Unavailable(format!("RegistryCredentials in {namespace}: {e}")),
    };
    // Tenants commonly may not list cluster credentials: the namespace's own still count.
    if let Ok(cluster) = list_all(&Api::<ClusterRegistryCredential>::all(client.clone()), &params).await {
        list.extend(cluster.iter().map(cluster_facts));
    }
    Listing::Read(list)
}

fn namespaced_facts(c: &RegistryCredential) -> CredentialFacts {
    let insecure = c.spec.verify.as_ref().is_some_and(|v| v.insecure);
    let facts = status_facts(
        "RegistryCredential",
        c.metadata.name.clone(),
        c.spec.registry.clone(),
        insecure,
        c.status.as_ref(),
    );
    CredentialFacts { writes: c.spec.secret.name.clone().unwrap_or_else(|| facts.name.clone()), ..facts }
}

fn cluster_facts(c: &ClusterRegistryCredential) -> CredentialFacts {
    let insecure = c.spec.verify.as_ref().is_some_and(|v| v.insecure);
    let status = c.status.as_ref().map(|s| &s.credential);
    let facts =
        status_facts("ClusterRegistryCredential", c.metadata.name.clone(), c.spec.registry.clone(), insecure, status);
    CredentialFacts { writes: c.spec.secret.name.clone().unwrap_or_else(|| facts.name.clone()), ..facts }
}

fn status_facts(
    kind: &str,
    name: Option<String>,
    registry: Option<String>,
    plain_http: bool,
    status: Option<&CredentialStatus>,
) -> CredentialFacts {
    let condition = |type_: &str| {
        status.and_then(|s| s.condition(type_)).map(|c| Condition {
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
    };
    CredentialFacts {
        kind: kind.to_string(),
        name: name.unwrap_or_default(),
        registry,
        secret_name: status.and_then(|s| s.secret_name.clone()),
        registries: status.map(|s| s.registries.clone()).unwrap_or_default(),
        ready: condition("Ready"),
        verified: condition("Verified"),
        expires_at: status.and_then(|s| s.expires_at.as_ref()).map(|t| t.0.to_string()),
        plain_http,
        writes: String::new(),
    }
}

/// The Pod's Events, newest first; none when they may not be read.
async fn pod_events(client: &Client, namespace: &str, pod: &str) -> Vec<Event> {
    let params = ListParams::default().fields(&format!("involvedObject.kind=Pod,involvedObject.name={pod}"));
    let mut events = match list_all(&Api::<Event>::namespaced(client.clone(), namespace), &params).await {
        Ok(items) => items,
        Err(_) => return vec![],
    };
    events.sort_by_key(|e| {
        std::cmp::Reverse(e.last_timestamp.clone().map(|t| t.0).or(e.event_time.clone().map(|t| t.0)))
    });
    events
}

/// The pull Events about one container's image: the kubelet's `Failed`/`BackOff`/`Pulled` for
/// its container, and `FailedToRetrieveImagePullSecret` for the Pod.
pub fn events_for(events: &[Event], image: &ImageUse) -> Vec<PullEvent> {
    let field = format!("{{{}}}", image.container);
    events
        .iter()
        .filter(|e| {
            let reason = e.reason.as_deref().unwrap_or_default();
            let path = e.involved_object.field_path.as_deref().unwrap_or_default();
            let message = e.message.as_deref().unwrap_or_default();
            let pull =
                matches!(reason, "Failed" | "BackOff" | "Pulled" | "ErrImagePull") && message.contains(&image.image);
            (pull && (path.is_empty() || path.ends_with(&field))) || reason == "FailedToRetrieveImagePullSecret"
        })
        .take(5)
        .map(|e| PullEvent {
            reason: e.reason.clone().unwrap_or_default(),
            message: e.message.clone().unwrap_or_default(),
            count: e.count.unwrap_or(1),
        })
        .collect()
}
