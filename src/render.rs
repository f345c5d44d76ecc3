//! `regcred render`: the Secret a RegistryCredential would produce, computed offline from
//! manifests, for GitOps review and debugging.

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::ResourceExt;
use serde_json::Value;

use crate::{
    Error,
    controller::Credential,
    crd::RegistryCredential,
    dockerconfig,
    secret::desired_secret,
    source::{CredentialProvider, LocalSecrets, SourceContext},
};

/// Why rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("document {index}: {problem}")]
    Manifest { index: usize, problem: String },
    #[error("no RegistryCredential in the given manifests")]
    NoCredential,
    #[error("RegistryCredential {namespace}/{name}: {source}")]
    Credential { namespace: String, name: String, source: Box<Error> },
}

/// Splits manifests into credentials and Secrets. `kind: List` is unpacked; other kinds are
/// ignored so a whole kustomize output can be passed in.
pub fn read_manifests(
    documents: Vec<Value>,
    default_namespace: &str,
) -> Result<(Vec<RegistryCredential>, LocalSecrets), RenderError> {
    let mut credentials = Vec::new();
    let mut secrets = LocalSecrets::default();
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
                credentials.push(cr);
            }
            Some("Secret") => {
                // Deserialising a Secret manifest can only fail on its shape, and serde's
                // message may quote a value: report the position only.
                let mut secret: Secret = serde_json::from_value(doc)
                    .map_err(|_| RenderError::Manifest { index, problem: "not a valid Secret manifest".into() })?;
                secret.metadata.namespace.get_or_insert_with(|| default_namespace.into());
                merge_string_data(&mut secret);
                secrets.0.push(secret);
            }
            _ => {}
        }
    }
    credentials.reverse();
    if credentials.is_empty() {
        return Err(RenderError::NoCredential);
    }
    Ok((credentials, secrets))
}

/// The apiserver folds `stringData` into `data` (stringData wins); do the same.
fn merge_string_data(secret: &mut Secret) {
    if let Some(string_data) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(Default::default);
        for (key, value) in string_data {
            data.insert(key, ByteString(value.into_bytes()));
        }
    }
}

/// The Secrets the credentials would produce (without owner references: they only exist
/// once the credential is in a cluster).
pub async fn render(credentials: &[RegistryCredential], secrets: &LocalSecrets) -> Result<Vec<Secret>, RenderError> {
    let mut out = Vec::with_capacity(credentials.len());
    for cr in credentials {
        let namespace = cr.metadata.namespace.clone().unwrap_or_default();
        let failed = |source| RenderError::Credential {
            namespace: namespace.clone(),
            name: cr.name_any(),
            source: Box::new(source),
        };
        let ctx = SourceContext::offline(&namespace, cr.spec.registry.as_deref(), secrets);
        let creds = cr.spec.source.fetch(&ctx).await.map_err(failed)?;
        out.push(desired_secret(
            &cr.secret_name(),
            &namespace,
            &cr.spec.secret,
            None,
            dockerconfig::render(&creds.auths),
            None,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;
    use serde_json::json;

    use super::*;

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
        let (credentials, secrets) = read_manifests(docs, "dev").unwrap();
        let out = render(&credentials, &secrets).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].metadata.name.as_deref(), Some("hub-pull"));
        assert_eq!(out[0].metadata.namespace.as_deref(), Some("dev"));
        assert_eq!(out[0].metadata.labels.as_ref().unwrap()["team"], "a");
        let config = &out[0].data.as_ref().unwrap()[dockerconfig::DOCKER_CONFIG_KEY];
        let logins = dockerconfig::parse(&config.0).unwrap();
        let servers: Vec<_> = logins.iter().map(|l| l.server.as_str()).collect();
        assert_eq!(servers, ["https://index.docker.io/v1/", "registry-1.docker.io"]);
        assert!(logins.iter().all(|l| l.password.expose_secret() == "p@ss"));
    }

    #[tokio::test]
    async fn missing_secret_is_named() {
        let docs = vec![json!({"apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
            "metadata": {"name": "g", "namespace": "ns"},
            "spec": {"source": {"ghcr": {"username": "me", "tokenSecretRef": {"name": "pat"}}}}})];
        let (credentials, secrets) = read_manifests(docs, "default").unwrap();
        let err = render(&credentials, &secrets).await.unwrap_err();
        assert_eq!(err.to_string(), "RegistryCredential ns/g: Secret ns/pat not found");
    }
}
