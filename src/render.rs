//! `regcred render`: the Secrets that RegistryCredentials and ClusterRegistryCredentials would
//! produce, computed offline from manifests, for GitOps review and debugging. Both kinds go
//! through the controller's code: `Credential::parts` and `secret_name`, the reserved-key check,
//! `plan::select` (over the namespaces known offline), the providers and `desired_secret`.

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{ResourceExt, api::ObjectMeta};
use serde_json::Value;

use crate::{
    Error,
    controller::{Credential, Scope},
    crd::{ClusterRegistryCredential, RegistryCredential, VerifySpec},
    dockerconfig::{self, RegistryAuth},
    plan,
    secret::{DesiredSecret, desired_secret},
    source::{CredentialProvider, LocalSecrets, SourceContext},
};

/// Namespace of manifests that name none when no namespace is given.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("document {index}: {problem}")]
    Manifest { index: usize, problem: String },
    #[error("no RegistryCredential or ClusterRegistryCredential in the given manifests")]
    NoCredential,
    /// `credential` is `RegistryCredential namespace/name` or `ClusterRegistryCredential name`.
    #[error("{credential}: {source}")]
    Credential { credential: String, source: Box<Error> },
    #[error(
        "Secret {namespace}/{name} would be written by both {first} and {second} (in a cluster the older \
         credential keeps it and the other reports SecretConflict)"
    )]
    SameSecret { namespace: String, name: String, first: String, second: String },
    #[error("nothing to render: {}", .0.join("; "))]
    NothingRendered(Vec<String>),
}

/// What rendering reads from the manifests.
#[derive(Default)]
pub struct Manifests {
    pub credentials: Vec<RegistryCredential>,
    pub cluster_credentials: Vec<ClusterRegistryCredential>,
    /// The namespaces known to exist, one per name: the Namespace manifests (with their
    /// labels), then the namespaces given on the command line that no manifest describes
    /// (without labels, so only `names` or a select-all selection can pick them).
    pub namespaces: Vec<ObjectMeta>,
    pub secrets: LocalSecrets,
}

/// What rendering produced.
#[derive(Debug)]
pub struct Rendered {
    /// The Secrets, sorted by namespace, then name.
    pub secrets: Vec<DesiredSecret>,
    /// For the user (standard error): cluster credentials that selected no known namespace,
    /// and what a source changed in what it read. They name Secrets and keys, never values.
    pub notes: Vec<String>,
    /// Each rendered credential's description, logins and `spec.verify`, for
    /// `regcred render --verify`.
    pub logins: Vec<(String, Vec<RegistryAuth>, Option<VerifySpec>)>,
}

/// Splits manifests into credentials, Namespaces and Secrets. `kind: List` is unpacked; other
/// kinds are ignored so a whole kustomize output can be passed in. `namespaces` are the
/// namespaces given on the command line: the first (else [`DEFAULT_NAMESPACE`]) is the
/// namespace of RegistryCredentials and Secrets that name none; all of them count as existing
/// namespaces for ClusterRegistryCredentials.
pub fn read_manifests(documents: Vec<Value>, namespaces: &[String]) -> Result<Manifests, RenderError> {
    let default_namespace = namespaces.first().map_or(DEFAULT_NAMESPACE, String::as_str);
    let mut manifests = Manifests::default();
    // Read last document first: of two Secrets or Namespaces with one name, the later one is
    // found, as the later one wins with `kubectl apply`.
    let mut queue: Vec<(usize, Value)> = documents.into_iter().enumerate().collect();
    while let Some((index, doc)) = queue.pop() {
        let bad = |e: serde_json::Error| RenderError::Manifest { index, problem: e.to_string() };
        match doc.get("kind").and_then(Value::as_str) {
            Some("List") => {
                if let Some(items) = doc.get("items").and_then(Value::as_array) {
                    queue.extend(items.iter().cloned().map(|item| (index, item)));
                }
            }
            Some("RegistryCredential") => {
                let mut cr: RegistryCredential = serde_json::from_value(doc).map_err(bad)?;
                cr.metadata.namespace.get_or_insert_with(|| default_namespace.into());
                manifests.credentials.push(cr);
            }
            Some("ClusterRegistryCredential") => {
                manifests.cluster_credentials.push(serde_json::from_value(doc).map_err(bad)?);
            }
            Some("Namespace") => {
                let namespace: Namespace = serde_json::from_value(doc).map_err(bad)?;
                if !manifests.namespaces.iter().any(|known| known.name == namespace.metadata.name) {
                    manifests.namespaces.push(namespace.metadata);
                }
            }
            Some("Secret") => {
                // Deserialising a Secret manifest can only fail on its shape, and serde's
                // message may quote a value: report the position only.
                let mut secret: Secret = serde_json::from_value(doc)
                    .map_err(|_| RenderError::Manifest { index, problem: "not a valid Secret manifest".into() })?;
                secret.metadata.namespace.get_or_insert_with(|| default_namespace.into());
                manifests.secrets.add(secret);
            }
            _ => {}
        }
    }
    manifests.credentials.reverse();
    manifests.cluster_credentials.reverse();
    manifests.namespaces.reverse();
    if manifests.credentials.is_empty() && manifests.cluster_credentials.is_empty() {
        return Err(RenderError::NoCredential);
    }
    for name in namespaces {
        if !manifests.namespaces.iter().any(|known| known.name.as_ref() == Some(name)) {
            manifests.namespaces.push(ObjectMeta { name: Some(name.clone()), ..Default::default() });
        }
    }
    Ok(manifests)
}

