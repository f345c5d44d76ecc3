//! GitHub Container Registry: a username and a personal access token.

use super::{CredentialProvider, Credentials, SecretReader, SourceContext, read_password, single_login};
use crate::{Error, crd::GhcrSource};

/// Where GitHub serves container images.
pub const GHCR_HOST: &str = "ghcr.io";

impl CredentialProvider for GhcrSource {
    async fn fetch<R: SecretReader>(&self, ctx: &SourceContext<'_, R>) -> Result<Credentials, Error> {
        let mut notes = Vec::new();
        let token = read_password(ctx, &self.token_secret_ref, "token", &mut notes).await?;
        single_login(ctx.registry.unwrap_or(GHCR_HOST), &self.username, token, notes)
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::{crd::SecretKeyRef, source::LocalSecrets};

    #[tokio::test]
    async fn defaults_to_ghcr_io() {
        let secrets = LocalSecrets::default().with("ns", "pat", &[("token", b"ghp_x")]);
        let ctx = SourceContext::offline("ns", None, &secrets);
        let source = GhcrSource {
            username: "octocat".into(),
            token_secret_ref: SecretKeyRef { name: "pat".into(), key: None, namespace: None },
        };
        let creds = source.fetch(&ctx).await.unwrap();
        assert_eq!(creds.auths[0].server, "ghcr.io");
        assert_eq!(creds.auths[0].password.expose_secret(), "ghp_x");
        assert!(creds.notes.is_empty());
        crate::test_support::assert_hidden(&format!("{creds:?}"), "ghp_x");
    }

    #[tokio::test]
    async fn a_token_loses_its_trailing_newline() {
        let secrets = LocalSecrets::default().with("ns", "pat", &[("token", b"ghp_x\n")]);
        let ctx = SourceContext::offline("ns", None, &secrets);
        let source = GhcrSource {
            username: "octocat".into(),
            token_secret_ref: SecretKeyRef { name: "pat".into(), key: None, namespace: None },
        };
        let creds = source.fetch(&ctx).await.unwrap();
        assert_eq!(creds.auths[0].password.expose_secret(), "ghp_x");
        assert_eq!(creds.notes.len(), 1, "{:?}", creds.notes);
        assert!(creds.notes[0].starts_with("key \"token\" of Secret ns/pat ended in "), "{}", creds.notes[0]);
        assert!(!creds.notes[0].contains("ghp_x"), "{}", creds.notes[0]);
    }
}
