//! GitHub Container Registry: a username and a personal access token.

use super::{CredentialProvider, Credentials, SecretReader, SourceContext, read_key, single_login};
use crate::{Error, crd::GhcrSource};

/// Where GitHub serves container images.
pub const GHCR_HOST: &str = "ghcr.io";

impl CredentialProvider for GhcrSource {
    async fn fetch<R: SecretReader>(&self, ctx: &SourceContext<'_, R>) -> Result<Credentials, Error> {
        let token = read_key(ctx, &self.token_secret_ref, "token").await?;
        single_login(ctx.registry.unwrap_or(GHCR_HOST), &self.username, token)
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
    }
}
