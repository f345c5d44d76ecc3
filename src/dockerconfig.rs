//! The `.dockerconfigjson` document: the `auths` section of docker's config.json.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::STANDARD};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use serde::{Deserialize, Serialize};

/// Key of the data entry in a `kubernetes.io/dockerconfigjson` Secret.
pub const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";
/// Type of the Secret the kubelet reads pull credentials from.
pub const DOCKER_CONFIG_TYPE: &str = "kubernetes.io/dockerconfigjson";

/// One registry login. The password is kept in a `SecretString` so that `Debug`
/// (and so any log line that formats it) shows `[REDACTED]`.
#[derive(Clone, Debug)]
pub struct RegistryAuth {
    pub server: String,
    pub username: String,
    pub password: SecretString,
}

#[derive(Serialize, Deserialize)]
struct DockerConfig<E> {
    auths: BTreeMap<String, E>,
}

// Field order is the order `docker login` writes them in.
#[derive(Serialize)]
struct EntryOut<'a> {
    username: &'a str,
    password: &'a str,
    auth: String,
}

/// Renders the document. Servers are sorted, so the same logins always give the same
/// bytes and an unchanged input never causes a write. A server given twice keeps the
/// last login. The bytes hold every password, so they come out as a secret.
pub fn render(auths: &[RegistryAuth]) -> SecretSlice<u8> {
    let entries = auths
        .iter()
        .map(|a| {
            let password = a.password.expose_secret();
            let auth = STANDARD.encode(format!("{}:{}", a.username, password));
            (a.server.clone(), EntryOut { username: &a.username, password, auth })
        })
        .collect();
    // Serialising maps of strings cannot fail.
    serde_json::to_vec(&DockerConfig { auths: entries }).unwrap_or_default().into()
}

// The password, and the auth field that carries it, are secrets as soon as they are parsed.
#[derive(Deserialize, Default)]
struct EntryIn {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<SecretString>,
    #[serde(default)]
    auth: Option<SecretString>,
}

/// Why a document could not be read. Carries no part of the document.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not a docker config document (line {line}, column {column})")]
    Json { line: usize, column: usize },
    #[error("the login for {0} has neither username/password nor auth")]
    MissingLogin(String),
    #[error("the auth field for {0} is not base64 of user:password")]
    BadAuth(String),
}

/// Reads a document back into logins the way the kubelet does: `auth` wins when present,
/// since it is what docker and the kubelet decode.
pub fn parse(bytes: &[u8]) -> Result<Vec<RegistryAuth>, ParseError> {
    let doc: DockerConfig<EntryIn> =
        serde_json::from_slice(bytes).map_err(|e| ParseError::Json { line: e.line(), column: e.column() })?;
    doc.auths
        .into_iter()
        .map(|(server, entry)| {
            let (username, password) = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) => {
                    let decoded = STANDARD
                        .decode(auth.expose_secret())
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                        .map(SecretString::from)
                        .ok_or_else(|| ParseError::BadAuth(server.clone()))?;
                    let (user, pass) =
                        decoded.expose_secret().split_once(':').ok_or_else(|| ParseError::BadAuth(server.clone()))?;
                    (user.to_string(), pass.into())
                }
                (None, Some(user), Some(pass)) => (user, pass),
                _ => return Err(ParseError::MissingLogin(server)),
            };
            Ok(RegistryAuth { server, username, password })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(server: &str, username: &str, password: &str) -> RegistryAuth {
        RegistryAuth { server: server.into(), username: username.into(), password: password.into() }
    }

    #[test]
    fn renders_the_docker_login_shape() {
        let bytes = render(&[login("ghcr.io", "bob", "s3cret")]);
        assert_eq!(
            std::str::from_utf8(bytes.expose_secret()).unwrap(),
            r#"{"auths":{"ghcr.io":{"username":"bob","password":"s3cret","auth":"Ym9iOnMzY3JldA=="}}}"#
        );
    }

    #[test]
    fn output_is_independent_of_input_order() {
        let a = render(&[login("b.io", "u", "p"), login("a.io", "u", "p")]);
        let b = render(&[login("a.io", "u", "p"), login("b.io", "u", "p")]);
        assert_eq!(a.expose_secret(), b.expose_secret());
    }

    #[test]
    fn awkward_passwords_survive_the_round_trip() {
        for password in ["a:b:c", "quote\"back\\slash", "ünïcødé ✓", "line\nbreak\r\n", "{\"json\": true}", " "] {
            let bytes = render(&[login("r.example.com", "user", password)]);
            let back = parse(bytes.expose_secret()).unwrap();
            assert_eq!(back.len(), 1);
            assert_eq!(back[0].username, "user");
            assert_eq!(back[0].password.expose_secret(), password);
        }
    }

    /// A document read back (a live Secret's) gives logins that show no password.
    #[test]
    fn parsed_logins_show_no_password() {
        let logins = parse(
            br#"{"auths":{"a.io":{"auth":"Ym9iOmh1bnRlcjItYQ=="},"b.io":{"username":"u","password":"hunter2-b"}}}"#,
        );
        let shown = format!("{logins:?}");
        for secret in ["hunter2-a", "bob:hunter2-a", "hunter2-b"] {
            crate::test_support::assert_hidden(&shown, secret);
        }
        assert_eq!(logins.unwrap()[0].password.expose_secret(), "hunter2-a");
    }

    #[test]
    fn parse_errors_carry_no_content() {
        let err = parse(b"{\"auths\": {\"x\": {\"auth\": \"hunter2-not-base64\"}}}").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        let err = parse(b"hunter2").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    proptest::proptest! {
        /// Whatever the logins, the document reads back to exactly them (any password,
        /// colons and non-ASCII included), and the order they come in does not matter.
        #[test]
        fn render_then_parse_round_trips(
            logins in proptest::collection::btree_map("[a-z0-9.-]{1,20}(:[0-9]{1,5})?", ("[^:\\x00-\\x1f]{1,12}", "\\PC{0,40}"), 1..5)
        ) {
            use secrecy::ExposeSecret;
            let auths: Vec<_> = logins.iter().map(|(s, (u, p))| login(s, u, p)).collect();
            let mut reversed = auths.clone();
            reversed.reverse();
            let bytes = render(&auths);
            let again = render(&reversed);
            proptest::prop_assert_eq!(bytes.expose_secret(), again.expose_secret());
            let parsed = parse(bytes.expose_secret()).unwrap();
            let back: Vec<_> = parsed.iter().map(|a| (a.server.clone(), (a.username.clone(), a.password.expose_secret().to_string()))).collect();
            proptest::prop_assert_eq!(back, logins.into_iter().collect::<Vec<_>>());
        }

        /// Arbitrary bytes never panic the parser, and its errors never quote the input.
        #[test]
        fn parse_errors_never_quote_the_document(secret in "[A-Za-z0-9]{16}", junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut doc = format!("{{\"auths\":{{\"r\":{{\"auth\":\"{secret}\"").into_bytes();
            doc.extend(junk);
            if let Err(error) = parse(&doc) {
                proptest::prop_assert!(!error.to_string().contains(&secret));
            }
        }
    }
}
