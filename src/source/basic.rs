//! Static username and password.

use super::{CredentialProvider, Credentials, SecretReader, SourceContext, read_key, single_login};
use crate::{Error, crd::BasicSource};

impl CredentialProvider for BasicSource {
    async fn fetch<R: SecretReader>(&self, ctx: &SourceContext<'_, R>) -> Result<Credentials, Error> {
        let registry = ctx.registry.ok_or(Error::MissingObjectField("spec.registry (required for a basic source)"))?;
        let password = read_key(ctx, &self.password_secret_ref, "password").await?;
        single_login(registry, &self.username, password)
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::{crd::SecretKeyRef, source::LocalSecrets};

    fn source(key: Option<&str>) -> BasicSource {
        BasicSource {
            username: "bob".into(),
            password_secret_ref: SecretKeyRef { name: "reg-pass".into(), key: key.map(Into::into), namespace: None },
        }
    }

    #[tokio::test]
    async fn reads_the_password_key() {
        let secrets = LocalSecrets::default().with("team", "reg-pass", &[("password", b"pa:ss")]);
        let ctx = SourceContext::offline("team", Some("docker.io"), &secrets);
        let creds = source(None).fetch(&ctx).await.unwrap();
        let servers: Vec<_> = creds.auths.iter().map(|a| a.server.as_str()).collect();
        assert_eq!(servers, [crate::registry::DOCKER_HUB_SERVER, crate::registry::DOCKER_HUB_REGISTRY_HOST]);
        for auth in &creds.auths {
            assert_eq!(auth.username, "bob");
            assert_eq!(auth.password.expose_secret(), "pa:ss");
        }
    }

    #[tokio::test]
    async fn missing_pieces_are_named() {
        let secrets = LocalSecrets::default()
            .with("team", "reg-pass", &[("password", b""), ("latin1", b"\xe9t\xe9")])
            .with("other", "reg-pass", &[("password", b"elsewhere")]);
        let ctx = SourceContext::offline("team", Some("r.io"), &secrets);
        let err = source(Some("nope")).fetch(&ctx).await.unwrap_err();
        assert!(matches!(err, Error::SourceKeyMissing { ref key, .. } if key == "nope"), "{err}");
        let err = source(None).fetch(&ctx).await.unwrap_err();
        assert!(matches!(err, Error::SourceValueEmpty { .. }), "{err}");
        let err = source(Some("latin1")).fetch(&ctx).await.unwrap_err();
        assert!(matches!(err, Error::SourceValueNotUtf8 { .. }), "{err}");
        let ctx = SourceContext::offline("nowhere", Some("r.io"), &secrets);
        let err = source(None).fetch(&ctx).await.unwrap_err();
        assert_eq!(err.to_string(), "Secret nowhere/reg-pass not found");
    }

    #[tokio::test]
    async fn usernames_that_break_the_auth_field_are_refused() {
        let secrets = LocalSecrets::default().with("team", "reg-pass", &[("password", b"x")]);
        let ctx = SourceContext::offline("team", Some("r.io"), &secrets);
        let mut s = source(None);
        s.username = "a:b".into();
        assert!(matches!(s.fetch(&ctx).await.unwrap_err(), Error::InvalidUsername(_)));
    }
}