/// The Secrets the credentials would produce: a RegistryCredential's in its namespace, a
/// ClusterRegistryCredential's in each known namespace its selection picks. Without owner
/// references, hence without the credential-uid label: they only exist once the credential
/// is in a cluster. A ClusterRegistryCredential that picks no known namespace renders nothing
/// (a note says so); rendering nothing at all is an error.
pub async fn render(manifests: &Manifests) -> Result<Rendered, RenderError> {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let mut logins = Vec::new();
    render_all(&manifests.credentials, manifests, &mut out, &mut notes, &mut logins).await?;
    render_all(&manifests.cluster_credentials, manifests, &mut out, &mut notes, &mut logins).await?;
    if out.is_empty() {
        return Err(RenderError::NothingRendered(notes));
    }
    let key = |secret: &DesiredSecret| (secret.metadata.namespace.clone(), secret.metadata.name.clone());
    out.sort_by_key(|(secret, _)| key(secret));
    if let Some(pair) = out.windows(2).find(|pair| key(&pair[0].0) == key(&pair[1].0)) {
        let [(secret, first), (_, second)] = pair else { unreachable!("windows of two") };
        return Err(RenderError::SameSecret {
            namespace: secret.metadata.namespace.clone().unwrap_or_default(),
            name: secret.metadata.name.clone().unwrap_or_default(),
            first: first.clone(),
            second: second.clone(),
        });
    }
    Ok(Rendered { secrets: out.into_iter().map(|(secret, _)| secret).collect(), notes, logins })
}

/// Renders each credential of one kind into `out`, with the credential's description.
async fn render_all<K: Credential>(
    credentials: &[K],
    manifests: &Manifests,
    out: &mut Vec<(DesiredSecret, String)>,
    notes: &mut Vec<String>,
    logins: &mut Vec<(String, Vec<RegistryAuth>, Option<VerifySpec>)>,
) -> Result<(), RenderError> {
    for cr in credentials {
        let credential = match cr.parts().scope {
            Scope::Namespace(namespace) => format!("{} {namespace}/{}", K::KIND, cr.name_any()),
            Scope::Selection(_) => format!("{} {}", K::KIND, cr.name_any()),
        };
        let failed = |source| RenderError::Credential { credential: credential.clone(), source: Box::new(source) };
        let (secrets, source_notes, auths) = render_one(cr, manifests).await.map_err(failed)?;
        if !secrets.is_empty() {
            logins.push((credential.clone(), auths, cr.parts().verify.cloned()));
        }
        if secrets.is_empty() {
            let known: Vec<&str> = manifests.namespaces.iter().filter_map(|n| n.name.as_deref()).collect();
            notes.push(match known.is_empty() {
                true => format!(
                    "{credential}: no namespace is known, nothing rendered for it (give namespaces with -n or as \
                     Namespace manifests)"
                ),
                false => format!(
                    "{credential} selects none of the known namespaces ({}), nothing rendered for it (give \
                     namespaces with -n or as Namespace manifests)",
                    known.join(", ")
                ),
            });
        }
        notes.extend(source_notes.into_iter().map(|note| format!("{credential}: {note}")));
        out.extend(secrets.into_iter().map(|secret| (secret, credential.clone())));
    }
    Ok(())
}

