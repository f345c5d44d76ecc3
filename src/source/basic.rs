//! Static username and password.

use super::{CredentialProvider, Credentials, SecretReader, SourceContext, read_password, single_login};
use crate::{Error, crd::BasicSource};

impl CredentialProvider for BasicSource {
    async fn fetch<R: SecretReader>(&self, ctx: &SourceContext<'_, R>) -> Result<Credentials, Error> {
        let registry = ctx.registry.ok_or(Error::MissingObjectField("spec.registry (required for a basic source)"))?;
        let mut notes = Vec::new();
        let password = read_password(ctx, &self.password_secret_ref, "password", &mut notes).await?;
        single_login(registry, &self.username, password, notes)
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

    /// `kubectl create secret generic --from-file=password=FILE` keeps the file's last newline;
    /// regcred drops one line ending as `docker login --password-stdin` does, and says so.
    #[tokio::test]
    async fn one_trailing_line_ending_is_removed_and_noted() {
        for (stored, sent, ending) in [
            (&b"pa:ss\n"[..], "pa:ss", Some("\\n")),
            (b"pa:ss\r\n", "pa:ss", Some("\\r\\n")),
            (b"pa:ss\r", "pa:ss", Some("\\r")),
            (b"pa:ss\n\n", "pa:ss\n", Some("\\n")),
            (b"pa:ss\n\r\n", "pa:ss\n", Some("\\r\\n")),
            (b"pa:ss", "pa:ss", None),
            (b"pa\nss ", "pa\nss ", None),
        ] {
            let secrets = LocalSecrets::default().with("team", "reg-pass", &[("password", stored)]);
            let ctx = SourceContext::offline("team", Some("docker.io"), &secrets);
            let creds = source(None).fetch(&ctx).await.unwrap();
            assert_eq!(creds.auths[0].password.expose_secret(), sent, "stored {:?}", String::from_utf8_lossy(stored));
            match ending {
                None => assert!(creds.notes.is_empty(), "{:?}", creds.notes),
                Some(ending) => {
                    let [note] = &creds.notes[..] else { panic!("one note expected: {:?}", creds.notes) };
                    assert!(note.starts_with("key \"password\" of Secret team/reg-pass ended in "), "{note}");
                    assert!(note.contains(ending), "{note}");
                    assert!(note.contains("docker login --password-stdin"), "{note}");
                    assert!(!note.contains("pa:ss"), "the note quotes the value: {note}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_password_that_is_only_a_line_ending_is_empty() {
        let secrets = LocalSecrets::default().with("team", "reg-pass", &[("password", b"\r\n")]);
        let ctx = SourceContext::offline("team", Some("r.io"), &secrets);
        let err = source(None).fetch(&ctx).await.unwrap_err();
        assert!(matches!(err, Error::SourceValueEmpty { .. }), "{err}");
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
