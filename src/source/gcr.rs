//! Google Container Registry and Artifact Registry: a service-account key sent verbatim as
//! the password of the user `_json_key`.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, de::IgnoredAny};

use super::{CredentialProvider, Credentials, SecretReader, SourceContext, read_key, single_login};
use crate::{Error, crd::GcrSource};

/// Default registry for a gcr source.
pub const GCR_HOST: &str = "gcr.io";
/// The username Google's registries expect with a JSON key.
pub const JSON_KEY_USERNAME: &str = "_json_key";

impl CredentialProvider for GcrSource {
    async fn fetch<R: SecretReader>(&self, ctx: &SourceContext<'_, R>) -> Result<Credentials, Error> {
        let key_ref = &self.json_key_secret_ref;
        let key = read_key(ctx, key_ref, "key.json").await?;
        let namespace = ctx.resolve_namespace(key_ref.namespace.as_deref())?;
        check_service_account_key(&key).map_err(|problem| Error::InvalidGcrKey {
            namespace,
            name: key_ref.name.clone(),
            key: key_ref.key_or("key.json").to_string(),
            problem,
        })?;
        // Verbatim: JSON does not mind a trailing newline, and the key is sent as it is.
        single_login(ctx.registry.unwrap_or(GCR_HOST), JSON_KEY_USERNAME, key, Vec::new())
    }
}

/// A top-level field of a key file: text is kept as a secret (one field is the private key),
/// anything else only as being there.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Field {
    Text(SecretString),
    Other(IgnoredAny),
}

/// Checks that the text is a service-account key. The problem it returns never quotes the
/// key (serde_json's own messages can echo input, so only positions are kept); its fields are
/// read into secrets, not into a `serde_json::Value`, which would print the private key.
fn check_service_account_key(key: &SecretString) -> Result<(), String> {
    serde_json::from_str::<IgnoredAny>(key.expose_secret())
        .map_err(|e| format!("not valid JSON (line {}, column {})", e.line(), e.column()))?;
    let fields: BTreeMap<String, Field> =
        serde_json::from_str(key.expose_secret()).map_err(|_| "not a JSON object".to_string())?;
    let text = |name: &str| match fields.get(name) {
        Some(Field::Text(text)) if !text.expose_secret().is_empty() => Some(text.expose_secret()),
        _ => None,
    };
    if fields.contains_key("type") && text("type") != Some("service_account") {
        return Err("field \"type\" is not \"service_account\"".into());
    }
    for required in ["client_email", "private_key"] {
        if text(required).is_none() {
            return Err(format!("field {required:?} is missing or empty"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{crd::SecretKeyRef, source::LocalSecrets};

    const KEY: &str = "{\n  \"type\": \"service_account\",\n  \"client_email\": \"puller@p.iam.gserviceaccount.com\",\n  \"private_key\": \"-----BEGIN PRIVATE KEY-----\\nMIIsecret\\n-----END PRIVATE KEY-----\\n\"\n}\n";

    fn source() -> GcrSource {
        GcrSource { json_key_secret_ref: SecretKeyRef { name: "gcp".into(), key: None, namespace: None } }
    }

    #[tokio::test]
    async fn key_text_is_the_password_unchanged() {
        let secrets = LocalSecrets::default().with("ns", "gcp", &[("key.json", KEY.as_bytes())]);
        let ctx = SourceContext::offline("ns", Some("europe-docker.pkg.dev"), &secrets);
        let creds = source().fetch(&ctx).await.unwrap();
        assert_eq!(creds.auths[0].server, "europe-docker.pkg.dev");
        assert_eq!(creds.auths[0].username, "_json_key");
        assert_eq!(creds.auths[0].password.expose_secret(), KEY);
        assert!(KEY.ends_with('\n'), "the key keeps its trailing newline");
        assert!(creds.notes.is_empty());
        crate::test_support::assert_hidden(&format!("{creds:?}"), "MIIsecret");
        let fields: BTreeMap<String, Field> = serde_json::from_str(KEY).unwrap();
        crate::test_support::assert_hidden(&format!("{fields:?}"), "MIIsecret");
    }

    #[tokio::test]
    async fn non_keys_are_refused_without_quoting_them() {
        for (bad, expect) in [
            ("MIIsecret not json", "not valid JSON"),
            ("[\"MIIsecret\"]", "not a JSON object"),
            ("{\"type\":\"authorized_user\",\"client_email\":\"a\",\"private_key\":\"MIIsecret\"}", "service_account"),
            ("{\"client_email\":\"a@b\"}", "private_key"),
            ("{\"private_key\":\"MIIsecret\"}", "client_email"),
        ] {
            let secrets = LocalSecrets::default().with("ns", "gcp", &[("key.json", bad.as_bytes())]);
            let ctx = SourceContext::offline("ns", None, &secrets);
            let err = source().fetch(&ctx).await.unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::InvalidGcrKey { .. }), "{msg}");
            assert!(msg.contains(expect), "{msg}");
            assert!(!msg.contains("MIIsecret"), "{msg}");
        }
    }

    proptest::proptest! {
        /// Any text as a key: no panic, and the problem never quotes it.
        #[test]
        fn key_checks_never_quote_the_key(marker in "[A-Za-z0-9]{12}", prefix in "\\PC{0,60}", suffix in "\\PC{0,60}") {
            let text = format!("{prefix}{marker}{suffix}");
            if let Err(problem) = check_service_account_key(&SecretString::from(text)) {
                proptest::prop_assert!(!problem.contains(&marker), "{}", problem);
            }
        }
    }
}