/// One credential as `controller::core::sync` would write it, offline: its Secrets (none when
/// it selects no known namespace, then its source is not read) and the source's notes.
async fn render_one<K: Credential>(
    cr: &K,
    manifests: &Manifests,
) -> Result<(Vec<DesiredSecret>, Vec<String>, Vec<RegistryAuth>), Error> {
    let parts = cr.parts();
    if let Some(key) = plan::reserved_template_key(parts.secret) {
        return Err(Error::ReservedKey { key: key.into() });
    }
    let (own_namespace, targets) = match parts.scope {
        Scope::Namespace(namespace) => (Some(namespace), vec![namespace.to_string()]),
        Scope::Selection(selection) => (None, plan::select(selection, &manifests.namespaces)?),
    };
    if targets.is_empty() {
        return Ok((Vec::new(), Vec::new(), Vec::new()));
    }
    let ctx = SourceContext {
        cluster_scoped: own_namespace.is_none(),
        ..SourceContext::offline(own_namespace.unwrap_or_default(), parts.registry, &manifests.secrets)
    };
    let fetched = parts.source.fetch(&ctx).await?;
    let docker_config = dockerconfig::render(&fetched.auths);
    let name = cr.secret_name();
    let secrets = targets
        .iter()
        .map(|namespace| desired_secret(&name, namespace, parts.secret, None, docker_config.clone()))
        .collect();
    Ok((secrets, fetched.notes, fetched.auths))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;
    use serde_json::json;

    use super::*;

    fn given(namespaces: &[&str]) -> Vec<String> {
        namespaces.iter().map(|n| n.to_string()).collect()
    }

    async fn render_docs(docs: Vec<Value>, namespaces: &[&str]) -> Result<Rendered, RenderError> {
        render(&read_manifests(docs, &given(namespaces))?).await
    }

    /// Namespace and name of each rendered Secret, in output order.
    fn placed(rendered: &Rendered) -> Vec<(String, String)> {
        let meta = rendered.secrets.iter().map(|s| &s.metadata);
        meta.map(|m| (m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())).collect()
    }

    fn pair(namespace: &str, name: &str) -> (String, String) {
        (namespace.into(), name.into())
    }

    fn namespace(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
    }

    fn robot_secret() -> Value {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "robot", "namespace": "platform"},
               "stringData": {"password": "robot-token"}})
    }

    fn cluster_credential(name: &str, namespaces: Value) -> Value {
        json!({"apiVersion": "regcred.dev/v1alpha1", "kind": "ClusterRegistryCredential", "metadata": {"name": name},
               "spec": {"registry": "r.example.com", "namespaces": namespaces, "secret": {"name": "pull"},
                        "source": {"basic": {"username": "robot",
                                             "passwordSecretRef": {"name": "robot", "namespace": "platform"}}}}})
    }

    #[tokio::test]
    async fn renders_from_manifests_with_string_data_and_lists() {
        let docs = vec![
            json!({"apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pass"}, "stringData": {"password": "p@ss"}}
            ]}),
            json!({"apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
                   "metadata": {"name": "hub"},
                   "spec": {"registry": "docker.io", "source": {"basic": {"username": "me", "passwordSecretRef": {"name": "pass"}}},
                            "secret": {"name": "hub-pull", "labels": {"team": "a"}}}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ignored"}}),
        ];
        let manifests = read_manifests(docs, &given(&["dev"])).unwrap();
        let out = render(&manifests).await.unwrap();
        assert!(out.notes.is_empty());
        let out = out.secrets;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].metadata.name.as_deref(), Some("hub-pull"));
        assert_eq!(out[0].metadata.namespace.as_deref(), Some("dev"));
        assert_eq!(out[0].metadata.labels.as_ref().unwrap()["team"], "a");
        let sent = out[0].to_secret();
        assert_eq!(sent.type_.as_deref(), Some(dockerconfig::DOCKER_CONFIG_TYPE));
        let logins = dockerconfig::parse(&sent.data.as_ref().unwrap()[dockerconfig::DOCKER_CONFIG_KEY].0).unwrap();
        let servers: Vec<_> = logins.iter().map(|l| l.server.as_str()).collect();
        assert_eq!(servers, ["https://index.docker.io/v1/", "registry-1.docker.io"]);
        assert!(logins.iter().all(|l| l.password.expose_secret() == "p@ss"));
    }

    #[tokio::test]
    async fn missing_secret_is_named() {
        let docs = vec![json!({"apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
            "metadata": {"name": "g", "namespace": "ns"},
            "spec": {"source": {"ghcr": {"username": "me", "tokenSecretRef": {"name": "pat"}}}}})];
        let err = render_docs(docs, &[]).await.unwrap_err();
        assert_eq!(err.to_string(), "RegistryCredential ns/g: Secret ns/pat not found");
    }

    /// The namespaced kind: the first `-n` is the namespace of manifests naming none, later
    /// ones and Namespace manifests change nothing; no uid label or owner offline.
    #[tokio::test]
    async fn the_namespaced_kind_renders_in_its_own_namespace_only() {
        let docs = vec![
            namespace("team-a", json!({})),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pat"}, "stringData": {"token": "ghp_x"}}),
            json!({"apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential", "metadata": {"name": "g"},
                   "spec": {"source": {"ghcr": {"username": "me", "tokenSecretRef": {"name": "pat"}}}}}),
        ];
        let out = render_docs(docs.clone(), &["dev", "other"]).await.unwrap();
        assert_eq!(placed(&out), [pair("dev", "g")]);
        let secret = &out.secrets[0];
        assert!(secret.metadata.owner_references.is_none());
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(labels.keys().collect::<Vec<_>>(), ["app.kubernetes.io/managed-by"]);
        assert_eq!(placed(&render_docs(docs, &[]).await.unwrap()), [pair(DEFAULT_NAMESPACE, "g")]);
    }

    #[tokio::test]
    async fn a_cluster_credential_selects_by_name_among_known_namespaces() {
        let docs = vec![
            namespace("a", json!({})),
            namespace("b", json!({})),
            robot_secret(),
            cluster_credential("c", json!({"names": ["b", "c", "missing"]})),
        ];
        let out = render_docs(docs, &["c", "d"]).await.unwrap();
        assert_eq!(placed(&out), [pair("b", "pull"), pair("c", "pull")], "b from a manifest, c from -n");
        assert!(out.notes.is_empty());
        for secret in &out.secrets {
            let sent = secret.to_secret();
            let logins = dockerconfig::parse(&sent.data.as_ref().unwrap()[dockerconfig::DOCKER_CONFIG_KEY].0).unwrap();
            assert_eq!(logins.len(), 1);
            assert_eq!((logins[0].server.as_str(), logins[0].username.as_str()), ("r.example.com", "robot"));
            assert_eq!(logins[0].password.expose_secret(), "robot-token");
            let labels = secret.metadata.labels.as_ref().unwrap();
            assert!(!labels.contains_key(crate::secret::CREDENTIAL_UID_LABEL), "no uid label offline");
            assert!(secret.metadata.owner_references.is_none());
        }
    }

    /// Labels come from Namespace manifests; a `-n` namespace has none, so a selector cannot
    /// pick it. A terminating Namespace is skipped, as in the controller.
    #[tokio::test]
    async fn a_selector_matches_namespace_manifests_only() {
        let mut dying = namespace("a3", json!({"team": "a"}));
        dying["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
        let docs = vec![
            namespace("a1", json!({"team": "a"})),
            json!({"apiVersion": "v1", "kind": "List", "items": [namespace("a2", json!({"team": "a", "tier": "x"}))]}),
            dying,
            namespace("b1", json!({"team": "b"})),
            robot_secret(),
            cluster_credential("c", json!({"selector": {"matchLabels": {"team": "a"}}})),
        ];
        let out = render_docs(docs, &["cli"]).await.unwrap();
        assert_eq!(placed(&out), [pair("a1", "pull"), pair("a2", "pull")]);
    }

    #[tokio::test]
    async fn exclude_wins_over_the_selection() {
        let docs = vec![
            namespace("a1", json!({"team": "a"})),
            namespace("kube-system", json!({"team": "a"})),
            robot_secret(),
            cluster_credential(
                "c",
                json!({"selector": {"matchLabels": {"team": "a"}}, "names": ["x"], "exclude": ["kube-system", "x"]}),
            ),
        ];
        let out = render_docs(docs, &["x"]).await.unwrap();
        assert_eq!(placed(&out), [pair("a1", "pull")]);
    }

    /// No selector and no names: every known namespace, `-n` ones included; output sorted by
    /// namespace, then name, whatever the input order.
    #[tokio::test]
    async fn select_all_covers_the_given_namespaces_in_order() {
        let docs = vec![
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pat"}, "stringData": {"token": "ghp_x"}}),
            json!({"apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential", "metadata": {"name": "g"},
                   "spec": {"source": {"ghcr": {"username": "me", "tokenSecretRef": {"name": "pat"}}}}}),
            cluster_credential("c", json!({})),
            namespace("m", json!({})),
            robot_secret(),
        ];
        let out = render_docs(docs, &["z", "b"]).await.unwrap();
        assert_eq!(placed(&out), [pair("b", "pull"), pair("m", "pull"), pair("z", "g"), pair("z", "pull")]);
    }

    /// Errors name the cluster credential; its references need their own namespace and
    /// resolve against the Secret manifests; ECR and ACR fail offline.
    #[tokio::test]
    async fn cluster_credential_errors_name_it() {
        let mut no_namespace = cluster_credential("c", json!({}));
        no_namespace["spec"]["source"]["basic"]["passwordSecretRef"] = json!({"name": "robot"});
        let mut ecr = cluster_credential("e", json!({}));
        ecr["spec"]["source"] = json!({"ecr": {"region": "eu-west-1", "auth": {"ambient": {}}}});
        let mut acr = cluster_credential("a", json!({}));
        acr["spec"]["source"] = json!({"acr": {"registry": "team.azurecr.io", "ambient": {}}});
        let mut reserved = cluster_credential("r", json!({}));
        reserved["spec"]["secret"]["labels"] = json!({"regcred.dev/credential-uid": "x"});
        for (doc, message) in [
            (
                no_namespace,
                "ClusterRegistryCredential c: references in a ClusterRegistryCredential's source need a namespace",
            ),
            (cluster_credential("c", json!({})), "ClusterRegistryCredential c: Secret platform/robot not found"),
            (ecr, "ClusterRegistryCredential e: ecr sources need AWS; they cannot be rendered offline"),
            (acr, "ClusterRegistryCredential a: acr sources need Azure; they cannot be rendered offline"),
            (
                reserved,
                "ClusterRegistryCredential r: spec.secret sets \"regcred.dev/credential-uid\", a key regcred reserves for itself",
            ),
        ] {
            let err = render_docs(vec![doc], &["a"]).await.expect_err(message);
            assert_eq!(err.to_string(), message);
        }
    }

    /// A cluster credential selecting nothing known renders nothing and says so; when nothing
    /// at all is rendered, that is an error.
    #[tokio::test]
    async fn selecting_nothing_is_a_note_unless_nothing_is_rendered() {
        let docs = vec![
            namespace("a", json!({})),
            robot_secret(),
            cluster_credential("none", json!({"names": ["elsewhere"]})),
            cluster_credential("some", json!({"names": ["a"]})),
        ];
        let out = render_docs(docs.clone(), &["b"]).await.unwrap();
        assert_eq!(placed(&out), [pair("a", "pull")]);
        assert_eq!(out.notes.len(), 1);
        assert!(out.notes[0].starts_with("ClusterRegistryCredential none selects none of the known namespaces (a, b)"));

        let err = render_docs(vec![robot_secret(), cluster_credential("none", json!({"names": ["a"]}))], &[])
            .await
            .unwrap_err();
        assert!(matches!(err, RenderError::NothingRendered(_)));
        assert!(
            err.to_string().starts_with("nothing to render: ClusterRegistryCredential none: no namespace is known")
        );
    }

    /// What `regcred render` read and what it produced show no password until printed.
    #[tokio::test]
    async fn rendered_secrets_show_no_credential() {
        let docs = vec![robot_secret(), cluster_credential("c", json!({"names": ["a"]}))];
        let manifests = read_manifests(docs, &given(&["a"])).unwrap();
        let out = render(&manifests).await.unwrap();
        for shown in [format!("{out:?}"), format!("{:?}", manifests.secrets)] {
            crate::test_support::assert_hidden(&shown, "robot-token");
            crate::test_support::assert_hidden(&shown, "robot:robot-token");
        }
    }

    #[tokio::test]
    async fn two_credentials_writing_one_secret_are_refused() {
        let docs = vec![
            robot_secret(),
            cluster_credential("first", json!({"names": ["a"]})),
            cluster_credential("second", json!({"names": ["a"]})),
        ];
        let err = render_docs(docs, &["a"]).await.unwrap_err();
        assert!(err.to_string().starts_with(
            "Secret a/pull would be written by both ClusterRegistryCredential first and ClusterRegistryCredential second"
        ));
    }
}
